"""Issue 11 items 9-11, 17, 18: paths from the browser, hidden events, data folders, upload limit and
cache pruning, login throttling, Gradio's log, opening the browser. Unit tests, then one
``python app.py --auth ... --max-file-size 1`` on 127.0.0.1 driven over HTTP."""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from fetalstudio.app_context import AppContext
from fetalstudio.errors import FetalStudioError
from fetalstudio.paths import NOT_AVAILABLE, app_file
from fetalstudio.ui.common import server_source
from fetalstudio.ui.server import (CacheBudget, LoginFailures, ServerOptions, check_server_options, prune_cache,
                                   readable_data_dirs, running_line, should_open_browser)

try:
    from tests.browser_support import AppServer, free_port
except ImportError:
    from browser_support import AppServer, free_port

DATA = Path("/work/shared/data")


# --- paths from the browser ------------------------------------------------------------------


@pytest.fixture
def app_folders(tmp_path, monkeypatch):
    outputs, cache, outside = tmp_path / "outputs", tmp_path / "cache", tmp_path / "outside"
    for folder in (outputs, cache, outside):
        folder.mkdir()
    monkeypatch.setenv("FETALSTUDIO_OUTPUTS", str(outputs))
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))
    return outputs, cache, outside


def test_app_file_accepts_only_files_of_the_app_folders(app_folders):
    outputs, cache, outside = app_folders
    (outputs / "a").mkdir()
    made, uploaded, secret = outputs / "a" / "made.png", cache / "up.png", outside / "secret.png"
    for path in (made, uploaded, secret):
        path.write_bytes(b"png")
    assert app_file(str(made)) == made.resolve()
    assert app_file(str(uploaded)) == uploaded.resolve()
    (outputs / "link.png").symlink_to(secret)
    (outputs / "dirlink").symlink_to(outside, target_is_directory=True)
    refused = [secret, outside / "missing.png", outputs / "missing.png", outputs / "a", outputs / "link.png",
               outputs / "dirlink" / "secret.png", outputs / "a" / ".." / ".." / "outside" / "secret.png",
               "/etc/passwd", "", None, "x\x00y"]
    messages = set()
    for path in refused:
        with pytest.raises(FetalStudioError) as error:
            app_file(path)
        messages.add(str(error.value))
    assert messages == {NOT_AVAILABLE}, "a refusal must not tell a missing file from a forbidden one"
    assert str(outside) not in NOT_AVAILABLE


def _context(data_dirs) -> AppContext:
    return AppContext(manager=None, synthesis=None, outputs_dir=Path("/nonexistent"), data_dirs=data_dirs)


def test_batch_and_import_paths_are_free_on_loopback_and_limited_to_data_dirs_when_exposed(tmp_path):
    data, other = tmp_path / "data", tmp_path / "other"
    data.mkdir(), other.mkdir()
    (data / "pairs.csv").write_text("image\n")
    loopback = readable_data_dirs(ServerOptions(data_dirs=(data,)))
    assert loopback is None
    assert server_source(_context(loopback), str(other), "a folder") == other

    exposed = readable_data_dirs(ServerOptions(host="0.0.0.0", auth=("u", "p"), data_dirs=(data,)))
    assert exposed == (data.resolve(),)
    assert server_source(_context(exposed), str(data / "pairs.csv"), "a CSV") == data / "pairs.csv"
    for path in (other, data / ".." / "other", "/etc"):
        with pytest.raises(FetalStudioError, match="--data-dir"):
            server_source(_context(exposed), str(path), "a folder")
    with pytest.raises(FetalStudioError, match="a file it lists"):  # a CSV inside listing an image outside
        server_source(_context(exposed), str(data / "pairs.csv"), "a CSV", listed=lambda _: [other / "x.png"])
    with pytest.raises(FetalStudioError, match="started without --data-dir"):
        server_source(_context(()), str(data), "a folder")


