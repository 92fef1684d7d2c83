"""phimoe against llama.cpp on the same checkpoint, bf16 / int8 / 4-bit, runs interleaved.

    python3 benchmarks/peers.py                      # the `mid` shape, 2 threads, 2 rounds
    python3 benchmarks/peers.py --rounds 3 --threads 2 --settings bf16,int8,nf4
    python3 benchmarks/peers.py --settings bf16 --depth 4096 --gen 32   # decode at 4K of context
    python3 benchmarks/peers.py --avx2               # an AVX-512 CPU standing in for an AVX2 one

What it does (nothing here runs in CI):

1. llama.cpp: built once into ``$PHIMOE_PEERS_DIR`` (default ~/.cache/phimoe/peers) from the source
   in the ``llama-cpp-python`` sdist (``pip download --no-deps --no-binary :all:``), with
   ``cmake -DGGML_NATIVE=ON -DLLAMA_CURL=OFF``, targets llama-bench and llama-quantize.
2. A checkpoint in the hub's layout with random weights, bf16 on disk (tests/checkpoints.py, with
   the Phi-3 tokenizer files from ../shared/reference), of the ``mid`` shape (hidden 1024, ffn 1600,
   8 layers, 16 experts top-2, 716M parameters) unless ``--shape`` says otherwise.
3. llama.cpp's ``convert_hf_to_gguf.py`` makes BF16 and Q8_0 GGUFs of it, ``llama-quantize`` the
   Q4_0 one; ``phimoe quantize`` writes our int8 and nf4 checkpoints (experts, attention and,
   as int8, the output head).
4. Rounds: each setting, phimoe then llama.cpp, is timed in turn, so a fast or slow minute of the
   machine's memory falls on both. phimoe: a raw prompt of --prompt tokens and --gen greedy
   tokens (ignoring stop tokens) through the library's Generator, as ``phimoe generate`` runs them,
   timed on a second run in the same process (the first warms up, as llama-bench's warm-up run
   does). llama.cpp: ``llama-bench -p P -n N -t T -o json`` (the mean of its 5 runs). The table
   gives the best of the rounds for each.

What differs between the two, beyond the code: llama.cpp's Q8_0 and Q4_0 quantize every matrix
(its Q8_0 keeps the output head in Q8_0, its Q4_0 in Q6_K; the router stays F32), phimoe quantizes
experts and attention, stores the head as int8 (``--quantize-head``) and keeps the router and
embeddings in bfloat16. llama.cpp multiplies int8 activations (Q8_0), phimoe int16 ones.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA_CPP_PYTHON = "0.3.36"
SETTINGS = {  # ours (quantize, with attention), llama.cpp's type
    "bf16": ("none", "BF16"),
    "int8": ("int8", "Q8_0"),
    "nf4": ("nf4", "Q4_0"),
}


def peers_dir() -> Path:
    return Path(os.environ.get("PHIMOE_PEERS_DIR") or Path.home() / ".cache" / "phimoe" / "peers")


def run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=True, text=True, **kw)


# --avx2: llama.cpp built for AVX2 only, and phimoe's C kernels and torch's held to AVX2, so an
# AVX-512 machine stands in for an AVX2-only one (a simulation: the cores' ports and caches stay theirs)
AVX2_CMAKE = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
              "-DGGML_BMI2=ON", "-DGGML_AVX512=OFF"]
AVX2_ENV = {"PHIMOE_NATIVE_CFLAGS": "-mavx2 -mfma -mf16c", "ATEN_CPU_CAPABILITY": "avx2"}


def build_llama_cpp(build: str = "build", cmake: tuple[str, ...] = ("-DGGML_NATIVE=ON",)) -> tuple[Path, Path]:
    """The llama.cpp source tree and its build folder (with bin/llama-bench), built if missing."""
    src = peers_dir() / f"llama-cpp-python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if (src / build / "bin" / "llama-bench").exists():
        return src, src / build
    peers_dir().mkdir(parents=True, exist_ok=True)
    if not src.exists():
        with tempfile.TemporaryDirectory() as tmp:
            run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                 f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp])
            archive = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
            shutil.move(str(next(Path(tmp).glob("llama_cpp_python-*/"))), str(src.parents[1]))
    run(["cmake", "-B", build, *cmake, "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release"],
        cwd=src, stdout=subprocess.DEVNULL)
    run(["cmake", "--build", build, "--target", "llama-bench", "llama-quantize", "-j", str(os.cpu_count() or 2)],
        cwd=src, stdout=subprocess.DEVNULL)
    return src, src / build


def make_checkpoint(shape: str, work: Path, layers: int | None = None, long: bool = False) -> Path:
    """A random-weight checkpoint of ``shape`` in the hub's layout, bf16 on disk, with tokenizer files;
    ``long``: the published 128K context (LongRoPE's long factors beyond 4096 tokens, no sliding
    window within it), else 4096 positions."""
    path = work / f"{shape}{f'-{layers}layers' if layers else ''}{'-long' if long else ''}-bf16"
    if (path / "model.safetensors.index.json").exists():
        return path
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from checkpoints import make_config, published_config, write_checkpoint
    from tokenizer_fixtures import build_tokenizer_dir, load_source

    from phimoe_cli.bench import SHAPES

    build_tokenizer_dir(path, load_source())
    dims = dict(SHAPES[shape])
    if not dims:  # the published dimensions (make_config starts from the tests' tiny ones)
        published = published_config()
        dims = {k: published[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                          "num_key_value_heads", "num_local_experts", "vocab_size")}
    if layers:
        dims["num_hidden_layers"] = layers
    context = 131072 if long else 4096
    config = make_config(0, **dims, max_position_embeddings=context, original_max_position_embeddings=4096,
                         sliding_window=context)
    write_checkpoint(path, config, shards=4, dtype=torch.bfloat16)
    return path


def llama_env(build: Path) -> dict:
    """llama.cpp's binaries find their shared libraries beside them, even in a moved build tree."""
    lib = str(build / "bin")
    return dict(os.environ, LD_LIBRARY_PATH=lib + os.pathsep + os.environ.get("LD_LIBRARY_PATH", ""))


