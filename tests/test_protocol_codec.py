"""Codec: every message type round-trips; every class of bad input is refused with a ProtocolError;
the replay guard refuses old seq numbers and out-of-round messages without changing state."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from errors import FedbiotError
from protocol import messages as m
from protocol.codec import DEFAULT_LIMITS, Limits, check_tensors, decode, encode, tensor_spec
from protocol.errors import ProtocolError
from protocol.messages import PROTOCOL_VERSION, SPECS, Message, MessageType, message_table
from protocol.replay import ReplayGuard, SeqCounter

SHA = hashlib.sha256(b"model").hexdigest()


def lora_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "model.layers.1.self_attn.q_proj.lora_A.weight": rng.standard_normal((4, 16)).astype(np.float32),
        "model.layers.1.self_attn.q_proj.lora_B.weight": rng.standard_normal((16, 4)).astype(np.float32),
        "model.layers.3.mlp.down_proj.lora_A.weight": rng.standard_normal((4, 24)).astype(np.float32),
        "model.layers.3.mlp.down_proj.lora_B.weight": rng.standard_normal((16, 4)).astype(np.float32),
    }


def secagg_arrays() -> dict[str, np.ndarray]:
    return {
        "ciphertexts": np.arange(3 * 40, dtype=np.uint8).reshape(3, 40),
        "masked": np.arange(10, dtype=np.uint32) * 7919,
    }


def sample_messages() -> list[Message]:
    """One message of every type (UPDATE twice: with and without tensors)."""
    samples = [
        m.hello(name="alice", n_examples=120, model_sha256=SHA, capabilities=["dp", "secure_agg"]),
        m.welcome(
            run_id="run-1",
            settings={"lr": 1e-4, "local_steps": 5, "lora": {"r": 8, "targets": ["q_proj", "v_proj"]}},
            model_sha256=SHA,
            model_size=10_000_001,
            chunk_size=4 * 1024 * 1024,
            n_chunks=3,
            round=2,
        ),
        m.chunk_request(2),
        m.chunk(1, bytes(range(256)) * 3),
        m.ready(SHA, "run-1", last_round=2),
        m.round_start(round=4, deadline_s=60, adapter=lora_arrays(), emulator=lora_arrays(2),
                      secagg={"threshold": 2, "parties": [0, 1, 2]}),
        m.secagg(round=4, stage="share_keys", data={"type": "share_keys", "ids": [0, 1, 2]}, arrays=secagg_arrays()),
        m.update(round=4, n_examples=120, stats={"loss": 0.5, "epsilon": 1.25}, tensors=lora_arrays(1)),
        m.update(round=4, n_examples=7),
        m.round_stats(round=4, stats={"loss_mean": 0.5}),
        m.round_end(round=4, summary={"loss": 0.4, "parties": 3}),
        m.heartbeat(),
        m.reject("round 3 is over", ref_type="update", ref_seq=17),
        m.bye("run finished"),
    ]
    for seq, msg in enumerate(samples, start=1):
        msg.seq = seq
    return samples


EXPECT = {
    MessageType.ROUND_START: tensor_spec(m.part_tensors(adapter=lora_arrays(), emulator=lora_arrays(2))),
    MessageType.UPDATE: tensor_spec(lora_arrays()),
    MessageType.SECAGG: tensor_spec(secagg_arrays()),
}


def _assert_same(a: Message, b: Message) -> None:
    assert b.type is a.type and b.seq == a.seq
    spec = SPECS[a.type]
    defaults = {f.name: f.default for f in spec.fields if not f.required}
    assert b.fields == {**defaults, **a.fields}
    assert set(b.tensors) == set(a.tensors)
    for name, value in a.tensors.items():
        got = b.tensors[name]
        got = got.numpy() if isinstance(got, torch.Tensor) else got
        want = value.numpy() if isinstance(value, torch.Tensor) else value
        assert got.dtype == want.dtype and np.array_equal(got, want)
    assert b.blob == a.blob


def test_every_type_is_sampled():
    assert {s.type for s in sample_messages()} == set(MessageType)


@pytest.mark.parametrize("msg", sample_messages(), ids=lambda msg: f"{msg.type.value}-{len(msg.tensors)}")
def test_round_trip(msg):
    frames = encode(msg)
    header = json.loads(frames[0])
    assert header["v"] == PROTOCOL_VERSION and header["type"] == msg.type.value and header["seq"] == msg.seq
    assert len(frames) == (2 if msg.tensors or msg.blob is not None else 1)
    out = decode(frames, expect=EXPECT if msg.tensors else None)
    _assert_same(msg, out)
    assert encode(out) == frames  # decoding then re-encoding is the identity


def test_optional_fields_get_defaults():
    out = decode([b'{"v":3,"type":"hello","seq":3,"name":"bob","n_examples":0}'])
    assert out["model_sha256"] == "" and out["capabilities"] == []
    ready = decode([b'{"v":3,"type":"ready","seq":4,"model_sha256":"' + b"0" * 64 + b'","run_id":"run-1"}'])
    assert ready["last_round"] == -1
    out["capabilities"].append("x")  # defaults are copies, not shared
    assert SPECS[MessageType.HELLO].field_map()["capabilities"].default == []


def test_torch_tensors_round_trip_including_bf16():
    tensors = {
        "a.lora_A.weight": torch.randn(4, 8),
        "a.lora_B.weight": torch.randn(8, 4, dtype=torch.bfloat16),
        "b": np.ones(3, dtype=np.float16),  # numpy mixed in: carried through torch
    }
    msg = m.update(round=1, n_examples=3, tensors=tensors)
    frames = encode(msg)
    out = decode(frames, framework="torch", expect={MessageType.UPDATE: tensor_spec(tensors)})
    assert out.tensors["a.lora_B.weight"].dtype == torch.bfloat16
    assert torch.equal(out.tensors["a.lora_A.weight"], tensors["a.lora_A.weight"])
    assert torch.equal(out.tensors["b"], torch.ones(3, dtype=torch.float16))
    with pytest.raises(ProtocolError, match="BF16"):
        decode(frames)  # numpy cannot hold bf16


def test_decoded_arrays_are_writable():
    out = decode(encode(sample_messages()[7]))
    arr = next(iter(out.tensors.values()))
    arr += 1  # secure aggregation works in place on what it receives


def test_protocol_error_is_a_fedbiot_error():
    assert issubclass(ProtocolError, FedbiotError)


def test_readme_table_matches_specs():
    readme = (Path(__file__).resolve().parent.parent / "protocol" / "README.md").read_text(encoding="utf-8")
    assert message_table() in readme


# ---------------------------------------------------------------------------------------- rejections


def _header(msg: Message) -> dict:
    return json.loads(encode(msg)[0])


def _frames(header: dict, *rest: bytes) -> list[bytes]:
    return [json.dumps(header).encode(), *rest]


def _rejected(frames, match: str, **kwargs) -> ProtocolError:
    with pytest.raises(ProtocolError, match=match) as info:
        decode(frames, **kwargs)
    return info.value


def test_bad_json_and_non_objects():
    _rejected([b"{not json"], "not valid JSON")
    _rejected([b"\xff\xfe"], "not UTF-8")
    _rejected([b"[1, 2]"], "not a JSON object")
    _rejected([b'{"v":3,"v":3,"type":"heartbeat","seq":1}'], "duplicate key")
    _rejected([b'{"v":3,"type":"update","seq":1,"round":1,"n_examples":1,"stats":{"loss":NaN}}'], "not JSON")
    _rejected([b'{"v":3,"type":"update","seq":1,"round":1,"n_examples":1,"stats":{"loss":1e999}}'], "overflows")
    _rejected([b"[" * 5000 + b"]" * 5000], "nested")
    _rejected([b'{"a":' * 40 + b"1" + b"}" * 40], "nested")
    _rejected([b'{"v":3,"type":"bye","seq":1,"reason":"\\ud800"}'], "surrogate")


def test_frame_count_and_frame_types():
    hb = encode(m.heartbeat())
    _rejected([], "1 or 2 frames")
    _rejected(hb * 3, "1 or 2 frames")
    _rejected([*hb, b"extra"], "no second frame")
    _rejected(["text"], "must be bytes")
    _rejected(b"".join(hb), "must be a list")
    start = encode(sample_messages()[5])
    _rejected(start[:1], "needs a tensor frame")
    _rejected(encode(sample_messages()[3])[:1], "no data frame")


def test_wrong_version_and_unknown_type():
    header = _header(m.heartbeat())
    err = _rejected(_frames({**header, "v": PROTOCOL_VERSION + 1}), f"version {PROTOCOL_VERSION + 1} is not supported")
    assert err.msg_type is None
    _rejected(_frames({**header, "v": PROTOCOL_VERSION - 1}), f"version {PROTOCOL_VERSION - 1} is not supported")
    _rejected(_frames({**header, "v": "1"}), "no integer protocol version")
    _rejected(_frames({**header, "v": True}), "no integer protocol version")
    _rejected(_frames({k: v for k, v in header.items() if k != "v"}), "no integer protocol version")
    _rejected(_frames({**header, "type": "launch_missiles"}), "unknown message type")
    _rejected(_frames({**header, "type": 3}), "no string 'type'")


def test_schema_violations_name_the_message():
    header = _header(sample_messages()[7])  # an UPDATE
    err = _rejected(_frames({**header, "shell": "rm -rf /"}), "unknown field")
    assert err.msg_type == "update" and err.seq == header["seq"]
    _rejected(_frames({k: v for k, v in header.items() if k != "n_examples"}), "lacks required field 'n_examples'")
    _rejected(_frames({k: v for k, v in header.items() if k != "seq"}), "lacks field 'seq'")
    _rejected(_frames({**header, "round": "4"}), "must be an integer")
    _rejected(_frames({**header, "round": 4.0}), "must be an integer")
    _rejected(_frames({**header, "round": True}), "must be an integer")
    _rejected(_frames({**header, "round": -1}), "outside")
    _rejected(_frames({**header, "seq": 2**63}), "outside")
    _rejected(_frames({**header, "stats": [1]}), "must be a JSON object")
    _rejected(_frames({**header, "stats": {"blob": "x" * 9000}}), "more than 8192")
    hello = _header(sample_messages()[0])
    _rejected(_frames({**hello, "name": "../etc"}), "not name")
    _rejected(_frames({**hello, "name": "a" * 65}), "length 65")
    _rejected(_frames({**hello, "model_sha256": "ABC"}), "sha256")
    _rejected(_frames({**hello, "capabilities": ["dp", "dp"]}), "repeats")
    _rejected(_frames({**hello, "capabilities": "dp"}), "must be a list")
    _rejected(_frames({**_header(m.bye()), "reason": "line\nbreak"}), "control characters")
    start = _header(sample_messages()[5])
    _rejected(_frames({**start, "deadline_s": 0}, encode(sample_messages()[5])[1]), "outside")
    _rejected(_frames({**start, "deadline_s": "soon"}, encode(sample_messages()[5])[1]), "must be a number")


def test_cross_field_check():
    header = _header(sample_messages()[1])
    _rejected(_frames({**header, "n_chunks": 4}), "does not match")


def test_sender_role():
    hello = encode(sample_messages()[0])
    assert decode(hello, sender="party").type is MessageType.HELLO
    _rejected(hello, "the owner never sends hello", sender="owner")
    _rejected(encode(sample_messages()[1]), "the party never sends welcome", sender="party")
    assert decode(encode(m.heartbeat()), sender="owner").type is MessageType.HEARTBEAT


def test_oversize_frames():
    small = Limits(max_header_bytes=64, max_tensor_frame_bytes=512, max_chunk_bytes=100)
    _rejected(encode(sample_messages()[1]), "header frame has", limits=small)
    upd = encode(sample_messages()[7])
    _rejected([upd[0], upd[1]], "tensor frame has", limits=Limits(max_tensor_frame_bytes=len(upd[1]) - 1))
    _rejected(encode(sample_messages()[3]), "chunk has", limits=Limits(max_chunk_bytes=10))
    with pytest.raises(ProtocolError, match="header takes"):
        encode(sample_messages()[1], limits=small)


def test_chunk_hash_is_checked():
    head, blob = encode(m.chunk(0, b"hello world"))
    _rejected([head, b"hello World"], "do not match their sha256")
    with pytest.raises(ProtocolError, match="does not match its bytes"):
        encode(Message(MessageType.CHUNK, {"index": 0, "sha256": SHA}, blob=b"x"))


def test_encode_refuses_what_decode_would_refuse():
    with pytest.raises(ProtocolError, match="unknown field"):
        encode(Message(MessageType.HEARTBEAT, {"x": 1}))
    with pytest.raises(ProtocolError, match="set by the codec"):
        encode(Message(MessageType.HEARTBEAT, {"seq": 1}))
    with pytest.raises(ProtocolError, match="needs tensors"):
        encode(m.round_start(round=1, deadline_s=5, adapter={}, emulator={}))
    with pytest.raises(ProtocolError, match="carries no tensors"):
        encode(Message(MessageType.HEARTBEAT, tensors={"a": np.zeros(1)}))
    with pytest.raises(ProtocolError, match="not a JSON type"):
        encode(m.update(round=1, n_examples=1, stats={"loss": np.float32(1.0)}))
    with pytest.raises(ProtocolError, match="non-finite"):
        encode(m.update(round=1, n_examples=1, stats={"loss": math.nan}))
    with pytest.raises(ProtocolError, match="unsupported dtype"):
        encode(m.update(round=1, n_examples=1, tensors={"a": np.array([1 + 2j])}))
    with pytest.raises(ProtocolError, match="bad tensor name"):
        encode(m.update(round=1, n_examples=1, tensors={"../x": np.zeros(1)}))


# --------------------------------------------------------------------------------- safetensors frames


def _sf(header: dict, data: bytes, *, pad: bool = True) -> bytes:
    text = json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


def _update_with(tensor_frame: bytes) -> list[bytes]:
    return [encode(m.update(round=1, n_examples=1))[0], tensor_frame]


def test_hand_written_safetensors_frame_is_accepted():
    data = np.arange(6, dtype=np.float32).tobytes()
    frame = _sf({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}, data)
    out = decode(_update_with(frame))
    assert np.array_equal(out.tensors["w"], np.arange(6, dtype=np.float32).reshape(2, 3))


@pytest.mark.parametrize(
    ("header", "data", "reason"),
    [
        ({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 48]}}, bytes(24), "disagree"),
        ({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}, bytes(48), "offsets cover 24"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(16), "gap"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            bytes(12),
            "overlap",
        ),
        ({"w": {"dtype": "F31", "shape": [1], "data_offsets": [0, 4]}}, bytes(4), "unknown dtype"),
        (
            {"w": {"dtype": "F32", "shape": [2**40, 2**40, 2**40], "data_offsets": [0, 4]}},
            bytes(4),
            "disagree",
        ),
        ({"w": {"dtype": "F32", "shape": [1] * 9, "data_offsets": [0, 4]}}, bytes(4), "shape must be"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4), "shape must be"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, bytes(4), "disagree"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, bytes(4), "data_offsets"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}}, bytes(4), "exactly"),
        ({"w": [1, 2]}, bytes(4), "exactly"),
        ({}, b"", "no tensors"),
        (
            {"__metadata__": {"a": 1}, "w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}},
            b"x",
            "metadata",
        ),
        ({"bad name!": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"x", "bad tensor name"),
    ],
)
def test_malformed_safetensors_headers(header, data, reason):
    _rejected(_update_with(_sf(header, data)), reason)


def test_safetensors_length_prefix_lies():
    good = encode(sample_messages()[7])[1]
    _rejected(_update_with(good[:5]), "shorter than its 8-byte")
    _rejected(_update_with((2**62).to_bytes(8, "little") + good[8:]), "claims")
    _rejected(_update_with((len(good)).to_bytes(8, "little") + good[8:]), "claims")
    _rejected(_update_with(good[:-1]), "offsets cover")
    _rejected(_update_with(b"\x02\x00\x00\x00\x00\x00\x00\x00[]"), "not a JSON object")
    _rejected(_update_with(_sf({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"")), "offsets cover")


def test_expected_tensor_names_shapes_dtypes():
    good = lora_arrays()
    spec = {MessageType.UPDATE: tensor_spec(good)}
    name = next(iter(good))
    renamed = {("x" + k if k == name else k): v for k, v in good.items()}
    _rejected(encode(m.update(round=1, n_examples=1, tensors=renamed)), "wrong tensor names", expect=spec)
    fewer = dict(list(good.items())[1:])
    _rejected(encode(m.update(round=1, n_examples=1, tensors=fewer)), "missing", expect=spec)
    more = {**good, "extra": np.zeros(1, np.float32)}
    _rejected(encode(m.update(round=1, n_examples=1, tensors=more)), "unexpected 'extra'", expect=spec)
    reshaped = {**good, name: good[name].reshape(16, 4)}
    _rejected(encode(m.update(round=1, n_examples=1, tensors=reshaped)), "has shape", expect=spec)
    retyped = {**good, name: good[name].astype(np.float64)}
    _rejected(encode(m.update(round=1, n_examples=1, tensors=retyped)), "has dtype F64, expected F32", expect=spec)
    _rejected(encode(m.update(round=1, n_examples=1)), "missing", expect=spec)
    assert decode(encode(m.update(round=1, n_examples=1)), expect={MessageType.UPDATE: {}}).tensors == {}
    _rejected(encode(m.update(round=1, n_examples=1, tensors=good)), "unexpected", expect={MessageType.UPDATE: {}})
    check_tensors(good, tensor_spec(good))
    with pytest.raises(ProtocolError, match="has dtype"):
        check_tensors({k: torch.from_numpy(v).double() for k, v in good.items()}, tensor_spec(good))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_tensors(bad):
    arrays = lora_arrays()
    name = next(iter(arrays))
    arrays[name][1, 2] = bad
    frames = encode(m.update(round=1, n_examples=1, tensors=arrays))
    _rejected(frames, "NaN or Inf")
    _rejected(frames, "NaN or Inf", framework="torch")
    assert not np.isfinite(decode(frames, finite=False).tensors[name]).all()
    ints = {"counts": np.array([1, 2], dtype=np.int64)}  # integers are never "non-finite"
    assert decode(encode(m.update(round=1, n_examples=1, tensors=ints))).tensors["counts"].tolist() == [1, 2]


def test_every_rejection_reason_is_one_printable_line():
    frames = _frames({**_header(m.bye()), "reason\n": "x"})
    err = _rejected(frames, "unknown field")
    assert "\n" not in str(err)
    reply = m.reject_for(err)
    assert reply["ref_type"] == "bye" and re.fullmatch(r"[ -~]+", reply["reason"])
    assert decode(encode(reply)).type is MessageType.REJECT


# -------------------------------------------------------------------------------------------- replay


def _stamped(msg: Message, seq: int) -> Message:
    msg.seq = seq
    return msg


def test_seq_counter_stamps_increasing():
    counter = SeqCounter()
    seqs = [counter.stamp(m.heartbeat()).seq for _ in range(3)]
    assert seqs == [1, 2, 3]


def test_replayed_seq_is_refused_and_state_untouched():
    guard = ReplayGuard()
    guard.accept(_stamped(m.heartbeat(), 5))
    for seq in (5, 4, 0):
        with pytest.raises(ProtocolError, match="replayed"):
            guard.accept(_stamped(m.heartbeat(), seq))
    assert guard.last_seq == 5
    guard.accept(_stamped(m.heartbeat(), 9))
    assert guard.last_seq == 9


def test_round_guard_party_side():
    guard = ReplayGuard()
    with pytest.raises(ProtocolError, match="no round is in progress"):
        guard.accept(_stamped(m.secagg(round=0, stage="advertise"), 1))
    assert guard.last_seq == -1  # a refused message does not consume its seq
    guard.accept(_stamped(m.round_start(round=3, deadline_s=5, adapter=lora_arrays(), emulator={}), 1))
    assert guard.round == 3
    with pytest.raises(ProtocolError, match="for round 2 during round 3"):
        guard.accept(_stamped(m.secagg(round=2, stage="advertise"), 2))
    guard.accept(_stamped(m.secagg(round=3, stage="advertise"), 2))
    with pytest.raises(ProtocolError, match="already opened"):
        guard.accept(_stamped(m.round_start(round=3, deadline_s=5, adapter=lora_arrays(), emulator={}), 3))
    guard.accept(_stamped(m.round_end(round=3), 3))
    assert guard.round is None
    with pytest.raises(ProtocolError, match="no round is in progress"):
        guard.accept(_stamped(m.round_end(round=3), 4))
    guard.accept(_stamped(m.round_start(round=4, deadline_s=5, adapter=lora_arrays(), emulator={}), 4))
    assert (guard.round, guard.last_round, guard.last_seq) == (4, 4, 4)


def test_round_guard_owner_side():
    guard = ReplayGuard()
    guard.accept(_stamped(m.hello(name="alice", n_examples=3), 1))
    with pytest.raises(ProtocolError, match="no round is in progress"):
        guard.accept(_stamped(m.update(round=0, n_examples=3), 2))
    guard.open_round(0)
    with pytest.raises(ProtocolError, match="for round 1 during round 0") as info:
        guard.check(_stamped(m.update(round=1, n_examples=3), 2))
    assert info.value.msg_type == "update" and info.value.seq == 2
    guard.accept(_stamped(m.update(round=0, n_examples=3), 2))
    guard.close_round()
    with pytest.raises(ProtocolError, match="no round"):
        guard.accept(_stamped(m.update(round=0, n_examples=3), 3))  # a late update for a closed round
    with pytest.raises(ProtocolError, match="already opened"):
        guard.open_round(0)


def test_default_limits_fit_socket_frames():
    assert DEFAULT_LIMITS.max_frame_bytes >= DEFAULT_LIMITS.max_tensor_frame_bytes
    assert DEFAULT_LIMITS.max_frame_bytes >= DEFAULT_LIMITS.max_chunk_bytes


def test_round_start_carries_adapter_and_emulator_as_named_parts():
    adapter, emulator = lora_arrays(1), lora_arrays(2)
    msg = decode(encode(m.round_start(round=2, deadline_s=5, adapter=adapter, emulator=emulator)))
    got_adapter, got_emulator = m.round_parts(msg)
    assert got_adapter.keys() == adapter.keys() and got_emulator.keys() == emulator.keys()
    for name in adapter:
        np.testing.assert_array_equal(got_adapter[name], adapter[name])
        np.testing.assert_array_equal(got_emulator[name], emulator[name])
    stray = Message(MessageType.ROUND_START, msg.fields, tensors={"model.layers.1.x": np.zeros(2, np.float32)})
    with pytest.raises(ProtocolError, match="in no part"):
        m.round_parts(stray)
