"""The party's command-line options, each declared once (see console.options): each sets a `PartyOptions`
field (the DP and hardware flags, shared with the owner, build its `dp` and `hardware`); and `party keygen`'s.
The parser, `options_from_args` and the party's part of docs/options.md are made from these tables.
"""

from __future__ import annotations

import functools
import operator
from pathlib import Path

from console.options import Command, Option, bind, terminal_options, training_options

POLICY = "what this party accepts (checked by the party itself, whatever the owner says)"
GB = 10**9


@functools.cache
def party_options() -> tuple[Option, ...]:
    """Every option of `party`, in --help's order."""
    from learning.devices import format_max_memory, parse_max_memory  # noqa: PLC0415
    from party.party_options import PartyOptions  # noqa: PLC0415 - `party keygen` needs none of it
    from tasks.columns import ColumnMap  # noqa: PLC0415

    return bind(PartyOptions, (
        Option("--connect", to="endpoint", required=True, metavar="ENDPOINT",
               help="owner address, e.g. tcp://host:5555"),
        Option("--data", to="data", required=True,
               help="local training data: a JSON/JSONL, CSV/TSV, Parquet or Arrow file, a `datasets` save_to_disk "
                    "directory (DIR:SPLIT), a packaged sample name, or a hub id (ID, ID:SPLIT, ID:CONFIG:SPLIT)"),
        Option("--data-kind", to="data_kind", help="layout of --data: gsm8k | dolly | alpaca | auto"),
        Option("--columns", to="columns", metavar="MAP", to_field=ColumnMap.coerce, shown="none: a known layout",
               help="column mapping for any other layout: prompt=COL,response=COL[,context=COL][,category=COL]"),
        Option("--key", to="key", type=Path, required=True, help="this party's secret key file (NAME.key_secret)"),
        Option("--owner-key", to="owner_key", type=Path, required=True,
               help="the owner's public key file (pinned)"),
        Option("--name", to="name", shown="the key file's name", help="party name"),
        Option("--work", to="work_dir", type=Path, shown="the fedbiot cache dir / party / NAME",
               help="where the model and download state live"),
        Option("--connect-timeout", to="connect_timeout", type=float,
               help="give up (one error line, exit 2) when no connection to the owner came up in this many seconds; "
                    "until then the party says every 10 s that it is still trying, where, and for how long"),
        Option("--timeout", to="timeout", type=float,
               help="once connected, give up after this many seconds without a word from the owner (it is silent "
                    "while it loads, pre-aligns or aligns the model)"),
        Option("--max-download-gb", to="max_download", type=float, to_field=lambda gb: int(gb * GB),
               from_field=lambda size: size / GB, help="refuse a compressed model archive larger than this"),
        Option("--device-map", to="device_map", shown="none: the whole model on --device",
               help="place the compressed model over this machine's devices with accelerate: auto | balanced | "
                    "sequential | cuda:0 (every layer carries LoRA, so nothing may be offloaded)"),
        Option("--max-memory", to="max_memory", metavar="DEV=SIZE,...", to_field=parse_max_memory,
               from_field=format_max_memory, help="per-device budget for --device-map, e.g. 0=70GiB,1=70GiB"),
        Option("--roster", to="roster", type=Path, to_field=_load_roster, from_field=lambda roster: None,
               shown="none: secure rounds are refused", group=POLICY,
               help="the consortium roster this party pins (made by `party roster`): every peer's per-round keys "
                    "are checked against its members' identity keys, and a member not on it counts as a "
                    "colluder"),
        Option("--identity", to="identity", type=Path, to_field=_load_identity, from_field=lambda identity: None,
               shown="NAME.id_secret beside --key", group=POLICY,
               help="this party's identity secret key (written by `party keygen`), which signs its per-round keys"),
        Option("--trust-owner-peers", to="trust_owner_peers", action="store_true", group=POLICY,
               help="take part in secure rounds without a roster: the owner then says who the peers are, and "
                    "can fill a round with identities it controls"),
        Option("--min-parties", to="min_parties", type=int, group=POLICY,
               help="refuse a secure round that invites fewer parties"),
        Option("--min-collusion", to="policy.min_collusion", type=int, metavar="C", group=POLICY,
               shown="1, or 5% of the invited parties when that is more",
               help="the least collusion bound c a secure round must tolerate: the owner plus up to c parties "
                    "learn no sum of fewer than the honest minimum"),
        Option("--min-degree", to="policy.min_degree", type=int, group=POLICY,
               help="the least sparse-graph degree"),
        Option("--min-honest", to="policy.min_honest", type=int, group=POLICY,
               help="the fewest honest inputs in any sum the owner may learn"),
        Option("--clip", to="clip", type=float, group=POLICY, shown="the round's",
               help="this party's own bound on each element of its update"),
        Option("--share-stats", to="share_stats", action="store_true", group=POLICY,
               help="in secure rounds, also send this party's loss (and DP accounting): the owner sees them for "
                    "this party alone"),
        Option("--share-data-size", to="share_data_size", action="store_true", group=POLICY,
               help="announce the exact number of examples instead of its power-of-two ceiling"),
        Option("--allow-plain", to="require_secure_agg", action="store_true", to_field=operator.not_,
               from_field=operator.not_, group=POLICY,
               help="take part in rounds without secure aggregation (the owner then sees this party's raw adapter "
                    "update); by default such a round is refused"),
        Option("--reproducible", to="reproducible", action="store_true", group=POLICY,
               help="take batch order, dropout and rounding from the run's seed, as the in-process run does (for "
                    "audits and tests): the owner can then predict them and a rerun repeats the update; by "
                    "default this party draws its own randomness every round"),
        Option("--privacy-dir", to="privacy_dir", type=Path, group=POLICY, shown="the fedbiot cache dir / privacy",
               help="where the DP accountant of each data set is kept, over every run and owner"),
        Option("--dp-budget", to="dp_budget", type=float, metavar="EPS", group=POLICY, shown="none",
               help="the most epsilon this party spends on its data over every run: it trains no more once a "
                    "round would pass it"),
        *terminal_options(),
        *training_options(),
    ))


def _load_roster(path: Path | None):
    from secure_agg.identity import ConsortiumRoster  # noqa: PLC0415

    return None if path is None else ConsortiumRoster.load(path)


def _load_identity(path: Path | None):
    from secure_agg.identity import Identity  # noqa: PLC0415

    return None if path is None else Identity.load(path)


KEYGEN = Command("party keygen", "Write a party's CurveZMQ key pair and its identity key pair.", (
    Option("--name", required=True, help="party name (the owner allowlists NAME.key; the roster lists NAME.id)"),
    Option("--out", type=Path, required=True, metavar="KEYDIR", help="directory the key pairs are written to"),
))
ROSTER = Command("party roster", "Make the consortium roster from the members' public files (NAME.key and NAME.id "
                 "in each KEYDIR); every member pins the same file, and the owner can allow it.", (
    Option("--out", type=Path, required=True, metavar="FILE", help="the roster file to write"),
    Option("--members", type=Path, nargs="+", required=True, metavar="KEYDIR",
           help="directories holding the members' public files"),
))
PARTY = Command("party", "FedBiOT party: trains the adapter LoRA on local data; the data never leave this machine.",
                party_options, subcommands=(KEYGEN, ROSTER))
COMMANDS = (PARTY, KEYGEN, ROSTER)
