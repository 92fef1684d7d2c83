"""`phimoe eval`: what quantization costs, measured on a text.

The text runs through the unquantized and the quantized model (teacher-forced, one after the
other so only one model is in memory): mean KL divergence of the next-token distributions,
top-1 agreement and both perplexities.
"""

from __future__ import annotations

import math

import torch

from phimoe_cli.errors import UsageError
from phimoe_cli.model import load_model


def _log_probs(model, ids: list[int], chunk: int):
    """[positions, vocab] float32 log-probabilities for every position that has a next token."""
    out = []
    for start in range(0, len(ids) - 1, chunk):
        x = torch.tensor([ids[start : start + chunk + 1]], device=next(model.parameters()).device)
        with torch.inference_mode():
            logits = model(x[:, :-1])[0].float()
        out.append(torch.log_softmax(logits, dim=-1).cpu())
    return torch.cat(out)


def evaluate(path, ids: list[int], quantize: str, dtype: str = "auto", device: str = "cpu",
             quantize_attention: bool = False, chunk: int = 1024, progress=None) -> dict:
    if len(ids) < 2:
        raise UsageError("the text must have at least 2 tokens")
    targets = torch.tensor(ids[1:])
    reference = load_model(path, dtype=dtype, device=device, progress=progress)
    chunk = min(chunk, reference.config.max_position_embeddings - 1)
    ref = _log_probs(reference, ids, chunk)
    del reference
    quantized = load_model(path, dtype=dtype, device=device, progress=progress, quantize=quantize,
                           quantize_attention=quantize_attention)
    q = _log_probs(quantized, ids, chunk)
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
