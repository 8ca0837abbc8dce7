"""Shipping the compressed model: a deterministic tar archive cut into fixed-size, hashed chunks.

Owner: `pack_dir(src, archive)` -> `ChunkSource` (serves `chunk(i)`). Party: `ChunkReceiver` writes each
verified chunk at its offset in a partial file and records progress on disk after every chunk, so a
broken connection or a restarted party asks only for what is missing. Once complete, the whole-archive
sha256 is checked and the archive is extracted (regular files and directories only, no sparse members,
no absolute paths, no `..`, no links, at most the announced archive size in file data) into a temporary
directory that is then renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from protocol.errors import ProtocolError

DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
_HASH_BLOCK = 1024 * 1024
# Exactly what pack_dir writes: plain files (type "0", or NUL from old writers) and directories. Not contiguous
# files, links, devices, FIFOs or GNU sparse files, which tarfile would otherwise count as "regular".
_ALLOWED_TYPES = frozenset({tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE})


@dataclass(frozen=True)
class ArchiveInfo:
    """What WELCOME announces about the archive (field names match WELCOME's)."""

    model_sha256: str
    model_size: int
    chunk_size: int

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.model_size / self.chunk_size)

    def chunk_length(self, index: int) -> int:
        if not 0 <= index < self.n_chunks:
            raise ProtocolError(f"chunk index {index} is outside [0, {self.n_chunks})")
        return min(self.chunk_size, self.model_size - index * self.chunk_size)

    def welcome_fields(self) -> dict[str, Any]:
        return {
            "model_sha256": self.model_sha256,
            "model_size": self.model_size,
            "chunk_size": self.chunk_size,
            "n_chunks": self.n_chunks,
        }

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> ArchiveInfo:
        """From a decoded WELCOME's fields."""
        return cls(fields["model_sha256"], fields["model_size"], fields["chunk_size"])


# -------------------------------------------------------------------------------------------- owner


