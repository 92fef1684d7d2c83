"""Hub repos behind ``hub.resolve_model``: huggingface_hub's cache and downloads, and every way they
fail turned into one HubError line. Imported only when a repo id (not a local directory) is
resolved: huggingface_hub alone takes ~0.7 s to import."""

from __future__ import annotations

import errno
import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import httpx2  # huggingface_hub's HTTP client: its transport errors are what a dead network raises
from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    DisabledRepoError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import disable_progress_bars, validate_repo_id

from phimoe_cli.errors import HubError

_SAFETENSORS_INDEX = "model.safetensors.index.json"


def hub_cache_dir() -> Path:
    """The huggingface_hub cache in use (``HF_HUB_CACHE``, else ``HF_HOME``/hub, else ~/.cache)."""
    return Path(constants.HF_HUB_CACHE).expanduser()


def _env_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.is_offline_mode() or value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _probe_timeout() -> float:
    """How long to wait for the Hub before deciding it is unreachable (``HF_HUB_ETAG_TIMEOUT``)."""
    try:
        return max(0.1, float(os.environ["HF_HUB_ETAG_TIMEOUT"]))
    except (KeyError, ValueError):
        return float(constants.HF_HUB_ETAG_TIMEOUT)


def resolve_repo(
    repo_id: str,
    *,
    revision: str | None,
    offline: bool | None,
    token: str | None,
    progress: bool | None,
    patterns: tuple[str, ...],
    config_only: bool,
    cache_dir: str | os.PathLike[str] | None,
    for_download: bool = False,
) -> Path:
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise HubError(
            f"'{repo_id}' is neither an existing local directory nor a valid Hugging Face repo id (org/name)",
            exit_code=2,
        ) from None

    cache = Path(cache_dir).expanduser() if cache_dir is not None else hub_cache_dir()
    if offline is None:
        offline = _env_offline()
    if progress is None:
        progress = _stderr_is_tty()
    ctx = _Ctx(repo_id=repo_id, revision=revision, cache=cache, offline=bool(offline), for_download=for_download)

    # snapshot_download asks the Hub for the repo's commit without any timeout, so a network
    # that silently drops packets would hang it for minutes: ask first, with a timeout, and
    # fall back to the local cache when the Hub cannot be reached (as huggingface_hub does).
    api_error: Exception | None = None
    local_files_only = ctx.offline
    if not local_files_only:
        api_error = _probe(repo_id, revision=revision, token=token)
        if isinstance(api_error, RevisionNotFoundError):
            raise _translate(api_error, ctx) from None
        local_files_only = api_error is not None

    try:
        with nullcontext() if progress else _quiet_progress():
            folder = snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache_dir,
                token=token,
                local_files_only=local_files_only,
                allow_patterns=list(patterns),
            )
    except Exception as exc:
        # A cache miss after an unreachable / refusing Hub: report why the Hub did not answer.
        if (api_error is not None and isinstance(exc, LocalEntryNotFoundError)
                and not isinstance(exc, IncompleteSnapshotError)):
            exc = api_error
        raise _translate(exc, ctx) from None

    path = Path(folder)
    _check_snapshot(path, ctx, config_only=config_only, api_error=api_error)
    return path


def _probe(repo_id: str, *, revision: str | None, token: str | None) -> Exception | None:
    """Ask the Hub about the repo with a timeout; the error, or None when it answered."""
    try:
        HfApi(token=token).repo_info(repo_id, revision=revision, timeout=_probe_timeout())
    except (httpx2.TransportError, OfflineModeIsEnabled, HfHubHTTPError) as exc:
        return exc
    return None


class _Ctx:
    def __init__(self, *, repo_id: str, revision: str | None, cache: Path, offline: bool,
                 for_download: bool = False) -> None:
        self.repo_id = repo_id
        self.revision = revision
        self.cache = cache
        self.offline = offline
        self.for_download = for_download  # `phimoe download` itself: advising to run it is no help

    @property
    def what(self) -> str:
        return f"'{self.repo_id}'" + (f" (revision '{self.revision}')" if self.revision else "")

    @property
    def download_hint(self) -> str:
        if self.for_download:
            return "run it again while online (without --offline / HF_HUB_OFFLINE=1)"
        rev = f" --revision {self.revision}" if self.revision else ""
        return f"download it first with `phimoe download {self.repo_id}{rev}` while online"

    @property
    def finish_hint(self) -> str:
        if self.for_download:
            return "run it again while online to finish the download"
        return f"finish the download with `phimoe download {self.repo_id}` while online"


def _translate_http(exc: HfHubHTTPError, ctx: _Ctx, endpoint: str) -> HubError:
    status = _status(exc)
    if status == 401:
        return HubError(f"{endpoint} rejected the access token (HTTP 401): check HF_TOKEN")
    if status == 403:
        return HubError(f"access to '{ctx.repo_id}' denied by {endpoint} (HTTP 403): check HF_TOKEN's permissions")
    detail = f"HTTP {status}" if status else _short(exc)
    return HubError(
        f"the Hugging Face Hub ({endpoint}) failed ({detail}) and {ctx.what} is not in the local cache "
        f"{ctx.cache}: try again later"
    )


