"""FedBiOT in one process: the owner session plus N parties trained one after the other.

The parties load the compressed checkpoint from disk exactly as a remote party would and share one model
object (each round starts by loading the global LoRA), so the simulation needs one copy of the compressed
model however many parties it runs.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from safetensors.torch import save as safetensors_bytes
from torch import nn

from errors import ConfigError
from learning.compressed_model import Manifest, load_compressed
from learning.dp import DPPartyTrainer, PrivacyLedger
from learning.lora import attach_lora
from learning.training import PartyTrainer, PartyUpdate, derive_seed
from owner.aggregation import fedavg
from owner.config import RunConfig
from owner.metrics import MetricsLog, megabytes
from owner.session import OwnerSession, pad_id_of
from tasks.datasets import Example, load_examples
from tasks.prompts import TokenizedExample, tokenize_examples
from tasks.splits import split_by_category, split_iid


def party_splits(config: RunConfig) -> list[list[Example]]:
    """Load the parties' training data and split it (i.i.d. or one party per category)."""
    examples = load_examples(config.party_data, config.party_data_kind, limit=config.party_limit,
                             columns=config.party_columns)
    if config.split == "iid":
        return split_iid(examples, config.parties, config.seed)
    by_category = split_by_category(examples, config.seed)
    if len(by_category) != config.parties:
        raise ConfigError(f"--split category gives {len(by_category)} parties "
                          f"({', '.join(by_category)}), but {config.parties} were asked for")
    return list(by_category.values())


def prepare_out_dir(out_dir: Path, resume: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} exists and is not a directory")
    if not resume and out_dir.is_dir() and any(out_dir.iterdir()):
        raise ConfigError(f"--out {out_dir} is not empty: pass --resume to continue that run, or choose "
                          "another directory")
    if resume and not (out_dir / "config.json").is_file():
        raise ConfigError(f"--resume: {out_dir} holds no run to resume (no config.json)")
    out_dir.mkdir(parents=True, exist_ok=True)


@contextmanager
def run_dir_setup(out_dir: Path, resume: bool) -> Iterator[None]:
    """`prepare_out_dir`, then the setup in the `with` block; if a new run's setup fails (a model that does
    not compress, an unreachable DP budget, an interrupt), what it wrote is removed, so the corrected command
    is not refused because --out is not empty. A resumed run's directory is never touched."""
    existed = out_dir.is_dir()
    prepare_out_dir(out_dir, resume)
    try:
        yield
    except BaseException:
        if not resume:
            if existed:
                for child in out_dir.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
            else:
                shutil.rmtree(out_dir, ignore_errors=True)
        raise


def payload_bytes(*states: dict) -> int:
    return sum(len(safetensors_bytes(s)) for s in states)


def aggregate_updates(updates: Sequence[PartyUpdate], sent_adapter: dict, config: RunConfig,
                      round_idx: int) -> tuple[dict, dict]:
    """Combine the parties' adapters: plain FedAvg, or FedAvg inside masked secure aggregation."""
    if not config.secure_agg:
        return fedavg([u.adapter_state for u in updates], [u.n_examples for u in updates]), {}
    from owner.secure_round import secure_fedavg  # noqa: PLC0415 - only needed with --secure-agg

    return secure_fedavg(updates, sent_adapter, config, round_idx)


