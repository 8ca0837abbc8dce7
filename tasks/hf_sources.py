"""Data the Hugging Face `datasets` library reads: CSV/TSV, Parquet and Arrow files, `save_to_disk` directories
and hub ids, each as a stream of (location, row dict).

Institutions keep data in these forms, so the loader takes them as they are. Local files are streamed (no
copy in the library's cache, and a `limit` stops reading early). The library is imported only here, when such
a source is used: the JSON path and the CLIs' `--help` do not pay for it. Every failure of the library (a
corrupt file, a missing split, no network) becomes one `DataError` line naming the source.
"""

from __future__ import annotations

import csv
import gzip
import os
import socket
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from errors import DataError, first_line

# file suffix -> the `datasets` builder that reads it
FILE_FORMATS: dict[str, str] = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".pq": "parquet",
                                ".arrow": "arrow"}
FORMAT_NAMES = {"csv": "CSV", "parquet": "Parquet", "arrow": "Arrow"}
# leading bytes of files whose suffix does not say what they are
MAGIC: dict[bytes, str] = {b"PAR1": "parquet", b"ARROW1": "arrow"}
SAVED_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")
DEFAULT_SPLIT = "train"
HUB_SPEC = "ID, ID:SPLIT or ID:CONFIG:SPLIT"
HUB_PROBE_S = 5.0  # how long to wait for the hub before saying it cannot be reached


def data_suffix(path: Path) -> str:
    """The suffix that names the format: `.csv` for both `x.csv` and `x.csv.gz`."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if len(suffixes) == 2 and suffixes[-1] == ".gz":
        return suffixes[0]
    return suffixes[-1] if suffixes else ""


def file_format(path: Path) -> str | None:
    """The builder for `path` from its suffix, else from its first bytes; None when neither says."""
    fmt = FILE_FORMATS.get(data_suffix(path))
    if fmt is not None:
        return fmt
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
    return next((f for magic, f in MAGIC.items() if head.startswith(magic)), None)


def is_saved_dataset(path: Path) -> bool:
    """A directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return path.is_dir() and any((path / marker).is_file() for marker in SAVED_MARKERS)


def _library():
    import datasets  # noqa: PLC0415 - slow import, only for these sources

    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors come back as our one DataError line
    return datasets


def _rows(rows: Iterable[Any], name: str, what: str) -> Iterator[tuple[str, Any]]:
    """(`row N`, row) pairs; a library error while reading becomes one DataError line."""
    iterator = iter(rows)
    index = 0
    while True:
        try:
            row = next(iterator)
        except StopIteration:
            return
        except DataError:
            raise
        except UnicodeDecodeError as exc:
            raise DataError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        except Exception as exc:  # noqa: BLE001 - pandas, pyarrow and fsspec raise many kinds
            raise DataError(f"{name}: cannot read as {what} ({first_line(exc)})") from exc
        index += 1
        yield f"row {index}", row


def _csv_header(path: Path, name: str, sep: str) -> list[str]:
    """The header row, read here so every column can be loaded as text (pandas would turn '007' into 7)."""
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as fh:
            header = next(csv.reader(fh, delimiter=sep), [])
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except (OSError, EOFError, csv.Error) as exc:
        raise DataError(f"{name}: cannot read as CSV ({exc})") from exc
    header = [c.strip() for c in header]
    if not any(header):
        raise DataError(f"{name}: holds no records (no header row)")
    if len(set(header)) != len(header):
        raise DataError(f"{name}: the header names a column twice ({', '.join(header)})")
    return header


def iter_file_rows(path: Path, fmt: str, name: str) -> Iterator[tuple[str, Any]]:
    """Rows of a CSV/TSV, Parquet or Arrow file, streamed."""
    what = FORMAT_NAMES[fmt]
    options: dict[str, Any] = {}
    if fmt == "csv":
        datasets = _library()
        sep = "\t" if data_suffix(path) == ".tsv" else ","
        header = _csv_header(path, name, sep)
        # Text stays text: only an empty cell is missing ("NA" or "None" may be a real answer).
        options = {"sep": sep, "keep_default_na": False, "na_values": [""], "encoding": "utf-8",
                   "features": datasets.Features({c: datasets.Value("string") for c in header})}
    if fmt == "parquet" and _parquet_rows(path) == 0:
        return  # the library's stream fails on a file without rows rather than yielding none
    datasets = _library()
    try:
        stream = datasets.load_dataset(fmt, data_files=str(path), split="train", streaming=True, **options)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{name}: cannot read as {what} ({first_line(exc)})") from exc
    yield from _rows(stream, name, what)


