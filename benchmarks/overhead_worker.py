"""One measurement in a process of its own, so its peak memory (ru_maxrss) is that of one node.

    python -m benchmarks.overhead_worker SPEC.json OUT.json

`kind: "party"` loads a compressed checkpoint exactly as a party does and times its training rounds (plus
the efficiency variants); `kind: "owner"` runs the owner session with N in-process parties sharing one
model and times each part of a round. The spec is written by benchmarks.overhead; the result is JSON.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from benchmarks.flops import counted_flops, matmul_rate, step_flops
from learning.forward import IGNORE_INDEX
from learning.lora import LoraSettings, load_lora_state, lora_state, set_trainable
from learning.party_model import PartyModel
from learning.training import PartyTrainer, TrainSettings, live_lora_pairs
from tasks.batching import padding_fraction, round_batches
from tasks.prompts import TokenizedExample


def rss_mb() -> float:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def matmul_shapes(model: nn.Module, tokens: int, square: int) -> list[tuple[int, int, int]]:
    """The model's own largest GEMMs at this many tokens, and a large square one."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    d, ff = cfg.hidden_size, cfg.intermediate_size
    return [(tokens, d, ff), (tokens, ff, d), (square, square, square)]


def party_tokens(spec: Mapping, tokenizer) -> tuple[list[TokenizedExample], float]:
    """The party's share of the data, tokenised; (examples, seconds spent tokenising)."""
    from owner.config import RunConfig
    from owner.simulate import party_splits
    from tasks.prompts import tokenize_examples

    config = RunConfig(parties=spec["split_parties"], seed=spec["seed"], party_data=spec["party_data"],
                       max_length=spec["max_length"])
    share = party_splits(config)[0]
    start = time.perf_counter()
    tokens = tokenize_examples(share, tokenizer, spec["max_length"], "auto")
    return tokens, time.perf_counter() - start


class FullLogitsTrainer(PartyTrainer):
    """The same step with logits at every position (what a plain `model(**batch).logits` loss costs)."""

    def loss(self, batch, reference, pairs):
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            use_cache=False).logits
        targets = batch["labels"][:, 1:].reshape(-1)
        ce = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets,
                                         ignore_index=IGNORE_INDEX)
        if self.settings.prox_eps == 0:
            return ce, ce
        from learning.training import proximal_term

        return ce + 0.5 * self.settings.prox_eps * proximal_term(pairs, reference, self.lora.scale), ce


def _timed_rounds(trainer: PartyTrainer, adapter: dict, emulator: dict, reps: int, threads: int,
                  shapes: list, flops_per_round: int, before: Callable[[], None] | None = None,
                  probe_s: float = 0.3) -> dict:
    """`reps` identical rounds (round 0's batches each time) between matmul-rate probes; a round's
    efficiency is its FLOP/s over the mean of the probes just before and just after it."""
    torch.set_num_threads(threads)
    rounds = []
    probes = [max(matmul_rate(shapes, seconds=probe_s).values())]
    for _ in range(reps):
        if before:
            before()
        stats = trainer.train_round(0, adapter, emulator).stats
        probes.append(max(matmul_rate(shapes, seconds=probe_s).values()))
        rate = flops_per_round / stats["seconds"]
        rounds.append({"seconds": stats["seconds"], "tokens": stats["tokens"], "tokens_per_s": stats["tokens_per_s"],
                       "flops_per_s": rate, "matmul_flops_per_s": (probes[-2] + probes[-1]) / 2})
    return {"threads": threads, "rounds": rounds,
            "tokens_per_s": median([r["tokens_per_s"] for r in rounds]),
            "seconds": median([r["seconds"] for r in rounds]),
            "flops_per_s": median([r["flops_per_s"] for r in rounds]),
            "matmul_flops_per_s": median([r["matmul_flops_per_s"] for r in rounds]), "matmul_probes": probes,
            "efficiency": median([r["flops_per_s"] / r["matmul_flops_per_s"] for r in rounds])}


def reset_peak() -> None:
    """Restart the kernel's peak-RSS mark (VmHWM), so the next peak is that of the phase that follows."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def hwm_mb() -> float:
    """Peak RSS since the last reset_peak (or since the start)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    return peak_rss_mb()


