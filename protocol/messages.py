"""The message set: types, per-type header schemas, payload rules, and constructors.

`SPECS` is the single source of truth: the codec checks against it and `protocol/README.md`'s table is
generated from it (`message_table()`), so the documentation cannot drift from what is enforced.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from protocol.errors import ProtocolError
from protocol.schema import CrossCheck, Field, Float, Int, Obj, Str, StrList

PROTOCOL_VERSION = 3

MAX_SEQ = 2**63 - 1
MAX_ROUND = 2**31 - 1
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
TOKEN_PATTERN = r"[a-z][a-z0-9_]{0,31}"
SHA256_PATTERN = r"[0-9a-f]{64}"
RUN_FINISHED = "run finished"  # the BYE reason of an owner that completed every round and trained the adapter
# The BYE reason's prefix when every round ran but the adapter is what the run started with (no round was
# aggregated, or the aggregates left it unchanged): the run ended, but not as a success.
RUN_UNTRAINED = "run ended untrained"


class MessageType(StrEnum):
    HELLO = "hello"
    WELCOME = "welcome"
    CHUNK_REQUEST = "chunk_request"
    CHUNK = "chunk"
    READY = "ready"
    ROUND_START = "round_start"
    SECAGG = "secagg"
    UPDATE = "update"
    ROUND_STATS = "round_stats"
    ROUND_END = "round_end"
    HEARTBEAT = "heartbeat"
    REJECT = "reject"
    BYE = "bye"


Sender = Literal["owner", "party", "both"]
Payload = Literal["none", "tensors", "blob"]
RoundRole = Literal["none", "opens", "in", "closes"]


@dataclass(frozen=True)
class MessageSpec:
    """What one message type may hold.

    payload: "none" (header only), "tensors" (optional second frame of safetensors bytes; required when
    `tensors_required`), "blob" (exactly one raw bytes frame, CHUNK).
    round_role: how the replay guard treats the `round` field ("opens" a round, belongs "in" the current
    one, "closes" it, or "none").
    """

    type: MessageType
    sender: Sender
    fields: tuple[Field, ...]
    payload: Payload = "none"
    tensors_required: bool = False
    round_role: RoundRole = "none"
    cross_check: CrossCheck | None = None
    doc: str = ""

    def field_map(self) -> dict[str, Field]:
        return {f.name: f for f in self.fields}


# Fields every header carries, checked before the type-specific ones.
COMMON_FIELDS: tuple[Field, ...] = (
    Field("v", Int(PROTOCOL_VERSION, PROTOCOL_VERSION), doc="protocol version"),
    Field("type", Str(32, pattern=TOKEN_PATTERN, label="message type"), doc="a MessageType value"),
    Field("seq", Int(0, MAX_SEQ), doc="sender's counter, strictly increasing per connection session"),
)

_NAME = Str(64, 1, NAME_PATTERN, "name")
_SHA = Str(64, 64, SHA256_PATTERN, "sha256 hex")
_ROUND = Field("round", Int(0, MAX_ROUND), doc="round number")
# A party's data size, the FedAvg weight. Bounded so that a secure round of up to 2^16 parties always fits
# a 64-bit ring (secure_agg.config), whatever a party claims.
MAX_EXAMPLES = 2**24
_EXAMPLES = Int(0, MAX_EXAMPLES)


def _check_welcome(fields: dict[str, Any]) -> None:
    expected = math.ceil(fields["model_size"] / fields["chunk_size"])
    if fields["n_chunks"] != expected:
        raise ProtocolError(
            f"n_chunks = {fields['n_chunks']} does not match model_size / chunk_size (expected {expected})"
        )


SPECS: dict[MessageType, MessageSpec] = {
    spec.type: spec
    for spec in (
        MessageSpec(
            MessageType.HELLO,
            "party",
            (
                Field("name", _NAME, doc="party name (= its key file's stem; its socket identity starts with it)"),
                Field("n_examples", _EXAMPLES, doc="local training examples (FedAvg weight)"),
                Field(
                    "model_sha256",
                    Str(64, 0, f"(|{SHA256_PATTERN})", "sha256 hex or empty"),
                    required=False,
                    default="",
                    doc='archive hash of the compressed model it already holds, or ""',
                ),
                Field(
                    "capabilities",
                    StrList(16, Str(32, 1, TOKEN_PATTERN, "token")),
                    required=False,
                    default=[],
                    doc='e.g. ["dp", "secure_agg"]',
                ),
            ),
            doc="opens a session; the owner resets this party's replay guard",
        ),
        MessageSpec(
            MessageType.WELCOME,
            "owner",
            (
                Field("run_id", _NAME, doc="identifies the training run"),
                Field("settings", Obj(32 * 1024), doc="the run settings a party trains with (learning.run_settings)"),
                Field("model_sha256", _SHA, doc="sha256 of the compressed-model archive"),
                Field("model_size", Int(0, 2**40 - 1), doc="archive size in bytes"),
                Field("chunk_size", Int(1, 2**30), doc="bytes per chunk (the last may be shorter)"),
                Field("n_chunks", Int(0, 2**31 - 1), doc="ceil(model_size / chunk_size)"),
                Field("round", Int(0, MAX_ROUND), doc="the owner's current round (informational)"),
            ),
            cross_check=_check_welcome,
            doc="accepts a HELLO; announces the model archive",
        ),
        MessageSpec(
            MessageType.CHUNK_REQUEST,
            "party",
            (Field("index", Int(0, 2**31 - 1), doc="chunk wanted"),),
            doc="asks for one chunk of the archive (any order, resumable)",
        ),
        MessageSpec(
            MessageType.CHUNK,
            "owner",
            (
                Field("index", Int(0, 2**31 - 1), doc="chunk index"),
                Field("sha256", _SHA, doc="sha256 of this chunk's bytes (checked by decode)"),
            ),
            payload="blob",
            doc="one chunk of the archive in frame 1",
        ),
        MessageSpec(
            MessageType.READY,
            "party",
            (
                Field("model_sha256", _SHA, doc="archive hash the party verified and unpacked"),
                Field("run_id", _NAME, doc="the run it joins (WELCOME's run_id): `last_round` refers to this run"),
                Field(
                    "last_round",
                    Int(-1, MAX_ROUND),
                    required=False,
                    default=-1,
                    doc="last round of this run it finished or took part in (advertised its keys), -1 for none",
                ),
            ),
            doc="the party holds the model and can train",
        ),
        MessageSpec(
            MessageType.ROUND_START,
            "owner",
            (
                _ROUND,
                Field("deadline_s", Float(0.0, 7 * 86400.0), doc="seconds the party has to answer"),
                Field(
                    "secagg",
                    Obj(32 * 1024),
                    required=False,
                    default={},
                    doc="secure-aggregation parameters, {} when off",
                ),
            ),
            payload="tensors",
            tensors_required=True,
            round_role="opens",
            doc="tensors: two named parts, `adapter/<canonical name>` and `emulator/<canonical name>`",
        ),
        MessageSpec(
            MessageType.SECAGG,
            "both",
            (
                _ROUND,
                Field("stage", Str(32, 1, TOKEN_PATTERN, "stage token"), doc="secure-aggregation stage"),
                Field("data", Obj(192 * 1024), required=False, default={}, doc="stage header dict"),
            ),
            payload="tensors",
            round_role="in",
            doc="tensors: the stage's named numpy arrays (optional)",
        ),
        MessageSpec(
            MessageType.UPDATE,
            "party",
            (
                _ROUND,
                Field("n_examples", _EXAMPLES, doc="examples trained on this round (FedAvg weight)"),
                Field("stats", Obj(8 * 1024), required=False, default={}, doc="loss, epsilon, ... (JSON object)"),
            ),
            payload="tensors",
            round_role="in",
            doc="tensors: adapter LoRA (plain rounds; in secure rounds the update travels masked in SECAGG)",
        ),
        MessageSpec(
            MessageType.ROUND_STATS,
            "party",
            (
                _ROUND,
                Field("stats", Obj(8 * 1024), required=False, default={}, doc="loss, epsilon, ... (JSON object)"),
            ),
            round_role="in",
            doc="a secure round's statistics (the update itself travels masked)",
        ),
        MessageSpec(
            MessageType.ROUND_END,
            "owner",
            (_ROUND, Field("summary", Obj(16 * 1024), required=False, default={}, doc="round metrics")),
            round_role="closes",
            doc="the round is over for this party",
        ),
        MessageSpec(MessageType.HEARTBEAT, "both", (), doc="liveness; carries nothing else"),
        MessageSpec(
            MessageType.REJECT,
            "owner",
            (
                Field("reason", Str(1024, 1, label="reason"), doc="why the message was refused"),
                Field(
                    "ref_type",
                    Str(32, label="type or empty"),
                    required=False,
                    default="",
                    doc='type of the refused message, "" if unreadable',
                ),
                Field(
                    "ref_seq",
                    Int(-1, MAX_SEQ),
                    required=False,
                    default=-1,
                    doc="seq of the refused message, -1 if unreadable",
                ),
            ),
            doc="a party's message was refused; the owner keeps serving",
        ),
        MessageSpec(
            MessageType.BYE,
            "both",
            (Field("reason", Str(1024, label="reason"), required=False, default="", doc="why"),),
            doc="run finished (owner) or party leaving",
        ),
    )
}


@dataclass(eq=False)
class Message:
    """One decoded or to-be-encoded message.

    `fields` holds the type-specific header fields (not v/type/seq); `tensors` maps names to numpy arrays
    or torch tensors; `blob` is CHUNK's raw payload.
    """

    type: MessageType
    fields: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, Any] = field(default_factory=dict)
    blob: bytes | None = None
    seq: int = 0

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)

    @property
    def round(self) -> int | None:
        """The round this message belongs to, for the round-scoped types (None otherwise)."""
        return self.fields.get("round") if SPECS[self.type].round_role != "none" else None

    @property
    def spec(self) -> MessageSpec:
        return SPECS[self.type]

    def __repr__(self) -> str:
        extra = f", tensors={len(self.tensors)}" if self.tensors else ""
        if self.blob is not None:
            extra += f", blob={len(self.blob)} B"
        return f"Message({self.type.value}, seq={self.seq}, {self.fields!r}{extra})"


# ---------------------------------------------------------------------------------------- constructors


def hello(
    *,
    name: str,
    n_examples: int,
    model_sha256: str = "",
    capabilities: list[str] | tuple[str, ...] = (),
) -> Message:
    return Message(
        MessageType.HELLO,
        {
            "name": name,
            "n_examples": n_examples,
            "model_sha256": model_sha256,
            "capabilities": list(capabilities),
        },
    )


def welcome(
    *,
    run_id: str,
    settings: Mapping[str, Any],
    model_sha256: str,
    model_size: int,
    chunk_size: int,
    n_chunks: int,
    round: int,
) -> Message:
    return Message(
        MessageType.WELCOME,
        {
            "run_id": run_id,
            "settings": dict(settings),
            "model_sha256": model_sha256,
            "model_size": model_size,
            "chunk_size": chunk_size,
            "n_chunks": n_chunks,
            "round": round,
        },
    )


def chunk_request(index: int) -> Message:
    return Message(MessageType.CHUNK_REQUEST, {"index": index})


def chunk(index: int, data: bytes) -> Message:
    """A CHUNK; its sha256 is computed here so sender and bytes cannot disagree."""
    return Message(MessageType.CHUNK, {"index": index, "sha256": hashlib.sha256(data).hexdigest()}, blob=bytes(data))


def ready(model_sha256: str, run_id: str, last_round: int = -1) -> Message:
    """READY names the run it was sent for, so what it says about earlier rounds cannot be read into another
    run (a party's ledger holds every run it took part in)."""
    return Message(MessageType.READY, {"model_sha256": model_sha256, "run_id": run_id, "last_round": last_round})


ROUND_PARTS = ("adapter", "emulator")


def round_start(
    *,
    round: int,
    deadline_s: float,
    adapter: Mapping[str, Any],
    emulator: Mapping[str, Any],
    secagg: Mapping[str, Any] | None = None,
) -> Message:
    """The round's global LoRA as two named parts: the adapter the parties train and the emulator's, frozen."""
    return Message(
        MessageType.ROUND_START,
        {"round": round, "deadline_s": float(deadline_s), "secagg": dict(secagg or {})},
        tensors=part_tensors(adapter=adapter, emulator=emulator),
    )


def part_tensors(**parts: Mapping[str, Any]) -> dict[str, Any]:
    """Name every tensor `part/name` (the ROUND_START layout); also builds the matching `expect` spec."""
    return {f"{part}/{name}": value for part in ROUND_PARTS for name, value in parts[part].items()}


def round_parts(msg: Message) -> tuple[dict[str, Any], dict[str, Any]]:
    """A ROUND_START's (adapter, emulator) tensors by canonical name."""
    parts: dict[str, dict[str, Any]] = {part: {} for part in ROUND_PARTS}
    for key, value in msg.tensors.items():
        part, _, name = key.partition("/")
        if part not in parts or not name:
            raise ProtocolError(f"round tensor {key[:80]!r} is in no part (expected adapter/... or emulator/...)",
                                msg_type=msg.type.value, seq=msg.seq)
        parts[part][name] = value
    return parts["adapter"], parts["emulator"]


def secagg(
    *, round: int, stage: str, data: Mapping[str, Any] | None = None, arrays: Mapping[str, Any] | None = None
) -> Message:
    """A secure-aggregation stage message: `(data, arrays)` is the stage payload pair."""
    return Message(
        MessageType.SECAGG,
        {"round": round, "stage": stage, "data": dict(data or {})},
        tensors=dict(arrays or {}),
    )


def update(
    *,
    round: int,
    n_examples: int,
    stats: Mapping[str, Any] | None = None,
    tensors: Mapping[str, Any] | None = None,
) -> Message:
    return Message(
        MessageType.UPDATE,
        {"round": round, "n_examples": n_examples, "stats": dict(stats or {})},
        tensors=dict(tensors or {}),
    )


def round_stats(*, round: int, stats: Mapping[str, Any] | None = None) -> Message:
    return Message(MessageType.ROUND_STATS, {"round": round, "stats": dict(stats or {})})


def round_end(*, round: int, summary: Mapping[str, Any] | None = None) -> Message:
    return Message(MessageType.ROUND_END, {"round": round, "summary": dict(summary or {})})


def heartbeat() -> Message:
    return Message(MessageType.HEARTBEAT)


def reject(reason: str, *, ref_type: str = "", ref_seq: int = -1) -> Message:
    return Message(MessageType.REJECT, {"reason": reason[:1024], "ref_type": ref_type, "ref_seq": ref_seq})


def reject_for(error: ProtocolError) -> Message:
    """The REJECT answering a message that failed with `error` (reason, type and seq when known)."""
    reason = "".join(c if c.isprintable() else "?" for c in error.reason) or "rejected"
    ref_type = error.msg_type if error.msg_type in {t.value for t in MessageType} else ""
    ref_seq = error.seq if isinstance(error.seq, int) and 0 <= error.seq <= MAX_SEQ else -1
    return reject(reason, ref_type=ref_type or "", ref_seq=ref_seq)


def bye(reason: str = "") -> Message:
    return Message(MessageType.BYE, {"reason": reason[:1024]})


# ------------------------------------------------------------------------------------ documentation


def message_table() -> str:
    """The Markdown table of all messages, as it appears in protocol/README.md."""
    rows = [
        "| type | sender | header fields (besides `v`, `type`, `seq`) | frames after the header |",
        "|---|---|---|---|",
    ]
    payload_text = {
        "none": "none",
        "blob": "1: raw chunk bytes (sha256-checked)",
    }
    for spec in SPECS.values():
        parts = []
        for f in spec.fields:
            opt = "" if f.required else f", optional, default `{_default_text(f.default)}`"
            parts.append(f"`{f.name}`: {f.kind.describe()}{opt} — {f.doc}")
        fields_text = "<br>".join(parts) if parts else "—"
        if spec.payload == "tensors":
            need = "required" if spec.tensors_required else "optional"
            frames = f"1: safetensors ({need}). {spec.doc}"
        else:
            frames = f"{payload_text[spec.payload]}. {spec.doc}"
        rows.append(f"| `{spec.type.value}` | {spec.sender} | {fields_text} | {frames} |")
    return "\n".join(rows)


def _default_text(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[]"
    if isinstance(value, dict):
        return "{}"
    return str(value)