def pack_dir(
    src_dir: str | os.PathLike[str],
    archive_path: str | os.PathLike[str],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> ChunkSource:
    """Write `src_dir` as a deterministic tar (sorted entries, mtime 0, no owners, fixed modes) and
    return its chunk source. The same directory content always gives the same bytes and hash."""
    src = Path(src_dir)
    if not src.is_dir():
        raise ProtocolError(f"model directory {src} does not exist")
    archive = Path(archive_path)
    archive.parent.mkdir(parents=True, exist_ok=True)
    entries = sorted(_walk(src), key=lambda p: p.relative_to(src).as_posix())
    fd, tmp = tempfile.mkstemp(prefix=f".{archive.name}.", dir=archive.parent)
    try:
        with (
            os.fdopen(fd, "wb") as raw,
            tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            for path in entries:
                info = tarfile.TarInfo(path.relative_to(src).as_posix())
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                if path.is_dir():
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                else:
                    info.mode, info.size = 0o644, path.stat().st_size
                    with path.open("rb") as fh:
                        tar.addfile(info, fh)
        os.replace(tmp, archive)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return ChunkSource(archive, chunk_size=chunk_size)


def _walk(root: Path) -> Iterable[Path]:
    for path in root.rglob("*"):
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise ProtocolError(f"refusing to pack {path}: only regular files and directories are shipped")
        yield path


class ChunkSource:
    """Serves chunks of an archive file; per-chunk hashes are computed once."""

    def __init__(self, archive_path: str | os.PathLike[str], *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        if chunk_size < 1:
            raise ProtocolError("chunk size must be positive")
        self.path = Path(archive_path)
        size = self.path.stat().st_size
        whole = hashlib.sha256()
        self.chunk_hashes: list[str] = []
        with self.path.open("rb") as fh:
            while block := fh.read(chunk_size):
                whole.update(block)
                self.chunk_hashes.append(hashlib.sha256(block).hexdigest())
        self.info = ArchiveInfo(whole.hexdigest(), size, chunk_size)

    def chunk(self, index: int) -> bytes:
        length = self.info.chunk_length(index)
        with self.path.open("rb") as fh:
            fh.seek(index * self.info.chunk_size)
            return fh.read(length)


# -------------------------------------------------------------------------------------------- party


class ChunkReceiver:
    """Collects the chunks of one archive under `work_dir`, resumable across reconnects and restarts.

    Files: `<sha256>.part` (the archive being filled) and `<sha256>.progress.json` (which chunks are in,
    with their hashes). Progress is written after the chunk's bytes are on disk, and on resume every
    recorded chunk is re-hashed, so a crash can at worst cost a chunk, never corrupt the model.
    """

    def __init__(self, work_dir: str | os.PathLike[str], info: ArchiveInfo, *, max_size: int | None = None,
                 on_progress: Callable[[int, int], None] | None = None) -> None:
        if len(info.model_sha256) != 64 or any(c not in "0123456789abcdef" for c in info.model_sha256):
            raise ProtocolError("archive sha256 must be 64 lowercase hex digits")
        if info.model_size < 0 or info.chunk_size < 1:
            raise ProtocolError("archive size must be >= 0 and chunk size >= 1")
        if max_size is not None and info.model_size > max_size:
            raise ProtocolError(f"model archive of {info.model_size} bytes exceeds the limit of {max_size}")
        self.info = info
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.part_path = self.work_dir / f"{info.model_sha256}.part"
        self.progress_path = self.work_dir / f"{info.model_sha256}.progress.json"
        self._done: dict[int, str] = {}
        self._resume()
        self.on_progress = on_progress  # (bytes received, archive size) after each new chunk, for a progress bar

    @property
    def received_bytes(self) -> int:
        """Bytes of the archive verified and on disk, never more than the announced `model_size` (a resumed
        download starts above zero)."""
        return sum(self.info.chunk_length(i) for i in self._done)

    # -- state

    def missing(self) -> list[int]:
        """Chunk indices still to fetch, in order."""
        return [i for i in range(self.info.n_chunks) if i not in self._done]


    @property
    def complete(self) -> bool:
        return len(self._done) == self.info.n_chunks

    def add(self, index: int, data: bytes, sha256: str) -> bool:
        """Store one chunk after checking index, length and hash; returns False for a duplicate.
        Raises ProtocolError (state untouched) for a bad chunk."""
        expected_len = self.info.chunk_length(index)
        if len(data) != expected_len:
            raise ProtocolError(f"chunk {index} has {len(data)} bytes, expected {expected_len}")
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise ProtocolError(f"chunk {index} does not match its sha256")
        if index in self._done:
            return False
        if self.received_bytes + len(data) > self.info.model_size:  # cannot happen with the checks above
            raise ProtocolError(f"chunk {index} would take the download past the announced "
                                f"{self.info.model_size} bytes")
        with self.part_path.open("r+b") as fh:
            fh.seek(index * self.info.chunk_size)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        self._done[index] = digest
        self._save_progress()
        if self.on_progress is not None:
            self.on_progress(self.received_bytes, self.info.model_size)
        return True

    def finish(self, dest_dir: str | os.PathLike[str]) -> Path:
        """Verify the whole archive and extract it atomically into `dest_dir` (replacing it).

        On a whole-hash mismatch the partial download is discarded (which chunk lied cannot be known),
        so the next attempt starts over."""
        if not self.complete:
            raise ProtocolError(f"archive incomplete: {len(self.missing())} chunk(s) missing")
        if self.part_path.stat().st_size != self.info.model_size:
            self.discard()
            raise ProtocolError("the partial archive is not the announced size; download discarded")
        if _file_sha256(self.part_path) != self.info.model_sha256:
            self.discard()
            raise ProtocolError("archive does not match its announced sha256; download discarded")
        dest = extract_archive(self.part_path, dest_dir, max_bytes=self.info.model_size)
        self.discard()
        return dest

    def discard(self) -> None:
        """Forget this download (partial file and progress)."""
        self.part_path.unlink(missing_ok=True)
        self.progress_path.unlink(missing_ok=True)
        self._done = {}

    # -- persistence

    def _resume(self) -> None:
        progress = self._load_progress()
        if progress is None or not self.part_path.exists() or self.part_path.stat().st_size != self.info.model_size:
            self._start_fresh()
            return
        with self.part_path.open("rb") as fh:
            for index, digest in progress.items():
                fh.seek(index * self.info.chunk_size)
                if hashlib.sha256(fh.read(self.info.chunk_length(index))).hexdigest() == digest:
                    self._done[index] = digest

    def _load_progress(self) -> dict[int, str] | None:
        try:
            state = json.loads(self.progress_path.read_text(encoding="utf-8"))
            if not isinstance(state, dict):
                return None
            if (state.get("model_sha256"), state.get("model_size"), state.get("chunk_size")) != (
                self.info.model_sha256,
                self.info.model_size,
                self.info.chunk_size,
            ):
                return None
            done = state["done"]
            out = {}
            for key, digest in done.items():
                index = int(key)
                if not (0 <= index < self.info.n_chunks and isinstance(digest, str)):
                    return None
                out[index] = digest
            return out
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def _start_fresh(self) -> None:
        self._done = {}
        with self.part_path.open("wb") as fh:
            fh.truncate(self.info.model_size)
        self._save_progress()

    def _save_progress(self) -> None:
        state = {
            "model_sha256": self.info.model_sha256,
            "model_size": self.info.model_size,
            "chunk_size": self.info.chunk_size,
            "done": {str(i): d for i, d in sorted(self._done.items())},
        }
        tmp = self.progress_path.with_name(self.progress_path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            json.dump(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.progress_path)


# ------------------------------------------------------------------------------------------ extract


def extract_archive(
    archive_path: str | os.PathLike[str], dest_dir: str | os.PathLike[str], *, max_bytes: int
) -> Path:
    """Safely unpack a tar into `dest_dir`: every member is checked before anything is written (regular
    files and directories only, no sparse members, safe unique paths, file data totalling at most
    `max_bytes`), data is copied by us (never `extractall`), and the result appears at `dest_dir` by a
    rename.

    `max_bytes` is what the archive may expand to on disk; the party passes the size WELCOME announced,
    which an honest archive never exceeds (a tar stores file data whole, plus headers). A sparse member
    would let a few kilobytes describe terabytes of holes, so it is refused outright."""
    if max_bytes < 0:
        raise ProtocolError("the unpack bound must be >= 0 bytes")
    dest = Path(dest_dir)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        try:
            with tarfile.open(archive_path, mode="r:") as tar:
                members = tar.getmembers()
                names = [_safe_member_name(m) for m in members]
                if len(set(names)) != len(names):
                    raise ProtocolError("archive lists a path twice")
                total = sum(m.size for m in members if m.isreg())
                if total > max_bytes:
                    raise ProtocolError(f"archive members hold {total} bytes, more than the bound of {max_bytes}")
                for member, name in zip(members, names, strict=True):
                    target = tmp.joinpath(*name.parts)
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    source = tar.extractfile(member)
                    if source is None:
                        raise ProtocolError(f"archive member {member.name!r} has no data")
                    with source, target.open("xb") as out:
                        _copy_exactly(source, out, member)
        except (tarfile.TarError, EOFError, ValueError, OverflowError, UnicodeError) as exc:
            raise ProtocolError(f"model archive is not a valid tar: {exc}") from None
        except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
            raise ProtocolError(f"model archive has conflicting paths: {exc.filename}") from None
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return dest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _copy_exactly(source: BinaryIO, out: BinaryIO, member: tarfile.TarInfo) -> None:
    """Copy one member's data, never more than its declared size (which the bound was checked against)."""
    left = member.size
    while left > 0:
        block = source.read(min(left, _HASH_BLOCK))
        if not block:
            raise ProtocolError(f"archive member {member.name!r} is truncated")
        out.write(block)
        left -= len(block)


def _safe_member_name(member: tarfile.TarInfo) -> PurePosixPath:
    if member.issparse() or member.type == tarfile.GNUTYPE_SPARSE or any(
        key.startswith("GNU.sparse.") for key in member.pax_headers
    ):
        raise ProtocolError(f"archive member {member.name!r} is a sparse file; only plain regular files are shipped")
    if member.type not in _ALLOWED_TYPES:
        raise ProtocolError(f"archive member {member.name!r} is not a regular file or directory")
    name = PurePosixPath(member.name)
    if name.is_absolute() or member.name.startswith(("/", "\\")):
        raise ProtocolError(f"archive member {member.name!r} has an absolute path")
    parts = [p for p in name.parts if p != "."]
    if not parts or any(p == ".." or "\\" in p or "\x00" in p for p in parts):
        raise ProtocolError(f"archive member {member.name!r} has an unsafe path")
    return PurePosixPath(*parts)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()
