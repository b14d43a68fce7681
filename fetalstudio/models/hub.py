"""Hugging Face Hub sources: download on demand when online, explain exactly what to fetch when not.

A load must never hang on an unreachable hub: every hub call is preceded by a fast reachability
check (or HF_HUB_OFFLINE), and the local cache is always tried first with local_files_only.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from fetalstudio.errors import OfflineModelError
from fetalstudio.models.entries import ModelEntry

HUB_HOST = "huggingface.co"
_REACHABILITY_TTL_S = 60.0
_reachability_cache: dict[str, tuple[float, bool]] = {}


def hub_offline_forced() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def hub_reachable(timeout_s: float = 2.0) -> bool:
    """A TCP connect to the hub with a short timeout, cached for a minute."""
    if hub_offline_forced():
        return False
    checked_at, ok = _reachability_cache.get(HUB_HOST, (0.0, False))
    if time.monotonic() - checked_at < _REACHABILITY_TTL_S:
        return ok
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout_s):
            ok = True
    except OSError:
        ok = False
    _reachability_cache[HUB_HOST] = (time.monotonic(), ok)
    return ok


def manual_download_instructions(entry: ModelEntry, checkpoints_dir: Path) -> str:
    hub = entry.hub
    assert hub is not None
    what = f"the file {hub.filename} from {hub.url}" if hub.filename else f"the repository {hub.url} (all its files)"
    target = checkpoints_dir / (hub.filename or hub.repo_id.split("/")[-1])
    return (
        f"download {what} and put it at {target} (or in a folder listed in $FETALSTUDIO_MODELS); "
        "FetalStudio finds it there without any network access."
    )


def offline_message(entry: ModelEntry, checkpoints_dir: Path) -> str:
    forced = " (HF_HUB_OFFLINE is set)" if hub_offline_forced() else ""
    return (
        f"Model '{entry.id}' comes from the Hugging Face Hub and this machine is offline{forced}. "
        f"On a machine with internet, {manual_download_instructions(entry, checkpoints_dir)}"
    )


def fetch_from_hub(entry: ModelEntry, cache_dir: Path, checkpoints_dir: Path) -> Path:
    """Local path of a hub model: from the cache if there, else downloaded (tqdm shows progress)."""
    from huggingface_hub import hf_hub_download, snapshot_download, try_to_load_from_cache

    hub = entry.hub
    assert hub is not None
    common = {"repo_id": hub.repo_id, "revision": hub.revision, "cache_dir": str(cache_dir)}
    patterns = ["*.json", "*.txt", "*.model", "*.safetensors"]

    # Cache look-ups that only read the filesystem (hf_hub_download(local_files_only=True) may
    # still contact the hub in some huggingface_hub versions).
    if hub.filename:
        cached = try_to_load_from_cache(filename=hub.filename, **common)
        if isinstance(cached, str):
            return Path(cached)
    else:
        try:
            return Path(snapshot_download(allow_patterns=patterns, local_files_only=True, **common))
        except Exception:  # not cached (huggingface_hub raises several error types for that)
            pass

    def download() -> Path:
        if hub.filename:
            return Path(hf_hub_download(filename=hub.filename, **common))
        return Path(snapshot_download(allow_patterns=patterns, **common))

    if not hub_reachable():
        raise OfflineModelError(offline_message(entry, checkpoints_dir))
    try:
        return download()
    except Exception as error:
        raise OfflineModelError(
            f"Downloading model '{entry.id}' from {hub.url} failed ({type(error).__name__}: {error}). "
            "Check the repository name and your network, or "
            + manual_download_instructions(entry, checkpoints_dir)
        ) from error