def test_a_shared_app_loads_typed_model_paths_only_from_its_model_folders(tmp_path):
    import shutil

    from fetalstudio.app_context import build_context
    from fetalstudio.errors import ModelNotFoundError
    from fetalstudio.paths import checkpoints_dir

    data, outside = tmp_path / "data", tmp_path / "outside"
    data.mkdir(), outside.mkdir()
    bundled = checkpoints_dir() / "bundled" / "fetalstudio-plane-classifier" / "model.safetensors"
    shutil.copy(bundled, data / "classifier.safetensors")
    shutil.copy(bundled, outside / "classifier.safetensors")

    local = build_context(outputs=tmp_path / "outputs").manager  # loopback: any path the user types
    assert local.entry(str(outside / "classifier.safetensors")).kind.value == "classifier"

    shared = build_context(outputs=tmp_path / "outputs", data_dirs=(data.resolve(),)).manager
    assert shared.entry(str(data / "classifier.safetensors")).kind.value == "classifier"
    assert shared.entry(str(bundled)).origin != "user"  # a bundled model by its path
    messages = set()
    for probe in (outside / "classifier.safetensors", outside / "missing.safetensors", "/etc/passwd", data / ".." / "outside"):
        with pytest.raises(ModelNotFoundError, match="--data-dir") as refused:
            shared.entry(str(probe))
        messages.add(str(refused.value).replace(str(probe), "PATH"))
    assert len(messages) == 1  # the same answer whether the file exists or not


def test_data_dir_must_exist(tmp_path):
    with pytest.raises(FetalStudioError, match="is not a folder"):
        check_server_options(ServerOptions(data_dirs=(tmp_path / "missing",)))


# --- upload cache ------------------------------------------------------------------------------


def _cached(folder: Path, name: str, size: int, age_s: float, now: float) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    os.utime(path, (now - age_s, now - age_s))
    return path


def test_prune_cache_removes_old_files_then_oldest_over_budget_never_recent_ones(tmp_path):
    now = time.time()
    hour = 3600
    budget = CacheBudget(max_bytes=3000, max_age_s=24 * hour, in_use_s=2 * hour)
    stale = _cached(tmp_path, "h1/stale.png", 100, 30 * hour, now)
    oldest = _cached(tmp_path, "h2/oldest.png", 1000, 10 * hour, now)
    older = _cached(tmp_path, "h3/older.png", 1000, 5 * hour, now)
    recent = [_cached(tmp_path, f"h{4 + i}/recent.png", 1000, 0.5 * hour, now) for i in range(3)]
    report = prune_cache(tmp_path, budget, now=now)
    assert not stale.exists() and not oldest.exists() and not older.exists()
    assert all(path.exists() for path in recent), "files used in the last hours may be in an open page"
    assert report.removed == 3 and report.freed_bytes == 2100 and report.kept_bytes == 3000  # still over: recent kept
    assert not (tmp_path / "h1").exists(), "emptied folders go too"


def test_prune_cache_keeps_everything_within_budget(tmp_path):
    now = time.time()
    kept = _cached(tmp_path, "a/kept.png", 10, 10 * 3600, now)
    assert prune_cache(tmp_path, CacheBudget(), now=now).removed == 0 and kept.exists()
    assert prune_cache(tmp_path / "missing", CacheBudget(), now=now).removed == 0


# --- login throttling --------------------------------------------------------------------------


def test_login_failures_lock_out_a_client_for_a_doubling_window():
    clock = [1000.0]
    failures = LoginFailures(free=3, first_lock_s=1, max_lock_s=8, clock=lambda: clock[0])
    for _ in range(2):
        failures.failed("a")
        assert failures.wait_s("a") == 0
    waits = []
    for _ in range(6):
        failures.failed("a")
        waits.append(failures.wait_s("a"))
    assert waits == [1, 2, 4, 8, 8, 8]
    assert failures.wait_s("b") == 0, "one client's failures do not lock out another"
    clock[0] += 8
    assert failures.wait_s("a") == 0
    failures.succeeded("a")
    failures.failed("a")
    assert failures.wait_s("a") == 0, "a success starts the count again"


