"""`phimoe eval`: what quantization costs, measured on a text.

The text runs through the unquantized and the quantized model (teacher-forced, one after the
other so only one model is in memory): mean KL divergence of the next-token distributions,
top-1 agreement and both perplexities.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from phimoe_cli.engine import LocalEngine
from phimoe_cli.errors import UsageError
from phimoe_cli.options import LoadOptions
from phimoe_cli.runtime import load


def evaluate(path, ids: list[int], quantize: str, dtype: str = "auto", device: str = "cpu",
             quantize_attention: bool = False, chunk: int = 1024, progress=None, quantize_head: bool = False) -> dict:
    if len(ids) < 2:
        raise UsageError("the text must have at least 2 tokens")
    targets = torch.tensor(ids[1:])
    options = LoadOptions(model=str(path), dtype=dtype, device=device)
    ref = LocalEngine(load(options, progress=progress)).log_probs(ids, chunk)  # freed before the next load
    q = LocalEngine(load(replace(options, quantize=quantize, quantize_attention=quantize_attention,
                                 quantize_head=quantize_head),
                         progress=progress)).log_probs(ids, chunk)
    kl = (ref.exp() * (ref - q)).sum(-1)  # KL(reference || quantized) per position
    nll_ref = -ref.gather(1, targets[:, None]).mean().item()
    nll_q = -q.gather(1, targets[:, None]).mean().item()
    return {
        "quantize": quantize,
        "tokens": len(ids),
        "kl": kl.mean().item(),
        "top1_agreement": (ref.argmax(-1) == q.argmax(-1)).float().mean().item(),
        "perplexity": math.exp(nll_q),
        "perplexity_reference": math.exp(nll_ref),
    }
