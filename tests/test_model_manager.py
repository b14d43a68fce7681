"""The model manager: lazy loading, LRU eviction under a memory budget, pinning, errors, threads."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from fetalstudio.errors import (
    FetalStudioError,
    ModelLoadError,
    ModelNotFoundError,
)
from fetalstudio.errors import OutOfMemoryError as FSOutOfMemoryError
from fetalstudio.models import manager as manager_module
from fetalstudio.models.entries import ModelKind
from fetalstudio.models.manager import MEMORY_BUDGET_ENV, ModelManager

MB = 2**20


class Blob(torch.nn.Module):
    """A module of exactly ``nbytes`` float32 parameter bytes."""

    def __init__(self, nbytes: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(nbytes // 4))


class FakeLoader:
    """Counts loads; model size from the manifest's ``bytes`` detail; may fail for chosen ids."""

    def __init__(self, failures: dict[str, BaseException] | None = None) -> None:
        self.calls: list[str] = []
        self.failures = failures or {}
        self._lock = threading.Lock()

    def __call__(self, entry, path: Path, dtype: torch.dtype):
        with self._lock:
            self.calls.append(entry.id)
        assert path.exists() and dtype == torch.float32
        if entry.id in self.failures:
            raise self.failures[entry.id]
        return Blob(int(entry.details["bytes"]))


def write_blob_manifest(folder: Path, sizes: dict[str, int], missing: tuple[str, ...] = ()) -> None:
    """One classifier entry per id; its (empty) file exists unless the id is in ``missing``."""
    tables = []
    for model_id, size in sizes.items():
        if model_id not in missing:
            (folder / f"{model_id}.dat").write_bytes(b"")
        tables.append(
            f'[[model]]\nid = "{model_id}"\nkind = "classifier"\npath = "{model_id}.dat"\n'
            f'format = "timm_checkpoint"\nlicence = "test-{model_id}"\nbytes = {size}\n'
        )
    (folder / "manifest.toml").write_text("\n".join(tables), encoding="utf-8")


@pytest.fixture
def loader() -> FakeLoader:
    return FakeLoader()


@pytest.fixture
def make_manager(tmp_checkpoints, cpu_placement, loader, monkeypatch):
    """A manager with fake 1 MB models a, b, c (plus any extra sizes) and a 2.5 MB budget.

    A full gc.collect() after each unload costs ~1 s once diffusers is imported; these tiny fake
    models need none, so the manager's gc is stubbed (the bookkeeping under test is unchanged).
    """
    monkeypatch.setattr(manager_module, "gc", SimpleNamespace(collect=lambda: 0))

    def make(sizes: dict[str, int] | None = None, budget: int | None = int(2.5 * MB), missing=(), loaders=None):
        write_blob_manifest(tmp_checkpoints, sizes or {"a": MB, "b": MB, "c": MB}, missing)
        return ModelManager(
            tmp_checkpoints,
            placement=cpu_placement,
            memory_budget_bytes=budget,
            loaders=loaders or {ModelKind.CLASSIFIER: loader},
        )

    return make


# --- lazy loading and identity -------------------------------------------------------------------


def test_nothing_is_loaded_until_get(make_manager, loader):
    manager = make_manager()
    assert sorted(manager.ids()) == ["a", "b", "c"]
    assert loader.calls == [] and manager.loaded_ids() == [] and manager.used_bytes() == 0
    assert not any(row.loaded for row in manager.status())
    model = manager.get("a")
    assert isinstance(model, Blob)
    assert loader.calls == ["a"] and manager.loaded_ids() == ["a"]
    assert manager.used_bytes() == MB


def test_get_returns_the_same_object_without_reloading(make_manager, loader):
    manager = make_manager()
    first = manager.get("a")
    assert manager.get("a") is first
    with manager.use("a") as used:
        assert used is first
    assert loader.calls == ["a"]


def test_unknown_id_lists_known_models(make_manager):
    manager = make_manager()
    with pytest.raises(ModelNotFoundError) as caught:
        manager.entry("sd-does-not-exist")
    message = str(caught.value)
    assert "'sd-does-not-exist'" in message
    assert "Known models: a, b, c." in message
    assert str(manager.checkpoints_dir) in message
    with pytest.raises(ModelNotFoundError):
        manager.get("sd-does-not-exist")


