"""Options declared once: the parsers, RunConfig, config.json and docs/options.md all come from the tables."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from console.config_file import parse_with_config
from console.options import FIELD, Option, add_options, bind, values_from_args
from errors import ConfigError
from learning.dp import DPSettings
from learning.lora import LoraSettings
from learning.training import TrainSettings
from owner import cli as owner_cli
from owner import options as owner_options
from owner.alignment import AlignSettings
from owner.config import RunConfig
from owner.options import flags_from_config, run_options
from party import cli as party_cli
from party import options as party_options
from party.session import PartyOptions
from secure_agg import PartyPolicy

ROOT = Path(__file__).resolve().parent.parent
PARTY_REQUIRED = ["--connect", "tcp://127.0.0.1:5555", "--data", "d.jsonl", "--key", "k/alice.key_secret",
                  "--owner-key", "k/owner.key"]


def run_config(argv: list[str]) -> RunConfig:
    """The RunConfig `owner ARGV` would run with (the mode's parties and secure-aggregation default too)."""
    args = parse_with_config(owner_cli.build_parser(), argv, translate=flags_from_config)
    if args.simulate is not None:
        return owner_cli.config_from_args(args, args.simulate or args.parties, bool(args.secure_agg))
    return owner_cli.config_from_args(args, args.parties, True if args.secure_agg is None else args.secure_agg)


SIM = ["--simulate", "2", "--out", "o"]


@pytest.mark.parametrize("argv, expected", [
    (["--simulate", "3", "--out", "o"], RunConfig(parties=3)),
    (["--listen", "tcp://0.0.0.0:1", "--parties", "4", "--key", "k", "--allow", "a", "--out", "o"],
     RunConfig(parties=4, secure_agg=True)),
    (["--simulate", "3", "--out", "o", "--secure-agg", "--secagg-graph", "sparse"],
     RunConfig(parties=3, secure_agg=True, secagg_graph="sparse")),
    ([*SIM, "--dp-noise", "0.5", "--dp-clip", "2.0"],
     RunConfig(parties=2, dp=DPSettings(noise_multiplier=0.5, max_grad_norm=2.0))),
    ([*SIM, "--dp-epsilon", "8", "--dp-delta", "1e-6", "--dp-accountant", "prv"],
     RunConfig(parties=2, dp=DPSettings(target_epsilon=8.0, delta=1e-6, accountant="prv"))),
    ([*SIM, "--max-memory", "0=20GiB,1=30,cpu=64GiB", "--device-map", "auto", "--offload-folder", "off"],
     RunConfig(parties=2, max_memory={"0": "20GiB", "1": 30, "cpu": "64GiB"}, device_map="auto",
               offload_folder="off")),
    ([*SIM, "--no-share-weights", "--no-teacher-cache", "--teacher-cache-mb", "7"],
     RunConfig(parties=2, share_weights=False, align=AlignSettings(cache_teacher=False, cache_memory_mb=7.0))),
    ([*SIM, "--target-modules", "q_proj", "v_proj", "--lora-r", "4", "--lora-alpha", "32"],
     RunConfig(parties=2, lora=LoraSettings(r=4, alpha=32, target_modules=("q_proj", "v_proj")))),
    ([*SIM, "--method", "fedot", "--rounds", "5", "--seed", "7", "--local-steps", "2", "--batch-size", "3",
      "--lr", "0.1", "--prox-eps", "0", "--align-pre-steps", "0", "--align-steps", "1", "--align-batch-size", "2",
      "--align-lr", "0.5", "--kl-weight", "0.25", "--fidelity-batches", "0", "--split", "category",
      "--template", "plain", "--party-limit", "10", "--public-limit", "5", "--eval-items", "3", "--max-length", "64",
      "--device", "cpu", "--dtype", "bfloat16", "--quantize", "int8", "--party-columns", "prompt=a,response=b"],
     RunConfig(parties=2, method="fedot", rounds=5, seed=7, split="category", template="plain", party_limit=10,
               public_limit=5, eval_items=3, max_length=64, device="cpu", dtype="bfloat16", quantize="int8",
               party_columns="prompt=a,response=b",
               train=TrainSettings(local_steps=2, batch_size=3, lr=0.1, prox_eps=0.0),
               align=AlignSettings(pre_steps=0, round_steps=1, batch_size=2, lr=0.5, kl_weight=0.25,
                                   fidelity_batches=0))),
])
def test_command_lines_build_the_run_config_they_always_did(argv, expected):
    assert run_config(argv) == expected


def test_a_saved_config_json_is_given_back_byte_for_byte(tmp_path):
    saved = RunConfig(
        model="m", method="fedot", parties=4, rounds=6, secure_agg=True, dtype="float32", quantize="nf4",
        lora=LoraSettings(r=4, alpha=8, target_modules=("q_proj",)), train=TrainSettings(lr=1e-3),
        align=AlignSettings(cache_teacher=False, fidelity_batches=0), share_weights=False,
        dp=DPSettings(noise_multiplier=0.9, max_grad_norm=0.5), max_memory={"0": "20GiB", "cpu": "2GiB"},
        device_map="sequential", prealign_cache="pc")
    saved.save(tmp_path / "config.json")
    again = run_config(["--config", str(tmp_path / "config.json"), "--simulate", "--out", "o"])
    assert again == saved
    again.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == (tmp_path / "config.json").read_bytes()
    changed = run_config(["--config", str(tmp_path / "config.json"), "--simulate", "3", "--out", "o", "--lr", "0.3",
                          "--lora-r", "16"])
    assert changed.parties == 3 and changed.train.lr == 0.3 and changed.lora.r == 16 and not changed.share_weights


def test_the_parsers_defaults_are_the_fields_defaults():
    args = owner_cli.build_parser().parse_args(["--simulate", "3", "--out", "o"])
    assert owner_cli.config_from_args(args, 3, False) == RunConfig(parties=3)
    party = party_cli.options_from_args(party_cli.build_parser().parse_args(PARTY_REQUIRED))
    blank = PartyOptions(endpoint="x", key=Path("k"), owner_key=Path("o"), data="d")
    for name in ("data_kind", "columns", "name", "work_dir", "dp", "timeout", "quantize", "require_secure_agg",
                 "max_download", "min_parties", "clip", "share_stats", "share_data_size", "device_map", "max_memory"):
        assert getattr(party, name) == getattr(blank, name), name
    assert party.policy == PartyPolicy()


def test_party_flags_reach_their_fields():
    argv = [*PARTY_REQUIRED, "--data-kind", "gsm8k", "--name", "bob", "--work", "w", "--timeout", "5",
            "--max-download-gb", "1.5", "--min-parties", "3", "--min-collusion", "0", "--min-degree", "2",
            "--min-honest", "1", "--clip", "0.5", "--share-stats", "--share-data-size", "--allow-plain",
            "--quantize", "nf4", "--device", "cpu", "--dtype", "float32", "--dp-epsilon", "3", "--progress", "none",
            "--device-map", "auto", "--max-memory", "0=70GiB,1=70GiB,cpu=1000"]
    opts = party_cli.options_from_args(party_cli.build_parser().parse_args(argv))
    assert (opts.endpoint, opts.data, opts.data_kind, opts.name, opts.work_dir) == (
        "tcp://127.0.0.1:5555", "d.jsonl", "gsm8k", "bob", Path("w"))
    assert opts.timeout == 5.0 and opts.max_download == 1_500_000_000 and opts.min_parties == 3
    assert opts.policy == PartyPolicy(min_collusion=0, min_degree=2, min_honest=1)
    assert opts.clip == 0.5 and opts.share_stats and opts.share_data_size and not opts.require_secure_agg
    assert opts.quantize == "nf4" and opts.hardware.describe() == "cpu float32" and opts.progress.mode == "none"
    assert opts.dp == DPSettings(target_epsilon=3.0)
    assert opts.device_map == "auto" and opts.max_memory == {0: "70GiB", 1: "70GiB", "cpu": 1000}


def test_every_option_has_help_and_says_its_default():
    for command in (*owner_options.COMMANDS, *party_options.COMMANDS):
        name, parser = command.name, command.parser()
        chosen = {a for g in parser._mutually_exclusive_groups for a in g._group_actions}
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings} has no help"
            if action.required or action in chosen:
                assert "(default:" not in action.help
            else:
                assert "(default: " in action.help, f"{name} {action.option_strings}: {action.help}"
    text = owner_cli.build_parser().format_help()
    for flag, default in [("--lr", "0.008"), ("--align-pre-steps", "64"), ("--public-limit", "400"),
                          ("--dp-clip", "1.0"), ("--join-timeout", "600.0"), ("--lora-alpha", "16")]:
        line = " ".join(text.split(flag + " ", 1)[1].split("(default:", 1)[1].split()[:1])
        assert line.rstrip(")") == default, flag


