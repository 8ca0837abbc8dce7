"""A party's DP accountant over every run on the same data, whoever the owner and whatever the work directory.

A run repeated from another owner, or under a new run id, still releases information about the same examples,
so what it spends adds to what earlier runs spent. The record lives under `--privacy-dir` (default: the fedbiot
cache directory / privacy), one JSON file per data set, named by the digest of the examples; it holds the
accountant's history and where each run began in it. It is written (atomically) after every round, before the
update leaves the party.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from errors import ConfigError
from secure_agg.ledger import write_durably
from tasks.datasets import Example

FORMAT = "fedbiot-privacy/1"


def data_digest(examples: Sequence[Example]) -> str:
    """SHA-256 of the examples in order (prompt, response, category): what the accountant's spend is about."""
    h = hashlib.sha256(FORMAT.encode())
    for example in examples:
        text = json.dumps([example.prompt, example.response, example.category], ensure_ascii=False)
        h.update(len(text).to_bytes(8, "big") + text.encode())
    return h.hexdigest()


class PrivacyRecord:
    """The accountant history of one data set at `directory / <digest>.json`."""

    def __init__(self, directory: Path, examples: Sequence[Example]) -> None:
        self.digest = data_digest(examples)
        self.path = Path(directory) / f"{self.digest}.json"

    def load(self) -> dict:
        if not self.path.is_file():
            return {"format": FORMAT, "mechanism": None, "history": [], "runs": {}}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"the privacy record {self.path} is unreadable ({exc}); refusing to train until it "
                              "is repaired: without it the privacy spent on this data is unknown") from None
        if (not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("history"), list)
                or not isinstance(data.get("runs"), dict)):
            raise ConfigError(f"the privacy record {self.path} has an unknown format")
        return data

    def start_run(self, run_id: str, mechanism: str) -> tuple[list, int]:
        """(the history so far, where `run_id` starts in it): a new run starts at the end."""
        data = self.load()
        if data["history"] and data.get("mechanism") not in (None, mechanism):
            raise ConfigError(f"the privacy record {self.path} was kept with the {data['mechanism']!r} accountant; "
                              f"this party asks for {mechanism!r}")
        return data["history"], int(data["runs"].get(run_id, len(data["history"])))

    def save(self, run_id: str, run_from: int, mechanism: str, history: list) -> None:
        data = self.load()
        data["mechanism"], data["history"] = mechanism, history
        data["runs"].setdefault(run_id, run_from)
        write_durably(self.path, data)
