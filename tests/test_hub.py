"""Model resolution (phimoe_cli.hub) against a real huggingface_hub cache laid out on disk.

Nothing here mocks huggingface_hub: the cache is built file by file the way huggingface_hub
lays it out (``models--org--name/{blobs,refs,snapshots}`` with relative symlinks), and the
"online" tests talk over HTTP to a tiny Hub look-alike bound to 127.0.0.1, so no byte ever
leaves the machine. huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE / HF_HUB_CACHE when it
is imported, so everything that depends on environment variables runs in a fresh subprocess.
"""

from __future__ import annotations

import errno
import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from phimoe_cli import hub, hub_repo
from phimoe_cli.hub import DEFAULT_MODEL, HubError, download_model, is_local_path, resolve_config, resolve_model

REPO_ROOT = Path(__file__).resolve().parents[1]

CONFIG = json.dumps({"model_type": "phimoe", "hidden_size": 64, "num_local_experts": 4}).encode()
GEN_CONFIG = json.dumps({"eos_token_id": [32000, 32001, 32007]}).encode()


def _commit(seed: str) -> str:
    return hashlib.sha1(seed.encode()).hexdigest()


def _blob_name(name: str, data: bytes) -> str:
    """What the cache names a blob after: sha256 for LFS files, the git blob sha1 otherwise."""
    if name.endswith(".safetensors"):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def checkpoint_files(n_shards: int = 2) -> dict[str, bytes]:
    shards = {f"model-{i:05d}-of-{n_shards:05d}.safetensors": f"shard {i}".encode() * 10
              for i in range(1, n_shards + 1)}
    index = {"metadata": {"total_size": 1}, "weight_map": {f"w{i}": name for i, name in enumerate(shards)}}
    return {
        "config.json": CONFIG,
        "generation_config.json": GEN_CONFIG,
        "tokenizer.json": b'{"version": "1.0"}',
        "tokenizer_config.json": b'{"model_max_length": 131072}',
        "model.safetensors.index.json": json.dumps(index).encode(),
        **shards,
    }


