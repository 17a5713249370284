"""Progress of every long wait (tokenizing, loading and exporting weights, evaluation, analysis):
one helper for the whole project.

Public API:
    Progress(what, total=None, *, unit=None, rate_unit=None, log=None, enabled=None, mode=None,
             interval=None, stream=None, clock=time.monotonic)
        context manager; .update(n=1, *, extra=0), .status() -> str, .close()
    progress_mode(stream=None) -> "bar" | "lines" | "off"     ($Q_TUNING_PROGRESS resolved)
    MODE_ENV, INTERVAL_ENV

    with Progress("scoring", total=len(samples), unit="samples") as bar:
        for batch in batches:
            ...
            bar.update(len(batch))
    with Progress("loading weights from x.gguf"):      # an opaque call: start / still / done
        load()
    with Progress("decoding", total=rows, unit="rows", rate_unit="tokens") as bar:
        bar.update(0, extra=1)                        # a token; bar.update(1) a finished row

What it prints. On a terminal, a tqdm bar on stderr, redrawn in place at most twice a second. Not
on a terminal (a cluster job whose output goes to a file), carriage-return bars turn a log into
one endless line, so instead one plain line every `interval` seconds (default 30,
$Q_TUNING_PROGRESS_INTERVAL), written by a daemon thread so that an item that takes minutes still
shows the job is alive:

    decoding: 120/1000 rows (4.1 rows/s, 183 tokens/s, ETA 03:34)
    loading weights from x.gguf: still running (30 s)
    decoding: done, 1000/1000 rows in 04:02 (4.1 rows/s, 182 tokens/s)

The first line ("<what> ...") and the last ("<what>: done ...") are printed in both modes; they
and the periodic lines go to `log` (a logging.Logger: the tool's own log file gets them) when one
is given, else to `stream`; a bar always draws on `stream`. A Progress opened inside another (the tensors of a
load inside the trainer's "loading weights") speaks alone until it closes, into the same `log`. Only global rank 0 prints (`enabled` defaults to it:
every rank may create the same Progress). `$Q_TUNING_PROGRESS` forces a mode: `bar` (a bar even
into a file), `lines`, `off`, or `auto` (the default: bar on a terminal, else lines).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Callable, Optional, TextIO

from q_tuning.observe.env import env_number

__all__ = ["INTERVAL_ENV", "MODE_ENV", "Progress", "progress_mode"]

MODE_ENV = "Q_TUNING_PROGRESS"
INTERVAL_ENV = "Q_TUNING_PROGRESS_INTERVAL"
MODES = ("auto", "bar", "lines", "off")
DEFAULT_INTERVAL = 30.0
BAR_REFRESH = 0.5  # seconds between redraws of a terminal bar (tqdm's mininterval)
_OPEN: list["Progress"] = []  # open and printing, outermost first: only the innermost ticks


def progress_mode(stream: Optional[TextIO] = None) -> str:
    """`$Q_TUNING_PROGRESS` resolved for `stream` (default stderr): "bar", "lines" or "off"."""
    mode = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"environment variable {MODE_ENV} must be one of {', '.join(MODES)}, "
                         f"got {os.environ[MODE_ENV]!r}")
    if mode != "auto":
        return mode
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return "bar" if isatty is not None and isatty() else "lines"


def _interval() -> float:
    return env_number(INTERVAL_ENV, DEFAULT_INTERVAL, parse=float, minimum=0.0, strict=True)


def _duration(seconds: float) -> str:
    """`42 s` below a minute, else tqdm's `mm:ss` / `h:mm:ss`."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    from tqdm import tqdm

    return tqdm.format_interval(seconds)


