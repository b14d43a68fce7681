"""Hub models offline and online (no real network: the hub client is replaced), and device choice."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import LocalEntryNotFoundError

from fetalstudio.errors import OfflineModelError
from fetalstudio.models import device as devices
from fetalstudio.models import hub
from fetalstudio.models.entries import ModelFormat, ModelKind
from fetalstudio.models.manager import ModelManager

LORA_REPO, LORA_FILE = "fetal-org/fu-lora", "fu_lora_r4.safetensors"
SD_REPO = "fetal-org/sd15-fetal"


def write_hub_manifest(folder: Path) -> None:
    (folder / "manifest.toml").write_text(
        f"""
[[model]]
id = "fu-lora"
kind = "lora"
hub_repo = "{LORA_REPO}"
hub_file = "{LORA_FILE}"
licence = "CC-BY-4.0"

[[model]]
id = "sd-fetal"
kind = "sd_pipeline"
hub_repo = "{SD_REPO}"
""",
        encoding="utf-8",
    )


@pytest.fixture(autouse=True)
def fresh_reachability_cache(monkeypatch):
    monkeypatch.setattr(hub, "_reachability_cache", {})


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        pytest.fail(f"network access attempted: {args}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.fixture
def hf_offline(monkeypatch):
    """HF_HUB_OFFLINE=1 as if set before the app started (huggingface_hub reads it at import)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def hub_online_unset(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE not set, and a fresh huggingface_hub process state (no agent registry yet)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agents.json"), raising=False)
    try:
        from huggingface_hub.utils import _detect_agent
    except ImportError:  # older huggingface_hub: no such per-process state
        return
    monkeypatch.setattr(_detect_agent, "_registry", None, raising=False)


@pytest.fixture
def connection_log(monkeypatch) -> list:
    """Connections are refused as on a machine without network, and recorded."""
    attempts = []

    def refuse(address, *args, **kwargs):
        attempts.append(address)
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


@pytest.fixture
def hub_manager(tmp_checkpoints, cpu_placement):
    write_hub_manifest(tmp_checkpoints)
    return ModelManager(tmp_checkpoints, placement=cpu_placement)


class FakeHubDownload:
    """Stands in for huggingface_hub.hf_hub_download: nothing cached; a download copies ``source``."""

    def __init__(self, source: Path | None = None, error: Exception | None = None) -> None:
        self.source, self.error = source, error
        self.calls: list[dict] = []

    def __call__(self, repo_id, filename, *, local_files_only=False, revision=None, cache_dir=None, **kwargs):
        self.calls.append({"repo_id": repo_id, "filename": filename, "local_files_only": local_files_only, "cache_dir": cache_dir})
        if local_files_only:
            raise LocalEntryNotFoundError("Cannot find the requested file in the local cache.")
        if self.error is not None:
            raise self.error
        target = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "0123abcd" / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.source, target)
        return str(target)


# --- offline ------------------------------------------------------------------------------------


def test_hub_entries_are_listed_without_network(hub_manager, no_network):
    entry = hub_manager.entry("fu-lora")
    assert entry.format is ModelFormat.HUB and entry.kind is ModelKind.LORA and entry.path is None
    assert not entry.is_local
    rows = {row.id: row for row in hub_manager.status()}
    assert rows["fu-lora"].source == f"hub:{LORA_REPO}/{LORA_FILE}" and not rows["fu-lora"].loaded
    assert rows["sd-fetal"].source == f"hub:{SD_REPO}"


def test_offline_file_says_what_to_download_and_where(hub_manager, hf_offline, no_network, tmp_checkpoints):
    with pytest.raises(OfflineModelError) as caught:
        hub_manager.local_path(hub_manager.entry("fu-lora"))
    message = str(caught.value)
    assert "'fu-lora'" in message and "offline" in message and "HF_HUB_OFFLINE is set" in message
    assert f"https://huggingface.co/{LORA_REPO}/blob/main/{LORA_FILE}" in message
    assert str(tmp_checkpoints / LORA_FILE) in message
    assert "FETALSTUDIO_MODELS" in message


def test_offline_repository_says_what_to_download_and_where(hub_manager, hf_offline, no_network, tmp_checkpoints):
    with pytest.raises(OfflineModelError) as caught:
        hub_manager.get("sd-fetal")
    message = str(caught.value)
    assert f"https://huggingface.co/{SD_REPO}" in message and "all its files" in message
    assert str(tmp_checkpoints / "sd15-fetal") in message
    assert hub_manager.loaded_ids() == []