def test_the_usage_lines_show_the_subcommands():
    owner = owner_cli.build_parser().format_usage()
    assert owner.startswith("usage: owner [-h] (--simulate [N] | --listen ENDPOINT) --out OUT [OPTION ...]")
    assert "\n       owner plan [-h] [--json]" in owner and "\n       owner keygen [-h] --out KEYDIR" in owner
    party = party_cli.build_parser().format_usage()
    assert party.startswith("usage: party [-h] --connect ENDPOINT --data DATA --key KEY --owner-key OWNER_KEY")
    assert "\n       party keygen [-h] --name NAME --out KEYDIR" in party


@pytest.mark.parametrize("main, argv, words", [
    (owner_cli.main, ["--simulate", "2", "--out", "o", "--dtype", "float8"], "invalid choice: 'float8'"),
    (owner_cli.main, ["--simulate", "two", "--out", "o"], "invalid int value"),
    (owner_cli.main, ["--simulate", "2"], "required: --out"),
    (owner_cli.main, ["--simulate", "2", "--listen", "tcp://h:1", "--out", "o"], "not allowed with"),
    (owner_cli.main, ["--listen", "tcp://h:1", "--out", "o"], "--listen needs --parties"),
    (owner_cli.main, ["plan", "--dtype", "float8"], "invalid choice: 'float8'"),
    (owner_cli.main, ["keygen"], "required: --out"),
    (party_cli.main, [*PARTY_REQUIRED, "--dtype", "float8"], "invalid choice: 'float8'"),
    (party_cli.main, [*PARTY_REQUIRED, "--bogus"], "unrecognized arguments: --bogus"),
    (party_cli.main, ["keygen", "--name"], "expected one argument"),
])
def test_bad_input_is_one_error_line(tmp_path, monkeypatch, capsys, main, argv, words):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert list(tmp_path.iterdir()) == []


