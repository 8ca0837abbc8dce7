"""The owner's command-line options, each declared once (see console.options): those of a run, which set
`RunConfig` fields and so are what a run saves in config.json; those of the node (mode, output, terminal,
network); `owner plan`'s and `owner keygen`'s. The parsers, `config_from_args`, the reading of a saved
config.json and the owner's part of docs/options.md are made from these tables.
"""

from __future__ import annotations

import functools
from pathlib import Path

from console.options import Command, Option, bind, terminal_options, training_options
from console.options import flags_from_config as _flags_from_config

MODEL = "model and compression"
MEMORY = "owner memory and placement"
DATA = "data"
TRAINING = "training"
SECAGG = "secure aggregation (--secure-agg)"
NETWORK = "network (--listen)"
DATA_SOURCES = ("a JSON/JSONL, CSV/TSV, Parquet or Arrow file, a `datasets` save_to_disk directory (DIR:SPLIT), a "
                "packaged sample name, or a hub id (ID, ID:SPLIT, ID:CONFIG:SPLIT)")
KINDS = "gsm8k | dolly | alpaca | auto"
SECURE_DEFAULT = "on with --listen, off with --simulate"
LISTEN_NEEDS = "none: --listen needs it"


def _memory_field(text: str) -> dict[str, str | int] | None:
    """--max-memory's DEV=SIZE,... as RunConfig.max_memory holds it ({"0": "20GiB", "cpu": "64GiB"})."""
    from learning.devices import parse_max_memory  # noqa: PLC0415

    memory = parse_max_memory(text)
    return None if memory is None else {str(k): v for k, v in memory.items()}


