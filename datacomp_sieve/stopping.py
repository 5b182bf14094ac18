"""How a run stops: Ctrl-C and SIGTERM unwind it the same way, and the processes it starts end with it.

Clusters stop jobs with SIGTERM: Slurm at its time limit or on preemption (to every process of the
job, SIGKILL about 30 s later), Kubernetes and ``docker stop`` (to the main process). Python's
default for SIGTERM is to die on the spot: no ``finally`` runs, so the image-decoding and text
processes were left running without a parent and the shared memory they write into stayed in
``/dev/shm``. Within ``sigterm_as_interrupt`` SIGTERM raises ``Terminated``, a ``KeyboardInterrupt``,
so it unwinds as Ctrl-C does (pools stopped, shared memory freed, the temporary file of a shard
being written removed) and the CLI exits 128 + the signal's number (130, 143).

``as_child`` is what every process this package starts runs first: Ctrl-C is left to the main
process (which stops its children: a ``KeyboardInterrupt`` in each would print a traceback from
every one of them), and a child ends when its parent does, however the parent died (SIGKILL too).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread where Ctrl-C raises ``KeyboardInterrupt``."""


_SIGTERM_SEEN = []  # set by the handler: a library may turn ``Terminated`` into a plain KeyboardInterrupt
                   # (Ray's ray.wait raises its own when a signal handler raises one)


def raise_terminated(signum, frame) -> None:
    _SIGTERM_SEEN.append(signum)
    raise Terminated()


def _by_sigterm(e: KeyboardInterrupt) -> bool:
    return isinstance(e, Terminated) or bool(_SIGTERM_SEEN)


def exit_status(e: KeyboardInterrupt) -> int:
    """The shells' status for a process stopped by the signal: 130 (SIGINT), 143 (SIGTERM)."""
    return 128 + (signal.SIGTERM if _by_sigterm(e) else signal.SIGINT)


def signal_name(e: KeyboardInterrupt) -> str:
    return "SIGTERM" if _by_sigterm(e) else "Ctrl-C (SIGINT)"


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within: SIGTERM raises ``Terminated`` (in the main thread; elsewhere signals cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _SIGTERM_SEEN.clear()
    old = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def keeping_sigterm():
    """Libraries that set a SIGTERM handler of their own (``ray.init``: ``sys.exit``) leave ours."""
    old = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    try:
        yield
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def as_child() -> None:
    """In a process this package started: SIGINT ignored (see the module), and a thread that sends
    this process SIGTERM once its parent is gone (the parent's end of the pipe ``multiprocessing``
    keeps to it closes however the parent ends). A decoding or text process dies of it; a
    ``ProcessEngine`` worker unwinds (``Terminated``), stopping processes of its own."""
    import multiprocessing
    from multiprocessing.connection import wait

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch():
        wait([parent.sentinel])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
