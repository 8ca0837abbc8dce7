"""Fuzzing the decoder: at least 10,000 malformed messages, each built so that it cannot be valid
(mutations of real encodings and random input); decode must refuse every one with ProtocolError and
raise nothing else."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from protocol.codec import decode, encode, tensor_spec
from protocol.errors import ProtocolError
from protocol.messages import PROTOCOL_VERSION, SPECS, Message, MessageType
from protocol.schema import Float, Int, Obj, Str, StrList
from tests.test_protocol_codec import EXPECT, sample_messages

SAMPLES = [(msg, encode(msg)) for msg in sample_messages()]
# What each sample's receiver pins: the exact tensors of a tensor-carrying type ({} = none at all).
EXPECTS = [{msg.type: tensor_spec(msg.tensors)} if msg.spec.payload == "tensors" else None for msg, _ in SAMPLES]

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
samples = st.integers(0, len(SAMPLES) - 1)


def _scan(header: bytes) -> tuple[list[int], list[int]]:
    """Positions of the top-level JSON structure (braces, brackets, colons, commas and quotes of the
    header object itself, not inside opaque nested values, where a flip may well give valid JSON) and
    positions of bytes inside top-level keys."""
    structural, key_bytes = [], []
    depth, in_string, escaped, start, top = 0, False, False, 0, False
    for i, byte in enumerate(header):
        if in_string:
            if escaped:
                escaped = False
            elif byte == ord("\\"):
                escaped = True
            elif byte == ord('"'):
                in_string = False
                if top:
                    structural.append(i)
                    if header[start - 1] in b"{,":
                        key_bytes.extend(range(start + 1, i))
            continue
        if byte == ord('"'):
            in_string, start, top = True, i, depth == 1
            if top:
                structural.append(i)
        elif byte in b"{[":
            if depth <= 1:
                structural.append(i)
            depth += 1
        elif byte in b"}]":
            depth -= 1
            if depth <= 1:
                structural.append(i)
        elif byte in b":," and depth == 1:
            structural.append(i)
    return structural, key_bytes


def _flip(data: bytes, position: int, bit: int) -> bytes:
    out = bytearray(data)
    out[position] ^= 1 << bit
    return bytes(out)


def _sample(draw) -> tuple[int, Message, list[bytes]]:
    i = draw(samples)
    return i, SAMPLES[i][0], SAMPLES[i][1]


@st.composite
def header_bit_flips(draw):
    """One bit flipped in a structural byte, or in a top-level key (onto a name the type does not know)."""
    i, msg, frames = _sample(draw)
    structural, key_bytes = _scan(frames[0])
    position = draw(st.sampled_from(structural + key_bytes))
    header = _flip(frames[0], position, draw(st.integers(0, 7)))
    if position in key_bytes:
        try:
            keys = list(json.loads(header))
        except ValueError:
            keys = []
        allowed = {"v", "type", "seq", *SPECS[msg.type].field_map()}
        assume(not (keys and set(keys) <= allowed and len(set(keys)) == len(json.loads(frames[0]))))
    return [header, *frames[1:]], EXPECTS[i]


@st.composite
def truncations(draw):
    """A strict prefix of the header, of the tensor frame, or of a chunk's bytes."""
    i, _, frames = _sample(draw)
    index = draw(st.integers(0, len(frames) - 1))
    cut = draw(st.integers(0, len(frames[index]) - 1))
    return [*frames[:index], frames[index][:cut], *frames[index + 1 :]], EXPECTS[i]


def _wrong_value(kind, draw):
    """A JSON value the field kind must refuse."""
    if isinstance(kind, Int):
        return draw(
            st.one_of(
                st.integers(max_value=kind.lo - 1),
                st.integers(min_value=kind.hi + 1),
                st.booleans(),
                st.floats(allow_nan=False),
                st.text(max_size=5),
                st.none(),
                st.lists(st.integers(), max_size=2),
            )
        )
    if isinstance(kind, Float):
        return draw(
            st.one_of(
                st.floats(max_value=kind.lo, allow_nan=False),
                st.floats(min_value=kind.hi, exclude_min=True, allow_nan=False),
                st.booleans(),
                st.text(max_size=5),
                st.none(),
                st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
            )
        )
    if isinstance(kind, Str):
        return draw(st.one_of(st.integers(), st.booleans(), st.none(), st.lists(st.text(max_size=3), max_size=2)))
    if isinstance(kind, StrList):
        return draw(st.one_of(st.integers(), st.text(max_size=5), st.dictionaries(st.text(max_size=3), st.integers())))
    assert isinstance(kind, Obj)
    return draw(st.one_of(st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=3), st.none()))


TYPE_NAMES = frozenset(t.value for t in MessageType)


