"""Launch settings and their safety rules: local by default, never public unless asked, with auth;
the guards in front of Gradio (named API routes refused, failed logins slowed down), the upload
cache budget, and whether to open a browser."""

from __future__ import annotations

import builtins
import ipaddress
import math
import os
import re
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fetalstudio.errors import FetalStudioError

LOOPBACK_NAMES = {"localhost"}
DEFAULT_MAX_FILE_SIZE_MB = 200


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 7860
    auth: tuple[str, str] | None = None
    share: bool = False
    #: Server folders the batch and import boxes may read when the app listens beyond loopback.
    data_dirs: tuple[Path, ...] = ()
    max_file_size_mb: float = DEFAULT_MAX_FILE_SIZE_MB
    #: None: the image readers' default limit.
    max_pixels: int | None = None
    open_browser: bool = True

    @property
    def exposed(self) -> bool:
        """Reachable from other machines (a non-loopback address or a share link)."""
        return self.share or not is_loopback(self.host)

    @property
    def max_file_size_bytes(self) -> int:
        return int(self.max_file_size_mb * 1024 * 1024)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise FetalStudioError("--auth must be USER:PASSWORD, both non-empty (e.g. --auth sono:s3cret).")
    return user, password


def check_server_options(options: ServerOptions) -> ServerOptions:
    """Refuse to expose the app (other machines, or a public share link) without a password."""
    if not 1 <= options.port <= 65535:
        raise FetalStudioError(f"--port {options.port} is not a valid port (1-65535).")
    if not is_loopback(options.host) and options.auth is None:
        raise FetalStudioError(
            f"Refusing to listen on {options.host} without a password: anyone on the network could use the "
            "app and read its outputs. Add --auth USER:PASSWORD, or keep the default --host 127.0.0.1."
        )
    if options.share and options.auth is None:
        raise FetalStudioError("--share makes the app reachable from the internet; it needs --auth USER:PASSWORD.")
    if not (math.isfinite(options.max_file_size_mb) and options.max_file_size_mb > 0):
        raise FetalStudioError(f"--max-file-size {options.max_file_size_mb} must be a positive number of megabytes, e.g. 200.")
    if options.max_pixels is not None and options.max_pixels < 1:
        raise FetalStudioError(f"--max-pixels {options.max_pixels} must be a positive number of pixels, e.g. 100000000.")
    for folder in options.data_dirs:
        if not folder.is_dir():
            raise FetalStudioError(f"--data-dir {folder} is not a folder on this computer; name an existing folder.")
    return options


def readable_data_dirs(options: ServerOptions) -> tuple[Path, ...] | None:
    """The folders the batch and import boxes may read: any (None) on loopback, else the --data-dir ones."""
    if not options.exposed:
        return None
    return tuple(folder.expanduser().resolve() for folder in options.data_dirs)


# --- opening the browser -------------------------------------------------------------------


def should_open_browser(options: ServerOptions, environ: Mapping[str, str] | None = None,
                        platform: str | None = None) -> bool:
    """Open the page on a desktop only: not with --no-browser, not in CI, not on a Linux machine
    without a display, not when the app listens for other machines."""
    environ = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    if not options.open_browser or options.exposed or environ.get("CI"):
        return False
    if platform.startswith("linux") or "bsd" in platform:
        return bool(environ.get("DISPLAY") or environ.get("WAYLAND_DISPLAY"))
    return True


def running_line(options: ServerOptions) -> str:
    return f"FetalStudio is running at {options.url} — press Ctrl+C to stop"


# --- request guards (pure ASGI middleware, installed through launch(app_kwargs=...)) --------

#: Gradio's routes that call an event by its name; the page itself joins the queue by event number.
NAMED_API_ROUTE = re.compile(r"^(/[^/]+)*/gradio_api/(call|run|api)/")


