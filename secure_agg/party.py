"""One party's side of one round: a transport-free state machine.

contribute(vector, weight), then one step per stage of the round (`secure_agg.round.ROUND`): advertise() ->
share_keys(roster) -> masked_input(relayed) -> [receive_ack(ack)] -> consistency_check(request) ->
unmask(request). Each step checks what the owner sent against what the party
can derive on its own, and against its own floors (`PartyPolicy`), and refuses (SecAggError) anything
inconsistent; after a refusal the party answers nothing more this round. Above all it reveals, per peer,
either the self-mask seed share (peer alive) or the mask-key share (peer dropped), never both; it signs one
alive list only, and reveals only once t > (n + c) / 2 parties signed that same list under the same round
view, and only if the alive parties' graph cannot be split by c colluders. With a ledger it also never masks
a second input for the same round, across restarts.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from secure_agg import crypto, shamir
from secure_agg.config import PartyPolicy, SecAggConfig, round_params
from secure_agg.encoding import encode, pack, rounding_rng
from secure_agg.errors import SecAggError
from secure_agg.graph import is_k_connected, neighbour_graph
from secure_agg.identity import ConsortiumRoster, Identity, advert_message, sign_advert
from secure_agg.ledger import SecAggLedger
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
from secure_agg.stages import Stage

NEW, ABORTED = "new", "aborted"  # the party's state before its first step and after a refusal


def _step(after: Stage | str) -> Callable:
    """Run a step only right `after` the stage the party completed last (`NEW` before the first); a
    SecAggError on the way ends the party's round."""
    def wrap(method: Callable) -> Callable:
        @functools.wraps(method)
        def run(self: SecAggParty, *args: Any, **kwargs: Any) -> Any:
            if self.stage != after:
                raise SecAggError(f"party {self.party_id}: {method.__name__} called in stage {str(self.stage)!r}")
            try:
                return method(self, *args, **kwargs)
            except SecAggError:
                self.stage = ABORTED
                raise
        return run
    return wrap


