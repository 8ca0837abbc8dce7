"""Writing benchmark reports: atomically (an interrupted run leaves the old report, never half of one),
readable by others, and naming no home directory (reports are meant to be shared and committed)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_report(path: Path, text: str) -> None:
    """Write `text` to `path` atomically with mode 0644, the user's home written as `~`."""
    home = str(Path.home())
    if home not in ("", os.sep):
        text = text.replace(home + os.sep, "~" + os.sep)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    """Save a matplotlib figure atomically (a stopped benchmark leaves the old plot) and close it."""
    import matplotlib.pyplot as plt  # noqa: PLC0415

    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