def test_forced_offline_never_checks_reachability(monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.hub_offline_forced()
    assert hub.hub_reachable() is False


@pytest.mark.parametrize(("value", "forced"), [("1", True), ("YES", True), (" on ", True), ("0", False), ("", False)])
def test_hf_hub_offline_values(monkeypatch, value, forced):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub.hub_offline_forced() is forced


def test_unreachable_hub_is_detected_once_and_cached(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    attempts = []

    def unreachable(address, timeout=None):
        attempts.append((address, timeout))
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    assert hub.hub_reachable(timeout_s=0.5) is False
    assert hub.hub_reachable(timeout_s=0.5) is False
    assert attempts == [(("huggingface.co", 443), 0.5)]


def test_reachable_hub(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    class Connection:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(socket, "create_connection", lambda address, timeout=None: Connection())
    assert hub.hub_reachable() is True


def test_offline_machine_repository_cache_check_makes_no_connection(hub_manager, monkeypatch, hub_online_unset, connection_log):
    monkeypatch.setattr(hub, "hub_reachable", lambda *args, **kwargs: False)
    with pytest.raises(OfflineModelError, match="this machine is offline"):
        hub_manager.local_path(hub_manager.entry("sd-fetal"))
    assert connection_log == []


def test_offline_machine_file_cache_check_makes_no_connection(hub_manager, monkeypatch, hub_online_unset, connection_log):
    monkeypatch.setattr(hub, "hub_reachable", lambda *args, **kwargs: False)
    with pytest.raises(OfflineModelError, match="this machine is offline"):
        hub_manager.local_path(hub_manager.entry("fu-lora"))
    assert connection_log == []


def test_unreachable_hub_gives_offline_guidance(hub_manager, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "hub_reachable", lambda *args, **kwargs: False)
    fake = FakeHubDownload()
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    with pytest.raises(OfflineModelError) as caught:
        hub_manager.local_path(hub_manager.entry("fu-lora"))
    assert "this machine is offline" in str(caught.value) and "HF_HUB_OFFLINE" not in str(caught.value)
    assert fake.calls == []  # only the local cache was looked at; no download was attempted


# --- online -------------------------------------------------------------------------------------


def test_online_download_lands_in_the_hub_cache(hub_manager, monkeypatch, tmp_checkpoints, tiny_kohya_lora):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "hub_reachable", lambda *args, **kwargs: True)
    fake = FakeHubDownload(source=tiny_kohya_lora)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)

    path = hub_manager.local_path(hub_manager.entry("fu-lora"))
    assert path.is_file() and path.name == LORA_FILE
    assert path.read_bytes() == tiny_kohya_lora.read_bytes()
    assert [call["local_files_only"] for call in fake.calls] == [False]  # not in the cache: one download
    assert all(call["repo_id"] == LORA_REPO and call["filename"] == LORA_FILE for call in fake.calls)
    cache = tmp_checkpoints / ".hub-cache"
    assert {call["cache_dir"] for call in fake.calls} == {str(cache)}
    assert cache in path.parents
    # The hidden cache folder is not discovered as a second copy of the model.
    hub_manager.refresh()
    assert hub_manager.ids(ModelKind.LORA) == ["fu-lora"]


def test_failed_download_gives_guidance(hub_manager, monkeypatch, tmp_checkpoints):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "hub_reachable", lambda *args, **kwargs: True)
    fake = FakeHubDownload(error=ConnectionError("connection reset by peer"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    with pytest.raises(OfflineModelError) as caught:
        hub_manager.local_path(hub_manager.entry("fu-lora"))
    message = str(caught.value)
    assert "Downloading model 'fu-lora'" in message and "connection reset by peer" in message
    assert f"https://huggingface.co/{LORA_REPO}/blob/main/{LORA_FILE}" in message
    assert "Check the repository name" in message and str(tmp_checkpoints / LORA_FILE) in message
    assert isinstance(caught.value.__cause__, ConnectionError)


def test_cached_hub_file_is_used_without_network(hub_manager, monkeypatch, hf_offline, no_network, tmp_path, tiny_kohya_lora):
    cached = tmp_path / "cached" / LORA_FILE
    cached.parent.mkdir()
    shutil.copy(tiny_kohya_lora, cached)
    calls = []

    def from_cache(repo_id, filename, *, cache_dir=None, revision=None, **kwargs):
        calls.append((repo_id, filename))
        return str(cached)

    def no_download(*args, **kwargs):
        raise AssertionError("a cached file must not be downloaded again")

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", from_cache)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    assert hub_manager.local_path(hub_manager.entry("fu-lora")) == cached
    assert calls == [(LORA_REPO, LORA_FILE)]


# --- device and dtype ---------------------------------------------------------------------------


@pytest.fixture
def no_accelerator(monkeypatch):
    monkeypatch.delenv("FETALSTUDIO_DEVICE", raising=False)
    monkeypatch.delenv("FETALSTUDIO_DTYPE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_cpu_only_machine_uses_cpu_and_float32(no_accelerator):
    device = devices.pick_device()
    assert device == torch.device("cpu")
    assert devices.pick_dtype(device) is torch.float32
    placement = devices.default_placement()
    assert placement.device.type == "cpu" and placement.dtype is torch.float32
    assert placement.label == "cpu / float32"


def test_device_override_from_environment(monkeypatch):
    monkeypatch.delenv("FETALSTUDIO_DTYPE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("FETALSTUDIO_DEVICE", "cpu")
    assert devices.pick_device() == torch.device("cpu")
    assert devices.default_placement().dtype is torch.float32
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert devices.pick_device("cuda") == torch.device("cuda")  # an explicit choice beats the variable


def test_cuda_preferred_when_available(monkeypatch):
    monkeypatch.delenv("FETALSTUDIO_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.pick_device() == torch.device("cuda")


@pytest.mark.parametrize(("bf16", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_gpu_dtype(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert devices.pick_dtype(torch.device("cuda")) is expected
    assert devices.pick_dtype(torch.device("mps")) is torch.float16


def test_out_of_memory_detection():
    assert devices.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert devices.is_out_of_memory(RuntimeError("MPS backend out of memory"))
    assert not devices.is_out_of_memory(RuntimeError("size mismatch"))