def make_trainers(config: RunConfig, model: nn.Module, manifest: Manifest,
                  party_tokens: Sequence[Sequence[TokenizedExample]], pad_id: int,
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
            trainers.append(PartyTrainer(name, model, manifest, tokens, pad_id, config.lora, config.train,
                                         config.seed))
            continue
        ledger = PrivacyLedger(config.dp.accountant)
        for record in reversed(history):
            stats = record.get("parties", {}).get(name, {})
            if "accountant_history" in stats:
                ledger = PrivacyLedger(stats.get("accountant", config.dp.accountant),
                                       stats["accountant_history"])
                break
        trainers.append(DPPartyTrainer(name, model, manifest, tokens, pad_id, config.lora, config.train,
                                       config.seed, dp=config.dp, rounds=config.rounds, ledger=ledger,
                                       secret_seed=derive_seed(config.seed, "dp-secret", name)))
    return trainers


def dp_report(trainers: Sequence[PartyTrainer]) -> dict[str, dict]:
    """Each DP party's privacy spent so far: {"party-1": {"epsilon": ..., "delta": ..., ...}}."""
    return {t.name: t.privacy_report() for t in trainers if isinstance(t, DPPartyTrainer)}


def run_simulation(config: RunConfig, out_dir: Path, resume: bool = False,
                   log: MetricsLog | None = None) -> dict:
    """Run the whole method in one process and write every output under `out_dir`; returns the summary."""
    out_dir = Path(out_dir)
    if resume and (out_dir / "config.json").is_file():
        saved = RunConfig.load(out_dir / "config.json")
        saved.rounds = config.rounds
        config = saved
    log = log or MetricsLog(None)
    splits = party_splits(config)
    base, owner_data = OwnerSession.load_inputs(config, log)
    party_tokens = [tokenize_examples(part, base.tokenizer, config.max_length, config.template)
                    for part in splits]
    with run_dir_setup(out_dir, resume):
        config.save(out_dir / "config.json")
        log.path = out_dir / "metrics.jsonl"
        session = OwnerSession.create(config, out_dir, log, base, owner_data, resume=resume)
        model, tokenizer, manifest = load_compressed(session.compressed_dir)
        layers = list(manifest.emulator_layers) + list(manifest.adapter_layers)
        party_model = attach_lora(model, layers, config.lora, derive_seed(config.seed, "lora-init"))
        pad_id = pad_id_of(tokenizer)
        trainers = make_trainers(config, party_model, manifest, party_tokens, pad_id, session.history)
    log.say(f"{len(trainers)} parties with {[t.n_examples for t in trainers]} examples; "
            f"{config.rounds} rounds of {config.train.local_steps} steps x batch {config.train.batch_size}")

    while not session.done:
        start = time.perf_counter()
        r = session.round
        adapter, emulator = session.payload()
        down = payload_bytes(adapter, emulator)
        updates = [t.train_round(r, adapter, emulator, log.train_step) for t in trainers]
        up_each = [payload_bytes(u.adapter_state) for u in updates]
        new_adapter, agg_info = aggregate_updates(updates, adapter, config, r)
        up = agg_info.pop("bytes_up", sum(up_each))
        record = {
            "participants": [u.name for u in updates],
            "train_loss": sum(u.stats["loss_mean"] * u.n_examples for u in updates)
            / sum(u.n_examples for u in updates),
            "parties": {u.name: u.stats for u in updates},
            "mb_down": megabytes(down * len(updates)), "mb_up": megabytes(up),
            "seconds": time.perf_counter() - start, **agg_info,
        }
        privacy = {u.name: {"epsilon": u.stats["epsilon"], "delta": u.stats["delta"]}
                   for u in updates if "epsilon" in u.stats}
        if privacy:
            record["dp"] = privacy
        session.complete_round(new_adapter, record)
        log.say(f"round {session.round}/{config.rounds} done: train loss {record['train_loss']:.4f}, "
                f"down {record['mb_down']:.2f} MB, up {record['mb_up']:.2f} MB, "
                f"{time.perf_counter() - start:.1f} s")
        if privacy:
            log.say("privacy spent: " + ", ".join(f"{n} epsilon {v['epsilon']:.3f} (delta {v['delta']:.2g})"
                                                  for n, v in privacy.items()))
    return session.finish({
        "mb_down_total": sum(h.get("mb_down", 0.0) for h in session.history),
        "mb_up_total": sum(h.get("mb_up", 0.0) for h in session.history),
        "secure_agg": config.secure_agg, "party_examples": sum(t.n_examples for t in trainers),
        **({"dp": dp_report(trainers)} if config.dp is not None else {}),
    })
