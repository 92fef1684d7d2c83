"""`phimoe generate`, `info` and `download` driven as a user would: the installed command, real
files, real pipes."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time

import pytest
import torch
from conftest import PHIMOE, default_sigint, make_model_dir, run_phimoe

transformers = pytest.importorskip("transformers")


def gen_json(model_dir, *args, input=b""):
    r = run_phimoe("generate", "-m", model_dir, "--json", *args, input=input)
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout)


def one_error_line(r, code):
    err = r.stderr.decode()
    assert r.returncode == code, (r.returncode, err)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    return lines


def test_greedy_equals_transformers_generate(model_dir):
    out = gen_json(model_dir, "--raw", "-t", "0", "-n", "24", "--ignore-eos", "The quick brown fox")
    ids = torch.tensor([out["prompt_token_ids"]])
    ref = transformers.PhimoeForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    padding_rows = list(range(len(tok), ref.config.vocab_size))  # ids with no token: never generated
    with torch.no_grad():
        expected = ref.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None, min_new_tokens=24,
                                suppress_tokens=padding_rows or None)[0, ids.shape[1]:].tolist()
    assert out["token_ids"] == expected
    assert out["prompt_token_ids"] == tok("The quick brown fox", add_special_tokens=True)["input_ids"]
    assert out["text"] == tok.decode(expected, skip_special_tokens=True)


def test_json_schema(model_dir):
    out = gen_json(model_dir, "-n", "6", "--seed", "1", "Hello")
    assert set(out) == {"model", "text", "prompt_token_ids", "token_ids", "finish_reason", "usage", "timings"}
    assert out["model"] == str(model_dir)
    assert out["finish_reason"] in ("stop", "length")
    assert out["usage"] == {"prompt_tokens": len(out["prompt_token_ids"]), "completion_tokens": len(out["token_ids"])}
    assert set(out["timings"]) == {"load_s", "time_to_first_token_s", "prefill_tokens_per_s", "decode_tokens_per_s"}
    assert all(isinstance(v, (int, float)) and v >= 0 for v in out["timings"].values())
    assert all(isinstance(i, int) for i in out["token_ids"])
    # the chat format: <|user|> … <|end|> <|assistant|>
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert out["prompt_token_ids"] == tok.apply_chat_template(
        [{"role": "user", "content": "Hello"}], add_generation_prompt=True, tokenize=True, return_dict=False)


def test_plain_stdout_is_the_text(model_dir):
    out = gen_json(model_dir, "-t", "0", "-n", "10", "Hello")
    r = run_phimoe("generate", "-m", model_dir, "-t", "0", "-n", "10", "Hello")
    assert r.returncode == 0
    assert r.stdout.decode() == out["text"] + "\n"
    assert r.stderr.decode() == ""  # quiet in pipes: no progress bars, no stats


def test_verbose_writes_stats_to_stderr(model_dir):
    r = run_phimoe("generate", "-m", model_dir, "-n", "4", "-v", "Hello")
    assert r.returncode == 0
    assert "decode" in r.stderr.decode() and "tok/s" in r.stderr.decode()


def test_stdin_combinations(model_dir):
    def prompt_ids(*args, input=b""):
        return gen_json(model_dir, "--raw", "-n", "1", *args, input=input)["prompt_token_ids"]

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    enc = lambda text: tok(text)["input_ids"]  # noqa: E731
    assert prompt_ids(input="piped text") == enc("piped text")
    assert prompt_ids("-", input="piped text") == enc("piped text")
    assert prompt_ids("Summarise:", input="piped text") == enc("Summarise:\n\npiped text")
    assert prompt_ids("only the argument") == enc("only the argument")


def test_system_message(model_dir):
    out = gen_json(model_dir, "-n", "1", "--system", "Be brief.", "Hi")
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert out["prompt_token_ids"] == tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def test_stop_string_is_not_printed(model_dir):
    full = gen_json(model_dir, "-t", "0", "-n", "30", "--ignore-eos", "Tell me")["text"]
    stop = full[8:11]
    assert len(stop) == 3 and stop in full
    out = gen_json(model_dir, "-t", "0", "-n", "30", "--ignore-eos", "--stop", stop, "Tell me")
    assert out["text"] == full[: full.index(stop)]
    assert out["finish_reason"] == "stop"
    r = run_phimoe("generate", "-m", model_dir, "-t", "0", "-n", "30", "--ignore-eos", "--stop", stop, "Tell me")
    assert r.stdout.decode().rstrip("\n") == full[: full.index(stop)].rstrip("\n")


def test_seed_makes_sampling_reproducible(model_dir):
    a = gen_json(model_dir, "-t", "1.5", "--top-p", "1", "-n", "12", "--ignore-eos", "--seed", "7", "Hi")
    b = gen_json(model_dir, "-t", "1.5", "--top-p", "1", "-n", "12", "--ignore-eos", "--seed", "7", "Hi")
    c = gen_json(model_dir, "-t", "1.5", "--top-p", "1", "-n", "12", "--ignore-eos", "--seed", "8", "Hi")
    assert a["token_ids"] == b["token_ids"]
    assert a["token_ids"] != c["token_ids"]


def test_context_end_and_too_long_prompt(tmp_path):
    path = make_model_dir(tmp_path / "short", max_position_embeddings=40, original_max_position_embeddings=16,
                          sliding_window=40)
    from phimoe_cli.tokenizer import Tokenizer

    tok, words = Tokenizer.from_dir(path), 30
    while len(tok.encode(" ".join(["word"] * words))) > 30:  # a prompt of at most 30 of the 40 tokens
        words -= 1
    text = " ".join(["word"] * words)
    out = gen_json(path, "--raw", "-n", "100", "--ignore-eos", text)
    assert out["finish_reason"] == "length"
    assert len(out["prompt_token_ids"]) + len(out["token_ids"]) == 40
    r = run_phimoe("generate", "-m", path, "--raw", " ".join(["word"] * 60))
    lines = one_error_line(r, 2)
    assert len(lines) == 1 and "does not fit the context" in lines[0]


@pytest.mark.parametrize(
    "args, input, code, needle",
    [
        (["--max-new-tokens", "0", "hi"], b"", 2, "max-new-tokens"),
        (["--no-such-option"], b"", 2, "No such option"),
        (["   "], b"", 2, "empty"),
        ([], b"\x00\x01\x02binary", 2, "binary"),
        ([], b"caf\xe9 latin-1", 2, "UTF-8"),
        (["--temperature", "-1", "hi"], b"", 2, "temperature"),
        (["--dtype", "int3", "hi"], b"", 2, "dtype"),
        (["--device", "cuda", "hi"], b"", 2, "cuda"),
    ],
)
def test_bad_input_exit_codes(model_dir, args, input, code, needle):
    r = run_phimoe("generate", "-m", model_dir, *args, input=input)
    if "--device" in args and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    lines = one_error_line(r, code)
    assert needle.lower() in r.stderr.decode().lower()
    assert len(lines) == 1 and lines[0].startswith("error:")


def test_prompt_argument_with_invalid_bytes(model_dir):
    import subprocess

    r = subprocess.run([*PHIMOE, "generate", "-m", str(model_dir), b"caf\xe9"], capture_output=True,
                       stdin=subprocess.DEVNULL, timeout=120)
    lines = one_error_line(r, 2)
    assert len(lines) == 1 and "UTF-8" in lines[0]


def test_missing_model_path_and_bad_checkpoint(tmp_path, model_dir):
    r = run_phimoe("generate", "-m", tmp_path / "absent", "hi")
    assert one_error_line(r, 2)[0].startswith("error:")
    broken = make_model_dir(tmp_path / "broken")
    (broken / "model-00002-of-00002.safetensors").write_bytes(b"garbage")
    r = run_phimoe("generate", "-m", broken, "hi")
    lines = one_error_line(r, 1)
    assert len(lines) == 1 and "model-00002-of-00002.safetensors" in lines[0]


def test_ctrl_c_keeps_the_output_and_exits_130(model_dir):
    proc = subprocess.Popen([*PHIMOE, "generate", "-m", model_dir, "-n", "100000", "--ignore-eos", "Go"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), preexec_fn=default_sigint)
    first = proc.stdout.read(1)  # generation has started
    assert first
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert len(first + out) > 1
    assert b"Traceback" not in err


def test_ctrl_c_with_json_says_interrupted(tmp_path):
    import pty

    from conftest import make_model_dir

    long = make_model_dir(tmp_path / "long", max_position_embeddings=1 << 17, sliding_window=1 << 17)
    # stderr on a terminal, for the loading progress: its end says generation has begun, however
    # slowly a loaded machine got there (a fixed wait sent Ctrl+C during loading: no JSON then)
    master, terminal = pty.openpty()
    proc = subprocess.Popen([*PHIMOE, "generate", "-m", long, "-n", "100000", "--ignore-eos", "--json", "Go"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=terminal,
                            preexec_fn=default_sigint)
    os.close(terminal)
    err, deadline = b"", time.monotonic() + 120
    while b"\x1b[?25h" not in err.partition(b"Loading weights")[2]:  # the progress gone: the cursor shown
        assert time.monotonic() < deadline and proc.poll() is None, err.decode(errors="replace")
        if select.select([master], [], [], 0.5)[0]:
            err += os.read(master, 65536)
    time.sleep(2)  # generating: 100000 tokens take minutes
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    os.close(master)
    assert proc.returncode == 130, err.decode(errors="replace")
    data = json.loads(out)
    assert data["finish_reason"] == "interrupted" and data["token_ids"]


@pytest.mark.skipif(not hasattr(__import__("fcntl"), "F_SETPIPE_SZ"), reason="needs Linux pipes")
def test_ctrl_c_while_a_slow_reader_holds_the_pipe_loses_no_text(tmp_path):
    """`phimoe generate | slow-reader`, Ctrl+C while a piece waits on the full pipe (PYTHONUNBUFFERED,
    as in many containers): the KeyboardInterrupt came out of the write, past the reply's end (no
    -v line, no "interrupted", no last newline: typer turned it into a silent exit 130), and where
    the signal cuts the write short an unbuffered stdout drops the piece. Every token generated
    reaches stdout, as a greedy run of as many tokens prints it."""
    import array
    import fcntl
    import re
    import termios

    long = make_model_dir(tmp_path / "long", max_position_embeddings=1 << 14, sliding_window=1 << 14)
    greedy = ["generate", "-m", str(long), "--ignore-eos", "-t", "0", "-v", "Go"]
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)  # full after ~800 tokens
    proc = subprocess.Popen([*PHIMOE, *greedy, "-n", "8000"], stdin=subprocess.DEVNULL, stdout=write_end,
                            stderr=subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            preexec_fn=default_sigint)
    os.close(write_end)

    def pending() -> int:
        n = array.array("i", [0])
        fcntl.ioctl(read_end, termios.FIONREAD, n)
        return n[0]

    held, since, deadline = -1, time.monotonic(), time.monotonic() + 120
    while not (held > 0 and time.monotonic() - since > 1.0):  # the pipe full: the writer waits on it
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read().decode()
        if pending() != held:
            held, since = pending(), time.monotonic()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out = b""
    while chunk := os.read(read_end, 65536):
        out += chunk
    os.close(read_end)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 130 and "interrupted" in err and "Traceback" not in err, err
    tokens = int(re.search(r"generated (\d+) \(interrupted\)", err).group(1))
    assert len(out) > 4096 and out.endswith(b"\n")
    whole = subprocess.run(
        [*PHIMOE, *greedy, "-n", str(tokens)], capture_output=True, stdin=subprocess.DEVNULL, timeout=300)
    assert whole.returncode == 0, whole.stderr.decode()
    # the same text; at most a character's last bytes, held back by the decoder, may be missing here
    expected, got = whole.stdout.rstrip(b"\n"), out.rstrip(b"\n")
    assert expected.startswith(got) and len(expected) - len(got) <= 3, (len(expected), len(got))


@pytest.mark.parametrize("unbuffered", [False, True])
def test_a_reader_that_goes_away_ends_it_quietly(model_dir, unbuffered):
    """`phimoe generate ... | head -c 10`: exit 141 (as a command killed by SIGPIPE), nothing on stderr.
    click caught the BrokenPipeError itself and exited 1."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([*PHIMOE, "generate", "-m", model_dir, "-n", "900", "--ignore-eos", "-t", "0", "Go"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout.read(10)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err


