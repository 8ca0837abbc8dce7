"""t-of-n Shamir sharing of 32-byte secrets over the prime field GF(2^256 + 297).

2^256 + 297 is the smallest prime above 2^256, so any 32-byte string is a field element and a share is a
fixed 33 bytes. Holder `i` gets the polynomial's value at x = i + 1 (never 0, where the secret sits).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

PRIME = (1 << 256) + 297
SECRET_BYTES = 32
SHARE_BYTES = 33


def split(secret: bytes, holders: Sequence[int], threshold: int) -> dict[int, bytes]:
    """Shares of `secret` for each holder id; any `threshold` of them rebuild it, fewer reveal nothing."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secrets are {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(holders):
        raise ValueError(f"threshold {threshold} out of range for {len(holders)} holders")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out = {}
    for holder in holders:
        x = holder + 1
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % PRIME
        out[holder] = y.to_bytes(SHARE_BYTES, "big")
    return out


def lagrange_at_zero(holders: Sequence[int]) -> list[int]:
    """Coefficients c_i with secret = sum c_i * share_i for shares held by `holders` (distinct ids)."""
    xs = [h + 1 for h in holders]
    coeffs = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        coeffs.append(num * pow(den, -1, PRIME) % PRIME)
    return coeffs


def combine(shares: Mapping[int, bytes], coeffs: Sequence[int] | None = None) -> bytes:
    """Rebuild the secret from exactly `threshold` shares (holder id -> share bytes).

    Raises ValueError if a share is not a field element or the result is not a 32-byte value (which
    means a wrong or tampered share was used).
    """
    holders = list(shares)
    coeffs = lagrange_at_zero(holders) if coeffs is None else coeffs
    total = 0
    for c, h in zip(coeffs, holders, strict=True):
        y = int.from_bytes(shares[h], "big")
        if len(shares[h]) != SHARE_BYTES or y >= PRIME:
            raise ValueError(f"share from holder {h} is not a field element")
        total = (total + c * y) % PRIME
    if total >> (8 * SECRET_BYTES):
        raise ValueError("the shares do not rebuild a 32-byte secret")
    return total.to_bytes(SECRET_BYTES, "big")
