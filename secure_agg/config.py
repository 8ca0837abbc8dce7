"""Round parameters both sides derive on their own, so a party can check what the owner tells it.

The collusion bound, the thresholds, the ring size and the neighbour degree follow from the config and the
number of invited parties alone; a party recomputes them, refuses a roster that disagrees (an owner cannot
lower a threshold) and also holds them against its own floors (`PartyPolicy`), which the owner does not set.
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

    clip: every input element is clipped to [-clip, clip] before encoding (the round reports how many were).
    frac_bits: fixed-point fractional bits; the encoded value of n_m * x is round(n_m * x * 2**frac_bits),
        rounded stochastically (unbiased), so the mean's error is at most 2**-frac_bits / mean weight.
    max_weight: public upper bound on a party's weight n_m (its data size); with the party count it sets the
        ring size so that the masked sum cannot overflow. Weights stay hidden inside the masked sum.
    collusion: c, how many parties may collude with the owner. None = max(1, (n - 1) // 3) on the complete
        graph; on the sparse graph also at most degree / 2 - 1, but never below the parties' default floor
        (`default_collusion_floor`: 1, or 5% of n). An int is taken as is. The sparse degree is at least
        2c + 2; the thresholds follow from c.
    threshold: t, the consistency signatures and the Shamir shares a round needs. None = the least t with
        t > (n + c) / 2; a float f in (0.5, 1] = ceil(f * n), never below that; an int = that number,
        which must exceed (n + c) / 2. With t > (n + c) / 2 two different alive lists can never both gather
        t signatures, even when the c colluders sign both, and the owner plus its colluders hold at most c < t
        shares of any secret the honest parties keep back.
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
    collusion: int | None = None

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
        c = self.collusion
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 0):
            raise ConfigError(f"secure aggregation collusion must be None or an int >= 0, got {c!r}")
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

    def threshold_for(self, n: int, collusion: int = 0) -> int:
        """Signatures and shares needed out of `n` parties when up to `collusion` collude with the owner."""
        least = (n + collusion) // 2 + 1
        t = self.threshold
        if t is None:
            return least
        if isinstance(t, float):
            return max(least, math.ceil(t * n - 1e-9))
        if t > n:
            raise SecAggError(f"threshold {t} exceeds the {n} parties of the round")
        if t < least:
            raise SecAggError(f"threshold {t} of {n} does not exceed (n + c) / 2 with collusion bound c = "
                              f"{collusion}; unmasking would not be safe against an owner that lies about "
                              "dropouts with colluding parties' help")
        return t


@dataclass(frozen=True)
class RoundParams:
    """What a round with n invited parties uses: derived, never negotiated."""

    n_parties: int
    min_survivors: int  # t: fewer parties than this at any stage aborts the round; also the Shamir threshold
    ring_bits: int  # modulus 2**ring_bits, a multiple of 8 so values pack into whole bytes
    level_bound: int  # max |encoded element| of one party
    collusion: int = 0  # c: parties that may collude with the owner
    degree: int = 1  # neighbours in the masking graph; n_parties - 1 or more = complete

    @property
    def ring_bytes(self) -> int:
        return self.ring_bits // 8

    @property
    def min_honest(self) -> int:
        """The fewest honest inputs in any sum the owner can learn: t signers, at most c of them colluding."""
        return self.min_survivors - self.collusion


def _nominal_degree(config: SecAggConfig, n_parties: int) -> int:
    k = config.degree if config.degree is not None else 2 * math.ceil(math.log2(n_parties))
    return k + k % 2


def default_collusion_floor(n_parties: int) -> int:
    """The collusion bound a party demands unless told otherwise: one colluder, or 5% of the invited parties
    when that is more. It is also the least the owner's default config offers."""
    return max(1, math.ceil(n_parties / 20))


