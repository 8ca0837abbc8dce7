"""`--report-to`: the events of metrics.jsonl, as scalars, in TensorBoard or MLflow too.

Both are optional extras (`pip install 'fedbiot[tensorboard]'`, `'fedbiot[mlflow]'`, or `'fedbiot[tracking]'`
for both), imported only when asked for, so a run that does not report anywhere never loads them. Each event
becomes scalars named `event/field` (nested fields joined with `/`): losses, MB, seconds, epsilon, NLL. Steps
are chosen so a resumed run continues its curves instead of overwriting them: the round number for rounds,
the global step for party and alignment steps.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from errors import ConfigError

REPORT_TO = ("tensorboard", "mlflow", "none")


class Sink(Protocol):
    """Receives every event written to metrics.jsonl; opened once the run directory exists."""

    def open(self, run_dir: Path) -> None: ...

    def write(self, row: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def _numbers(prefix: str, value: Any) -> Iterator[tuple[str, float]]:
    if isinstance(value, bool) or value is None or isinstance(value, str | list | tuple):
        return
    if isinstance(value, Mapping):
        for key, inner in value.items():
            yield from _numbers(f"{prefix}/{key}", inner)
    elif isinstance(value, int | float) and math.isfinite(value):
        yield prefix, float(value)


class ScalarSteps:
    """Turns metrics.jsonl rows into (tag, value, step) scalars."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def scalars(self, row: Mapping[str, Any]) -> list[tuple[str, float, int]]:
        event = str(row.get("event", "event"))
        fields = {k: v for k, v in row.items() if k not in ("event", "time")}
        prefix = event
        if event == "party_step" and {"round", "step", "steps"} <= fields.keys():
            prefix = f"party_step/{fields.pop('party', 'party')}"
            step = int(fields.pop("round")) * int(fields["steps"]) + int(fields.pop("step"))
            fields.pop("steps")
        elif event == "align_step" and {"stage", "step", "steps"} <= fields.keys():
            stage = int(fields.pop("stage"))
            prefix = "pre_alignment_step" if stage < 0 else "align_step"
            step = int(fields.pop("step")) + max(stage, 0) * int(fields["steps"])
            fields.pop("steps")
        elif event == "round" and "round" in fields:
            step = int(fields.pop("round"))
        elif event == "summary":
            step = int(fields.get("rounds", 0))
        else:
            self.counts[event] += 1
            step = self.counts[event]
        out: list[tuple[str, float, int]] = []
        for key, value in fields.items():
            out.extend((tag, number, step) for tag, number in _numbers(f"{prefix}/{key}", value))
        return out


class TensorBoardSink:
    """Event files under RUN/tensorboard (`tensorboard --logdir RUN/tensorboard`)."""

    def __init__(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415
        except ImportError:
            raise ConfigError("--report-to tensorboard needs the tensorboard package: "
                              "pip install 'fedbiot[tensorboard]'") from None
        self._writer_class = SummaryWriter
        self.writer = None
        self.steps = ScalarSteps()

    def open(self, run_dir: Path) -> None:
        self.log_dir = Path(run_dir) / "tensorboard"
        self.writer = self._writer_class(log_dir=str(self.log_dir))

    def write(self, row: Mapping[str, Any]) -> None:
        for tag, value, step in self.steps.scalars(row):
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None


class MLflowSink:
    """One MLflow run per owner run. The store is MLFLOW_TRACKING_URI when set (its experiment: MLflow's own
    settings), else a SQLite database RUN/mlflow.db with an experiment `fedbiot` (MLflow 3 refuses a plain
    directory store), so `mlflow ui --backend-store-uri sqlite:///RUN/mlflow.db` shows it."""

    def __init__(self) -> None:
        try:
            import mlflow  # noqa: PLC0415
        except ImportError:
            raise ConfigError("--report-to mlflow needs the mlflow package: pip install 'fedbiot[mlflow]'") from None
        self.mlflow = mlflow
        self.active = False
        self.steps = ScalarSteps()

    def open(self, run_dir: Path) -> None:
        run_dir = Path(run_dir).resolve()
        experiment_id = None
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            self.mlflow.set_tracking_uri(f"sqlite:///{run_dir / 'mlflow.db'}")
            found = self.mlflow.get_experiment_by_name("fedbiot")
            experiment_id = found.experiment_id if found is not None else self.mlflow.create_experiment(
                "fedbiot", artifact_location=(run_dir / "mlflow-artifacts").as_uri())
        self.mlflow.start_run(experiment_id=experiment_id, run_name=run_dir.name)
        self.active = True

    def write(self, row: Mapping[str, Any]) -> None:
        by_step: dict[int, dict[str, float]] = {}
        for tag, value, step in self.steps.scalars(row):
            by_step.setdefault(step, {})[tag] = value
        for step, metrics in by_step.items():
            self.mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        if self.active:
            self.mlflow.end_run()
            self.active = False


def make_sinks(report_to: str | None) -> list[Sink]:
    """Sinks for `--report-to` (comma-separated: `tensorboard,mlflow`); `none` or empty gives none.
    A missing package is a ConfigError before the run starts, naming the extra to install."""
    names = [n.strip().lower() for n in (report_to or "none").split(",") if n.strip()]
    unknown = [n for n in names if n not in REPORT_TO]
    if unknown:
        raise ConfigError(f"--report-to takes {', '.join(REPORT_TO)} (comma-separated), not {', '.join(unknown)}")
    sinks: list[Sink] = []
    for name in dict.fromkeys(names):
        if name == "tensorboard":
            sinks.append(TensorBoardSink())
        elif name == "mlflow":
            sinks.append(MLflowSink())
    return sinks