@st.composite
def field_mutations(draw):
    """Valid header with one semantic fault: a field dropped, added, retyped, out of range or swapped,
    a wrong version or type, or relabelled as a type whose fields it cannot have."""
    i, msg, frames = _sample(draw)
    header = json.loads(frames[0])
    spec = SPECS[msg.type]
    kinds = {"seq": Int(0, 2**63 - 1), **{f.name: f.kind for f in spec.fields}}
    required = ["v", "type", "seq", *(f.name for f in spec.fields if f.required)]
    action = draw(st.sampled_from(["drop", "add", "wrong", "version", "type", "swap", "relabel"]))
    if action == "drop":
        del header[draw(st.sampled_from(required))]
    elif action == "add":
        key = draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in header and k not in kinds))
        header[key] = draw(json_values)
    elif action == "wrong":
        name = draw(st.sampled_from(sorted(kinds)))
        header[name] = _wrong_value(kinds[name], draw)
    elif action == "version":
        header["v"] = draw(json_values.filter(lambda v: v != PROTOCOL_VERSION or isinstance(v, bool | float)))
    elif action == "type":
        header["type"] = draw(json_values.filter(lambda v: not (isinstance(v, str) and v in TYPE_NAMES)))
    elif action == "swap":
        pairs = [(a, b) for a in header for b in header if a < b and type(header[a]) is not type(header[b])]
        pairs = [(a, b) for a, b in pairs if not {a, b} & {"v", "type"}]
        if not pairs:
            del header["seq"]
        else:
            a, b = draw(st.sampled_from(pairs))
            header[a], header[b] = header[b], header[a]
    else:
        present = set(header) - {"v", "type", "seq"}

        def misfit(t: MessageType) -> bool:
            other = SPECS[t]
            need = {f.name for f in other.fields if f.required}
            return not (present <= set(other.field_map()) and need <= present)

        header["type"] = draw(st.sampled_from([t for t in MessageType if misfit(t)])).value
    return [json.dumps(header).encode(), *frames[1:]], EXPECTS[i]


@st.composite
def frame_count_mutations(draw):
    """A frame added, or a needed second frame dropped."""
    i, _, frames = _sample(draw)
    extra = draw(st.binary(max_size=16))
    if len(frames) == 2:
        return (frames[:1] if draw(st.booleans()) else [*frames, extra]), EXPECTS[i]
    return [*frames, extra, extra][: draw(st.integers(2, 3))], EXPECTS[i]


TENSOR_SAMPLES = [i for i, (msg, _) in enumerate(SAMPLES) if msg.tensors]


@st.composite
def tensor_frame_mutations(draw):
    """A bit flipped in the safetensors length prefix or header, or the frame replaced by random bytes."""
    i = draw(st.sampled_from(TENSOR_SAMPLES))
    frames = SAMPLES[i][1]
    body = frames[1]
    header_end = 8 + int.from_bytes(body[:8], "little")
    if draw(st.integers(0, 9)) == 0:
        body = draw(st.binary(max_size=64))
    else:
        body = _flip(body, draw(st.integers(0, header_end - 1)), draw(st.integers(0, 7)))
    return [frames[0], body], EXPECTS[i]


@st.composite
def chunk_mutations(draw):
    """A bit flipped anywhere in a chunk's bytes: its sha256 no longer matches."""
    frames = next(f for msg, f in SAMPLES if msg.type is MessageType.CHUNK)
    return [
        frames[0],
        _flip(frames[1], draw(st.integers(0, len(frames[1]) - 1)), draw(st.integers(0, 7))),
    ], None


random_frames = st.tuples(st.lists(st.binary(max_size=64), max_size=4), st.just(EXPECT))
random_json = st.tuples(
    st.builds(
        lambda value, extra: [json.dumps(value).encode(), *extra],
        json_values.filter(lambda v: not (isinstance(v, dict) and {"v", "type", "seq"} <= set(v))),
        st.lists(st.binary(max_size=16), max_size=1),
    ),
    st.just(EXPECT),
)
non_bytes = st.tuples(
    st.lists(st.one_of(st.text(max_size=4), st.integers(), st.none()), min_size=1, max_size=2), st.just(None)
)

MALFORMED = st.one_of(
    header_bit_flips(),
    truncations(),
    field_mutations(),
    frame_count_mutations(),
    tensor_frame_mutations(),
    chunk_mutations(),
    random_frames,
    random_json,
    non_bytes,
)


def test_fuzz_decoder_rejects_10000_malformed_messages():
    count = 0

    @settings(
        max_examples=10_000,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )
    @given(MALFORMED)
    def check(case):
        nonlocal count
        count += 1
        frames, expect = case
        try:
            msg = decode(frames, expect=expect)
        except ProtocolError as exc:
            assert exc.reason and "\n" not in exc.reason
        else:
            raise AssertionError(f"accepted a malformed message: {frames!r} -> {msg!r}")

    check()
    assert count >= 10_000


def test_structural_flips_exhaustively():
    """Every single-bit flip of every structural header byte of every sample is refused."""
    n = 0
    for (_, frames), expect in zip(SAMPLES, EXPECTS, strict=True):
        structural, _ = _scan(frames[0])
        for position in structural:
            for bit in range(8):
                try:
                    decode([_flip(frames[0], position, bit), *frames[1:]], expect=expect)
                except ProtocolError:
                    n += 1
                    continue
                raise AssertionError(f"flip {position}/{bit} of {frames[0]!r} was accepted")
    assert n > 1000