def gguf(src: Path, checkpoint: Path, kind: str, work: Path) -> Path:
    out = work / f"{checkpoint.name}-{kind}.gguf"
    if out.exists():
        return out
    env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))
    if kind in ("BF16", "Q8_0"):
        run([sys.executable, src / "convert_hf_to_gguf.py", checkpoint, "--outtype", kind.lower(), "--outfile", out],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    else:
        run([src / "build" / "bin" / "llama-quantize", gguf(src, checkpoint, "BF16", work), out, kind],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=llama_env(src / "build"))
    return out


OURS_FLAGS = ("--quantize-attention", "--quantize-head")


def ours_checkpoint(checkpoint: Path, quantize: str, work: Path) -> Path:
    if quantize == "none":
        return checkpoint
    out = work / f"{checkpoint.name}-{quantize}-attention-head"
    if not (out / "phimoe_quantization.json").exists():  # the head int8, as llama.cpp quantizes its head too
        run(["phimoe", "quantize", checkpoint, out, "-q", quantize, *OURS_FLAGS], stdout=subprocess.DEVNULL)
    return out


WARM = """
import json, sys, torch
from phimoe_cli.generation import Generator, SamplingParams
from phimoe_cli.runtime import load
path, prompt, gen = sys.argv[1], sys.argv[2], int(sys.argv[3])
loaded = load(path, progress=False)
g = Generator(loaded.model, loaded.tokenizer)
ids = loaded.tokenizer.encode(prompt)
for _ in range(2):  # the first run warms up (as llama-bench's does); the second is timed
    for _ in g.stream(ids, SamplingParams(temperature=0.0), gen, ignore_eos=True):
        pass
print(json.dumps([g.result.prefill_tokens_per_s, g.result.decode_tokens_per_s]))
"""


def time_ours(path: Path, prompt: str, gen: int, threads: int, extra_env: dict) -> tuple[float, float]:
    """phimoe's prefill and decode tok/s: a warm run (after one untimed generation, in the same
    process), as llama-bench times warm runs."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), **extra_env)
    out = run([sys.executable, "-c", WARM, path, prompt, gen], capture_output=True, env=env,
              stdin=subprocess.DEVNULL).stdout
    prefill, decode = json.loads(out)
    return prefill, decode


NO_REPACK: set[Path] = set()  # models whose llama-bench run crashed with the default (repacked) weights


def time_llama(build: Path, model: Path, prompt: int, gen: int, threads: int, depth: int = 0) -> tuple[float, float]:
    """llama-bench's prefill / decode tok/s. Where it dies of a signal with its default repacked
    weights (seen on an Intel Xeon with AMX: Q8_0 and Q4_0 of this MoE crash in the AMX / repacked
    path), it is run again with ``--repack 0`` and the table says so."""
    bench = build / "bin" / "llama-bench"
    cmd = [bench, "-m", model, "-p", prompt, "-n", gen, "-t", threads, "-o", "json"]
    if depth:  # decode only, after a context of `depth` tokens (prefilled before each of 2 runs)
        cmd = [bench, "-m", model, "-p", 0, "-n", gen, "-d", depth, "-r", 2, "-t", threads, "-o", "json"]
    try:
        if model in NO_REPACK:
            raise subprocess.CalledProcessError(-1, cmd)
        out = run(cmd, capture_output=True, env=llama_env(build)).stdout
    except subprocess.CalledProcessError as exc:
        if exc.returncode >= 0:
            raise
        NO_REPACK.add(model)
        out = run([*cmd, "--repack", "0"], capture_output=True, env=llama_env(build)).stdout
    rows = json.loads(out)
    pp = next((r["avg_ts"] for r in rows if r["n_prompt"] and not r["n_gen"]), 0.0)
    tg = next(r["avg_ts"] for r in rows if r["n_gen"] and not r["n_prompt"])
    return pp, tg


def prompt_of(path: Path, tokens: int) -> str:
    """A raw prompt of ``tokens`` tokens (or one fewer) for this checkpoint's tokenizer."""
    from phimoe_cli.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(path)
    words = ["alpha", "river", "stone", "light", "north", "paper", "seven", "green"]

    def text(n: int) -> str:
        return " ".join(words[i % len(words)] for i in range(n))

    n = tokens  # words (each a token or more): down until they fit, then up while one more still fits
    while (count := len(tok.encode(text(n)))) > tokens:
        n -= max(1, (count - tokens) // 2)
    while len(tok.encode(text(n + 1))) <= tokens:
        n += 1
    return text(n)


def isa() -> str:
    flags = set()
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni") if f in flags)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="mid")
    ap.add_argument("--layers", type=int, help="keep only N layers (the real dimensions: --layers 2 fits 24 GB)")
    ap.add_argument("--settings", default="bf16,int8,nf4")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--depth", type=int, default=0,
                    help="decode after a context of this many tokens (phimoe: a prompt that long; llama-bench -d)")
    ap.add_argument("--avx2", action="store_true",
                    help="both held to AVX2 (llama.cpp built without AVX-512, phimoe's C and torch's kernels "
                         "AVX2): an AVX-512 machine simulating an AVX2-only one")
    args = ap.parse_args()
    src, build = build_llama_cpp()
    ours_env = {}
    if args.avx2:
        _, build = build_llama_cpp("build-avx2", tuple(AVX2_CMAKE))
        ours_env = AVX2_ENV
    work = peers_dir() / "models"
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = make_checkpoint(args.shape, work, args.layers, long=args.depth + args.gen > 4096)
    prompt = prompt_of(checkpoint, args.depth or args.prompt)
    settings = args.settings.split(",")
    models = {s: (ours_checkpoint(checkpoint, SETTINGS[s][0], work), gguf(src, checkpoint, SETTINGS[s][1], work))
              for s in settings}
    best: dict[str, list[float]] = {s: [0.0] * 4 for s in settings}
    for r in range(args.rounds):
        for s in settings:
            ours, theirs = models[s]
            got = (*time_ours(ours, prompt, args.gen, args.threads, ours_env),
                   *time_llama(build, theirs, args.prompt, args.gen, args.threads, args.depth))
            best[s] = [max(a, b) for a, b in zip(best[s], got, strict=True)]
            print(f"round {r + 1} {s}: ours {got[0]:.0f} / {got[1]:.1f}, llama.cpp {got[2]:.0f} / {got[3]:.1f} tok/s",
                  file=sys.stderr)
    layers = f" ({args.layers} layers)" if args.layers else ""
    what = (f"decode after {args.depth} tokens of context (phimoe's prefill column: that prompt; "
            f"llama-bench -d, no prefill column)" if args.depth else f"prompt {args.prompt}")
    print(f"{args.shape}{layers}, {args.threads} threads, {what}, {args.gen} new tokens, best of "
          f"{args.rounds} interleaved rounds; CPU: {isa()}"
          + ("; SIMULATED AVX2: both held to AVX2 builds on this CPU" if args.avx2 else ""))
    print("| setting | phimoe prefill / decode tok/s | llama.cpp | prefill / decode tok/s | ratio prefill |"
          " ratio decode |")
    print("|---|---|---|---|---|---|")
    for s in settings:
        p, d, lp, ld = best[s]
        ours = "bf16" if s == "bf16" else f"-q {s} {' '.join(OURS_FLAGS)}"
        theirs = SETTINGS[s][1] + (" (`--repack 0`: it crashed without)" if models[s][1] in NO_REPACK else "")
        ratio = f"{p / lp:.2f}x" if lp else "-"
        print(f"| {ours} | {p:.0f} / {d:.1f} | {theirs} | {lp:.0f} / {ld:.1f} | {ratio} | {d / ld:.2f}x |")


if __name__ == "__main__":
    main()
