"""Stopping long jobs cleanly: SIGTERM (a batch scheduler, ``timeout``, ``kill``) or
SIGINT (Ctrl-C) asks a training chunk to end after its current step, keeping its
checkpoint and logs, instead of killing it between checkpoints."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["stop_signals"]

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def stop_signals(on_stop: Callable[[], None] | None = None) -> Iterator[threading.Event]:
    """An event that SIGTERM or SIGINT sets while inside (then ``on_stop()`` runs); the
    previous handlers come back on exit. Outside the main thread, where Python cannot
    install handlers, the event is never set and the signals keep their usual effect."""
    event = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        event.set()
        if on_stop is not None:
            on_stop()

    if threading.current_thread() is not threading.main_thread():
        yield event
        return
    old = {sig: signal.signal(sig, handler) for sig in _SIGNALS}
    try:
        yield event
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)
