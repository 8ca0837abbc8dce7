"""A party's durable memory of what it contributed and revealed, per (session, round), and of the global
states it took part from, per owner.

Double masking is safe only if a party masks one input per round under one set of secrets and reveals, per
peer, the seed share or the key share, never both. A restart (of the party, or of the owner asking for the
round again) must not undo that: a second masked input for the same round, under fresh masks, would let an
owner subtract two sums over different alive sets. So the party claims a round when it advertises its keys
(so an owner cannot abort a round after seeing the graph coins and draw it again), records "input sent"
*before* the input leaves, and every share it reveals; and it never takes part twice from the same global
state for the same owner, whatever the session: a "new run" from the same state is a repetition. All of it
lives in a small JSON file written atomically (temporary file, fsync, rename); what contradicts the record is
refused.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from secure_agg.errors import SecAggError

LEDGER_VERSION = 2  # 2: rounds are claimed when the party advertises; states taken part from, per owner


def write_durably(path: Path, data: dict[str, Any]) -> None:
    """Write `data` as JSON to `path` so that a crash leaves the old file or the new one, never a torn one:
    a temporary file, fsync, rename, then fsync of the directory (the rename itself)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


class SecAggLedger:
    """Per-party record at `path`: {"version": 2, "rounds": {session: {round: {"claimed": bool, "input_sent":
    bool, "revealed": {peer: "seed" | "key"}}}}, "states": {owner key: {state digest: "session round"}}}. A
    version-1 file (no claims, no states) is read as it is. A missing file is an empty ledger; an unreadable one
    is an error (and is left as it is)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def _load(self) -> dict[str, Any]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {"version": LEDGER_VERSION, "rounds": {}, "states": {}}
        except OSError as exc:
            raise SecAggError(f"cannot read the secure-aggregation ledger {self.path}: {exc}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SecAggError(f"the secure-aggregation ledger {self.path} is corrupt ({exc}); refusing to "
                              "contribute until it is repaired or removed") from exc
        if (not isinstance(data, dict) or data.get("version") not in (1, LEDGER_VERSION)
                or not isinstance(data.get("rounds"), dict) or not isinstance(data.setdefault("states", {}), dict)):
            raise SecAggError(f"the secure-aggregation ledger {self.path} has an unknown format")
        data["version"] = LEDGER_VERSION
        return data

    def _save(self, data: dict[str, Any]) -> None:
        write_durably(self.path, data)

    @staticmethod
    def _entry(data: dict[str, Any], session: str, round_id: int) -> dict[str, Any]:
        rounds = data["rounds"].setdefault(session, {})
        entry = rounds.setdefault(str(round_id), {"claimed": False, "input_sent": False, "revealed": {}})
        if not isinstance(entry, dict) or not isinstance(entry.get("revealed"), dict):
            raise SecAggError(f"the secure-aggregation ledger entry for round {round_id} of {session!r} is "
                              "malformed")
        return entry

    def entry(self, session: str, round_id: int) -> dict[str, Any]:
        """What is recorded for (session, round): {"claimed": bool, "input_sent": bool, "revealed": {peer id:
        kind}}; a round whose input was sent counts as claimed."""
        with self._lock:
            entry = self._entry(self._load(), session, round_id)
        return {"claimed": bool(entry.get("claimed") or entry["input_sent"]), "input_sent": bool(entry["input_sent"]),
                "revealed": {int(k): v for k, v in entry["revealed"].items()}}

    def rounds_claimed(self, session: str) -> list[int]:
        """The rounds of `session` this party took part in (advertised its keys, or sent a masked input)."""
        with self._lock:
            rounds = self._load()["rounds"].get(session, {})
        return sorted(int(r) for r, entry in rounds.items() if entry.get("claimed") or entry.get("input_sent"))

    def has_state(self, owner: str, state: str) -> bool:
        """Whether this party took part from global state `state` (hex digest) of `owner` before."""
        with self._lock:
            return state in self._load()["states"].get(owner, {})

    def claim_round(self, session: str, round_id: int, owner: str, state: str) -> None:
        """Record, before the party's first key leaves, that it takes part in (session, round) from global
        state `state` (hex digest) of `owner` (its public key); refuse a round it already took part in, and a
        state it already took part from, in this session or any other."""
        with self._lock:
            data = self._load()
            entry = self._entry(data, session, round_id)
            if entry.get("claimed") or entry["input_sent"]:
                raise SecAggError(f"this party already took part in round {round_id + 1} of this run (before a "
                                  "restart); a round is never contributed twice")
            states = data["states"].setdefault(owner, {})
            if state in states:
                raise SecAggError(f"this party already took part from this global state ({states[state]}); the "
                                  "same state twice would let the owner subtract two sums: refused")
            entry["claimed"] = True
            states[state] = f"{session} round {round_id + 1}"
            self._save(data)

    def claim_input(self, session: str, round_id: int) -> None:
        """Record that this party's masked input for (session, round) is about to leave; refuse a second."""
        with self._lock:
            data = self._load()
            entry = self._entry(data, session, round_id)
            if entry["input_sent"]:
                raise SecAggError(f"this party already sent a masked input for round {round_id} of session "
                                  f"{session!r}; it contributes once per round, even after a restart")
            entry["input_sent"] = True
            self._save(data)

    def record_reveal(self, session: str, round_id: int, seed_owners: list[int], key_owners: list[int]) -> None:
        """Record the shares about to be revealed; refuse if any peer's other share was revealed before."""
        with self._lock:
            data = self._load()
            entry = self._entry(data, session, round_id)
            revealed = entry["revealed"]
            both = sorted(set(seed_owners) & set(key_owners))
            if both:
                raise SecAggError(f"round {round_id} of {session!r}: revealing both shares of parties {both}")
            for peers, kind in ((seed_owners, "seed"), (key_owners, "key")):
                for peer in peers:
                    before = revealed.get(str(peer))
                    if before is not None and before != kind:
                        raise SecAggError(f"round {round_id} of {session!r}: this party revealed party {peer}'s "
                                          f"{before} share before; revealing its {kind} share too would "
                                          "unmask its input")
            for peers, kind in ((seed_owners, "seed"), (key_owners, "key")):
                for peer in peers:
                    revealed[str(peer)] = kind
            self._save(data)
