"""Chunked model transfer: deterministic archive, per-chunk hashes, resume after a broken connection and
after a restart, whole-archive check, safe and atomic extraction."""

from __future__ import annotations

import hashlib
import io
import json
import os
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
        extract_archive(archive, dest)
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
        extract_archive(junk, tmp_path / "out")


def test_extraction_replaces_destination_atomically(tmp_path):
    src = pack_dir(_model_dir(tmp_path), tmp_path / "a.tar")
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "stale.bin").write_bytes(b"old")
    extract_archive(src.path, dest)
    assert _tree(dest) == _tree(tmp_path / "compressed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "compressed", "model"]