def test_no_stdin_leaves_stdin_alone(model_dir):
    """--no-stdin in a `while read` loop: each call answers its PROMPT and the loop sees every line."""
    script = (f'while read -r q; do {" ".join(PHIMOE)} generate -m "{model_dir}" --no-stdin -t 0 -n 2 '
              '--ignore-eos "$q" > /dev/null && echo "done $q"; done')
    out = subprocess.run(["bash", "-c", script], input=b"one\ntwo\nthree\n", capture_output=True, timeout=300)
    assert out.stdout.decode().split("\n")[:3] == ["done one", "done two", "done three"], out.stderr.decode()


def test_info_from_config_alone(tmp_path, model_dir):
    only = tmp_path / "config-only"
    only.mkdir()
    (only / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    r = run_phimoe("info", only, "--json")
    assert r.returncode == 0, r.stderr.decode()
    data = json.loads(r.stdout)
    # parameter arithmetic against the real model's parameters
    from phimoe_cli.model import PhimoeConfig, PhimoeForCausalLM

    with torch.device("meta"):
        model = PhimoeForCausalLM(PhimoeConfig.from_file(only))
    total = sum(p.numel() for p in model.parameters())
    assert data["parameters"]["total"] == total
    cfg = model.config
    per_expert = 3 * cfg.hidden_size * cfg.intermediate_size
    inactive = cfg.num_hidden_layers * (cfg.num_local_experts - cfg.num_experts_per_tok) * per_expert
    assert data["parameters"]["active_per_token"] == total - inactive
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim  # keys and values per token
    assert data["kv_cache_bytes_per_token"]["bfloat16"] == 2 * kv
    assert data["memory"]["bfloat16"]["bytes"] == 2 * total
    r = run_phimoe("info", only)
    assert r.returncode == 0 and "active per token" in r.stdout.decode()
    by_option = run_phimoe("info", "--model", only, "--json")  # -m/--model, as every command takes
    assert by_option.returncode == 0 and json.loads(by_option.stdout)["parameters"] == data["parameters"]
    r = run_phimoe("info", only, "-m", model_dir)
    assert r.returncode == 2 and r.stderr.decode().startswith("error: two models given")


def test_info_published_shape(tmp_path):
    from checkpoints import published_config

    cfg = published_config()
    cfg["rope_scaling"].update(short_factor=[1.0] * 64, long_factor=[1.0] * 64)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    data = json.loads(run_phimoe("info", tmp_path, "--json").stdout)
    assert round(data["parameters"]["total"] / 1e9, 1) == 41.9  # the published 41.9B
    assert round(data["parameters"]["active_per_token"] / 1e9, 1) == 6.6  # "6.6B active"
    assert data["kv_cache_bytes_per_token"]["bfloat16"] == 128 * 1024


def test_generate_from_the_offline_hub_cache(tmp_path, model_dir):
    """A repo id resolved through a real huggingface_hub cache on disk, with HF_HUB_OFFLINE=1."""
    from test_hub import add_to_cache

    files = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
    cache = tmp_path / "hub"
    add_to_cache(cache, "someone/phimoe-tiny", files, "a" * 40)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    r = run_phimoe("generate", "-m", "someone/phimoe-tiny", "--json", "-t", "0", "-n", "5", "Hi", env=env)
    assert r.returncode == 0, r.stderr.decode()
    local = gen_json(model_dir, "-t", "0", "-n", "5", "Hi")
    assert json.loads(r.stdout)["token_ids"] == local["token_ids"]
    r = run_phimoe("generate", "-m", "someone/absent", "Hi", env=env)
    lines = one_error_line(r, 1)
    assert len(lines) == 1 and "phimoe download" in lines[0]


def test_download_without_network_is_one_line(tmp_path):
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2",
           "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    r = run_phimoe("download", "someone/absent", env=env, timeout=60)
    lines = one_error_line(r, 1)
    assert len(lines) == 1 and lines[0].startswith("error:")


def test_help_ranges_are_what_validation_accepts(model_dir):
    helptext = run_phimoe("generate", "--help", env={"COLUMNS": "200"}).stdout.decode()
    assert "in (0, 1]" in helptext and "in [0, 1)" in helptext and "0.0<=x<=1.0" not in helptext
    cases = (("--top-p", "0", "top_p must be in (0, 1]"), ("--min-p", "1", "min_p must be in [0, 1)"))
    for option, value, why in cases:
        for command in ("generate", "chat"):
            out = run_phimoe(command, "-m", model_dir, option, value, *(["hi"] if command == "generate" else []),
                             input="hi")
            assert out.returncode == 2 and out.stderr.decode() == f"error: {why}, got {float(value)}\n", out.stderr


def test_root_help_has_examples_and_shell_completion():
    out = run_phimoe("--help", env={"COLUMNS": "200"})
    text = out.stdout.decode()
    assert out.returncode == 0 and "--install-completion" in text and "Examples:" in text
    script = run_phimoe("--show-completion", "bash",  # the shell named, not detected from the process tree
                        env={"COLUMNS": "200", "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"})
    assert script.returncode == 0 and "complete" in script.stdout.decode()
