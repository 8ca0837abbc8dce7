"""The ten messages of a round, as small dataclasses with a pickle-free wire form.

Wire form: `to_wire() -> (header, arrays)`. The header is a JSON-able dict of ints, strings and lists of
ints: always "type" (a lower-case token, usable as a transport's stage name), "version", "round",
"session", then the message's own fields. Every byte string
(public keys, commitments, signatures, ciphertexts, shares, the masked vector) travels as a named uint8 numpy array,
so the transport can put it in a binary frame (safetensors) instead of inflating it with base64. Lists of
party ids are strictly increasing. `from_wire` checks everything it can without round state (types,
exact key sets, sizes, ids in [0, MAX_PARTIES), list/array agreement) and raises SecAggError; the party
and server state machines then check the message against the round (ids, lists, sizes expected).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from secure_agg.config import MAX_PARTIES
from secure_agg.crypto import KEY_BYTES, NONCE_BYTES, SIGNATURE_BYTES, TAG_BYTES
from secure_agg.errors import SecAggError
from secure_agg.shamir import SHARE_BYTES

WIRE_VERSION = 2  # 2: advertisements carry a member name and an identity signature; the roster relays them whole
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
MAX_ROUND = (1 << 63) - 1
MAX_LENGTH = 1 << 31
MAX_SESSION = 128
SHARE_PLAINTEXT_BYTES = 2 * SHARE_BYTES  # self-mask seed share || mask-key share
CIPHERTEXT_BYTES = NONCE_BYTES + SHARE_PLAINTEXT_BYTES + TAG_BYTES
DIGEST_BYTES = 32


def wire_size(header: dict, arrays: dict[str, np.ndarray]) -> int:
    """Bytes a message takes on the wire: compact JSON header plus raw array bytes."""
    return len(json.dumps(header, separators=(",", ":")).encode()) + sum(a.nbytes for a in arrays.values())


def check_session(session: Any) -> str:
    if (not isinstance(session, str) or not 1 <= len(session) <= MAX_SESSION or not session.isascii()
            or not session.isprintable()):
        raise SecAggError(f"the session id must be 1..{MAX_SESSION} printable ASCII characters, "
                          f"got {session!r}")
    return session


def _int(header: dict, key: str, lo: int, hi: int) -> int:
    value = header[key]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise SecAggError(f"field {key!r} must be an int in [{lo}, {hi}], got {value!r}")
    return value


def _ids(header: dict, key: str) -> list[int]:
    value = header[key]
    if not isinstance(value, list) or len(value) > MAX_PARTIES:
        raise SecAggError(f"field {key!r} must be a list of party ids")
    for i in value:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < MAX_PARTIES:
            raise SecAggError(f"field {key!r} holds an invalid party id {i!r}")
    if any(a >= b for a, b in zip(value, value[1:], strict=False)):
        raise SecAggError(f"field {key!r} must be strictly increasing (sorted, no repeats)")
    return list(value)


def _rows(arrays: dict, name: str, rows: int, width: int) -> list[bytes]:
    """A (rows, width) uint8 array as a list of byte strings."""
    a = arrays[name]
    if not isinstance(a, np.ndarray) or a.dtype != np.uint8 or a.shape != (rows, width):
        shape = getattr(a, "shape", None)
        raise SecAggError(f"array {name!r} must be uint8 of shape {(rows, width)}, got "
                          f"{getattr(a, 'dtype', type(a).__name__)} {shape}")
    data = np.ascontiguousarray(a).tobytes()
    return [data[i * width:(i + 1) * width] for i in range(rows)]


def _blob(arrays: dict, name: str, width: int) -> bytes:
    a = arrays[name]
    if not isinstance(a, np.ndarray) or a.dtype != np.uint8 or a.shape != (width,):
        raise SecAggError(f"array {name!r} must be uint8 of shape ({width},)")
    return a.tobytes()


def _as_rows(items: list[bytes], width: int) -> np.ndarray:
    if not items:
        return np.zeros((0, width), dtype=np.uint8)
    return np.frombuffer(b"".join(items), dtype=np.uint8).reshape(len(items), width).copy()


def _as_blob(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).copy()


class _Message:
    TYPE: ClassVar[str]
    FIELDS: ClassVar[tuple[str, ...]]
    ARRAYS: ClassVar[tuple[str, ...]]

    @classmethod
    def _open(cls, header: Any, arrays: Any) -> tuple[int, str]:
        """Check the envelope; returns (round id, session)."""
        if not isinstance(header, dict) or not isinstance(arrays, dict):
            raise SecAggError(f"{cls.TYPE}: the header must be a dict and the arrays a dict of numpy arrays")
        if header.get("type") != cls.TYPE:
            raise SecAggError(f"expected a {cls.TYPE} message, got type {header.get('type')!r}")
        if header.get("version") != WIRE_VERSION:
            raise SecAggError(f"{cls.TYPE}: unsupported version {header.get('version')!r} "
                              f"(this side speaks {WIRE_VERSION})")
        expected = {"type", "version", "round", "session", *cls.FIELDS}
        if set(header) != expected:
            raise SecAggError(f"{cls.TYPE}: header fields {sorted(header)} differ from {sorted(expected)}")
        if set(arrays) != set(cls.ARRAYS):
            raise SecAggError(f"{cls.TYPE}: arrays {sorted(arrays)} differ from {sorted(cls.ARRAYS)}")
        return _int(header, "round", 0, MAX_ROUND), check_session(header["session"])

    def _header(self, **fields: Any) -> dict:
        return {"type": self.TYPE, "version": WIRE_VERSION, "round": self.round_id, "session": self.session,
                **fields}

    round_id: int
    session: str


def _name(header: dict, key: str) -> str:
    """A member name: "" (no identity) or 1..64 letters, digits, '.', '_', '-' (no leading symbol)."""
    value = header[key]
    if not isinstance(value, str) or (value and re.fullmatch(NAME_PATTERN, value) is None):
        raise SecAggError(f"field {key!r} must be a member name or empty, got {value!r:.80}")
    return value


def _names(header: dict, key: str, count: int) -> list[str]:
    value = header[key]
    if not isinstance(value, list) or len(value) != count:
        raise SecAggError(f"field {key!r} must be a list of {count} member names")
    return [_name({key: v}, key) for v in value]


@dataclass(frozen=True)
class AdvertiseKeys(_Message):
    """Party -> owner: the round's two X25519 public keys (shares, masks), its Ed25519 signing key (for the
    consistency check), a commitment to its self-mask seed and one to its graph coin; and, when the party has
    a long-term identity, its member name and the identity key's signature over all of these
    (`secure_agg.identity`), so that its peers can check them against their own roster ("" and zeros
    without one)."""

    TYPE: ClassVar[str] = "advertise_keys"
    FIELDS: ClassVar[tuple[str, ...]] = ("sender", "name")
    ARRAYS: ClassVar[tuple[str, ...]] = ("c_pk", "s_pk", "sig_pk", "seed_commit", "coin_commit", "identity_sig")

    round_id: int
    session: str
    sender: int
    c_pk: bytes
    s_pk: bytes
    sig_pk: bytes
    seed_commit: bytes
    coin_commit: bytes
    name: str = ""
    identity_sig: bytes = bytes(SIGNATURE_BYTES)

    @property
    def keys(self) -> bytes:
        """Everything the identity signature covers besides the envelope, in one fixed order."""
        return self.c_pk + self.s_pk + self.sig_pk + self.seed_commit + self.coin_commit

    @property
    def transcript_entry(self) -> bytes:
        """The member's part of the round transcript: its keys, commitments and name."""
        name = self.name.encode()
        return self.keys + bytes([len(name)]) + name

    def to_wire(self) -> tuple[dict, dict[str, np.ndarray]]:
        return self._header(sender=self.sender, name=self.name), {
            "c_pk": _as_blob(self.c_pk), "s_pk": _as_blob(self.s_pk), "sig_pk": _as_blob(self.sig_pk),
            "seed_commit": _as_blob(self.seed_commit), "coin_commit": _as_blob(self.coin_commit),
            "identity_sig": _as_blob(self.identity_sig)}

    @classmethod
    def from_wire(cls, header: Any, arrays: Any) -> AdvertiseKeys:
        round_id, session = cls._open(header, arrays)
        return cls(round_id, session, _int(header, "sender", 0, MAX_PARTIES - 1),
                   _blob(arrays, "c_pk", KEY_BYTES), _blob(arrays, "s_pk", KEY_BYTES),
                   _blob(arrays, "sig_pk", KEY_BYTES), _blob(arrays, "seed_commit", DIGEST_BYTES),
                   _blob(arrays, "coin_commit", DIGEST_BYTES), _name(header, "name"),
                   _blob(arrays, "identity_sig", SIGNATURE_BYTES))