# --- opening the browser -----------------------------------------------------------------------


@pytest.mark.parametrize("options,environ,platform,opens", [
    (ServerOptions(), {"DISPLAY": ":0"}, "linux", True),
    (ServerOptions(), {"WAYLAND_DISPLAY": "wayland-0"}, "linux", True),
    (ServerOptions(), {}, "linux", False),  # headless
    (ServerOptions(), {"DISPLAY": ":0", "CI": "true"}, "linux", False),
    (ServerOptions(open_browser=False), {"DISPLAY": ":0"}, "linux", False),
    (ServerOptions(host="0.0.0.0", auth=("u", "p")), {"DISPLAY": ":0"}, "linux", False),
    (ServerOptions(share=True, auth=("u", "p")), {"DISPLAY": ":0"}, "linux", False),
    (ServerOptions(), {}, "darwin", True),
    (ServerOptions(), {}, "win32", True),
    (ServerOptions(), {"CI": "1"}, "win32", False),
])
def test_browser_opens_only_on_a_local_desktop(options, environ, platform, opens):
    assert should_open_browser(options, environ, platform) is opens


def test_running_line_names_the_address():
    assert running_line(ServerOptions(port=7861)) == "FetalStudio is running at http://127.0.0.1:7861 — press Ctrl+C to stop"
    assert "http://[::1]:7860" in running_line(ServerOptions(host="::1"))


@pytest.mark.parametrize("options,message", [
    (ServerOptions(max_file_size_mb=0), "--max-file-size"),
    (ServerOptions(max_file_size_mb=float("inf")), "--max-file-size"),
    (ServerOptions(max_pixels=0), "--max-pixels"),
])
def test_bad_limits_are_refused(options, message):
    with pytest.raises(FetalStudioError, match=message):
        check_server_options(options)


# --- the running app over HTTP -----------------------------------------------------------------

USER, PASSWORD = "sono", "s3cret"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    folders = {name: root / name for name in ("outputs", "checkpoints", "gradio")}
    for folder in folders.values():
        folder.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FETALSTUDIO_") and k not in ("CI",)}
    env.update(FETALSTUDIO_OUTPUTS=str(folders["outputs"]), FETALSTUDIO_CHECKPOINTS=str(folders["checkpoints"]),
               FETALSTUDIO_DEVICE="cpu", GRADIO_TEMP_DIR=str(folders["gradio"]), HF_HUB_OFFLINE="1",
               GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    env.pop("DISPLAY", None), env.pop("WAYLAND_DISPLAY", None)
    app = AppServer(port=free_port(), env=env, log_path=root / "app.log",
                    args=["--auth", f"{USER}:{PASSWORD}", "--max-file-size", "1"])
    app.start()
    try:
        app.wait_until_up()  # the login page answers 200
        yield app
    finally:
        app.stop()


@contextmanager
def _logged_in(app: AppServer):
    import httpx

    with httpx.Client(base_url=app.url.rstrip("/"), timeout=30) as client:
        response = client.post("/login", data={"username": USER, "password": PASSWORD})
        assert response.status_code == 200, response.text
        yield client


def test_launch_prints_the_address(server):
    line = f"FetalStudio is running at http://127.0.0.1:{server.port} — press Ctrl+C to stop"
    deadline = time.monotonic() + 30  # the server answers as soon as it listens; the line follows launch()
    while line not in server.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert line in server.log()


def test_events_are_hidden_and_cannot_be_called_by_name(server):
    with _logged_in(server) as client:
        info = client.get("/gradio_api/info").json()
        assert info == {"named_endpoints": {}, "unnamed_endpoints": {}}
        config = client.get("/config").json()
        assert config["dependencies"] and {d["api_visibility"] for d in config["dependencies"]} == {"private"}
        names = {d["api_name"] for d in config["dependencies"] if d.get("api_name")}
        assert "receive" in names
        for name in ("receive", "load", "on_batch"):
            for route in (f"/gradio_api/call/{name}", f"/gradio_api/run/{name}", f"/gradio_api/api/{name}"):
                assert client.post(route, json={"data": ["/etc/hosts"]}).status_code == 404, route
        from gradio_client import Client

        with pytest.raises(ValueError, match="api_name"):
            Client(server.url, auth=(USER, PASSWORD), verbose=False).predict("/etc/hosts", api_name="/receive")


def test_receive_takes_no_path_from_the_browser(server):
    """The Analysis inbox is server-side state: a path sent for it by event number is ignored."""
    image = sorted((DATA / "hc18_heads").rglob("*.png"))[0]
    with _logged_in(server) as client:
        config = client.get("/config").json()
        annotator = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "analysis-annotator")
        receive = next(d for d in config["dependencies"] if annotator in d["outputs"] and len(d["inputs"]) == 1)
        messages = _run_event(client, receive["id"], [str(image)])
    completed = messages[-1]
    assert completed["msg"] == "process_completed"
    assert not completed["success"], completed
    assert image.name not in json.dumps(messages)
    assert not list(Path(server.env["FETALSTUDIO_OUTPUTS"]).rglob("image-*.png")), "no served copy was made"


