"""What a party is told on its command line: `PartyOptions`, apart from the party node (`party.session`, which
imports torch and ZeroMQ) so that the party's command-line options take their defaults from it without loading
either. `Hardware`, the one field type that needs torch, is named for type checkers only: no option sets it from
text, and reading a section's defaults resolves that section's type alone (`console.options`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from console.progress import Progress
from learning.settings import DPSettings
from secure_agg import PartyPolicy
from secure_agg.identity import ConsortiumRoster, Identity
from tasks.columns import ColumnMap

if TYPE_CHECKING:
    from learning.hardware import Hardware


@dataclass
class PartyOptions:
    endpoint: str
    key: Path
    owner_key: Path
    data: str
    data_kind: str = "auto"
    columns: ColumnMap | None = None  # column mapping for a layout the loader does not recognise
    name: str | None = None
    work_dir: Path | None = None
    dp: DPSettings | None = None  # DP-SGD on this party's adapter LoRA; None = no DP
    timeout: float = 3600.0  # once connected, give up after this long without hearing from the owner (it is
    # silent while it loads, pre-aligns and aligns the model: minutes to tens of minutes on a large one)
    connect_timeout: float = 600.0  # give up when no connection to the owner came up in this long
    hardware: Hardware | None = None  # device and dtype of the frozen weights (None: CPU, float32)
    quantize: str | None = None  # int8 | nf4: the frozen weights quantised (bitsandbytes)
    device_map: str | None = None  # accelerate's placement of the compressed model over this machine's devices
    max_memory: dict[str | int, str | int] | None = None  # per-device budget for device_map
    require_secure_agg: bool = True  # refuse any round whose update would leave unmasked
    max_download: int = 200 * 10**9  # bytes: a larger model archive is refused before anything is written
    policy: PartyPolicy | None = None  # this party's floors for a secure round (collusion bound, degree, ...)
    min_parties: int = 3  # refuse a secure round with fewer invited parties (c >= 1 needs three)
    roster: ConsortiumRoster | None = None  # the consortium's members, pinned: peers are checked against it
    identity: Identity | None = None  # this party's long-term identity key, which signs its per-round keys
    trust_owner_peers: bool = False  # take part in secure rounds without a roster (the owner names the peers)
    reproducible: bool = False  # batch order and rounding from the run seed, as in process (the owner can
    # then predict them; for audits and tests): by default the party's randomness is its own
    privacy_dir: Path | None = None  # where the DP accountant of each data set lives (default: the cache)
    dp_budget: float | None = None  # the most epsilon this party spends on its data over every run
    clip: float | None = None  # this party's own bound on each element of its update (None: the round's)
    share_stats: bool = False  # send loss / privacy accounting in secure rounds (the owner sees them per party)
    share_data_size: bool = False  # HELLO carries the exact data size, not its power-of-two ceiling
    progress: Progress | None = None  # how downloads and steps show (console.progress); None = plain lines

    @property
    def party_name(self) -> str:
        if self.name:
            return self.name
        stem = Path(self.key).name
        return stem[: -len(".key_secret")] if stem.endswith(".key_secret") else Path(stem).stem