@functools.cache
def run_options() -> tuple[Option, ...]:
    """The options of a run (`--simulate`, `--listen`, `owner plan`): each sets a RunConfig field."""
    from learning.devices import format_max_memory  # noqa: PLC0415
    from owner.config import METHODS, RunConfig  # noqa: PLC0415 - `owner keygen` needs none of it
    from tasks.prompts import TEMPLATES  # noqa: PLC0415

    return bind(RunConfig, (
        Option("--model", to="model", group=MODEL, shown="embedded SmolLM2-135M-Instruct",
               help="hub id, local checkpoint dir or .gguf file"),
        Option("--method", to="method", choices=METHODS, group=MODEL,
               help="fedbiot; or a baseline on the same engine: offsite (Offsite-tuning: 1 party, adapter = first 2 "
                    "+ last s layers, emulator aligned once), fedot (the same with N parties), fedavg-full (LoRA "
                    "on every layer of the full model)"),
        Option("--adapter-size", to="adapter_size", type=int, group=MODEL,
               help="s: the last layers kept as adapter (default: fedbiot 4, offsite/fedot 2)"),
        Option("--bottom-adapter", to="bottom_adapter", type=int, group=MODEL,
               help="first layers kept as adapter below the emulator (default: fedbiot 0, offsite/fedot 2)"),
        Option("--drop-rate", to="drop_rate", type=float, group=MODEL,
               help="beta: fraction of the lower layers dropped to form the emulator"),
        Option("--lora-r", to="lora.r", type=int, group=MODEL, help="LoRA rank r"),
        Option("--lora-alpha", to="lora.alpha", type=int, group=MODEL,
               help="LoRA alpha: the update is scaled by alpha / r"),
        Option("--target-modules", to="lora.target_modules", nargs="+", metavar="NAME", group=MODEL,
               shown="every Linear of a decoder layer",
               help="the projections that get LoRA, by PEFT name (e.g. q_proj v_proj)"),
        Option("--device-map", to="device_map", group=MEMORY, shown="none: the whole model on --device",
               help="accelerate placement of the full model: auto | balanced | sequential | cuda:0 | cpu"),
        Option("--max-memory", to="max_memory", metavar="DEV=SIZE,...", group=MEMORY, to_field=_memory_field,
               from_field=format_max_memory, help="per-device budget for --device-map, e.g. 0=20GiB,1=20GiB,cpu=64GiB"),
        Option("--offload-folder", to="offload_folder", group=MEMORY,
               help="disk offload of weights that fit on no device"),
        Option("--no-share-weights", to="share_weights", dest="share_weights", action="store_false", group=MEMORY,
               help="give the compressed model its own copy of the weights instead of sharing the full model's"),
        Option("--prealign-cache", to="prealign_cache", metavar="DIR", group=MEMORY,
               help="reuse (or store) the pre-aligned emulator in DIR, keyed by model, layout, public data, LoRA "
                    "and alignment settings and seed: a grid or a rerun pre-aligns once (and scores the untouched "
                    "model once)"),
        Option("--no-teacher-cache", to="align.cache_teacher", dest="cache_teacher", action="store_false",
               group=MEMORY, help="recompute E*(x) every alignment step instead of once per public example"),
        Option("--teacher-cache-mb", to="align.cache_memory_mb", type=float, group=MEMORY,
               help="E*(x) cache kept in memory up to this many MB; the rest spills to OUT/teacher_cache"),
        Option("--no-align-checkpointing", to="align.checkpoint_activations", dest="checkpoint_activations",
               action="store_false", group=MEMORY,
               help="keep every activation of the compressed model's alignment step for its backward pass instead "
                    "of recomputing each layer's there (faster steps; a peak of several times the weights on a "
                    "small model)"),
        Option("--party-data", to="party_data", group=DATA,
               help=f"parties' training data in --simulate: {DATA_SOURCES}"),
        Option("--party-data-kind", to="party_data_kind", group=DATA, help=f"layout of --party-data: {KINDS}"),
        Option("--party-columns", to="party_columns", metavar="MAP", group=DATA, shown="none: a known layout",
               help="column mapping for any other layout: prompt=COL,response=COL[,context=COL][,category=COL]"),
        Option("--split", to="split", choices=("iid", "category"), group=DATA,
               help="how --simulate divides the training data among its parties: iid (seeded, i.i.d.) or category "
                    "(one part per category)"),
        Option("--party-limit", to="party_limit", type=int, group=DATA, shown="none: every example",
               help="cap on training examples"),
        Option("--public-data", to="public_data", group=DATA, help="owner's public alignment data"),
        Option("--public-data-kind", to="public_data_kind", group=DATA, help=f"layout of --public-data: {KINDS}"),
        Option("--public-columns", to="public_columns", metavar="MAP", group=DATA, shown="none: a known layout",
               help="column mapping of --public-data"),
        Option("--public-limit", to="public_limit", type=int, group=DATA,
               help="cap on public alignment examples"),
        Option("--eval-data", to="eval_data", group=DATA, help="held-out items for the NLL in summary.json"),
        Option("--eval-data-kind", to="eval_data_kind", group=DATA, help=f"layout of --eval-data: {KINDS}"),
        Option("--eval-columns", to="eval_columns", metavar="MAP", group=DATA, shown="none: a known layout",
               help="column mapping of --eval-data"),
        Option("--eval-items", to="eval_items", type=int, group=DATA, help="held-out items scored"),
        Option("--task-fidelity-data", to="task_fidelity_data", group=DATA, shown="none",
               help="held-out task items (read like --party-data; a validation split, never test items) on which "
                    "the owner also measures the gradient fidelity after pre-alignment and the last round"),
        Option("--task-fidelity-batches", to="task_fidelity_batches", type=int, group=DATA,
               help="batches (of the alignment batch size) of --task-fidelity-data"),
        Option("--max-length", to="max_length", type=int, group=DATA, help="tokens per example"),
        Option("--template", to="template", choices=tuple(TEMPLATES), group=DATA,
               help="prompt format: " + "; ".join(f"{name}: {what}" for name, what in TEMPLATES.items())),
        Option("--rounds", to="rounds", type=int, group=TRAINING, help="federated rounds"),
        Option("--seed", to="seed", type=int, group=TRAINING, unset=True,
               shown="0 with --simulate; a new --listen run draws its own",
               help="run seed: every draw of the owner's derives from it (the initial LoRA, the split of "
                    "--simulate); a networked run's parties draw their own randomness. Two --listen runs with "
                    "one seed start from one state, which parties take part from only once"),
        Option("--local-steps", to="train.local_steps", type=int, group=TRAINING, help="K: party steps per round"),
        Option("--batch-size", to="train.batch_size", type=int, group=TRAINING, help="B: party batch size"),
        Option("--lr", to="train.lr", type=float, group=TRAINING, help="party AdamW learning rate"),
        Option("--prox-eps", to="train.prox_eps", type=float, group=TRAINING, help="eps of the proximal term"),
        Option("--align-pre-steps", to="align.pre_steps", type=int, group=TRAINING,
               help="owner pre-alignment steps"),
        Option("--align-steps", to="align.round_steps", type=int, group=TRAINING,
               help="owner alignment steps per round"),
        Option("--align-batch-size", to="align.batch_size", type=int, group=TRAINING,
               help="owner alignment batch size"),
        Option("--align-lr", to="align.lr", type=float, group=TRAINING, help="owner alignment AdamW learning rate"),
        Option("--kl-weight", to="align.kl_weight", type=float, group=TRAINING, help="lambda of the alignment loss"),
        Option("--fidelity-batches", to="align.fidelity_batches", type=int, group=TRAINING,
               help="public batches on which the owner measures, after each alignment, the cosine and norm ratio "
                    "of the adapter-LoRA gradient through the emulator vs the full model (0: off)"),
        Option("--secagg-graph", to="secagg_graph", choices=("complete", "sparse"), group=SECAGG,
               help="who masks with whom: every pair, or SecAgg+'s sparse random graph of O(log n) neighbours per "
                    "party (cheaper with many parties)"),
        *training_options(),
    ))


