"""Chunked model transfer: deterministic archive, per-chunk hashes, resume after a broken connection and
after a restart, whole-archive check, safe and atomic extraction."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from protocol import messages as m
from protocol.chunks import ArchiveInfo, ChunkReceiver, ChunkSource, extract_archive, pack_dir
from protocol.codec import decode, encode
from protocol.errors import ProtocolError


def _model_dir(root: Path) -> Path:
    src = root / "compressed"
    (src / "sub").mkdir(parents=True)
    (src / "model.safetensors").write_bytes(os.urandom(50_000))
    (src / "config.json").write_text(json.dumps({"n_layers": 4}))
    (src / "sub" / "tokenizer.json").write_text("{}")
    (src / "empty").mkdir()
    return src


def _tree(root: Path) -> dict[str, bytes | None]:
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def test_pack_is_deterministic_and_round_trips(tmp_path):
    src = _model_dir(tmp_path)
    first = pack_dir(src, tmp_path / "a.tar", chunk_size=8192)
    os.utime(src / "config.json", (1, 1))  # timestamps and owners must not reach the archive
    os.chmod(src / "config.json", 0o600)
    second = pack_dir(src, tmp_path / "b.tar", chunk_size=8192)
    assert first.info == second.info
    assert first.path.read_bytes() == second.path.read_bytes()
    info = first.info
    assert info.n_chunks == len(first.chunk_hashes) == -(-info.model_size // 8192)
    assert hashlib.sha256(first.path.read_bytes()).hexdigest() == info.model_sha256

    rx = ChunkReceiver(tmp_path / "work", info)
    for index in rx.missing():
        data = first.chunk(index)
        assert hashlib.sha256(data).hexdigest() == first.chunk_hashes[index]
        assert rx.add(index, data, first.chunk_hashes[index])
    dest = rx.finish(tmp_path / "received")
    assert _tree(dest) == _tree(src)
    assert not any((tmp_path / "work").iterdir())  # partial file and progress are cleaned up


def test_chunks_travel_as_messages(tmp_path):
    src = pack_dir(_model_dir(tmp_path), tmp_path / "a.tar", chunk_size=10_000)
    hello = decode(encode(m.welcome(run_id="r", settings={}, round=0, **src.info.welcome_fields())))
    info = ArchiveInfo.from_fields(hello.fields)
    assert info == src.info
    rx = ChunkReceiver(tmp_path / "work", info)
    for index in reversed(rx.missing()):  # any order works
        msg = decode(encode(m.chunk(index, src.chunk(index))))
        rx.add(msg["index"], msg.blob, msg["sha256"])
    assert _tree(rx.finish(tmp_path / "out")) == _tree(tmp_path / "compressed")


def test_corrupted_chunk_is_refused_and_state_untouched(tmp_path):
    src = pack_dir(_model_dir(tmp_path), tmp_path / "a.tar", chunk_size=8192)
    rx = ChunkReceiver(tmp_path / "work", src.info)
    good = src.chunk(1)
    bad = bytes([good[0] ^ 1]) + good[1:]
    with pytest.raises(ProtocolError, match="does not match its sha256"):
        rx.add(1, bad, src.chunk_hashes[1])
    with pytest.raises(ProtocolError, match="has 8191 bytes"):
        rx.add(1, good[:-1], hashlib.sha256(good[:-1]).hexdigest())
    with pytest.raises(ProtocolError, match="outside"):
        rx.add(src.info.n_chunks, good, src.chunk_hashes[1])
    # a chunk whose own hash is consistent but whose content is wrong is caught by the whole-archive hash
    assert 1 in rx.missing()
    for index in rx.missing():
        data = bad if index == 1 else src.chunk(index)
        rx.add(index, data, hashlib.sha256(data).hexdigest())
    with pytest.raises(ProtocolError, match="does not match its announced sha256"):
        rx.finish(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert rx.missing() == list(range(src.info.n_chunks))  # starts over


def test_duplicate_chunk_is_ignored(tmp_path):
    src = pack_dir(_model_dir(tmp_path), tmp_path / "a.tar", chunk_size=8192)
    rx = ChunkReceiver(tmp_path / "work", src.info)
    assert rx.add(0, src.chunk(0), src.chunk_hashes[0])
    assert not rx.add(0, src.chunk(0), src.chunk_hashes[0])
    assert rx.missing()[0] == 1


def test_resume_after_broken_connection_and_restart(tmp_path):
    src = pack_dir(_model_dir(tmp_path), tmp_path / "a.tar", chunk_size=8192)
    n = src.info.n_chunks
    assert n >= 5
    rx = ChunkReceiver(tmp_path / "work", src.info)
    for index in (0, 2, 3):
        rx.add(index, src.chunk(index), src.chunk_hashes[index])
    del rx  # the party process dies

    rx = ChunkReceiver(tmp_path / "work", src.info)  # ... and restarts
    assert rx.missing() == [i for i in range(n) if i not in (0, 2, 3)]
    fetched = []
    for index in rx.missing():
        fetched.append(index)
        rx.add(index, src.chunk(index), src.chunk_hashes[index])
    assert 0 not in fetched and 2 not in fetched
    assert _tree(rx.finish(tmp_path / "out")) == _tree(tmp_path / "compressed")


def test_resume_rechecks_stored_chunks(tmp_path):
    src = pack_dir(_model_dir(tmp_path), tmp_path / "a.tar", chunk_size=8192)
    rx = ChunkReceiver(tmp_path / "work", src.info)
    for index in (0, 1):
        rx.add(index, src.chunk(index), src.chunk_hashes[index])
    with rx.part_path.open("r+b") as fh:  # the disk lost part of chunk 1
        fh.seek(8192 + 10)
        fh.write(b"\0\0\0")
    rx = ChunkReceiver(tmp_path / "work", src.info)
    assert rx.missing()[0] == 1


def test_other_archive_or_garbage_progress_starts_fresh(tmp_path):
    src = pack_dir(_model_dir(tmp_path), tmp_path / "a.tar", chunk_size=8192)
    rx = ChunkReceiver(tmp_path / "work", src.info)
    rx.add(0, src.chunk(0), src.chunk_hashes[0])
    rx.progress_path.write_text("{not json")
    assert ChunkReceiver(tmp_path / "work", src.info).missing() == list(range(src.info.n_chunks))
    other = ArchiveInfo(src.info.model_sha256, src.info.model_size, 4096)  # same archive, other chunking
    assert ChunkReceiver(tmp_path / "work", other).missing() == list(range(other.n_chunks))


def test_receiver_refuses_oversize_or_bad_announcements(tmp_path):
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        ChunkReceiver(tmp_path, ArchiveInfo("a" * 64, 10**9, 4096), max_size=10**6)
    with pytest.raises(ProtocolError, match="64 lowercase hex"):
        ChunkReceiver(tmp_path, ArchiveInfo("../../etc", 10, 4096))


def test_finish_before_complete_is_refused(tmp_path):
    src = pack_dir(_model_dir(tmp_path), tmp_path / "a.tar", chunk_size=8192)
    rx = ChunkReceiver(tmp_path / "work", src.info)
    with pytest.raises(ProtocolError, match="incomplete"):
        rx.finish(tmp_path / "out")


def test_pack_refuses_links(tmp_path):
    src = _model_dir(tmp_path)
    (src / "link").symlink_to(src / "config.json")
    with pytest.raises(ProtocolError, match="only regular files"):
        pack_dir(src, tmp_path / "a.tar")
    with pytest.raises(ProtocolError, match="does not exist"):
        pack_dir(tmp_path / "missing", tmp_path / "b.tar")


# ---------------------------------------------------------------------------------------- extraction


def _evil_tar(path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        good = tarfile.TarInfo("ok.txt")
        good.size = 2
        tar.addfile(good, io.BytesIO(b"ok"))
        member.size = len(data) if member.isreg() else 0
        tar.addfile(member, io.BytesIO(data) if member.isreg() else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (_member("../escape.txt"), "unsafe path"),
        (_member("a/../../escape.txt"), "unsafe path"),
        (_member("/etc/passwd"), "absolute path"),
        (_member("link", tarfile.SYMTYPE, "/etc/passwd"), "not a regular file"),
        (_member("hard", tarfile.LNKTYPE, "ok.txt"), "not a regular file"),
        (_member("fifo", tarfile.FIFOTYPE), "not a regular file"),
        (_member("ok.txt"), "twice"),
        (_member("ok.txt/inner"), "conflicting paths"),
    ],
)
def test_path_traversal_and_links_are_refused(tmp_path, member, reason):
    archive = _evil_tar(tmp_path / "evil.tar", member, b"pwned")
    dest = tmp_path / "deep" / "out"
    with pytest.raises(ProtocolError, match=reason):
        extract_archive(archive, dest, max_bytes=1 << 20)
    assert not dest.exists()
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "deep" / "escape.txt").exists()
    assert list((tmp_path / "deep").iterdir()) == []  # the temporary directory is gone too


def test_traversal_archive_via_chunks_is_refused(tmp_path):
    archive = _evil_tar(tmp_path / "evil.tar", _member("../escape.txt"), b"pwned")
    src = ChunkSource(archive, chunk_size=1024)
    rx = ChunkReceiver(tmp_path / "work", src.info)
    for index in rx.missing():
        rx.add(index, src.chunk(index), src.chunk_hashes[index])
    with pytest.raises(ProtocolError, match="unsafe path"):
        rx.finish(tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "out").exists()


def test_not_a_tar_is_refused(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(3000))
    with pytest.raises(ProtocolError, match="not a valid tar"):
        extract_archive(junk, tmp_path / "out", max_bytes=1 << 20)


def test_extraction_replaces_destination_atomically(tmp_path):
    src = pack_dir(_model_dir(tmp_path), tmp_path / "a.tar")
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "stale.bin").write_bytes(b"old")
    extract_archive(src.path, dest, max_bytes=src.info.model_size)
    assert _tree(dest) == _tree(tmp_path / "compressed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "compressed", "model"]


# ------------------------------------------------------------------------------- expansion bounds

SPARSE_SIZE = 10 * 2**40  # what a few kilobytes of sparse tar claim to expand to: 10 TiB
DATA = b"tail" * 256


def _ok_member(tar: tarfile.TarFile) -> None:
    good = tarfile.TarInfo("ok.txt")
    good.size = 2
    tar.addfile(good, io.BytesIO(b"ok"))


def _gnu_sparse_tar(path: Path) -> Path:
    """Old GNU sparse member (type "S"): the header's sparse map puts DATA at the end of a 10 TiB hole."""
    info = tarfile.TarInfo("big.bin")
    info.type, info.size = tarfile.GNUTYPE_SPARSE, len(DATA)
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[386:398] = tarfile.itn(SPARSE_SIZE - len(DATA), 12, tarfile.GNU_FORMAT)  # first (offset, numbytes)
    header[398:410] = tarfile.itn(len(DATA), 12, tarfile.GNU_FORMAT)
    header[482] = 0  # no extension blocks
    header[483:495] = tarfile.itn(SPARSE_SIZE, 12, tarfile.GNU_FORMAT)  # real size
    header[148:156] = b" " * 8
    header[148:155] = b"%06o\0" % tarfile.calc_chksums(bytes(header))[0]
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        _ok_member(tar)
        tar.fileobj.write(bytes(header) + DATA + b"\0" * (-len(DATA) % 512))
        tar.offset += len(header) + len(DATA) + (-len(DATA) % 512)
    return path


