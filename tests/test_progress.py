"""Progress display modes, the download progress hook, tracking sinks (TensorBoard read back) and quiet libraries."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json

import pytest

from console.progress import Progress, checkpointed, counted, duration, resolve_mode
from errors import ConfigError
from owner.metrics import MetricsLog
from owner.tracking import ScalarSteps, flat_params, make_sinks
from protocol.chunks import ArchiveInfo, ChunkReceiver


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_is_a_bar_on_a_terminal_and_plain_lines_elsewhere():
    assert resolve_mode("auto", Terminal()) == "bar"
    assert resolve_mode("auto", io.StringIO()) == "plain"
    assert resolve_mode("none", Terminal()) == "none"
    assert resolve_mode("plain", Terminal()) == "plain"
    with pytest.raises(ConfigError, match="--progress"):
        resolve_mode("fancy", io.StringIO())


def test_duration_is_short():
    assert (duration(7.4), duration(125), duration(3723)) == ("7s", "2:05", "1:02:03")


def test_plain_lines_show_rate_and_eta_and_are_throttled():
    out, clock = io.StringIO(), Clock()
    p = Progress("plain", out, clock=clock, prefix=lambda: "> ")
    with p.task("model download", 100e6, in_bytes=True, interval=10.0) as task:
        clock.now += 2
        task.update_to(10e6)  # first: printed
        clock.now += 2
        task.update_to(20e6)  # 2 s later: not yet
        clock.now += 10
        task.update_to(70e6)  # 10 s after the last line: printed
        clock.now += 1
        task.update_to(100e6)  # last: printed
    lines = out.getvalue().splitlines()
    assert lines == [
        "> model download: 10.0/100.0 MB | 5.0 MB/s, ETA 18s",
        "> model download: 70.0/100.0 MB | 5.0 MB/s, ETA 6s",
        "> model download: 100.0/100.0 MB | 6.7 MB/s",
    ]


def test_a_resumed_task_counts_its_rate_from_what_it_adds():
    clock = Clock()
    task = Progress("plain", io.StringIO(), clock=clock).task("d", 100, initial=60)
    clock.now += 4
    task.update_to(80)
    assert task.rate() == pytest.approx(5.0) and task.eta() == pytest.approx(4.0)


def test_steps_print_first_every_fourth_and_last_with_the_loss():
    out, clock = io.StringIO(), Clock()
    p = Progress("plain", out, clock=clock)
    for step in range(1, 10):
        clock.now += 2
        p.step("round 1 party-1", step, 9, f"loss {1 / step:.2f}")
    lines = out.getvalue().splitlines()
    assert [line.split(" loss")[0] for line in lines] == [
        "round 1 party-1: step 1/9", "round 1 party-1: step 4/9", "round 1 party-1: step 8/9",
        "round 1 party-1: step 9/9"]
    assert lines[0] == "round 1 party-1: step 1/9 loss 1.00"  # no rate yet: step 1's start is unknown
    assert lines[1].endswith("loss 0.25 | 2.0 s/step, ETA 10s")
    assert lines[-1].endswith("| 2.0 s/step")


def test_none_mode_shows_no_progress_but_keeps_ordinary_lines():
    out = io.StringIO()
    p = Progress("none", out)
    p.step("pre-alignment", 1, 2, "loss 1")
    p.step("pre-alignment", 2, 2, "loss 1")
    p.task("x", 10).update(10)
    p.line("round 1/1 done")
    assert out.getvalue() == "round 1/1 done\n"


def test_bar_mode_draws_a_tqdm_bar_with_rate_and_keeps_lines_readable():
    out = Terminal()
    p = Progress("auto", out)
    assert p.mode == "bar"
    task = p.task("model download", 8e6, in_bytes=True)
    task.update_to(4e6)
    p.line("welcomed")
    task.update_to(8e6)
    task.close()
    text = out.getvalue()
    assert "model download" in text and "8.00M/8.00M" in text and "B/s" in text
    assert "welcomed\n" in text
    assert "\r" in text  # redrawn in place, not a line per update


def test_metrics_log_plain_lines_keep_their_format(tmp_path):
    out = io.StringIO()
    log = MetricsLog(tmp_path / "metrics.jsonl", stream=out, progress="plain")
    log.align_step({"stage": -1, "step": 1, "steps": 2, "loss": 1.5, "l2": 1.0, "kl": 0.5})
    log.align_step({"stage": 0, "step": 1, "steps": 1, "loss": 1.0, "l2": 0.5, "kl": 0.5})
    log.rounds_started(2, 0)
    log.train_step({"party": "party-1", "round": 0, "step": 1, "steps": 2, "loss": 2.0})
    log.round_finished(1)
    log.close()
    text = out.getvalue()
    assert "] pre-alignment: step 1/2 loss 1.5000 (l2 1.0000, kl 0.5000)" in text
    assert "] round 1 alignment: step 1/1 loss 1.0000" in text
    assert "] round 1 party-1: step 1/2 loss 2.0000" in text
    assert "] run: round 1/2 |" in text and "ETA" in text
    events = [json.loads(line)["event"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert events == ["align_step", "align_step", "party_step"]


def test_the_time_per_round_leaves_out_the_wait_before_the_first_round():
    clock = Clock()
    out = io.StringIO()
    log = MetricsLog(None, stream=out, progress="plain")
    log.progress.clock = clock
    log.rounds_started(3, 0)
    clock.now += 500  # parties joining
    log.round_finished(1, seconds=20.0)
    clock.now += 30
    log.round_finished(2, seconds=30.0)
    lines = [line.split("] ", 1)[1] for line in out.getvalue().splitlines()]
    assert lines == ["run: round 1/3 | 20.0 s/round, ETA 40s", "run: round 2/3 | 25.0 s/round, ETA 25s"]


def test_quiet_metrics_log_prints_nothing(tmp_path):
    out = io.StringIO()
    log = MetricsLog(tmp_path / "m.jsonl", stream=out, quiet=True, progress="plain")
    log.say("hello")
    log.train_step({"party": "p", "round": 0, "step": 1, "steps": 1, "loss": 1.0})
    assert out.getvalue() == ""


def test_the_chunk_receiver_reports_bytes_received(tmp_path):
    data = bytes(range(256)) * 10
    info = ArchiveInfo(hashlib.sha256(data).hexdigest(), len(data), 1000)
    seen: list[tuple[int, int]] = []
    receiver = ChunkReceiver(tmp_path, info, on_progress=lambda done, total: seen.append((done, total)))
    for i in (2, 0):
        chunk = data[i * 1000:(i + 1) * 1000]
        receiver.add(i, chunk, hashlib.sha256(chunk).hexdigest())
    assert seen == [(560, 2560), (1560, 2560)]
    assert ChunkReceiver(tmp_path, info).received_bytes == 1560  # a restarted party starts from there


def test_scalars_flatten_events_with_resumable_steps():
    steps = ScalarSteps()
    got = steps.scalars({"event": "round", "time": 3.0, "round": 2, "train_loss": 1.5, "participants": ["a"],
                         "mb_up": 0.5, "parties": {"party-1": {"loss_mean": 1.4, "epsilon": 2.0}},
                         "dp": {"party-1": {"epsilon": 2.0, "delta": 1e-5}}, "secure": True})
    assert set(got) == {("round/train_loss", 1.5, 2), ("round/mb_up", 0.5, 2),
                        ("round/parties/party-1/loss_mean", 1.4, 2), ("round/parties/party-1/epsilon", 2.0, 2),
                        ("round/dp/party-1/epsilon", 2.0, 2)}  # delta is a setting, not a series
    assert steps.scalars({"event": "party_step", "party": "p2", "round": 1, "step": 3, "steps": 4, "loss": 0.7}) \
        == [("party_step/p2/loss", 0.7, 7)]
    assert steps.scalars({"event": "align_step", "stage": -1, "step": 5, "steps": 9, "loss": 1.0, "l2": 0.5,
                          "kl": 0.5})[0] == ("pre_alignment_step/loss", 1.0, 5)
    assert steps.scalars({"event": "align_step", "stage": 2, "step": 1, "steps": 4, "loss": 1.0, "l2": 0.5,
                          "kl": 0.5})[0] == ("align_step/loss", 1.0, 9)


def test_settings_and_counts_are_no_scalar_series():
    steps = ScalarSteps()
    got = steps.scalars({"event": "summary", "rounds": 3, "parties": 3, "eval_items": 32, "adapter_layers": 2,
                         "emulator_lora_params": 9, "nll_adapfu": 1.3, "seconds": 60.0, "mb_up_total": 1.5})
    assert {tag for tag, _, _ in got} == {"summary/nll_adapfu", "summary/seconds", "summary/mb_up_total"}
    got = steps.scalars({"event": "round", "round": 1, "parties": {"p": {"steps": 8, "loss_mean": 2.0}},
                         "alignment": {"steps": 4, "seconds": 9.0}, "phase_seconds": {"alignment": 9.0}})
    assert {tag for tag, _, _ in got} == {"round/parties/p/loss_mean", "round/alignment/seconds",
                                          "round/phase_seconds/alignment"}
    assert steps.scalars({"event": "fidelity", "stage": -1, "cosine": 0.5, "batches": 2}) == [
        ("fidelity/cosine", 0.5, 1)]


def test_settings_flatten_into_hyperparameters():
    assert flat_params({"lr": 0.1, "model": None, "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]},
                        "dp": None, "secure_agg": True}) == {
        "lr": 0.1, "model": "none", "lora.r": 8, "lora.target_modules": "q_proj,v_proj", "dp": "none",
        "secure_agg": True}


def test_a_phase_shows_from_its_start_with_rate_and_eta():
    out, clock = io.StringIO(), Clock()
    p = Progress("plain", out, clock=clock)
    p.step("pre-alignment", 0, 8)  # before the first step: shown at once, and step 1 gets a rate
    for step in range(1, 9):
        clock.now += 2.0
        p.step("pre-alignment", step, 8, "loss 1.0")
    assert out.getvalue().splitlines() == [
        "pre-alignment: step 0/8", "pre-alignment: step 4/8 loss 1.0 | 2.0 s/step, ETA 8s",
        "pre-alignment: step 8/8 loss 1.0 | 2.0 s/step"]
    log = MetricsLog(None, stream=io.StringIO(), progress="plain")
    with log.phase("gradient fidelity", 2, unit="batch") as task:
        task.update_to(1)
        task.update_to(2)
    lines = [line.split("] ", 1)[1] for line in log.stream.getvalue().splitlines()]
    assert lines[0] == "gradient fidelity: batch 0/2" and lines[-1].startswith("gradient fidelity: batch 2/2 |")


def test_counts_take_their_noun_in_the_right_number():
    assert [counted(1, "round"), counted(3, "round"), counted(1, "party"), counted(2, "party"),
            counted(0, "key")] == ["1 round", "3 rounds", "1 party", "2 parties", "0 keys"]
    assert [checkpointed(1), checkpointed(2)] == ["1 round is checkpointed", "2 rounds are checkpointed"]


def test_output_piped_into_a_command_that_stops_reading_ends_quietly(capsys):
    from console.terminal import run_cli

    def run(argv):
        raise BrokenPipeError

    assert run_cli(run, []) == 1
    assert capsys.readouterr().err == ""


def test_report_to_rejects_unknown_sinks():
    assert make_sinks("none") == [] and make_sinks(None) == []
    with pytest.raises(ConfigError, match="--report-to"):
        make_sinks("wandb")


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is not None, reason="mlflow is installed")
def test_report_to_mlflow_without_mlflow_names_the_extra():
    with pytest.raises(ConfigError, match=r"mlflow package: pip install 'fedbiot\[mlflow\]'"):
        make_sinks("mlflow")


def test_tensorboard_receives_every_metrics_event(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(None, stream=None, sinks=make_sinks("tensorboard"))
    log.record("before_the_run_dir", value=1.0)  # not in metrics.jsonl, so not in TensorBoard either
    log.path = tmp_path / "metrics.jsonl"
    log.params({"train": {"lr": 0.002, "local_steps": 8}, "model": None, "rounds": 1})
    log.align_step({"stage": -1, "step": 1, "steps": 1, "loss": 2.5, "l2": 1.5, "kl": 1.0})
    for step in (1, 2):
        log.train_step({"party": "party-1", "round": 0, "step": step, "steps": 2, "loss": 3.0 - step})
    log.record("round", round=1, train_loss=1.5, mb_down=15.7, mb_up=1.3, seconds=36.0,
               parties={"party-1": {"epsilon": 2.5}})
    log.record("summary", rounds=1, nll_base=1.39, nll_adapfu=1.38, base_model="x")
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"pre_alignment_step/loss", "party_step/party-1/loss", "round/train_loss", "round/mb_down",
            "round/seconds", "round/parties/party-1/epsilon", "summary/nll_base", "summary/nll_adapfu"} <= tags
    assert not any(t.startswith("before_the_run_dir") for t in tags)
    losses = [(e.step, round(e.value, 4)) for e in events.Scalars("party_step/party-1/loss")]
    assert losses == [(1, 2.0), (2, 1.0)]
    assert [(e.step, round(e.value, 3)) for e in events.Scalars("round/mb_down")] == [(1, 15.7)]
    assert [round(e.value, 3) for e in events.Scalars("summary/nll_adapfu")] == [1.38]
    assert not any(t.startswith("summary/rounds") for t in tags)  # a setting, not a series
    # The settings as TensorBoard's HParams, in this run's own event file, against the summary NLLs
    from tensorboard.plugins.hparams import plugin_data_pb2

    hparams = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    hparams.Reload()
    data = [plugin_data_pb2.HParamsPluginData.FromString(content)
            for content in hparams.PluginTagToContent("hparams").values()]
    start = next(d.session_start_info for d in data if d.HasField("session_start_info"))
    assert start.hparams["train.lr"].number_value == pytest.approx(0.002)
    assert start.hparams["model"].string_value == "none" and start.hparams["rounds"].number_value == 1
    experiment = next(d.experiment for d in data if d.HasField("experiment"))
    assert "summary/nll_adapfu" in {m.name.tag for m in experiment.metric_infos}


def test_mlflow_receives_every_metrics_event(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    log = MetricsLog(None, stream=None, sinks=make_sinks("mlflow"))
    log.path = tmp_path / "metrics.jsonl"
    log.params({"train": {"lr": 0.002}, "model": None})
    for step in (1, 2):
        log.train_step({"party": "party-1", "round": 0, "step": step, "steps": 2, "loss": 3.0 - step})
    log.record("round", round=1, train_loss=1.5, mb_down=15.7, parties={"party-1": {"epsilon": 2.5}})
    log.close()
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("fedbiot").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_name == tmp_path.name
    assert runs[0].data.metrics == {"party_step/party-1/loss": 1.0, "round/train_loss": 1.5, "round/mb_down": 15.7,
                                    "round/parties/party-1/epsilon": 2.5}
    assert runs[0].data.params == {"train.lr": "0.002", "model": "none"}
    history = client.get_metric_history(runs[0].info.run_id, "party_step/party-1/loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.0)]


def test_quiet_libraries_disables_the_gguf_loading_bar():
    from console.terminal import quiet_libraries

    quiet_libraries()
    from transformers import modeling_gguf_pytorch_utils as gguf_loader

    out = io.StringIO()
    for _ in gguf_loader.tqdm(range(3), desc="Converting", file=out):
        pass
    assert out.getvalue() == ""
    quiet_libraries()  # twice is harmless: still one wrapper
    assert gguf_loader.tqdm.keywords == {"disable": True}
