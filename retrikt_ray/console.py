"""What `retrikt run` and `retrikt tune` show: the run, not the machinery.

The console gets the command's own lines (one per stage, `[tracking]`), the pipeline's messages that its Ray workers
print (lines that start with a stage's tag, `[student] ...`, after Ray's `(RayTrainWorker pid=...)` prefix) and the
stages' progress bars. Everything else that the process and its Ray workers write, Ray's and DeepSpeed's start-up
warnings, the libraries' deprecation warnings, worker INFO lines, C++ logs, goes to a log file in the run's folder,
and the console says where. `--verbose` leaves the console as it was, with all of it.

How: for the command's duration the process's stdout and stderr file descriptors point at the log file (what C
extensions and child processes write lands there), and sys.stdout and sys.stderr become routers that copy every
write to the log file and pass the pipeline's own lines and bars on to the real console (Ray prints its workers'
lines through them). On a terminal the bars are redrawn in place; elsewhere (a pipe, a Ray job's log) a bar is one
line when it completes, and one a minute while it runs.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

# The tags that start the pipeline's own lines (the stage names, and tracking's), optionally after a trial's name.
TAGS = ("prompt", "ppo", "generate", "unlabelled", "store", "student", "evaluate", "tracking")
# The pipeline's progress bars, by their tqdm description.
BARS = ("prompt tuning", "ppo", "generating", "annotating", "embed", "student")
BAR_EVERY_S = 60.0  # off a terminal: a running bar's line at most this often
REPEAT_S = 30.0  # a worker's line that comes again within this time is shown once

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_WORKER_PREFIX = re.compile(r"^\(.*?pid=[^)\s]+(?:, ip=[^)]*)?\) ?")
_REPEATED = re.compile(r" \[repeated \d+x across cluster\]\s*$")
_OURS = re.compile(r"^(?:\[[\w.:-]+\] )?\[(?:" + "|".join(TAGS) + r")\] ")
_BAR = re.compile(r"^(?P<desc>[^:|\[\]]+?): *\d+%\|[^|]*\| *(?P<n>\d+)/(?P<total>\d+)")
_PIECES = re.compile(r"(?<=[\r\n])")


def clean(text: str) -> str:
    """A written line as a person reads it: no colours, no Ray worker prefix, no dedup note, no trailing space."""
    text = _REPEATED.sub("", _WORKER_PREFIX.sub("", _ANSI.sub("", text)))
    return text.rstrip()


def is_ours(text: str) -> bool:
    """Whether a cleaned line is one of the pipeline's own."""
    return bool(_OURS.match(text))


def progress(text: str) -> tuple[str, bool] | None:
    """(description, complete) of a cleaned tqdm bar of the pipeline's; None for anything else."""
    match = _BAR.match(text)
    if match is None or match["desc"].strip() not in BARS:
        return None
    return match["desc"].strip(), int(match["n"]) >= int(match["total"])


class _Console:
    """The real console: the pipeline's lines on stdout, its bars on stderr."""

    def __init__(self, out: TextIO, err: TextIO):
        self.out, self.err = out, err
        try:
            self.tty = err.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self.lock = threading.RLock()
        self.bar_open: str | None = None  # the description of the bar being redrawn (on a terminal)
        self.bars: dict[str, tuple[bool, float]] = {}  # description -> (completion shown, when last shown)
        self.recent: dict[str, float] = {}  # worker lines shown lately: Ray Train forwards a print on both streams

    def line(self, text: str, err: bool = False, once: bool = False) -> None:
        """`once`: not again if the same line was shown in the last REPEAT_S seconds."""
        with self.lock:
            now = time.monotonic()
            if once:
                self.recent = {line: when for line, when in self.recent.items() if now - when < REPEAT_S}
                if text in self.recent:
                    return
                self.recent[text] = now
            self._close_bar()
            stream = self.err if err else self.out
            stream.write(text + "\n")
            stream.flush()

    def bar(self, text: str, description: str, complete: bool) -> None:
        with self.lock:
            if self.tty:
                if self.bar_open != description:  # another bar: the last one stays on its line
                    self._close_bar()
                self.err.write("\r" + text + "\x1b[K")
                self.err.flush()
                self.bar_open = description
                return
            shown, last = self.bars.get(description, (False, -BAR_EVERY_S))
            now = time.monotonic()
            if (complete and not shown) or (not complete and now - last >= BAR_EVERY_S):
                self.err.write(text + "\n")
                self.err.flush()
                self.bars[description] = (complete, now)
            elif not complete:
                self.bars[description] = (False, last)

    def _close_bar(self) -> None:
        if self.bar_open:
            self.err.write("\n")
            self.err.flush()
            self.bar_open = None

    def flush(self, end: bool = False) -> None:
        with self.lock:
            if end:
                self._close_bar()
            for stream in (self.out, self.err):
                with contextlib.suppress(ValueError, OSError):
                    stream.flush()