def _pax_sparse_tar(path: Path, version: str) -> Path:
    """GNU sparse in PAX headers, versions 0.0, 0.1 and 1.0 (what `tar --sparse --format=posix` writes)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        _ok_member(tar)
        offset = SPARSE_SIZE - len(DATA)
        data = DATA
        if version == "1.0":
            info = tarfile.TarInfo("GNUSparseFile.0/big.bin")
            info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "big.bin",
                                "GNU.sparse.realsize": str(SPARSE_SIZE)}
            sparse_map = b"1\n%d\n%d\n" % (offset, len(DATA))
            data = sparse_map + b"\0" * (-len(sparse_map) % 512) + DATA
        elif version == "0.1":
            info = tarfile.TarInfo("big.bin")
            info.pax_headers = {"GNU.sparse.size": str(SPARSE_SIZE), "GNU.sparse.numblocks": "1",
                                "GNU.sparse.map": f"{offset},{len(DATA)}"}
        else:
            info = tarfile.TarInfo("big.bin")
            info.pax_headers = {"GNU.sparse.size": str(SPARSE_SIZE), "GNU.sparse.numblocks": "1",
                                "GNU.sparse.offset": str(offset), "GNU.sparse.numbytes": str(len(DATA))}
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def _disk_bytes(root: Path) -> int:
    return sum(p.lstat().st_blocks * 512 for p in root.rglob("*"))


SPARSE_ARCHIVES = {
    "gnu": _gnu_sparse_tar,
    "pax-0.0": lambda p: _pax_sparse_tar(p, "0.0"),
    "pax-0.1": lambda p: _pax_sparse_tar(p, "0.1"),
    "pax-1.0": lambda p: _pax_sparse_tar(p, "1.0"),
}


@pytest.mark.parametrize("kind", sorted(SPARSE_ARCHIVES))
def test_sparse_member_is_refused_before_anything_is_written(tmp_path, kind):
    archive = SPARSE_ARCHIVES[kind](tmp_path / "sparse.tar")
    assert archive.stat().st_size < 20_000
    with tarfile.open(archive) as tar:  # the archive really is what it claims: 10 TiB on extraction
        big = tar.getmember("big.bin")
        assert big.issparse() and big.size == SPARSE_SIZE
    out = tmp_path / "deep"
    out.mkdir()
    with pytest.raises(ProtocolError, match="'big.bin' is a sparse file"):
        extract_archive(archive, out / "model", max_bytes=SPARSE_SIZE * 2)  # refused even within the bound
    assert list(out.iterdir()) == [] and _disk_bytes(out) == 0  # not even ok.txt, which came first


@pytest.mark.parametrize("kind", sorted(SPARSE_ARCHIVES))
def test_sparse_archive_via_chunks_is_refused(tmp_path, kind):
    src = ChunkSource(SPARSE_ARCHIVES[kind](tmp_path / "sparse.tar"), chunk_size=4096)
    rx = ChunkReceiver(tmp_path / "work", src.info)
    for index in rx.missing():
        rx.add(index, src.chunk(index), src.chunk_hashes[index])
    assert rx.received_bytes == src.info.model_size
    with pytest.raises(ProtocolError, match="sparse"):
        rx.finish(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert _disk_bytes(tmp_path) < 200_000


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_sparse_archive_from_gnu_tar_is_refused(tmp_path, fmt):
    """The real thing: GNU tar's own sparse encodings (old GNU headers, PAX sparse 1.0)."""
    if shutil.which("tar") is None or b"GNU tar" not in subprocess.run(
            ["tar", "--version"], capture_output=True, check=False).stdout:
        pytest.skip("GNU tar is not installed")
    src = tmp_path / "src"
    src.mkdir()
    with (src / "holes.bin").open("wb") as fh:
        fh.truncate(64 * 2**20)
        fh.seek(32 * 2**20)
        fh.write(b"x" * 100)
    archive = tmp_path / "holes.tar"
    subprocess.run(["tar", "--sparse", f"--format={fmt}", "-cf", str(archive), "-C", str(src), "holes.bin"],
                   check=True)
    assert archive.stat().st_size < 100_000
    with pytest.raises(ProtocolError, match="sparse"):
        extract_archive(archive, tmp_path / "out", max_bytes=10**12)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", [tarfile.CONTTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, b"Z"])
