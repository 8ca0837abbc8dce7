"""Progress of long work (downloads, alignment, local steps, rounds) in one of three forms.

`bar`: tqdm bars with rate and ETA, for a person at a terminal. `plain`: whole lines (the first, the last,
every Nth and at least one every `interval` seconds) with rate and ETA, for logs. `none`: no progress
display; ordinary lines still print. `auto` is `bar` when the stream is a terminal, else `plain`.
"""

from __future__ import annotations

import io
import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

from errors import ConfigError

MODES = ("auto", "bar", "plain", "none")


def resolve_mode(mode: str, stream: TextIO | None) -> str:
    """`auto` -> `bar` on a terminal, `plain` otherwise; an unknown mode is a ConfigError."""
    if mode not in MODES:
        raise ConfigError(f"--progress must be one of {', '.join(MODES)}, not {mode!r}")
    if stream is None:
        return "none"
    if mode != "auto":
        return mode
    try:
        return "bar" if stream.isatty() else "plain"
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return "plain"


def duration(seconds: float) -> str:
    """`1:02:03`, `2:03` or `7s`: short enough for a progress line."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes}:{secs:02d}" if minutes else f"{secs}s"


class Task:
    """One piece of long work with a known total. Use `update`/`update_to`, then `close` (or `with`)."""

    def __init__(self, progress: Progress, desc: str, total: float, *, unit: str = "step", initial: float = 0,
                 in_bytes: bool = False, every: int | None = None, interval: float = 30.0, leave: bool = True
                 ) -> None:
        self.progress, self.desc, self.total, self.unit = progress, desc, total, unit
        self.in_bytes, self.every, self.interval = in_bytes, every, interval
        self.initial = self.done = initial
        self.note = ""
        self.started = self.last_line = progress.clock()
        self.lines = 0
        self.closed = False
        self.bar = None
        if progress.mode == "bar":
            from tqdm import tqdm  # noqa: PLC0415

            unit_kw = {"unit": "B", "unit_scale": True, "unit_divisor": 1000} if in_bytes else {"unit": unit}
            width = {"dynamic_ncols": True} if _has_width(progress.stream) else {"ncols": 100}
            self.bar = tqdm(total=total, initial=initial, desc=desc, file=progress.stream, leave=leave,
                            disable=False, **width, **unit_kw)

    # ------------------------------------------------------------------------- progress
    def update(self, n: float = 1, note: str | None = None) -> None:
        self.update_to(self.done + n, note)

    def update_to(self, done: float, note: str | None = None) -> None:
        """Set the amount done so far (and the note shown after it, e.g. the loss)."""
        if self.closed:
            return
        step, self.done = done - self.done, done
        if note is not None:
            self.note = note
        if self.bar is not None:
            if note is not None:
                self.bar.set_postfix_str(note, refresh=not step)
            if step:
                self.bar.update(step)
        elif self.progress.mode == "plain" and (step or not self.lines) and self._line_due():
            self._print_line()

    def restart_clock(self, seconds_ago: float) -> None:
        """Count the rate from `seconds_ago` (e.g. the real start of the first unit of work, when the task
        was opened long before it, waiting for something else)."""
        self.started = self.progress.clock() - seconds_ago
        if self.bar is not None:
            self.bar.start_t = self.bar.last_print_t = self.bar._time() - seconds_ago

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Task:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------- figures
    def rate(self) -> float | None:
        """Units per second since the task began (what was already done at the start does not count)."""
        elapsed = self.progress.clock() - self.started
        moved = self.done - self.initial
        return moved / elapsed if elapsed > 0 and moved > 0 else None

    def eta(self) -> float | None:
        rate = self.rate()
        return None if rate is None else max(0.0, (self.total - self.done) / rate)

    def line(self) -> str:
        """The plain-mode line: `desc: step 4/16 loss 2.31 | 0.8 s/step, ETA 10s`."""
        if self.in_bytes:
            text = f"{self.desc}: {self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB"
        else:
            text = f"{self.desc}: {self.unit} {_count(self.done)}/{_count(self.total)}"
        if self.note:
            text += f" {self.note}"
        rate = self.rate()
        if rate is not None:
            if self.in_bytes:
                speed = f"{rate / 1e6:.1f} MB/s"
            elif rate >= 1:
                speed = f"{rate:.1f} {self.unit}/s"
            else:
                speed = f"{1 / rate:.1f} s/{self.unit}"
            text += f" | {speed}"
            if self.done < self.total:
                text += f", ETA {duration(self.eta() or 0.0)}"
        return text

    def _line_due(self) -> bool:
        if self.done >= self.total or self.lines == 0:
            return True
        if self.every is not None and not self.in_bytes and int(self.done) % self.every == 0:
            return True
        return self.progress.clock() - self.last_line >= self.interval

    def _print_line(self) -> None:
        self.lines += 1
        self.last_line = self.progress.clock()
        self.progress.line(self.line())


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`1 round`, `3 rounds`, `2 parties`: a count with its noun in the right number."""
    if n == 1:
        return f"{n} {noun}"
    return f"{n} {plural or (noun[:-1] + 'ies' if noun.endswith('y') and noun[-2:-1] not in 'aeiou' else noun + 's')}"


def checkpointed(rounds: int) -> str:
    """`1 round is checkpointed`, `3 rounds are checkpointed`: what a stopped run can resume from."""
    return f"{counted(rounds, 'round')} {'is' if rounds == 1 else 'are'} checkpointed"


def _has_width(stream: TextIO) -> bool:
    """Whether the terminal reports its width (a pseudo-terminal may say 0 columns: tqdm then draws nothing)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False


def _count(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


class Progress:
    """Where progress and ordinary lines go, in the chosen mode; `prefix` stamps each plain line."""

    def __init__(self, mode: str = "auto", stream: TextIO | None = None, *, prefix: Callable[[], str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.mode = resolve_mode(mode, self.stream)
        self.prefix = prefix
        self.clock = clock
        self._steps: tuple[str, Task] | None = None

    def line(self, text: str) -> None:
        """An ordinary line (printed in every mode; in bar mode above the bars, which are redrawn)."""
        text = (self.prefix() if self.prefix else "") + text
        if self.mode == "bar":
            from tqdm import tqdm  # noqa: PLC0415

            tqdm.write(text, file=self.stream)
            self.stream.flush()
        else:
            print(text, file=self.stream, flush=True)

    def task(self, desc: str, total: float, **kwargs) -> Task:
        """A new task (see `Task` for the keyword arguments); in `none` mode it shows nothing."""
        return Task(self, desc, total, **kwargs)

    def step(self, desc: str, step: int, steps: int, note: str = "", every: int = 4) -> None:
        """Report step `step` of `steps` from a per-step callback: a new `desc` (or a step not past the last one
        reported) opens a task, the last step closes it. Step 0, reported before the first step starts, shows
        the task from its start (a bar at 0, a first plain line) and gives step 1 its rate. Plain mode prints
        the first step reported, every `every`th and the last."""
        current = self._steps
        if current is None or current[0] != desc or step <= current[1].done or current[1].closed:
            if current is not None:
                current[1].close()
            # counted from now: the step just reported gives no rate (its start is not known)
            task = self.task(desc, steps, initial=step, every=every, leave=False)
            current = self._steps = (desc, task)
        current[1].update_to(step, note)
        if step >= steps:
            current[1].close()
            self._steps = None

    def close(self) -> None:
        if self._steps is not None:
            self._steps[1].close()
            self._steps = None
