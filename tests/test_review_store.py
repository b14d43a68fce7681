"""Review session store and dataset export: round trips, validation, undo/redo, crash and concurrency safety."""

from __future__ import annotations

import csv
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from fetalstudio.errors import DiskFullError, FetalStudioError
from fetalstudio.imaging.ellipse import Ellipse, fill_outline, fit_ellipse
from fetalstudio.review.export import export_session
from fetalstudio.review.store import DECISIONS, UNDO_LIMIT, ReviewItem, ReviewSession

ROOT = Path(__file__).resolve().parents[1]
HC18 = ROOT.parent / "shared" / "data" / "hc18_heads"
SHAPE = (48, 64)  # rows, columns of the synthetic pairs


# --- helpers -----------------------------------------------------------------------------------
def synthetic_pair(seed: int, shape: tuple[int, int] = SHAPE) -> tuple[np.ndarray, np.ndarray, Ellipse]:
    rng = np.random.default_rng(seed)
    rows, cols = shape
    ellipse = Ellipse(cols / 2 + rng.uniform(-4, 4), rows / 2 + rng.uniform(-3, 3), rng.uniform(10, 16), rng.uniform(7, 10), rng.uniform(0, 180))
    gray = rng.integers(0, 256, size=shape, dtype=np.uint8)
    return gray, ellipse.to_mask(shape), ellipse


def add_synthetic(session: ReviewSession, seed: int, **source) -> ReviewItem:
    gray, mask, ellipse = synthetic_pair(seed)
    return session.add_item(gray, mask.astype(np.uint8) * 255, source={"seed": seed, "prompt": "head", **source}, mask=mask,
                            ellipse=ellipse, quality=0.8, reason=None, threshold=128)


def hc18_rows(count: int = 2) -> list[dict[str, str]]:
    if not (HC18 / "pairs.csv").is_file():
        pytest.skip("shared HC18 data not present")
    with (HC18 / "pairs.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))[:count]


def add_hc18(session: ReviewSession, row: dict[str, str]) -> ReviewItem:
    gray = cv2.imread(str(HC18 / row["image"]), cv2.IMREAD_GRAYSCALE)
    outline = cv2.imread(str(HC18 / row["mask"]), cv2.IMREAD_GRAYSCALE)
    filled = fill_outline(outline)
    return session.add_item(
        gray, outline, source={"origin": row["image"], "trimester": row["trimester"], "pixel_size_mm": float(row["pixel_size_mm"])},
        mask=filled, ellipse=fit_ellipse(filled), quality=1.0, reason=None, threshold=127, how="import",
    )


def shoelace(flat: list[float]) -> float:
    xs, ys = np.asarray(flat[0::2]), np.asarray(flat[1::2])
    return 0.5 * abs(float(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))))


def assert_session_consistent(session: ReviewSession) -> list[ReviewItem]:
    """Every item JSON parses and every mask file it refers to (current, undo, redo) exists and is binary."""
    items = session.items()
    for item in items:
        names = {item.mask} | {state["mask"] for state in (*item.undo_stack, *item.redo_stack)}
        for name in filter(None, names):
            mask = cv2.imread(str(session.folder / name), cv2.IMREAD_UNCHANGED)
            assert mask is not None, f"{name} of item {item.id} is missing or unreadable"
            assert mask.shape == item.shape and set(np.unique(mask)) <= {0, 255}
        assert session.load_image(item).shape == item.shape
    return items


@pytest.fixture
def session(tmp_path) -> ReviewSession:
    return ReviewSession.create(tmp_path / "session", name="heads", settings={"channel_order": "mask,gray,gray"})


