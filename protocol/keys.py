"""CurveZMQ key files, in the format `zmq.auth.create_certificates` writes.

`NAME.key` holds the public key (shared: the owner's goes to every party, each party's goes into the
owner's allowlist directory); `NAME.key_secret` holds both keys and never leaves its machine.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import zmq.auth
from zmq.utils import z85

from errors import ConfigError
from protocol.messages import NAME_PATTERN


def generate_keypair(out_dir: str | os.PathLike[str], name: str, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write OUT_DIR/NAME.key and OUT_DIR/NAME.key_secret (mode 0600); returns (public_file, secret_file).
    Refuses to replace an existing key unless `overwrite`."""
    if re.fullmatch(NAME_PATTERN, name) is None:
        raise ConfigError(f"key name {name!r} must be 1-64 letters, digits, '.', '_' or '-' (no leading symbol)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    public_file, secret_file = out / f"{name}.key", out / f"{name}.key_secret"
    if not overwrite and (public_file.exists() or secret_file.exists()):
        raise ConfigError(f"key {name!r} already exists in {out}; refusing to overwrite it")
    public, secret = zmq.auth.create_certificates(str(out), name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def write_public_key(out_dir: str | os.PathLike[str], name: str, public: bytes) -> Path:
    """Write OUT_DIR/NAME.key holding the z85 public key `public` (an allowlist entry made from elsewhere)."""
    if re.fullmatch(NAME_PATTERN, name) is None:
        raise ConfigError(f"key name {name!r} must be 1-64 letters, digits, '.', '_' or '-' (no leading symbol)")
    path = Path(out_dir) / f"{name}.key"
    path.write_text(f"#   public key of {name}\nmetadata\ncurve\n    public-key = \"{public.decode()}\"\n")
    _check_z85(load_public(path), path, "public")
    return path


def load_secret(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys from a NAME.key_secret file."""
    public, secret = _load(path)
    if secret is None:
        raise ConfigError(f"{path} holds no secret key (pass the .key_secret file, not the .key file)")
    _check_z85(secret, path, "secret")
    return public, secret


def load_public(path: str | os.PathLike[str]) -> bytes:
    """The z85 public key from a NAME.key (or NAME.key_secret) file."""
    return _load(path)[0]


def load_pinned(path: str | os.PathLike[str], flag: str) -> bytes:
    """A peer's public key given as `flag`; its secret key file is refused: that one never leaves its machine."""
    public, secret = _load(path)
    if secret is not None:
        public_file = Path(path).name.removesuffix("_secret")
        raise ConfigError(f"{flag} {path} is a secret key file: pass the public one ({public_file}); the secret "
                          "key must stay on the machine it belongs to (make a new pair if it was copied)")
    return public


def load_allowlist(directory: str | os.PathLike[str]) -> dict[str, bytes]:
    """{name: public key} for every NAME.key file in `directory` (the parties allowed to join)."""
    folder = Path(directory)
    if not folder.is_dir():
        raise ConfigError(f"allowlist directory {folder} does not exist")
    keys: dict[str, bytes] = {}
    for path in sorted(folder.glob("*.key")):
        keys[path.stem] = load_public(path)
    if not keys:
        raise ConfigError(f"allowlist directory {folder} holds no *.key files: no party could join")
    seen: dict[bytes, str] = {}
    for name, key in keys.items():
        if key in seen:
            raise ConfigError(f"{name}.key and {seen[key]}.key in {folder} hold the same public key")
        seen[key] = name
    return keys


def _load(path: str | os.PathLike[str]) -> tuple[bytes, bytes | None]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"key file {file} does not exist")
    try:
        public, secret = zmq.auth.load_certificate(file)
    except (OSError, ValueError, IndexError) as exc:
        raise ConfigError(f"key file {file} is not a CurveZMQ certificate: {exc}") from None
    _check_z85(public, file, "public")
    return public, secret


def _check_z85(key: bytes, path: str | os.PathLike[str], what: str) -> None:
    try:
        ok = len(key) == 40 and len(z85.decode(key)) == 32
    except Exception:  # z85.decode raises ValueError, KeyError or struct.error on junk
        ok = False
    if not ok:
        raise ConfigError(f"key file {path} holds a malformed {what} key")