def add_to_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str,
                 refs: tuple[str, ...] = ("main",)) -> Path:
    """Lay out ``files`` at ``commit`` exactly as huggingface_hub's cache does; return the snapshot dir."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    for name, data in files.items():
        blob = storage / "blobs" / _blob_name(name, data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        ref_file = storage / "refs" / ref
        ref_file.parent.mkdir(parents=True, exist_ok=True)
        ref_file.write_text(commit)  # huggingface_hub writes the bare hash, no newline
    return snapshot


# --------------------------------------------------------------------------------------------
# Offline resolution against an on-disk cache (in process, explicit arguments)
# --------------------------------------------------------------------------------------------

MAIN = _commit("main")
OLD = _commit("v1")


@pytest.fixture()
def cache(tmp_path: Path) -> Path:
    cache = tmp_path / "hub"
    add_to_cache(cache, "org/name", checkpoint_files(), MAIN, refs=("main",))
    old_files = {**checkpoint_files(1), "config.json": CONFIG.replace(b"64", b"32")}
    add_to_cache(cache, "org/name", old_files, OLD, refs=("v1.0",))
    return cache


def test_cache_layout_is_the_real_one(cache: Path) -> None:
    # Sanity check of the fixture with huggingface_hub's own cache scanner.
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(cache)
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == "org/name" and repo.repo_type == "model"
    assert {r.commit_hash for r in repo.revisions} == {MAIN, OLD}
    assert {ref for r in repo.revisions for ref in r.refs} == {"main", "v1.0"}


def test_offline_resolves_main_snapshot(cache: Path) -> None:
    path = resolve_model("org/name", offline=True, cache_dir=cache)
    assert path == cache / "models--org--name" / "snapshots" / MAIN
    assert (path / "config.json").read_bytes() == CONFIG
    assert (path / "config.json").is_symlink()


def test_revision_by_commit_hash_and_by_ref_name(cache: Path) -> None:
    snapshots = cache / "models--org--name" / "snapshots"
    assert resolve_model("org/name", revision=OLD, offline=True, cache_dir=cache) == snapshots / OLD
    assert resolve_model("org/name", revision="v1.0", offline=True, cache_dir=cache) == snapshots / OLD
    assert resolve_model("org/name", revision="main", offline=True, cache_dir=cache) == snapshots / MAIN
    assert resolve_model("org/name", revision=MAIN, offline=True, cache_dir=cache) == snapshots / MAIN


def test_unknown_revision_offline(cache: Path) -> None:
    with pytest.raises(HubError) as err:
        resolve_model("org/name", revision="v9", offline=True, cache_dir=cache)
    msg = str(err.value)
    assert "'org/name' (revision 'v9') is not in the local cache" in msg
    assert "phimoe download org/name --revision v9" in msg
    assert "\n" not in msg


def test_repo_not_in_cache_offline(cache: Path) -> None:
    with pytest.raises(HubError) as err:
        resolve_model("org/other", offline=True, cache_dir=cache)
    msg = str(err.value)
    assert "'org/other' is not in the local cache" in msg and str(cache) in msg
    assert "phimoe download org/other" in msg
    assert "\n" not in msg and err.value.exit_code == 1


def test_config_only_works_on_a_config_only_snapshot(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    snap = add_to_cache(cache, "org/name", {"config.json": CONFIG, "generation_config.json": GEN_CONFIG}, MAIN)
    assert resolve_model("org/name", offline=True, config_only=True, cache_dir=cache) == snap
    assert resolve_config("org/name", offline=True, cache_dir=cache) == snap
    # ... but the full model is not there: a clear error, not a half-empty directory.
    with pytest.raises(HubError, match=r"has no .*weight.* and offline mode is on: .*phimoe download org/name"):
        resolve_model("org/name", offline=True, cache_dir=cache)


def test_missing_shard_is_reported(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    files = checkpoint_files(3)
    del files["model-00002-of-00003.safetensors"]
    add_to_cache(cache, "org/name", files, MAIN)
    with pytest.raises(HubError, match=r"weight shard model-00002-of-00003\.safetensors"):
        resolve_model("org/name", offline=True, cache_dir=cache)


def test_snapshot_without_config(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    add_to_cache(cache, "org/name", {"model.safetensors": b"x"}, MAIN)
    with pytest.raises(HubError, match=r"has no config\.json"):
        resolve_model("org/name", offline=True, cache_dir=cache)


def test_hub_incomplete_snapshot_error_is_translated(tmp_path: Path) -> None:
    # A previous online run left the tree listing (trees/<commit>.json) but the download was cut short:
    # huggingface_hub itself raises IncompleteSnapshotError.
    cache = tmp_path / "hub"
    files = checkpoint_files()
    add_to_cache(cache, "org/name", {"config.json": CONFIG}, MAIN)
    listing = {
        "format_version": 1,
        "files": {name: {"size": len(data), "blob_id": _blob_name(name, data)} for name, data in files.items()},
    }
    trees = cache / "models--org--name" / "trees"
    trees.mkdir()
    (trees / f"{MAIN}.json").write_text(json.dumps(listing))
    with pytest.raises(HubError) as err:
        resolve_model("org/name", offline=True, cache_dir=cache)
    msg = str(err.value)
    assert "cached copy of 'org/name'" in msg and "incomplete" in msg and "phimoe download org/name" in msg
    assert "\n" not in msg


# --------------------------------------------------------------------------------------------
# Local directories and invalid names
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def local_ckpt(tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_bytes(CONFIG)
    return d


def test_local_directory_absolute(local_ckpt: Path) -> None:
    assert resolve_model(str(local_ckpt)) == local_ckpt
    assert resolve_model(str(local_ckpt), config_only=True) == local_ckpt


def test_local_directory_relative_and_home(local_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(local_ckpt.parent)
    assert resolve_model("./ckpt") == local_ckpt
    assert resolve_model("ckpt") == local_ckpt  # exists => a directory, not a repo id
    monkeypatch.setenv("HOME", str(local_ckpt.parent))
    assert resolve_model("~/ckpt") == local_ckpt


def test_local_directory_wins_even_with_offline_flag(local_ckpt: Path, tmp_path: Path) -> None:
    assert resolve_model(str(local_ckpt), offline=True, cache_dir=tmp_path / "nothing") == local_ckpt


@pytest.mark.parametrize("name", ["./does-not-exist", "/no/such/dir", "~/no-such-phimoe-dir"])
def test_local_directory_missing(name: str) -> None:
    with pytest.raises(HubError) as err:
        resolve_model(name)
    assert str(err.value) == f"model directory '{name}' does not exist"
    assert err.value.exit_code == 2


def test_local_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(HubError, match=r"has no config\.json") as err:
        resolve_model(str(tmp_path))
    assert err.value.exit_code == 2


def test_local_path_that_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(HubError, match="is not a directory"):
        resolve_model(str(f))


def test_revision_with_local_directory_is_rejected(local_ckpt: Path) -> None:
    with pytest.raises(HubError, match="--revision applies to Hugging Face repo ids") as err:
        resolve_model(str(local_ckpt), revision="main")
    assert err.value.exit_code == 2


@pytest.mark.parametrize("name", ["not a repo", "a/b/c", "org--x/name", "bad/name.git", "x" * 200, ""])
def test_invalid_repo_id(name: str, tmp_path: Path) -> None:
    with pytest.raises(HubError) as err:
        resolve_model(name, offline=True, cache_dir=tmp_path)
    assert err.value.exit_code == 2
    assert "\n" not in str(err.value)
    if name:
        assert "neither an existing local directory nor a valid Hugging Face repo id" in str(err.value)


def test_download_rejects_local_path(local_ckpt: Path) -> None:
    with pytest.raises(HubError, match="is a local path") as err:
        download_model(str(local_ckpt))
    assert err.value.exit_code == 2


def test_is_local_path() -> None:
    assert is_local_path("./x") and is_local_path("/x") and is_local_path("~/x") and is_local_path("../x")
    assert not is_local_path(DEFAULT_MODEL) and not is_local_path("gpt2")
    assert DEFAULT_MODEL == "microsoft/Phi-3.5-MoE-instruct"


def test_patterns_fetch_only_what_we_use() -> None:
    from huggingface_hub.utils import filter_repo_objects

    repo = [
        "config.json", "generation_config.json", "model.safetensors.index.json",
        "model-00001-of-00017.safetensors", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
        "special_tokens_map.json", "added_tokens.json",
        "pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "consolidated.pth",
        "modeling_phimoe.py", "configuration_phimoe.py", "README.md", ".gitattributes", "LICENSE",
    ]
    assert sorted(filter_repo_objects(repo, allow_patterns=list(hub.MODEL_PATTERNS))) == sorted(repo[:9])
    assert sorted(filter_repo_objects(repo, allow_patterns=list(hub.CONFIG_PATTERNS))) == [
        "config.json", "generation_config.json"
    ]


def test_progress_bar_state_is_restored(cache: Path) -> None:
    from huggingface_hub.utils import are_progress_bars_disabled

    before = are_progress_bars_disabled()
    resolve_model("org/name", offline=True, cache_dir=cache, progress=False)
    assert are_progress_bars_disabled() == before


def test_disk_full_and_permission_messages() -> None:
    # The translation of OS errors raised while writing into the cache (a full disk cannot be made on demand).
    ctx = hub_repo._Ctx(repo_id="org/name", revision=None, cache=Path("/cache"), offline=False)
    msg = str(hub_repo._translate(OSError(errno.ENOSPC, "No space left on device"), ctx))
    assert msg.startswith("no space left on device while downloading 'org/name' into /cache")
    assert "HF_HOME" in msg and "\n" not in msg
    rust_error = RuntimeError("Data processing error: I/O error: No space left on device (os error 28)")
    msg = str(hub_repo._translate(rust_error, ctx))
    assert msg.startswith("no space left on device")
    msg = str(hub_repo._translate(PermissionError(errno.EACCES, "Permission denied", "/cache/x"), ctx))
    assert "cannot write to the Hugging Face cache (/cache/x)" in msg


def test_hub_error_is_one_line() -> None:
    assert str(HubError("a\nb\n\n  c")) == "a b c"


# --------------------------------------------------------------------------------------------
# Environment variables and the network, in subprocesses
# --------------------------------------------------------------------------------------------

_RUNNER = r"""
import json, sys
from phimoe_cli.hub import HubError, resolve_model, download_model
kwargs = json.loads(sys.argv[1])
fn = download_model if kwargs.pop("_download", False) else resolve_model
try:
    print(json.dumps({"path": str(fn(**kwargs))}))