class _Router(io.TextIOBase):
    """sys.stdout or sys.stderr for the command: every write to the log file, the pipeline's lines and bars also to
    the console. Written text is split at line ends and carriage returns (tqdm redraws with those); a bar still
    unterminated is shown at once."""

    def __init__(self, console: _Console, log: TextIO, err: bool):
        super().__init__()
        self.console, self.log, self.err = console, log, err
        self.pending = ""
        self.shown: str | None = None  # the unterminated piece already shown
        self.fallback: TextIO | None = None  # once the command is over (a handler may still hold this stream)

    @property
    def encoding(self) -> str:
        return "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return (self.fallback or self.log).fileno()

    def write(self, text) -> int:
        if not isinstance(text, str):
            text = bytes(text).decode("utf-8", "replace")
        if self.fallback is not None:
            return self.fallback.write(text)
        with self.console.lock:
            self.log.write(text)
            *done, self.pending = _PIECES.split(self.pending + text)
            for piece in done:
                piece = piece.rstrip("\r\n")
                if piece != self.shown:
                    self._route(piece)
                self.shown = None
            if self.pending and self.pending != self.shown and self.pending.rstrip().endswith("]"):
                if self._route(self.pending, bars_only=True):
                    self.shown = self.pending
        return len(text)

    def _route(self, piece: str, bars_only: bool = False) -> bool:
        text = clean(piece)
        if not text:
            return False
        if not bars_only and is_ours(text):
            self.console.line(text, self.err, once=True)
            return True
        bar = progress(text)
        if bar is not None:
            self.console.bar(text, *bar)
            return True
        return False

    def flush(self) -> None:
        if self.fallback is not None:
            self.fallback.flush()
            return
        with contextlib.suppress(ValueError, OSError):
            self.log.flush()
        self.console.flush()

    def detach_to(self, stream: TextIO) -> None:
        with self.console.lock:
            self.fallback = stream


class Output:
    """Where a command writes its own lines: the console and the log file (`log` is None when not quiet)."""

    def __init__(self, console: _Console | None = None, log: TextIO | None = None, log_path: Path | None = None):
        self.console, self.log, self.log_path = console, log, log_path

    def echo(self, line: str) -> None:
        if self.console is None:
            print(line, flush=True)
            return
        with self.console.lock:
            self.log.write(line + "\n")
            self.log.flush()
            self.console.line(line)


def _fileno(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


@contextlib.contextmanager
def quiet(log_path: Path | None, verbose: bool = False, header: str = "") -> Iterator[Output]:
    """The console of a command: only the pipeline's lines and bars, the rest appended to `log_path`.
    `verbose` (or no log path): everything on the console, as without this."""
    if verbose or log_path is None:
        yield Output()
        return
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "a", encoding="utf-8", errors="replace", buffering=1)  # noqa: SIM115 closed below
    log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {header}".rstrip() + " =====\n")
    out, err = sys.stdout, sys.stderr
    for stream in (out, err):
        with contextlib.suppress(ValueError, OSError, AttributeError):
            stream.flush()
    saved: dict[int, int] = {}
    opened: list[TextIO] = []
    console_streams = {1: out, 2: err}
    try:
        for fd, stream in ((1, out), (2, err)):
            if _fileno(stream) == fd:
                saved[fd] = os.dup(fd)
                encoding = getattr(stream, "encoding", None) or "utf-8"
                console_streams[fd] = os.fdopen(os.dup(fd), "w", buffering=1, encoding=encoding, errors="replace")
                opened.append(console_streams[fd])
        for fd in saved:
            os.dup2(log.fileno(), fd)
        console = _Console(console_streams[1], console_streams[2])
        routers = (_Router(console, log, err=False), _Router(console, log, err=True))
        sys.stdout, sys.stderr = routers
        try:
            yield Output(console, log, log_path)
        finally:
            for router in routers:
                router.flush()
            sys.stdout, sys.stderr = out, err
            routers[0].detach_to(out)
            routers[1].detach_to(err)
            console.flush(end=True)
    finally:
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        for stream in opened:
            with contextlib.suppress(ValueError, OSError):
                stream.close()
        log.close()
