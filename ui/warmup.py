"""The start-up warm-up imports diffusers and transformers and computes a first plan in a background thread.
Their lazy imports are not safe to run for the first time from two threads at once (a second thread can see a
half-initialised module: "cannot import name 'AutoencoderKL'"), so every handler that may import them waits
until the warm-up is done."""
from __future__ import annotations

import threading

_done = threading.Event()
_done.set()  # no warm-up running


def run_in_background(work) -> threading.Thread:
    """Start ``work()`` as the warm-up; :func:`wait` blocks until it has returned (or raised)."""
    _done.clear()

    def body():
        try:
            work()
        finally:
            _done.set()
    thread = threading.Thread(target=body, name="warm-up", daemon=True)
    thread.start()
    return thread


def wait(timeout: float = 300.0) -> None:
    _done.wait(timeout)
