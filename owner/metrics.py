"""Progress on the terminal and metrics as JSONL, so a long run is visible now and plottable later.

Every event goes to `metrics.jsonl` and to the `--report-to` sinks (TensorBoard, MLflow), and the run's settings
to the sinks as hyperparameters; progress of every phase that takes a while (alignment, local steps, gradient
fidelity, evaluation, rounds) goes to a `console.progress.Progress` (bar, plain lines or none).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from console.progress import Progress, Task
from owner.tracking import Sink, flat_params


class MetricsLog:
    """Appends one JSON object per event to `metrics.jsonl`, feeds the sinks, shows progress.

    `quiet` silences the terminal entirely; `progress` picks how progress is shown (see console.progress).
    The sinks open when the run directory is known (`path` set), so they receive exactly what
    metrics.jsonl receives.
    """

    def __init__(self, path: Path | None, stream: TextIO | None | str = "stderr", quiet: bool = False,
                 progress: str = "auto", sinks: Sequence[Sink] = ()) -> None:
        self.path = Path(path) if path else None
        self.stream = sys.stderr if stream == "stderr" else stream  # the stderr of now, not of import time
        self.quiet = quiet
        self.start = time.time()
        silent = quiet or self.stream is None
        self.progress = Progress("none" if silent else progress, self.stream, prefix=self._stamp)
        self.sinks = list(sinks)
        self._sinks_open = False
        self._rounds: Task | None = None

    def _stamp(self) -> str:
        return f"[{time.time() - self.start:7.1f}s] "

    def record(self, event: str, **fields) -> None:
        row = {"event": event, "time": round(time.time() - self.start, 3), **fields}
        if self.path:
            with self.path.open("a") as fh:
                fh.write(json.dumps(row, default=float) + "\n")
            for sink in self._open_sinks():
                sink.write(row)

    def params(self, params: dict) -> None:
        """The run's settings (nested sections flattened: `train.lr`) as hyperparameters of the sinks; once the
        run directory is known."""
        flat = flat_params(params)
        for sink in self._open_sinks():
            sink.params(flat)

    def _open_sinks(self) -> list[Sink]:
        if self.path and not self._sinks_open:
            for sink in self.sinks:
                sink.open(self.path.parent)
            self._sinks_open = True
        return self.sinks if self._sinks_open else []

    def say(self, line: str) -> None:
        if self.stream and not self.quiet:
            self.progress.line(line)

    def train_step(self, info: dict) -> None:
        self.record("party_step", **info)
        self.progress.step(f"round {info['round'] + 1} {info['party']}", info["step"], info["steps"],
                           f"loss {info['loss']:.4f}")

    def align_started(self, stage: int, steps: int) -> None:
        """Alignment of `stage` (-1: pre-alignment) begins: its progress shows from now, not from its first step."""
        if steps:
            self.progress.step(_alignment(stage), 0, steps)

    def align_step(self, info: dict) -> None:
        self.record("align_step", **info)
        self.progress.step(_alignment(info["stage"]), info["step"], info["steps"],
                           f"loss {info['loss']:.4f} (l2 {info['l2']:.4f}, kl {info['kl']:.4f})")

    def phase(self, desc: str, total: int, unit: str = "step") -> Task:
        """Work of a known size, shown from its start with rate and ETA: a bar, or plain lines (the start, the
        end, and one at least every 30 s between). Update it, then close it (or use `with`)."""
        task = self.progress.task(desc, total, unit=unit, leave=False)
        task.update_to(0)
        return task

    def rounds_started(self, total: int, done: int = 0) -> None:
        """The rounds to come: a bar (or a line per round) with the time per round and the ETA."""
        if self._rounds is None and done < total:
            self._rounds = self.progress.task("run", total, unit="round", initial=done, every=1)

    def round_finished(self, done: int, seconds: float | None = None) -> None:
        """Round `done` is complete; `seconds` (its own duration) keeps the wait for parties to join out of
        the time per round when it is the first round of this process."""
        if self._rounds is not None:
            if seconds is not None and self._rounds.done == self._rounds.initial:
                self._rounds.restart_clock(seconds)
            self._rounds.update_to(done)
            if done >= self._rounds.total:
                self._rounds.close()
                self._rounds = None

    def close(self) -> None:
        """End the progress display and flush and close the sinks (safe to call twice)."""
        self.progress.close()
        if self._rounds is not None:
            self._rounds.close()
            self._rounds = None
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def _alignment(stage: int) -> str:
    return "pre-alignment" if stage < 0 else f"round {stage + 1} alignment"


def megabytes(n_bytes: int) -> float:
    return n_bytes / 1e6
