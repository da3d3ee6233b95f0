"""Keeping the cyclic garbage collector off what a loaded model brings in.

A server holding a text model carries about half a million Python objects from torch,
transformers and the tokenizer. CPython's collector walks all of them at each full (oldest
generation) collection: 100-150 ms with the GIL held, during which neither the event loop nor
the model thread's op dispatch runs. Under chatty traffic that happened every few seconds and
took 5-6 % of the wall time (measured with ``gc.callbacks`` on the bundled model, 64 one-input
clients).

``settle`` collects once and moves every surviving object to the permanent generation
(``gc.freeze``), which the collector no longer walks; it runs after each model load, when the
heap has just grown by a model. Objects that die later are still freed by reference counting;
only reference cycles among frozen objects would wait for ``thaw``, which ``ModelManager``
calls before it releases a model, so that an unloaded model's cycles are collected by the
``settle`` that follows.
"""

from __future__ import annotations

import gc
import threading

_LOCK = threading.Lock()


def settle() -> None:
    """Collect, then freeze what survives (blocking: ~0.1-0.2 s with a model loaded)."""
    with _LOCK:
        gc.collect()
        gc.freeze()


def thaw() -> None:
    """Give the frozen objects back to the collector (the next ``settle`` freezes them again)."""
    with _LOCK:
        gc.unfreeze()
