"""Long-term identities of a consortium's members, and the roster each member pins.

Every institution holds an Ed25519 identity key: `NAME.id_secret` never leaves it, `NAME.id` is public. A
consortium roster (a JSON file) lists each member's name, CurveZMQ public key (what the owner allowlists) and
identity key. It is made from the members' public files outside the owner (`party roster`), and each party
pins its own copy. In a secure round every party signs its per-round keys with its identity key; every peer
checks those signatures against its own roster, so the owner can neither invent members nor swap a member's
keys, and a round member whose name is not on a party's roster counts, for that party, as a colluder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from errors import ConfigError
from secure_agg import crypto
from secure_agg.messages import NAME_PATTERN

ROSTER_FORMAT = "fedbiot-roster/1"
IDENTITY_FORMAT = "fedbiot-identity/1"


def check_name(name: object) -> str:
    if not isinstance(name, str) or re.fullmatch(NAME_PATTERN, name) is None:
        raise ConfigError(f"member name {name!r} must be 1-64 letters, digits, '.', '_' or '-' (no leading "
                          "symbol)")
    return name


def _hex_key(value: object, what: str) -> bytes:
    try:
        key = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        key = b""
    if len(key) != crypto.KEY_BYTES:
        raise ConfigError(f"{what} must be {crypto.KEY_BYTES} bytes in hex")
    return key


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what} {path} is unreadable: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a JSON object")
    return data


# ------------------------------------------------------------------------------------------ identity keys


def generate_identity(out_dir: str | os.PathLike[str], name: str, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write OUT/NAME.id (public) and OUT/NAME.id_secret (mode 0600); returns (public_file, secret_file)."""
    check_name(name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    public_file, secret_file = out / f"{name}.id", out / f"{name}.id_secret"
    if not overwrite and (public_file.exists() or secret_file.exists()):
        raise ConfigError(f"identity {name!r} already exists in {out}; refusing to overwrite it")
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes_raw()
    fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"format": IDENTITY_FORMAT, "name": name, "secret": key.private_bytes_raw().hex()}, f)
    public_file.write_text(json.dumps({"format": IDENTITY_FORMAT, "name": name, "identity": public.hex()}) + "\n")
    return public_file, secret_file


@dataclass(frozen=True)
class Identity:
    """A member's own name and identity key: what signs its per-round keys."""

    name: str
    key: Ed25519PrivateKey

    @property
    def public(self) -> bytes:
        return self.key.public_key().public_bytes_raw()

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        data = _read_json(Path(path), "identity key file")
        if data.get("format") != IDENTITY_FORMAT or "secret" not in data:
            raise ConfigError(f"{path} is not an identity secret key ({IDENTITY_FORMAT}); pass NAME.id_secret")
        secret = _hex_key(data["secret"], f"the secret key in {path}")
        return cls(check_name(data.get("name")), Ed25519PrivateKey.from_private_bytes(secret))


def load_identity_public(path: str | os.PathLike[str]) -> tuple[str, bytes]:
    """(name, identity public key) from a NAME.id file."""
    data = _read_json(Path(path), "identity file")
    if data.get("format") != IDENTITY_FORMAT or "identity" not in data:
        raise ConfigError(f"{path} is not a public identity file ({IDENTITY_FORMAT})")
    return check_name(data.get("name")), _hex_key(data["identity"], f"the identity key in {path}")


# ------------------------------------------------------------------------------------------ the roster


@dataclass(frozen=True)
class Member:
    name: str
    curve_key: str  # the CurveZMQ public key, z85 (40 characters): the owner's allowlist entry
    identity: bytes  # the Ed25519 public key that signs the member's per-round keys


@dataclass(frozen=True)
class ConsortiumRoster:
    """The consortium's members, as one party pins them."""

    members: tuple[Member, ...]

    def __post_init__(self) -> None:
        names = [m.name for m in self.members]
        for what, values in (("name", names), ("CurveZMQ key", [m.curve_key for m in self.members]),
                             ("identity key", [m.identity for m in self.members])):
            if len(set(values)) != len(values):
                raise ConfigError(f"the roster lists a {what} twice")
        if not self.members:
            raise ConfigError("the roster has no members")

    def identity_of(self, name: str) -> bytes | None:
        return next((m.identity for m in self.members if m.name == name), None)

    def allowlist(self) -> dict[str, bytes]:
        """{name: CurveZMQ public key}: the owner's allowlist made from the same file."""
        return {m.name: m.curve_key.encode() for m in self.members}

    def to_dict(self) -> dict:
        return {"format": ROSTER_FORMAT,
                "members": [{"name": m.name, "curve_key": m.curve_key, "identity": m.identity.hex()}
                            for m in sorted(self.members, key=lambda m: m.name)]}

    def fingerprint(self) -> str:
        """SHA-256 of the canonical roster: members compare it out of band to know they pin the same file."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, data: Mapping, source: str = "roster") -> ConsortiumRoster:
        if data.get("format") != ROSTER_FORMAT or not isinstance(data.get("members"), list):
            raise ConfigError(f"{source} is not a consortium roster ({ROSTER_FORMAT})")
        members = []
        for i, entry in enumerate(data["members"]):
            if not isinstance(entry, dict) or set(entry) != {"name", "curve_key", "identity"}:
                raise ConfigError(f"{source}: member {i} must have exactly name, curve_key and identity")
            curve = entry["curve_key"]
            if not isinstance(curve, str) or len(curve) != 40:
                raise ConfigError(f"{source}: member {entry.get('name')!r} has a malformed curve_key")
            members.append(Member(check_name(entry["name"]), curve,
                                  _hex_key(entry["identity"], f"{source}: the identity of {entry['name']!r}")))
        return cls(tuple(members))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ConsortiumRoster:
        return cls.from_dict(_read_json(Path(path), "roster file"), str(path))

    @classmethod
    def from_public_files(cls, directories: Iterable[str | os.PathLike[str]]) -> ConsortiumRoster:
        """A roster of every member whose NAME.key and NAME.id both lie in these directories."""
        from protocol.keys import load_public  # noqa: PLC0415 - the CurveZMQ file format lives there

        members = []
        for folder in map(Path, directories):
            if not folder.is_dir():
                raise ConfigError(f"{folder} is not a directory of members' public keys")
            for id_file in sorted(folder.glob("*.id")):
                name, identity = load_identity_public(id_file)
                curve_file = folder / f"{name}.key"
                if id_file.stem != name or not curve_file.is_file():
                    raise ConfigError(f"{id_file}: expected {name}.id beside {name}.key (the member's CurveZMQ "
                                      "public key)")
                members.append(Member(name, load_public(curve_file).decode(), identity))
        if not members:
            raise ConfigError("no member found: each needs NAME.key and NAME.id (written by `party keygen`)")
        return cls(tuple(members))


# ------------------------------------------------------------------------------------------ signed keys


def advert_message(session: str, round_id: int, party_id: int, name: str, keys: bytes) -> bytes:
    """What a member signs with its identity key: its per-round public keys and commitments (`keys`),
    bound to the session, round, its id in the round and its name."""
    encoded = name.encode()
    return crypto.context(b"identity", session, round_id, party_id) + bytes([len(encoded)]) + encoded + keys


def sign_advert(identity: Identity, session: str, round_id: int, party_id: int, keys: bytes) -> bytes:
    return identity.key.sign(advert_message(session, round_id, party_id, identity.name, keys))
