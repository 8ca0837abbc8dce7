"""How an owner run starts, the same for `owner --simulate` and `owner --listen`.

`OwnerStart.begin` takes the config the run continues with (with `--resume`, the saved one) and checks `--out`
before anything slow; `load_inputs` reads the data and the model and writes nothing; `session()` creates the
run directory, writes config.json, points metrics.jsonl into it and builds the `OwnerSession`, and the mode's
own setup (the parties' trainers, or the archive and the links) runs inside that block.

If a new run fails before its setup is done (a model that does not compress, an unreachable DP budget, an
interrupt), what it wrote is removed, and the directory too when the run created it, so the corrected command
is not refused because --out is not empty. A resumed run's directory is never touched.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from owner.config import RunConfig
from owner.metrics import MetricsLog
from owner.models import LoadedModel
from owner.out_dir import check_out_dir
from owner.session import OwnerData, OwnerSession


@contextmanager
def run_directory(out_dir: Path, resume: bool) -> Iterator[None]:
    """Create --out (checked again: it may have changed while the model loaded), then run the block; if a new
    run's block fails, remove what it wrote, and --out itself when it did not exist before."""
    existed = out_dir.is_dir()
    check_out_dir(out_dir, resume)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        if not resume:
            if existed:
                for child in out_dir.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
            else:
                shutil.rmtree(out_dir, ignore_errors=True)
        raise


@dataclass
class OwnerStart:
    """One owner run being started: its config, its directory, new or resumed, and its metrics log."""

    config: RunConfig
    out_dir: Path
    resume: bool
    log: MetricsLog

    @classmethod
    def begin(cls, config: RunConfig, out_dir: Path, resume: bool, log: MetricsLog) -> OwnerStart:
        """The config the run continues with, and --out checked before anything slow happens."""
        out_dir = Path(out_dir)
        config = config.resumed(out_dir, resume)
        check_out_dir(out_dir, resume)
        return cls(config, out_dir, resume, log)

    def load_inputs(self) -> tuple[LoadedModel, OwnerData]:
        """The owner's data and full model (see `OwnerSession.load_inputs`); nothing is written yet."""
        return OwnerSession.load_inputs(self.config, self.log)

    @contextmanager
    def session(self, base: LoadedModel, data: OwnerData) -> Iterator[OwnerSession]:
        """Create the run directory, save config.json, log into metrics.jsonl and build the `OwnerSession`;
        a failure in the block (or in building the session) removes a new run's directory again."""
        with run_directory(self.out_dir, self.resume):
            self.config.save(self.out_dir / "config.json")
            self.log.path = self.out_dir / "metrics.jsonl"
            yield OwnerSession.create(self.config, self.out_dir, self.log, base, data, resume=self.resume)
