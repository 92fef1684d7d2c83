"""Other CPUs' paths, forced on this one, so that CI catches an ISA-specific bug on any machine.

Which kernels run depends on the CPU: prefill widens bfloat16 to float32 where the CPU has no
bfloat16 dot product (kernels.prefill_dtype), torch picks its AVX-512 / AVX2 / plain kernels by
``ATEN_CPU_CAPABILITY``, the C decode step has AVX-512, AVX2 and plain-C builds (test_native.py
builds each one this CPU can run), and without a C compiler the model falls back to torch. Here:

* the float32-widened prefill and the native bfloat16 one, in process, on every CPU;
* the tests marked ``isa`` again, in a child process under torch's kernels for another
  instruction set (AVX2 on an AVX-512 machine, the plain kernels on an AVX2 one);
* ``phimoe generate`` end to end with no C compiler on the PATH and nothing built yet.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PHIMOE

from phimoe_cli.model import kernels

TESTS = Path(__file__).parent


@pytest.mark.isa
@pytest.mark.parametrize("choice", ["float32", "native"])
@pytest.mark.parametrize("k", [64, 72])  # 72: not a multiple of 16, so the C kernel declines and blocks are widened
def test_prefill_products_work_in_and_out_of_inference_mode(monkeypatch, choice, k):
    """The widened prefill keeps a float32 scratch block across calls; made first under
    inference_mode, it must still be writable by a product under no_grad or plain autograd-free
    use (it was an inference tensor: "Inplace update to inference tensor outside InferenceMode")."""
    monkeypatch.setenv("PHIMOE_PREFILL_DTYPE", choice)
    monkeypatch.setattr(kernels._scratch_space, "buf", None, raising=False)  # as in a fresh process
    assert kernels.prefill_dtype(torch.bfloat16) == (torch.float32 if choice == "float32" else torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(96, k, generator=g).bfloat16(), torch.randn(5, k, generator=g).bfloat16()
    exact = x.double() @ w.double().t()
    with torch.inference_mode():
        first = kernels.prefill_linear(x, w)
    with torch.no_grad():
        second = kernels.prefill_linear(x, w)
    third = kernels.prefill_linear(x, w)
    for y in (first, second, third):
        # float32 sums, one bfloat16 rounding (half a step: 2^-9 relative), plus summation-order slack
        assert ((y.double() - exact).abs() <= 2.0**-8 * exact.abs() + 1e-5 * 64).all()
    assert torch.equal(first, second) and torch.equal(second, third)


def _other_capability() -> str | None:
    """torch's kernels for an instruction set this CPU runs but does not pick by default."""
    host = torch.backends.cpu.get_cpu_capability().upper()
    if host.startswith("AVX512"):
        return "avx2"
    if host.startswith("AVX2"):
        return "default"
    return None  # already the plain kernels (or not x86)


def test_isa_sensitive_tests_pass_under_another_instruction_sets_kernels(tmp_path):
    capability = _other_capability()
    if capability is None:
        pytest.skip(f"torch already runs its plain kernels here ({torch.backends.cpu.get_cpu_capability()})")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, PYTHONDONTWRITEBYTECODE="1")
    env.pop("PHIMOE_PREFILL_DTYPE", None)  # decided from the capability, as on such a CPU
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-m", "isa", "-p", "no:cacheprovider",
         # torch's kernels are what changes; the C step's other builds are test_native's own concern
         "-k", "not generic and not avx2", "--basetemp", str(tmp_path / "t"), str(TESTS)],
        capture_output=True, text=True, env=env, timeout=600, cwd=TESTS.parent,
    )
    report = child.stdout[-4000:] + child.stderr[-2000:]
    assert child.returncode == 0, report
    assert " passed" in child.stdout and "no tests ran" not in child.stdout, report
    if capability == "avx2":  # torch really ran its AVX2 kernels, and prefill widened as on an AVX2 CPU
        probe = "import torch; from phimoe_cli.model import kernels; " \
                "print(torch.backends.cpu.get_cpu_capability(), kernels.prefill_dtype(torch.bfloat16))"
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
        assert out.stdout.split() == ["AVX2", "torch.float32"], out.stdout


def test_generate_without_a_c_compiler_decodes_as_the_eager_path(model_dir, tmp_path):
    """No cc or gcc on the PATH and an empty build cache: ``phimoe generate`` still answers, with
    exactly the tokens of the eager decode path it falls back to, and says why in one warning."""
    args = [*PHIMOE, "generate", "-m", str(model_dir), "--dtype", "bfloat16", "--raw", "-t", "0", "-n", "12",
            "--ignore-eos", "--json", "Once upon a time"]
    base = dict(os.environ, PHIMOE_NO_HISTORY="1")
    base.pop("PHIMOE_DECODE_KERNEL", None)
    bare = tmp_path / "bin"  # a PATH with no compiler on it
    bare.mkdir()
    no_cc = dict(base, PATH=str(bare), PHIMOE_CACHE_DIR=str(tmp_path / "cache"))
    no_cc.pop("CC", None)
    without = subprocess.run(args, capture_output=True, text=True, env=no_cc, stdin=subprocess.DEVNULL, timeout=120)
    assert without.returncode == 0, without.stderr
    assert "no C compiler" in without.stderr and "Traceback" not in without.stderr
    assert next(line for line in without.stderr.splitlines() if "C compiler" in line).startswith("warning: ")
    assert not any((tmp_path / "cache").glob("*.so"))
    # the reference: the eager decode path, also without a compiler, so that its prompt goes through the
    # same prefill (with one, an AVX2 CPU's prefill runs the C kernel, whose float32 sums are ordered
    # differently from the widened blocks', and a near-tie could then flip a token)
    eager_env = dict(no_cc, PHIMOE_DECODE_KERNEL="eager", PHIMOE_CACHE_DIR=str(tmp_path / "cache-eager"))
    eager = subprocess.run(args, capture_output=True, text=True, env=eager_env, stdin=subprocess.DEVNULL, timeout=120)
    assert eager.returncode == 0, eager.stderr
    got, want = json.loads(without.stdout), json.loads(eager.stdout)
    assert len(got["token_ids"]) == 12 and got["token_ids"] == want["token_ids"]
