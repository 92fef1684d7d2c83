"""Sparsemixer routing against a direct implementation of the published formula."""

from __future__ import annotations

import math

import pytest
import torch

from phimoe_cli.model import sparsemixer

EPS = 0.01  # the published router_jitter_noise


def direct(scores: list[float], eps: float):
    """The published eval-mode rule, written out in plain Python (float64)."""

    def pick(remaining: list[float]):
        best = max(remaining)
        index = remaining.index(best)  # the first of equal maxima
        kept = []
        for j, (r, s) in enumerate(zip(remaining, scores, strict=True)):
            factor = max(abs(s), best)
            gap = (best - s) / factor if factor else math.nan  # 0/0: never "too far"
            if r != -math.inf and not gap > 2 * eps:
                kept.append(j)
        total = sum(math.exp(remaining[j] - best) for j in kept)
        return index, 1.0 / total  # exp(best - best) / total

    first, w1 = pick(list(scores))
    rest = list(scores)
    rest[first] = -math.inf
    second, w2 = pick(rest)
    return [first, second], [w1, w2]


CRAFTED = [
    [1.0, 1.0, 0.5, -0.3],  # exact tie for the top: the first index wins, the twin is second
    [0.0, 0.0, 0.0, 0.0],  # all equal (0/0 gaps)
    [2.0, 1.99, 1.97, 0.0],  # near-ties inside the 2% band: several experts share the softmax
    [2.0, 1.962, 1.958, 1.0],  # one just inside (1.9%), one just outside (2.1%) the band
    [-1.0, -1.01, -3.0, -0.99],  # all negative
    [0.5, 3.0, 3.0, 3.0],  # three-way tie not in first place
    [1e4, 9.9e3, -1e4, 9.81e3],  # large magnitudes
    [0.001, -0.001, 0.0005, 0.0],  # tiny magnitudes: relative gaps are large
    [5.0, -5.0, -5.0, -5.0],  # one clear winner: the second pick comes from a three-way tie
]


@pytest.mark.parametrize("row", CRAFTED)
def test_crafted_rows(row):
    weights, chosen = sparsemixer(torch.tensor([row], dtype=torch.float64), EPS)
    want_idx, want_w = direct(row, EPS)
    assert chosen[0].tolist() == want_idx
    assert weights[0].tolist() == pytest.approx(want_w, rel=1e-9)


def test_weights_are_not_renormalised():
    weights, _ = sparsemixer(torch.tensor([[2.0, 1.99, 1.97, 0.0]]), EPS)
    assert weights.sum().item() < 1.5  # each weight is a softmax share, < 1 here
    assert weights[0, 0].item() == pytest.approx(direct([2.0, 1.99, 1.97, 0.0], EPS)[1][0], rel=1e-6)


def test_random_rows_match_the_formula():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(500, 16, generator=g, dtype=torch.float64) * 0.05  # many near-ties
    weights, chosen = sparsemixer(scores, EPS)
    for row, w, c in zip(scores.tolist(), weights.tolist(), chosen.tolist(), strict=True):
        want_idx, want_w = direct(row, EPS)
        assert c == want_idx
        assert w == pytest.approx(want_w, rel=1e-9)


def test_matches_transformers_sparsemixer():
    modeling = pytest.importorskip("transformers.models.phimoe.modeling_phimoe")
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(300, 16, generator=g)
    scores[::7, 3] = scores[::7, 5]  # exact ties
    w, c = sparsemixer(scores, EPS)
    rw, rc = modeling.sparsemixer(scores, jitter_eps=EPS, training=False)
    assert torch.equal(c, rc)
    assert torch.equal(w, rw)