def collusion_bound(config: SecAggConfig, n_parties: int) -> int:
    """c for a round of `n_parties`: the config's value, or (n - 1) // 3 (at least one); on the sparse graph
    capped by its degree, but never below the parties' default floor (the degree then grows to 2c + 2)."""
    if config.collusion is not None:
        return config.collusion
    c = max(1, (n_parties - 1) // 3)
    if config.graph == "sparse":
        k = _nominal_degree(config, n_parties)
        if k < n_parties - 1:
            c = min(c, max(default_collusion_floor(n_parties), k // 2 - 1))
    return c


def sparse_degree(config: SecAggConfig, n_parties: int) -> int:
    """Neighbour count of the masking graph of a round of `n_parties` (n_parties - 1: complete).

    On the sparse graph at least 2c + 2, so that c colluders plus a few dropouts cannot cut it."""
    if config.graph == "complete" or n_parties <= 2:
        return n_parties - 1
    k = max(_nominal_degree(config, n_parties), 2 * collusion_bound(config, n_parties) + 2)
    return min(k, n_parties - 1)


def round_params(config: SecAggConfig, n_parties: int) -> RoundParams:
    """Collusion bound, threshold, degree and ring size for `n_parties`; raises SecAggError when the round
    cannot be safe (c too large for n) or the sum could overflow 64 bits."""
    if not isinstance(n_parties, int) or not 2 <= n_parties <= MAX_PARTIES:
        raise SecAggError(f"secure aggregation needs between 2 and {MAX_PARTIES} parties, got {n_parties}: "
                          "with one party the sum is that party's update")
    c = collusion_bound(config, n_parties)
    if c > n_parties - 2:
        raise SecAggError(f"a collusion bound of {c} leaves fewer than 2 honest parties among {n_parties}: "
                          "the sum would be one honest party's update")
    min_survivors = config.threshold_for(n_parties, c)
    # One party's encoded element: stochastic rounding of at most max_weight * clip * 2^f, or the weight.
    level = max(math.floor(config.max_weight * config.clip * 2.0 ** config.frac_bits) + 1, config.max_weight)
    sum_bound = n_parties * level  # |sum| over every party that could take part
    bits = sum_bound.bit_length() + 1  # + sign: the sum lives in [-2^(bits-1), 2^(bits-1))
    ring_bits = max(MIN_RING_BITS, 8 * math.ceil(bits / 8))
    if ring_bits > 64:
        raise SecAggError(f"the masked sum of {n_parties} parties could overflow a 64-bit ring "
                          f"(max_weight {config.max_weight} x clip {config.clip} x 2^{config.frac_bits} per "
                          "element): lower frac_bits, clip or max_weight")
    return RoundParams(n_parties, min_survivors, ring_bits, level, c, sparse_degree(config, n_parties))


@dataclass(frozen=True)
class PartyPolicy:
    """A party's own floors, set on the party's side (never by the owner): it refuses a round below them.

    min_collusion: the least collusion bound c it accepts. None = `default_collusion_floor(n)`: one colluder,
        or 5% of the invited parties when that is more. With c >= 1 a round needs at least three parties
        (t > (n + c) / 2 and t - c >= 2), so two parties can never unmask a sum of one honest input.
    min_degree: the least sparse-graph degree (capped at the complete graph's n - 1).
    min_honest: the fewest honest inputs, t - c, in any sum the owner may learn.
    """

    min_collusion: int | None = None
    min_degree: int = 4
    min_honest: int = 2

    def __post_init__(self) -> None:
        for name in ("min_degree", "min_honest"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"party policy {name} must be a positive int, got {value!r}")
        c = self.min_collusion
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 0):
            raise ConfigError(f"party policy min_collusion must be None or an int >= 0, got {c!r}")

    def collusion_floor(self, n_parties: int) -> int:
        if self.min_collusion is not None:
            return self.min_collusion
        return default_collusion_floor(n_parties)

    def check(self, params: RoundParams, party: int) -> None:
        """Refuse round parameters weaker than this party's floors."""
        floor = self.collusion_floor(params.n_parties)
        if params.collusion < floor:
            raise SecAggError(f"party {party}: the round's collusion bound {params.collusion} is below this "
                              f"party's floor {floor}")
        degree_floor = min(self.min_degree, params.n_parties - 1)
        if params.degree < degree_floor:
            raise SecAggError(f"party {party}: the round's graph degree {params.degree} is below this party's "
                              f"floor {degree_floor}")
        if params.min_honest < self.min_honest:
            raise SecAggError(f"party {party}: a sum could hold only {params.min_honest} honest inputs "
                              f"(threshold {params.min_survivors} - collusion {params.collusion}), below this "
                              f"party's floor {self.min_honest}")
