"""The owner's side of FedBiOT, independent of how parties are reached.

`OwnerSession` holds the full model (teacher), the compressed model with LoRA on every layer (student), the
global adapter and emulator LoRA and the aligner. The student's frozen weights are the teacher's own tensors
(`RunConfig.share_weights`), so the owner holds the model once; only the LoRA is per model. The in-process
simulation and the ZeroMQ server drive the same object: `payload()` -> parties train ->
`complete_round(new_adapter)` -> `finish()`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from errors import ConfigError
from learning.compressed_model import Manifest
from learning.forward import model_device
from learning.lora import initial_lora, load_lora_state, lora_state, remap_layer_indices
from owner.alignment import EmulatorAligner
from owner.compress import compress, kept_layer_indices, save_compressed
from owner.config import RunConfig
from owner.evaluate import eval_batch_count, response_and_answer_nll
from owner.export import export_adapemu, export_adapfu
from owner.fidelity import fidelity_batches, gradient_fidelity
from owner.footprint import gb, owner_footprint
from owner.metrics import MetricsLog
from owner.model_card import EMBEDDED_WEIGHTS, CardFacts, base_model_name, dp_summary, render_card
from owner.models import (
    DEFAULT_NAME,
    LoadedModel,
    decoder_layers,
    decoder_layers_path,
    load_model,
    make_resident,
    model_source,
)
from owner.prealign_cache import PreAlignment, cached_base_nll, load_prealigned, prealign_key, store_prealigned
from owner.records import describe_fidelity
from owner.state import OwnerCheckpoint, latest_checkpoint_dir, load_checkpoint, save_checkpoint
from tasks.datasets import SAMPLES, Example, load_examples
from tasks.prompts import IGNORE_INDEX, TokenizedExample, pad_id_of, resolve_template, tokenize_examples


@dataclass
class OwnerData:
    """The owner's own data: public alignment set and held-out evaluation items (raw, then tokenised)."""

    public: list[Example]
    evaluation: list[Example]
    public_tokens: list[TokenizedExample] = field(default_factory=list)
    eval_tokens: list[TokenizedExample] = field(default_factory=list)
    eval_answer_tokens: list[TokenizedExample] = field(default_factory=list)  # labels on the answer line only
    task: list[Example] = field(default_factory=list)  # --task-fidelity-data (held-out task items), or none
    task_tokens: list[TokenizedExample] = field(default_factory=list)

    @classmethod
    def load(cls, config: RunConfig) -> OwnerData:
        public = load_examples(config.public_data, config.public_data_kind, limit=config.public_limit,
                               columns=config.public_columns, columns_flag="--public-columns")
        evaluation = load_examples(config.eval_data, config.eval_data_kind, limit=config.eval_items,
                                   columns=config.eval_columns, columns_flag="--eval-columns")
        task = [] if not config.task_fidelity_data else load_examples(
            config.task_fidelity_data, config.party_data_kind, columns=config.party_columns,
            columns_flag="--party-columns")
        return cls(public, evaluation, task=task)

    def tokenize(self, tokenizer, config: RunConfig) -> None:
        self.public_tokens = tokenize_examples(self.public, tokenizer, config.max_length, config.template,
                                               what=f"--public-data {config.public_data}", use="alignment")
        self.eval_tokens = tokenize_examples(self.evaluation, tokenizer, config.max_length, config.template,
                                             what=f"--eval-data {config.eval_data}", use="evaluation")
        self.eval_answer_tokens = tokenize_examples(self.evaluation, tokenizer, config.max_length, config.template,
                                                    answer_line=True, warn=False)  # the same drops, said above
        if self.task:
            self.task_tokens = tokenize_examples(self.task, tokenizer, config.max_length, config.template,
                                                 what=f"--task-fidelity-data {config.task_fidelity_data}",
                                                 use="the task fidelity")


def data_label(spec: str) -> str:
    """A data source as a model card names it: samples and hub ids as given, a local path by its file name."""
    if spec in SAMPLES:
        return f"packaged sample {spec}"
    path = Path(spec).expanduser()
    return path.name if path.exists() or path.is_absolute() else spec