def test_existing_path_becomes_a_user_entry(make_manager, tiny_kohya_lora):
    manager = make_manager()
    entry = manager.entry(tiny_kohya_lora)
    assert entry.origin == "user" and entry.kind is ModelKind.LORA
    assert entry.id == str(tiny_kohya_lora.resolve()) and entry.path == tiny_kohya_lora.resolve()
    assert entry.id in manager.ids(ModelKind.LORA)
    assert manager.entry(str(tiny_kohya_lora)) == entry
    manager.refresh()  # paths the user gave stay known after a rescan
    assert entry.id in manager.ids()


def test_path_of_a_known_model_resolves_to_its_catalog_entry(manager, tiny_sd_dir):
    assert manager.entry(tiny_sd_dir) == manager.entry("tinysd")  # else it would load twice


def test_lora_is_not_loaded_on_its_own(make_manager, tiny_kohya_lora):
    manager = make_manager()
    with pytest.raises(ModelLoadError, match="applied on top of another model"):
        manager.get(tiny_kohya_lora)


def test_kind_without_loader_is_refused_clearly(make_manager):
    manager = make_manager(loaders={ModelKind.SAM: FakeLoader()})
    with pytest.raises(ModelLoadError, match="Loading classifier models is not supported"):
        manager.get("a")


@pytest.mark.parametrize("name", ["notes.txt", "weights.bin", "not_a_model_folder"])
def test_path_to_a_non_model_is_a_load_error(make_manager, tmp_path, name):
    manager = make_manager()
    target = tmp_path / name
    if name.endswith(".txt"):
        target.write_text("hello")
    elif name.endswith(".bin"):
        target.write_bytes(b"\x00\x01" * 100)
    else:
        target.mkdir()
        (target / "readme.md").write_text("nothing")
    with pytest.raises(ModelLoadError) as caught:
        manager.get(str(target))
    assert name in str(caught.value)
    assert str(target.resolve()) not in manager.ids()


def test_missing_file_of_manifest_entry_names_the_path(make_manager, loader, tmp_checkpoints):
    manager = make_manager(missing=("b",))
    with pytest.raises(ModelNotFoundError) as caught:
        manager.get("b")
    assert str(tmp_checkpoints / "b.dat") in str(caught.value)
    assert "'b'" in str(caught.value)
    assert loader.calls == []


# --- memory budget ------------------------------------------------------------------------------


def test_least_recently_used_model_is_evicted_first(make_manager, loader):
    manager = make_manager()
    a = manager.get("a")
    manager.get("b")
    assert manager.get("a") is a  # touch a: b is now the least recently used
    manager.get("c")
    assert manager.loaded_ids() == ["a", "c"]
    assert manager.used_bytes() <= manager.memory_budget_bytes
    manager.get("b")  # a is now the oldest
    assert manager.loaded_ids() == ["c", "b"]
    assert loader.calls == ["a", "b", "c", "b"]


def test_pinned_model_is_never_evicted(make_manager):
    manager = make_manager()
    with manager.use("a") as a:
        manager.get("b")
        manager.get("c")  # a is least recently used but pinned: b goes
        assert manager.loaded_ids() == ["a", "c"]
        with pytest.raises(FetalStudioError, match="in use"):
            manager.unload("a")
        manager.unload_all()  # leaves pinned models alone
        assert manager.loaded_ids() == ["a"]
        assert manager.get("a") is a
    assert manager.unload("a") is True
    assert manager.loaded_ids() == []
    assert manager.unload("a") is False


def test_nested_use_keeps_the_pin_until_the_outer_block_ends(make_manager):
    manager = make_manager()
    with manager.use("a"):
        with manager.use("a"):
            pass
        with pytest.raises(FetalStudioError):
            manager.unload("a")
    assert manager.unload("a") is True


def test_pin_is_released_when_the_block_raises(make_manager):
    manager = make_manager()
    with pytest.raises(ValueError):
        with manager.use("a"):
            raise ValueError("job failed")
    assert manager.unload("a") is True


