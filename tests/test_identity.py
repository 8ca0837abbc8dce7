"""Long-term identities and the consortium roster: files, and what a party does with the roster in a round
(members it knows are checked, members it does not know count as colluders, forged ones are refused)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from errors import ConfigError
from protocol.keys import generate_keypair, load_allowlist, write_public_key
from secure_agg import SecAggConfig, SecAggError, SecAggParty, SecAggServer
from secure_agg.identity import ConsortiumRoster, Identity, Member, generate_identity, load_identity_public


def members(tmp_path, names):
    for name in names:
        generate_keypair(tmp_path / name, name)
        generate_identity(tmp_path / name, name)
    return ConsortiumRoster.from_public_files([tmp_path / name for name in names])


def test_keys_and_roster_files_round_trip_and_refuse_what_is_wrong(tmp_path):
    roster = members(tmp_path, ["hosp-a", "hosp-b"])
    path = tmp_path / "roster.json"
    roster.save(path)
    again = ConsortiumRoster.load(path)
    assert again == roster and again.fingerprint() == roster.fingerprint()
    identity = Identity.load(tmp_path / "hosp-a" / "hosp-a.id_secret")
    assert again.identity_of("hosp-a") == identity.public
    assert load_identity_public(tmp_path / "hosp-a" / "hosp-a.id") == ("hosp-a", identity.public)
    assert again.identity_of("nobody") is None
    assert (tmp_path / "hosp-a" / "hosp-a.id_secret").stat().st_mode & 0o077 == 0  # the secret stays private
    with pytest.raises(ConfigError, match="already exists"):
        generate_identity(tmp_path / "hosp-a", "hosp-a")
    # The owner's allowlist made from the same file holds exactly the members' CurveZMQ keys.
    allow = tmp_path / "allow"
    allow.mkdir()
    for name, key in again.allowlist().items():
        write_public_key(allow, name, key)
    assert load_allowlist(allow) == load_allowlist(tmp_path / "hosp-a") | load_allowlist(tmp_path / "hosp-b")
    data = json.loads(path.read_text())
    twice = {**data, "members": data["members"] + data["members"][:1]}
    (tmp_path / "twice.json").write_text(json.dumps(twice))
    with pytest.raises(ConfigError, match="twice"):
        ConsortiumRoster.load(tmp_path / "twice.json")
    with pytest.raises(ConfigError, match="does not exist"):
        ConsortiumRoster.load(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="not an identity secret"):
        Identity.load(tmp_path / "hosp-a" / "hosp-a.id")  # the public file where the secret is needed
    with pytest.raises(ConfigError, match="no member"):
        ConsortiumRoster.from_public_files([allow])  # keys without identities


class Round:
    """Three members of a roster in one round; `impostors` replace members by identities of the owner's."""

    def __init__(self, tmp_path, impostors: dict[int, Identity] | None = None, config=None) -> None:
        names = ["m0", "m1", "m2"]
        roster = members(tmp_path, names)
        ids = [Identity.load(tmp_path / n / f"{n}.id_secret") for n in names]
        self.config = config or SecAggConfig()
        ids = [(impostors or {}).get(u, ids[u]) for u in range(3)]
        self.parties = [SecAggParty(self.config, u, 3, 0, "s", identity=ids[u], peers=roster) for u in range(3)]
        self.server = SecAggServer(self.config, 3, 4, 0, "s")
        for p in self.parties:
            self.server.receive_advertise(p.advertise())
        self.rosters = self.server.close_advertise()


def test_members_signed_by_their_roster_identities_complete_a_round(tmp_path):
    r = Round(tmp_path)
    for u, p in enumerate(r.parties):
        r.server.receive_shares(p.share_keys(r.rosters[u]))
    relays = r.server.close_shares()
    for u, p in enumerate(r.parties):
        p.contribute(np.full(4, 0.25), 1)
        p.receive_ack(r.server.receive_masked_input(p.masked_input(relays[u])))
    for u, req in r.server.close_inputs().items():
        r.server.receive_consistency(r.parties[u].consistency_check(req))
    for u, req in r.server.close_consistency().items():
        r.server.receive_unmask(r.parties[u].unmask(req))
    np.testing.assert_allclose(r.server.finish().weighted_sum, np.full(4, 0.75), atol=1e-4)


def test_a_forged_member_or_swapped_keys_are_refused(tmp_path):
    r = Round(tmp_path, impostors={1: Identity("m1", Ed25519PrivateKey.generate())})
    with pytest.raises(SecAggError, match="claims to be 'm1', but its keys are not signed"):
        r.parties[0].share_keys(r.rosters[0])
    # An owner swapping a genuine member's mask key for its own is caught the same way.
    r = Round(tmp_path / "swap")
    roster = r.rosters[0]
    adverts = list(roster.adverts)
    adverts[2] = dataclasses.replace(adverts[2], s_pk=bytes(32))
    with pytest.raises(SecAggError, match="not signed"):
        r.parties[0].share_keys(dataclasses.replace(roster, adverts=adverts))


def test_members_off_the_roster_count_as_colluders(tmp_path):
    stranger = Identity("stranger", Ed25519PrivateKey.generate())
    r = Round(tmp_path, impostors={2: stranger}, config=SecAggConfig(collusion=1))
    # n = 3, c = 1, t = 3: one stranger makes c = 2, and a sum could hold t - c = 1 honest input.
    with pytest.raises(SecAggError, match="1 round members are not on this party's roster and count as colluders"):
        r.parties[0].share_keys(r.rosters[0])
    # Without a roster (in process), nobody is a stranger and the same round goes on.
    plain = SecAggParty(SecAggConfig(collusion=1), 0, 3, 0, "s")
    assert plain.collusion == 1
    with pytest.raises(SecAggError, match="needs this party's own identity"):
        SecAggParty(SecAggConfig(), 0, 3, 0, "s", peers=ConsortiumRoster((Member("x", "0" * 40, bytes(32)),)))
