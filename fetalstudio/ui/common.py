"""Helpers shared by the tabs: error translation, per-browser-session cancel flags, the GPU queue,
the checks on paths that come from the browser, and the events kept out of the API."""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterable
from functools import wraps
from pathlib import Path

import gradio as gr

from fetalstudio.app_context import AppContext
from fetalstudio.errors import FetalStudioError
from fetalstudio.paths import is_under

#: Every event that runs a model shares this queue: one GPU job at a time, in arrival order.
GPU_QUEUE = "gpu"


def user_errors(handler: Callable) -> Callable:
    """Show library errors as a Gradio error toast with the library's actionable message."""

    if inspect.isgeneratorfunction(handler):  # Gradio streams only from generator functions

        @wraps(handler)
        def streaming(*args, **kwargs):
            try:
                yield from handler(*args, **kwargs)
            except FetalStudioError as error:
                raise gr.Error(str(error), print_exception=False) from error

        return streaming

    @wraps(handler)
    def wrapper(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except FetalStudioError as error:
            raise gr.Error(str(error), print_exception=False) from error

    return wrapper


def refusals_as_warnings(status: gr.components.Component) -> Callable[[Callable], Callable]:
    """A decorator for handlers that return dicts: a refused click (a FetalStudioError) answers with a warning
    toast and the message in ``status``; the other outputs keep what they show (an error would badge every
    output, which looks like lost work). Other errors still go through :func:`user_errors`."""

    def decorate(handler: Callable) -> Callable:
        if inspect.isgeneratorfunction(handler):
            raise TypeError("refusals_as_warnings takes plain handlers, not generators")

        @wraps(handler)
        def wrapper(*args, **kwargs):
            try:
                return handler(*args, **kwargs)
            except FetalStudioError as error:
                gr.Warning(str(error))
                return {status: f"⚠ {error}"}

        return user_errors(wrapper)

    return decorate


class CancelFlags:
    """One threading.Event per browser session, so Cancel stops only that user's job."""

    def __init__(self) -> None:
        self._flags: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def get(self, request: gr.Request | None) -> threading.Event:
        key = getattr(request, "session_hash", None) or "default"
        with self._lock:
            return self._flags.setdefault(key, threading.Event())

    def fresh(self, request: gr.Request | None) -> threading.Event:
        flag = self.get(request)
        flag.clear()
        return flag


def server_source(context: AppContext, text: str | None, what: str,
                  listed: Callable[[Path], Iterable[Path]] | None = None) -> Path:
    """A folder or CSV typed into a batch or import box, read on the server.

    On loopback (``context.data_dirs is None``) any path is fine: the user is on this computer.
    Otherwise the path and every file it lists (``listed(path)``, e.g. a CSV's image column) must lie
    inside the folders named with ``--data-dir`` at launch, with one message for every refusal.
    """
    cleaned = (text or "").strip()
    if not cleaned:
        raise FetalStudioError(f"Type the path of {what}.")
    path = Path(cleaned).expanduser()
    require_in_data_dirs(context, [path])
    if listed is not None and context.data_dirs is not None:
        require_in_data_dirs(context, listed(path))
    return path


def require_in_data_dirs(context: AppContext, paths: Iterable[Path]) -> None:
    """Refuse any of ``paths`` outside the ``--data-dir`` folders (no-op when the app listens on loopback only)."""
    if context.data_dirs is None:
        return
    if not context.data_dirs:
        raise FetalStudioError("Reading folders on the server is off: the app listens beyond this computer and was "
                               "started without --data-dir. Upload the images, or restart with --data-dir FOLDER.")
    if not all(is_under(path, context.data_dirs) for path in paths):
        names = ", ".join(str(folder) for folder in context.data_dirs)
        raise FetalStudioError(f"Only files inside the folders named with --data-dir can be read ({names}); "
                               "the path, or a file it lists, lies elsewhere. Use a path inside those folders.")


def hide_internal_events(blocks: gr.Blocks) -> None:
    """Keep every event out of the API page, /info and gradio_client: they exist for this page only.

    Gradio still routes "private" events called by name (/gradio_api/call/<name>); the server refuses
    those routes (see fetalstudio.ui.server.NamedApiRefusal). The page reaches an event with ``queue=False``
    through one of those routes too, so every event must be queued: a quick one such as Cancel gets
    ``concurrency_limit=None`` instead (its own group, never waiting behind a model run).
    """
    for fn in blocks.fns.values():
        if not fn.queue:
            raise RuntimeError(f"Event {fn.name!r} has queue=False, which the server's API guard refuses; "
                               "queue it with concurrency_limit=None instead.")
        fn.api_visibility = "private"