@dataclass(frozen=True)
class Roster(_Message):
    """Owner -> party: who advertised (the members), the round parameters, and every member's advertisement
    as it was sent: its keys and commitments, its name and its identity signature (members order).

    The party recomputes every derived field and refuses the roster if one differs or falls below its own
    floors, and checks every member it knows against its own consortium roster. The neighbours are not known
    yet: they follow from the coins, revealed with the shares.
    """

    TYPE: ClassVar[str] = "roster"
    FIELDS: ClassVar[tuple[str, ...]] = ("recipient", "n_parties", "members", "min_survivors", "collusion",
                                         "degree", "ring_bits", "names")
    ARRAYS: ClassVar[tuple[str, ...]] = ("c_pk", "s_pk", "sig_pk", "seed_commit", "coin_commit", "identity_sig")

    round_id: int
    session: str
    recipient: int
    n_parties: int
    members: list[int]
    min_survivors: int
    collusion: int
    degree: int
    ring_bits: int
    adverts: list[AdvertiseKeys] = field(repr=False)  # one per member, in members order

    @property
    def c_pks(self) -> list[bytes]:
        return [a.c_pk for a in self.adverts]

    @property
    def sig_pks(self) -> list[bytes]:
        return [a.sig_pk for a in self.adverts]

    @property
    def coin_commits(self) -> list[bytes]:
        return [a.coin_commit for a in self.adverts]

    def to_wire(self) -> tuple[dict, dict[str, np.ndarray]]:
        header = self._header(recipient=self.recipient, n_parties=self.n_parties, members=list(self.members),
                              min_survivors=self.min_survivors, collusion=self.collusion, degree=self.degree,
                              ring_bits=self.ring_bits, names=[a.name for a in self.adverts])
        return header, {
            "c_pk": _as_rows(self.c_pks, KEY_BYTES), "s_pk": _as_rows([a.s_pk for a in self.adverts], KEY_BYTES),
            "sig_pk": _as_rows(self.sig_pks, KEY_BYTES),
            "seed_commit": _as_rows([a.seed_commit for a in self.adverts], DIGEST_BYTES),
            "coin_commit": _as_rows(self.coin_commits, DIGEST_BYTES),
            "identity_sig": _as_rows([a.identity_sig for a in self.adverts], SIGNATURE_BYTES)}

    @classmethod
    def from_wire(cls, header: Any, arrays: Any) -> Roster:
        round_id, session = cls._open(header, arrays)
        members = _ids(header, "members")
        m = len(members)
        names = _names(header, "names", m)
        columns = [_rows(arrays, "c_pk", m, KEY_BYTES), _rows(arrays, "s_pk", m, KEY_BYTES),
                   _rows(arrays, "sig_pk", m, KEY_BYTES), _rows(arrays, "seed_commit", m, DIGEST_BYTES),
                   _rows(arrays, "coin_commit", m, DIGEST_BYTES)]
        sigs = _rows(arrays, "identity_sig", m, SIGNATURE_BYTES)
        adverts = [AdvertiseKeys(round_id, session, u, *(column[i] for column in columns), names[i], sigs[i])
                   for i, u in enumerate(members)]
        return cls(round_id, session, _int(header, "recipient", 0, MAX_PARTIES - 1),
                   _int(header, "n_parties", 2, MAX_PARTIES), members,
                   _int(header, "min_survivors", 1, MAX_PARTIES), _int(header, "collusion", 0, MAX_PARTIES),
                   _int(header, "degree", 1, MAX_PARTIES), _int(header, "ring_bits", 8, 64), adverts)