MODEL_LIBRARIES = ("torch", "transformers", "peft", "opacus", "zmq", "accelerate")


@pytest.mark.parametrize("call, status, words", [
    ("owner.cli.main(['--simulate', '2', '--out', 'o', '--dtype', 'bogus'])", 2, "invalid choice: 'bogus'"),
    ("owner.cli.main(['--help'])", 0, "usage: owner"),
    ("owner.cli.main(['plan', '--lora-r', 'bogus'])", 2, "invalid int value: 'bogus'"),
    (f"party.cli.main({[*PARTY_REQUIRED, '--dtype', 'bogus']!r})", 2, "invalid choice: 'bogus'"),
    ("party.cli.main(['--help'])", 0, "usage: party"),
    ("print(runpy.run_path('SCRIPT')['render']())", None, "# Options"),
    ("print(__import__('benchmarks.accuracy').accuracy.parse_args(['--out', 'o']).lrs)", None, "[0.008]"),
], ids=["owner-bad-choice", "owner-help", "owner-plan-bad-int", "party-bad-choice", "party-help", "options-doc",
        "accuracy-benchmark-args"])
def test_parsing_loads_no_model_library(tmp_path, call, status, words):
    """A mistyped flag is refused, and --help and the options reference printed, without importing torch,
    transformers, peft, opacus, ZeroMQ or accelerate: the option tables take their defaults from settings
    modules that import none of them, so the error comes at once, not after seconds of imports."""
    code = ("import runpy, sys, owner.cli, party.cli\n"
            f"try:\n    status = {call.replace('SCRIPT', str(ROOT / 'scripts' / 'options_doc.py'))}\n"
            "except SystemExit as exit:\n    status = exit.code\n"
            f"print(status, sorted(m for m in {MODEL_LIBRARIES!r} if m in sys.modules), file=sys.stderr)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    *said, last = out.stderr.strip().splitlines()
    assert out.returncode == 0 and last == f"{status} []", out.stderr
    assert words in out.stdout + "\n".join(said), out.stdout + out.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_options_reference_is_generated_from_the_tables():
    render = runpy.run_path(str(ROOT / "scripts" / "options_doc.py"))["render"]
    assert (ROOT / "docs" / "options.md").read_text() == render(), \
        "docs/options.md is out of date: python scripts/options_doc.py"
    text = render()
    for command in (*owner_options.COMMANDS, *party_options.COMMANDS):
        assert all(f"`{option.usage()}`" in text for option in command.options())


def test_config_json_sections_map_onto_the_options():
    data = json.loads(json.dumps(RunConfig(dp=DPSettings(noise_multiplier=1.0)).to_dict()))
    flat = flags_from_config(data)
    assert {k: flat[k] for k in ("lora-r", "lr", "align-pre-steps", "dp-noise", "dp-clip")} == {
        "lora-r": 8, "lr": 8e-3, "align-pre-steps": 64, "dp-noise": 1.0, "dp-clip": 1.0}
    assert "no-share-weights" not in flat and "no-teacher-cache" not in flat
    data["share_weights"], data["align"]["cache_teacher"] = False, False
    flat = flags_from_config(data)
    assert flat["no-share-weights"] is True and flat["no-teacher-cache"] is True
    with pytest.raises(ConfigError, match="config key lora.rank is unknown"):
        flags_from_config({"lora": {"rank": 2}})


def test_every_run_option_sets_a_run_config_field():
    paths = [o.to for o in run_options()]
    assert None not in paths and len(paths) == len(set(paths))
    assert all(o.target == "RunConfig" for o in run_options())


@dataclasses.dataclass
class _Settings:
    rounds: int = 3
    name: str = "x"


def test_bind_takes_the_fields_default_and_refuses_a_different_one():
    (rounds,) = bind(_Settings, [Option("--rounds", "rounds", to="rounds", type=int)])
    assert rounds.default == 3 and rounds.target == "_Settings" and rounds.shown_default() == "3"
    with pytest.raises(TypeError, match="defaults to 3"):
        bind(_Settings, [Option("--rounds", "rounds", to="rounds", type=int, default=4)])
    with pytest.raises(TypeError, match="needs its own default"):
        Option("--quiet", "quiet", action="store_true")
    with pytest.raises(TypeError, match="bind the table first"):
        add_options(argparse.ArgumentParser(), [Option("--rounds", "rounds", to="rounds", default=FIELD)])
    p = argparse.ArgumentParser()
    add_options(p, bind(_Settings, [Option("--rounds", "rounds", to="rounds", type=int),
                                    Option("--name", "name", to="name")]))
    assert values_from_args(p.parse_args(["--rounds", "5"]), bind(_Settings, [
        Option("--rounds", "rounds", to="rounds", type=int)])) == {"rounds": 5}
