"""`--report-to`: the run's settings as hyperparameters, and the events of metrics.jsonl as scalars, in
TensorBoard or MLflow too.

Both are optional extras (`pip install 'fedbiot[tensorboard]'`, `'fedbiot[mlflow]'`, or `'fedbiot[tracking]'`
for both), imported only when asked for, so a run that does not report anywhere never loads them. The settings
(config.json, flattened: `train.lr`, `lora.r`, ...) and the layout the model was compressed to are logged once as
hyperparameters: MLflow params, TensorBoard's HParams (against the summary NLLs). Each event becomes scalars
named `event/field` (nested fields joined with `/`): losses, MB, seconds, epsilon, NLL; counts that are settings
(steps per round, batches, layers, DP delta...) are not drawn as series. Steps are chosen so a resumed run
continues its curves instead of overwriting them: the round number for rounds, the global step for party and
alignment steps.
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


# Numeric fields that are settings or fixed counts, not measurements: hyperparameters, never scalar series.
CONSTANTS = frozenset({"steps", "batches", "rounds", "parties", "eval_items", "answer_items", "emulator_layers",
                       "adapter_layers", "adapter_lora_params", "emulator_lora_params", "n_examples", "delta",
                       "noise_multiplier", "sample_rate", "max_grad_norm", "ring_bits", "stage"})
# The scalars TensorBoard's HParams view sets against the hyperparameters (the summary event's).
HPARAM_METRICS = ("summary/nll_adapfu", "summary/nll_adapemu", "summary/nll_base", "summary/answer_nll_adapfu")


class Sink(Protocol):
    """Receives the run's hyperparameters and every event written to metrics.jsonl; opened once the run
    directory exists."""

    def open(self, run_dir: Path) -> None: ...

    def params(self, params: Mapping[str, Any]) -> None: ...

    def write(self, row: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def flat_params(data: Mapping[str, Any], prefix: str = "") -> dict[str, int | float | str | bool]:
    """Nested settings as one level of hyperparameters: `{"train": {"lr": 0.002}}` -> `{"train.lr": 0.002}`;
    None becomes "none" and a list its items joined by commas (both trackers take scalars and text only)."""
    out: dict[str, int | float | str | bool] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_params(value, f"{name}."))
        elif value is None:
            out[name] = "none"
        elif isinstance(value, list | tuple):
            out[name] = ",".join(str(v) for v in value)
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def _numbers(prefix: str, value: Any) -> Iterator[tuple[str, float]]:
    if isinstance(value, bool) or value is None or isinstance(value, str | list | tuple):
        return
    if isinstance(value, Mapping):
        for key, inner in value.items():
            if not (key in CONSTANTS and not isinstance(inner, Mapping)):
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
        return [(tag[1:], number, step) for tag, number in _numbers("", {prefix: fields})]


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

    def params(self, params: Mapping[str, Any]) -> None:
        """HParams in this run's own event file (`add_hparams` would open a run of its own), set against the
        summary's NLL scalars, which the run logs when it ends."""
        from torch.utils.tensorboard.summary import hparams  # noqa: PLC0415

        for summary in hparams(dict(params), dict.fromkeys(HPARAM_METRICS, 0.0)):
            self.writer._get_file_writer().add_summary(summary)
        self.writer.add_text("config", "\n".join(f"    {k} = {v}" for k, v in params.items()))

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

    def params(self, params: Mapping[str, Any]) -> None:
        self.mlflow.log_params(dict(params))

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