@dataclass(frozen=True)
class ShareKeys(_Message):
    """Party -> owner: one AEAD ciphertext of (seed share, mask-key share) per other member, for relaying; a
    hash commitment to every share it dealt (rows in the order of receivers + sender, sorted), so the owner
    can check each revealed share; and its graph coin.
    """

    TYPE: ClassVar[str] = "share_keys"
    FIELDS: ClassVar[tuple[str, ...]] = ("sender", "receivers")
    ARRAYS: ClassVar[tuple[str, ...]] = ("ciphertexts", "seed_commits", "key_commits", "coin")

    round_id: int
    session: str
    sender: int
    receivers: list[int]
    ciphertexts: list[bytes] = field(repr=False)
    seed_commits: list[bytes] = field(repr=False)  # per holder in sorted(receivers + [sender])
    key_commits: list[bytes] = field(repr=False)
    coin: bytes = field(repr=False, default=b"")

    def to_wire(self) -> tuple[dict, dict[str, np.ndarray]]:
        return (self._header(sender=self.sender, receivers=list(self.receivers)),
                {"ciphertexts": _as_rows(self.ciphertexts, CIPHERTEXT_BYTES),
                 "seed_commits": _as_rows(self.seed_commits, DIGEST_BYTES),
                 "key_commits": _as_rows(self.key_commits, DIGEST_BYTES), "coin": _as_blob(self.coin)})

    @classmethod
    def from_wire(cls, header: Any, arrays: Any) -> ShareKeys:
        round_id, session = cls._open(header, arrays)
        receivers = _ids(header, "receivers")
        sender = _int(header, "sender", 0, MAX_PARTIES - 1)
        if sender in receivers:
            raise SecAggError("a party cannot address shares to itself")
        holders = len(receivers) + 1
        return cls(round_id, session, sender, receivers,
                   _rows(arrays, "ciphertexts", len(receivers), CIPHERTEXT_BYTES),
                   _rows(arrays, "seed_commits", holders, DIGEST_BYTES),
                   _rows(arrays, "key_commits", holders, DIGEST_BYTES), _blob(arrays, "coin", DIGEST_BYTES))


