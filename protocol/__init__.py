"""Wire protocol between `owner --listen` and `party --connect`: messages, codec, chunked model transfer,
CurveZMQ keys and sockets. See protocol/README.md."""

from protocol.chunks import ArchiveInfo, ChunkReceiver, ChunkSource, extract_archive, pack_dir
from protocol.codec import (
    DEFAULT_LIMITS,
    Limits,
    TensorSpec,
    check_tensors,
    decode,
    decode_tensors,
    encode,
    encode_tensors,
    tensor_spec,
)
from protocol.errors import ProtocolError, TransportError
from protocol.identities import IdentityLimit, IdentityRefused
from protocol.liveness import Deadline, Liveness, Ticker
from protocol.messages import PROTOCOL_VERSION, SPECS, Message, MessageType
from protocol.replay import ReplayGuard, SeqCounter

__all__ = [
    "DEFAULT_LIMITS",
    "PROTOCOL_VERSION",
    "SPECS",
    "ArchiveInfo",
    "ChunkReceiver",
    "ChunkSource",
    "Deadline",
    "IdentityLimit",
    "IdentityRefused",
    "Limits",
    "Liveness",
    "Message",
    "MessageType",
    "ProtocolError",
    "ReplayGuard",
    "SeqCounter",
    "TensorSpec",
    "Ticker",
    "TransportError",
    "check_tensors",
    "decode",
    "decode_tensors",
    "encode",
    "encode_tensors",
    "extract_archive",
    "pack_dir",
    "tensor_spec",
]