def test_other_member_types_are_refused(tmp_path, kind):
    archive = _evil_tar(tmp_path / "odd.tar", _member("odd", kind), b"data")
    with pytest.raises(ProtocolError, match="not a regular file or directory"):
        extract_archive(archive, tmp_path / "out", max_bytes=1 << 20)
    assert not (tmp_path / "out").exists()


def test_members_beyond_the_bound_are_refused(tmp_path):
    src = pack_dir(_model_dir(tmp_path), tmp_path / "a.tar")
    data_bytes = sum(p.stat().st_size for p in (tmp_path / "compressed").rglob("*") if p.is_file())
    assert data_bytes < src.info.model_size  # an honest archive never expands beyond its own size
    with pytest.raises(ProtocolError, match=f"hold {data_bytes} bytes, more than the bound of {data_bytes - 1}"):
        extract_archive(src.path, tmp_path / "out", max_bytes=data_bytes - 1)
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "compressed"]
    assert _tree(extract_archive(src.path, tmp_path / "out", max_bytes=data_bytes)) == _tree(tmp_path / "compressed")


def test_member_claiming_more_than_the_archive_holds_is_refused(tmp_path):
    """A PAX `size` record can claim any length; the data is not there, and the bound would refuse it."""
    archive = tmp_path / "liar.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("big.bin")
        info.size = 4
        info.pax_headers = {"size": str(10**12)}
        tar.addfile(info, io.BytesIO(b"tiny"))
    assert b"size=1000000000000" in archive.read_bytes()
    with pytest.raises(ProtocolError, match="not a valid tar|more than the bound"):
        extract_archive(archive, tmp_path / "out", max_bytes=1 << 20)
    assert not (tmp_path / "out").exists()


def test_bound_must_not_be_negative(tmp_path):
    src = pack_dir(_model_dir(tmp_path), tmp_path / "a.tar")
    with pytest.raises(ProtocolError, match=">= 0"):
        extract_archive(src.path, tmp_path / "out", max_bytes=-1)
