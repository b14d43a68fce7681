"""The catalog of known models: the manifest in checkpoints/ plus files found on disk.

Manifest format (TOML), one table per model::

    [[model]]
    id = "sd15"
    kind = "sd_pipeline"            # sd_pipeline | lora | controlnet | sam | classifier | segmenter | detector | head_segmenter
    path = "sd15"                   # relative to the manifest's folder, or absolute
    # or: hub_repo = "org/name" (+ hub_file = "file.safetensors" for single files)
    licence = "CreativeML OpenRAIL-M"
    notes = "..."
    # kind-specific: architecture = "resnet18", variant = "vit_b", format = "kohya_lora",
    #                condition = "canny" (ControlNet: what it was trained on; default: its folder's
    #                fetalstudio_condition.json, else "layout")

Files dropped into checkpoints/ (or a folder in $FETALSTUDIO_MODELS) are discovered and get the
file or folder name (without suffix) as id; manifest entries win on id clashes.
"""

from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Iterable
from pathlib import Path

from fetalstudio.errors import FetalStudioError, ModelLoadError
from fetalstudio.models.entries import HubSource, ModelEntry, ModelFormat, ModelKind
from fetalstudio.models.inspect import WEIGHT_SUFFIXES, inspect_path

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.toml"
MODELS_PATH_ENV = "FETALSTUDIO_MODELS"
_KNOWN_KEYS = {"id", "kind", "path", "hub_repo", "hub_file", "hub_revision", "licence", "license", "notes", "format"}


class ManifestError(FetalStudioError):
    pass