def test_pinned_models_filling_the_budget_give_a_clear_error(make_manager):
    manager = make_manager()
    with manager.use("a"), manager.use("b"):
        with pytest.raises(FSOutOfMemoryError) as caught:
            manager.get("c")
        assert "(a, b)" in str(caught.value) and "budget" in str(caught.value)
        assert manager.loaded_ids() == ["a", "b"]


def test_refused_model_does_not_evict_others_for_nothing(make_manager):
    manager = make_manager({"a": MB, "b": MB, "big": 2 * MB})
    with manager.use("a"):
        b = manager.get("b")
        with pytest.raises(FSOutOfMemoryError):
            manager.get("big")  # a (pinned, 1 MB) + big (2 MB) can never fit 2.5 MB
        assert manager.loaded_ids() == ["a", "b"]  # so b must not have been unloaded for it
        assert manager.get("b") is b


def test_model_bigger_than_the_budget_is_refused_and_keeps_the_others(make_manager):
    manager = make_manager({"a": MB, "b": MB, "huge": 3 * MB})
    a, b = manager.get("a"), manager.get("b")
    with pytest.raises(FSOutOfMemoryError) as caught:
        manager.get("huge")
    message = str(caught.value)
    assert "'huge'" in message and "memory budget" in message and MEMORY_BUDGET_ENV in message
    assert manager.loaded_ids() == ["a", "b"]
    assert manager.get("a") is a and manager.get("b") is b


def test_failed_load_keeps_the_working_model(make_manager, loader):
    loader.failures["b"] = ValueError("tensor shapes do not match")
    manager = make_manager(budget=int(1.5 * MB))  # room for one model only
    a = manager.get("a")
    with pytest.raises(ModelLoadError) as caught:
        manager.get("b")
    message = str(caught.value)
    assert "'b'" in message and "b.dat" in message
    assert "ValueError: tensor shapes do not match" in message
    assert isinstance(caught.value.__cause__, ValueError)
    assert manager.loaded_ids() == ["a"]
    assert manager.get("a") is a
    assert loader.calls == ["a", "b"]


def test_fetalstudio_errors_from_a_loader_pass_through_unchanged(make_manager, loader):
    error = ModelLoadError("b.dat: the timm architecture is unknown.")
    loader.failures["b"] = error
    manager = make_manager()
    manager.get("a")
    with pytest.raises(ModelLoadError) as caught:
        manager.get("b")
    assert caught.value is error
    assert manager.loaded_ids() == ["a"]


def test_failed_real_load_keeps_the_working_pipeline(manager, tiny_sd_dir, tmp_checkpoints):
    from diffusers import StableDiffusionPipeline

    classifier = tmp_checkpoints / "planes.safetensors"
    save_file(
        {"fc.weight": torch.zeros(5, 512), "fc.bias": torch.zeros(5)},
        str(classifier),
        metadata={"fetalstudio.kind": "classifier", "fetalstudio.architecture": "resnet18"},
    )
    manager.refresh()
    assert manager.entry("planes").kind is ModelKind.CLASSIFIER

    pipe = manager.get("tinysd")
    assert isinstance(pipe, StableDiffusionPipeline)
    classifier.write_bytes(classifier.read_bytes()[:40])  # the file got corrupted after the scan
    with pytest.raises(ModelLoadError, match="planes.safetensors"):
        manager.get("planes")
    assert manager.loaded_ids() == ["tinysd"]
    assert manager.get("tinysd") is pipe
    images = pipe("fetal head", num_inference_steps=1, height=64, width=64, guidance_scale=1.0, output_type="np").images
    assert images.shape == (1, 64, 64, 3)


def test_tiny_sd_pipeline_loads_on_cpu_in_float32(manager):
    pipe = manager.get("tinysd")
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"
    assert pipe.safety_checker is None
    row = next(r for r in manager.status() if r.id == "tinysd")
    assert row.loaded and row.kind == "sd_pipeline" and row.format == "diffusers_folder"
    assert row.size_mb > 0 and row.device == "cpu / float32"


def test_incomplete_diffusers_folder_is_a_clear_load_error(manager, tiny_sd_dir, tmp_checkpoints):
    broken = tmp_checkpoints / "broken_sd"
    shutil.copytree(tiny_sd_dir, broken)
    shutil.rmtree(broken / "tokenizer")
    manager.refresh()
    with pytest.raises(ModelLoadError) as caught:
        manager.get("broken_sd")
    message = str(caught.value)
    assert "tokenizer/" in message and "must be complete" in message and str(broken) in message
    assert manager.loaded_ids() == []


