"""A party's DP accountant spans every run on the same data: a new run starts where the last one ended, a
restarted run continues its own, other data have their own record, and the budget stops training."""

from __future__ import annotations

import pytest

from errors import ConfigError
from learning.dp import BudgetSpent, DPSettings, PrivacyLedger
from learning.lora import LoraSettings
from learning.party_model import PartyModel
from learning.training import TrainSettings
from owner.compress import compress, save_compressed
from party.privacy import PrivacyRecord, data_digest
from tasks.datasets import Example
from tests.tiny_models import byte_tokenizer, tiny_model

EXAMPLES = [Example(f"What is {i} + {i}?", f"It is {2 * i}.") for i in range(8)]


def test_the_record_is_keyed_by_the_data_and_spans_runs(tmp_path):
    record = PrivacyRecord(tmp_path, EXAMPLES)
    assert record.path.name == f"{data_digest(EXAMPLES)}.json"
    assert data_digest(EXAMPLES[:-1]) != data_digest(EXAMPLES)
    history, start = record.start_run("run-1", "rdp")
    assert (history, start) == ([], 0)
    record.save("run-1", start, "rdp", [[1.0, 0.5, 4]])
    assert PrivacyRecord(tmp_path, EXAMPLES).start_run("run-1", "rdp") == ([[1.0, 0.5, 4]], 0)  # a restart
    assert PrivacyRecord(tmp_path, EXAMPLES).start_run("run-2", "rdp") == ([[1.0, 0.5, 4]], 1)  # a new run
    with pytest.raises(ConfigError, match="rdp"):
        record.start_run("run-2", "prv")
    record.path.write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        record.start_run("run-2", "rdp")


def test_the_budget_counts_every_run_and_the_target_only_this_one(tmp_path):
    model, manifest = compress(tiny_model("llama", 8), 2, 0.5, "tiny")
    save_compressed(model, byte_tokenizer(), manifest, tmp_path / "model")
    lora, train = LoraSettings(r=2, alpha=4), TrainSettings(local_steps=2, batch_size=2, lr=1e-2)
    party = PartyModel.load(tmp_path / "model", lora, 0)
    data = party.tokenize(EXAMPLES, 64, "plain")
    earlier = PrivacyLedger("rdp", [[1.0, 0.25, 40]])  # what earlier runs on this data spent
    dp = DPSettings(noise_multiplier=1.0)
    spent = earlier.epsilon(1e-5)
    trainer = party.trainer("p", data, lora, train, 0, dp=dp, rounds=4, ledger=earlier, run_from=1,
                            budget=spent * 1.0001, own_randomness=True)
    with pytest.raises(BudgetSpent, match="over every run"):
        trainer.check_budget(train.local_steps)
    # The same history with a target for this run alone: the earlier runs do not count against it.
    target = DPSettings(target_epsilon=50.0, delta=1e-5)
    trainer = party.trainer("p", data, lora, train, 0, dp=target, rounds=4,
                            ledger=PrivacyLedger("rdp", [[0.5, 0.25, 400]]), run_from=1, own_randomness=True)
    assert trainer.epsilon > 50.0
    trainer.check_budget(train.local_steps)  # this run has spent nothing yet
