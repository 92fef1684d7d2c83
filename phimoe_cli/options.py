"""Every command-line option, declared once, and the groups of values that travel together.

Commands take these ``Annotated`` aliases as parameters (``model: options.Model = DEFAULT_MODEL``),
so an option's flags, help and checks are written here and nowhere else. The load options reach
runtime.load as one ``LoadOptions``; sampling options default to None and take their defaults
from SamplingParams (params.py), the one place defaults live. Light: no torch here, so that
``phimoe --help`` starts at once.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, fields
from typing import Annotated

import typer

from phimoe_cli.model.config import dtype_name
from phimoe_cli.params import MAX_NEW_TOKENS, SamplingParams

DEFAULT_MODEL = "microsoft/Phi-3.5-MoE-instruct"
_DEFAULTS = SamplingParams()
_SAMPLING = "Sampling"
_LOADING = "Loading"

# ---------------------------------------------------------------------------------- the model
Model = Annotated[str, typer.Option("--model", "-m", help="Hub repo id or local checkpoint directory.")]
ModelArg = Annotated[str, typer.Argument(help="Hub repo id or local checkpoint directory.")]
Revision = Annotated[str | None, typer.Option("--revision", help="Branch, tag or commit of a hub repo.",
                                              rich_help_panel=_LOADING)]
Offline = Annotated[bool, typer.Option("--offline", help="Use only the local Hugging Face cache.",
                                       rich_help_panel=_LOADING)]
Dtype = Annotated[str, typer.Option("--dtype", help="auto (the checkpoint's), bfloat16, float16 or float32.",
                                    rich_help_panel=_LOADING)]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda or auto (plan from free GPU memory).",
                                     rich_help_panel=_LOADING)]
Quantize = Annotated[str | None, typer.Option(
    "--quantize", "-q", help="Experts as int8, nf4 or fp4 (bitsandbytes' formats); none keeps them.",
    rich_help_panel=_LOADING, show_default=False)]
QuantizeAttention = Annotated[bool, typer.Option("--quantize-attention", help="Also quantize q/k/v/o.",
                                                 rich_help_panel=_LOADING)]
QuantizeHead = Annotated[bool, typer.Option(
    "--quantize-head", help="Also store the output head as int8 (whatever -q is; llama.cpp's is 6-8 bits).",
    rich_help_panel=_LOADING)]
Offload = Annotated[str, typer.Option(
    "--offload", help="experts: kept in host RAM, the used ones cached on the device; disk: memory-mapped "
                      "from the files.", rich_help_panel=_LOADING)]
GpuMemory = Annotated[str | None, typer.Option(
    "--gpu-memory", help="Device memory for --offload / --device auto / --plan, e.g. 20GiB.", rich_help_panel=_LOADING)]

# ----------------------------------------------------------------------------- a remote server
BaseUrl = Annotated[str | None, typer.Option(
    "--base-url", envvar="PHIMOE_BASE_URL", show_default=False, rich_help_panel="Remote",
    help="Use an OpenAI-compatible server (phimoe serve, vLLM, ...) at this URL, e.g. http://host:8000/v1.")]
ApiKey = Annotated[str | None, typer.Option(
    "--api-key", envvar=["PHIMOE_API_KEY", "OPENAI_API_KEY"], show_default=False, show_envvar=True,
    rich_help_panel="Remote", help="The server's API key (with --base-url).")]
ServeApiKey = Annotated[str | None, typer.Option(
    "--api-key", envvar="PHIMOE_API_KEY", show_default=False,
    help="Require 'Authorization: Bearer KEY' on every endpoint but /health.")]

# --------------------------------------------------------------------------- the conversation
System = Annotated[str | None, typer.Option("--system", "-s", help="A system message.")]
MaxNewTokens = Annotated[int | None, typer.Option(
    "--max-new-tokens", "-n", min=1, show_default=False,
    help=f"Most tokens per reply (default {MAX_NEW_TOKENS['generate']}; chat {MAX_NEW_TOKENS['chat']}).")]
Stop = Annotated[list[str] | None, typer.Option("--stop", help="End a reply at this text (repeatable; not printed).")]
IgnoreEos = Annotated[bool, typer.Option("--ignore-eos", help="Keep going past stop tokens (tests, benchmarks).")]
Context = Annotated[int | None, typer.Option(
    "--context", min=16, show_default=False,
    help="Context length in tokens (default: the model's; info: 4096, for the KV-cache estimate).")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object (instead of the text).")]

# ---------------------------------------------------------------------------------- sampling
Temperature = Annotated[float | None, typer.Option(
    "--temperature", "-t", min=0.0, show_default=False, rich_help_panel=_SAMPLING,
    help=f"0 = greedy (default {_DEFAULTS.temperature}).")]
TopK = Annotated[int | None, typer.Option(
    "--top-k", min=0, show_default=False, rich_help_panel=_SAMPLING,
    help=f"Keep the k best tokens, 0 = off (default {_DEFAULTS.top_k}).")]
# (no min/max here: click can show only closed ranges, and these are half-open; SamplingParams checks)
TopP = Annotated[float | None, typer.Option(
    "--top-p", show_default=False, rich_help_panel=_SAMPLING,
    help=f"Nucleus sampling, in (0, 1]; 1 = off (default {_DEFAULTS.top_p}).")]
MinP = Annotated[float | None, typer.Option(
    "--min-p", show_default=False, rich_help_panel=_SAMPLING,
    help=f"Drop tokens below min_p x the best, in [0, 1); 0 = off (default {_DEFAULTS.min_p}).")]
RepetitionPenalty = Annotated[float | None, typer.Option(
    "--repetition-penalty", show_default=False, rich_help_panel=_SAMPLING,
    help=f"> 1 discourages repeats, 1 = off (default {_DEFAULTS.repetition_penalty}).")]
Seed = Annotated[int | None, typer.Option("--seed", min=0, rich_help_panel=_SAMPLING,
                                          help="Make sampling reproducible (default: random).")]

SAMPLING_NAMES = tuple(f.name for f in fields(SamplingParams))
SAMPLING_OPTIONS = dict(zip(SAMPLING_NAMES, (Temperature, TopK, TopP, MinP, RepetitionPenalty, Seed), strict=True))
LOAD_OPTIONS = {  # name: (option, default)
    "revision": (Revision, None), "offline": (Offline, False), "dtype": (Dtype, "auto"), "device": (Device, "cpu"),
    "quantize": (Quantize, None), "quantize_attention": (QuantizeAttention, False),
    "quantize_head": (QuantizeHead, False), "offload": (Offload, "none"), "gpu_memory": (GpuMemory, None),
}


def _adding(command, into: str, added: dict, collect):
    """Give a typer command the options ``added`` ({name: (alias, default)}): they join its signature
    (keyword-only, after its own), and reach it as one value, ``into`` = collect(their values)."""
    signature = inspect.signature(command, eval_str=True)  # the annotations themselves, not their text
    kept = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind == p.POSITIONAL_OR_KEYWORD else p
            for p in signature.parameters.values() if p.name != into]
    new = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=alias)
           for name, (alias, default) in added.items()]

    @functools.wraps(command)
    def run(**kwargs):
        values = {name: kwargs.pop(name) for name in added}
        return command(**kwargs, **{into: collect(values, kwargs)})

    run.__signature__ = signature.replace(parameters=[*kept, *new], return_annotation=signature.return_annotation)
    return run


def with_sampling(command):
    """Give a command the sampling options (one per SamplingParams field); they reach it as one dict,
    ``sampling`` (None: not given)."""
    return _adding(command, "sampling", {name: (alias, None) for name, alias in SAMPLING_OPTIONS.items()},
                   lambda values, _: values)


def with_loading(command):
    """Give a command the load options (all but ``--model``, which the command declares itself, as an
    option or an argument); they reach it, with the model, as one LoadOptions, ``load``."""
    def collect(values: dict, others: dict) -> LoadOptions:
        values["offline"] = values["offline"] or None  # False: as the environment says
        values["quantize"] = values["quantize"] or "none"
        dtype_name(values["dtype"])  # a bad --dtype is refused before torch loads
        return LoadOptions(model=others["model"], **values)

    return _adding(command, "load", LOAD_OPTIONS, collect)


def with_remote(command):
    """Give a command --base-url and --api-key; they reach it as one Remote, ``remote`` (its
    ``base_url`` None: run the model here)."""
    return _adding(command, "remote", {"base_url": (BaseUrl, None), "api_key": (ApiKey, None)},
                   lambda values, _: Remote(**values))


def sampling(given: dict, fallback: dict | None = None) -> SamplingParams:
    """SamplingParams from the options given (None: not given), else ``fallback`` (a saved
    conversation's), else SamplingParams' defaults."""
    fallback = fallback or {}
    values = {}
    for name in SAMPLING_NAMES:
        if given.get(name) is not None:
            values[name] = given[name]
        elif name in fallback:
            values[name] = fallback[name]
        else:
            values[name] = getattr(_DEFAULTS, name)
    return SamplingParams(**values)


@dataclass
class LoadOptions:
    """Where the model comes from and how it is loaded: what ``runtime.load`` takes."""

    model: str = DEFAULT_MODEL
    revision: str | None = None
    offline: bool | None = None
    dtype: str = "auto"
    device: str = "cpu"
    quantize: str = "none"
    quantize_attention: bool = False
    quantize_head: bool = False
    offload: str = "none"
    gpu_memory: str | None = None

    def given(self) -> list[str]:
        """The load options set to other than their defaults, as flags (``--model`` aside)."""
        default = LoadOptions(model=self.model)
        return [f"--{f.name.replace('_', '-')}" for f in fields(self)
                if getattr(self, f.name) != getattr(default, f.name)]


@dataclass
class Remote:
    """An OpenAI-compatible server to use instead of a model of this process."""

    base_url: str | None = None
    api_key: str | None = None