@dataclass(frozen=True)
class RelayedShares(_Message):
    """Owner -> party: the ciphertexts addressed to the recipient by the other parties that shared keys
    (senders), each dealer's commitments to the recipient's two shares, the coins of every sharer (senders
    + recipient, sorted), and the recipient's neighbours in the graph with their mask-agreement keys."""

    TYPE: ClassVar[str] = "relayed_shares"
    FIELDS: ClassVar[tuple[str, ...]] = ("recipient", "senders", "neighbours")
    ARRAYS: ClassVar[tuple[str, ...]] = ("ciphertexts", "seed_commits", "key_commits", "coins", "s_pk")

    round_id: int
    session: str
    recipient: int
    senders: list[int]
    neighbours: list[int]
    ciphertexts: list[bytes] = field(repr=False)
    seed_commits: list[bytes] = field(repr=False)  # per sender: its commitment to the recipient's seed share
    key_commits: list[bytes] = field(repr=False)
    coins: list[bytes] = field(repr=False)  # per sharer in sorted(senders + [recipient])
    s_pks: list[bytes] = field(repr=False)  # per neighbour

    def to_wire(self) -> tuple[dict, dict[str, np.ndarray]]:
        return (self._header(recipient=self.recipient, senders=list(self.senders),
                             neighbours=list(self.neighbours)),
                {"ciphertexts": _as_rows(self.ciphertexts, CIPHERTEXT_BYTES),
                 "seed_commits": _as_rows(self.seed_commits, DIGEST_BYTES),
                 "key_commits": _as_rows(self.key_commits, DIGEST_BYTES),
                 "coins": _as_rows(self.coins, DIGEST_BYTES), "s_pk": _as_rows(self.s_pks, KEY_BYTES)})

    @classmethod
    def from_wire(cls, header: Any, arrays: Any) -> RelayedShares:
        round_id, session = cls._open(header, arrays)
        senders, neighbours = _ids(header, "senders"), _ids(header, "neighbours")
        recipient = _int(header, "recipient", 0, MAX_PARTIES - 1)
        if recipient in senders or recipient in neighbours:
            raise SecAggError("a relay lists its recipient among the senders or its neighbours")
        s = len(senders)
        return cls(round_id, session, recipient, senders, neighbours,
                   _rows(arrays, "ciphertexts", s, CIPHERTEXT_BYTES), _rows(arrays, "seed_commits", s, DIGEST_BYTES),
                   _rows(arrays, "key_commits", s, DIGEST_BYTES), _rows(arrays, "coins", s + 1, DIGEST_BYTES),
                   _rows(arrays, "s_pk", len(neighbours), KEY_BYTES))