class SecAggParty:
    """Party `party_id` of `n_parties` in round `round_id` of session `session`.

    policy: this party's own floors (collusion bound, sparse degree, honest inputs per sum); default
        `PartyPolicy()`. A config below them is refused here already.
    ledger: where the party records that it sent its input and what it revealed (see `SecAggLedger`);
        None keeps no record across restarts.
    """

    def __init__(self, config: SecAggConfig, party_id: int, n_parties: int, round_id: int, session: str, *,
                 policy: PartyPolicy | None = None, ledger: SecAggLedger | None = None,
                 identity: Identity | None = None, peers: ConsortiumRoster | None = None, binding: bytes = b"",
                 rounding_seed: int | None = None) -> None:
        self.config = config
        self.params = round_params(config, n_parties)
        if isinstance(party_id, bool) or not isinstance(party_id, int) or not 0 <= party_id < n_parties:
            raise SecAggError(f"party id {party_id!r} is outside 0..{n_parties - 1}")
        if isinstance(round_id, bool) or not isinstance(round_id, int) or round_id < 0:
            raise SecAggError(f"the round id must be a non-negative int, got {round_id!r}")
        self.party_id, self.n_parties, self.round_id = party_id, n_parties, round_id
        self.session = check_session(session)
        self.policy = policy if policy is not None else PartyPolicy()
        self.policy.check(self.params, party_id)
        self.ledger = ledger
        if peers is not None and identity is None:
            raise SecAggError(f"party {party_id}: checking peers against a roster needs this party's own identity")
        self.identity, self.peers, self.binding = identity, peers, binding
        # The stochastic rounding's seed: the config's (reproducible, in process) or the party's own secret.
        self._rounding = config if rounding_seed is None else dataclasses.replace(config, rounding_seed=rounding_seed)
        self.collusion = self.params.collusion  # c, plus every member not on this party's roster (share_keys)
        self.stage: Stage | str = NEW  # the stage whose step this party completed last
        self._c_key, self._c_pk = crypto.new_key_pair()  # encrypts the shares sent to peers
        self._s_key, self._s_pk = crypto.new_key_pair()  # agrees the pairwise masks
        self._sig_key, self._sig_pk = crypto.new_signing_key()  # signs this round's view and alive list
        self._seed = os.urandom(shamir.SECRET_BYTES)  # self-mask seed b_u
        self._coin = os.urandom(32)  # places this party on the graph's ring, revealed after the roster
        self._advert: AdvertiseKeys | None = None
        self._members: list[int] = []
        self._adverts: dict[int, AdvertiseKeys] = {}  # every member's, as the roster relayed them
        self._own_shares: tuple[bytes, bytes] = (b"", b"")
        self._sharers: list[int] = []  # U2 as relayed
        self._graph: dict[int, list[int]] = {}
        self._transcript = b""
        self._held: dict[int, tuple[bytes, bytes]] = {}  # peer -> (seed share, key share) it sent me
        self._digest = b""
        self._alive: list[int] = []  # the U3 this party signed
        self._dropped: list[int] = []
        self._input: tuple[np.ndarray, int] | None = None
        self.acked = False

    def contribute(self, vector: np.ndarray, weight: int) -> SecAggParty:
        """Set the update this party masks in this round and its FedAvg weight (any time before the masked-input
        step); returns the party, so a step can follow."""
        if self.stage in (Stage.MASKED_INPUT, Stage.CONSISTENCY, Stage.UNMASK):
            raise SecAggError(f"party {self.party_id}: its input for round {self.round_id} has already left")
        self._input = (np.asarray(vector), weight)
        return self

    def _check_envelope(self, msg: Any, recipient: int) -> None:
        if msg.round_id != self.round_id or msg.session != self.session:
            raise SecAggError(f"party {self.party_id}: a {msg.TYPE} for round {msg.round_id} of session "
                              f"{msg.session!r} arrived in round {self.round_id} of {self.session!r} "
                              "(replay?)")
        if recipient != self.party_id:
            raise SecAggError(f"party {self.party_id}: got a {msg.TYPE} addressed to party {recipient}")

    def _share_key(self, peer: int, sender: int, receiver: int) -> bytes:
        shared = crypto.agree(self._c_key, self._adverts[peer].c_pk, peer)
        return crypto.share_key(shared, self.session, self.round_id, sender, receiver)

    @_step(NEW)
    def advertise(self) -> AdvertiseKeys:
        self.stage = Stage.ADVERTISE
        me = self.party_id
        advert = AdvertiseKeys(self.round_id, self.session, me, self._c_pk, self._s_pk, self._sig_pk,
                               crypto.seed_commitment(self._seed, self.session, self.round_id, me),
                               crypto.coin_commitment(self._coin, self.session, self.round_id, me))
        if self.identity is not None:  # the per-round keys, signed with the long-term identity key
            advert = dataclasses.replace(advert, name=self.identity.name, identity_sig=sign_advert(
                self.identity, self.session, self.round_id, me, advert.keys))
        self._advert = advert
        return advert

    @_step(Stage.ADVERTISE)
    def share_keys(self, roster: Roster) -> ShareKeys:
        """Check the roster, then Shamir-share the seed and the mask key t-of-members, committing to each share."""
        self._check_envelope(roster, roster.recipient)
        me, p = self.party_id, self.params
        if roster.n_parties != self.n_parties or roster.ring_bits != p.ring_bits:
            raise SecAggError(f"party {me}: roster says {roster.n_parties} parties / {roster.ring_bits}-bit "
                              f"ring, expected {self.n_parties} / {p.ring_bits}")
        members = roster.members
        count = len(members)
        if len(set(members)) != count or len(roster.adverts) != count or any(
                a.sender != u for a, u in zip(roster.adverts, members, strict=False)):
            raise SecAggError(f"party {me}: the roster's members and keys do not line up")
        if me not in members or any(m >= self.n_parties for m in members):
            raise SecAggError(f"party {me}: roster members {members} omit this party or hold unknown ids")
        if roster.min_survivors != p.min_survivors or len(members) < p.min_survivors:
            raise SecAggError(f"party {me}: roster threshold {roster.min_survivors} with {len(members)} "
                              f"members, expected threshold {p.min_survivors} and at least that many members")
        if roster.collusion != p.collusion or roster.degree != p.degree:
            raise SecAggError(f"party {me}: roster collusion bound {roster.collusion} / degree {roster.degree}, "
                              f"expected {p.collusion} / {p.degree}")
        if roster.adverts[members.index(me)] != self._advert:
            raise SecAggError(f"party {me}: the roster's keys at this party's position are not its own")
        keys = [k for a in roster.adverts for k in (a.c_pk, a.s_pk, a.sig_pk, a.seed_commit, a.coin_commit)]
        if len(set(keys)) != len(keys):
            raise SecAggError(f"party {me}: the roster repeats a public key")
        self._members = list(members)
        self._adverts = dict(zip(members, roster.adverts, strict=True))
        self.collusion = p.collusion + self._strangers(roster)
        self._check_floors()

        t, ctx = p.min_survivors, (self.session, self.round_id, me)
        seed_shares = shamir.split(self._seed, members, t)
        key_shares = shamir.split(crypto.private_bytes(self._s_key), members, t)
        self._own_shares = (seed_shares[me], key_shares[me])
        seed_commits = [crypto.share_commitment(seed_shares[h], b"seed", *ctx, h) for h in members]
        key_commits = [crypto.share_commitment(key_shares[h], b"key", *ctx, h) for h in members]
        receivers = [v for v in members if v != me]
        ciphertexts = []
        for v in receivers:
            ad = crypto.context(b"share-ad", self.session, self.round_id, me, v)
            ciphertexts.append(crypto.seal(self._share_key(v, me, v), seed_shares[v] + key_shares[v], ad))
        self.stage = Stage.SHARE_KEYS
        return ShareKeys(self.round_id, self.session, me, receivers, ciphertexts, seed_commits, key_commits,
                         self._coin)

    def _strangers(self, roster: Roster) -> int:
        """How many members this party cannot vouch for: none without a pinned roster (in process); else every
        member whose name is not on its roster (an identity the owner may control: a colluder). A member that
        names a roster member but carries keys not signed by that member's identity key is forged: refused."""
        if self.peers is None:
            return 0
        me, mine = self.party_id, self.identity.name
        named = [a.name for a in roster.adverts if a.name]
        if len(set(named)) != len(named):
            raise SecAggError(f"party {me}: the roster names a member twice")
        strangers = 0
        for advert in roster.adverts:
            if advert.sender == me:
                continue
            key = self.peers.identity_of(advert.name) if advert.name else None
            if key is None:
                strangers += 1
                continue
            message = advert_message(self.session, self.round_id, advert.sender, advert.name, advert.keys)
            if advert.name == mine or not crypto.verify(key, advert.identity_sig, message):
                raise SecAggError(f"party {me}: member {advert.sender} claims to be {advert.name!r}, but its keys "
                                  f"are not signed by {advert.name!r}'s identity key (forged or tampered); "
                                  "nothing is revealed")
        return strangers

    def _check_floors(self) -> None:
        """With the members it cannot vouch for counted as colluders: two different alive lists must still be
        unable to gather t signatures each (2t > n + c), and any sum the owner could unmask must still hold at
        least this party's minimum of honest inputs (t - c)."""
        me, p, c = self.party_id, self.params, self.collusion
        if c == p.collusion:
            return
        if 2 * p.min_survivors <= self.n_parties + c or p.min_survivors - c < self.policy.min_honest:
            raise SecAggError(f"party {me}: {c - p.collusion} round members are not on this party's roster and "
                              f"count as colluders: with {c} colluders a threshold of {p.min_survivors} of "
                              f"{self.n_parties} leaves fewer than {self.policy.min_honest} honest inputs in a sum "
                              "the owner could unmask, or lets two alive lists be signed; nothing is revealed")

    def _view(self, relayed: RelayedShares) -> None:
        """Check the sharers' coins, derive the graph and the round transcript from them."""
        me, p = self.party_id, self.params
        s = len(relayed.senders)
        if (len(set(relayed.senders)) != s or me in relayed.senders
                or {len(relayed.ciphertexts), len(relayed.seed_commits), len(relayed.key_commits)} != {s}
                or len(relayed.coins) != s + 1 or len(relayed.s_pks) != len(relayed.neighbours)):
            raise SecAggError(f"party {me}: the relay's senders, ciphertexts, commitments, coins and keys do not "
                              "line up")
        sharers = sorted([*relayed.senders, me])
        unknown = sorted(set(sharers) - set(self._members))
        if unknown:
            raise SecAggError(f"party {me}: relayed shares from non-members {unknown}")
        if len(sharers) < p.min_survivors:
            raise SecAggError(f"party {me}: only {len(sharers)} parties shared keys, below the threshold "
                              f"{p.min_survivors}")
        coins = dict(zip(sharers, relayed.coins, strict=True))
        if coins[me] != self._coin:
            raise SecAggError(f"party {me}: the relay carries another coin for this party")
        for u, coin in coins.items():
            if crypto.coin_commitment(coin, self.session, self.round_id, u) != self._adverts[u].coin_commit:
                raise SecAggError(f"party {me}: party {u}'s graph coin does not match its commitment")
        graph = neighbour_graph(coins, p.degree, self.session, self.round_id)
        if relayed.neighbours != graph[me]:
            raise SecAggError(f"party {me}: relayed neighbours {relayed.neighbours} differ from the graph "
                              f"derived from the coins ({graph[me]})")
        if relayed.s_pks != [self._adverts[v].s_pk for v in relayed.neighbours]:
            raise SecAggError(f"party {me}: the mask keys relayed for its neighbours are not the keys they "
                              "advertised")
        self._sharers, self._graph = sharers, graph
        numbers = (self.n_parties, p.collusion, p.min_survivors, p.degree, p.ring_bits)
        entries = [self._adverts[m].transcript_entry for m in self._members]
        self._transcript = crypto.transcript_digest(self.session, self.round_id, numbers, self._members, entries,
                                                    sharers, [coins[u] for u in sharers], self.binding)

    @_step(Stage.SHARE_KEYS)
    def masked_input(self, relayed: RelayedShares) -> MaskedInput:
        """Check the relay, decrypt the peers' shares against their dealers' commitments, then send
        encode(weight * x, weight, clipped) + self mask +/- pairwise masks with the graph neighbours, for the
        (x, weight) given to `contribute`."""
        self._check_envelope(relayed, relayed.recipient)
        me = self.party_id
        if self._input is None:
            raise SecAggError(f"party {me}: no input to mask (contribute() was not called)")
        vector, weight = self._input
        self._view(relayed)
        held = {}
        for u, blob, seed_commit, key_commit in zip(relayed.senders, relayed.ciphertexts, relayed.seed_commits,
                                                    relayed.key_commits, strict=True):
            ad = crypto.context(b"share-ad", self.session, self.round_id, u, me)
            plain = crypto.open_sealed(self._share_key(u, u, me), blob, ad,
                                       f"party {me}: the key share from party {u}")
            seed_share, key_share = plain[:shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES:]
            ctx = (self.session, self.round_id, u, me)
            if (crypto.share_commitment(seed_share, b"seed", *ctx) != seed_commit
                    or crypto.share_commitment(key_share, b"key", *ctx) != key_commit):
                raise SecAggError(f"party {me}: party {u} dealt a share that does not match its commitment "
                                  "(a cheating dealer, or a tampered relay)")
            held[u] = (seed_share, key_share)

        words = encode(vector, weight, self.config, self.params, rounding_rng(self._rounding, self.round_id, me))
        n = words.size
        np.add(words, crypto.prg_words(crypto.self_mask_key(self._seed, self.session, self.round_id, me), n),
               out=words)
        for v, s_pk in zip(relayed.neighbours, relayed.s_pks, strict=True):
            shared = crypto.agree(self._s_key, s_pk, v)
            mask = crypto.prg_words(crypto.pair_mask_key(shared, self.session, self.round_id, me, v), n)
            (np.add if me < v else np.subtract)(words, mask, out=words)
        packed = pack(words, self.params.ring_bytes)
        view = crypto.sign(self._sig_key, crypto.view_message(self.session, self.round_id, me, self._transcript))
        if self.ledger is not None:  # before the input leaves: a restart must not send a second one
            self.ledger.claim_input(self.session, self.round_id)
        self._held = {**held, me: self._own_shares}
        self._digest = hashlib.sha256(packed.data).digest()
        self.stage = Stage.MASKED_INPUT
        return MaskedInput(self.round_id, self.session, me, n, self.params.ring_bits, packed, view)

    @_step(Stage.MASKED_INPUT)
    def receive_ack(self, ack: InputAck) -> None:
        self._check_envelope(ack, ack.recipient)
        if ack.digest != self._digest:
            raise SecAggError(f"party {self.party_id}: the owner acknowledged a masked input this party did "
                              "not send")
        self.acked = True

    @_step(Stage.MASKED_INPUT)
    def consistency_check(self, request: ConsistencyRequest) -> ConsistencySignature:
        """Check the alive/dropped lists, every alive party's view signature and the alive parties' graph,
        then sign the alive list (U3) with the round transcript: the only list this party signs."""
        self._check_envelope(request, request.recipient)
        me, p = self.party_id, self.params
        alive, dropped = set(request.alive), set(request.dropped)
        if alive & dropped:
            raise SecAggError(f"party {me}: parties {sorted(alive & dropped)} are listed both alive and "
                              "dropped")
        unknown = (alive | dropped) - set(self._members)
        if unknown:
            raise SecAggError(f"party {me}: the unmask lists name parties {sorted(unknown)} outside the "
                              "roster")
        if me not in alive:
            state = "acknowledged" if self.acked else "sent"
            raise SecAggError(f"party {me}: listed as dropped (or missing) although it {state} its masked "
                              "input")
        missing = sorted(set(self._sharers) - alive - dropped)
        if missing:
            raise SecAggError(f"party {me}: peers {missing} shared keys but are neither alive nor dropped")
        strangers = sorted((alive | dropped) - set(self._sharers))
        if strangers:
            raise SecAggError(f"party {me}: peers {strangers} never shared keys but are listed as alive or "
                              "dropped")
        if len(alive) < p.min_survivors:
            raise SecAggError(f"party {me}: only {len(alive)} parties alive, below the threshold "
                              f"{p.min_survivors}; nothing is revealed")
        if len(request.view_signatures) != len(request.alive):
            raise SecAggError(f"party {me}: {len(request.alive)} alive parties but {len(request.view_signatures)} "
                              "view signatures")
        for u, signature in zip(request.alive, request.view_signatures, strict=True):
            message = crypto.view_message(self.session, self.round_id, u, self._transcript)
            if not crypto.verify(self._adverts[u].sig_pk, signature, message):
                raise SecAggError(f"party {me}: party {u}'s view signature is invalid: it masked under another view "
                                  "of the round (members, keys, sharers or graph), or was sent other settings or "
                                  "state to train on, or it is forged; nothing is revealed")
        if not is_k_connected(self._graph, alive, self.collusion + 1):
            raise SecAggError(f"party {me}: the alive parties' graph can be split by removing {self.collusion} "
                              "of them (or fewer): a part's sum could be unmasked on its own; nothing is "
                              "revealed")
        self._alive, self._dropped = sorted(alive), sorted(dropped)
        message = crypto.consistency_message(self.session, self.round_id, self._alive, self._transcript)
        self.stage = Stage.CONSISTENCY
        return ConsistencySignature(self.round_id, self.session, me, crypto.sign(self._sig_key, message))

    @_step(Stage.CONSISTENCY)
    def unmask(self, request: UnmaskRequest) -> UnmaskShares:
        """Check that t parties signed the alive list this party signed, under the same transcript, then
        reveal one share per sharer: seed if alive, key if dropped.

        Each honest party signs once and t > (n + c) / 2, so even with c colluders signing everything no two
        different alive lists can both gather t signatures: every revealing honest party holds the same one.
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
        message = crypto.consistency_message(self.session, self.round_id, self._alive, self._transcript)
        for v, signature in zip(signers, request.signatures, strict=True):
            if not crypto.verify(self._adverts[v].sig_pk, signature, message):
                raise SecAggError(f"party {me}: party {v}'s consistency signature is invalid (forged, or over "
                                  "another alive list, view, round or session); nothing is revealed")
        seed_owners, key_owners = list(self._alive), list(self._dropped)
        if self.ledger is not None:
            self.ledger.record_reveal(self.session, self.round_id, seed_owners, key_owners)
        self.stage = Stage.UNMASK
        return UnmaskShares(self.round_id, self.session, me, seed_owners, key_owners,
                            [self._held[v][0] for v in seed_owners], [self._held[v][1] for v in key_owners])