# --- out-of-memory retry -----------------------------------------------------------------------


class FlakyJob:
    def __init__(self, errors: list[BaseException], result="done") -> None:
        self.errors = list(errors)
        self.calls = 0
        self.result = result

    def __call__(self):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.result


def cuda_oom() -> torch.cuda.OutOfMemoryError:
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_oom_once_frees_other_models_and_retries(make_manager):
    manager = make_manager(budget=10 * MB)
    for model_id in "abc":
        manager.get(model_id)
    job = FlakyJob([cuda_oom()])
    assert manager.run_with_oom_retry(job, keep="b") == "done"
    assert job.calls == 2
    assert manager.loaded_ids() == ["b"]


def test_oom_retry_keeps_pinned_models(make_manager):
    manager = make_manager(budget=10 * MB)
    manager.get("a")
    with manager.use("b"):
        job = FlakyJob([RuntimeError("CUDA error: out of memory")])
        assert manager.run_with_oom_retry(job) == "done"
        assert manager.loaded_ids() == ["b"]


def test_oom_twice_raises_fetalstudio_oom(make_manager):
    manager = make_manager(budget=10 * MB)
    manager.get("a")
    manager.get("b")
    job = FlakyJob([cuda_oom(), cuda_oom()])
    with pytest.raises(FSOutOfMemoryError) as caught:
        manager.run_with_oom_retry(job, keep="a")
    assert "ran out of memory" in str(caught.value) and "'a'" in str(caught.value)
    assert isinstance(caught.value.__cause__, torch.cuda.OutOfMemoryError)
    assert job.calls == 2
    assert manager.loaded_ids() == ["a"]


@pytest.mark.parametrize("error", [ValueError("bad prompt"), RuntimeError("shape mismatch"), FetalStudioError("cancel")])
def test_non_oom_errors_propagate_unchanged(make_manager, error):
    manager = make_manager(budget=10 * MB)
    manager.get("a")
    job = FlakyJob([error])
    with pytest.raises(type(error)) as caught:
        manager.run_with_oom_retry(job)
    assert caught.value is error
    assert job.calls == 1
    assert manager.loaded_ids() == ["a"]


def test_non_oom_error_on_the_retry_propagates_unchanged(make_manager):
    manager = make_manager(budget=10 * MB)
    second = ValueError("after retry")
    job = FlakyJob([cuda_oom(), second])
    with pytest.raises(ValueError) as caught:
        manager.run_with_oom_retry(job)
    assert caught.value is second


class OomOnMove(Blob):
    """A model whose first ``moves_failing`` moves to the device run out of memory."""

    moves_failing = 1

    def to(self, *args, **kwargs):
        if OomOnMove.moves_failing > 0:
            OomOnMove.moves_failing -= 1
            raise cuda_oom()
        return super().to(*args, **kwargs)


@pytest.mark.parametrize("moves_failing", [1, 2])
def test_oom_while_moving_frees_other_models(make_manager, monkeypatch, moves_failing):
    monkeypatch.setattr(OomOnMove, "moves_failing", moves_failing)
    fake = FakeLoader()

    def load(entry, path, dtype):
        return OomOnMove(MB) if entry.id == "c" else fake(entry, path, dtype)

    manager = make_manager(budget=10 * MB, loaders={ModelKind.CLASSIFIER: load})
    manager.get("a")
    with manager.use("b"):
        if moves_failing == 1:
            assert isinstance(manager.get("c"), OomOnMove)
            assert manager.loaded_ids() == ["b", "c"]
        else:
            with pytest.raises(FSOutOfMemoryError, match="ran out of memory"):
                manager.get("c")
            assert manager.loaded_ids() == ["b"]


# --- threads ------------------------------------------------------------------------------------


def test_concurrent_get_loads_once(make_manager, loader):
    manager = make_manager()
    barrier = threading.Barrier(8)
    results, errors = [], []

    def worker():
        try:
            barrier.wait()
            results.append(manager.get("a"))
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(results) == 8 and all(model is results[0] for model in results)
    assert loader.calls == ["a"]


