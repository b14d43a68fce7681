"""Helpers shared by the tabs: error translation, per-browser-session cancel flags, the GPU queue."""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps

import gradio as gr

from fetalstudio.errors import FetalStudioError

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


@dataclass
class SendToAnalysis:
    """A tab's "Send to Analysis" button: ``pick(*inputs)`` returns the image path to analyse."""

    button: gr.Button
    pick: Callable[..., str]
    inputs: list