def progress(text: str) -> None:
    print(f"[worker {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class PartySetup:
    """A party as it runs: the compressed checkpoint loaded from disk, LoRA attached, its data tokenised."""

    def __init__(self, spec: Mapping, model_dir: str) -> None:
        self.lora = LoraSettings()
        party = PartyModel.load(model_dir, self.lora, spec["seed"])
        self.model, self.manifest, self.pad, self.load_s = party.model, party.manifest, party.pad_id, party.load_s
        manifest = party.manifest
        self.tokens, self.tokenise_s = party_tokens(spec, party.tokenizer)
        self.settings = TrainSettings(local_steps=spec["steps"], batch_size=spec["batch_size"])
        self.trainer = party.trainer("party-1", self.tokens, self.lora, self.settings, spec["seed"])
        self.adapter = lora_state(self.model, manifest.adapter_layers)
        self.emulator = lora_state(self.model, manifest.emulator_layers)
        load_lora_state(self.model, self.emulator, manifest.emulator_layers, fold=True)  # as a round does
        self.batches = round_batches(self.tokens, 0, self.settings.local_steps, self.settings.batch_size,
                                     self.trainer.seed, self.pad)
        self.flops = [step_flops(self.model, manifest.adapter_layers, *b["input_ids"].shape,
                                 int((b["labels"][:, 1:] != IGNORE_INDEX).sum())) for b in self.batches]
        self.flops_round = sum(f.total for f in self.flops)
        self.shapes = matmul_shapes(self.model, max(b["input_ids"].numel() for b in self.batches), spec["square"])
        self.probe_s = spec["probe_s"]

    def warm_up(self) -> None:
        """One single-step round: first-call allocations and kernel choices stay out of the timings."""
        warm = PartyTrainer("party-1", self.model, self.manifest, self.tokens, self.pad, self.lora,
                            TrainSettings(local_steps=1, batch_size=self.settings.batch_size), 0)
        warm.train_round(0, self.adapter, self.emulator)

    def timed(self, reps: int, threads: int, runner: PartyTrainer | None = None,
              before: Callable[[], None] | None = None) -> dict:
        return _timed_rounds(runner or self.trainer, self.adapter, self.emulator, reps, threads, self.shapes,
                             self.flops_round, before=before, probe_s=self.probe_s)


def party(spec: Mapping) -> dict:
    threads = spec["threads"]
    torch.set_num_threads(threads)
    out: dict = {"rss_start_mb": rss_mb()}
    setup = PartySetup(spec, spec["model_dir"])
    model, manifest, batches, per_batch = setup.model, setup.manifest, setup.batches, setup.flops
    adapter, emulator, trainer = setup.adapter, setup.emulator, setup.trainer
    out["load_s"], out["tokenise_s"] = setup.load_s, setup.tokenise_s
    out["rss_loaded_mb"] = rss_mb()
    real_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    flops_round = setup.flops_round
    out.update({
        "examples": len(setup.tokens), "trainable_params": sum(t.numel() for t in adapter.values()),
        "emulator_lora_params": sum(t.numel() for t in emulator.values()),
        "layers": manifest.n_compressed, "adapter_layers": len(manifest.adapter_layers),
        "emulator_layers": len(manifest.emulator_layers),
        "round_tokens": real_tokens, "round_positions": sum(b["attention_mask"].numel() for b in batches),
        "round_logits": sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches),
        "padding_fraction": padding_fraction(batches),
        "flops_round": flops_round, "gflop_per_token": flops_round / real_tokens / 1e9,
        "gflop_per_token_forward": sum(f.forward_total for f in per_batch) / real_tokens / 1e9,
        "gflop_per_token_backward": sum(f.backward_total for f in per_batch) / real_tokens / 1e9,
        "flops_by_kind": {which: {k: sum(getattr(f, which).get(k, 0) for f in per_batch)
                                  for k in set().union(*(getattr(f, which) for f in per_batch))}
                          for which in ("forward", "backward")},
    })
    setup.warm_up()
    out["peak_load_mb"] = hwm_mb()
    reset_peak()
    progress(f"loaded ({out['rss_loaded_mb']:.0f} MB); timing {spec['reps']} rounds")
    out["main"] = setup.timed(spec["reps"], threads)
    out["peak_rss_mb"] = hwm_mb()  # training: model, activations, gradients, optimizer state
    out["matmul_shapes"] = matmul_rate(setup.shapes, seconds=spec["probe_s"])
    progress(f"{out['main']['tokens_per_s']:.1f} tokens/s, training peak {out['peak_rss_mb']:.0f} MB")

    # torch's FLOP counter on the first batch of the round, against the analytic count
    set_trainable(model, manifest.adapter_layers)
    pairs = live_lora_pairs(model, trainer.adapter_prefixes)
    model.train()

    def one_step() -> None:
        total, _ = trainer.loss(batches[0], adapter, pairs)
        total.backward()

    counted, per_op = counted_flops(one_step)
    model.zero_grad(set_to_none=True)
    model.eval()
    out["flop_check"] = {"analytic": per_batch[0].total, "torch": counted, "per_op": per_op,
                         "ratio": per_batch[0].total / counted}

    # Variants, each interleaved with the baseline round so that both see the same machine load.
    variants = spec.get("variants", [])
    alt = spec.get("alt_threads")
    if "threads" in variants and alt and alt != threads:
        progress(f"threads {threads} vs {alt}")
        runs: dict = {threads: [], alt: []}
        for _ in range(spec["variant_reps"]):
            for t in (alt, threads):
                runs[t].append(setup.timed(1, t))
        out["threads"] = {str(t): {"tokens_per_s": median([r["tokens_per_s"] for r in rs]),
                                   "matmul_flops_per_s": median([r["matmul_flops_per_s"] for r in rs]),
                                   "efficiency": median([r["efficiency"] for r in rs])}
                          for t, rs in runs.items()}
        torch.set_num_threads(threads)
    if "emulator_lora" in variants and manifest.emulator_layers:
        progress("frozen emulator LoRA folded into the weights vs live LoRA modules")
        runs = {"folded": [], "live": []}
        for _ in range(spec["variant_reps"]):
            for state in ("folded", "live"):
                setup.trainer.fold_emulator = state == "folded"
                runs[state].append(setup.timed(1, threads))
        setup.trainer.fold_emulator = True
        out["emulator_lora"] = {k: median([r["tokens_per_s"] for r in v]) for k, v in runs.items()}
    if "full_logits" in variants:
        progress("logits at labelled vs all positions")
        full = FullLogitsTrainer("party-1", model, manifest, setup.tokens, setup.pad, setup.lora, setup.settings,
                                 spec["seed"])
        positions = sum(b["input_ids"].numel() for b in batches)
        head = model.get_output_embeddings()
        extra = 2 * 2 * (positions - out["round_logits"]) * head.in_features * head.out_features
        runs = {"labelled": [], "all": []}
        for _ in range(spec["variant_reps"]):
            runs["all"].append(setup.timed(1, threads, runner=full))
            runs["labelled"].append(setup.timed(1, threads))
        out["full_logits"] = {"tokens_per_s": {k: median([r["tokens_per_s"] for r in v]) for k, v in runs.items()},
                              "extra_flops_round": extra}
    if "copies" in variants:
        times = []
        for _ in range(max(3, spec["reps"])):
            t0 = time.perf_counter()
            params, _ = trainer.load_global(adapter, emulator)
            torch.optim.AdamW(params, lr=1e-4)
            lora_state(model, manifest.adapter_layers)
            times.append(time.perf_counter() - t0)
            for p in params:
                p.requires_grad_(False)
        out["round_fixed_s"] = median(times)
    return out


