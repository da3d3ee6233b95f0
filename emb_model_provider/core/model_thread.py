"""The one thread that runs the models: warm-up, image preprocessing on CPU, forward, release;
and the decode workers, which decode and preprocess images for a model on a GPU.

PyTorch's CPU kernels split their work over OpenMP threads, and OpenMP (libgomp) keeps one thread
team per thread that calls into it. When several threads call torch (the loader, a batcher per
model, the thread pool), the teams together hold more threads than the machine has cores, and
libgomp then stops spinning between parallel regions (its "throttled" spin count): every kernel
wakes its helper threads through the kernel, and a forward of many small kernels pays for it.
Measured on 2 cores with MiniLM-L6: one short sentence took 4.7 ms on the thread that loaded the
model and 9.8 ms on any other thread; batches of 32 took 8 % longer. So every call into torch in
the server goes through this thread, and the process keeps a single team.

Loading is the exception: it can take minutes (a download, a large checkpoint) and must not hold
up the models already serving, so it runs on a thread of its own that ends with it, and libgomp
releases that thread's team when the thread exits (measured: the model thread is back to 4.9 ms
once the loader is gone).

On a GPU the model thread's work is to keep the device fed: a forward it launches runs on the
device while the thread prepares the next. Decoding images there (Pillow, then the processor's
resize and normalisation on the CPU) would leave the device idle meanwhile, so for such models
images go to the decode workers (``run_decode``), two threads: the CPU kernels they run start two
OpenMP teams at most, whatever the number of requests.

Torch-free on purpose: the services and the batcher hand callables to it without importing torch.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_ident: int | None = None


def _started() -> None:
    global _ident  # noqa: PLW0603 - set once, by the thread itself
    _ident = threading.get_ident()


_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model", initializer=_started)


def on_model_thread() -> bool:
    return threading.get_ident() == _ident


def call(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run ``fn`` on the model thread and wait for it (from a worker thread such as a batcher's;
    directly when already there)."""
    if on_model_thread():
        return fn(*args, **kwargs)
    return _executor.submit(fn, *args, **kwargs).result()


async def run(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Await ``fn`` on the model thread without blocking the event loop."""
    return await asyncio.wrap_future(_executor.submit(fn, *args, **kwargs))


#: Decode workers: Pillow releases the GIL while it decodes, so two decode at once.
_decoders = ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode")


async def run_decode(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Await ``fn`` on a decode worker (never the model thread) without blocking the event
    loop: image decoding and preprocessing for a model on a GPU."""
    return await asyncio.wrap_future(_decoders.submit(fn, *args, **kwargs))


def drain() -> None:
    """Wait until the model thread has let go of the calls made before this one (blocking; from
    another thread). Its worker hands back a call's result a moment before it drops the call's
    function and arguments (``concurrent.futures`` deletes the work item after setting the
    result): whoever frees an object the last call used waits for this first."""
    call(_nothing)


def _nothing() -> None:
    pass


def bound(fn: Callable[P, T]) -> Callable[P, T]:
    """``fn``, run on the model thread whoever calls it."""

    @functools.wraps(fn)
    def on_thread(*args: P.args, **kwargs: P.kwargs) -> T:
        return call(fn, *args, **kwargs)

    return on_thread


async def run_apart(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Await ``fn`` on a new thread that ends when ``fn`` returns: for long torch work (loading a
    model) that must not hold up the model thread."""
    future: Future[T] = Future()

    def target() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            future.set_exception(exc)

    threading.Thread(target=target, name="model-load", daemon=True).start()
    return await asyncio.wrap_future(future)
