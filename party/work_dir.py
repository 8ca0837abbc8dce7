"""What a party keeps in its work directory across restarts of either side: the model it unpacked (and the
download in progress), which archive that model came from, and its secure-aggregation ledger (what it took
part in, masked and revealed, per run and round, and from which global states). Its DP accountant lives
apart, keyed by its data (`party.privacy`)."""

from __future__ import annotations

import json
from pathlib import Path

from secure_agg import SecAggLedger


class WorkDir:
    """The files under one party's `--work` directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.model = self.root / "model"
        self.download = self.root / "download"
        self.state_path = self.root / "party-state.json"
        # Survives restarts of either side, so no round can make the party contribute twice or reveal shares
        # that contradict earlier ones.
        self.ledger = SecAggLedger(self.root / "secagg-ledger.json")

    def saved_state(self) -> dict:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) else {}

    def save_state(self, **fields: object) -> None:
        self.state_path.write_text(json.dumps({**self.saved_state(), **fields}))

    def cached_sha(self) -> str:
        """The archive hash of the model unpacked in `model/`, "" for none."""
        return str(self.saved_state().get("model_sha256", ""))