def _parquet_rows(path: Path) -> int | None:
    """Rows in a Parquet file's footer; None when it has no readable footer (the library then says why)."""
    import pyarrow.parquet as pq  # noqa: PLC0415

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # noqa: BLE001
        return None


def _pick_split(splits: dict[str, Any], split: str | None, name: str) -> Any:
    if split is None:
        if DEFAULT_SPLIT in splits:
            return splits[DEFAULT_SPLIT]
        if len(splits) == 1:
            return next(iter(splits.values()))
        raise DataError(f"{name}: holds the splits {', '.join(splits)}; name one as {name}:SPLIT")
    if split not in splits:
        raise DataError(f"{name}: no split {split!r} (splits: {', '.join(splits) or 'none'})")
    return splits[split]


def iter_saved_rows(path: Path, split: str | None, name: str) -> Iterator[tuple[str, Any]]:
    """Rows of a `save_to_disk` directory (a DatasetDict gives its `split`, by default `train`)."""
    datasets = _library()
    try:
        data = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{name}: cannot read the saved data set ({first_line(exc)})") from exc
    if isinstance(data, datasets.DatasetDict):
        data = _pick_split(dict(data), split, name)
    elif split is not None:
        raise DataError(f"{name}: holds one data set without splits; drop ':{split}'")
    yield from _rows(data, name, "a saved data set")


def parse_hub_spec(spec: str, name: str | None = None) -> tuple[str, str | None, str | None]:
    """`ID`, `ID:SPLIT` or `ID:CONFIG:SPLIT` -> (id, config, split)."""
    parts = spec.split(":")
    if len(parts) > 3 or not all(parts):
        raise DataError(f"{name or spec}: a hub data set is written {HUB_SPEC}")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    return parts[0], None, parts[1] if len(parts) == 2 else None


def hub_offline(datasets: bool = False) -> bool:
    """Whether the Hugging Face libraries were told to stay offline, read from the environment as they read it:
    HF_HUB_OFFLINE (else TRANSFORMERS_OFFLINE) set to 1/true/yes/on; for the `datasets` library
    (`datasets=True`), HF_DATASETS_OFFLINE instead when it is set."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if datasets and os.environ.get("HF_DATASETS_OFFLINE") is not None:
        value = os.environ["HF_DATASETS_OFFLINE"]
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def hub_unreachable(timeout: float = HUB_PROBE_S) -> str | None:
    """Why the hub cannot be reached within `timeout` seconds, or None when a connection opens.

    Without this check the library retries for about half a minute per file on a machine with no network.
    Behind a proxy the direct connection proves nothing, so the check is skipped there.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    from huggingface_hub import constants  # noqa: PLC0415

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    outcome: dict[str, str] = {}

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome["ok"] = ""
        except OSError as exc:
            outcome["error"] = exc.strerror or str(exc) or type(exc).__name__

    probe = threading.Thread(target=attempt, daemon=True)
    probe.start()
    probe.join(timeout)
    if "ok" in outcome:
        return None
    return f"cannot reach {host}: {outcome.get('error', f'no answer within {timeout:g} s')}"


def iter_hub_rows(spec: str, name: str, not_local: str | None = None) -> Iterator[tuple[str, Any]]:
    """Rows of a hub data set (downloaded to, or read from, the library's cache).

    `not_local` says why the spec was not taken as a local source; it leads every error, since a mistyped
    path ends up here too.
    """
    repo, config, split = parse_hub_spec(spec, name)
    datasets = _library()
    lead = f"{name}: {not_local}, and the Hugging Face hub" if not_local else f"{name}: the Hugging Face hub"
    if hub_offline(datasets=True):
        offline = "offline (HF_HUB_OFFLINE is set) and it is not in the local cache"
    else:
        offline = None
        reason = hub_unreachable()
        if reason is not None:
            raise DataError(f"{lead} cannot be used ({reason}; set HF_HUB_OFFLINE=1 to read the local cache)")
    try:
        data = datasets.load_dataset(repo, config, split=split)
    except datasets.exceptions.DatasetNotFoundError as exc:
        raise DataError(f"{lead} has no such data set ({first_line(exc)})") from exc
    except ConnectionError as exc:
        why = offline or first_line(exc)
        raise DataError(f"{lead} cannot be used: {why}") from exc
    except ValueError as exc:  # unknown split or config
        raise DataError(f"{name}: {first_line(exc)} (a hub data set is written {HUB_SPEC})") from exc
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{name}: cannot load from the Hugging Face hub ({first_line(exc)})") from exc
    if isinstance(data, datasets.DatasetDict):
        data = _pick_split(dict(data), None, name)
    yield from _rows(data, name, "a hub data set")