@dataclass(frozen=True)
class MaskedInput(_Message):
    """Party -> owner: the masked ring vector (`length` elements of ring_bits / 8 bytes each) and the party's
    signature over the round view it masked under (relayed to the others in the consistency check)."""

    TYPE: ClassVar[str] = "masked_input"
    FIELDS: ClassVar[tuple[str, ...]] = ("sender", "length", "ring_bits")
    ARRAYS: ClassVar[tuple[str, ...]] = ("masked", "view_signature")

    round_id: int
    session: str
    sender: int
    length: int
    ring_bits: int
    masked: np.ndarray = field(repr=False)
    view_signature: bytes = field(repr=False, default=b"")

    def to_wire(self) -> tuple[dict, dict[str, np.ndarray]]:
        return (self._header(sender=self.sender, length=self.length, ring_bits=self.ring_bits),
                {"masked": self.masked, "view_signature": _as_blob(self.view_signature)})

    @classmethod
    def from_wire(cls, header: Any, arrays: Any) -> MaskedInput:
        round_id, session = cls._open(header, arrays)
        length = _int(header, "length", 1, MAX_LENGTH)
        ring_bits = _int(header, "ring_bits", 8, 64)
        if ring_bits % 8:
            raise SecAggError(f"ring_bits must be a multiple of 8, got {ring_bits}")
        masked = arrays["masked"]
        if (not isinstance(masked, np.ndarray) or masked.dtype != np.uint8
                or masked.shape != (length * ring_bits // 8,)):
            raise SecAggError(f"array 'masked' must be uint8 of shape ({length * ring_bits // 8},) for "
                              f"{length} elements of {ring_bits} bits, got {getattr(masked, 'dtype', '?')} "
                              f"{getattr(masked, 'shape', '?')}")
        return cls(round_id, session, _int(header, "sender", 0, MAX_PARTIES - 1), length, ring_bits,
                   np.ascontiguousarray(masked), _blob(arrays, "view_signature", SIGNATURE_BYTES))


@dataclass(frozen=True)
class InputAck(_Message):
    """Owner -> party: the SHA-256 of the masked input it accepted (the party checks it)."""

    TYPE: ClassVar[str] = "input_ack"
    FIELDS: ClassVar[tuple[str, ...]] = ("recipient",)
    ARRAYS: ClassVar[tuple[str, ...]] = ("digest",)

    round_id: int
    session: str
    recipient: int
    digest: bytes

    def to_wire(self) -> tuple[dict, dict[str, np.ndarray]]:
        return self._header(recipient=self.recipient), {"digest": _as_blob(self.digest)}

    @classmethod
    def from_wire(cls, header: Any, arrays: Any) -> InputAck:
        round_id, session = cls._open(header, arrays)
        return cls(round_id, session, _int(header, "recipient", 0, MAX_PARTIES - 1),
                   _blob(arrays, "digest", DIGEST_BYTES))


@dataclass(frozen=True)
class ConsistencyRequest(_Message):
    """Owner -> party: which parties' inputs are in the sum (alive, U3) and which shared keys but sent none
    (dropped), with every alive party's view signature (alive order).

    The party checks the lists and the view signatures and signs U3; it reveals shares only once t parties
    signed the same U3 under the same view.
    """

    TYPE: ClassVar[str] = "consistency_request"
    FIELDS: ClassVar[tuple[str, ...]] = ("recipient", "alive", "dropped")
    ARRAYS: ClassVar[tuple[str, ...]] = ("view_signatures",)

    round_id: int
    session: str
    recipient: int
    alive: list[int]
    dropped: list[int]
    view_signatures: list[bytes] = field(repr=False, default_factory=list)

    def to_wire(self) -> tuple[dict, dict[str, np.ndarray]]:
        return (self._header(recipient=self.recipient, alive=list(self.alive), dropped=list(self.dropped)),
                {"view_signatures": _as_rows(self.view_signatures, SIGNATURE_BYTES)})

    @classmethod
    def from_wire(cls, header: Any, arrays: Any) -> ConsistencyRequest:
        round_id, session = cls._open(header, arrays)
        alive = _ids(header, "alive")
        return cls(round_id, session, _int(header, "recipient", 0, MAX_PARTIES - 1), alive,
                   _ids(header, "dropped"), _rows(arrays, "view_signatures", len(alive), SIGNATURE_BYTES))


@dataclass(frozen=True)
class ConsistencySignature(_Message):
    """Party -> owner: its Ed25519 signature over ("consistency", session, round, the alive list it got)."""

    TYPE: ClassVar[str] = "consistency_signature"
    FIELDS: ClassVar[tuple[str, ...]] = ("sender",)
    ARRAYS: ClassVar[tuple[str, ...]] = ("signature",)

    round_id: int
    session: str
    sender: int
    signature: bytes = field(repr=False)

    def to_wire(self) -> tuple[dict, dict[str, np.ndarray]]:
        return self._header(sender=self.sender), {"signature": _as_blob(self.signature)}

    @classmethod
    def from_wire(cls, header: Any, arrays: Any) -> ConsistencySignature:
        round_id, session = cls._open(header, arrays)
        return cls(round_id, session, _int(header, "sender", 0, MAX_PARTIES - 1),
                   _blob(arrays, "signature", SIGNATURE_BYTES))


@dataclass(frozen=True)
class UnmaskRequest(_Message):
    """Owner -> signer: the consistency signatures it collected, all over the alive list the signer got."""

    TYPE: ClassVar[str] = "unmask_request"
    FIELDS: ClassVar[tuple[str, ...]] = ("recipient", "signers")
    ARRAYS: ClassVar[tuple[str, ...]] = ("signatures",)

    round_id: int
    session: str
    recipient: int
    signers: list[int]
    signatures: list[bytes] = field(repr=False)

    def to_wire(self) -> tuple[dict, dict[str, np.ndarray]]:
        return (self._header(recipient=self.recipient, signers=list(self.signers)),
                {"signatures": _as_rows(self.signatures, SIGNATURE_BYTES)})

    @classmethod
    def from_wire(cls, header: Any, arrays: Any) -> UnmaskRequest:
        round_id, session = cls._open(header, arrays)
        signers = _ids(header, "signers")
        return cls(round_id, session, _int(header, "recipient", 0, MAX_PARTIES - 1), signers,
                   _rows(arrays, "signatures", len(signers), SIGNATURE_BYTES))


@dataclass(frozen=True)
class UnmaskShares(_Message):
    """Party -> owner: seed shares of alive peers and mask-key shares of dropped ones (never both)."""

    TYPE: ClassVar[str] = "unmask_shares"
    FIELDS: ClassVar[tuple[str, ...]] = ("sender", "seed_owners", "key_owners")
    ARRAYS: ClassVar[tuple[str, ...]] = ("seed_shares", "key_shares")

    round_id: int
    session: str
    sender: int
    seed_owners: list[int]
    key_owners: list[int]
    seed_shares: list[bytes] = field(repr=False)
    key_shares: list[bytes] = field(repr=False)

    def to_wire(self) -> tuple[dict, dict[str, np.ndarray]]:
        header = self._header(sender=self.sender, seed_owners=list(self.seed_owners),
                              key_owners=list(self.key_owners))
        return header, {"seed_shares": _as_rows(self.seed_shares, SHARE_BYTES),
                        "key_shares": _as_rows(self.key_shares, SHARE_BYTES)}

    @classmethod
    def from_wire(cls, header: Any, arrays: Any) -> UnmaskShares:
        round_id, session = cls._open(header, arrays)
        seed_owners, key_owners = _ids(header, "seed_owners"), _ids(header, "key_owners")
        if set(seed_owners) & set(key_owners):
            raise SecAggError("an unmask reply reveals both the seed and the mask key of the same party")
        return cls(round_id, session, _int(header, "sender", 0, MAX_PARTIES - 1), seed_owners, key_owners,
                   _rows(arrays, "seed_shares", len(seed_owners), SHARE_BYTES),
                   _rows(arrays, "key_shares", len(key_owners), SHARE_BYTES))


MESSAGE_TYPES: dict[str, type] = {
    cls.TYPE: cls for cls in (AdvertiseKeys, Roster, ShareKeys, RelayedShares, MaskedInput, InputAck,
                              ConsistencyRequest, ConsistencySignature, UnmaskRequest, UnmaskShares)
}


def message_from_wire(header: Any, arrays: Any) -> Any:
    """Decode any secure-aggregation message by its "type" field (for a transport that multiplexes them)."""
    kind = header.get("type") if isinstance(header, dict) else None
    if kind not in MESSAGE_TYPES:
        raise SecAggError(f"unknown secure-aggregation message type {kind!r}")
    return MESSAGE_TYPES[kind].from_wire(header, arrays)
