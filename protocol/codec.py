"""Messages <-> ZeroMQ frames.

Frame 0 is the compact UTF-8 JSON header; frame 1, when present, is either the safetensors bytes of the
message's tensors or CHUNK's raw bytes. `decode` checks everything before trusting anything: frame count
and sizes first, then JSON, version, type, schema, and the safetensors header (parsed here with `json`,
so that lying offsets or huge shapes are refused before the safetensors library allocates a byte). No
pickle, no eval.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from protocol.errors import ProtocolError
from protocol.messages import COMMON_FIELDS, PROTOCOL_VERSION, SPECS, Message, MessageSpec, MessageType
from protocol.schema import dump_json, parse_json

TENSOR_NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/\-]{0,255}")

# safetensors dtype code -> (bytes per element, numpy dtype name or None when numpy cannot hold it)
DTYPES: dict[str, tuple[int, str | None]] = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, None),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U64": (8, "uint64"),
    "U32": (4, "uint32"),
    "U16": (2, "uint16"),
    "U8": (1, "uint8"),
    "BOOL": (1, "bool"),
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
_NUMPY_TO_CODE = {np_name: code for code, (_, np_name) in DTYPES.items() if np_name is not None}
_TORCH_TO_CODE = {
    "torch.float64": "F64",
    "torch.float32": "F32",
    "torch.float16": "F16",
    "torch.bfloat16": "BF16",
    "torch.int64": "I64",
    "torch.int32": "I32",
    "torch.int16": "I16",
    "torch.int8": "I8",
    "torch.uint64": "U64",
    "torch.uint32": "U32",
    "torch.uint16": "U16",
    "torch.uint8": "U8",
    "torch.bool": "BOOL",
}

TensorSpec = Mapping[str, tuple[Sequence[int], Any]]
"""Expected tensors: name -> (shape, dtype); dtype as a safetensors code ("F32"), numpy or torch dtype."""

Framework = Literal["numpy", "torch"]


@dataclass(frozen=True)
class Limits:
    """Inbound size limits; `max_frame_bytes` is what the sockets' MAXMSGSIZE is set to."""

    max_header_bytes: int = 256 * 1024
    max_tensor_frame_bytes: int = 512 * 1024**2
    max_tensor_header_bytes: int = 1024**2
    max_tensors: int = 4096
    max_ndim: int = 8
    max_chunk_bytes: int = 16 * 1024**2

    @property
    def max_frame_bytes(self) -> int:
        return max(self.max_header_bytes, self.max_tensor_frame_bytes, self.max_chunk_bytes)


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class TensorInfo:
    """One entry of a safetensors header, already checked for consistency."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


# ------------------------------------------------------------------------------------------- encode


def encode(msg: Message, *, limits: Limits = DEFAULT_LIMITS) -> list[bytes]:
    """Frames for `msg`. The header goes through the same schema check as on receipt, so a node cannot
    send what its peer is bound to refuse."""
    if not isinstance(msg.type, MessageType):
        raise ProtocolError(f"unknown message type {msg.type!r}")
    spec = SPECS[msg.type]
    header = {"v": PROTOCOL_VERSION, "type": msg.type.value, "seq": msg.seq, **msg.fields}
    for name in ("v", "type", "seq"):
        if name in msg.fields:
            raise ProtocolError(f"field {name!r} is set by the codec, not by the message")
    check_header(header, spec)
    head = dump_json(header, "header")
    if len(head) > limits.max_header_bytes:
        raise ProtocolError(f"header takes {len(head)} bytes, more than {limits.max_header_bytes}")
    frames = [head]
    if spec.payload == "blob":
        if msg.blob is None:
            raise ProtocolError(f"{msg.type.value} needs a blob")
        if msg.tensors:
            raise ProtocolError(f"{msg.type.value} carries no tensors")
        if hashlib.sha256(msg.blob).hexdigest() != msg.fields["sha256"]:
            raise ProtocolError("chunk sha256 does not match its bytes")
        frames.append(bytes(msg.blob))
    elif msg.blob is not None:
        raise ProtocolError(f"{msg.type.value} carries no blob")
    elif msg.tensors:
        if spec.payload != "tensors":
            raise ProtocolError(f"{msg.type.value} carries no tensors")
        data = encode_tensors(msg.tensors)
        if len(data) > limits.max_tensor_frame_bytes:
            raise ProtocolError(f"tensor frame takes {len(data)} bytes, more than {limits.max_tensor_frame_bytes}")
        frames.append(data)
    elif spec.tensors_required:
        raise ProtocolError(f"{msg.type.value} needs tensors")
    return frames


def encode_tensors(tensors: Mapping[str, Any]) -> bytes:
    """safetensors bytes of numpy arrays or torch tensors (torch is used when any value is a tensor)."""
    if not tensors:
        raise ProtocolError("no tensors to encode")
    for name in tensors:
        _check_tensor_name(name)
    torch = sys.modules.get("torch")
    if torch is not None and any(isinstance(t, torch.Tensor) for t in tensors.values()):
        import safetensors.torch

        prepared = {}
        for name, value in tensors.items():
            tensor = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
            if not isinstance(tensor, torch.Tensor):
                raise ProtocolError(f"tensor {name!r} is a {type(value).__name__}, not an array")
            if str(tensor.dtype) not in _TORCH_TO_CODE:
                raise ProtocolError(f"tensor {name!r} has unsupported dtype {tensor.dtype}")
            prepared[name] = tensor.detach().to("cpu").contiguous().clone()
        return safetensors.torch.save(prepared)
    import safetensors.numpy

    arrays = {}
    for name, value in tensors.items():
        if not isinstance(value, np.ndarray):
            raise ProtocolError(f"tensor {name!r} is a {type(value).__name__}, not an array")
        if value.dtype.name not in _NUMPY_TO_CODE:
            raise ProtocolError(f"tensor {name!r} has unsupported dtype {value.dtype}")
        arrays[name] = np.ascontiguousarray(value)
    return safetensors.numpy.save(arrays)


# ------------------------------------------------------------------------------------------- decode


def decode(
    frames: Sequence[Any],
    *,
    limits: Limits = DEFAULT_LIMITS,
    sender: Literal["owner", "party"] | None = None,
    expect: Mapping[MessageType, TensorSpec] | None = None,
    finite: bool = True,
    framework: Framework = "numpy",
) -> Message:
    """Check and decode one received message.

    sender: the role of the peer the frames came from; types that role never sends are refused.
    expect: per message type, the exact tensors it must carry (names, shapes, dtypes); `{}` as a spec
    means "no tensors". Types not in `expect` may carry any well-formed tensors.
    finite: refuse NaN/Inf in floating-point tensors.
    framework: return tensors as numpy arrays or torch tensors (BF16 needs torch).
    Raises ProtocolError, and nothing else, for any bad input.
    """
    if not isinstance(frames, list | tuple):
        raise ProtocolError(f"frames must be a list, got {type(frames).__name__}")
    if not 1 <= len(frames) <= 2:
        raise ProtocolError(f"a message has 1 or 2 frames, got {len(frames)}")
    if not all(isinstance(f, bytes | bytearray | memoryview) for f in frames):
        raise ProtocolError("every frame must be bytes")
    head = frames[0]
    if len(head) > limits.max_header_bytes:
        raise ProtocolError(f"header frame has {len(head)} bytes, more than {limits.max_header_bytes}")
    header = parse_json(head, "header")
    if not isinstance(header, dict):
        raise ProtocolError("header is not a JSON object")
    spec = _spec_of(header)
    msg_type, seq = spec.type, header.get("seq")
    try:
        fields = check_header(header, spec)
        if sender is not None and spec.sender not in (sender, "both"):
            raise ProtocolError(f"the {sender} never sends {msg_type.value}")
        msg = Message(msg_type, fields, seq=header["seq"])
        body = frames[1] if len(frames) == 2 else None
        if spec.payload == "none":
            if body is not None:
                raise ProtocolError(f"{msg_type.value} has no second frame")
        elif spec.payload == "blob":
            msg.blob = _decode_blob(body, fields["sha256"], limits)
        else:
            spec_in = None if expect is None else expect.get(msg_type)
            if body is None:
                if spec.tensors_required:
                    raise ProtocolError(f"{msg_type.value} needs a tensor frame")
                if spec_in is not None:
                    check_infos({}, spec_in)
            else:
                msg.tensors = decode_tensors(body, limits=limits, expect=spec_in, finite=finite, framework=framework)
        return msg
    except ProtocolError as exc:
        exc.msg_type = msg_type.value
        exc.seq = seq if isinstance(seq, int) and not isinstance(seq, bool) else None
        raise


def _spec_of(header: dict[str, Any]) -> MessageSpec:
    version = header.get("v")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ProtocolError("header has no integer protocol version 'v'")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version} is not supported (this node speaks {PROTOCOL_VERSION})")
    name = header.get("type")
    if not isinstance(name, str):
        raise ProtocolError("header has no string 'type'")
    try:
        return SPECS[MessageType(name)]
    except ValueError:
        raise ProtocolError(f"unknown message type {name[:40]!r}") from None


def check_header(header: dict[str, Any], spec: MessageSpec) -> dict[str, Any]:
    """Validate a header dict against the common fields and `spec`; returns the type-specific fields with
    defaults filled in. Unknown fields are refused."""
    for f in COMMON_FIELDS:
        if f.name not in header:
            raise ProtocolError(f"header lacks field {f.name!r}")
        f.kind.check(f.name, header[f.name])
    known = spec.field_map()
    unknown = sorted(set(header) - known.keys() - {f.name for f in COMMON_FIELDS})
    if unknown:
        raise ProtocolError(f"{spec.type.value} has unknown field(s) {', '.join(repr(k[:40]) for k in unknown[:5])}")
    fields: dict[str, Any] = {}
    for name, f in known.items():
        if name in header:
            fields[name] = f.kind.check(name, header[name])
        elif f.required:
            raise ProtocolError(f"{spec.type.value} lacks required field {name!r}")
        else:
            fields[name] = copy.deepcopy(f.default)
    if spec.cross_check is not None:
        spec.cross_check(fields)
    return fields


def _decode_blob(body: Any, sha256: str, limits: Limits) -> bytes:
    if body is None:
        raise ProtocolError("chunk has no data frame")
    if len(body) > limits.max_chunk_bytes:
        raise ProtocolError(f"chunk has {len(body)} bytes, more than {limits.max_chunk_bytes}")
    data = bytes(body)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ProtocolError("chunk bytes do not match their sha256")
    return data


def parse_safetensors_header(
    data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS
) -> dict[str, TensorInfo]:
    """Read and check a safetensors header without the safetensors library.

    Refuses: short frames, a header length beyond the frame or the limit, non-JSON, metadata that is not
    str -> str, unknown dtypes, bad shapes, offsets that overlap, leave gaps, or do not cover the data
    exactly, and shape/dtype sizes that disagree with the offsets.
    """
    if len(data) > limits.max_tensor_frame_bytes:
        raise ProtocolError(f"tensor frame has {len(data)} bytes, more than {limits.max_tensor_frame_bytes}")
    if len(data) < 8:
        raise ProtocolError("tensor frame is shorter than its 8-byte length prefix")
    n = int.from_bytes(bytes(data[:8]), "little")
    if n > limits.max_tensor_header_bytes:
        raise ProtocolError(f"safetensors header claims {n} bytes, more than {limits.max_tensor_header_bytes}")
    if 8 + n > len(data):
        raise ProtocolError(f"safetensors header claims {n} bytes but the frame has {len(data) - 8}")
    raw = parse_json(data[8 : 8 + n], "safetensors header")
    if not isinstance(raw, dict):
        raise ProtocolError("safetensors header is not a JSON object")
    meta = raw.pop("__metadata__", None)
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    ):
        raise ProtocolError("safetensors metadata is not a str -> str object")
    if not raw:
        raise ProtocolError("tensor frame holds no tensors")
    if len(raw) > limits.max_tensors:
        raise ProtocolError(f"tensor frame holds {len(raw)} tensors, more than {limits.max_tensors}")
    infos: dict[str, TensorInfo] = {}
    for name, entry in raw.items():
        _check_tensor_name(name)
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ProtocolError(f"tensor {name!r}: entry must hold exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ProtocolError(f"tensor {name!r}: unknown dtype {str(dtype)[:20]!r}")
        if not isinstance(shape, list) or len(shape) > limits.max_ndim or not all(_is_nat(d) for d in shape):
            raise ProtocolError(f"tensor {name!r}: shape must be a list of <= {limits.max_ndim} non-negative ints")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_nat(o) for o in offsets)):
            raise ProtocolError(f"tensor {name!r}: data_offsets must be two non-negative ints")
        begin, end = offsets
        nbytes = math.prod(shape) * DTYPES[dtype][0]
        if end < begin or end - begin != nbytes:
            raise ProtocolError(f"tensor {name!r}: offsets [{begin}, {end}] disagree with shape {shape[:8]} of {dtype}")
        infos[name] = TensorInfo(dtype, tuple(shape), begin, end)
    position = 0
    for info in sorted(infos.values(), key=lambda i: (i.begin, i.end)):
        if info.begin != position:
            raise ProtocolError("tensor data offsets overlap or leave a gap")
        position = info.end
    if position != len(data) - 8 - n:
        raise ProtocolError(f"tensor data takes {len(data) - 8 - n} bytes but the offsets cover {position}")
    return infos


def decode_tensors(
    data: bytes | bytearray | memoryview,
    *,
    limits: Limits = DEFAULT_LIMITS,
    expect: TensorSpec | None = None,
    finite: bool = True,
    framework: Framework = "numpy",
) -> dict[str, Any]:
    """Checked safetensors bytes -> {name: array}. See `decode` for the arguments."""
    infos = parse_safetensors_header(data, limits)
    if expect is not None:
        check_infos(infos, expect)
    if framework == "torch":
        import safetensors.torch

        loader = safetensors.torch.load
    elif framework == "numpy":
        import safetensors.numpy

        bf16 = [name for name, info in infos.items() if DTYPES[info.dtype][1] is None]
        if bf16:
            raise ProtocolError(f"tensor {bf16[0]!r} is BF16, which needs framework='torch'")
        loader = safetensors.numpy.load
    else:
        raise ProtocolError(f"unknown framework {framework!r}")
    try:
        tensors = loader(bytes(data))
    except Exception as exc:  # the library's own checks, should ours have missed something
        raise ProtocolError(f"safetensors refused the tensor frame: {str(exc)[:120]}") from None
    if set(tensors) != set(infos):
        raise ProtocolError("safetensors returned other tensors than its header lists")
    if finite:
        for name, info in infos.items():
            if info.dtype in FLOAT_DTYPES and not _all_finite(tensors[name]):
                raise ProtocolError(f"tensor {name!r} holds NaN or Inf")
    return dict(tensors)


def tensor_spec(tensors: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """The spec {name: (shape, dtype code)} that `tensors` satisfy, e.g. to pin what a peer must send."""
    return {name: (tuple(int(d) for d in t.shape), dtype_code(t.dtype)) for name, t in tensors.items()}


def check_tensors(tensors: Mapping[str, Any], expect: TensorSpec) -> None:
    """Check already decoded tensors against a spec (exact name set, shapes, dtypes)."""
    check_infos({n: TensorInfo(dtype_code(t.dtype), tuple(t.shape), 0, 0) for n, t in tensors.items()}, expect)


def check_infos(infos: Mapping[str, TensorInfo], expect: TensorSpec) -> None:
    missing = sorted(set(expect) - set(infos))
    extra = sorted(set(infos) - set(expect))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(repr(n[:80]) for n in missing[:3])}")
        if extra:
            parts.append(f"unexpected {', '.join(repr(n[:80]) for n in extra[:3])}")
        raise ProtocolError(f"wrong tensor names: {'; '.join(parts)}")
    for name, (shape, dtype) in expect.items():
        info = infos[name]
        if info.shape != tuple(int(d) for d in shape):
            raise ProtocolError(f"tensor {name!r} has shape {list(info.shape)}, expected {list(shape)}")
        want = dtype_code(dtype)
        if info.dtype != want:
            raise ProtocolError(f"tensor {name!r} has dtype {info.dtype}, expected {want}")


def dtype_code(dtype: Any) -> str:
    """safetensors dtype code for a code string, numpy dtype (or its name) or torch dtype."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return dtype
    text = str(dtype)
    if text in _TORCH_TO_CODE:
        return _TORCH_TO_CODE[text]
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = ""
    if name in _NUMPY_TO_CODE:
        return _NUMPY_TO_CODE[name]
    raise ProtocolError(f"unsupported dtype {text!r}")


def _all_finite(tensor: Any) -> bool:
    if isinstance(tensor, np.ndarray):
        return bool(np.isfinite(tensor).all())
    import torch

    return bool(torch.isfinite(tensor).all())


def _check_tensor_name(name: Any) -> None:
    if not isinstance(name, str) or TENSOR_NAME_PATTERN.fullmatch(name) is None:
        raise ProtocolError(f"bad tensor name {str(name)[:80]!r}")


def _is_nat(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
