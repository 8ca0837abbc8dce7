"""The run settings a party receives in WELCOME: what the owner's run config says, JSON on the wire, and
checked on arrival."""

from __future__ import annotations

import pytest

from errors import ConfigError
from learning.lora import LoraSettings
from learning.run_settings import PartyRunSettings
from learning.training import TrainSettings
from owner.config import RunConfig
from protocol import messages as m
from protocol.codec import decode, encode


def _welcome(settings: dict):
    return m.welcome(run_id="run-1", settings=settings, model_sha256="0" * 64, model_size=10, chunk_size=4,
                     n_chunks=3, round=0)


def test_settings_travel_in_welcome_and_come_back_equal():
    config = RunConfig(seed=7, rounds=5, max_length=128, template="plain", secure_agg=True,
                       lora=LoraSettings(r=4, alpha=8, target_modules=("q_proj", "v_proj")),
                       train=TrainSettings(local_steps=3, batch_size=2, lr=1e-3, betas=(0.8, 0.9)))
    sent = config.party_settings("run-1")
    got = decode(encode(_welcome(sent.to_dict())))
    assert PartyRunSettings.from_dict(got["settings"]) == sent


@pytest.mark.parametrize("change, match", [
    ({"seed": -1}, "seed"), ({"rounds": 0}, "rounds"), ({"max_length": "64"}, "max_length"),
    ({"template": "fancy"}, "template"), ({"secure_agg": 1}, "secure_agg"), ({"train": []}, "train"),
    ({"train": {"lr": 0}}, "learning rate"), ({"lora": {"r": 0}}, "rank"), ({"extra": 1}, "unknown"),
])
def test_bad_settings_are_refused_with_the_field_named(change, match):
    good = RunConfig().party_settings("run-1").to_dict()
    with pytest.raises(ConfigError, match=match):
        PartyRunSettings.from_dict({**good, **change})


def test_missing_settings_are_named():
    good = RunConfig().party_settings("run-1").to_dict()
    del good["seed"]
    with pytest.raises(ConfigError, match="missing \\['seed'\\]"):
        PartyRunSettings.from_dict(good)
