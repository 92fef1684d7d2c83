"""Write a quantized model as a checkpoint that loads without its float weights.

The directory gets the model's own tensors (quantized experts as ``qweight`` / ``scale``, the rest
in the compute dtype) in safetensors shards with an index, ``phimoe_quantization.json`` saying how
it was made, and the source's config, generation config and tokenizer files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from phimoe_cli.errors import UsageError

from .loading import INDEX_FILE, QUANT_FILE

COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
          "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def save_quantized(model, source: str | Path, out: str | Path, shard_bytes: int = 4 << 30) -> Path:
    source, out = Path(source), Path(out)
    info = dict(model.quantization)
    if info.get("quantize", "none") == "none":
        raise ValueError("the model is not quantized")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("inv_freq")}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        if size and size + t.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.cpu() for k, v in shard.items()}, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
    for name in COPIED:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    dtype = str(next(p for p in model.parameters() if p.is_floating_point()).dtype).replace("torch.", "")
    meta = {"format": 1, "quantize": info["quantize"], "quantize_attention": bool(info.get("quantize_attention")),
            "quantize_head": bool(info.get("quantize_head")), "dtype": dtype, "source": os.fspath(source)}
    (out / QUANT_FILE).write_text(json.dumps(meta, indent=2))
    return out
