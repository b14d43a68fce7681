"""Anomaly presets: named lists of layout edits with their clinical meaning, stored as JSON.

A preset file (built-in ones in ``fetalstudio/anatomy/presets/``; the user's own in the folder
``user_presets_dir()`` = ``$FETALSTUDIO_PRESETS`` or ``outputs/presets/``)::

    {"schema": "fetalstudio.preset", "version": 1, "name": "increased_nt", "title": "...",
     "plane": "facial_sagittal", "clinical_meaning": "...", "marker": "...",
     "parameters": {"factor": {"default": 2.0, "description": "..."}},
     "edits": [{"op": "scale", "structure": "nuchal_translucency", "sy": "$factor"}]}

An edit field written ``"$name"`` takes the value of parameter ``name`` (its default unless the user
gives one). Edits use the ops of ``fetalstudio.anatomy.edits``. A broken user file does not hide
the others: the catalogue lists it as a problem naming the file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fetalstudio.anatomy.edits import Add, Edit, edit_from_dict
from fetalstudio.anatomy.layout import Layout
from fetalstudio.errors import FetalStudioError
from fetalstudio.imaging.files import read_json
from fetalstudio.paths import outputs_dir
from fetalstudio.vocabulary import anatomy_plane, structure

PRESET_SCHEMA = "fetalstudio.preset"
PRESET_VERSION = 1
BUILTIN_PRESETS_DIR = Path(__file__).resolve().parent / "presets"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_REQUIRED = ("name", "title", "plane", "clinical_meaning", "marker", "edits")


def user_presets_dir() -> Path:
    """The folder scanned for the user's preset files: ``$FETALSTUDIO_PRESETS`` or ``outputs/presets``."""
    configured = os.environ.get("FETALSTUDIO_PRESETS")
    return Path(configured).expanduser() if configured else outputs_dir() / "presets"


@dataclass(frozen=True)
class PresetParameter:
    default: Any
    description: str = ""


@dataclass(frozen=True)
class Preset:
    """A named list of edit templates; ``edits(values)`` fills in the parameters."""

    name: str
    title: str
    plane: str
    clinical_meaning: str
    marker: str  # the sonographic marker the edit imitates
    parameters: dict[str, PresetParameter]
    edit_templates: tuple[dict[str, Any], ...]
    source: str = field(default="built-in", compare=False)  # "built-in" or the file it was read from

    def values(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(self.parameters))
        if unknown:
            known = ", ".join(self.parameters) or "none"
            raise FetalStudioError(f"Preset {self.name} has no parameter {', '.join(unknown)} (its parameters: {known}).")
        return {name: overrides.get(name, parameter.default) for name, parameter in self.parameters.items()}

    def edits(self, overrides: dict[str, Any] | None = None) -> list[Edit]:
        """The preset's edits with the parameters filled in (defaults unless overridden)."""
        values = self.values(overrides)
        edits = []
        for i, template in enumerate(self.edit_templates):
            filled = {key: values[value[1:]] if isinstance(value, str) and value.startswith("$") else value
                      for key, value in template.items()}
            edit = edit_from_dict(filled, f"preset {self.name}, edit {i + 1}")
            try:
                structure(self.plane, edit.structure)
            except ValueError as error:
                raise FetalStudioError(f"preset {self.name}, edit {i + 1}: {error}") from None
            edits.append(edit)
        return edits

    def needed_structures(self, overrides: dict[str, Any] | None = None) -> list[str]:
        """The structures the preset changes, which the layout must have."""
        needed: list[str] = []
        for edit in self.edits(overrides):
            if not isinstance(edit, Add) and edit.structure not in needed:
                needed.append(edit.structure)
        return needed

    def check_layout(self, layout: Layout, overrides: dict[str, Any] | None = None) -> None:
        if layout.plane != self.plane:
            raise FetalStudioError(f"Preset {self.name} is for the {self.plane} plane; this layout is {layout.plane}.")
        missing = [name for name in self.needed_structures(overrides) if not layout.has(name)]
        if missing:
            present = ", ".join(layout.structure_names()) or "none"
            raise FetalStudioError(f"Preset {self.name} needs {', '.join(missing)}, which this layout lacks (it has: "
                                   f"{present}). Add the box (or detect the structures) first, or choose another preset.")

    def apply(self, layout: Layout, overrides: dict[str, Any] | None = None) -> Layout:
        """The layout after the preset's edits."""
        self.check_layout(layout, overrides)
        for edit in self.edits(overrides):
            layout = edit.apply(layout)
        return layout

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": PRESET_SCHEMA, "version": PRESET_VERSION, "name": self.name, "title": self.title,
            "plane": self.plane, "clinical_meaning": self.clinical_meaning, "marker": self.marker,
            "parameters": {k: {"default": p.default, "description": p.description} for k, p in self.parameters.items()},
            "edits": [dict(t) for t in self.edit_templates],
        }


