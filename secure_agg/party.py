"""One party's side of one round: a transport-free state machine.

advertise() -> share_keys(roster) -> masked_input(relayed, vector, weight) -> [receive_ack(ack)] ->
consistency_check(request) -> unmask(request). Each step checks what the owner sent against what the party
can derive on its own and refuses (SecAggError) anything inconsistent; after a refusal the party answers
nothing more this round. Above all it reveals, per peer, either the self-mask seed share (peer alive) or the
mask-key share (peer dropped), never both; it signs one alive list only, and reveals only once a strict
majority of the invited parties signed that same list, so every revealing party holds the same one.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from secure_agg import crypto, shamir
from secure_agg.config import SecAggConfig, round_params, share_threshold, sparse_degree
from secure_agg.encoding import encode, pack, rounding_rng
from secure_agg.errors import SecAggError
from secure_agg.graph import neighbour_graph
from secure_agg.messages import (
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


def _step(expected: tuple[str, ...]) -> Callable:
    """Run a step only in one of the `expected` stages; a SecAggError on the way ends the party's round."""
    def wrap(method: Callable) -> Callable:
        @functools.wraps(method)
        def run(self: SecAggParty, *args: Any, **kwargs: Any) -> Any:
            if self.stage not in expected:
                raise SecAggError(f"party {self.party_id}: {method.__name__} called in stage {self.stage!r}")
            try:
                return method(self, *args, **kwargs)
            except SecAggError:
                self.stage = "aborted"
                raise
        return run
    return wrap