# --- create / open -----------------------------------------------------------------------------
def test_create_open_round_trip_with_real_and_synthetic_pairs(session):
    real = [add_hc18(session, row) for row in hc18_rows(2)]
    small = [add_synthetic(session, seed) for seed in range(3)]
    assert [item.id for item in real + small] == ["000001", "000002", "000003", "000004", "000005"]

    reopened = ReviewSession.open(session.folder)
    assert reopened.name == "heads" and reopened.settings == {"channel_order": "mask,gray,gray"}
    assert len(reopened) == 5 and reopened.items() == real + small
    assert reopened.counts() == {"pending": 5, "accepted": 0, "rejected": 0, "edited": 0, "total": 5}
    first = reopened.get("000001")
    gray = cv2.imread(str(HC18 / hc18_rows(1)[0]["image"]), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(reopened.load_image(first), gray)
    np.testing.assert_array_equal(reopened.load_raw_mask(first), cv2.imread(str(HC18 / hc18_rows(1)[0]["mask"]), cv2.IMREAD_GRAYSCALE))
    assert reopened.load_mask(first).dtype == bool
    np.testing.assert_array_equal(reopened.load_mask(first), fill_outline(reopened.load_raw_mask(first)))
    # biometry from the fitted ellipse and the source's pixel size; HC18's reference HC within 1 mm
    assert first.biometry["hc_mm"] == pytest.approx(float(hc18_rows(1)[0]["hc_mm"]), abs=1.0)
    assert first.source["origin"] == hc18_rows(1)[0]["image"] and first.how == "import"
    gray, mask, ellipse = synthetic_pair(0)
    np.testing.assert_array_equal(reopened.load_image(small[0]), gray)
    np.testing.assert_array_equal(reopened.load_mask(small[0]), mask)
    assert small[0].ellipse == ellipse and small[0].biometry["hc_mm"] is None

    settings = reopened.update_settings({"sampler": "euler"})
    assert ReviewSession.open(session.folder).settings == settings == {"channel_order": "mask,gray,gray", "sampler": "euler"}


def test_create_and_open_refuse_wrong_folders(tmp_path, session):
    with pytest.raises(FetalStudioError, match="already holds a review session"):
        ReviewSession.create(session.folder)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FetalStudioError, match="not empty and is not a review session"):
        ReviewSession.create(other)
    with pytest.raises(FetalStudioError, match=f"{other}.*not a review session"):
        ReviewSession.open(other)
    with pytest.raises(FetalStudioError, match="does not exist"):
        ReviewSession.open(tmp_path / "missing")
    assert ReviewSession.open_or_create(session.folder).name == "heads"
    created = ReviewSession.open_or_create(tmp_path / "new", name="fresh")
    assert created.name == "fresh" and len(created) == 0 and created.cursor() == (None, None)


def test_add_item_without_mask_and_validation_errors(session):
    gray, mask, ellipse = synthetic_pair(1)
    failed = session.add_item(gray, np.zeros_like(gray), source={}, mask=None, ellipse=None, quality=None, reason="no contour", threshold=128)
    assert failed.mask is None and session.load_mask(failed) is None and failed.reason == "no contour"
    with pytest.raises(FetalStudioError, match="no mask"):
        session.decide(failed.id, "accepted")
    item = session.add_item(gray, None, source={}, mask=mask.astype(np.uint8), ellipse=ellipse, quality=0.5, reason=None, threshold=100)
    np.testing.assert_array_equal(session.load_mask(item), mask)  # 0/1 stored as 0/255
    assert session.load_raw_mask(item) is None
    table_row = session.add_item(gray, None, source={"pixel_size_mm": float("nan"), "seed": np.int64(7), "lora": ("a",)}, mask=mask,
                                 ellipse=ellipse, quality=np.float32("nan"), reason=None, threshold=np.uint8(90))
    assert (table_row.source, table_row.quality, table_row.threshold) == ({"pixel_size_mm": None, "seed": 7, "lora": ["a"]}, None, 90)
    assert table_row.biometry["hc_mm"] is None and session.get(table_row.id) == table_row
    with pytest.raises(FetalStudioError, match="not a finite number"):
        session.set_mask(item.id, mask, ellipse=Ellipse(1.0, 2.0, float("nan"), 3.0, 0.0), how="ellipse")

    with pytest.raises(FetalStudioError, match="grayscale uint8"):
        session.add_item(gray.astype(np.float32), None, source={}, mask=None, ellipse=None, quality=None, reason=None, threshold=1)
    with pytest.raises(FetalStudioError, match="raw mask is 32x48"):
        session.add_item(gray, np.zeros((48, 32), np.uint8), source={}, mask=None, ellipse=None, quality=None, reason=None, threshold=1)
    with pytest.raises(FetalStudioError, match="mask is 63x48 pixels but its image is 64x48"):
        session.set_mask(item.id, mask[:, :63], how="brush")
    soft = mask.astype(np.uint8) * 255
    soft[10, 10] = 128  # an anti-aliased brush edge or a JPEG artefact
    with pytest.raises(FetalStudioError, match="not binary"):
        session.set_mask(item.id, soft, how="brush")
    with pytest.raises(FetalStudioError, match="Unknown decision 'maybe'"):
        session.decide(item.id, "maybe")
    with pytest.raises(FetalStudioError, match="set_mask"):
        session.decide(item.id, "edited")
    with pytest.raises(FetalStudioError, match="no item '999999'"):
        session.decide("999999", "accepted")
    with pytest.raises(FetalStudioError, match="no item"):
        session.get("../session")
    with pytest.raises(FetalStudioError, match="Unknown decision"):
        session.items("done")
    assert session.get(item.id).revision == 0 and len(session.log_entries()) == 3  # nothing changed by the errors