except HubError as e:
    print(json.dumps({"error": str(e), "exit_code": e.exit_code}))
"""


def run_hub(env: dict[str, str], timeout: float = 30, **kwargs) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_"))}
    base.update({"HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(REPO_ROOT), **env})
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, json.dumps(kwargs)],
        env=base, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.strip().splitlines()
    assert out, proc.stderr
    result = json.loads(out[-1])
    result["stderr"] = proc.stderr
    return result


def test_env_hf_hub_offline_and_hf_hub_cache(cache: Path) -> None:
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_ENDPOINT": "http://127.0.0.1:9"}
    res = run_hub(env, model="org/name")
    assert res["path"] == str(cache / "models--org--name" / "snapshots" / MAIN)
    res = run_hub({"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}, model="org/missing")
    assert "not in the local cache" in res["error"] and "HF_HUB_OFFLINE=1" in res["error"]


def test_env_hf_home(tmp_path: Path) -> None:
    home = tmp_path / "hfhome"
    add_to_cache(home / "hub", "org/name", checkpoint_files(), MAIN)
    res = run_hub({"HF_HUB_OFFLINE": "1", "HF_HOME": str(home)}, model="org/name", revision="main")
    assert res["path"] == str(home / "hub" / "models--org--name" / "snapshots" / MAIN)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when we return: connections are refused


def _net_env(cache: Path, endpoint: str) -> dict[str, str]:
    return {
        "HF_HUB_CACHE": str(cache),
        "HF_HOME": str(cache.parent / "hf_home"),  # no saved token is picked up
        "HF_ENDPOINT": endpoint,
        "HF_HUB_ETAG_TIMEOUT": "2",
        "HF_HUB_DOWNLOAD_TIMEOUT": "2",
    }


def test_no_network_fails_fast_with_one_line(tmp_path: Path) -> None:
    env = _net_env(tmp_path / "hub", f"http://127.0.0.1:{_closed_port()}")
    start = time.monotonic()
    res = run_hub(env, model="org/name")
    assert time.monotonic() - start < 15
    assert res["error"].startswith("cannot reach the Hugging Face Hub at http://127.0.0.1:")
    assert "'org/name' is not in the local cache" in res["error"]
    assert res["exit_code"] == 1
    assert "Traceback" not in res["stderr"]


def test_no_network_falls_back_to_the_cache(cache: Path) -> None:
    res = run_hub(_net_env(cache, f"http://127.0.0.1:{_closed_port()}"), model="org/name", revision="v1.0")
    assert res["path"] == str(cache / "models--org--name" / "snapshots" / OLD)


def test_hub_that_never_answers_times_out(tmp_path: Path) -> None:
    # A socket that accepts connections (kernel backlog) but never answers: a black-holed Hub.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        env = _net_env(tmp_path / "hub", f"http://127.0.0.1:{server.getsockname()[1]}")
        start = time.monotonic()
        res = run_hub(env, model="org/name")
        assert time.monotonic() - start < 15
    assert res["error"].startswith("cannot reach the Hugging Face Hub") and "not in the local cache" in res["error"]


# A tiny Hugging Face Hub look-alike: just the endpoints snapshot_download uses.


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []

    def add(self, repo_id: str, files: dict[str, bytes], *, gated: bool = False) -> str:
        commit = _commit(repo_id + repr(sorted(files)))
        self.repos[repo_id] = {"files": files, "commit": commit, "gated": gated}
        return commit

    def handle(self, h: http.server.BaseHTTPRequestHandler, head: bool) -> None:
        path = urllib.parse.unquote(urllib.parse.urlparse(h.path).path)
        self.requests.append((h.command, path))
        parts = path.strip("/").split("/")
        if parts[0] == "api" and parts[1] == "models":
            repo_id, rest = "/".join(parts[2:4]), parts[4:]
        else:
            repo_id, rest = "/".join(parts[0:2]), parts[2:]
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._send(h, 404, b'{"error":"Repository not found"}', {"X-Error-Code": "RepoNotFound"}, head)
        if repo["gated"]:
            return self._send(h, 403, b'{"error":"gated"}', {"X-Error-Code": "GatedRepo"}, head)
        rev = rest[1] if len(rest) >= 2 else "main"
        if rev not in ("main", repo["commit"]):
            return self._send(h, 404, b'{"error":"Invalid rev id"}', {"X-Error-Code": "RevisionNotFound"}, head)
        files = repo["files"]
        if parts[0] == "api" and (not rest or rest[0] == "revision"):
            body = {"id": repo_id, "sha": repo["commit"], "siblings": [{"rfilename": f} for f in files]}
            return self._send(h, 200, json.dumps(body).encode(), {}, head)
        if parts[0] == "api" and rest[0] == "tree":
            tree = []
            for name, data in files.items():
                entry = {"type": "file", "path": name, "size": len(data), "oid": _blob_name(name + ".git", data)}
                if name.endswith(".safetensors"):
                    entry["lfs"] = {"oid": _blob_name(name, data), "size": len(data), "pointerSize": 130}
                tree.append(entry)
            return self._send(h, 200, json.dumps(tree).encode(), {}, head)
        if rest and rest[0] == "resolve":
            name = "/".join(rest[2:])
            if name not in files:
                return self._send(h, 404, b"{}", {"X-Error-Code": "EntryNotFound"}, head)
            data = files[name]
            etag = _blob_name(name, data)
            headers = {"X-Repo-Commit": repo["commit"], "ETag": f'"{etag}"'}
            if name.endswith(".safetensors"):
                headers["X-Linked-Etag"] = f'"{etag}"'
                headers["X-Linked-Size"] = str(len(data))
            return self._send(h, 200, data, headers, head)
        return self._send(h, 404, b"{}", {}, head)

    @staticmethod
    def _send(h, status: int, body: bytes, headers: dict[str, str], head: bool) -> None:
        h.send_response(status)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}.items():
            h.send_header(k, v)
        h.end_headers()
        if not head:
            h.wfile.write(body)


@pytest.fixture()
def fake_hub():
    hub_state = FakeHub()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hub_state.handle(self, head=False)

        def do_HEAD(self):
            hub_state.handle(self, head=True)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hub_state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield hub_state
    server.shutdown()
    server.server_close()


def _full_repo() -> dict[str, bytes]:
    return {
        **checkpoint_files(),
        "pytorch_model.bin": b"pickle!",
        "model.pt": b"pickle!",
        "original/consolidated.pth": b"pickle!",
        "modeling_phimoe.py": b"import os",
        "README.md": b"# readme",
    }


def test_download_fetches_only_what_we_use_then_works_offline(fake_hub: FakeHub, tmp_path: Path) -> None:
    files = _full_repo()
    commit = fake_hub.add("org/name", files)
    cache = tmp_path / "hub"
    res = run_hub(_net_env(cache, fake_hub.url), _download=True, repo="org/name", progress=False)
    snap = cache / "models--org--name" / "snapshots" / commit
    assert res.get("path") == str(snap), res
    assert sorted(p.name for p in snap.iterdir()) == sorted(checkpoint_files())
    assert all((snap / name).read_bytes() == data for name, data in checkpoint_files().items())
    assert (cache / "models--org--name" / "refs" / "main").read_text() == commit
    fetched = {p for m, p in fake_hub.requests if "/resolve/" in p}
    assert not any(p.endswith((".bin", ".pt", ".pth", ".py", ".md")) for p in fetched), fetched
    assert res["stderr"] == ""  # progress=False: quiet

    # Now with the network gone: the same names resolve from the cache, by ref and by hash.
    env = _net_env(cache, f"http://127.0.0.1:{_closed_port()}")
    assert run_hub({**env, "HF_HUB_OFFLINE": "1"}, model="org/name")["path"] == str(snap)
    assert run_hub(env, model="org/name", revision=commit)["path"] == str(snap)


def test_config_only_fetches_only_the_configs(fake_hub: FakeHub, tmp_path: Path) -> None:
    commit = fake_hub.add("org/name", _full_repo())
    cache = tmp_path / "hub"
    res = run_hub(_net_env(cache, fake_hub.url), model="org/name", config_only=True)
    snap = cache / "models--org--name" / "snapshots" / commit
    assert res.get("path") == str(snap), res
    assert res["stderr"] == ""  # progress=None and stderr is not a terminal: quiet
    assert sorted(p.name for p in snap.iterdir()) == ["config.json", "generation_config.json"]
    # the weights are not there yet: offline full resolution says so in one line
    res = run_hub({**_net_env(cache, fake_hub.url), "HF_HUB_OFFLINE": "1"}, model="org/name")
    assert "incomplete" in res["error"] and "phimoe download org/name" in res["error"]
    # and going online completes the snapshot
    res = run_hub(_net_env(cache, fake_hub.url), model="org/name")
    assert res.get("path") == str(snap) and (snap / "model-00002-of-00002.safetensors").is_file()


def test_repo_not_found(fake_hub: FakeHub, tmp_path: Path) -> None:
    res = run_hub(_net_env(tmp_path / "hub", fake_hub.url), model="org/nope")
    assert res["error"] == (
        f"model repo 'org/nope' not found on {fake_hub.url}: check the name; "
        "if it is private, set HF_TOKEN to a token with access to it"
    )


def test_gated_repo(fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.add("org/gated", checkpoint_files(), gated=True)
    res = run_hub(_net_env(tmp_path / "hub", fake_hub.url), model="org/gated")
    assert res["error"] == (
        f"'org/gated' is a gated model: accept its license at {fake_hub.url}/org/gated (logged in), "
        "then set HF_TOKEN to an access token of that account"
    )


def test_revision_not_found(fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.add("org/name", checkpoint_files())
    res = run_hub(_net_env(tmp_path / "hub", fake_hub.url), model="org/name", revision="v9")
    assert res["error"] == f"revision 'v9' not found in 'org/name' on {fake_hub.url}"


def test_repo_without_safetensors(fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.add("org/pickles", {"config.json": CONFIG, "pytorch_model.bin": b"pickle!"})
    res = run_hub(_net_env(tmp_path / "hub", fake_hub.url), model="org/pickles")
    assert "has no safetensors weights" in res["error"] and "\n" not in res["error"]


def test_download_offline_does_not_advise_download(tmp_path: Path) -> None:
    from phimoe_cli.hub import download_model

    with pytest.raises(HubError) as info:
        download_model("org/missing", offline=True, cache_dir=tmp_path / "empty")
    assert "phimoe download" not in str(info.value) and "run it again while online" in str(info.value)
