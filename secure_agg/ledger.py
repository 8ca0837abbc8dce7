"""A party's durable memory of what it contributed and revealed, per (session, round).

Double masking is safe only if a party masks one input per round under one set of secrets and reveals, per
peer, the seed share or the key share, never both. A restart (of the party, or of the owner asking for the
round again) must not undo that: a second masked input for the same round, under fresh masks, would let an
owner subtract two sums over different alive sets. So the party records "input sent" *before* the input
leaves, and every share it reveals, in a small JSON file written atomically (temporary file, fsync,
rename), and refuses what contradicts the record.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from secure_agg.errors import SecAggError

LEDGER_VERSION = 1


class SecAggLedger:
    """Per-party record at `path`: {"version": 1, "rounds": {session: {round: {"input_sent": bool,
    "revealed": {peer: "seed" | "key"}}}}}. A missing file is an empty ledger; an unreadable one is an error
    (and is left as it is)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def _load(self) -> dict[str, Any]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {"version": LEDGER_VERSION, "rounds": {}}
        except OSError as exc:
            raise SecAggError(f"cannot read the secure-aggregation ledger {self.path}: {exc}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SecAggError(f"the secure-aggregation ledger {self.path} is corrupt ({exc}); refusing to "
                              "contribute until it is repaired or removed") from exc
        if (not isinstance(data, dict) or data.get("version") != LEDGER_VERSION
                or not isinstance(data.get("rounds"), dict)):
            raise SecAggError(f"the secure-aggregation ledger {self.path} has an unknown format")
        return data

    def _save(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        try:  # make the rename itself durable
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)

    @staticmethod
    def _entry(data: dict[str, Any], session: str, round_id: int) -> dict[str, Any]:
        rounds = data["rounds"].setdefault(session, {})
        entry = rounds.setdefault(str(round_id), {"input_sent": False, "revealed": {}})
        if not isinstance(entry, dict) or not isinstance(entry.get("revealed"), dict):
            raise SecAggError(f"the secure-aggregation ledger entry for round {round_id} of {session!r} is "
                              "malformed")
        return entry

    def entry(self, session: str, round_id: int) -> dict[str, Any]:
        """What is recorded for (session, round): {"input_sent": bool, "revealed": {peer id: kind}}."""
        with self._lock:
            entry = self._entry(self._load(), session, round_id)
        return {"input_sent": bool(entry["input_sent"]),
                "revealed": {int(k): v for k, v in entry["revealed"].items()}}

    def rounds_sent(self, session: str) -> list[int]:
        """The rounds of `session` this party sent a masked input for."""
        with self._lock:
            rounds = self._load()["rounds"].get(session, {})
        return sorted(int(r) for r, entry in rounds.items() if entry.get("input_sent"))

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
