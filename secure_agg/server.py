"""The owner's side of one round: collects, relays, and unmasks only the sum.

Stages (`secure_agg.round.ROUND`): receive_advertise* -> close_advertise() -> receive_shares* ->
close_shares() -> receive_masked_input* -> close_inputs() -> receive_consistency* -> close_consistency() ->
receive_unmask* -> finish(). The caller decides when a stage closes (all answered, or a timeout); whoever has
not answered by then is treated as dropped:
- lost before sharing keys: left out (nobody masks with it);
- lost after sharing keys: its pairwise masks are removed through its Shamir-shared mask key;
- lost before signing or before the unmask reply: its input stays in the sum, its self mask is rebuilt.
Fewer than the threshold at any closing aborts the round (SecAggError) before anything is unmasked, and so
does an alive set whose graph c colluders could split (the honest parties would refuse to reveal anyway).
Every revealed share is checked against its dealer's commitment: a bad one is left out (and its holder
named in `bad_shares`); only fewer than t good shares, or a dealer whose committed shares do not rebuild
its committed secret (named in the error), abort the unmasking.
A malformed or unexpected message raises SecAggError without changing the round: the caller may treat
its sender as dropped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from secure_agg import crypto, shamir
from secure_agg.config import SecAggConfig, round_params
from secure_agg.encoding import decode, unpack
from secure_agg.errors import SecAggError
from secure_agg.graph import is_k_connected, neighbour_graph
from secure_agg.messages import (
    MAX_LENGTH,
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    InputAck,
    MaskedInput,
    RelayedShares,
    Roster,
    ShareKeys,
    UnmaskRequest,
    UnmaskShares,
    check_session,
)
from secure_agg.stages import Stage

_WHAT = {"seed": "self-mask seed", "key": "mask key"}
ABORTED, DONE = "aborted", "done"  # the owner's state after an abort and after the result


@dataclass
class ServerResult:
    """The only thing the owner learns: the weighted sum, the total weight, the clipped count, and who took
    part."""

    weighted_sum: np.ndarray  # sum over included parties of n_m * clip(x_m), float64
    total_weight: int  # sum of n_m over included parties
    included: list[int]  # parties whose input is in the sum
    dropped: list[int] = field(default_factory=list)  # shared keys, sent no input: masks removed via Shamir
    left_out: list[int] = field(default_factory=list)  # lost before sharing keys (or never advertised)
    clipped: int = 0  # input elements the included parties clipped to [-clip, clip], in total
    bad_shares: list[tuple[int, int, str]] = field(default_factory=list)  # (holder, dealer, kind) left out

    def mean(self) -> np.ndarray:
        """FedAvg: the weighted average, divided once."""
        return self.weighted_sum / self.total_weight

    @property
    def clipped_fraction(self) -> float:
        """Share of all summed elements that hit the clip bound: tune `clip` when this is far from 0."""
        return self.clipped / max(1, len(self.included) * self.weighted_sum.size)


class SecAggServer:
    """Owner state for round `round_id` of `session` with `n_parties` invited parties (ids 0..n-1) and input
    vectors of `vector_length` floats. `binding`: the digest of what the round's parties were sent to train on
    (`learning.round_binding`; b"" in process), part of the transcript their view signatures cover."""

    def __init__(self, config: SecAggConfig, n_parties: int, vector_length: int, round_id: int,
                 session: str, binding: bytes = b"") -> None:
        self.config = config
        self.params = round_params(config, n_parties)
        if (isinstance(vector_length, bool) or not isinstance(vector_length, int)
                or not 1 <= vector_length < MAX_LENGTH - 1):
            raise SecAggError(f"the vector length must be an int in [1, {MAX_LENGTH - 1}), got {vector_length!r}")
        if isinstance(round_id, bool) or not isinstance(round_id, int) or round_id < 0:
            raise SecAggError(f"the round id must be a non-negative int, got {round_id!r}")
        self.n_parties, self.length, self.round_id = n_parties, vector_length + 2, round_id
        self.session = check_session(session)
        self.binding = binding
        self.stage: Stage | str = Stage.ADVERTISE  # the stage whose messages it accepts
        self._keys: dict[int, AdvertiseKeys] = {}
        self.members: list[int] = []  # U1: advertised keys
        self.sharers: list[int] = []  # U2: shared keys
        self.alive: list[int] = []  # U3: sent a masked input
        self.signers: list[int] = []  # signed U3 in the consistency check
        self.responders: list[int] = []  # U4: answered the unmask request
        self.graph: dict[int, list[int]] = {}
        self.share_threshold = self.params.min_survivors
        self.bad_shares: list[tuple[int, int, str]] = []
        self.transcript = b""
        self._shares: dict[int, ShareKeys] = {}
        self._sum = np.zeros(self.length, dtype=np.uint64)
        self._inputs: set[int] = set()
        self._views: dict[int, bytes] = {}
        self._replies: dict[int, UnmaskShares] = {}
        self._signatures: dict[int, bytes] = {}

    # -- helpers ---------------------------------------------------------------------------------------

    def _abort(self, reason: str) -> SecAggError:
        self.stage = ABORTED
        self._sum = np.zeros(0, dtype=np.uint64)
        self._replies.clear()
        return SecAggError(f"secure aggregation round {self.round_id} aborted: {reason}; nothing was "
                           "unmasked")

    def _expect(self, stage: Stage, msg: Any, sender: int, allowed: Container[int]) -> None:
        if self.stage != stage:
            raise SecAggError(f"the owner is in stage {str(self.stage)!r}, not accepting a {msg.TYPE}")
        if msg.round_id != self.round_id or msg.session != self.session:
            raise SecAggError(f"a {msg.TYPE} for round {msg.round_id} of session {msg.session!r} arrived in "
                              f"round {self.round_id} of {self.session!r} (replay?)")
        if sender not in allowed:
            raise SecAggError(f"party {sender} may not send a {msg.TYPE} now")

    def _closing(self, stage: Stage, step: str) -> None:
        if self.stage != stage:
            raise SecAggError(f"{step} in stage {str(self.stage)!r}")

    def _need(self, count: int, what: str) -> None:
        if count < self.params.min_survivors:
            raise self._abort(f"only {count} parties {what}, below the threshold {self.params.min_survivors}")

    # -- stage 1: keys ---------------------------------------------------------------------------------

    def receive_advertise(self, msg: AdvertiseKeys) -> None:
        self._expect(Stage.ADVERTISE, msg, msg.sender, range(self.n_parties))
        if msg.sender in self._keys:
            raise SecAggError(f"party {msg.sender} advertised keys twice")
        self._keys[msg.sender] = msg

    def close_advertise(self) -> dict[int, Roster]:
        """Fix the members (U1); one roster per member, with every member's advertisement as it was sent."""
        self._closing(Stage.ADVERTISE, "close_advertise")
        members = sorted(self._keys)
        self._need(len(members), "advertised keys")
        adverts = [self._keys[m] for m in members]
        all_keys = [k for a in adverts for k in (a.c_pk, a.s_pk, a.sig_pk, a.seed_commit, a.coin_commit)]
        if len(set(all_keys)) != len(all_keys):
            raise self._abort("two parties advertised the same public key")
        self.members = members
        self.stage = Stage.SHARE_KEYS
        p = self.params
        return {u: Roster(self.round_id, self.session, u, self.n_parties, members, p.min_survivors, p.collusion,
                          p.degree, p.ring_bits, adverts)
                for u in members}

    # -- stage 2: encrypted shares ---------------------------------------------------------------------

    def receive_shares(self, msg: ShareKeys) -> None:
        self._expect(Stage.SHARE_KEYS, msg, msg.sender, self.members)
        u = msg.sender
        if u in self._shares:
            raise SecAggError(f"party {u} shared keys twice")
        others = [v for v in self.members if v != u]
        if msg.receivers != others:
            raise SecAggError(f"party {u} addressed shares to {msg.receivers}, not to the other members {others}")
        if len(msg.ciphertexts) != len(others) or {len(msg.seed_commits), len(msg.key_commits)} != {len(self.members)}:
            raise SecAggError(f"party {u} sent {len(msg.ciphertexts)} ciphertexts and {len(msg.seed_commits)} / "
                              f"{len(msg.key_commits)} share commitments for {len(self.members)} members")
        if crypto.coin_commitment(msg.coin, self.session, self.round_id, u) != self._keys[u].coin_commit:
            raise SecAggError(f"party {u}'s graph coin does not match its commitment")
        self._shares[u] = msg

    def close_shares(self) -> dict[int, RelayedShares]:
        """Fix U2 and the graph over it (from the sharers' coins); relay to each sharer the other sharers'
        ciphertexts and share commitments for it, every sharer's coin, and its neighbours' mask keys."""
        self._closing(Stage.SHARE_KEYS, "close_shares")
        sharers = sorted(self._shares)
        self._need(len(sharers), "shared keys")
        coins = {u: self._shares[u].coin for u in sharers}
        self.graph = neighbour_graph(coins, self.params.degree, self.session, self.round_id)
        self.sharers = sharers
        p = self.params
        adverts = [self._keys[m] for m in self.members]
        self.transcript = crypto.transcript_digest(
            self.session, self.round_id, (self.n_parties, p.collusion, p.min_survivors, p.degree, p.ring_bits),
            self.members, [a.transcript_entry for a in adverts], sharers, list(coins.values()), self.binding)
        self.stage = Stage.MASKED_INPUT
        index = {m: i for i, m in enumerate(self.members)}
        relays = {}
        for v in sharers:
            senders = [u for u in sharers if u != v]
            at = [index[v] - (index[v] > index[u]) for u in senders]  # v's row among u's receivers
            holder_row = [index[v] for u in senders]  # v's row among u's holders (all members)
            relays[v] = RelayedShares(
                self.round_id, self.session, v, senders, self.graph[v],
                [self._shares[u].ciphertexts[i] for u, i in zip(senders, at, strict=True)],
                [self._shares[u].seed_commits[i] for u, i in zip(senders, holder_row, strict=True)],
                [self._shares[u].key_commits[i] for u, i in zip(senders, holder_row, strict=True)],
                [coins[u] for u in sharers], [self._keys[w].s_pk for w in self.graph[v]])
        return relays

    # -- stage 3: masked inputs ------------------------------------------------------------------------

    def receive_masked_input(self, msg: MaskedInput) -> InputAck:
        """Check the sender's view signature, add the masked vector into the running sum (nothing else of it
        is kept) and acknowledge its digest."""
        self._expect(Stage.MASKED_INPUT, msg, msg.sender, self.sharers)
        if msg.sender in self._inputs:
            raise SecAggError(f"party {msg.sender} sent its masked input twice")
        if msg.length != self.length or msg.ring_bits != self.params.ring_bits:
            raise SecAggError(f"party {msg.sender} sent {msg.length} elements of {msg.ring_bits} bits, "
                              f"expected {self.length} of {self.params.ring_bits}")
        view = crypto.view_message(self.session, self.round_id, msg.sender, self.transcript)
        if not crypto.verify(self._keys[msg.sender].sig_pk, msg.view_signature, view):
            raise SecAggError(f"party {msg.sender}'s view signature is invalid: it masked under another view")
        np.add(self._sum, unpack(msg.masked, self.params.ring_bytes), out=self._sum)
        self._inputs.add(msg.sender)
        self._views[msg.sender] = msg.view_signature
        return InputAck(self.round_id, self.session, msg.sender, hashlib.sha256(msg.masked.data).digest())

    def close_inputs(self) -> dict[int, ConsistencyRequest]:
        """Fix U3; ask every alive party to sign it, unless c colluders could split the alive parties' graph."""
        self._closing(Stage.MASKED_INPUT, "close_inputs")
        self._need(len(self._inputs), "sent masked inputs")
        alive = sorted(self._inputs)
        if not is_k_connected(self.graph, alive, self.params.collusion + 1):
            raise self._abort(f"the graph of the {len(alive)} alive parties can be split by removing "
                              f"{self.params.collusion} of them, so the parties would refuse to unmask")
        self.alive = alive
        dropped = [u for u in self.sharers if u not in self._inputs]
        views = [self._views[u] for u in alive]
        self.stage = Stage.CONSISTENCY
        return {v: ConsistencyRequest(self.round_id, self.session, v, alive, dropped, views) for v in alive}

    # -- stage 4: consistency check --------------------------------------------------------------------

    def receive_consistency(self, msg: ConsistencySignature) -> None:
        """Keep a valid signature over U3; refuse a bad one here, since it would make every party refuse."""
        self._expect(Stage.CONSISTENCY, msg, msg.sender, self._inputs)
        if msg.sender in self._signatures:
            raise SecAggError(f"party {msg.sender} signed the alive list twice")
        message = crypto.consistency_message(self.session, self.round_id, self.alive, self.transcript)
        if not crypto.verify(self._keys[msg.sender].sig_pk, msg.signature, message):
            raise SecAggError(f"party {msg.sender}'s consistency signature is invalid")
        self._signatures[msg.sender] = msg.signature

    def close_consistency(self) -> dict[int, UnmaskRequest]:
        """Fix the signers; send each the signatures, unless fewer than t signed."""
        self._closing(Stage.CONSISTENCY, "close_consistency")
        signers = sorted(self._signatures)
        self._need(len(signers), "signed the alive list")
        self.signers = signers
        self.stage = Stage.UNMASK
        signatures = [self._signatures[v] for v in signers]
        return {v: UnmaskRequest(self.round_id, self.session, v, signers, signatures) for v in signers}

    # -- stage 5: unmasking ----------------------------------------------------------------------------

    def receive_unmask(self, msg: UnmaskShares) -> None:
        self._expect(Stage.UNMASK, msg, msg.sender, self.signers)
        if msg.sender in self._replies:
            raise SecAggError(f"party {msg.sender} answered the unmask request twice")
        dropped = [u for u in self.sharers if u not in self._inputs]
        if msg.seed_owners != self.alive or msg.key_owners != dropped:
            raise SecAggError(f"party {msg.sender} revealed seed shares of {msg.seed_owners} and key shares "
                              f"of {msg.key_owners}; the request called for {self.alive} and {dropped}")
        self._replies[msg.sender] = msg

    def _good_shares(self, kind: str, owner: int, responders: list[int]) -> dict[int, bytes]:
        """The revealed shares of `owner`'s secret that match what `owner` committed to; the rest are noted."""
        dealt = self._shares[owner]
        commits = dealt.seed_commits if kind == "seed" else dealt.key_commits
        row = {m: i for i, m in enumerate(self.members)}
        good = {}
        for h in responders:
            reply = self._replies[h]
            owners, shares = ((reply.seed_owners, reply.seed_shares) if kind == "seed"
                              else (reply.key_owners, reply.key_shares))
            share = shares[owners.index(owner)]
            expected = commits[row[h]]
            if crypto.share_commitment(share, kind.encode(), self.session, self.round_id, owner, h) == expected:
                good[h] = share
            else:
                self.bad_shares.append((h, owner, kind))
        return good

    def finish(self) -> ServerResult:
        """Check every revealed share, rebuild each needed secret from t good ones, check it, remove the
        masks and decode the sum."""
        self._closing(Stage.UNMASK, "finish")
        responders = sorted(self._replies)
        self._need(len(responders), "answered the unmask request")
        t = self.share_threshold
        dropped = [u for u in self.sharers if u not in self._inputs]
        needed = [("seed", u) for u in self.alive] + [("key", d) for d in dropped]
        coeff_cache: dict[tuple[int, ...], list[int]] = {}
        secrets: dict[tuple[str, int], bytes] = {}
        for kind, owner in needed:
            shares = self._good_shares(kind, owner, responders)
            if len(shares) < t:
                raise self._abort(f"only {len(shares)} good shares of party {owner}'s {_WHAT[kind]} arrived "
                                  f"({len(responders) - len(shares)} failed their commitment), {t} are needed")
            chosen = tuple(sorted(shares)[:t])
            if chosen not in coeff_cache:
                coeff_cache[chosen] = shamir.lagrange_at_zero(chosen)
            try:
                secret = shamir.combine({h: shares[h] for h in chosen}, coeff_cache[chosen])
            except ValueError:
                secret = b""
            if kind == "seed":
                ok = bool(secret) and crypto.seed_commitment(secret, self.session, self.round_id,
                                                              owner) == self._keys[owner].seed_commit
            else:
                ok = bool(secret) and crypto.public_of(secret) == self._keys[owner].s_pk
            if not ok:  # every share used matches its commitment: the dealer committed to inconsistent shares
                raise self._abort(f"party {owner} dealt inconsistent shares: {t} shares matching its "
                                  f"commitments do not rebuild its committed {_WHAT[kind]} (a cheating dealer)")
            secrets[(kind, owner)] = secret

        total = self._sum
        for u in self.alive:
            key = crypto.self_mask_key(secrets[("seed", u)], self.session, self.round_id, u)
            np.subtract(total, crypto.prg_words(key, self.length), out=total)
        alive = set(self.alive)
        for d in dropped:
            private = X25519PrivateKey.from_private_bytes(secrets[("key", d)])
            for v in self.graph[d]:
                if v not in alive:
                    continue
                shared = crypto.agree(private, self._keys[v].s_pk, v)
                key = crypto.pair_mask_key(shared, self.session, self.round_id, d, v)
                mask = crypto.prg_words(key, self.length)
                # v added +mask if v < d, -mask if v > d: undo it.
                (np.subtract if v < d else np.add)(total, mask, out=total)
        weighted_sum, total_weight, clipped = decode(total, self.config, self.params)
        self.responders = responders
        self.stage = DONE
        self._sum = np.zeros(0, dtype=np.uint64)
        left_out = [u for u in range(self.n_parties) if u not in set(self.sharers)]
        return ServerResult(weighted_sum, total_weight, list(self.alive), dropped, left_out, clipped,
                            list(self.bad_shares))