# --- undo / redo, cursor, log ------------------------------------------------------------------
def test_undo_redo_restores_mask_ellipse_and_decision(session):
    item = add_synthetic(session, 0)
    assert not session.can_undo(item.id) and not session.can_redo(item.id)
    with pytest.raises(FetalStudioError, match="Nothing to undo"):
        session.undo(item.id)
    accepted = session.decide(item.id, "accepted", user="ana")
    assert accepted.decided_by == "ana" and accepted.decided_at.endswith("+00:00")
    assert session.decide(item.id, "accepted") == accepted  # the same decision again: nothing written
    new_mask = np.zeros(SHAPE, bool)
    new_mask[10:30, 20:40] = True
    edited = session.set_mask(item.id, new_mask, how="brush", user="ana")
    assert edited.decision == "edited" and edited.ellipse is None and edited.biometry is None and edited.how == "brush"
    assert edited.mask != item.mask and edited.revision == 2

    undone = session.undo(item.id)
    assert (undone.decision, undone.mask, undone.ellipse, undone.how) == ("accepted", item.mask, item.ellipse, "extractor")
    np.testing.assert_array_equal(session.load_mask(undone), item.ellipse.to_mask(SHAPE))
    assert undone.biometry == item.biometry and session.can_redo(item.id)
    original = session.undo(item.id)
    assert original.decision == "pending" and original.decided_by is None and not session.can_undo(item.id)
    redone = session.redo(item.id)
    assert redone.decision == "accepted"
    redone = session.redo(item.id)
    assert (redone.decision, redone.mask) == ("edited", edited.mask)
    np.testing.assert_array_equal(session.load_mask(redone), new_mask)
    with pytest.raises(FetalStudioError, match="Nothing to redo"):
        session.redo(item.id)

    session.undo(item.id)
    session.decide(item.id, "rejected")  # a new change clears what could be redone
    assert not session.can_redo(item.id)
    assert ReviewSession.open(session.folder).get(item.id) == session.get(item.id)

    for step in range(UNDO_LIMIT + 5):
        session.set_mask(item.id, np.roll(new_mask, step, axis=1), how="brush")
    assert len(session.get(item.id).undo_stack) == UNDO_LIMIT
    reopened = ReviewSession.open(session.folder)  # drops mask files no state refers to any more
    assert len(list((session.folder / "masks").iterdir())) == UNDO_LIMIT + 1
    assert_session_consistent(reopened)


def test_cursor_persists_across_reopen(session):
    items = [add_synthetic(session, seed) for seed in range(3)]
    assert session.cursor() == (None, None)
    session.set_cursor(items[1].id, "pending")
    assert ReviewSession.open(session.folder).cursor() == (items[1].id, "pending")
    session.set_cursor(items[2].id)
    assert ReviewSession.open(session.folder).cursor() == (items[2].id, None)
    with pytest.raises(FetalStudioError, match="no item"):
        session.set_cursor("000042")
    with pytest.raises(FetalStudioError, match="Unknown decision"):
        session.set_cursor(items[0].id, "later")


def test_log_records_actions_and_survives_a_truncated_line(session):
    item = add_synthetic(session, 0)
    session.decide(item.id, "rejected", user="bo")
    entries = session.log_entries()
    assert [e["action"] for e in entries] == ["add", "decide:rejected"]
    assert entries[1]["user"] == "bo" and entries[1]["item"] == item.id
    assert entries[1]["before"]["decision"] == "pending" and entries[1]["after"]["decision"] == "rejected"
    with (session.folder / "log.jsonl").open("a") as handle:
        handle.write('{"time": "2024-01-01T00:00:00+00:00", "user": "x", "it')  # a crash mid-line
    assert len(session.log_entries()) == 2
    session.decide(item.id, "accepted")
    assert [e["action"] for e in session.log_entries()] == ["add", "decide:rejected", "decide:accepted"]


def test_open_removes_crash_leftovers_only(session):
    item = add_synthetic(session, 0)
    edited = session.set_mask(item.id, np.ones(SHAPE, bool), how="threshold")
    orphans = [session.folder / "masks" / f"{item.id}.r9.png", session.folder / "images" / "000007.png",
               session.folder / "items" / ".000001.json.abc.tmp", session.folder / ".session.json.x.tmp"]
    for path in orphans:
        path.write_bytes(b"half")
    assert ReviewSession.open(session.folder, recover=False).get(item.id) == edited
    assert all(path.exists() for path in orphans)
    reopened = ReviewSession.open(session.folder)
    assert not any(path.exists() for path in orphans)
    assert (session.folder / item.mask).is_file() and (session.folder / edited.mask).is_file()  # undo state kept
    assert reopened.get(item.id) == edited and len(reopened) == 1


