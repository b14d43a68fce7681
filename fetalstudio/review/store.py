"""A review session: one folder holding image+mask pairs and every decision and edit made on them.

Layout (paths relative to the session folder)::

    session.json            name, created, schema version, settings (channel order, generation ...)
    images/<id>.png         grayscale uint8 image
    raw_masks/<id>.png      the raw mask channel or imported annotation (uint8), when there is one
    masks/<id>.r<rev>.png   filled binary mask (0/255) made at revision <rev> of the item
    items/<id>.json         the item: file names, ellipse, quality, decision, source, undo/redo ...
    cursor.json             the item the reviewer is on and the filter in use
    log.jsonl               append-only action log, one JSON object per line
    .lock                   inter-process lock file (fcntl.flock)

Crash safety: every file is written atomically (``fetalstudio.imaging.files``: a temporary file in
the same folder, flushed, fsynced and renamed over its target, then the folder fsynced). A mask
file that an item (or its undo/redo history) refers to is never overwritten: each revision gets a
new file (revisions only grow), written *before* the item JSON that points to it, so a crash at any
point leaves each item JSON either in its old or its new state, always pointing at complete files.
Files no item points to (a crash between the two writes, undo states past the undo limit) and
temporary files are removed when the session is opened. The log is appended after the item JSON
is written; a crash can lose at most the log line of the last action, never the action.

Concurrency: every read-modify-write holds a per-folder re-entrant thread lock (shared by all
``ReviewSession`` objects of a folder in this process) and an exclusive ``flock`` on ``.lock``
(other processes). Reads take no lock: a file is always either the old or the new version.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from fetalstudio.errors import FetalStudioError, disk_full_error, is_disk_full
from fetalstudio.imaging.biometry import head_biometry
from fetalstudio.imaging.ellipse import Ellipse
from fetalstudio.imaging.files import (
    LOCK_FILE, TEMP_SUFFIX, append_line, atomic_write_bytes, atomic_write_json, folder_lock, json_text, png_bytes,
    read_gray_png, read_json,
)
from fetalstudio.imaging.masks import binary_mask, size_text

SESSION_FORMAT = "fetalstudio-review-session"
SCHEMA_VERSION = 1
DECISIONS = ("pending", "accepted", "rejected", "edited")
#: Decisions a reviewer sets directly; "edited" comes from a mask correction (set_mask).
DIRECT_DECISIONS = ("pending", "accepted", "rejected")
UNDO_LIMIT = 20
DEFAULT_USER = "reviewer"

SESSION_FILE = "session.json"
CURSOR_FILE = "cursor.json"
LOG_FILE = "log.jsonl"
IMAGES_DIR = "images"
RAW_MASKS_DIR = "raw_masks"
MASKS_DIR = "masks"
ITEMS_DIR = "items"
DATA_DIRS = (IMAGES_DIR, RAW_MASKS_DIR, MASKS_DIR)
#: The item fields an undo/redo step restores.
STATE_FIELDS = ("mask", "ellipse", "quality", "reason", "threshold", "decision", "decided_by", "decided_at", "how")
_ITEM_ID = re.compile(r"\d{1,12}")
ELLIPSE_FIELDS = ("center_x", "center_y", "axis_a", "axis_b", "angle_deg")
#: What a file error adds: session files are only written by this module.
EDITED_BY_HAND = "; the review session may have been changed by hand"


# --- items ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReviewItem:
    """One image+mask pair as stored in ``items/<id>.json``. File names are relative to the session.

    ``how`` says where the current mask came from ("extractor", "import", "ellipse", "threshold",
    "brush", "segmenter", ...). ``undo_stack``/``redo_stack`` hold earlier states (the
    STATE_FIELDS, JSON-ready), most recent last.
    """

    id: str
    image: str
    raw_mask: str | None
    mask: str | None
    width: int
    height: int
    ellipse: Ellipse | None = None
    quality: float | None = None
    reason: str | None = None
    threshold: int | None = None
    decision: str = "pending"
    decided_by: str | None = None
    decided_at: str | None = None
    source: dict[str, Any] = field(default_factory=dict)
    biometry: dict[str, float | None] | None = None
    revision: int = 0
    how: str | None = None
    created_at: str = ""
    undo_stack: tuple[dict[str, Any], ...] = ()
    redo_stack: tuple[dict[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["undo_stack"] = list(self.undo_stack)
        data["redo_stack"] = list(self.redo_stack)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ReviewItem:
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        values["ellipse"] = _ellipse_from_json(values.get("ellipse"))
        values["undo_stack"] = tuple(values.get("undo_stack") or ())
        values["redo_stack"] = tuple(values.get("redo_stack") or ())
        return cls(**values)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of the image and its masks."""
        return self.height, self.width

    def state(self) -> dict[str, Any]:
        """The part of the item that undo/redo restores, JSON-ready."""
        data = {name: getattr(self, name) for name in STATE_FIELDS}
        data["ellipse"] = None if self.ellipse is None else asdict(self.ellipse)
        return data


