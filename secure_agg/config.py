"""Round parameters both sides derive on their own, so a party can check what the owner tells it.

The threshold, the ring size and the neighbour degree follow from the config and the number of parties
alone; a party recomputes them and refuses a roster that disagrees (an owner cannot lower the threshold).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from errors import ConfigError
from secure_agg.errors import SecAggError

MAX_PARTIES = 1 << 16
MIN_RING_BITS = 16


@dataclass(frozen=True)
class SecAggConfig:
    """Everything both sides must agree on before a round starts.

    clip: every input element is clipped to [-clip, clip] before encoding.
    frac_bits: fixed-point fractional bits; the encoded value of n_m * x is round(n_m * x * 2**frac_bits),
        rounded stochastically (unbiased), so the mean's error is at most 2**-frac_bits / mean weight.
    max_weight: public upper bound on a party's weight n_m (its data size); with the party count it sets the
        ring size so that the masked sum cannot overflow. Weights stay hidden inside the masked sum.
    threshold: None = strict majority (n // 2 + 1); a float f in (0.5, 1] = ceil(f * n), at least a strict
        majority; an int = that absolute number, which must be a strict majority. A strict majority is what
        makes a lying owner harmless: each party signs one alive list and reveals only once a strict
        majority signed that same list, so the owner cannot gather t shares of a seed from parties told
        "alive" and t of a key from parties told "dropped".
    graph: "complete" (every pair masks) or "sparse" (SecAgg+: a random Harary graph of even degree).
    degree: sparse degree; None = 2 * ceil(log2 n). Odd values are rounded up to even; a degree of n - 1 or
        more is the complete graph.
    rounding_seed: seeds the stochastic rounding (with round and party id), so runs are reproducible; the
        masks themselves always come from the operating system's CSPRNG.
    """

    clip: float = 1.0
    frac_bits: int = 16
    max_weight: int = 1 << 16
    threshold: int | float | None = None
    graph: str = "complete"
    degree: int | None = None
    rounding_seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.clip, int | float) and math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"secure aggregation clip must be a positive number, got {self.clip!r}")
        if not isinstance(self.frac_bits, int) or not 0 <= self.frac_bits <= 40:
            raise ConfigError(f"secure aggregation frac_bits must be an int in [0, 40], "
                              f"got {self.frac_bits!r}")
        if not isinstance(self.max_weight, int) or not 1 <= self.max_weight < (1 << 40):
            raise ConfigError(f"secure aggregation max_weight must be an int in [1, 2^40), "
                              f"got {self.max_weight!r}")
        if self.graph not in ("complete", "sparse"):
            raise ConfigError(f"secure aggregation graph must be 'complete' or 'sparse', not {self.graph!r}")
        if self.degree is not None and (not isinstance(self.degree, int) or self.degree < 2):
            raise ConfigError(f"secure aggregation degree must be an int >= 2, got {self.degree!r}")
        t = self.threshold
        if isinstance(t, bool) or not (t is None or isinstance(t, int | float)):
            raise ConfigError(f"secure aggregation threshold must be None, an int or a float, got {t!r}")
        if isinstance(t, float) and not 0.5 < t <= 1.0:
            raise ConfigError(f"a fractional threshold must be in (0.5, 1], got {t}")
        if isinstance(t, int) and t < 2:
            raise ConfigError(f"an absolute threshold must be at least 2, got {t}")
        if not isinstance(self.rounding_seed, int) or self.rounding_seed < 0:
            raise ConfigError(f"rounding_seed must be a non-negative int, got {self.rounding_seed!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SecAggConfig:
        """Inverse of to_dict (e.g. a config the owner announces); unknown keys are refused."""
        if not isinstance(data, dict):
            raise ConfigError(f"a secure aggregation config must be a dict, got {type(data).__name__}")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown secure aggregation options {sorted(unknown)}")
        return cls(**data)

    def threshold_for(self, holders: int, *, absolute: bool = True) -> int:
        """Shares needed out of `holders`; absolute=False ignores an absolute t (for neighbourhoods)."""
        majority = holders // 2 + 1
        t = self.threshold
        if t is None or (isinstance(t, int) and not absolute):
            return majority
        if isinstance(t, float):
            return max(majority, math.ceil(t * holders - 1e-9))
        if t > holders:
            raise SecAggError(f"threshold {t} exceeds the {holders} parties of the round")
        if 2 * t <= holders:
            raise SecAggError(f"threshold {t} of {holders} is not a strict majority; unmasking would not be "
                              "safe against an owner that lies about dropouts")
        return t


@dataclass(frozen=True)
class RoundParams:
    """What a round with n invited parties uses: derived, never negotiated."""

    n_parties: int
    min_survivors: int  # fewer parties than this at any stage aborts the round
    ring_bits: int  # modulus 2**ring_bits, a multiple of 8 so values pack into whole bytes
    level_bound: int  # max |encoded element| of one party

    @property
    def ring_bytes(self) -> int:
        return self.ring_bits // 8


def round_params(config: SecAggConfig, n_parties: int) -> RoundParams:
    """Threshold and ring size for `n_parties`; raises SecAggError when the sum could overflow 64 bits."""
    if not isinstance(n_parties, int) or not 2 <= n_parties <= MAX_PARTIES:
        raise SecAggError(f"secure aggregation needs between 2 and {MAX_PARTIES} parties, got {n_parties}: "
                          "with one party the sum is that party's update")
    min_survivors = config.threshold_for(n_parties)
    # One party's encoded element: stochastic rounding of at most max_weight * clip * 2^f, or the weight.
    level = max(math.floor(config.max_weight * config.clip * 2.0 ** config.frac_bits) + 1, config.max_weight)
    sum_bound = n_parties * level  # |sum| over every party that could take part
    bits = sum_bound.bit_length() + 1  # + sign: the sum lives in [-2^(bits-1), 2^(bits-1))
    ring_bits = max(MIN_RING_BITS, 8 * math.ceil(bits / 8))
    if ring_bits > 64:
        raise SecAggError(f"the masked sum of {n_parties} parties could overflow a 64-bit ring "
                          f"(max_weight {config.max_weight} x clip {config.clip} x 2^{config.frac_bits} per "
                          "element): lower frac_bits, clip or max_weight")
    return RoundParams(n_parties, min_survivors, ring_bits, level)


def sparse_degree(config: SecAggConfig, n_members: int) -> int:
    """Neighbour count in the graph over `n_members` parties (n_members - 1 means complete)."""
    if config.graph == "complete" or n_members <= 2:
        return n_members - 1
    k = config.degree if config.degree is not None else 2 * math.ceil(math.log2(n_members))
    k += k % 2
    return min(k, n_members - 1)


def share_threshold(config: SecAggConfig, params: RoundParams, n_members: int, degree: int) -> int:
    """Shares needed to rebuild a party's secrets: the round threshold on the complete graph, a strict
    majority (or the fractional threshold) of the degree + 1 holders on a sparse one."""
    if degree >= n_members - 1:
        return params.min_survivors
    return config.threshold_for(degree + 1, absolute=False)