class SecAggParty:
    """Party `party_id` of `n_parties` in round `round_id` of session `session`."""

    def __init__(self, config: SecAggConfig, party_id: int, n_parties: int, round_id: int,
                 session: str) -> None:
        self.config = config
        self.params = round_params(config, n_parties)
        if isinstance(party_id, bool) or not isinstance(party_id, int) or not 0 <= party_id < n_parties:
            raise SecAggError(f"party id {party_id!r} is outside 0..{n_parties - 1}")
        if isinstance(round_id, bool) or not isinstance(round_id, int) or round_id < 0:
            raise SecAggError(f"the round id must be a non-negative int, got {round_id!r}")
        self.party_id, self.n_parties, self.round_id = party_id, n_parties, round_id
        self.session = check_session(session)
        self.stage = "new"
        self._c_key, self._c_pk = crypto.new_key_pair()  # encrypts the shares sent to peers
        self._s_key, self._s_pk = crypto.new_key_pair()  # agrees the pairwise masks
        self._sig_key, self._sig_pk = crypto.new_signing_key()  # signs this round's alive list, once
        self._seed = os.urandom(shamir.SECRET_BYTES)  # self-mask seed b_u
        self._neighbours: list[int] = []
        self._c_pks: dict[int, bytes] = {}
        self._s_pks: dict[int, bytes] = {}
        self._sig_pks: dict[int, bytes] = {}  # every member's, not only the neighbours'
        self._members: set[int] = set()
        self._share_threshold = 0
        self._own_shares: tuple[bytes, bytes] = (b"", b"")
        self._held: dict[int, tuple[bytes, bytes]] = {}  # peer -> (seed share, key share) it sent me
        self._digest = b""
        self._alive: list[int] = []  # the U3 this party signed
        self._dropped: list[int] = []
        self.acked = False

    def _check_envelope(self, msg: Any, recipient: int) -> None:
        if msg.round_id != self.round_id or msg.session != self.session:
            raise SecAggError(f"party {self.party_id}: a {msg.TYPE} for round {msg.round_id} of session "
                              f"{msg.session!r} arrived in round {self.round_id} of {self.session!r} "
                              "(replay?)")
        if recipient != self.party_id:
            raise SecAggError(f"party {self.party_id}: got a {msg.TYPE} addressed to party {recipient}")

    def _share_key(self, peer: int, sender: int, receiver: int) -> bytes:
        shared = crypto.agree(self._c_key, self._c_pks[peer], peer)
        return crypto.share_key(shared, self.session, self.round_id, sender, receiver)

    @_step(("new",))
    def advertise(self) -> AdvertiseKeys:
        self.stage = "advertised"
        commit = crypto.seed_commitment(self._seed, self.session, self.round_id, self.party_id)
        return AdvertiseKeys(self.round_id, self.session, self.party_id, self._c_pk, self._s_pk, self._sig_pk,
                             commit)

    @_step(("advertised",))
    def share_keys(self, roster: Roster) -> ShareKeys:
        """Check the roster, then Shamir-share the seed and the mask key among the neighbours (+ self)."""
        self._check_envelope(roster, roster.recipient)
        me, p = self.party_id, self.params
        if roster.n_parties != self.n_parties or roster.ring_bits != p.ring_bits:
            raise SecAggError(f"party {me}: roster says {roster.n_parties} parties / {roster.ring_bits}-bit "
                              f"ring, expected {self.n_parties} / {p.ring_bits}")
        members = roster.members
        if me not in members or any(m >= self.n_parties for m in members):
            raise SecAggError(f"party {me}: roster members {members} omit this party or hold unknown ids")
        if roster.min_survivors != p.min_survivors or len(members) < p.min_survivors:
            raise SecAggError(f"party {me}: roster threshold {roster.min_survivors} with {len(members)} "
                              f"members, expected threshold {p.min_survivors} and at least that many members")
        degree = sparse_degree(self.config, len(members))
        t = share_threshold(self.config, p, len(members), degree)
        if roster.degree != degree or roster.share_threshold != t:
            raise SecAggError(f"party {me}: roster degree {roster.degree} / share threshold "
                              f"{roster.share_threshold}, expected {degree} / {t}")
        expected = neighbour_graph(members, degree, self.session, self.round_id)[me]
        if roster.neighbours != expected:
            raise SecAggError(f"party {me}: roster neighbours {roster.neighbours} differ from the graph "
                              f"derived from the members ({expected})")
        if len(roster.sig_pks) != len(members) or roster.sig_pks[members.index(me)] != self._sig_pk:
            raise SecAggError(f"party {me}: the roster's signing keys do not match its members or omit this "
                              "party's own key")
        keys = [*roster.c_pks, *roster.s_pks, *roster.sig_pks, self._c_pk, self._s_pk]
        if len(set(keys)) != len(keys):
            raise SecAggError(f"party {me}: the roster repeats a public key")
        self._members, self._neighbours, self._share_threshold = set(members), expected, t
        self._c_pks = dict(zip(expected, roster.c_pks, strict=True))
        self._s_pks = dict(zip(expected, roster.s_pks, strict=True))
        self._sig_pks = dict(zip(members, roster.sig_pks, strict=True))

        holders = [*expected, me]
        seed_shares = shamir.split(self._seed, holders, t)
        key_shares = shamir.split(crypto.private_bytes(self._s_key), holders, t)
        self._own_shares = (seed_shares[me], key_shares[me])
        ciphertexts = []
        for v in expected:
            key = self._share_key(v, me, v)
            ad = crypto.context(b"share-ad", self.session, self.round_id, me, v)
            ciphertexts.append(crypto.seal(key, seed_shares[v] + key_shares[v], ad))
        self.stage = "shared"
        return ShareKeys(self.round_id, self.session, me, list(expected), ciphertexts)

    @_step(("shared",))
    def masked_input(self, relayed: RelayedShares, vector: np.ndarray, weight: int) -> MaskedInput:
        """Decrypt the peers' shares, then send encode(weight * x, weight) + self mask +/- pairwise masks."""
        self._check_envelope(relayed, relayed.recipient)
        me = self.party_id
        senders = relayed.senders
        if not set(senders) <= set(self._neighbours):
            raise SecAggError(f"party {me}: relayed shares from non-neighbours "
                              f"{sorted(set(senders) - set(self._neighbours))}")
        if len(senders) + 1 < self._share_threshold:
            raise SecAggError(f"party {me}: only {len(senders)} neighbours shared keys; "
                              f"{self._share_threshold - 1} are needed to keep its secrets recoverable")
        if len(self._neighbours) == len(self._members) - 1 and len(senders) + 1 < self.params.min_survivors:
            raise SecAggError(f"party {me}: only {len(senders) + 1} parties shared keys, below the threshold "
                              f"{self.params.min_survivors}")
        held = {}
        for u, blob in zip(senders, relayed.ciphertexts, strict=True):
            key = self._share_key(u, u, me)
            ad = crypto.context(b"share-ad", self.session, self.round_id, u, me)
            plain = crypto.open_sealed(key, blob, ad, f"party {me}: the key share from party {u}")
            held[u] = (plain[:shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES:])

        words = encode(vector, weight, self.config, self.params, rounding_rng(self.config, self.round_id, me))
        n = words.size
        np.add(words, crypto.prg_words(crypto.self_mask_key(self._seed, self.session, self.round_id, me), n),
               out=words)
        for v in senders:
            shared = crypto.agree(self._s_key, self._s_pks[v], v)
            mask = crypto.prg_words(crypto.pair_mask_key(shared, self.session, self.round_id, me, v), n)
            (np.add if me < v else np.subtract)(words, mask, out=words)
        packed = pack(words, self.params.ring_bytes)
        self._held = held
        self._digest = hashlib.sha256(packed.data).digest()
        self.stage = "masked"
        return MaskedInput(self.round_id, self.session, me, n, self.params.ring_bits, packed)

    @_step(("masked",))
    def receive_ack(self, ack: InputAck) -> None:
        self._check_envelope(ack, ack.recipient)
        if ack.digest != self._digest:
            raise SecAggError(f"party {self.party_id}: the owner acknowledged a masked input this party did "
                              "not send")
        self.acked = True

    @_step(("masked",))
    def consistency_check(self, request: ConsistencyRequest) -> ConsistencySignature:
        """Check the alive/dropped lists, then sign the alive list (U3): the only one this party signs."""
        self._check_envelope(request, request.recipient)
        me = self.party_id
        alive, dropped = set(request.alive), set(request.dropped)
        if alive & dropped:
            raise SecAggError(f"party {me}: parties {sorted(alive & dropped)} are listed both alive and "
                              "dropped")
        unknown = (alive | dropped) - self._members
        if unknown:
            raise SecAggError(f"party {me}: the unmask lists name parties {sorted(unknown)} outside the "
                              "roster")
        if me not in alive:
            state = "acknowledged" if self.acked else "sent"
            raise SecAggError(f"party {me}: listed as dropped (or missing) although it {state} its masked "
                              "input")
        if len(alive) < self.params.min_survivors:
            raise SecAggError(f"party {me}: only {len(alive)} parties alive, below the threshold "
                              f"{self.params.min_survivors}; nothing is revealed")
        for v in self._neighbours:
            listed = v in alive or v in dropped
            if v in self._held and not listed:
                raise SecAggError(f"party {me}: peer {v} shared keys but is neither alive nor dropped")
            if v not in self._held and listed:
                raise SecAggError(f"party {me}: peer {v} never shared keys but is listed as "
                                  f"{'alive' if v in alive else 'dropped'}")
        holders_alive = sum(1 for v in [*self._held, me] if v in alive)
        if holders_alive < self._share_threshold:
            raise SecAggError(f"party {me}: only {holders_alive} holders of this party's shares are alive, "
                              f"below {self._share_threshold}; nothing is revealed")
        self._alive, self._dropped = sorted(alive), sorted(dropped)
        signature = crypto.sign(self._sig_key, crypto.consistency_message(self.session, self.round_id,
                                                                          self._alive))
        self.stage = "signed"
        return ConsistencySignature(self.round_id, self.session, me, signature)

    @_step(("signed",))
    def unmask(self, request: UnmaskRequest) -> UnmaskShares:
        """Check that a strict majority signed the alive list this party signed, then reveal one share per
        listed peer: seed if alive, key if dropped.

        Each party signs once and the threshold is a strict majority of the invited parties, so no two
        different alive lists can both gather enough signatures: every revealing party holds the same one.
        """
        self._check_envelope(request, request.recipient)
        me, need = self.party_id, self.params.min_survivors
        signers, alive = request.signers, set(self._alive)
        if len(signers) != len(request.signatures):
            raise SecAggError(f"party {me}: {len(signers)} signers but {len(request.signatures)} signatures")
        if len(set(signers)) != len(signers):
            raise SecAggError(f"party {me}: the unmask request repeats a signer")
        outside = sorted(set(signers) - alive)
        if outside:
            raise SecAggError(f"party {me}: signers {outside} are not in the alive set this party signed")
        if len(signers) < need:
            raise SecAggError(f"party {me}: only {len(signers)} consistency signatures, below the threshold "
                              f"{need}; nothing is revealed")
        message = crypto.consistency_message(self.session, self.round_id, self._alive)
        for v, signature in zip(signers, request.signatures, strict=True):
            if not crypto.verify(self._sig_pks[v], signature, message):
                raise SecAggError(f"party {me}: party {v}'s consistency signature is invalid (forged, or over "
                                  "another alive list, round or session); nothing is revealed")
        dropped = set(self._dropped)
        held = {**self._held, me: self._own_shares}
        seed_owners = sorted(v for v in held if v in alive)
        key_owners = sorted(v for v in held if v in dropped)
        self.stage = "done"
        return UnmaskShares(self.round_id, self.session, me, seed_owners, key_owners,
                            [held[v][0] for v in seed_owners], [held[v][1] for v in key_owners])
