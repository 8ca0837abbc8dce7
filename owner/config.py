"""The run configuration: every option of a run in one place, saved as `config.json` beside its outputs.

Like the settings it nests (`learning.settings`, `AlignSettings` here), it imports no torch: the command-line
options take their defaults from its fields, and parsing them must not wait for the model libraries.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from errors import ConfigError
from learning.devices import dp_dtype
from learning.run_settings import PartyRunSettings
from learning.settings import DPSettings, LoraSettings, TrainSettings
from tasks.columns import ColumnMap

# fedbiot: adapter = last s layers, emulator re-aligned every round. offsite (Offsite-tuning): one party
# with all the data, adapter = first 2 + last s layers, emulator aligned once. fedot: the same adapter and
# one-time alignment, N parties. fedavg-full: LoRA on every layer of the full model (no emulator).
METHODS = ("fedbiot", "offsite", "fedot", "fedavg-full")
# Each method's own adapter, (first a, last s) layers, where --bottom-adapter / --adapter-size are not given.
# FedBiOT: last 4; s=4 beat s=2 on GSM8K at beta 0.2 (AdapFu NLL -0.052, paired t p = 0.0001 over 5 seeds;
# docs/results.md). Offsite-tuning/FedOT: first 2 + last 2, the paper's layout and the one they were measured at
# (the same four adapter layers as FedBiOT's).
METHOD_ADAPTER = {"fedbiot": (0, 4), "offsite": (2, 2), "fedot": (2, 2)}


def _check_layer_count(option: str, value: object, minimum: int) -> None:
    """A layer count from a command line or a config file: None (the method's own) or an integer, never a bool."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ConfigError(f"{option} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class AlignSettings:
    """Owner distillation settings (paper: 500 pre-alignment steps, 10 per round)."""

    pre_steps: int = 64  # lr and steps chosen on held-out training items (docs/results/alignment.md)
    round_steps: int = 4
    batch_size: int = 4
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    kl_weight: float = 0.0  # lambda: chosen on validation for FedBiOT (docs/results/accuracy-gsm8k.md)
    max_grad_norm: float | None = 1.0
    cache_teacher: bool = True  # compute E*(x) once per public example instead of every step
    cache_memory_mb: float = 1024.0  # E* kept on the teacher's device up to this; beyond, spilled to disk
    checkpoint_activations: bool = True  # recompute each student layer's activations in the backward pass
    fidelity_batches: int = 2  # public batches for the gradient-fidelity measurement after alignment; 0 = off

    def __post_init__(self) -> None:
        if self.pre_steps < 0 or self.round_steps < 0 or self.batch_size < 1:
            raise ConfigError("alignment steps must be >= 0 and the batch size >= 1")
        if self.lr <= 0 or self.kl_weight < 0:
            raise ConfigError("alignment lr must be > 0 and lambda >= 0")
        if not isinstance(self.cache_memory_mb, int | float) or self.cache_memory_mb < 0:
            raise ConfigError(f"the teacher cache bound must be >= 0 MB, got {self.cache_memory_mb!r}")
        if isinstance(self.fidelity_batches, bool) or not isinstance(self.fidelity_batches, int) \
                or self.fidelity_batches < 0:
            raise ConfigError(f"fidelity batches must be an integer >= 0, got {self.fidelity_batches!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> AlignSettings:
        data = dict(data)
        data["betas"] = tuple(data.get("betas", (0.9, 0.95)))
        return cls(**data)


@dataclass
class RunConfig:
    """Options shared by the in-process and the networked run."""

    model: str | None = None  # hub id, local dir, .gguf file; None = embedded SmolLM2-135M-Instruct
    adapter_size: int | None = None  # s, the last adapter layers; None: the method's own (METHOD_ADAPTER)
    # First-a adapter layers below the emulator; None: the method's own (METHOD_ADAPTER).
    bottom_adapter: int | None = None
    drop_rate: float = 0.2
    rounds: int = 3
    parties: int = 3
    seed: int = 0
    party_data: str = "gsm8k-train"  # file, save_to_disk dir, packaged sample name or hub id
    party_data_kind: str = "auto"
    party_columns: str | None = None  # column mapping "prompt=COL,response=COL[,context=COL][,category=COL]"
    split: str = "iid"  # iid | category
    party_limit: int | None = None  # cap on training examples in total (before splitting)
    public_data: str = "dolly"
    public_data_kind: str = "auto"
    public_columns: str | None = None
    public_limit: int | None = 400
    eval_data: str = "gsm8k-test"
    eval_data_kind: str = "auto"
    eval_columns: str | None = None
    eval_items: int = 32
    # Held-out task items on which the owner also measures the gradient fidelity (after pre-alignment and after
    # the last round), read like --party-data: a diagnostic for benchmarks (a validation split), never test items.
    task_fidelity_data: str | None = None
    task_fidelity_batches: int = 4
    max_length: int = 256
    template: str = "auto"
    secure_agg: bool = False
    secagg_graph: str = "complete"  # complete | sparse (SecAgg+: each party masks with O(log n) neighbours)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    align: AlignSettings = field(default_factory=AlignSettings)
    dp: DPSettings | None = None  # DP-SGD for the simulated parties; None = no DP
    method: str = "fedbiot"  # one of METHODS
    device: str = "auto"  # where the owner (and --simulate's parties) run: auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # frozen weights: auto (bf16 where the device has it natively, else float32) | float32 | ...
    quantize: str | None = None  # --simulate's parties hold the frozen emulator in int8 / nf4 (bitsandbytes)
    share_weights: bool = True  # the compressed model shares the full model's tensors (one copy on the owner)
    device_map: str | None = None  # accelerate placement of the full model: "auto", "cuda:0", ... (None: CPU)
    max_memory: dict[str, str | int] | None = None  # {device: size}, e.g. {"0": "20GiB", "cpu": "64GiB"}
    offload_folder: str | None = None  # disk offload of the full model's weights that fit nowhere else
    prealign_cache: str | None = None  # directory of pre-aligned emulators shared by runs (None: no cache)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.method == "offsite":  # Offsite-tuning: a single data holder
            self.parties, self.split = 1, "iid"
        if self.rounds < 1:
            raise ConfigError("--rounds must be at least 1")
        if self.parties < 1:
            raise ConfigError("the number of parties must be at least 1")
        if self.secure_agg and self.parties < 3:
            raise ConfigError(f"secure aggregation needs at least 3 parties, not {self.parties}: with one colluder "
                              "assumed, as every party assumes by default, fewer cannot keep two honest inputs in "
                              "every sum (or run without secure aggregation)")
        if self.split not in ("iid", "category"):
            raise ConfigError(f"--split must be iid or category, not {self.split!r}")
        _check_layer_count("--adapter-size", self.adapter_size, 1)
        _check_layer_count("--bottom-adapter", self.bottom_adapter, 0)
        if not 0.0 <= self.drop_rate < 1.0:
            raise ConfigError(f"--drop-rate must be in [0, 1), got {self.drop_rate}")
        if self.task_fidelity_batches < 0:
            raise ConfigError(f"--task-fidelity-batches must be >= 0, got {self.task_fidelity_batches}")
        if self.max_length < 8:
            raise ConfigError("--max-length must be at least 8")
        dp_dtype(self.dtype, self.dp is not None)  # refused before anything loads
        if self.quantize not in (None, "int8", "nf4"):
            raise ConfigError(f"--quantize must be int8 or nf4, not {self.quantize!r}")
        if self.secagg_graph not in ("complete", "sparse"):
            raise ConfigError(f"--secagg-graph must be complete or sparse, not {self.secagg_graph!r}")
        for which in ("party", "public", "eval"):  # a mistyped mapping fails here, not after the model loads
            spec = getattr(self, f"{which}_columns")
            if spec is not None:
                try:
                    ColumnMap.parse(spec)
                except ConfigError as exc:
                    raise ConfigError(f"--{which}-columns: {exc}") from None

    def hardware(self):
        """The resolved device and dtype of the frozen weights (`learning.hardware.Hardware`)."""
        from learning.hardware import resolve_hardware  # noqa: PLC0415

        return resolve_hardware(self.device, self.dtype, dp=self.dp is not None)

    def placement(self):
        """The full model's accelerate placement (`owner.models.Placement`), or None for a plain load."""
        from owner.models import Placement  # noqa: PLC0415 - keep config loading light

        if self.device_map is None and not self.max_memory and not self.offload_folder:
            device = self.hardware().device
            return None if device.type == "cpu" else Placement(str(device))
        memory = None if not self.max_memory else {int(k) if str(k).isdigit() else k: int(v) if str(v).isdigit() else v
                                                   for k, v in self.max_memory.items()}
        return Placement(self.device_map, memory, self.offload_folder)

    def adapter_layout(self, n_layers: int) -> tuple[int, int]:
        """(a, s): the method's first-a + last-s adapter layers in an n-layer model."""
        if self.method == "fedavg-full":
            return 0, n_layers
        own_bottom, own_size = METHOD_ADAPTER[self.method]
        bottom = own_bottom if self.bottom_adapter is None else self.bottom_adapter
        size = own_size if self.adapter_size is None else self.adapter_size
        if bottom + size >= n_layers:
            raise ConfigError(f"--adapter-size {size}{f' (+ the first {bottom})' if bottom else ''} "
                              f"leaves no emulator in a model of {n_layers} layers")
        return bottom, size

    @property
    def realigns_each_round(self) -> bool:
        """Only FedBiOT re-aligns the emulator after every round; the baselines align it once (or never)."""
        return self.method == "fedbiot"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["lora"] = self.lora.to_dict()
        data["train"] = self.train.to_dict()
        data["align"] = self.align.to_dict()
        data["dp"] = None if self.dp is None else self.dp.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config fields: {unknown}")
        data = dict(data)
        data["lora"] = LoraSettings.from_dict(data.get("lora", {}))
        data["train"] = TrainSettings.from_dict(data.get("train", {}))
        data["align"] = AlignSettings.from_dict(data.get("align", {}))
        data["dp"] = None if data.get("dp") is None else DPSettings.from_dict(data["dp"])
        return cls(**data)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> RunConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"cannot read run config {path}: {exc}") from exc

    def resumed(self, out_dir: Path, resume: bool) -> RunConfig:
        """The config a run continues with: with --resume, the saved config.json (only --rounds may grow);
        otherwise this one."""
        path = Path(out_dir) / "config.json"
        if not (resume and path.is_file()):
            return self
        saved = RunConfig.load(path)
        saved.rounds = self.rounds
        return saved

    def party_settings(self, run_id: str) -> PartyRunSettings:
        """What a networked party needs to train exactly as this run expects (sent in WELCOME)."""
        return PartyRunSettings(run_id=run_id, seed=self.seed, rounds=self.rounds, max_length=self.max_length,
                                template=self.template, lora=self.lora, train=self.train, secure_agg=self.secure_agg)