def _run_event(client, fn_index: int, data: list) -> list[dict]:
    session = "security-test-session"
    joined = client.post("/gradio_api/queue/join", json={"data": data, "fn_index": fn_index, "session_hash": session,
                                                          "trigger_id": None, "event_data": None})
    assert joined.status_code == 200, joined.text
    messages = []
    with client.stream("GET", f"/gradio_api/queue/data?session_hash={session}") as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                messages.append(message)
                if message.get("msg") == "process_completed":
                    break
    return messages


def test_upload_over_the_limit_is_refused(server):
    with _logged_in(server) as client:
        big = client.post("/gradio_api/upload", files={"files": ("big.png", b"\0" * (1024 * 1024 + 1))})
        assert big.status_code == 413 and "maximum allowed size" in big.text
        small = client.post("/gradio_api/upload", files={"files": ("small.png", b"\0" * 1000)})
        assert small.status_code == 200
    assert not list(Path(server.env["GRADIO_TEMP_DIR"]).rglob("big.png"))


def test_repeated_failed_logins_are_throttled(server):
    import httpx

    with httpx.Client(base_url=server.url.rstrip("/"), timeout=30) as client:
        codes = [client.post("/login", data={"username": USER, "password": f"wrong{i}"}).status_code for i in range(30)]
        assert codes[:5] == [400] * 5
        assert set(codes[5:]) == {429}, codes
        locked = client.post("/login", data={"username": USER, "password": PASSWORD})
        assert locked.status_code == 429 and "try again in" in locked.json()["detail"]
        assert int(locked.headers["retry-after"]) >= 1
        deadline = time.monotonic() + 30  # the window is seconds; wait it out, then the right password works
        while client.post("/login", data={"username": USER, "password": PASSWORD}).status_code != 200:
            assert time.monotonic() < deadline, "still locked out after 30 s"
            time.sleep(0.5)


def test_page_loads_log_no_custom_component_lines(server):
    with _logged_in(server) as client:
        config = client.get("/config").json()
        annotator = next(c for c in config["components"] if c["type"] == "image_annotator")
        class_id = annotator["component_class_id"]
        for _ in range(2):  # what a page load asks for
            for file_name in ("index.js", "style.css"):
                client.get(f"/gradio_api/custom_component/{class_id}/client/component/{file_name}")
    time.sleep(0.5)
    assert "environment=client" not in server.log()