# --- crash safety ------------------------------------------------------------------------------
class _Killed(BaseException):
    """Stands for the process dying: nothing after it runs (not even except Exception handlers)."""


def _die_at_write(monkeypatch, number: int) -> None:
    """Make the store 'die' just before its ``number``-th file write or log append."""
    import fetalstudio.review.store as store

    calls = [0]

    def counted(real):
        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] == number:
                raise _Killed
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(store, "atomic_write_bytes", counted(store.atomic_write_bytes))
    monkeypatch.setattr(store, "atomic_write_json", counted(store.atomic_write_json))
    monkeypatch.setattr(store, "append_line", counted(store.append_line))


def _write_actions(session: ReviewSession, item: ReviewItem) -> dict:
    """name: (an action on ``item`` of ``session``, its number of writes: files..., item JSON, log line)."""
    gray, mask, ellipse = synthetic_pair(5)
    return {
        "add": (lambda: session.add_item(gray, gray, source={}, mask=mask, ellipse=ellipse, quality=1.0, reason=None, threshold=1), 5),
        "set_mask": (lambda: session.set_mask(item.id, mask, ellipse=ellipse, how="ellipse"), 3),
        "decide": (lambda: session.decide(item.id, "rejected"), 2),
        "undo": (lambda: session.undo(item.id), 2),
        "redo": (lambda: session.redo(item.id), 2),
    }


def test_every_crash_point_leaves_the_old_or_the_new_state(session, monkeypatch):
    """Each action's writes (data files, then the item JSON, then the log): dying before any one of
    them leaves the item as it was (or, once its JSON is written, as it is after the action)."""
    item = add_synthetic(session, 0)
    session.set_mask(item.id, np.ones(SHAPE, bool), how="threshold")
    for name, (action, writes) in _write_actions(session, item).items():
        if name == "redo":
            session.undo(item.id)
        before, count = session.get(item.id), len(session)
        for number in range(1, writes + 1):
            _die_at_write(monkeypatch, number)
            with pytest.raises(_Killed):
                action()
            monkeypatch.undo()
            reopened = ReviewSession.open(session.folder)
            assert_session_consistent(reopened)
            item_written = number == writes  # died before the log line only
            if name == "add":
                assert len(reopened) == count + item_written, (name, number)
                if item_written:  # keep the one added item out of the next rounds' count
                    count += 1
                referenced = {i.image for i in reopened.items()}
                assert {f"images/{p.name}" for p in (session.folder / "images").iterdir()} == referenced
            else:
                now = reopened.get(item.id)
                assert now.revision == before.revision + item_written, (name, number)
                if not item_written:
                    assert now == before, (name, number)
                before = now
            assert not [p for p in session.folder.rglob("*.tmp")]
        action()  # and once for real, so the next action has something to work on