def _ellipse_from_json(value: Ellipse | dict | None) -> Ellipse | None:
    """An Ellipse of floats (as it reads back from JSON) from an Ellipse, its dict or None."""
    if value is None:
        return None
    values = asdict(value) if isinstance(value, Ellipse) else value
    numbers = {name: float(values[name]) for name in ELLIPSE_FIELDS}
    if not all(np.isfinite(v) for v in numbers.values()):
        raise FetalStudioError(f"The ellipse has a value that is not a finite number: {numbers}.")
    return Ellipse(**numbers)


def _pixel_size(source: dict[str, Any]) -> float | None:
    try:
        value = float(source.get("pixel_size_mm"))
    except (TypeError, ValueError):
        return None
    return value if value > 0 and np.isfinite(value) else None


def _biometry(ellipse: Ellipse | None, source: dict[str, Any]) -> dict[str, float | None] | None:
    return None if ellipse is None else head_biometry(ellipse, _pixel_size(source)).as_dict()


def _summary(item: ReviewItem | None) -> dict[str, Any] | None:
    """What the log records of an item's state before/after an action."""
    if item is None:
        return None
    ellipse = None if item.ellipse is None else asdict(item.ellipse)
    return {"decision": item.decision, "revision": item.revision, "mask": item.mask, "how": item.how, "ellipse": ellipse}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _id_key(item_id: str) -> tuple[int, str]:
    return len(item_id), item_id


# --- arrays ---------------------------------------------------------------------------------
def _check_image(gray: np.ndarray) -> np.ndarray:
    array = np.asarray(gray)
    if array.ndim != 2 or array.dtype != np.uint8 or array.size == 0:
        raise FetalStudioError(
            f"The image must be a 2-D grayscale uint8 array (rows x columns), not {array.dtype} with shape {array.shape}. "
            "Convert colour images to grayscale first."
        )
    return array


