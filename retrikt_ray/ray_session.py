"""The Ray a command runs on: the spec's cluster, or a local Ray started for the command and shut down after.

While the session is open, SIGTERM (what systemd, Docker and Kubernetes send) takes the same path as Ctrl-C: it
raises `Interrupted`, a KeyboardInterrupt, in the main thread, so every `finally` runs and Ray is shut down. Left to
Ray, SIGTERM exits the driver through a handler whose watchdog aborts it 3 s later, before `ray.shutdown()` is
done, and the local Ray's DashboardAgent and RuntimeEnvAgent, which ignore SIGTERM, stay behind.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time

from .config import JobSpec

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
LEFTOVER_WAIT_S = 1.0  # how long the local Ray's processes get to end after ray.shutdown() before SIGTERM


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT received during a Ray session; `signum` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def signal_name(interrupt: KeyboardInterrupt) -> str:
    """The signal behind a KeyboardInterrupt: an Interrupted's, else Ctrl-C's SIGINT."""
    return signal.Signals(getattr(interrupt, "signum", signal.SIGINT)).name


class StopSignals:
    """A context in which, in the main thread, the first SIGTERM or SIGINT raises Interrupted; once one has, or
    once `closing` is set (the cleanup has begun), later ones are ignored. On exit the previous handlers are back,
    and a plain KeyboardInterrupt that a library raised instead of the Interrupted it caught (Ray Train does) is
    the Interrupted again, naming the signal. Outside the main thread no handler changes."""

    def __init__(self):
        self.received: int | None = None
        self.closing = False
        self.previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {signum: signal.signal(signum, self._interrupt) for signum in STOP_SIGNALS}
        return self

    def _interrupt(self, signum, frame) -> None:
        if self.received is None and not self.closing:
            self.received = signum
            raise Interrupted(signum)

    def __exit__(self, kind, error, traceback) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        if self.received is not None and isinstance(error, KeyboardInterrupt) and not isinstance(error, Interrupted):
            raise Interrupted(self.received) from error


def local_ray_processes() -> list:
    """The processes of the Ray node this process started (GCS, raylet, dashboard, ...) and all their
    descendants (the agents and workers the raylet starts); [] when it joined a cluster instead."""
    import psutil
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    if node is None or not node.head:
        return []
    found: dict[int, psutil.Process] = {}
    for infos in node.all_processes.values():
        for info in infos:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(info.process.pid)
                for process in [root, *root.children(recursive=True)]:
                    found[process.pid] = process
    return list(found.values())


def end_leftovers(processes: list) -> None:
    """Wait for the processes to end; terminate, then kill, those still running. A psutil.Process remembers its
    creation time, so a reused pid is never touched; a zombie (ended, its parent not yet told) counts as ended."""
    import psutil

    def running(among: list) -> list:
        alive = []
        for process in among:
            with contextlib.suppress(psutil.Error):
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(process)
        return alive

    def wait(among: list, seconds: float) -> list:
        deadline = time.monotonic() + seconds
        while (alive := running(among)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return alive

    left = wait(processes, LEFTOVER_WAIT_S)
    for process in left:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    for process in wait(left, 3.0):  # the agents ignore SIGTERM
        with contextlib.suppress(psutil.Error):
            process.kill()


def shutdown() -> None:
    """ray.shutdown(), and for a local Ray this process started, none of its processes left running."""
    import ray

    started_here = local_ray_processes()
    ray.shutdown()
    end_leftovers(started_here)


@contextlib.contextmanager
def ray_session(spec: JobSpec):
    """Connect to the spec's Ray address, or start a local Ray in-process; shut down what we started, also on
    SIGTERM and Ctrl-C (module docstring)."""
    import ray

    if ray.is_initialized():
        yield
        return
    with StopSignals() as starting:
        try:
            options = {"logging_level": logging.WARNING, "log_to_driver": True}
            if spec.resources.address:
                ray.init(address=spec.resources.address, **options)
            else:
                # The dashboard (loopback only) serves the State API that Ray Train's placement-group cleaner polls.
                ray.init(include_dashboard=True, dashboard_host="127.0.0.1", **options)
        except BaseException as error:
            starting.closing = True
            shutdown()
            if isinstance(error, SystemExit) and error.code == signal.SIGTERM:  # Ray's handler, while ray.init runs
                raise Interrupted(signal.SIGTERM) from None
            raise
        with StopSignals() as running:  # again: ray.init put Ray's own SIGTERM handler in place
            try:
                import ray.data

                ray.data.DataContext.get_current().enable_progress_bars = False
                yield
            finally:
                running.closing = True
                shutdown()