class Progress:
    """Count, rate and ETA of one long wait; see the module doc. `total` None: no ETA (and, when
    nothing is ever counted, an opaque call: "still running" lines). `rate_unit`: a second count
    (`update(extra=...)`) shown as a rate only, e.g. tokens/s beside rows/s."""

    def __init__(self, what: str, total: Optional[int] = None, *, unit: Optional[str] = None,
                 rate_unit: Optional[str] = None, log: Optional[logging.Logger] = None,
                 enabled: Optional[bool] = None, mode: Optional[str] = None,
                 interval: Optional[float] = None, stream: Optional[TextIO] = None,
                 clock: Callable[[], float] = time.monotonic):
        if enabled is None:
            from q_tuning.parallel import comm

            enabled = comm.is_global_rank_zero()
        self.what, self.total, self.unit, self.rate_unit = what, total, unit or "items", rate_unit
        self.counted = unit is not None or total is not None
        self.stream = sys.stderr if stream is None else stream
        self.log = log if log is not None or not _OPEN else _OPEN[-1].log
        self.clock = clock
        self.mode = (mode or progress_mode(self.stream)) if enabled else "off"
        self.interval = interval if interval is not None else _interval()
        self.done = self.extra = 0
        self.start = clock()
        self._bar = None
        self._stop = threading.Event()
        self._ticker: Optional[threading.Thread] = None
        self._closed = False
        if self.mode != "off":
            self._open()

    # --- counting ---------------------------------------------------------------------------

    def update(self, n: int = 1, *, extra: int = 0) -> None:
        """`n` more items done (and `extra` more of `rate_unit`). Cheap: call it per token."""
        self.done += n
        self.extra += extra
        if self._bar is not None:
            if self.rate_unit and extra:
                self._bar.set_postfix_str(self._extra_rate(), refresh=False)
            self._bar.update(n)

    def status(self) -> str:
        """The current plain line, e.g. `scoring: 320/1000 samples (41.2 samples/s, ETA 16 s)`."""
        elapsed = max(self.clock() - self.start, 1e-9)
        if not self.counted and not self.done:
            return f"{self.what}: still running ({_duration(elapsed)})"
        rate = self.done / elapsed
        parts = [f"{rate:.1f} {self.unit}/s"]
        if self.rate_unit:
            parts.append(self._extra_rate(elapsed))
        count = f"{self.done}"
        if self.total is not None:
            count += f"/{self.total}"
            left = max(self.total - self.done, 0)
            parts.append(f"ETA {_duration(left / rate)}" if rate > 0 else "ETA ?")
        else:
            parts.append(_duration(elapsed))
        return f"{self.what}: {count} {self.unit} ({', '.join(parts)})"

    def _extra_rate(self, elapsed: Optional[float] = None) -> str:
        elapsed = max(self.clock() - self.start, 1e-9) if elapsed is None else elapsed
        return f"{self.extra / elapsed:.0f} {self.rate_unit}/s"

    # --- output -----------------------------------------------------------------------------

    def _say(self, line: str) -> None:
        if self.log is not None:
            self.log.info("%s", line)
        else:
            print(line, file=self.stream, flush=True)

    def _open(self) -> None:
        total = f" ({self.total} {self.unit})" if self.total is not None else ""
        self._say(f"{self.what} ...{total}")
        if self.mode == "bar":
            from tqdm import tqdm

            fmt = None if self.counted else "{desc}: {elapsed}"
            self._bar = tqdm(total=self.total, desc=self.what, unit=" " + self.unit,
                             file=self.stream, mininterval=BAR_REFRESH, dynamic_ncols=True,
                             leave=False, bar_format=fmt)
        _OPEN.append(self)
        self._ticker = threading.Thread(target=self._tick, daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        """Lines mode: a status line every `interval`; bar mode: redraw the elapsed time."""
        wait = self.interval if self.mode == "lines" else 1.0
        while not self._stop.wait(wait):
            if _OPEN and _OPEN[-1] is not self:
                continue  # an inner wait (weights inside an export) speaks for both
            if self.mode == "lines":
                self._say(self.status())
            elif self._bar is not None:
                self._bar.refresh()

    def close(self, failed: bool = False) -> None:
        """Stop the ticker, remove the bar, print the `done` line (once; `failed`: a
        `stopped after` line instead)."""
        if self._closed:
            return
        self._closed = True
        if self.mode == "off":
            return
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        if self in _OPEN:
            _OPEN.remove(self)
        if self._bar is not None:
            self._bar.close()
        self._say(f"{self.what}: stopped after {_duration(self.clock() - self.start)}"
                  if failed else self.final())

    def final(self) -> str:
        """The closing line: `<what>: done in 12 s` (opaque) or with the count and rates."""
        elapsed = self.clock() - self.start
        if not self.counted and not self.done:
            return f"{self.what}: done in {elapsed:.1f} s"
        count = f"{self.done}" + (f"/{self.total}" if self.total is not None else "")
        rates = [f"{self.done / max(elapsed, 1e-9):.1f} {self.unit}/s"]
        if self.rate_unit:
            rates.append(self._extra_rate(elapsed))
        return (f"{self.what}: done, {count} {self.unit} in {_duration(elapsed)} "
                f"({', '.join(rates)})")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close(failed=exc_type is not None)
