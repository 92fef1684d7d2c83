"""The settings of one generation, without torch (the command line reads their defaults):
sampling parameters and how many tokens a reply may have."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from phimoe_cli.errors import UsageError

MAX_NEW_TOKENS = {"generate": 512, "chat": 1024}  # a reply's default length, by command


class GenerationError(UsageError):
    """Bad generation input (prompt too long, bad sampling value); one line for the user."""


@dataclass
class SamplingParams:
    temperature: float = 0.7
    top_k: int = 0  # 0: off
    top_p: float = 0.95  # 1.0: off
    min_p: float = 0.0  # 0.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    seed: int | None = None

    def validate(self) -> SamplingParams:
        checks = [
            ("temperature", self.temperature, lambda v: v == 0 or 1e-4 <= v <= 1e4, "0 (greedy) or in [0.0001, 10000]"),
            ("top_k", self.top_k, lambda v: v >= 0 and float(v).is_integer(), "an integer >= 0"),
            ("top_p", self.top_p, lambda v: 0 < v <= 1, "in (0, 1]"),
            ("min_p", self.min_p, lambda v: 0 <= v < 1, "in [0, 1)"),
            ("repetition_penalty", self.repetition_penalty, lambda v: v > 0, "> 0"),
        ]
        for name, value, ok, want in checks:
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or not ok(value):
                raise GenerationError(f"{name} must be {want}, got {value!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise GenerationError(f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)