class NamedApiRefusal:
    """404 for the call-by-name routes: no event of this app is a public API (see common.hide_internal_events)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and NAMED_API_ROUTE.match(scope.get("path", "")):
            await _send_json(send, 404, {"detail": "Not Found"})
            return
        await self.app(scope, receive, send)


@dataclass
class LoginFailures:
    """Failed logins per client: the first ``free`` are answered at once; after that each failure
    locks the client out for a window that doubles, up to ``max_lock_s``. A success clears the count."""

    free: int = 5
    first_lock_s: float = 1.0
    max_lock_s: float = 300.0
    max_clients: int = 10_000
    clock: Callable[[], float] = time.monotonic
    _clients: OrderedDict[str, tuple[int, float]] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def wait_s(self, client: str) -> float:
        """Seconds before ``client`` may try again (0: now)."""
        with self._lock:
            _, locked_until = self._clients.get(client, (0, 0.0))
        return max(0.0, locked_until - self.clock())

    def failed(self, client: str) -> None:
        with self._lock:
            count, _ = self._clients.pop(client, (0, 0.0))
            count += 1
            locked_until = 0.0
            if count >= self.free:
                locked_until = self.clock() + min(self.max_lock_s, self.first_lock_s * 2 ** (count - self.free))
            self._clients[client] = (count, locked_until)
            while len(self._clients) > self.max_clients:
                self._clients.popitem(last=False)

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._clients.pop(client, None)


class LoginThrottle:
    """Answers 429 to a client locked out by :class:`LoginFailures` without asking Gradio; counts
    Gradio's answers to the others. Nothing sleeps: the event loop stays free."""

    def __init__(self, app, failures: LoginFailures | None = None) -> None:
        self.app = app
        self.failures = failures or LoginFailures()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or not scope.get("path", "").rstrip("/").endswith("/login"):
            await self.app(scope, receive, send)
            return
        client = (scope.get("client") or ("unknown",))[0]
        wait = self.failures.wait_s(client)
        if wait > 0:
            seconds = math.ceil(wait)
            await _send_json(send, 429, {"detail": f"Too many failed logins: try again in {seconds} s."},
                             [(b"retry-after", str(seconds).encode())])
            return
        status: dict[str, int] = {}

        async def watching_send(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        await self.app(scope, receive, watching_send)
        if status.get("code") == 200:
            self.failures.succeeded(client)
        elif status.get("code") in (400, 401, 403):
            self.failures.failed(client)


async def _send_json(send, code: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    import json

    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": code,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers]})
    await send({"type": "http.response.body", "body": data})


def server_middleware() -> list:
    """For ``launch(app_kwargs={"middleware": ...})``."""
    from starlette.middleware import Middleware

    return [Middleware(NamedApiRefusal), Middleware(LoginThrottle)]


# --- Gradio's log --------------------------------------------------------------------------

#: Gradio 6.31 prints one such line for every custom-component file a page loads (a debug print
#: left in gradio/routes.py's custom_component_path route).
CUSTOM_COMPONENT_LINE = re.compile(r"^id=\S*, environment=\w+, type=\S*, file_name=")


def quiet_custom_component_requests() -> None:
    """Drop those lines (and only those): gradio.routes gets a ``print`` that filters them."""
    import gradio.routes

    def routes_print(*args, **kwargs) -> None:
        if len(args) == 1 and isinstance(args[0], str) and CUSTOM_COMPONENT_LINE.match(args[0]):
            return
        builtins.print(*args, **kwargs)

    gradio.routes.print = routes_print


# --- the upload cache ----------------------------------------------------------------------


@dataclass(frozen=True)
class CacheBudget:
    """How much of Gradio's upload cache is kept. A file written or read within ``in_use_s`` may
    still be shown in an open page (its value lives in the browser, which may send it back), so it
    is never removed; older files go when older than ``max_age_s`` or, oldest first, while the
    cache is over ``max_bytes``."""

    max_bytes: int = 2 * 1024**3
    max_age_s: float = 24 * 3600
    in_use_s: float = 2 * 3600
    check_every_s: float = 300


@dataclass(frozen=True)
class PruneReport:
    removed: int
    freed_bytes: int
    kept_bytes: int


def prune_cache(folder: Path, budget: CacheBudget, now: float | None = None) -> PruneReport:
    now = time.time() if now is None else now
    files = []
    for path in Path(folder).rglob("*"):
        try:
            if path.is_symlink() or not path.is_file():
                continue
            stat = path.stat()
        except OSError:
            continue
        files.append((max(stat.st_mtime, stat.st_atime), stat.st_size, path))
    total = sum(size for _, size, _ in files)
    removed = freed = 0
    emptied: set[Path] = set()
    for used, size, path in sorted(files, key=lambda f: f[0]):  # oldest first
        age = now - used
        if age < budget.in_use_s:
            break
        if age <= budget.max_age_s and total <= budget.max_bytes:
            break
        try:
            path.unlink()
        except OSError:
            continue
        removed, freed, total = removed + 1, freed + size, total - size
        emptied.add(path.parent)
    _remove_empty_folders(Path(folder), emptied, now - budget.in_use_s)
    return PruneReport(removed, freed, total)


def _remove_empty_folders(folder: Path, emptied: set[Path], before: float) -> None:
    """Empty folders that held a pruned file or were last changed before ``before`` (a fresh empty
    one may be about to receive an upload)."""
    folders = [p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink()]
    for path in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        try:
            if path in emptied or path.stat().st_mtime < before:
                path.rmdir()  # only succeeds when empty
        except OSError:
            pass


class CachePruner:
    """Prunes the cache at start, then every ``budget.check_every_s`` in a daemon thread."""

    def __init__(self, folder: Path, budget: CacheBudget) -> None:
        self.folder, self.budget = folder, budget
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="upload-cache-pruner", daemon=True)

    def start(self) -> PruneReport:
        report = prune_cache(self.folder, self.budget)
        self._thread.start()
        return report

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.budget.check_every_s):
            prune_cache(self.folder, self.budget)
