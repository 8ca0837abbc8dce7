"""`--config FILE`: TOML or a run's config.json as defaults, flags override, bad keys are one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from console.config_file import parse_with_config
from errors import ConfigError
from learning.dp import DPSettings
from learning.lora import LoraSettings
from learning.training import TrainSettings
from owner.alignment import AlignSettings
from owner.cli import build_parser as owner_parser
from owner.cli import config_from_args
from owner.cli import main as owner_main
from owner.config import RunConfig
from owner.options import flags_from_config
from party.cli import build_parser as party_parser


def owner_args(argv: list[str]):
    return parse_with_config(owner_parser(), argv, translate=flags_from_config)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_toml_sets_options_and_a_flag_overrides_it(tmp_path):
    cfg = write(tmp_path / "run.toml", 'simulate = 3\nout = "runs/a"\nlocal-steps = 8\nlr = 1e-3\n'
                                       'rounds = 5\nsplit = "category"\nsecure-agg = true\ndp-noise = 0.8\n')
    args = owner_args(["--config", str(cfg), "--rounds", "7", "--lr", "0.5"])
    assert args.simulate == 3 and args.out == Path("runs/a")
    assert args.local_steps == 8 and args.split == "category" and args.secure_agg is True
    assert args.rounds == 7 and args.lr == 0.5  # the flags win over the file
    assert args.dp_noise == 0.8
    # an option in neither keeps the parser's default
    assert args.batch_size == TrainSettings().batch_size


def test_underscores_and_dashes_name_the_same_option(tmp_path):
    cfg = write(tmp_path / "run.toml", 'listen = "tcp://127.0.0.1:5555"\nout = "o"\nlocal_steps = 6\n'
                                       'align_pre_steps = 0\nparty-timeout = 9\n')
    args = owner_args(["--config", str(cfg)])
    assert args.listen == "tcp://127.0.0.1:5555" and args.simulate is None
    assert args.local_steps == 6 and args.align_pre_steps == 0 and args.party_timeout == 9.0
    assert isinstance(args.party_timeout, float)


def test_the_same_option_twice_is_an_error(tmp_path):
    cfg = write(tmp_path / "run.toml", 'out = "o"\nsimulate = 2\nlocal_steps = 6\nlocal-steps = 7\n')
    with pytest.raises(ConfigError, match="local_steps.*local-steps"):
        owner_args(["--config", str(cfg)])


@pytest.mark.parametrize("text, pattern", [
    ('out = "o"\nsimulate = 2\nlocal-stepz = 8\n', "unknown key 'local-stepz' .*did you mean 'local-steps'"),
    ('out = "o"\nsimulate = 2\nrounds = "five"\n', "'rounds' .*integer"),
    ('out = "o"\nsimulate = 2\nrounds = 2.5\n', "'rounds' .*integer"),
    ('out = "o"\nsimulate = 2\nlr = true\n', "'lr' .*number"),
    ('out = "o"\nsimulate = 2\nquiet = 1\n', "'quiet' .*true or false"),
    ('out = "o"\nsimulate = 2\nsplit = "random"\n', "'split' .*one of iid, category"),
    ('out = "o"\nsimulate = 2\nlisten = "tcp://127.0.0.1:1"\n', "--simulate and --listen"),
    ('out = "o"\nsimulate = 2\n[rounds]\nx = 1\n', "'rounds' holds a table"),
    ('out = "o"\nsimulate = 2\n[extra]\nx = 1\n', "unknown key 'extra'"),
    ('out = "o"\nsimulate = 2\nconfig = "other.toml"\n', "unknown key 'config'"),
    ('out = "o"\nsimulate = 2\nhelp = true\n', "unknown key 'help'"),
    ('out = "o"\nsimulate = 2\nrounds = \n', "not valid TOML"),
])
def test_bad_files_raise_one_config_error_naming_the_key(tmp_path, text, pattern):
    cfg = write(tmp_path / "run.toml", text)
    with pytest.raises(ConfigError, match=pattern):
        owner_args(["--config", str(cfg)])


def test_a_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        owner_args(["--config", str(tmp_path / "nope.toml"), "--simulate", "2", "--out", "o"])


def test_the_cli_prints_one_error_line_and_exits_2(tmp_path, capsys):
    cfg = write(tmp_path / "run.toml", 'simulate = 2\nout = "o"\nbatch-size = 4\nwarmup = 3\n')
    assert owner_main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "'warmup'" in err[0]
    assert not (tmp_path / "o").exists()


def test_a_command_line_mode_replaces_the_files_mode(tmp_path):
    cfg = write(tmp_path / "run.toml", 'simulate = 3\nout = "o"\nparties = 3\n')
    args = owner_args(["--config", str(cfg), "--listen", "tcp://127.0.0.1:7000"])
    assert args.listen == "tcp://127.0.0.1:7000" and args.simulate is None


def test_required_options_are_still_required_when_the_file_lacks_them(tmp_path):
    cfg = write(tmp_path / "run.toml", "simulate = 3\n")
    with pytest.raises(ConfigError, match="required: --out"):
        owner_args(["--config", str(cfg)])  # no --out anywhere: the parser's usage error, as one line


def test_a_runs_config_json_given_back_rebuilds_the_same_run_config(tmp_path):
    original = RunConfig(
        model="some/model", method="fedot", adapter_size=3, drop_rate=0.4, rounds=6, parties=4, seed=11,
        party_data="train.jsonl", party_data_kind="alpaca", split="category", party_limit=90,
        public_data="pub.jsonl", public_limit=50, eval_data="ev.jsonl", eval_items=7, max_length=128,
        template="plain", secure_agg=True, secagg_graph="sparse",
        lora=LoraSettings(r=4, alpha=8, target_modules=("q_proj", "v_proj")),
        train=TrainSettings(local_steps=5, batch_size=2, lr=1e-3, prox_eps=0.5),
        align=AlignSettings(pre_steps=3, round_steps=2, batch_size=6, lr=2e-4, kl_weight=0.5, cache_teacher=False,
                            cache_memory_mb=64.0),
        dp=DPSettings(target_epsilon=4.0, delta=1e-6, max_grad_norm=0.7, accountant="prv"),
        share_weights=False, max_memory={"cpu": "2GiB"}, device_map="sequential", device="cpu", dtype="float32",
        quantize="nf4")
    original.save(tmp_path / "config.json")
    args = owner_args(["--config", str(tmp_path / "config.json"), "--simulate", "--out", str(tmp_path / "b")])
    assert args.simulate == 0 and args.parties == 4  # bare --simulate: as many parties as the run had
    rebuilt = config_from_args(args, args.simulate or args.parties, bool(args.secure_agg))
    assert rebuilt == original
    assert json.loads(json.dumps(rebuilt.to_dict())) == json.loads((tmp_path / "config.json").read_text())


def test_a_default_run_config_json_round_trips_too(tmp_path):
    original = RunConfig(parties=2)
    original.save(tmp_path / "config.json")
    args = owner_args(["--config", str(tmp_path / "config.json"), "--simulate", "2", "--out", "x"])
    assert config_from_args(args, args.simulate, bool(args.secure_agg)) == original


def test_config_json_fields_without_a_flag_must_hold_their_default(tmp_path):
    data = RunConfig().to_dict()
    data["train"]["weight_decay"] = 0.1
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="train.weight_decay"):
        owner_args(["--config", str(tmp_path / "config.json"), "--simulate", "--out", "x"])
    data["train"]["weight_decay"] = 0.0
    data["lora"]["rank"] = 3
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="lora.rank"):
        owner_args(["--config", str(tmp_path / "config.json"), "--simulate", "--out", "x"])


def test_a_section_and_a_flat_key_for_the_same_option_is_an_error(tmp_path):
    cfg = write(tmp_path / "run.toml", 'simulate = 2\nout = "o"\nlocal_steps = 4\n[train]\nlocal_steps = 8\n')
    with pytest.raises(ConfigError, match="train.local_steps and local-steps"):
        owner_args(["--config", str(cfg)])
    nested = write(tmp_path / "nested.toml", 'simulate = 2\nout = "o"\n[train]\nlocal_steps = 8\n')
    assert owner_args(["--config", str(nested)]).local_steps == 8


def test_bare_simulate_without_parties_is_an_error(tmp_path, capsys):
    assert owner_main(["--simulate", "--out", str(tmp_path / "o")]) == 2
    assert "--simulate needs a number of parties" in capsys.readouterr().err


def test_party_toml_satisfies_the_required_options_and_flags_override(tmp_path):
    cfg = write(tmp_path / "party.toml", 'connect = "tcp://127.0.0.1:5555"\ndata = "mine.jsonl"\n'
                                         'key = "keys/alice.key_secret"\nowner_key = "keys/owner.key"\n'
                                         'dp-epsilon = 3.0\nprogress = "plain"\ntimeout = 60\n')
    args = parse_with_config(party_parser(), ["--config", str(cfg), "--data", "other.jsonl"])
    assert args.connect == "tcp://127.0.0.1:5555" and args.data == "other.jsonl"
    assert args.key == Path("keys/alice.key_secret") and args.owner_key == Path("keys/owner.key")
    assert args.dp_epsilon == 3.0 and args.progress == "plain" and args.timeout == 60.0
    with pytest.raises(ConfigError, match="'progress' .*one of"):
        parse_with_config(party_parser(), ["--config", str(write(tmp_path / "p2.toml", 'progress = "fancy"\n'))])


def test_a_flag_of_several_values_takes_a_list(tmp_path):
    cfg = write(tmp_path / "run.toml", 'simulate = 2\nout = "o"\ntarget-modules = ["q_proj", "v_proj"]\n')
    assert owner_args(["--config", str(cfg)]).target_modules == ["q_proj", "v_proj"]
    assert owner_args(["--config", str(cfg), "--target-modules", "k_proj"]).target_modules == ["k_proj"]
    for bad in ('"q_proj"', "[]", "[1]"):
        cfg = write(tmp_path / "bad.toml", f'simulate = 2\nout = "o"\ntarget-modules = {bad}\n')
        with pytest.raises(ConfigError, match=r"\(--target-modules\) takes"):
            owner_args(["--config", str(cfg)])


def test_store_false_flags_take_a_boolean(tmp_path):
    cfg = write(tmp_path / "run.toml", 'listen = "tcp://127.0.0.1:1"\nout = "o"\nno-secure-agg = true\n')
    assert owner_args(["--config", str(cfg)]).secure_agg is False
    assert owner_args(["--config", str(cfg), "--secure-agg"]).secure_agg is True


def test_a_run_from_a_toml_file_writes_a_config_json_that_repeats_it(tiny_llama_dir, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    rows = [{"instruction": f"Colour of item {i}?", "input": "", "output": f"Item {i} is red."} for i in range(12)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    cfg = write(tmp_path / "run.toml", f'simulate = 2\nout = "{out}"\nmodel = "{tiny_llama_dir}"\n'
                                       f'party-data = "{data}"\npublic_data = "{data}"\neval-data = "{data}"\n'
                                       'eval-items = 2\nmax-length = 64\nrounds = 1\nlocal-steps = 2\n'
                                       'batch-size = 2\nalign-pre-steps = 1\nalign-steps = 1\n'
                                       'progress = "plain"\nreport-to = "tensorboard"\n')
    assert owner_main(["--config", str(cfg), "--local-steps", "3"]) == 0
    err = capsys.readouterr().err
    assert "round 1 party-2: step 3/3" in err and "run: round 1/1" in err
    saved = RunConfig.load(out / "config.json")
    assert saved.train.local_steps == 3 and saved.rounds == 1 and saved.parties == 2
    args = owner_args(["--config", str(out / "config.json"), "--simulate", "--out", str(tmp_path / "again")])
    assert config_from_args(args, args.simulate or args.parties, bool(args.secure_agg)) == saved
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def readme_toml(marker: str) -> str:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```toml\n")[1:]]
    found = [b for b in blocks if b.startswith(f"# {marker}")]
    assert len(found) == 1, f"README has no single ```toml block starting with '# {marker}'"
    return found[0]


def test_the_readme_example_is_a_valid_config_file(tmp_path):
    owner_file = write(tmp_path / "run.toml", readme_toml("owner --config run.toml"))
    args = owner_args(["--config", str(owner_file)])
    assert args.listen and args.parties == 3
    config = config_from_args(args, args.parties, args.secure_agg)
    # a template to copy switches on no optional extra (a tracker, quantised parties)
    assert args.report_to == "none" and config.quantize is None
    assert config.rounds == 10 and config.train.local_steps == 8
    assert config.lora.target_modules == ("q_proj", "v_proj")