def test_concurrent_use_of_different_models_stays_within_budget(make_manager, loader):
    manager = make_manager({name: MB for name in "abcdef"}, budget=int(3.5 * MB))
    barrier = threading.Barrier(6)
    errors = []

    def worker(model_id):
        try:
            barrier.wait()
            for _ in range(5):
                with manager.use(model_id) as model:
                    assert isinstance(model, Blob)
                    assert manager.used_bytes() <= manager.memory_budget_bytes
        except FSOutOfMemoryError:
            pass  # three pinned models may fill the budget: a clean, user-facing refusal
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(name,)) for name in "abcdef"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert manager.used_bytes() <= manager.memory_budget_bytes
    for model_id in manager.loaded_ids():  # no pin leaked
        assert manager.unload(model_id)


# --- status and configuration ------------------------------------------------------------------


def test_status_rows_reflect_loaded_state(make_manager, tmp_checkpoints):
    manager = make_manager()
    manager.get("a")
    rows = {row.id: row for row in manager.status()}
    assert set(rows) == {"a", "b", "c"}
    a, b = rows["a"], rows["b"]
    assert a.loaded and a.device == "cpu / float32" and a.size_mb == 1.0
    assert a.kind == "classifier" and a.format == "timm_checkpoint" and a.origin == "manifest"
    assert a.source == str(tmp_checkpoints / "a.dat") and a.licence == "test-a"
    assert not b.loaded and b.device == "" and b.size_mb == 0.0
    manager.unload("a")
    assert not any(row.loaded for row in manager.status())
    assert "0 loaded" in manager.describe()


def test_refresh_finds_new_files_and_keeps_loaded_models(make_manager, tmp_checkpoints, tiny_kohya_lora):
    manager = make_manager()
    a = manager.get("a")
    shutil.copy(tiny_kohya_lora, tmp_checkpoints / "new_lora.safetensors")
    assert "new_lora" not in manager.ids()
    manager.refresh()
    assert "new_lora" in manager.ids(ModelKind.LORA)
    assert manager.get("a") is a


@pytest.mark.parametrize(("value", "expected"), [("0.5", 2**29), ("7.5", int(7.5 * 2**30)), ("12", 12 * 2**30)])
def test_memory_budget_from_environment(tmp_checkpoints, cpu_placement, monkeypatch, value, expected):
    monkeypatch.setenv(MEMORY_BUDGET_ENV, value)
    assert ModelManager(tmp_checkpoints, placement=cpu_placement).memory_budget_bytes == expected
    explicit = ModelManager(tmp_checkpoints, placement=cpu_placement, memory_budget_bytes=123 * MB)
    assert explicit.memory_budget_bytes == 123 * MB


def test_bad_memory_budget_in_environment_is_a_clear_error(tmp_checkpoints, cpu_placement, monkeypatch):
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "lots")
    with pytest.raises(FetalStudioError) as caught:
        ModelManager(tmp_checkpoints, placement=cpu_placement)
    assert MEMORY_BUDGET_ENV in str(caught.value) and "'lots'" in str(caught.value)


def test_default_budget_on_cpu_is_half_of_ram(tmp_checkpoints, cpu_placement):
    from fetalstudio.models.device import device_memory_bytes

    total = device_memory_bytes(torch.device("cpu"))
    manager = ModelManager(tmp_checkpoints, placement=cpu_placement)
    assert manager.memory_budget_bytes == (int(total * 0.5) if total else 8 * 2**30)


def test_native_image_size_comes_from_the_configs_without_loading(tiny_sd_dir, tmp_checkpoints, cpu_placement):
    import json

    from fetalstudio.models.manager import ModelManager

    manager = ModelManager(tmp_checkpoints, placement=cpu_placement, extra_folders=(tiny_sd_dir.parent,))
    unet = json.loads((tiny_sd_dir / "unet" / "config.json").read_text())
    vae = json.loads((tiny_sd_dir / "vae" / "config.json").read_text())
    assert manager.native_image_size(tiny_sd_dir.name) == unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1) == 64
    assert manager.loaded_ids() == []
    assert manager.native_image_size("no-such-model") is None
