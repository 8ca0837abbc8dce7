"""Progress on the terminal and metrics as JSONL, so a long run is visible now and plottable later."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TextIO


class MetricsLog:
    """Appends one JSON object per event to `metrics.jsonl` and prints a short line for the humans."""

    def __init__(self, path: Path | None, stream: TextIO | None = sys.stderr, quiet: bool = False) -> None:
        self.path = Path(path) if path else None
        self.stream = stream
        self.quiet = quiet
        self.start = time.time()

    def record(self, event: str, **fields) -> None:
        row = {"event": event, "time": round(time.time() - self.start, 3), **fields}
        if self.path:
            with self.path.open("a") as fh:
                fh.write(json.dumps(row, default=float) + "\n")

    def say(self, line: str) -> None:
        if self.stream and not self.quiet:
            print(f"[{time.time() - self.start:7.1f}s] {line}", file=self.stream, flush=True)

    def train_step(self, info: dict) -> None:
        self.record("party_step", **info)
        if info["step"] == info["steps"] or info["step"] % 4 == 0 or info["step"] == 1:
            self.say(f"round {info['round'] + 1} {info['party']}: step {info['step']}/{info['steps']} "
                     f"loss {info['loss']:.4f}")

    def align_step(self, info: dict) -> None:
        self.record("align_step", **info)
        if info["step"] == info["steps"] or info["step"] % 4 == 0 or info["step"] == 1:
            stage = "pre-alignment" if info["stage"] < 0 else f"round {info['stage'] + 1} alignment"
            self.say(f"{stage}: step {info['step']}/{info['steps']} loss {info['loss']:.4f} "
                     f"(l2 {info['l2']:.4f}, kl {info['kl']:.4f})")


def megabytes(n_bytes: int) -> float:
    return n_bytes / 1e6

