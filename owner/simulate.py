"""FedBiOT in one process: the owner session plus N parties trained one after the other.

The parties load the compressed checkpoint from disk exactly as a remote party would and share one model
object (each round starts by loading the global LoRA), so the simulation needs one copy of the compressed
model however many parties it runs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from safetensors.torch import save as safetensors_bytes

from console.progress import counted
from errors import ConfigError
from learning.dp import DPPartyTrainer, PrivacyLedger
from learning.party_model import PartyModel
from learning.secure_update import secagg_config
from learning.seeds import derive_seed
from learning.training import PartyTrainer, PartyUpdate
from owner.aggregation import aggregate_figures, plain_fedavg, secure_fedavg
from owner.config import RunConfig
from owner.metrics import MetricsLog, megabytes
from owner.records import round_lines, round_record, run_totals
from owner.startup import OwnerStart
from tasks.datasets import Example, load_examples
from tasks.prompts import TokenizedExample, tokenize_examples
from tasks.splits import split_by_category, split_iid


def party_splits(config: RunConfig) -> list[list[Example]]:
    """Load the parties' training data and split it (i.i.d. or one party per category)."""
    examples = load_examples(config.party_data, config.party_data_kind, limit=config.party_limit,
                             columns=config.party_columns, columns_flag="--party-columns")
    if config.split == "iid":
        return split_iid(examples, config.parties, config.seed)
    by_category = split_by_category(examples, config.seed)
    if len(by_category) != config.parties:
        raise ConfigError(f"--split category gives {len(by_category)} parties "
                          f"({', '.join(by_category)}), but {config.parties} were asked for")
    return list(by_category.values())


def payload_bytes(*states: dict) -> int:
    return sum(len(safetensors_bytes(s)) for s in states)


def aggregate_updates(updates: Sequence[PartyUpdate], sent_adapter: dict, config: RunConfig,
                      round_idx: int) -> tuple[dict, dict]:
    """Combine the parties' adapters: plain FedAvg, or FedAvg inside masked secure aggregation."""
    weights = [u.n_examples for u in updates]
    if not config.secure_agg:
        return plain_fedavg([u.adapter_state for u in updates], weights, sent_adapter)
    new_adapter, result = secure_fedavg(updates, sent_adapter, secagg_config(weights, config.seed,
                                                                             config.secagg_graph),
                                        round_idx, config.seed)
    return new_adapter, {
        "bytes_up": int(sum(result.party_sent)), **aggregate_figures(result),
        "secagg": {"ring_bits": result.ring_bits, "party_cpu_s": max(result.party_cpu_s),
                   "owner_cpu_s": result.server_cpu_s, "owner_bytes_sent": result.server_sent},
    }


def make_trainers(config: RunConfig, party: PartyModel, party_tokens: Sequence[Sequence[TokenizedExample]],
                  history: Sequence[dict] = ()) -> list[PartyTrainer]:
    """One trainer per party, all on the shared model; with DP, each keeps its own privacy ledger.

    A resumed run restores each party's ledger from the accountant history in its last round record. The
    DP secret seed is derived from the run seed: reproducible, which only the in-process run may be (there
    is no adversary here); a networked party draws its own.
    """
    trainers: list[PartyTrainer] = []
    for i, tokens in enumerate(party_tokens):
        name = f"party-{i + 1}"
        if config.dp is None:
            trainers.append(party.trainer(name, tokens, config.lora, config.train, config.seed))
            continue
        ledger = PrivacyLedger(config.dp.accountant)
        for record in reversed(history):
            stats = record.get("parties", {}).get(name, {})
            if "accountant_history" in stats:
                ledger = PrivacyLedger(stats.get("accountant", config.dp.accountant),
                                       stats["accountant_history"])
                break
        trainers.append(party.trainer(name, tokens, config.lora, config.train, config.seed, dp=config.dp,
                                      rounds=config.rounds, ledger=ledger,
                                      secret_seed=derive_seed(config.seed, "dp-secret", name)))
    return trainers


def dp_report(trainers: Sequence[PartyTrainer]) -> dict[str, dict]:
    """Each DP party's privacy spent so far: {"party-1": {"epsilon": ..., "delta": ..., ...}}."""
    return {t.name: t.privacy_report() for t in trainers if isinstance(t, DPPartyTrainer)}


def run_simulation(config: RunConfig, out_dir: Path, resume: bool = False,
                   log: MetricsLog | None = None) -> dict:
    """Run the whole method in one process and write every output under `out_dir`; returns the summary."""
    start = OwnerStart.begin(config, out_dir, resume, log or MetricsLog(None))
    config, log = start.config, start.log
    splits = party_splits(config)
    base, owner_data = start.load_inputs()
    party_tokens = [tokenize_examples(part, base.tokenizer, config.max_length, config.template,
                                      what=f"--party-data {config.party_data} (party-{i + 1})", use="training")
                    for i, part in enumerate(splits)]
    with start.session(base, owner_data) as session:
        party = PartyModel.load(session.compressed_dir, config.lora, config.seed, config.hardware(), config.quantize)
        trainers = make_trainers(config, party, party_tokens, session.history)
    log.say(f"{counted(len(trainers), 'party')} with {[t.n_examples for t in trainers]} examples; "
            f"{counted(config.rounds, 'round')} of {counted(config.train.local_steps, 'step')} x batch "
            f"{config.train.batch_size}")

    while not session.done:
        start = time.perf_counter()
        r = session.round
        adapter, emulator = session.payload()
        down = payload_bytes(adapter, emulator)
        updates = [t.train_round(r, adapter, emulator, log.train_step) for t in trainers]
        up_each = [payload_bytes(u.adapter_state) for u in updates]
        new_adapter, agg_info = aggregate_updates(updates, adapter, config, r)
        up = agg_info.pop("bytes_up", sum(up_each))
        record = round_record({u.name: u.stats for u in updates}, {u.name: u.n_examples for u in updates},
                              mb_down=megabytes(down * len(updates)), mb_up=megabytes(up),
                              seconds=time.perf_counter() - start, **agg_info)
        session.complete_round(new_adapter, record)
        for line in round_lines(session.round, config.rounds, record):
            log.say(line)
    return session.finish({
        **run_totals(session.history, config.secure_agg),
        **({"dp": dp_report(trainers)} if config.dp is not None else {}),
    })