def preset_from_dict(data: Any, where: str) -> Preset:
    """A validated preset; every problem is a FetalStudioError starting with ``where`` (the file)."""
    def fail(problem: str) -> FetalStudioError:
        return FetalStudioError(f"{where}: {problem}")

    if not isinstance(data, dict) or data.get("schema") != PRESET_SCHEMA:
        raise fail(f"not a FetalStudio preset (\"schema\" must be {PRESET_SCHEMA!r}).")
    if data.get("version") != PRESET_VERSION:
        raise fail(f"preset version {data.get('version')!r}; this FetalStudio reads version {PRESET_VERSION} "
                   "(a newer FetalStudio wrote it, or set \"version\": 1).")
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise fail(f"lacks {', '.join(missing)}; a preset needs {', '.join(_REQUIRED)}.")
    name = data["name"]
    if not isinstance(name, str) or not _NAME.match(name):
        raise fail(f"name {name!r} must be lower-case letters, digits and _ (e.g. enlarged_thalami).")
    try:
        plane = anatomy_plane(data["plane"]).name
    except ValueError as error:
        raise fail(str(error)) from None
    raw_parameters = data.get("parameters", {})
    if not isinstance(raw_parameters, dict):
        raise fail("parameters must be an object of {name: {\"default\": value, \"description\": text}}.")
    parameters = {}
    for key, spec in raw_parameters.items():
        if not isinstance(spec, dict) or "default" not in spec:
            raise fail(f"parameter {key} needs a \"default\" (and a \"description\").")
        parameters[key] = PresetParameter(spec["default"], str(spec.get("description", "")))
    edits = data["edits"]
    if not isinstance(edits, list) or not edits or not all(isinstance(e, dict) for e in edits):
        raise fail("edits must be a non-empty list of edit objects ({\"op\": ..., \"structure\": ...}).")
    for i, template in enumerate(edits):
        for value in template.values():
            if isinstance(value, str) and value.startswith("$") and value[1:] not in parameters:
                raise fail(f"edit {i + 1} uses {value} but the preset declares no parameter {value[1:]!r}.")
    preset = Preset(name, str(data["title"]), plane, str(data["clinical_meaning"]), str(data["marker"]), parameters,
                    tuple(dict(e) for e in edits), source=where)
    try:
        preset.edits()  # the defaults must make valid edits of known structures
    except FetalStudioError as error:
        raise fail(str(error).removeprefix(f"preset {name}, ")) from None
    return preset


def read_preset(path: Path) -> Preset:
    path = Path(path)
    return preset_from_dict(read_json(path, " (a preset JSON file was expected)"), str(path))


@dataclass(frozen=True)
class PresetCatalog:
    """The presets found (built-in first, then the user's) and the user files that were refused."""

    presets: dict[str, Preset]
    problems: tuple[str, ...] = ()

    def get(self, name: str) -> Preset:
        if name not in self.presets:
            raise FetalStudioError(f"Unknown preset {name!r}. Choose one of: {', '.join(self.presets)}.")
        return self.presets[name]


def load_presets(user_folder: Path | None = None) -> PresetCatalog:
    """The built-in presets plus the ``*.json`` presets in ``user_folder`` (default ``user_presets_dir()``;
    a missing folder has none). A broken or clashing user file becomes a problem, not an exception;
    a broken built-in file is a bug and raises."""
    presets = {}
    for path in sorted(BUILTIN_PRESETS_DIR.glob("*.json")):
        preset = read_preset(path)
        presets[preset.name] = Preset(**{**preset.__dict__, "source": "built-in"})
    folder = Path(user_folder) if user_folder is not None else user_presets_dir()
    problems = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            preset = read_preset(path)
        except FetalStudioError as error:
            problems.append(str(error))
            continue
        if preset.name in presets:
            problems.append(f"{path}: preset name {preset.name!r} is already taken by {presets[preset.name].source}; "
                            "rename it.")
            continue
        presets[preset.name] = preset
    return PresetCatalog(presets, tuple(problems))
