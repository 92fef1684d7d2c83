"""Model resolution: a local checkpoint directory, or a Hugging Face Hub repo id.

Repo ids go through huggingface_hub's own cache (``snapshot_download``), so they share the cache
with every other Hugging Face tool (``HF_HOME`` / ``HF_HUB_CACHE``), honour ``HF_TOKEN``,
``HF_ENDPOINT`` and ``HF_HUB_OFFLINE=1``, and resume an interrupted download: files already in
the cache are not fetched again. Only the files phimoe reads are fetched: safetensors weights and
their index, the configs and the tokenizer files; never ``*.bin`` / ``*.pt`` / ``*.pth`` pickles
nor remote code.

Every failure is raised as :class:`HubError`, whose ``str`` is one line meant for the user.
"""

from __future__ import annotations

import os
from pathlib import Path

from phimoe_cli.errors import HubError

__all__ = [
    "CONFIG_PATTERNS",
    "DEFAULT_MODEL",
    "MODEL_PATTERNS",
    "HubError",
    "download_model",
    "hub_cache_dir",
    "is_local_path",
    "resolve_config",
    "resolve_model",
]

DEFAULT_MODEL = "microsoft/Phi-3.5-MoE-instruct"

#: What ``phimoe info`` needs: enough to describe the model before the 84 GB download.
CONFIG_PATTERNS: tuple[str, ...] = ("config.json", "generation_config.json")

#: Everything phimoe reads, and nothing else (no pickled ``*.bin`` / ``*.pt`` / ``*.pth``, no code).
MODEL_PATTERNS: tuple[str, ...] = (
    "*.safetensors",
    "model.safetensors.index.json",
    *CONFIG_PATTERNS,
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)



# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def is_local_path(model: str) -> bool:
    """True when ``model`` names a local directory rather than a hub repo id.

    That is: the path exists, or it looks like a path (starts with ``.``, ``/``, ``~`` or ends
    with a path separator) - such a name can never be a valid repo id.
    """
    if not model:
        return False
    if model.startswith((".", "/", "~")) or model.endswith(("/", os.sep)) or (os.sep != "/" and os.sep in model):
        return True
    return os.path.exists(os.path.expanduser(model))


def hub_cache_dir() -> Path:
    """The huggingface_hub cache in use (``HF_HUB_CACHE``, else ``HF_HOME``/hub, else ~/.cache)."""
    from phimoe_cli.hub_repo import hub_cache_dir

    return hub_cache_dir()


def resolve_model(
    model: str = DEFAULT_MODEL,
    revision: str | None = None,
    offline: bool | None = None,
    token: str | None = None,
    progress: bool | None = None,
    *,
    config_only: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    for_download: bool = False,
) -> Path:
    """Return the local directory holding ``model``'s files, downloading them if needed.

    Args:
        model: a local checkpoint directory, or a hub repo id such as ``microsoft/Phi-3.5-MoE-instruct``.
        revision: branch, tag or commit hash of a hub repo (default: the repo's ``main``).
            Meaningless, and rejected, for a local directory.
        offline: ``True``: use the local cache only, never the network. ``None``: follow
            ``HF_HUB_OFFLINE``. When the Hub cannot be reached the cache is used anyway.
        token: a Hugging Face access token; ``None`` uses ``HF_TOKEN`` or the saved login.
        progress: show huggingface_hub's progress bars; ``None``: only when stderr is a terminal.
        config_only: fetch only ``config.json`` (and ``generation_config.json``), for ``phimoe info``.
        cache_dir: the hub cache to use; ``None``: ``HF_HUB_CACHE`` / ``HF_HOME`` as usual.
        for_download: called by ``phimoe download``: errors say to run it again, not to run it.

    Raises:
        HubError: with a one-line message, for every way this can fail.
    """
    model = os.fspath(model).strip() if model is not None else ""
    if not model:
        raise HubError("no model given: pass a Hugging Face repo id or a local directory", exit_code=2)
    if is_local_path(model):
        if revision is not None:
            raise HubError(
                f"--revision applies to Hugging Face repo ids, not to the local directory '{model}'", exit_code=2
            )
        return _resolve_local(model)
    from phimoe_cli.hub_repo import resolve_repo  # huggingface_hub: only for repo ids (0.7 s to import)

    return resolve_repo(
        model,
        revision=revision,
        offline=offline,
        token=token,
        progress=progress,
        patterns=CONFIG_PATTERNS if config_only else MODEL_PATTERNS,
        config_only=config_only,
        cache_dir=cache_dir,
        for_download=for_download,
    )


def resolve_config(
    model: str = DEFAULT_MODEL,
    revision: str | None = None,
    offline: bool | None = None,
    token: str | None = None,
    progress: bool | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """``resolve_model(..., config_only=True)``: a directory with at least ``config.json`` in it."""
    return resolve_model(model, revision, offline, token, progress, config_only=True, cache_dir=cache_dir)


def download_model(
    repo: str = DEFAULT_MODEL,
    revision: str | None = None,
    token: str | None = None,
    progress: bool | None = None,
    *,
    offline: bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Fetch everything phimoe needs from hub repo ``repo`` into the cache; return the snapshot dir.

    Resumable: run it again after an interruption and only the missing files are fetched.
    """
    repo = os.fspath(repo).strip() if repo is not None else ""
    if repo and is_local_path(repo):
        raise HubError(f"'{repo}' is a local path: `download` takes a Hugging Face repo id (org/name)", exit_code=2)
    return resolve_model(repo, revision, offline, token, progress, cache_dir=cache_dir, for_download=True)


# --------------------------------------------------------------------------------------------
# Local directories
# --------------------------------------------------------------------------------------------


def _resolve_local(model: str) -> Path:
    path = Path(model).expanduser()
    if not path.exists():
        raise HubError(f"model directory '{model}' does not exist", exit_code=2)
    if not path.is_dir():
        raise HubError(f"model path '{model}' is not a directory (expected a checkpoint directory)", exit_code=2)
    if not (path / "config.json").is_file():
        raise HubError(f"'{model}' has no config.json: it is not a model checkpoint directory", exit_code=2)
    return path.resolve()