@functools.cache
def node_options() -> tuple[Option, ...]:
    """What the `owner` node itself reads: its mode, output, terminal and, for --listen, the network."""
    from owner.serve_options import ServeOptions  # noqa: PLC0415

    return (
        Option("--simulate", type=int, nargs="?", const=0, metavar="N", one_of="mode",
               help="run owner + N parties in this process (N defaults to --parties)"),
        *bind(ServeOptions, (
            Option("--listen", to="listen", metavar="ENDPOINT", one_of="mode",
                   help="serve parties over ZeroMQ, e.g. tcp://0.0.0.0:5555"),
            Option("--out", to="out", type=Path, required=True, help="output directory"),
            Option("--resume", to="resume", action="store_true",
                   help="continue the run in --out from its last checkpoint"),
        )),
        Option("--secure-agg", dest="secure_agg", action="store_true", default=None, shown=SECURE_DEFAULT,
               help="masked secure aggregation: the owner learns only the sum of the parties' updates"),
        Option("--no-secure-agg", dest="secure_agg", action="store_false", default=None, shown=SECURE_DEFAULT,
               help="plain FedAvg: the owner sees each party's adapter update"),
        Option("--quiet", action="store_true", default=False,
               help="print nothing but errors; metrics.jsonl is still written"),
        *terminal_options(),
        Option("--report-to", metavar="SINKS", default="none",
               help="also send metrics.jsonl's events to tensorboard (RUN/tensorboard) and/or mlflow, "
                    "comma-separated, or none (optional extras: fedbiot[tensorboard], fedbiot[mlflow])"),
    )


@functools.cache
def network_options() -> tuple[Option, ...]:
    """`--listen`'s options besides the endpoint and --out: each sets a ServeOptions field (--parties aside)."""
    from owner.serve_options import ServeOptions  # noqa: PLC0415

    return (
        Option("--parties", type=int, group=NETWORK, default=None, shown=LISTEN_NEEDS,
               help="number of parties expected (a bare --simulate runs this many)"),
        *bind(ServeOptions, (
            Option("--key", to="key", type=Path, group=NETWORK, shown=LISTEN_NEEDS,
                   help="owner secret key file (from `owner keygen`)"),
            Option("--allow", to="allow", type=Path, group=NETWORK, shown=LISTEN_NEEDS,
                   help="directory of allowed party public keys (*.key)"),
            Option("--min-parties", to="min_parties", type=int, group=NETWORK, shown="all",
                   help="rounds proceed with at least this many"),
            Option("--join-timeout", to="join_timeout", type=float, group=NETWORK,
                   help="seconds to wait for parties to join"),
            Option("--round-timeout", to="round_timeout", type=float, group=NETWORK,
                   help="deadline of one round, seconds"),
            Option("--party-timeout", to="party_timeout", type=float, group=NETWORK,
                   help="a party silent this long (no heartbeat) is left out of the round"),
        )),
    )


def serve_options() -> tuple[Option, ...]:
    """The options that set a ServeOptions field."""
    return tuple(o for o in (*node_options(), *network_options()) if o.target == "ServeOptions")


def owner_options() -> tuple[Option, ...]:
    """Every option of `owner --simulate | --listen`, in --help's order."""
    return (*node_options(), *run_options(), *network_options())


def plan_options() -> tuple[Option, ...]:
    return (Option("--json", action="store_true", default=False, help="print the figures as JSON instead of a table"),
            Option("--party-device-map", metavar="MAP", default=None, shown="none: no party split",
                   help="plan a party's placement too (party --device-map): auto | balanced | sequential | cuda:0"),
            Option("--party-max-memory", metavar="DEV=SIZE,...", default=None,
                   help="the party's per-device budget (party --max-memory), e.g. 0=80GiB,1=80GiB"),
            *run_options())


def flags_from_config(data: dict) -> dict:
    """A run's config.json (nested, as `RunConfig.to_dict` writes it) as flat option values by flag name,
    so `owner --config RUN/config.json` repeats that run; a flat table (a TOML file) passes unchanged."""
    from owner.config import RunConfig  # noqa: PLC0415

    return _flags_from_config(data, run_options(), RunConfig)


PLAN = Command("owner plan", "Plan a run from the model's config alone (no weights are read or downloaded). Takes "
                             "the options of a run, so a run's command line can be planned as it is; those that "
                             "change no figure are accepted and ignored.", plan_options, spelled=("--json", "--model"))
KEYGEN = Command("owner keygen", "Write the owner's CurveZMQ key pair.", (
    Option("--out", type=Path, required=True, metavar="KEYDIR", help="directory the key pair is written to"),
    Option("--name", default="owner", help="key file name: NAME.key (public) and NAME.key_secret"),
))
OWNER = Command("owner", "FedBiOT model owner: compresses the model, aligns the emulator, aggregates parties' "
                         "adapter LoRA.", owner_options, subcommands=(PLAN, KEYGEN))
COMMANDS = (OWNER, PLAN, KEYGEN)
