"""The model manager: one place that knows every model, loads lazily, keeps a memory budget.

Design (after IOPaint's model manager and diffusers' loaders):
- The catalog (manifest + discovery) says what exists; nothing is loaded until first use.
- A load reads the checkpoint on the CPU first; only when that worked are other models evicted
  (least recently used first) to make room on the device. A model that fails to load therefore
  never costs the user the model that was working.
- A CUDA out-of-memory error while moving or running frees every unpinned model and retries
  once, then raises OutOfMemoryError with what to do.
- All state changes happen under one re-entrant lock, so concurrent Gradio handlers see a
  consistent state and only one load runs at a time. Models in use are pinned (``use``) so an
  eviction never pulls weights from under a running generation.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from fetalstudio.errors import FetalStudioError, ModelLoadError, ModelNotFoundError, OutOfMemoryError
from fetalstudio.models import device as devices
from fetalstudio.models.catalog import build_catalog
from fetalstudio.models.entries import ModelEntry, ModelKind
from fetalstudio.models.hub import fetch_from_hub
from fetalstudio.models.inspect import inspect_path, native_image_size
from fetalstudio.models.loaders import LOADERS, Loader
from fetalstudio.paths import is_under

log = logging.getLogger(__name__)
T = TypeVar("T")

MEMORY_BUDGET_ENV = "FETALSTUDIO_MEMORY_BUDGET_GB"

NO_MODEL_HELP = {
    ModelKind.SD_PIPELINE: (
        "No image generator is installed yet. Put a Stable Diffusion 1.x model in {folder}: a "
        "diffusers folder (with model_index.json, e.g. a copy of stable-diffusion-v1-5) or a single "
        ".safetensors/.ckpt file (e.g. v1-5-pruned-emaonly.safetensors); or list one in "
        "{folder}/manifest.toml. LoRA files (e.g. FU-LoRA's fetal_ultrasound_v1.0.safetensors) go "
        "there too. Then press Refresh in the Models panel."
    ),
}


@dataclass
class LoadedModel:
    entry: ModelEntry
    model: Any
    size_bytes: int
    placement: devices.DevicePlacement
    loaded_at: float
    pins: int = 0


@dataclass(frozen=True)
class ModelStatus:
    """One row of the Models panel."""

    id: str
    kind: str
    format: str
    source: str
    origin: str
    loaded: bool
    device: str
    size_mb: float
    licence: str
    notes: str


def module_size_bytes(model: Any) -> int:
    """Bytes of parameters and buffers of a module or of every module in a diffusers pipeline."""
    modules = list(model.components.values()) if hasattr(model, "components") else [model]
    total = 0
    for module in modules:
        if isinstance(module, torch.nn.Module):
            total += sum(t.numel() * t.element_size() for t in module.parameters())
            total += sum(t.numel() * t.element_size() for t in module.buffers())
    return total


def _move(model: Any, placement: devices.DevicePlacement) -> Any:
    return model.to(placement.device)  # modules and diffusers pipelines alike


class ModelManager:
    def __init__(
        self,
        checkpoints_dir: Path,
        extra_folders: tuple[Path, ...] = (),
        placement: devices.DevicePlacement | None = None,
        memory_budget_bytes: int | None = None,
        loaders: dict[ModelKind, Loader] | None = None,
    ) -> None:
        self.checkpoints_dir = Path(checkpoints_dir)
        self.extra_folders = tuple(Path(p) for p in extra_folders)
        self.placement = placement or devices.default_placement()
        self.memory_budget_bytes = memory_budget_bytes or self._default_budget()
        self.loaders = dict(LOADERS if loaders is None else loaders)
        self._lock = threading.RLock()
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._catalog: dict[str, ModelEntry] = {}
        #: Folders a typed model path may lie in; None: anywhere (the user is on this computer). The web
        #: app sets it when it listens beyond loopback, so a model box cannot probe the server's files.
        self.user_path_roots: tuple[Path, ...] | None = None
        self.refresh()

    # --- catalog -------------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-read the manifest and rescan the model folders (new files dropped in appear)."""
        with self._lock:
            catalog = build_catalog(self.checkpoints_dir, self.extra_folders)
            for model_id, loaded in self._loaded.items():  # user-added paths stay known
                catalog.setdefault(model_id, loaded.entry)
            for model_id, entry in self._catalog.items():
                if entry.origin == "user":
                    catalog.setdefault(model_id, entry)
            self._catalog = catalog

    def entries(self, kind: ModelKind | None = None) -> list[ModelEntry]:
        with self._lock:
            return [e for e in self._catalog.values() if kind is None or e.kind is kind]

    def ids(self, kind: ModelKind | None = None) -> list[str]:
        return [e.id for e in self.entries(kind)]

    def default_id(self, kind: ModelKind) -> str:
        """The manifest's ``default = true`` model of a kind, else the first one on disk.

        Hub-only entries are never picked silently: downloading gigabytes is the user's choice.
        """
        candidates = [e for e in self.entries(kind) if e.is_local]
        for entry in candidates:
            if entry.details.get("default", "").lower() == "true":
                return entry.id
        if candidates:
            return candidates[0].id
        raise ModelNotFoundError(NO_MODEL_HELP.get(kind, f"No {kind.value} model is installed.").format(folder=self.checkpoints_dir))

    def native_image_size(self, id_or_path: str | Path) -> int | None:
        """The image size a generator was trained at (e.g. 256 for fetalstudio-tiny, 512 for SD 1.5 files),
        read from its configs without loading it; None when unknown or not on disk (nothing is downloaded)."""
        try:
            entry = self.entry(id_or_path)
        except FetalStudioError:
            return None
        if entry.path is None or not entry.path.exists():
            return None
        return native_image_size(entry.path, entry.format)

    def entry(self, id_or_path: str | Path) -> ModelEntry:
        """The entry for a catalog id, or for a file/folder path the user gave (registered on the fly)."""
        with self._lock:
            key = str(id_or_path)
            if key in self._catalog:
                return self._catalog[key]
            path = Path(os.path.expanduser(key))
            if self.user_path_roots is not None and not is_under(path, self.user_path_roots):
                raise ModelNotFoundError(
                    f"No model called {key!r} among this app's models. On a shared app, a model given by its path "
                    "must lie in the checkpoints folder or a folder named with --data-dir; pick one from the list."
                )
            if path.exists():
                resolved = path.resolve()
                for entry in self._catalog.values():  # a known model given by its path
                    if entry.path is not None and entry.path.resolve() == resolved:
                        return entry
                return self._register_path(path)
        known = ", ".join(sorted(self._catalog)) or "none yet"
        raise ModelNotFoundError(
            f"No model called {key!r}: it is neither a known model id nor an existing file or folder. "
            f"Known models: {known}. Put checkpoints in {self.checkpoints_dir} or give a full path."
        )

    def _register_path(self, path: Path) -> ModelEntry:
        inspection = inspect_path(path)
        if inspection is None:
            raise ModelLoadError(
                f"{path} is not a model FetalStudio recognises. Expected a diffusers folder "
                "(with model_index.json), an SD 1.x .safetensors/.ckpt, a LoRA .safetensors "
                "(kohya or peft), a ControlNet folder, a SAM .pth or a timm checkpoint."
            )
        entry = ModelEntry(
            id=str(path.resolve()), kind=inspection.kind, format=inspection.format,
            path=path.resolve(), origin="user", details=inspection.details,
        )
        self._catalog[entry.id] = entry
        return entry

    def local_path(self, entry: ModelEntry) -> Path:
        """Where the weights are on disk; hub models are fetched (or explained) here."""
        if entry.path is not None:
            if not entry.path.exists():
                raise ModelNotFoundError(
                    f"Model '{entry.id}' should be at {entry.path}, but nothing is there. "
                    "Put the file or folder back, or fix its path in checkpoints/manifest.toml."
                )
            return entry.path
        if entry.hub is not None:
            return fetch_from_hub(entry, self.checkpoints_dir / ".hub-cache", self.checkpoints_dir)
        raise ModelNotFoundError(f"Model '{entry.id}' has neither a path nor a hub source.")

    # --- loading -----------------------------------------------------------------------------
    def get(self, id_or_path: str | Path) -> Any:
        """The loaded model (loading it on first use). Prefer ``use`` while running it."""
        with self._lock:
            entry = self.entry(id_or_path)
            if entry.id in self._loaded:
                self._loaded.move_to_end(entry.id)
                return self._loaded[entry.id].model
            return self._load(entry)

    @contextmanager
    def use(self, id_or_path: str | Path) -> Iterator[Any]:
        """Load if needed and pin the model so that no eviction touches it until the block ends."""
        with self._lock:
            model = self.get(id_or_path)
            record = self._loaded[self.entry(id_or_path).id]
            record.pins += 1
        try:
            yield model
        finally:
            with self._lock:
                record.pins -= 1

    def _load(self, entry: ModelEntry) -> Any:
        loader = self.loaders.get(entry.kind)
        if loader is None:
            raise ModelLoadError(
                f"Model '{entry.id}' is a {entry.kind.value}; it is applied on top of another model "
                "(LoRAs are picked in the Synthesis tab), not loaded on its own."
                if entry.kind is ModelKind.LORA
                else f"Loading {entry.kind.value} models is not supported by this version of FetalStudio."
            )
        path = self.local_path(entry)
        started = time.perf_counter()
        try:
            model = loader(entry, path, self.placement.dtype)
        except FetalStudioError:
            raise
        except Exception as error:  # any library error becomes a message, never a crash
            raise ModelLoadError(f"Could not load model '{entry.id}' from {path}: {type(error).__name__}: {error}") from error
        size = module_size_bytes(model)
        model = self._place(entry, model, size)
        self._loaded[entry.id] = LoadedModel(entry, model, size, self.placement, time.time())
        log.info("Loaded %s (%.0f MB) in %.1f s on %s", entry.id, size / 2**20, time.perf_counter() - started, self.placement.label)
        return model

    def _place(self, entry: ModelEntry, model: Any, size: int) -> Any:
        if size > self.memory_budget_bytes:
            raise OutOfMemoryError(
                f"Model '{entry.id}' needs {size / 2**30:.1f} GiB, more than the memory budget of "
                f"{self.memory_budget_bytes / 2**30:.1f} GiB. Raise ${MEMORY_BUDGET_ENV} or use a smaller model."
            )
        self._make_room(size, keep=entry.id)
        try:
            return _move(model, self.placement)
        except Exception as error:
            if not devices.is_out_of_memory(error):
                raise
            self._evict_all_unpinned(keep=entry.id)
            try:
                return _move(model, self.placement)
            except Exception as retry_error:
                if devices.is_out_of_memory(retry_error):
                    raise OutOfMemoryError(self._oom_message(entry.id)) from retry_error
                raise

    def _default_budget(self) -> int:
        configured = os.environ.get(MEMORY_BUDGET_ENV)
        if configured:
            try:
                return int(float(configured) * 2**30)
            except ValueError:
                raise FetalStudioError(f"${MEMORY_BUDGET_ENV}={configured!r} is not a number of GiB (e.g. 6 or 7.5).") from None
        total = devices.device_memory_bytes(self.placement.device)
        share = 0.85 if self.placement.device.type == "cuda" else 0.5
        return int(total * share) if total else 8 * 2**30

    def used_bytes(self) -> int:
        with self._lock:
            return sum(m.size_bytes for m in self._loaded.values())

    def _make_room(self, needed: int, keep: str) -> None:
        """Unload least-recently-used, unpinned models until ``needed`` more bytes fit the budget.

        Checks first whether evicting could make room at all: a load that is refused anyway must
        not cost the user the models that are working.
        """
        evictable = sum(m.size_bytes for i, m in self._loaded.items() if i != keep and m.pins == 0)
        if self.used_bytes() - evictable + needed > self.memory_budget_bytes:
            raise OutOfMemoryError(
                f"Not enough room for a {needed / 2**30:.1f} GiB model: the models in use "
                f"({', '.join(i for i, m in self._loaded.items() if m.pins)}) fill the "
                f"{self.memory_budget_bytes / 2**30:.1f} GiB budget. Wait for the running job to finish, or raise the budget."
            )
        evicted = False
        for model_id in list(self._loaded):  # OrderedDict: least recently used first
            if self.used_bytes() + needed <= self.memory_budget_bytes:
                break
            if model_id != keep and self._loaded[model_id].pins == 0:
                del self._loaded[model_id]
                evicted = True
        if evicted:
            self._release_memory()

    def _evict_all_unpinned(self, keep: str | None = None) -> None:
        for model_id in list(self._loaded):
            if model_id != keep and self._loaded[model_id].pins == 0:
                del self._loaded[model_id]
        self._release_memory()

    def _release_memory(self) -> None:
        gc.collect()
        devices.free_device_cache(self.placement.device)

    def unload(self, id_or_path: str | Path) -> bool:
        """Free a model's memory. Returns False when it was not loaded."""
        with self._lock:
            model_id = str(id_or_path) if str(id_or_path) in self._loaded else self.entry(id_or_path).id
            record = self._loaded.get(model_id)
            if record is None:
                return False
            if record.pins:
                raise FetalStudioError(f"Model '{model_id}' is in use by a running job; unload it when the job ends.")
            del self._loaded[model_id]
            del record
            self._release_memory()
            return True

    def unload_all(self) -> None:
        with self._lock:
            self._evict_all_unpinned()

    def loaded_ids(self) -> list[str]:
        """Loaded models, least recently used first."""
        with self._lock:
            return list(self._loaded)

    # --- running -----------------------------------------------------------------------------
    def run_with_oom_retry(self, job: Callable[[], T], keep: str | None = None) -> T:
        """Run ``job``; on device out-of-memory free every other model and retry once."""
        try:
            return job()
        except Exception as error:
            if not devices.is_out_of_memory(error):
                raise
            log.warning("Out of memory; freeing other models and retrying once")
            with self._lock:
                self._evict_all_unpinned(keep=keep)
        try:
            return job()
        except Exception as error:
            if devices.is_out_of_memory(error):
                raise OutOfMemoryError(self._oom_message(keep)) from error
            raise

    def _oom_message(self, model_id: str | None) -> str:
        return (
            f"The {self.placement.device.type.upper()} ran out of memory{f' with model {model_id!r}' if model_id else ''} "
            "even after unloading every other model. Use a smaller batch size or image size, "
            "or close other programs that use the GPU."
        )

    # --- status ------------------------------------------------------------------------------
    def status(self) -> list[ModelStatus]:
        with self._lock:
            rows = []
            for entry in self._catalog.values():
                loaded = self._loaded.get(entry.id)
                rows.append(
                    ModelStatus(
                        id=entry.id, kind=entry.kind.value, format=entry.format.value,
                        source=entry.source_label, origin=entry.origin, loaded=loaded is not None,
                        device=loaded.placement.label if loaded else "",
                        size_mb=round(loaded.size_bytes / 2**20, 1) if loaded else 0.0,
                        licence=entry.licence, notes=entry.notes,
                    )
                )
            return rows

    def describe(self) -> str:
        used, budget = self.used_bytes() / 2**20, self.memory_budget_bytes / 2**20
        return f"Device {self.placement.label}; {len(self._loaded)} loaded, {used:.0f} MB of {budget:.0f} MB budget in use."