CRASH_CHILD = textwrap.dedent("""
    import json, random, sys
    import numpy as np
    from fetalstudio.imaging.ellipse import Ellipse
    from fetalstudio.review.store import ReviewSession

    session = ReviewSession.open(sys.argv[1])
    rng = random.Random(int(sys.argv[2]))
    ids = [item.id for item in session.items()]
    print("ready", flush=True)
    while True:
        item_id = rng.choice(ids)
        action = rng.choice(["accepted", "rejected", "pending", "mask", "mask", "undo", "redo"])
        try:
            if action == "mask":
                ellipse = Ellipse(rng.uniform(20, 44), rng.uniform(16, 32), rng.uniform(6, 14), rng.uniform(5, 10), rng.uniform(0, 180))
                item = session.set_mask(item_id, ellipse.to_mask((48, 64)), ellipse=ellipse, how="ellipse")
            elif action == "undo":
                item = session.undo(item_id)
            elif action == "redo":
                item = session.redo(item_id)
            else:
                item = session.decide(item_id, action)
        except Exception as error:  # nothing to undo/redo, accepting a mask-less item
            if "Nothing to" not in str(error):
                raise
            continue
        print(json.dumps({"id": item.id, "revision": item.revision, "decision": item.decision, "mask": item.mask}), flush=True)
""")


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def test_decisions_survive_sigkill_at_random_moments(tmp_path, session):
    for seed in range(6):
        add_synthetic(session, seed)
    script = tmp_path / "crash_child.py"
    script.write_text(CRASH_CHILD)
    rng = np.random.default_rng(0)
    completed = 0
    for round_ in range(5):
        child = subprocess.Popen([sys.executable, str(script), str(session.folder), str(round_)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=_child_env())
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        time.sleep(rng.uniform(0.2, 0.6))
        child.send_signal(signal.SIGKILL)
        out, err = child.communicate()
        assert child.returncode == -signal.SIGKILL, err
        reported: dict[str, dict] = {}
        for line in out.splitlines():
            try:
                done = json.loads(line)
            except ValueError:  # the last line may be cut by the kill
                continue
            reported[done["id"]] = done
            completed += 1

        reopened = ReviewSession.open(session.folder)
        items = {item.id: item for item in assert_session_consistent(reopened)}
        assert len(items) == 6
        for item_id, done in reported.items():
            on_disk = items[item_id]
            # the child may have written one more change of this item and died before printing it
            assert on_disk.revision in (done["revision"], done["revision"] + 1), (done, on_disk)
            if on_disk.revision == done["revision"]:
                assert (on_disk.decision, on_disk.mask) == (done["decision"], done["mask"])
        entries = reopened.log_entries()
        assert all(entry["action"] for entry in entries)
        leftovers = [p for p in session.folder.rglob("*") if p.name.endswith(".tmp")]
        assert leftovers == []
    assert completed >= 5  # the kills did land in the middle of real work


# --- concurrency -------------------------------------------------------------------------------
def test_two_threads_write_the_same_session(session):
    shared = add_synthetic(session, 99)
    errors: list[BaseException] = []

    def writer(name: str) -> None:
        try:
            for index in range(8):
                item = add_synthetic(session, index, writer=name)
                session.decide(item.id, "accepted" if name == "a" else "rejected", user=name)
                session.set_mask(shared.id, np.roll(shared.ellipse.to_mask(SHAPE), index, axis=0), how=f"brush-{name}", user=name)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    items = assert_session_consistent(ReviewSession.open(session.folder))
    assert len(items) == 17 and len({item.id for item in items}) == 17
    by_writer = {name: [i for i in items if i.source.get("writer") == name] for name in ("a", "b")}
    assert [i.decision for i in by_writer["a"]] == ["accepted"] * 8 and [i.decision for i in by_writer["b"]] == ["rejected"] * 8
    assert session.get(shared.id).revision == 16  # no edit of the shared item lost
    assert len(session.log_entries()) == 1 + 16 * 3


PROCESS_CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import numpy as np
    from fetalstudio.review.store import ReviewSession

    folder, name, shared = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    session = ReviewSession.open(folder)
    print("ready", flush=True)
    while not (folder.parent / "go").exists():
        time.sleep(0.005)
    for index in range(10):
        gray = np.full((32, 40), index, np.uint8)
        mask = np.zeros((32, 40), bool)
        mask[5:20, 5 + index:25] = True
        item = session.add_item(gray, None, source={"writer": name, "index": index}, mask=mask, ellipse=None, quality=None, reason=None, threshold=1)
        session.decide(item.id, "accepted", user=name)
        with session.locked():  # the edit is based on the mask read: no other writer in between
            session.set_mask(shared, np.roll(session.load_mask(shared), 1, axis=1), how="brush", user=name)
        session.update_settings({f"{name}-{index}": True})
""")


def test_two_processes_write_the_same_session(tmp_path, session):
    gray = np.zeros((32, 40), np.uint8)
    mask = np.zeros((32, 40), bool)
    mask[8:24, 10:30] = True
    shared = session.add_item(gray, None, source={}, mask=mask, ellipse=None, quality=None, reason=None, threshold=1)
    script = tmp_path / "process_child.py"
    script.write_text(PROCESS_CHILD)
    children = [subprocess.Popen([sys.executable, str(script), str(session.folder), name, shared.id], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=_child_env()) for name in ("p", "q")]
    for child in children:
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
    (tmp_path / "go").touch()
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
    items = assert_session_consistent(ReviewSession.open(session.folder))
    assert len(items) == 21 and len({item.id for item in items}) == 21
    for name in ("p", "q"):
        mine = sorted(item.source["index"] for item in items if item.source.get("writer") == name)
        assert mine == list(range(10))
        assert all(item.decision == "accepted" for item in items if item.source.get("writer") == name)
    final = session.get(shared.id)
    assert final.revision == 20  # every read-modify-write of the shared item kept
    np.testing.assert_array_equal(session.load_mask(final), np.roll(mask, 20, axis=1))
    assert sum(1 for key in session.settings if "-" in key) == 20
    assert len(session.log_entries()) == 1 + 20 * 3


# --- export ------------------------------------------------------------------------------------
def _reviewed_session(session: ReviewSession) -> dict[str, ReviewItem]:
    real = [add_hc18(session, row) for row in hc18_rows(2)]
    small = [add_synthetic(session, seed, trimester="second", sampler="euler", steps=20, model="tiny", lora=["a", "b"], lora_weight=[1.0, 0.5])
             for seed in range(4)]
    brush = np.zeros(SHAPE, bool)
    brush[5:25, 8:30] = True
    brush[30:40, 40:60] = True  # two regions: COCO gets two contour polygons
    return {
        "real_accepted": session.decide(real[0].id, "accepted", user="ana"),
        "real_edited": session.set_mask(real[1].id, np.roll(session.load_mask(real[1]), 15, axis=1),
                                        ellipse=replace(real[1].ellipse, center_x=real[1].ellipse.center_x + 15),
                                        how="ellipse", user="ana"),
        "small_accepted": session.decide(small[0].id, "accepted"),
        "small_brush": session.set_mask(small[1].id, brush, how="brush"),
        "rejected": session.decide(small[2].id, "rejected"),
        "pending": small[3],
    }


def test_export_all_formats_round_trip(tmp_path, session):
    reviewed = _reviewed_session(session)
    exported = [reviewed[key] for key in ("real_accepted", "real_edited", "small_accepted", "small_brush")]
    calls = []
    out = tmp_path / "export"
    result = export_session(session, out, formats=("folder", "nnunet", "coco"), progress=lambda done, total: calls.append((done, total)))
    assert result.exported == 4 and result.counts == {"accepted": 2, "edited": 2} and result.skipped == []
    assert calls[-1] == (12, 12) and len(calls) == 12
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]  # no partial folder left

    # folder: images, masks, metadata.csv
    with (out / "metadata.csv").open(newline="") as handle:
        rows = {row["id"]: row for row in csv.DictReader(handle)}
    assert sorted(rows) == sorted(item.id for item in exported)
    for item in exported:
        row = rows[item.id]
        np.testing.assert_array_equal(cv2.imread(str(out / row["image"]), cv2.IMREAD_UNCHANGED), session.load_image(item))
        mask = cv2.imread(str(out / row["mask"]), cv2.IMREAD_UNCHANGED)
        assert set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask > 0, session.load_mask(item))
        assert (row["decision"], row["subject_group"], row["decided_by"]) == (item.decision, item.id, item.decided_by or "")
    real = rows[reviewed["real_accepted"].id]
    assert float(real["center_x"]) == reviewed["real_accepted"].ellipse.center_x
    assert float(real["hc_mm"]) == pytest.approx(float(hc18_rows(1)[0]["hc_mm"]), abs=1.0)
    assert float(real["hc_px"]) * float(real["pixel_size_mm"]) == pytest.approx(float(real["hc_mm"]))
    assert real["source"] == hc18_rows(1)[0]["image"] and real["trimester"] == hc18_rows(1)[0]["trimester"]
    small = rows[reviewed["small_accepted"].id]
    assert (small["seed"], small["sampler"], small["steps"], small["lora"], small["lora_weight"]) == ("0", "euler", "20", "a;b", "1.0;0.5")
    assert rows[reviewed["small_brush"].id]["center_x"] == "" and rows[reviewed["small_brush"].id]["hc_px"] == ""

    # the segmenter's training reads it (grouped by id) and loads every pair
    from fetalstudio.segmentation.scoring import load_example
    from fetalstudio.training.segmenter import split_items

    train, val, held_out = split_items([out / "metadata.csv"], 0.25, 0, None)
    assert len(train) + len(val) == 4 and len(val) == 1 and held_out[out.name] == [val[0].group]
    by_name = {item.name: item for item in train + val}
    image, filled = load_example(by_name[f"images/{reviewed['real_accepted'].id}.png"])
    np.testing.assert_array_equal(filled, session.load_mask(reviewed["real_accepted"]))
    assert by_name[f"images/{reviewed['real_accepted'].id}.png"].pixel_size_mm == pytest.approx(float(hc18_rows(1)[0]["pixel_size_mm"]))

    # nnU-Net v2
    dataset = out / "nnunet" / "Dataset500_heads"
    assert result.paths["nnunet"] == dataset
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "ultrasound"} and meta["labels"] == {"background": 0, "head": 1}
    assert meta["numTraining"] == 4 and meta["file_ending"] == ".png"
    for item in exported:
        label = cv2.imread(str(dataset / "labelsTr" / f"head_{item.id}.png"), cv2.IMREAD_UNCHANGED)
        assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1}
        np.testing.assert_array_equal(label.astype(bool), session.load_mask(item))
        image = cv2.imread(str(dataset / "imagesTr" / f"head_{item.id}_0000.png"), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(image, session.load_image(item))

    # COCO
    coco = json.loads((out / "coco" / "annotations.json").read_text())
    assert coco["categories"] == [{"id": 1, "name": "fetal_head", "supercategory": "anatomy"}]
    images = {image["id"]: image for image in coco["images"]}
    assert len(images) == 4 and len(coco["annotations"]) == 4
    for annotation in coco["annotations"]:
        image = images[annotation["image_id"]]
        item = session.get(image["review_id"])
        mask = session.load_mask(item)
        assert (out / "coco" / "images" / image["file_name"]).is_file() and (image["height"], image["width"]) == mask.shape
        assert annotation["iscrowd"] == 0 and annotation["category_id"] == 1 and annotation["area"] == mask.sum()
        polygon_area = sum(shoelace(polygon) for polygon in annotation["segmentation"])
        assert polygon_area == pytest.approx(mask.sum(), rel=0.12)  # pixel-centre contours of small masks lose ~a half pixel rim
        ys, xs = np.nonzero(mask)
        assert annotation["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        if item.id == reviewed["small_brush"].id:
            assert len(annotation["segmentation"]) == 2
        elif item.source.get("origin"):
            assert len(annotation["segmentation"][0]) == 2 * 90  # the ellipse polygon
            assert polygon_area == pytest.approx(mask.sum(), rel=0.01)

    # a second export replaces the first one, atomically
    again = export_session(session, out, formats=("coco",), decisions=("accepted",))
    assert again.exported == 2 and not (out / "metadata.csv").exists() and (out / "coco" / "annotations.json").is_file()


def test_export_errors(tmp_path, session):
    item = add_synthetic(session, 0)
    with pytest.raises(FetalStudioError, match="[Nn]othing to export.*accept or edit items first"):
        export_session(session, tmp_path / "out")
    session.decide(item.id, "accepted")
    with pytest.raises(FetalStudioError, match="inside the review session"):
        export_session(session, session.folder / "export")
    with pytest.raises(FetalStudioError, match="contains the review session"):
        export_session(session, tmp_path)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(FetalStudioError, match="not empty and is not a FetalStudio export"):
        export_session(session, foreign)
    assert (foreign / "keep.txt").read_text() == "mine"
    with pytest.raises(FetalStudioError, match="Unknown export format 'yolo'"):
        export_session(session, tmp_path / "out", formats=("yolo",))
    with pytest.raises(FetalStudioError, match="Unknown decision"):
        export_session(session, tmp_path / "out", decisions=("good",))
    empty = session.set_mask(add_synthetic(session, 1).id, np.zeros(SHAPE, bool), how="brush")
    result = export_session(session, tmp_path / "out", formats=("folder",))
    assert result.exported == 1 and result.skipped == [(empty.id, "empty mask")]
    assert set(DECISIONS) >= set(result.counts)


# --- a full disk ---------------------------------------------------------------------------------
class _FullDisk:
    """The disk fills up at the store's ``at``-th write (counting file writes and log appends): that
    write puts half its bytes down and fails with ENOSPC, as does every later one."""

    def __init__(self, monkeypatch, at: int):
        import builtins

        import fetalstudio.imaging.files as files

        self.at, self.count, self._open, self._write = at, 0, builtins.open, os.write
        monkeypatch.setattr(files, "open", self.open, raising=False)  # the atomic writer's open(), nobody else's
        monkeypatch.setattr(os, "write", self.write)

    def _full(self) -> bool:
        self.count += 1
        return self.count >= self.at

    def open(self, path, mode="r", *args, **kwargs):
        handle = self._open(path, mode, *args, **kwargs)
        if "w" not in mode or not self._full():
            return handle
        real_write = handle.write

        def write(data):
            real_write(data[: len(data) // 2])
            handle.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        handle.write = write
        return handle

    def write(self, descriptor, data):
        if not os.readlink(f"/proc/self/fd/{descriptor}").endswith(LOG_NAME) or not self._full():
            return self._write(descriptor, data)
        self._write(descriptor, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")


LOG_NAME = "log.jsonl"


def test_a_full_disk_at_any_write_says_what_was_kept_and_leaves_nothing_half_written(session, monkeypatch):
    """Every write of each action (data files, item JSON, log line) in turn meets a full disk: a
    message names the folder and what is kept; reopened, the session holds everything before intact."""
    items = [add_synthetic(session, seed) for seed in range(4)]
    session.decide(items[0].id, "accepted")
    session.decide(items[1].id, "rejected")
    item = items[2]
    for name, (action, writes) in _write_actions(session, item).items():
        if name == "redo":
            session.undo(item.id)
        for at in range(1, writes + 1):
            before, count = session.get(item.id), len(session)
            kept = session.items()
            _FullDisk(monkeypatch, at)
            with pytest.raises(DiskFullError) as raised:
                action()
            monkeypatch.undo()
            message = str(raised.value)
            assert f"The disk holding {session.folder} is full" in message and "Free some space" in message
            decided = sum(i.decision != "pending" for i in session.items())
            assert f"Everything before it is kept: {len(session)} pairs, {decided} of them accepted, rejected or edited." in message
            saved = at == writes  # only the log line failed: the action itself is on disk
            assert ("was saved; only its line in the action log" in message) == saved, (name, at, message)
            assert ("not saved" in message or "not added" in message) != saved, (name, at, message)
            assert not list(session.folder.rglob("*.tmp")), (name, at)
            reopened = ReviewSession.open(session.folder)
            assert_session_consistent(reopened)
            assert len(reopened) == count + (name == "add" and saved)
            now = reopened.get(item.id)
            if not saved:
                assert now == before and [i for i in reopened.items() if i.id in {k.id for k in kept}] == kept, (name, at)
                assert {f"images/{p.name}" for p in (session.folder / "images").iterdir()} == {i.image for i in kept}
            else:
                assert reopened.log_entries()  # the half log line is skipped, the ones before still read
            if name != "add" and saved:
                assert now.revision == before.revision + 1
                session.undo(item.id) if name != "undo" else session.redo(item.id)  # back for the next write point
        action()  # the disk has room again: the action works


def test_a_full_disk_while_remembering_the_cursor_keeps_the_decisions(session, monkeypatch):
    item = add_synthetic(session, 0)
    session.decide(item.id, "accepted")
    _FullDisk(monkeypatch, 1)
    with pytest.raises(DiskFullError, match="Only the position in the session .* was not remembered. Everything before it is kept: 1 pair, 1 of them"):
        session.set_cursor(item.id)
    monkeypatch.undo()
    assert ReviewSession.open(session.folder).get(item.id).decision == "accepted"


def test_a_full_disk_during_export_leaves_no_half_export_and_keeps_the_previous_one(tmp_path, session, monkeypatch):
    import fetalstudio.review.export as export

    for seed in range(3):
        session.decide(add_synthetic(session, seed).id, "accepted")
    out = tmp_path / "exports" / "heads"
    with monkeypatch.context() as patch:
        _FullDisk(patch, 4)
        with pytest.raises(DiskFullError) as raised:
            export_session(session, out, formats=("folder", "coco"))
    assert f"The disk holding {out.parent} is full" in str(raised.value)
    assert "Nothing was exported: the half-built export was removed and the review session is unchanged." in str(raised.value)
    assert list(out.parent.iterdir()) == []  # no partial folder, no half file
    first = export_session(session, out, formats=("folder",))
    files = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    session.decide(add_synthetic(session, 7).id, "accepted")
    with monkeypatch.context() as patch:
        _FullDisk(patch, 6)
        with pytest.raises(DiskFullError, match="The previous export in heads is kept"):
            export_session(session, out, formats=("folder",))
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    assert sorted(p.name for p in out.parent.iterdir()) == ["heads"] and first.exported == 3

    def full_zip(base_name, *args, **kwargs):  # make_archive on a full disk: half a zip, then ENOSPC
        Path(f"{base_name}.zip").write_bytes(b"PK\x03\x04 half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(export.shutil, "make_archive", full_zip)
        with pytest.raises(DiskFullError, match="The export folder heads is complete; only its zip was not written"):
            export.zip_export(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["heads"]
    archive = export.zip_export(out)
    assert archive == out.parent / "heads.zip" and "metadata.csv" in zipfile.ZipFile(archive).namelist()


def test_export_json_names_the_session_without_the_server_path(tmp_path, session):
    session.decide(add_synthetic(session, 0).id, "accepted")
    out = tmp_path / "out"
    marker = out / "export.json"
    out.mkdir()
    old = {"session": "heads", "session_folder": str(session.folder.resolve()), "items": ["000001"]}  # an older export
    marker.write_text(json.dumps(old))
    export_session(session, out)  # still recognised as an export, so replaced
    text = marker.read_text()
    assert str(tmp_path) not in text and not any(part in text for part in ("/tmp", "/home", "/root"))
    data = json.loads(text)
    assert data["session"] == "heads" and data["session_folder"] == session.folder.name == "session"