def pair(spec: Mapping) -> dict:
    """Two methods' parties in one process, rounds alternating, so both see the same machine load."""
    torch.set_num_threads(spec["threads"])
    setups = {key: PartySetup(spec, directory) for key, directory in spec["model_dirs"].items()}
    for setup in setups.values():
        setup.warm_up()
    runs: dict[str, list[dict]] = {key: [] for key in setups}
    for rep in range(spec["reps"]):
        for key, setup in setups.items():
            runs[key].append(setup.timed(1, spec["threads"]))
        progress(f"paired round {rep + 1}/{spec['reps']}: " + ", ".join(
            f"{k} {v[-1]['tokens_per_s']:.1f} tokens/s" for k, v in runs.items()))
    return {key: {"tokens_per_s": median([r["tokens_per_s"] for r in rs]),
                  "per_round": [r["tokens_per_s"] for r in rs],
                  "efficiency": median([r["efficiency"] for r in rs])} for key, rs in runs.items()}


def owner(spec: Mapping) -> dict:
    """An owner round (or several) with N in-process parties sharing one party model."""
    from learning.secure_update import secagg_config
    from owner.aggregation import fedavg, secure_fedavg
    from owner.alignment import AlignSettings
    from owner.config import RunConfig
    from owner.metrics import MetricsLog
    from owner.session import OwnerSession
    from owner.simulate import make_trainers, party_splits
    from tasks.prompts import tokenize_examples

    torch.set_num_threads(spec["threads"])
    out: dict = {"rss_start_mb": rss_mb()}
    config = RunConfig(
        model=spec["model"], method=spec["method"], adapter_size=spec["adapter_size"],
        drop_rate=spec["drop_rate"], parties=spec["parties"], rounds=spec["rounds"], seed=spec["seed"],
        party_data=spec["party_data"], party_limit=spec.get("party_limit"), max_length=spec["max_length"],
        eval_items=1, public_limit=spec.get("public_limit", 64),
        train=TrainSettings(local_steps=spec["steps"], batch_size=spec["batch_size"]),
        align=AlignSettings(pre_steps=spec["align_pre_steps"], round_steps=spec["align_steps"]),
    )
    work = Path(tempfile.mkdtemp(prefix="owner-", dir=spec.get("tmp")))
    log = MetricsLog(work / "metrics.jsonl", stream=None)
    t0 = time.perf_counter()
    splits = party_splits(config)
    base, owner_data = OwnerSession.load_inputs(config, log)
    tokens = [tokenize_examples(part, base.tokenizer, config.max_length, config.template) for part in splits]
    out["load_s"] = time.perf_counter() - t0
    out["rss_model_mb"] = rss_mb()
    t0 = time.perf_counter()
    session = OwnerSession.create(config, work, log, base, owner_data)
    out["create_s"] = time.perf_counter() - t0
    for line in (work / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["event"] == "pre_alignment":
            out["pre_alignment"] = {k: row.get(k) for k in ("steps", "seconds")}
    out["rss_owner_mb"] = rss_mb()
    party = PartyModel.load(session.compressed_dir, config.lora, config.seed)
    manifest = party.manifest
    trainers = make_trainers(config, party, tokens)
    out["rss_setup_mb"] = rss_mb()
    out["peak_setup_mb"] = hwm_mb()
    reset_peak()
    progress(f"{config.parties} parties set up (owner {out['rss_owner_mb']:.0f} MB, process "
             f"{out['rss_setup_mb']:.0f} MB)")
    rounds = []
    for r in range(config.rounds):
        adapter, emulator = session.payload()
        party_s = []
        updates = []
        for trainer in trainers:
            t0 = time.perf_counter()
            updates.append(trainer.train_round(r, adapter, emulator))
            party_s.append(time.perf_counter() - t0)
        weights = [u.n_examples for u in updates]
        progress(f"round {r + 1}: {len(updates)} parties trained in {sum(party_s):.1f} s")
        plain_s, secure_s, new_adapter, info = [], [], None, {}
        for _ in range(spec["agg_reps"]):
            t0 = time.perf_counter()
            new_adapter = fedavg([u.adapter_state for u in updates], weights)
            plain_s.append(time.perf_counter() - t0)
        rss_before_secure = rss_mb()
        if len(updates) >= 2:
            for _ in range(spec["agg_reps"]):
                t0 = time.perf_counter()
                _, result = secure_fedavg(updates, adapter, secagg_config(weights, config.seed), r, config.seed)
                secure_s.append(time.perf_counter() - t0)
                info = {"party_cpu_max_s": max(result.party_cpu_s), "party_cpu_median_s":
                        median(result.party_cpu_s), "owner_cpu_s": result.server_cpu_s,
                        "ring_bits": result.ring_bits}
        peak_round = hwm_mb()
        session.complete_round(new_adapter, {"participants": [u.name for u in updates]})
        align = session.history[-1]["alignment"]
        progress(f"round {r + 1}: aggregation {median(plain_s):.3f} s plain, "
                 f"{median(secure_s) if secure_s else float('nan'):.2f} s secure; alignment "
                 f"{align.get('seconds', 0.0):.1f} s")
        rounds.append({
            "party_s": party_s, "party_s_median": median(party_s), "party_s_sum": sum(party_s),
            "plain_agg_s": median(plain_s), "secure_agg_s": median(secure_s) if secure_s else None,
            "secure": info, "align_s": align.get("seconds", 0.0), "align_steps": align.get("steps", 0),
            "rss_before_secure_mb": rss_before_secure, "peak_rss_mb": peak_round,
        })
    out["rounds"] = rounds
    out["peak_rss_mb"] = max(out["peak_setup_mb"], hwm_mb())
    out["adapter_params"] = sum(t.numel() for t in session.adapter_state.values())
    out["owner_emulator_layers"] = len(manifest.emulator_layers)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    result = {"party": party, "pair": pair, "owner": owner}[spec["kind"]](spec)
    result["loadavg"] = os.getloadavg()
    Path(argv[1]).write_text(json.dumps(result, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