def _translate(exc: BaseException, ctx: _Ctx) -> HubError:
    """Turn anything huggingface_hub (or the OS) raised into one clear HubError line."""
    endpoint = constants.ENDPOINT.rstrip("/")
    repo_url = f"{endpoint}/{ctx.repo_id}"
    if isinstance(exc, HubError):
        return exc
    if isinstance(exc, HFValidationError):
        return HubError(f"invalid Hugging Face repo id or revision for {ctx.what}: {exc}", exit_code=2)
    if isinstance(exc, GatedRepoError):
        return HubError(
            f"{ctx.what} is a gated model: accept its license at {repo_url} (logged in), "
            "then set HF_TOKEN to an access token of that account"
        )
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"revision '{ctx.revision or 'main'}' not found in '{ctx.repo_id}' on {endpoint}")
    if isinstance(exc, DisabledRepoError):
        return HubError(f"'{ctx.repo_id}' has been disabled on {endpoint}")
    if isinstance(exc, RepositoryNotFoundError):
        status = _status(exc)
        auth = " (the token in HF_TOKEN was rejected)" if status == 401 and _has_token() else ""
        return HubError(
            f"model repo '{ctx.repo_id}' not found on {endpoint}{auth}: check the name; "
            "if it is private, set HF_TOKEN to a token with access to it"
        )
    if isinstance(exc, HfHubHTTPError):
        return _translate_http(exc, ctx, endpoint)
    if isinstance(exc, IncompleteSnapshotError):
        reason = "offline mode is on" if ctx.offline else "the Hub cannot be reached"
        return HubError(
            f"the cached copy of {ctx.what} in {ctx.cache} is incomplete and {reason}: {ctx.finish_hint}"
        )
    if isinstance(exc, OfflineModeIsEnabled) or (isinstance(exc, LocalEntryNotFoundError) and ctx.offline):
        how = "--offline / HF_HUB_OFFLINE=1" if ctx.offline or _env_offline() else "offline mode"
        return HubError(
            f"{ctx.what} is not in the local cache {ctx.cache} and {how} forbids downloading it: {ctx.download_hint}"
        )
    if isinstance(exc, (httpx2.TransportError, LocalEntryNotFoundError, ConnectionError, TimeoutError)):
        kind = "proxy error" if isinstance(exc, httpx2.ProxyError) else _short(exc)
        return HubError(
            f"cannot reach the Hugging Face Hub at {endpoint} ({kind}) and {ctx.what} is not in the local cache "
            f"{ctx.cache}: check your network connection, or {ctx.download_hint}, or pass a local directory"
        )
    no_space = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if no_space or "No space left on device" in str(exc):
        return HubError(
            f"no space left on device while downloading {ctx.what} into {ctx.cache}: free some space "
            "or point HF_HOME / HF_HUB_CACHE at a bigger disk, then run the command again "
            "(files already downloaded are kept)"
        )
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        where = exc.filename or ctx.cache
        return HubError(
            f"cannot write to the Hugging Face cache ({where}): {exc.strerror}; set HF_HOME to a writable directory"
        )
    if isinstance(exc, ValueError):
        return HubError(f"cannot resolve {ctx.what}: {_short(exc)}", exit_code=2)
    return HubError(f"cannot resolve {ctx.what}: {type(exc).__name__}: {_short(exc)}")


def _check_snapshot(path: Path, ctx: _Ctx, *, config_only: bool, api_error: Exception | None) -> None:
    """What snapshot_download returns may lack files (no such file upstream, partial offline cache)."""
    offline = ctx.offline or api_error is not None

    def _missing(what: str) -> HubError:
        if offline:
            reason = "offline mode is on" if ctx.offline else "the Hub cannot be reached"
            return HubError(
                f"the cached copy of {ctx.what} in {ctx.cache} has no {what} and {reason}: {ctx.finish_hint}"
            )
        return HubError(f"{ctx.what} has no {what} on the Hugging Face Hub: it is not a model phimoe can load")

    if not (path / "config.json").is_file():
        raise _missing("config.json")
    if config_only:
        return
    index = path / _SAFETENSORS_INDEX
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise HubError(f"{index} is not a valid safetensors index") from None
        absent = sorted(s for s in shards if not (path / s).is_file())
        if absent:
            more = f" and {len(absent) - 1} more" if len(absent) > 1 else ""
            raise _missing(f"weight shard {absent[0]}{more}")
    elif not any(path.glob("*.safetensors")):
        raise _missing("safetensors weights (phimoe does not load *.bin / *.pt pickles)")


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _quiet_progress():
    """Silence huggingface_hub's progress bars for the block, restoring the previous state.

    ``HF_HUB_DISABLE_PROGRESS_BARS=0`` in the environment is the user asking for bars: keep them.
    """
    if constants.HF_HUB_DISABLE_PROGRESS_BARS is False:
        return nullcontext()
    return disable_progress_bars()


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _status(exc: HfHubHTTPError) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _has_token() -> bool:
    return bool(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"))


def _short(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (or its class name), kept short."""
    text = str(exc).strip()
    line = next((part.strip() for part in text.splitlines() if part.strip()), "") or type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
