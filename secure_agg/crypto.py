"""The cryptographic primitives, all from `cryptography`: X25519, Ed25519, HKDF-SHA256, AES-256-CTR, AES-256-GCM.

Every derived key binds a purpose, the session id, the round id and the party ids, so a key (and what it
encrypts or masks) from one round, session or pair is useless in another.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Sequence

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from secure_agg.errors import SecAggError

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
SIGNATURE_BYTES = 64
_PREFIX = b"fedbiot-secagg/1/"


def context(purpose: bytes, session: str, round_id: int, *ids: int) -> bytes:
    """Unambiguous encoding of (purpose, session, round, ids): the HKDF info and the AEAD associated data."""
    s = session.encode()
    return (_PREFIX + purpose + b"\0" + len(s).to_bytes(2, "big") + s + round_id.to_bytes(8, "big")
            + b"".join(i.to_bytes(4, "big") for i in ids))


def hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def new_key_pair() -> tuple[X25519PrivateKey, bytes]:
    key = X25519PrivateKey.generate()
    return key, key.public_key().public_bytes_raw()


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes_raw()


def public_of(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def new_signing_key() -> tuple[Ed25519PrivateKey, bytes]:
    """A fresh per-round Ed25519 key pair: signs only this round's consistency message."""
    key = Ed25519PrivateKey.generate()
    return key, key.public_key().public_bytes_raw()


def consistency_message(session: str, round_id: int, alive: list[int], transcript: bytes) -> bytes:
    """What a party signs in the consistency check: the exact sorted alive set U3 of this round, and the
    round's transcript (members, keys, graph), so every revealing party holds the same view."""
    return context(b"consistency", session, round_id, *sorted(alive)) + transcript


def view_message(session: str, round_id: int, party: int, transcript: bytes) -> bytes:
    """What a party signs with its masked input: the view (members, keys, sharers, graph) it masked under."""
    return context(b"view", session, round_id, party) + transcript


def transcript_digest(session: str, round_id: int, numbers: Sequence[int], members: Sequence[int],
                      member_keys: Sequence[bytes], sharers: Sequence[int], coins: Sequence[bytes],
                      binding: bytes = b"") -> bytes:
    """SHA-256 over everything a round's view consists of: the round parameters, the members and their
    advertisements (keys, commitments and name, concatenated per member), the sharers and their coins, and the
    round's binding: a digest of what the parties trained on (`learning.round_binding`), so parties that were
    sent different settings or state hold different transcripts and refuse each other's signatures."""
    h = hashlib.sha256(context(b"transcript", session, round_id, *numbers))
    h.update(len(binding).to_bytes(4, "big") + binding)
    h.update(len(members).to_bytes(4, "big") + b"".join(m.to_bytes(4, "big") for m in members))
    for keys in member_keys:
        h.update(keys)
    h.update(len(sharers).to_bytes(4, "big") + b"".join(m.to_bytes(4, "big") for m in sharers))
    for coin in coins:
        h.update(coin)
    return h.digest()


def coin_commitment(coin: bytes, session: str, round_id: int, owner: int) -> bytes:
    """Binds a party to its graph coin before the members are fixed (the coin is 256 random bits: hiding)."""
    return hashlib.sha256(context(b"coin-commit", session, round_id, owner) + coin).digest()


def share_commitment(share: bytes, kind: bytes, session: str, round_id: int, dealer: int, holder: int) -> bytes:
    """A dealer's commitment to one Shamir share (kind b"seed" or b"key"), checked against the revealed share."""
    return hashlib.sha256(context(b"share-commit-" + kind, session, round_id, dealer, holder) + share).digest()


def sign(key: Ed25519PrivateKey, message: bytes) -> bytes:
    return key.sign(message)


def verify(public: bytes, signature: bytes, message: bytes) -> bool:
    """True iff `signature` is a valid Ed25519 signature of `message` under `public` (malformed: False)."""
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def agree(private: X25519PrivateKey, peer_public: bytes, peer: int) -> bytes:
    """X25519 shared secret; a low-order or malformed peer key is refused rather than yielding zeros."""
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise SecAggError(f"party {peer}'s public key is invalid ({exc})") from exc


def pair_mask_key(shared: bytes, session: str, round_id: int, u: int, v: int) -> bytes:
    return hkdf(shared, context(b"pair-mask", session, round_id, min(u, v), max(u, v)))


def self_mask_key(seed: bytes, session: str, round_id: int, owner: int) -> bytes:
    return hkdf(seed, context(b"self-mask", session, round_id, owner))


def share_key(shared: bytes, session: str, round_id: int, sender: int, receiver: int) -> bytes:
    """One key per direction: the (sender, receiver) order is part of the derivation."""
    return hkdf(shared, context(b"share", session, round_id, sender, receiver))


def seed_commitment(seed: bytes, session: str, round_id: int, owner: int) -> bytes:
    """Hash the owner checks a rebuilt self-mask seed against (the seed is 256 random bits: hiding)."""
    return hashlib.sha256(context(b"seed-commit", session, round_id, owner) + seed).digest()


@functools.lru_cache(maxsize=2)
def _zeros(n_bytes: int) -> bytes:
    return bytes(n_bytes)


def prg_words(key: bytes, n_words: int) -> np.ndarray:
    """`n_words` pseudo-random uint64 words: the AES-256-CTR keystream of `key` (each key used once)."""
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    stream = encryptor.update(_zeros(8 * n_words))
    return np.frombuffer(stream, dtype="<u8")


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, blob: bytes, associated: bytes, what: str) -> bytes:
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated)
    except InvalidTag as exc:
        raise SecAggError(f"{what} failed authentication: tampered, replayed from another round or session, "
                          "or relayed to the wrong party") from exc