def _check_raw_mask(raw_mask: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray | None:
    if raw_mask is None:
        return None
    array = np.asarray(raw_mask)
    if array.ndim != 2 or array.dtype != np.uint8:
        raise FetalStudioError(f"The raw mask must be a 2-D uint8 array, not {array.dtype} with shape {array.shape}.")
    if array.shape != shape:
        raise FetalStudioError(f"The raw mask is {size_text(array.shape)} pixels but the image is {size_text(shape)}; they must match.")
    return array


def _optional_float(value: float | None) -> float | None:
    """A finite float, or None (for None and NaN, which JSON cannot hold)."""
    return None if value is None or not np.isfinite(float(value)) else float(value)


def _optional_int(value: int | None) -> int | None:
    return None if value is None else int(value)


def _finite(value: Any) -> Any:
    """``value`` with NaN/inf numbers (e.g. empty cells of a table read by pandas) replaced by None."""
    if isinstance(value, dict):
        return {key: _finite(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (float, np.floating)) and not np.isfinite(value):
        return None
    return value


# --- the session ----------------------------------------------------------------------------
class ReviewSession:
    """A review session folder. Use ``create``, ``open`` or ``open_or_create``.

    Every method that changes something writes it to disk before it returns; objects for the
    same folder (threads, processes) see each other's changes on their next read.
    """

    def __init__(self, folder: Path, meta: dict[str, Any]):
        self._folder = Path(folder)
        self._meta = meta
        self._lock = folder_lock(self._folder)

    # -- creating and opening ----------------------------------------------------------------
    @classmethod
    def create(cls, folder: str | Path, name: str | None = None, settings: dict[str, Any] | None = None) -> ReviewSession:
        """A new session in ``folder`` (created, or an existing empty folder)."""
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise FetalStudioError(f"{folder} is a file, not a folder; pick a new or empty folder for the review session.")
        if (folder / SESSION_FILE).exists():
            raise FetalStudioError(f"{folder} already holds a review session; open it instead, or pick a new folder.")
        try:
            return cls._create(folder, name, settings)
        except OSError as error:
            if not is_disk_full(error):
                raise
            raise disk_full_error(folder, "No session was created there (an empty folder may be left; it can be reused).") from error

    @classmethod
    def _create(cls, folder: Path, name: str | None, settings: dict[str, Any] | None) -> ReviewSession:
        folder.mkdir(parents=True, exist_ok=True)
        with folder_lock(folder).hold():
            if (folder / SESSION_FILE).exists():
                raise FetalStudioError(f"{folder} already holds a review session; open it instead, or pick a new folder.")
            if not _is_empty_skeleton(folder):
                raise FetalStudioError(
                    f"{folder} is not empty and is not a review session; pick a new or empty folder (nothing in it was changed)."
                )
            for sub in (*DATA_DIRS, ITEMS_DIR):
                (folder / sub).mkdir(exist_ok=True)
            meta = {
                "format": SESSION_FORMAT,
                "schema_version": SCHEMA_VERSION,
                "name": name or folder.resolve().name,
                "created": _now(),
                "settings": dict(settings or {}),
            }
            atomic_write_json(folder / SESSION_FILE, meta)  # last: a folder with session.json is complete
        return cls(folder, meta)

    @classmethod
    def open(cls, folder: str | Path, recover: bool = True) -> ReviewSession:
        """An existing session. With ``recover`` files left by a crash (temporary, unreferenced) are
        removed: this reads every item, so a handler that reopens the session on each click may
        pass False (leftovers are harmless; they only take disk space)."""
        folder = Path(folder)
        meta = _read_session_meta(folder)
        session = cls(folder, meta)
        if recover:
            with session._lock.hold():
                for sub in (*DATA_DIRS, ITEMS_DIR):
                    (folder / sub).mkdir(exist_ok=True)
                session._remove_leftovers()
        return session

    @classmethod
    def open_or_create(cls, folder: str | Path, name: str | None = None, settings: dict[str, Any] | None = None) -> ReviewSession:
        """Open the session in ``folder``, or create it there (``name``/``settings`` only apply to a new one)."""
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            return cls.create(folder, name=name, settings=settings)  # says why it cannot be
        folder.mkdir(parents=True, exist_ok=True)
        with folder_lock(folder).hold():  # two processes opening a new folder at once: one creates it
            if (folder / SESSION_FILE).exists():
                return cls.open(folder)
            return cls.create(folder, name=name, settings=settings)

    # -- properties ----------------------------------------------------------------------------
    @property
    def folder(self) -> Path:
        return self._folder

    @property
    def name(self) -> str:
        return str(self._meta["name"])

    @property
    def created(self) -> str:
        return str(self._meta.get("created", ""))

    @property
    def settings(self) -> dict[str, Any]:
        """A copy of the session settings as stored (reads session.json, so other writers' updates show)."""
        self._meta = _read_session_meta(self._folder)
        return json.loads(json_text(self._meta.get("settings", {})))

    def update_settings(self, values: dict[str, Any]) -> dict[str, Any]:
        """Merge ``values`` into the settings and save them; returns the new settings."""
        with self._lock.hold(), self._disk_full_guard("The session settings were not changed."):
            meta = _read_session_meta(self._folder)
            meta["settings"] = {**meta.get("settings", {}), **values}
            atomic_write_json(self._folder / SESSION_FILE, meta)
            self._meta = meta
        return self.settings

    def __repr__(self) -> str:
        return f"ReviewSession({str(self._folder)!r}, name={self.name!r})"

    @contextmanager
    def locked(self) -> Iterator[ReviewSession]:
        """Hold the session's lock (threads and processes) across a read and the change based on it,
        e.g. ``with session.locked(): session.set_mask(i, edit(session.load_mask(i)), how="brush")``."""
        with self._lock.hold():
            yield self

    # -- reading -------------------------------------------------------------------------------
    def _item_ids(self) -> list[str]:
        names = (path.stem for path in (self._folder / ITEMS_DIR).glob("*.json") if not path.name.startswith("."))
        return sorted((n for n in names if _ITEM_ID.fullmatch(n)), key=_id_key)

    def __len__(self) -> int:
        return len(self._item_ids())

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, str) and bool(_ITEM_ID.fullmatch(item_id)) and self._item_path(item_id).is_file()

    def _item_path(self, item_id: str) -> Path:
        return self._folder / ITEMS_DIR / f"{item_id}.json"

    def get(self, item_id: str | ReviewItem) -> ReviewItem:
        """The item with this id as it is on disk now (an unknown id is a FetalStudioError)."""
        item_id = item_id.id if isinstance(item_id, ReviewItem) else str(item_id)
        if item_id not in self:
            raise FetalStudioError(f"There is no item {item_id!r} in the review session {self._folder}.")
        return ReviewItem.from_json(read_json(self._item_path(item_id), EDITED_BY_HAND))

    def items(self, decision: str | None = None) -> list[ReviewItem]:
        """All items sorted by id, or those with one decision."""
        if decision is not None:
            _check_decision(decision, DECISIONS)
        items = [ReviewItem.from_json(read_json(self._item_path(item_id), EDITED_BY_HAND)) for item_id in self._item_ids()]
        return items if decision is None else [item for item in items if item.decision == decision]

    def counts(self) -> dict[str, int]:
        """Number of items per decision, and "total"."""
        counts = dict.fromkeys(DECISIONS, 0)
        for item in self.items():
            counts[item.decision] = counts.get(item.decision, 0) + 1
        counts["total"] = sum(counts.values())
        return counts

    def file_path(self, relative: str) -> Path:
        return self._folder / relative

    def image_path(self, item: str | ReviewItem) -> Path:
        return self.file_path(self._as_item(item).image)

    def mask_path(self, item: str | ReviewItem) -> Path | None:
        item = self._as_item(item)
        return None if item.mask is None else self.file_path(item.mask)

    def load_image(self, item: str | ReviewItem) -> np.ndarray:
        """The grayscale uint8 image."""
        return read_gray_png(self.image_path(item), EDITED_BY_HAND)

    def load_raw_mask(self, item: str | ReviewItem) -> np.ndarray | None:
        """The raw mask channel / imported annotation (uint8), None when the item has none."""
        item = self._as_item(item)
        return None if item.raw_mask is None else read_gray_png(self.file_path(item.raw_mask), EDITED_BY_HAND)

    def load_mask(self, item: str | ReviewItem) -> np.ndarray | None:
        """The current filled mask as a boolean array, None when the item has no mask."""
        path = self.mask_path(item)
        return None if path is None else read_gray_png(path, EDITED_BY_HAND) > 127

    def _as_item(self, item: str | ReviewItem) -> ReviewItem:
        return item if isinstance(item, ReviewItem) else self.get(item)

    # -- adding ----------------------------------------------------------------------------------
    def add_item(
        self,
        gray: np.ndarray,
        raw_mask: np.ndarray | None,
        *,
        source: dict[str, Any] | None = None,
        mask: np.ndarray | None = None,
        ellipse: Ellipse | None = None,
        quality: float | None = None,
        reason: str | None = None,
        threshold: int | None = None,
        how: str = "extractor",
        user: str = DEFAULT_USER,
    ) -> ReviewItem:
        """Store a new pending pair; its id is the next free number ("000001", ...).

        ``gray``: 2-D uint8 image. ``raw_mask``: the raw mask channel or imported annotation
        (2-D uint8, same size) or None. ``mask``: the filled head mask (bool, 0/1 or 0/255, same
        size) or None when extraction failed (say why in ``reason``). ``source``: JSON-ready
        metadata (prompt, seed, trimester, sampler, steps, model, lora, lora_weight, origin,
        pixel_size_mm, ...); ``pixel_size_mm`` there gives the biometry in mm.
        """
        image = _check_image(gray)
        raw = _check_raw_mask(raw_mask, image.shape)
        filled = None if mask is None else binary_mask(mask, image.shape)
        source = json.loads(json_text(_finite(dict(source or {}))))  # JSON-ready now, not half-way through the writes
        ellipse = _ellipse_from_json(ellipse)
        encoded = {name: None if array is None else png_bytes(array) for name, array in (("image", image), ("raw", raw), ("mask", filled))}
        with self._lock.hold(), self._disk_full_guard("This new pair was not added."):
            item_id = self._next_id()
            item = ReviewItem(
                id=item_id,
                image=f"{IMAGES_DIR}/{item_id}.png",
                raw_mask=None if raw is None else f"{RAW_MASKS_DIR}/{item_id}.png",
                mask=None if filled is None else _mask_name(item_id, 0),
                width=int(image.shape[1]),
                height=int(image.shape[0]),
                ellipse=ellipse,
                quality=_optional_float(quality),
                reason=reason,
                threshold=_optional_int(threshold),
                source=source,
                how=None if filled is None else how,
                created_at=_now(),
            )
            atomic_write_bytes(self.file_path(item.image), encoded["image"])
            if item.raw_mask is not None:
                atomic_write_bytes(self.file_path(item.raw_mask), encoded["raw"])
            if item.mask is not None:
                atomic_write_bytes(self.file_path(item.mask), encoded["mask"])
            item = self._commit(item, None, "add", user)
        return item

    def _next_id(self) -> str:
        """Called under the lock: one more than the largest id on disk."""
        ids = self._item_ids()
        return f"{(int(ids[-1]) + 1) if ids else 1:06d}"

    # -- decisions and edits -----------------------------------------------------------------
    def decide(self, item_id: str, decision: str, user: str = DEFAULT_USER) -> ReviewItem:
        """Accept, reject or reset (pending) an item. Undoable; deciding the same again changes nothing."""
        _check_decision(decision, DIRECT_DECISIONS)
        with self._lock.hold(), self._disk_full_guard(f"This decision ({decision}) on item {item_id} was not saved."):
            item = self.get(item_id)
            if decision == item.decision:
                return item
            if decision == "accepted" and item.mask is None:
                raise FetalStudioError(
                    f"Item {item.id} has no mask ({item.reason or 'extraction failed'}): correct it (ellipse, threshold, brush) "
                    "or reject it; an item without a mask cannot be accepted."
                )
            decided = (user, _now()) if decision != "pending" else (None, None)
            changed = _with_undo(item, replace(item, decision=decision, decided_by=decided[0], decided_at=decided[1]))
            changed = self._commit(changed, item, f"decide:{decision}", user)
        return changed

    def set_mask(
        self,
        item_id: str,
        mask: np.ndarray,
        *,
        ellipse: Ellipse | None = None,
        quality: float | None = None,
        reason: str | None = None,
        threshold: int | None = None,
        how: str,
        user: str = DEFAULT_USER,
    ) -> ReviewItem:
        """A corrected mask (``how``: "ellipse", "threshold", "brush", "segmenter", ...).

        The keywords describe the *new* mask (None: not applicable, e.g. no ellipse after a brush
        edit). The decision becomes "edited"; the previous state can be restored with ``undo``.
        """
        if not how or not isinstance(how, str):
            raise FetalStudioError("set_mask needs how= (e.g. 'ellipse', 'threshold', 'brush', 'segmenter').")
        shape = self.get(item_id).shape
        encoded = png_bytes(binary_mask(mask, shape))
        ellipse = _ellipse_from_json(ellipse)
        with self._lock.hold(), self._disk_full_guard(f"This {how} correction of item {item_id} was not saved."):
            item = self.get(item_id)
            revision = item.revision + 1
            mask_name = _mask_name(item.id, revision)
            atomic_write_bytes(self.file_path(mask_name), encoded)  # before the item JSON that points to it
            edited = replace(
                item, mask=mask_name, ellipse=ellipse, quality=_optional_float(quality), reason=reason,
                threshold=_optional_int(threshold), decision="edited", decided_by=user,
                decided_at=_now(), how=how,
            )
            changed = _with_undo(item, edited)
            changed = self._commit(changed, item, f"set_mask:{how}", user)
        return changed

    def can_undo(self, item_id: str) -> bool:
        return bool(self.get(item_id).undo_stack)

    def can_redo(self, item_id: str) -> bool:
        return bool(self.get(item_id).redo_stack)

    def undo(self, item_id: str, user: str = DEFAULT_USER) -> ReviewItem:
        """Restore the state before the item's last decision or mask edit (mask, ellipse, decision)."""
        with self._lock.hold(), self._disk_full_guard(f"The undo on item {item_id} was not saved."):
            item = self.get(item_id)
            if not item.undo_stack:
                raise FetalStudioError(f"Nothing to undo for item {item.id}: it has no earlier decision or edit.")
            restored = _restore(item, item.undo_stack[-1])
            changed = replace(restored, undo_stack=item.undo_stack[:-1], redo_stack=(*item.redo_stack, item.state()))
            changed = self._commit(changed, item, "undo", user)
        return changed

    def redo(self, item_id: str, user: str = DEFAULT_USER) -> ReviewItem:
        """Re-apply the last undone decision or edit."""
        with self._lock.hold(), self._disk_full_guard(f"The redo on item {item_id} was not saved."):
            item = self.get(item_id)
            if not item.redo_stack:
                raise FetalStudioError(f"Nothing to redo for item {item.id}: nothing was undone since its last change.")
            restored = _restore(item, item.redo_stack[-1])
            undo_stack = (*item.undo_stack, item.state())[-UNDO_LIMIT:]
            changed = replace(restored, undo_stack=undo_stack, redo_stack=item.redo_stack[:-1])
            changed = self._commit(changed, item, "redo", user)
        return changed

    def _commit(self, item: ReviewItem, before: ReviewItem | None, action: str, user: str) -> ReviewItem:
        """Write the item JSON (revision one past ``before``'s, biometry from its ellipse), then its
        log line; returns what was written."""
        item = replace(item, biometry=_biometry(item.ellipse, item.source))
        if before is not None:
            item = replace(item, revision=before.revision + 1)
        atomic_write_json(self._item_path(item.id), item.to_json())
        try:
            self._log(action, item.id, user, _summary(before), _summary(item))
        except OSError as error:
            if not is_disk_full(error):
                raise
            raise disk_full_error(self._folder, (
                f"Item {item.id}'s change ({action}) was saved; only its line in the action log ({LOG_FILE}) was not. "
                f"{self._kept_sentence()}")) from error
        return item

    @contextmanager
    def _disk_full_guard(self, not_saved: str) -> Iterator[None]:
        """A full disk during the writes inside: a DiskFullError naming the folder, what was not saved and
        what is. The writes are atomic and ordered (see the module), so nothing is left half-written."""
        try:
            yield
        except OSError as error:
            if not is_disk_full(error):
                raise
            raise disk_full_error(self._folder, f"{not_saved} {self._kept_sentence()}") from error

    def _kept_sentence(self) -> str:
        try:
            items = self.items()
        except FetalStudioError:
            return "Everything saved before is kept."
        decided = sum(item.decision != "pending" for item in items)
        return (f"Everything before it is kept: {len(items)} pair{'s' if len(items) != 1 else ''}, {decided} of them "
                "accepted, rejected or edited.")

    # -- cursor and log ----------------------------------------------------------------------------
    def set_cursor(self, item_id: str | None, decision_filter: str | None = None) -> None:
        """Remember the item on screen and the filter in use, so that reopening resumes there."""
        if decision_filter is not None:
            _check_decision(decision_filter, DECISIONS)
        if item_id is not None and item_id not in self:
            raise FetalStudioError(f"There is no item {item_id!r} in the review session {self._folder}.")
        with self._lock.hold(), self._disk_full_guard("Only the position in the session (which item is shown) was not remembered."):
            atomic_write_json(self._folder / CURSOR_FILE, {"item": item_id, "filter": decision_filter, "time": _now()})

    def cursor(self) -> tuple[str | None, str | None]:
        """(item id, decision filter) last set, (None, None) before any."""
        path = self._folder / CURSOR_FILE
        if not path.is_file():
            return None, None
        data = read_json(path, EDITED_BY_HAND)
        return data.get("item"), data.get("filter")

    def _log(self, action: str, item_id: str | None, user: str, before: Any, after: Any) -> None:
        entry = {"time": _now(), "user": user, "item": item_id, "action": action, "before": before, "after": after}
        append_line(self._folder / LOG_FILE, json_text(entry, indent=None) + "\n")

    def log_entries(self) -> list[dict[str, Any]]:
        """The action log, oldest first; a line cut short by a crash is skipped."""
        path = self._folder / LOG_FILE
        if not path.is_file():
            return []
        entries = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                entries.append(entry)
        return entries

    # -- crash leftovers ---------------------------------------------------------------------------
    def _remove_leftovers(self) -> list[Path]:
        """Under the lock: delete temporary files and data files that no item refers to."""
        removed = {path for folder in (self._folder, *(self._folder / d for d in (*DATA_DIRS, ITEMS_DIR)))
                   for path in folder.glob(f".*{TEMP_SUFFIX}")}
        referenced = set()
        for item in self.items():
            referenced.update(name for name in (item.image, item.raw_mask, item.mask) if name)
            referenced.update(state["mask"] for state in (*item.undo_stack, *item.redo_stack) if state.get("mask"))
        for data_dir in DATA_DIRS:
            removed.update(path for path in (self._folder / data_dir).iterdir()
                           if path.is_file() and f"{data_dir}/{path.name}" not in referenced)
        for path in removed:
            path.unlink(missing_ok=True)
        return sorted(removed)


# --- helpers of the session ---------------------------------------------------------------------
def _mask_name(item_id: str, revision: int) -> str:
    return f"{MASKS_DIR}/{item_id}.r{revision}.png"


def _check_decision(decision: str, allowed: tuple[str, ...]) -> None:
    if decision in allowed:
        return
    if decision == "edited":
        raise FetalStudioError("'edited' is set by correcting the mask (set_mask); decide() takes pending, accepted or rejected.")
    raise FetalStudioError(f"Unknown decision {decision!r}; use one of: {', '.join(allowed)}.")


def _with_undo(before: ReviewItem, after: ReviewItem) -> ReviewItem:
    """``after`` with ``before``'s state pushed on the undo stack (the last UNDO_LIMIT kept) and no redo."""
    undo_stack = (*before.undo_stack, before.state())[-UNDO_LIMIT:]
    return replace(after, undo_stack=undo_stack, redo_stack=())


def _restore(item: ReviewItem, state: dict[str, Any]) -> ReviewItem:
    values = {name: state.get(name) for name in STATE_FIELDS}
    values["ellipse"] = _ellipse_from_json(values["ellipse"])
    return replace(item, **values)


def _read_session_meta(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise FetalStudioError(f"No review session at {folder}: the folder does not exist. Pick a session folder or create a new session.")
    path = folder / SESSION_FILE
    if not path.is_file():
        raise FetalStudioError(
            f"{folder} is not a review session (it has no {SESSION_FILE}). Pick the folder of a session, or create a new session in an empty folder."
        )
    meta = read_json(path, EDITED_BY_HAND)
    if not isinstance(meta, dict) or meta.get("format") != SESSION_FORMAT:
        raise FetalStudioError(f"{path} is not a FetalStudio review session file. Pick the folder of a session.")
    if int(meta.get("schema_version", 0)) > SCHEMA_VERSION:
        raise FetalStudioError(
            f"{folder} was written by a newer FetalStudio (session schema {meta['schema_version']}, this one reads "
            f"{SCHEMA_VERSION}); update FetalStudio to open it."
        )
    return meta


def _is_empty_skeleton(folder: Path) -> bool:
    """True for an empty folder, or one left by a create() that died before writing session.json."""
    for path in folder.iterdir():
        if path.name == LOCK_FILE:
            continue
        if path.name not in (*DATA_DIRS, ITEMS_DIR) or not path.is_dir() or any(path.iterdir()):
            return False
    return True
