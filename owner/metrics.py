"""Progress on the terminal and metrics as JSONL, so a long run is visible now and plottable later.

Every event goes to `metrics.jsonl` and to the `--report-to` sinks (TensorBoard, MLflow); progress of
pre-alignment, local steps and rounds goes to a `console.progress.Progress` (bar, plain lines or none).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from console.progress import Progress, Task
from owner.tracking import Sink


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
            if not self._sinks_open:
                for sink in self.sinks:
                    sink.open(self.path.parent)
                self._sinks_open = True
            for sink in self.sinks:
                sink.write(row)

    def say(self, line: str) -> None:
        if self.stream and not self.quiet:
            self.progress.line(line)

    def train_step(self, info: dict) -> None:
        self.record("party_step", **info)
        self.progress.step(f"round {info['round'] + 1} {info['party']}", info["step"], info["steps"],
                           f"loss {info['loss']:.4f}")

    def align_step(self, info: dict) -> None:
        self.record("align_step", **info)
        stage = "pre-alignment" if info["stage"] < 0 else f"round {info['stage'] + 1} alignment"
        self.progress.step(stage, info["step"], info["steps"],
                           f"loss {info['loss']:.4f} (l2 {info['l2']:.4f}, kl {info['kl']:.4f})")

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


def megabytes(n_bytes: int) -> float:
    return n_bytes / 1e6