class OwnerSession:
    """Owner state machine: compress, pre-align, per-round aggregate + align, checkpoint, export."""

    def __init__(self, config: RunConfig, out_dir: Path, log: MetricsLog, base: LoadedModel,
                 data: OwnerData) -> None:
        self.config, self.out_dir, self.log, self.base, self.data = config, Path(out_dir), log, base, data
        self.tokenizer = base.tokenizer
        self.pad_id = pad_id_of(self.tokenizer)
        self.round = 0
        self.history: list[dict] = []
        self.started = time.time()

    # ----------------------------------------------------------------- setup
    @staticmethod
    def load_inputs(config: RunConfig, log: MetricsLog) -> tuple[LoadedModel, OwnerData]:
        """Everything that can fail on bad input, before anything is written: data, model, compression."""
        hardware = config.hardware()  # an unusable --device/--dtype is one error line, before any output
        data = OwnerData.load(config)
        log.say(f"loading model {config.model or DEFAULT_NAME} on "
                f"{hardware.describe()}")
        base = load_model(config.model, dtype=hardware.dtype, placement=config.placement())
        n_layers = len(decoder_layers(base.model))
        bottom, top = config.adapter_layout(n_layers)
        kept_layer_indices(n_layers, top, config.drop_rate, bottom)
        data.tokenize(base.tokenizer, config)
        return base, data

    @classmethod
    def create(cls, config: RunConfig, out_dir: Path, log: MetricsLog, base: LoadedModel, data: OwnerData,
               resume: bool = False) -> OwnerSession:
        """Compress the model, attach LoRA, restore or pre-align. Writes `compressed/`."""
        session = cls(config, out_dir, log, base, data)
        session._build(resume)
        return session

    def _build(self, resume: bool) -> None:
        cfg = self.config
        compressed_dir = self.out_dir / "compressed"
        n_layers = len(decoder_layers(self.base.model))
        bottom, top = cfg.adapter_layout(n_layers)
        path = decoder_layers_path(self.base.model)
        # the adapter layers carry LoRA on both models: out of any offload before the compressed model shares them
        make_resident(self.base.model, [f"{path}.{i}" for i in (*range(bottom), *range(n_layers - top, n_layers))])
        compressed, manifest = compress(self.base.model, top, cfg.drop_rate, self.base.identity, bottom,
                                        share_weights=cfg.share_weights)
        self._report_footprint(manifest)
        if resume and compressed_dir.is_dir():
            saved = Manifest.load(compressed_dir)
            if saved.kept_layers != manifest.kept_layers or saved.base_model != manifest.base_model:
                raise ConfigError(f"{compressed_dir} was made from another model or compression setting")
        else:
            save_compressed(compressed, self.tokenizer, manifest, compressed_dir)
        self.manifest = manifest
        self.compressed_dir = compressed_dir
        n_emu, a, s = len(manifest.emulator_layers), manifest.bottom_adapter_size, manifest.adapter_size
        adapter = f"first {a} + last {s}" if a else f"{s}"
        self.log.say(f"{cfg.method}: compressed {manifest.n_layers} layers -> emulator {n_emu} + adapter "
                     f"{adapter} (kept {manifest.kept_layers})")
        self.student = initial_lora(compressed, manifest, cfg.lora, cfg.seed)
        self.teacher = initial_lora(self.base.model, manifest, cfg.lora, cfg.seed, full_model=True)
        self.adapter_state = lora_state(self.student, manifest.adapter_layers)
        self.initial_adapter = {k: v.clone() for k, v in self.adapter_state.items()}  # what `untrained` compares
        self.emulator_state = lora_state(self.student, manifest.emulator_layers)
        self.log.params({**cfg.to_dict(), "layout": {  # the hyperparameters of --report-to's trackers
            "emulator_layers": len(manifest.emulator_layers), "adapter_layers": len(manifest.adapter_layers),
            "adapter_lora_params": sum(t.numel() for t in self.adapter_state.values()),
            "emulator_lora_params": sum(t.numel() for t in self.emulator_state.values())}})
        self._sync_teacher()
        # FedAvg-LoRA on the full model has no emulator, so nothing to align.
        self.aligner = EmulatorAligner(self.student, self.teacher, manifest, self.data.public_tokens, self.pad_id,
                                       cfg.align, cfg.seed, cache_dir=self.out_dir / "teacher_cache"
                                       ) if manifest.emulator_layers else None
        self.fidelity_groups = fidelity_batches(self.data.public_tokens, cfg.align.fidelity_batches,
                                                cfg.align.batch_size, cfg.seed) if self.aligner else []
        self.task_fidelity_groups = fidelity_batches(self.data.task_tokens, cfg.task_fidelity_batches,
                                                     cfg.align.batch_size, cfg.seed) if self.aligner else []
        latest = latest_checkpoint_dir(self.out_dir) if resume else None
        if latest is not None:
            self._restore(load_checkpoint(latest))
            self.log.say(f"resumed from {latest.name}: {self.round} of {cfg.rounds} rounds done")
        else:
            info = self._pre_align()
            self.log.record("pre_alignment", **info)
            if info.get("fidelity"):
                self.log.say(f"after pre-alignment, {describe_fidelity(info['fidelity'])}")
            self.checkpoint()
        self.log.rounds_started(cfg.rounds, self.round)

    def _report_footprint(self, manifest: Manifest) -> None:
        """What the owner holds per device (`owner.footprint`, the figures `owner plan` prints), logged and
        recorded; offloaded weights are named with what they cost every alignment step."""
        model = self.base.model
        device_map = getattr(model, "hf_device_map", None) or {"": str(model_device(model))}
        compute = 2 if model.dtype in (torch.bfloat16, torch.float16) else 4
        tokens = sum(len(item.input_ids) for item in self.data.public_tokens)
        footprint = owner_footprint(model, device_map, manifest, self.config, tokens, compute)
        self.log.record("footprint", **footprint.to_dict())
        self.log.say(f"owner memory (weights, LoRA, E* cache, one alignment step): {footprint.describe()}")
        slow = {k: v for k, v in footprint.offloaded.items() if v}
        if slow:
            self.log.say("offloaded weights are read from " + " and ".join(f"{where} ({gb(size)})" for where, size
                         in slow.items()) + " every time they run: the full model's lower layers once per public "
                         "example (E* is cached), the compressed model runs from its own copies of what it keeps")

    def _pre_align(self) -> dict:
        """Pre-alignment, or its result loaded from `--prealign-cache` when everything it depends on matches."""
        cfg = self.config
        if self.aligner is None or not cfg.prealign_cache or cfg.align.pre_steps == 0:
            return self._align(cfg.align.pre_steps, -1)
        key = prealign_key(self.teacher, self.manifest, self.data.public_tokens, align=cfg.align.to_dict(),
                           lora=cfg.lora.to_dict(), seed=cfg.seed, adapter_state=self.adapter_state,
                           emulator_state=self.emulator_state)
        cache_dir = Path(cfg.prealign_cache).expanduser()
        found = load_prealigned(cache_dir, key)
        if found is None:
            info = self._align(cfg.align.pre_steps, -1)
            saved = {k: v for k, v in info.items()  # the fidelity is measured per run
                     if k not in ("fidelity", "task_fidelity", "fidelity_seconds")}
            store_prealigned(cache_dir, key, PreAlignment(self.emulator_state, self.aligner.optimizer.state_dict(),
                                                          saved))
            return {**info, "cache": "stored", "cache_key": key}
        load_lora_state(self.student, found.emulator_state, self.manifest.emulator_layers)
        self.emulator_state = lora_state(self.student, self.manifest.emulator_layers)
        self.aligner.optimizer.load_state_dict(found.optimizer_state)
        self.student.eval()
        self.log.say(f"pre-aligned emulator loaded from the cache ({key}): {cfg.align.pre_steps} steps skipped")
        info = {**found.info, "seconds_saved": found.info.get("seconds"), "seconds": 0.0, "cache": "loaded",
                "cache_key": key}
        self._add_fidelity(info, -1)
        return info

    def _restore(self, ckpt: OwnerCheckpoint) -> None:
        load_lora_state(self.student, ckpt.adapter_state, self.manifest.adapter_layers)
        load_lora_state(self.student, ckpt.emulator_state, self.manifest.emulator_layers)
        self.adapter_state, self.emulator_state = ckpt.adapter_state, ckpt.emulator_state
        self._sync_teacher()
        if ckpt.optimizer_state is not None and self.aligner is not None:
            self.aligner.optimizer.load_state_dict(ckpt.optimizer_state)
        self.round, self.history = ckpt.round, ckpt.history

    def _sync_teacher(self) -> None:
        mapping = dict(zip(self.manifest.adapter_layers, self.manifest.full_adapter_layers, strict=True))
        load_lora_state(self.teacher, remap_layer_indices(self.adapter_state, mapping),
                        self.manifest.full_adapter_layers)

    # ----------------------------------------------------------------- rounds
    @property
    def done(self) -> bool:
        return self.round >= self.config.rounds

    def payload(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """What every party receives this round: (adapter LoRA, emulator LoRA)."""
        return self.adapter_state, self.emulator_state

    def complete_round(self, new_adapter: dict[str, torch.Tensor], record: dict) -> None:
        """Install the aggregated adapter, re-align the emulator to it, checkpoint the round.

        Adds to `record`, for its progress line, the gradient fidelity measured after alignment (`fidelity`), the
        round's wall time (`seconds`: the parties' part as the mode measured it, then the owner's alignment and
        fidelity) and its parts (`phase_seconds`).
        """
        started = time.perf_counter()
        load_lora_state(self.student, new_adapter, self.manifest.adapter_layers)
        self.adapter_state = lora_state(self.student, self.manifest.adapter_layers)
        self._sync_teacher()
        steps = self.config.align.round_steps if self.config.realigns_each_round else 0
        info = self._align(steps, self.round)
        fidelity = info.pop("fidelity", None)
        if fidelity:
            record["fidelity"] = fidelity
        self.round += 1
        # The round's wall time and its parts: the parties' (training, upload, aggregation: `seconds` as the
        # mode measured it up to the aggregate) and the owner's own work after it.
        parts = {"parties": record.get("seconds") or 0.0, "alignment": info.get("seconds", 0.0),
                 "fidelity": info.pop("fidelity_seconds", 0.0)}
        record.update(phase_seconds=parts, seconds=parts["parties"] + time.perf_counter() - started)
        record = {"round": self.round, **record, "alignment": info}
        self.history.append(record)
        self.log.record("round", **record)
        self.checkpoint()
        self.log.round_finished(self.round, record["seconds"])

    def _align(self, steps: int, stage: int) -> dict:
        """`steps` emulator alignment steps (none without an emulator); refreshes the emulator LoRA."""
        if self.aligner is None:
            return {"steps": 0}
        self.log.align_started(stage, steps)
        info = self.aligner.run(steps, stage, self.log.align_step)
        self.emulator_state = lora_state(self.student, self.manifest.emulator_layers)
        self._add_fidelity(info, stage)
        return info

    def _add_fidelity(self, info: dict, stage: int) -> None:
        """Measure the gradient fidelity (owner.fidelity) into `info` and metrics.jsonl, if switched on: on the
        public batches after every alignment, on the held-out task batches after pre-alignment and the last round
        (event `task_fidelity`)."""
        started = time.perf_counter()
        fidelity = self._fidelity("gradient fidelity", self.data.public_tokens, self.fidelity_groups)
        if fidelity is not None:
            info["fidelity"] = fidelity
            self.log.record("fidelity", stage=stage, **fidelity)
        if stage in (-1, self.config.rounds - 1):
            task = self._fidelity("task fidelity", self.data.task_tokens, self.task_fidelity_groups)
            if task is not None:
                info["task_fidelity"] = task
                self.log.record("task_fidelity", stage=stage, **task)
        info["fidelity_seconds"] = time.perf_counter() - started

    def _fidelity(self, desc: str, data: list[TokenizedExample], groups: list) -> dict | None:
        """`gradient_fidelity` on these batches, its progress shown (a forward and backward pass through both
        models per batch: the owner's slowest step after alignment)."""
        if not groups:
            return None
        with self.log.phase(desc, len(groups), unit="batch") as task:
            return gradient_fidelity(self.student, self.teacher, self.manifest, data, groups, self.pad_id,
                                     progress=task.update_to)

    def checkpoint(self) -> Path:
        optimizer = None if self.aligner is None else self.aligner.optimizer.state_dict()
        return save_checkpoint(self.out_dir, OwnerCheckpoint(
            self.round, self.adapter_state, self.emulator_state, optimizer, self.history))

    def untrained(self) -> str | None:
        """Why the run ends with the adapter it started from (no round was aggregated, or the aggregates
        changed nothing), or None when the adapter was trained."""
        aggregated = sum(1 for record in self.history if not record.get("skipped"))
        if not aggregated:
            return f"no round was aggregated ({self.round} of {self.config.rounds} rounds skipped)"
        if all(torch.equal(self.adapter_state[k], v) for k, v in self.initial_adapter.items()):
            return f"the adapter is unchanged after {aggregated} aggregated rounds"
        return None

    # ----------------------------------------------------------------- results
    @property
    def compressed_name(self) -> str:
        """How AdapEmu names its base: the run's compressed checkpoint under --out as the user gave it."""
        return str(self.out_dir / "compressed")

    def evaluate(self) -> dict[str, float | None]:
        """Held-out NLL of the untouched model, AdapEmu and AdapFu: per response token (`nll_*`) and per token
        of the response's last line (`answer_nll_*`; GSM8K: "The answer is N."), from the same forward pass."""
        data, answers, pad = self.data.eval_tokens, self.data.eval_answer_tokens, self.pad_id
        task = self.log.phase("held-out NLL (base, AdapEmu, AdapFu)", 3 * eval_batch_count(len(data)), unit="batch")

        def score(model) -> dict[str, float | None]:
            nll, answer_nll = response_and_answer_nll(model, data, answers, pad, progress=task.update)
            return {"nll": nll, "answer_nll": answer_nll}

        def base() -> dict[str, float | None]:
            with self.teacher.disable_adapter():
                return score(self.teacher)
        cache = self.config.prealign_cache
        with task:
            scores = {"base": cached_base_nll(Path(cache).expanduser(), self.teacher, data + answers, base)
                      if cache else base(), "adapemu": score(self.student), "adapfu": score(self.teacher)}
            task.update_to(task.total)  # a base NLL from the cache skipped its batches
        return {f"{kind}_{model}": value[kind] for kind in ("nll", "answer_nll") for model, value in scores.items()}

    def card_facts(self, scores: dict[str, float], extra: dict) -> CardFacts:
        """What the adapters' model cards state; `extra` may carry `party_examples` and the parties' `dp`."""
        cfg, m = self.config, self.manifest
        name, note = base_model_name(cfg.model)
        bottom = f"first {m.bottom_adapter_size} + " if m.bottom_adapter_size else ""
        settings = {
            "adapter layers": f"{bottom}last {m.adapter_size} of {m.n_layers}",
            "emulator layers": f"{len(m.emulator_layers)} (drop rate {cfg.drop_rate:g})",
            "LoRA": f"r={cfg.lora.r}, alpha={cfg.lora.alpha}, dropout={cfg.lora.dropout:g}",
            "local steps x batch": f"{cfg.train.local_steps} x {cfg.train.batch_size}",
            "learning rate": cfg.train.lr, "proximal eps": cfg.train.prox_eps,
            "alignment steps": f"{cfg.align.pre_steps} before round 1, "
                               f"{cfg.align.round_steps if cfg.realigns_each_round else 0} per round",
            "alignment KL weight": cfg.align.kl_weight, "max length": cfg.max_length,
            "party split": cfg.split, "seed": cfg.seed,
        }
        data = {"party training examples": extra.get("party_examples"),
                "public alignment examples": len(self.data.public),
                "held-out evaluation items": len(self.data.eval_tokens)}
        return CardFacts(
            base_model=name, base_note=note, method=cfg.method, rounds=self.round, parties=cfg.parties,
            settings=settings, data={k: v for k, v in data.items() if isinstance(v, int)},
            nll={"base": scores["nll_base"], "adapfu": scores["nll_adapfu"], "adapemu": scores["nll_adapemu"]},
            eval_items=len(self.data.eval_tokens), eval_data=data_label(cfg.eval_data),
            secure_agg=cfg.secure_agg, dp=dp_summary(extra.get("dp")),
            template=resolve_template(self.tokenizer, cfg.template),
            on_hub=model_source(cfg.model).kind in ("hub", "default"),
            base_weights=EMBEDDED_WEIGHTS if cfg.model is None else None, compressed=self.compressed_name)

    def finish(self, extra: dict | None = None) -> dict:
        """Evaluate, export AdapEmu and AdapFu with their model cards, write summary.json."""
        cfg, m = self.config, self.manifest
        self.log.say(f"evaluating NLL on {len(self.data.eval_tokens)} held-out items")
        scores = self.evaluate()
        facts = self.card_facts(scores, extra or {})
        export_adapemu(self.student, m, self.compressed_dir, self.out_dir / "adapemu", self.tokenizer,
                       render_card("adapemu", facts), base_name=self.compressed_name)
        export_adapfu(self.teacher, m, facts.base_model, self.out_dir / "adapfu", self.tokenizer,
                      render_card("adapfu", facts))
        self.log.say(f"exported AdapFu (base {facts.base_model}) and AdapEmu, with tokenizer and model card")
        summary = {
            **scores,
            "rounds": self.round,
            "parties": cfg.parties,
            "eval_items": len(self.data.eval_tokens),
            "answer_items": sum(any(label != IGNORE_INDEX for label in item.labels[1:])
                                for item in self.data.eval_answer_tokens),  # the rest lose their answer to max_length
            "base_model": facts.base_model,
            **({"base_weights": facts.base_note} if facts.base_note else {}),
            "method": cfg.method,
            "emulator_layers": len(m.emulator_layers),
            "adapter_layers": len(m.adapter_layers),
            "adapter_lora_params": sum(t.numel() for t in self.adapter_state.values()),
            "emulator_lora_params": sum(t.numel() for t in self.emulator_state.values()),
            "seconds": round(time.time() - self.started, 1),
            **(extra or {}),
        }
        untrained = self.untrained()
        if untrained:
            summary["untrained"] = untrained
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        self.log.record("summary", **summary)
        self.log.say("NLL on held-out items: base {nll_base:.4f}, AdapEmu {nll_adapemu:.4f}, "
                     "AdapFu {nll_adapfu:.4f}".format(**scores))
        return summary