def parse_manifest(path: Path) -> list[ModelEntry]:
    """Entries of a manifest file; errors name the file, the entry and the fix."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ManifestError(f"{path} is not valid TOML: {error}. Fix the line it names.") from error
    tables = data.get("model", [])
    if not isinstance(tables, list):
        raise ManifestError(f"{path}: write each model as a [[model]] table.")
    entries, seen = [], set()
    for number, table in enumerate(tables, start=1):
        entry = _entry_from_table(table, path, number)
        if entry.id in seen:
            raise ManifestError(f"{path}: model id {entry.id!r} appears twice; ids must be unique.")
        seen.add(entry.id)
        entries.append(entry)
    return entries


def _entry_from_table(table: dict, manifest: Path, number: int) -> ModelEntry:
    where = f"{manifest}, model #{number}"
    if not isinstance(table, dict):
        raise ManifestError(f"{where}: write each model as a [[model]] table.")
    for key in ("path", "hub_repo", "hub_file", "kind"):
        if key in table and not isinstance(table[key], str):
            raise ManifestError(f"{where}: {key} must be a quoted string.")
    model_id = table.get("id")
    if not model_id or not isinstance(model_id, str):
        raise ManifestError(f"{where}: every model needs an id (a short name such as \"sd15\").")
    try:
        kind = ModelKind(table.get("kind", ""))
    except ValueError:
        choices = ", ".join(k.value for k in ModelKind)
        raise ManifestError(f"{where} ({model_id}): kind must be one of {choices}.") from None
    if "path" not in table and "hub_repo" not in table:
        raise ManifestError(f"{where} ({model_id}): give a path (file or folder) or a hub_repo.")
    path = _resolve(manifest.parent, table["path"]) if "path" in table else None
    hub = None
    if "hub_repo" in table:
        hub = HubSource(table["hub_repo"], table.get("hub_file"), table.get("hub_revision"))
    _check_condition(table, kind, f"{where} ({model_id})")
    details = {k: str(v) for k, v in table.items() if k not in _KNOWN_KEYS}
    return ModelEntry(
        id=model_id,
        kind=kind,
        format=_declared_format(table, kind, path, hub, where),
        path=path,
        hub=hub,
        licence=str(table.get("licence", table.get("license", ""))),
        notes=str(table.get("notes", "")),
        origin="manifest",
        details=details,
    )


def _check_condition(table: dict, kind: ModelKind, where: str) -> None:
    """``condition`` (what a ControlNet was trained on: "layout", "canny", ...) belongs to ControlNets only."""
    if "condition" not in table:
        return
    value = table["condition"]
    if kind is not ModelKind.CONTROLNET:
        raise ManifestError(f"{where}: condition is only for ControlNets (what they were trained on); remove it from this {kind.value}.")
    if not isinstance(value, str) or not value.strip():
        raise ManifestError(f"{where}: condition must be a quoted name such as \"canny\" or \"layout\" (what the ControlNet "
                            "was trained on).")


def _declared_format(table: dict, kind: ModelKind, path: Path | None, hub, where: str) -> ModelFormat:
    if "format" in table:
        try:
            return ModelFormat(table["format"])
        except ValueError:
            raise ManifestError(f"{where}: unknown format {table['format']!r}.") from None
    if path is not None and path.exists():
        try:
            found = inspect_path(path)
        except ModelLoadError as error:  # reported when the model is loaded, not at start-up
            log.warning("%s: %s", where, error)
            found = None
        if found is not None:
            return found.format
    if path is None and hub is not None:
        return ModelFormat.HUB
    defaults = {
        ModelKind.SD_PIPELINE: ModelFormat.DIFFUSERS_FOLDER,
        ModelKind.LORA: ModelFormat.KOHYA_LORA,
        ModelKind.CONTROLNET: ModelFormat.CONTROLNET_FOLDER,
        ModelKind.SAM: ModelFormat.SAM_PTH,
        ModelKind.CLASSIFIER: ModelFormat.TIMM_CHECKPOINT,
        ModelKind.SEGMENTER: ModelFormat.TIMM_CHECKPOINT,
        ModelKind.DETECTOR: ModelFormat.FETALSTUDIO_DETECTOR,
        ModelKind.HEAD_SEGMENTER: ModelFormat.FETALSTUDIO_HEAD_SEGMENTER,
    }
    if path is not None and path.suffix.lower() in WEIGHT_SUFFIXES and kind is ModelKind.SD_PIPELINE:
        return ModelFormat.SINGLE_FILE
    return defaults[kind]


def _resolve(base: Path, value: str) -> Path:
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else (base / path)


def discover(folders: Iterable[Path]) -> list[ModelEntry]:
    """Models found by looking at files and folders; unreadable files are skipped with a warning."""
    entries: list[ModelEntry] = []
    for root in folders:
        if root.is_dir():
            entries.extend(_discover_in(root, root))
    return entries


def _discover_in(root: Path, folder: Path) -> list[ModelEntry]:
    found: list[ModelEntry] = []
    for child in sorted(folder.iterdir()):
        if child.name.startswith(".") or child.name == MANIFEST_NAME:
            continue
        try:
            inspection = inspect_path(child)
        except Exception as error:  # one odd file must never break the scan
            log.warning("Skipping %s: %s", child, error)
            continue
        if inspection is not None:
            found.append(
                ModelEntry(
                    id=_discovered_id(root, child),
                    kind=inspection.kind,
                    format=inspection.format,
                    path=child,
                    origin="discovered",
                    details=inspection.details,
                )
            )
        elif child.is_dir():
            found.extend(_discover_in(root, child))
    return found


def _discovered_id(root: Path, path: Path) -> str:
    relative = path.relative_to(root)
    stem = relative.name[: -len(relative.suffix)] if relative.suffix.lower() in WEIGHT_SUFFIXES else relative.name
    return str(relative.parent / stem) if relative.parent != Path(".") else stem


def model_folders(checkpoints_dir: Path) -> list[Path]:
    """checkpoints/ plus every folder named in $FETALSTUDIO_MODELS (os.pathsep-separated)."""
    folders = [checkpoints_dir]
    extra = os.environ.get(MODELS_PATH_ENV, "")
    folders += [Path(os.path.expanduser(p)) for p in extra.split(os.pathsep) if p.strip()]
    return folders


def build_catalog(checkpoints_dir: Path, extra_folders: Iterable[Path] = ()) -> dict[str, ModelEntry]:
    """Manifest entries first, then discovered ones whose id and path are not taken yet."""
    catalog: dict[str, ModelEntry] = {}
    manifest = checkpoints_dir / MANIFEST_NAME
    if manifest.is_file():
        for entry in parse_manifest(manifest):
            catalog[entry.id] = entry
    claimed = {e.path.resolve() for e in catalog.values() if e.path is not None}
    for entry in discover([*model_folders(checkpoints_dir), *extra_folders]):
        if entry.path.resolve() in claimed:
            continue
        model_id = entry.id if entry.id not in catalog else str(entry.path)
        catalog[model_id] = ModelEntry(**{**entry.__dict__, "id": model_id})
        claimed.add(entry.path.resolve())
    return catalog
