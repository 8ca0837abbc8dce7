"""The owner lies; the parties, unmodified and on their default flags, give it nothing it can unmask.

One hostile owner (`tests.hostile_owner`, a real CurveZMQ ROUTER scripted by the test) against three real
`party --connect` processes on 127.0.0.1, each pinning the consortium roster (A, B, C and M; M's identity key is
in the owner's hands: a colluder). Started once, the parties go through these rounds in order:

1. an honest round: all three take part and the owner unmasks the sum (the harness works); no party sends
   per-round statistics;
2. the owner "restarts" and starts round 1 again after seeing its graph coins (a redraw), then starts round 2
   from the same global state: refused;
3. a "new run" (new run id) from the round-1 state, to subtract two sums: refused; from a state changed by
   1e-6, the parties take part, and the same three parties' sum differs from round 1's by as much as the
   updates themselves (their randomness is their own: two runs never yield the same update);
4. the target A is sent the real settings, B and C a learning rate of 5e-324 (their updates would be zero):
   nobody reveals;
5. the same with the real settings for all, and an all-zero adapter for B and C: nobody reveals;
6. a round of A with two identities of the owner's own (not on A's roster), then with one forging B's name:
   A refuses;
7. three parties with a collusion bound of 0 (A, B and the colluder M): refused before training; with the
   default bound, B declared dropped after its masked input so that only A and M remain: A reveals nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from learning.lora import LoraSettings, lora_state
from learning.party_model import PartyModel
from learning.run_settings import PartyRunSettings
from learning.secure_update import secagg_config
from learning.training import TrainSettings
from owner.compress import compress, save_compressed
from protocol.keys import generate_keypair
from secure_agg import PartyPolicy, SecAggParty, Stage
from secure_agg.identity import ConsortiumRoster, Identity, generate_identity
from tests.hostile_owner import HostileOwner, secure_messages
from tests.tiny_models import byte_tokenizer, tiny_model

ROOT = Path(__file__).resolve().parents[1]
PARTIES = ("party-a", "party-b", "party-c")
COLLUDER = "party-m"
LORA = LoraSettings(r=4, alpha=8)
TRAIN = TrainSettings(local_steps=2, batch_size=2, lr=1e-2)
# A round refused on arrival: the owner waits this long for the keys that never come.
AT_ONCE = {"refused_at": Stage.ADVERTISE, "refusal_s": 12.0}
ENV = dict(os.environ) | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                          "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def run_id(i: int) -> str:
    return f"run-{i:032x}"


def settings(run: str, lr: float = TRAIN.lr) -> dict:
    train = dataclasses.replace(TRAIN, lr=lr)
    return PartyRunSettings(run_id=run, seed=0, rounds=8, max_length=64, template="plain", lora=LORA,
                            train=train, secure_agg=True).to_dict()


def shifted(state: tuple[dict, dict], by: float) -> tuple[dict, dict]:
    adapter, emulator = state
    return {k: v + np.float32(by) for k, v in adapter.items()}, emulator


def zeroed(state: tuple[dict, dict]) -> tuple[dict, dict]:
    adapter, emulator = state
    return {k: np.zeros_like(v) for k, v in adapter.items()}, emulator


def sybil(name: str, key: Ed25519PrivateKey, party_id: int, n: int, r: int, run: str) -> SecAggParty:
    """An identity of the owner's own taking part in a round (its name may be anyone's)."""
    return SecAggParty(secagg_config([8] * n, 0), party_id, n, r, run, identity=Identity(name, key))


@pytest.fixture(scope="module")
def attacked(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("attacks")
    keys = root / "keys"
    owner = generate_keypair(keys / "owner", "owner")
    allow = root / "allow"
    allow.mkdir()
    public = root / "public"  # what the members send each other to make the roster
    public.mkdir()
    for name in (*PARTIES, COLLUDER):
        pub, _ = generate_keypair(keys / name, name)
        id_pub, _ = generate_identity(keys / name, name)
        (public / pub.name).write_bytes(pub.read_bytes())
        (public / id_pub.name).write_bytes(id_pub.read_bytes())
        (allow / pub.name).write_bytes(pub.read_bytes())
    roster = root / "roster.json"
    ConsortiumRoster.from_public_files([public]).save(roster)
    colluder = Identity.load(keys / COLLUDER / f"{COLLUDER}.id_secret")

    model, manifest = compress(tiny_model("llama", 8), 2, 0.5, "tiny")
    save_compressed(model, byte_tokenizer(), manifest, root / "model")
    party_model = PartyModel.load(root / "model", LORA, 0)
    state0 = tuple({k: v.numpy() for k, v in lora_state(party_model.model, layers).items()}
                   for layers in (manifest.adapter_layers, manifest.emulator_layers))

    owner_node = HostileOwner(root, owner[1], allow, root / "model")
    procs, logs = {}, {}
    out: dict = {"logs": logs}
    try:
        for name in PARTIES:
            data = root / f"{name}.jsonl"
            data.write_text("".join(json.dumps({"question": f"What is {i} plus {i}? ({name})",
                                                "answer": f"{i} plus {i} is {2 * i}.\n#### {2 * i}"}) + "\n"
                                    for i in range(8)))
            logs[name] = root / f"{name}.log"
            with logs[name].open("wb") as fh:
                procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "party.cli", "--connect", owner_node.endpoint, "--data", str(data),
                     "--key", str(keys / name / f"{name}.key_secret"), "--owner-key", str(owner[0]),
                     "--roster", str(roster), "--work", str(root / f"work-{name}"),
                     "--privacy-dir", str(root / f"privacy-{name}"), "--timeout", "600"],
                    cwd=ROOT, env=ENV, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        everyone = {name: state0 for name in PARTIES}
        run1 = run_id(1)
        owner_node.welcome(PARTIES, run1, lambda name: settings(run1))
        start = len(owner_node.inbox)
        out["honest"] = owner_node.secure_round(0, run1, everyone)
        out["honest_messages"] = secure_messages(owner_node.inbox[start:])

        owner_node.welcome(PARTIES, run1, lambda name: settings(run1))  # "restarted": round 1 again
        out["redraw"] = owner_node.secure_round(0, run1, everyone, **AT_ONCE)
        out["same_state"] = owner_node.secure_round(1, run1, everyone, **AT_ONCE)

        run2 = run_id(2)
        owner_node.welcome(PARTIES, run2, lambda name: settings(run2))
        out["new_run"] = owner_node.secure_round(0, run2, everyone, **AT_ONCE)
        out["new_run_moved"] = owner_node.secure_round(1, run2, {n: shifted(state0, 1e-6) for n in PARTIES})

        run3 = run_id(3)
        owner_node.welcome(PARTIES, run3, lambda name: settings(run3, TRAIN.lr if name == "party-a" else 5e-324))
        out["settings_lie"] = owner_node.secure_round(0, run3, {n: shifted(state0, 2e-6) for n in PARTIES},
                                                      refused_at=Stage.CONSISTENCY)
        run4 = run_id(4)
        owner_node.welcome(PARTIES, run4, lambda name: settings(run4))
        target = shifted(state0, 3e-6)
        out["state_lie"] = owner_node.secure_round(
            0, run4, {"party-a": target, "party-b": zeroed(target), "party-c": zeroed(target)},
            refused_at=Stage.CONSISTENCY)

        run5 = run_id(5)
        owner_node.welcome(["party-a"], run5, lambda name: settings(run5))
        strangers = [sybil(f"sybil-{i}", Ed25519PrivateKey.generate(), i, 3, 0, run5) for i in (1, 2)]
        out["strangers"] = owner_node.secure_round(0, run5, {"party-a": shifted(state0, 4e-6)}, sybils=strangers,
                                                   refused_at=Stage.SHARE_KEYS)
        forged = [sybil("party-b", Ed25519PrivateKey.generate(), 1, 3, 1, run5),
                  sybil("party-c", Ed25519PrivateKey.generate(), 2, 3, 1, run5)]
        out["forged"] = owner_node.secure_round(1, run5, {"party-a": shifted(state0, 5e-6)}, sybils=forged,
                                                refused_at=Stage.SHARE_KEYS)

        run6 = run_id(6)
        pair = ["party-a", "party-b"]
        owner_node.welcome(pair, run6, lambda name: settings(run6))
        weak = dataclasses.replace(secagg_config([8] * 3, 0), collusion=0)
        m_weak = SecAggParty(weak, 2, 3, 0, run6, identity=colluder, policy=PartyPolicy(min_collusion=0))
        out["collusion_0"] = owner_node.secure_round(
            0, run6, {n: shifted(state0, 6e-6) for n in pair}, config=weak, sybils=[m_weak],
            **AT_ONCE)
        moved = shifted(state0, 7e-6)  # the colluder plays along: its view is the honest parties'
        m = SecAggParty(secagg_config([8] * 3, 0), 2, 3, 1, run6, identity=colluder,
                        binding=owner_node.binding(run6, settings(run6), moved, 3))
        out["isolate"] = owner_node.secure_round(1, run6, {n: moved for n in pair}, sybils=[m],
                                                 drop_inputs_of=["party-b"], refused_at=Stage.CONSISTENCY)
        # The colluder refuses too, which ends the owner's round at once: give A the moment it needs to read the
        # request and say why it refused before the parties are stopped.
        settle(logs["party-a"], r"only 2 parties alive, below the threshold 3")
        out["received_after_attacks"] = secure_messages(owner_node.inbox)
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait(10)
        owner_node.close()
    out["logs"] = {name: path.read_text(errors="replace") for name, path in logs.items()}
    return out


def settle(log: Path, pattern: str, timeout: float = 60.0) -> None:
    """Wait (at most `timeout`) until a party's log has a line matching `pattern`: the party reads what the owner
    sent at its own pace, so the last round's verdict may come after the owner is done with it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not re.search(pattern, log.read_text(errors="replace")):
        time.sleep(0.2)


def refusals(logs: dict, pattern: str) -> list[str]:
    return [name for name, text in logs.items() if re.search(pattern, text)]


def test_an_honest_round_completes_and_default_parties_send_no_statistics(attacked):
    honest = attacked["honest"]
    assert honest["error"] is None and honest["result"] is not None, honest
    assert honest["result"].included == [0, 1, 2]
    assert np.abs(honest["result"].weighted_sum).max() > 0  # the harness really recovers a sum
    kinds = {stage for _, stage in attacked["honest_messages"]}
    assert "round_stats" not in kinds and "update" not in kinds  # masked input only: no per-party numbers


def test_a_round_cannot_be_redrawn_or_repeated_from_the_same_state(attacked):
    for what in ("redraw", "same_state"):
        assert attacked[what]["received"][0] == (Stage.ADVERTISE, []), what  # nobody even advertised
        assert attacked[what]["result"] is None
    logs = attacked["logs"]
    assert refusals(logs, r"refused round 1: this party already took part in round 1") == list(PARTIES)
    assert refusals(logs, r"refused round 2: this party already took part from this global state") == \
        list(PARTIES)


def test_a_new_run_from_an_old_state_gets_nothing_and_reruns_never_repeat_an_update(attacked):
    assert attacked["new_run"]["received"][0] == (Stage.ADVERTISE, [])
    assert attacked["new_run"]["result"] is None
    moved = attacked["new_run_moved"]
    assert moved["error"] is None and moved["result"].included == [0, 1, 2]
    first, second = attacked["honest"]["result"].weighted_sum, moved["result"].weighted_sum
    # The same three parties from (almost) the same state: were their randomness the owner's, the sums would
    # agree to the 1e-6 shift; the difference is of the order of the updates themselves.
    assert np.linalg.norm(first - second) > 0.2 * np.linalg.norm(first)


@pytest.mark.parametrize("attack", ["settings_lie", "state_lie"])
def test_parties_sent_different_things_reveal_nothing(attacked, attack):
    outcome = attacked[attack]
    assert outcome["result"] is None
    stages = dict(outcome["received"])
    assert stages[Stage.MASKED_INPUT] == [0, 1, 2]  # everybody trained and masked: the lie went unseen so far
    assert stages.get(Stage.CONSISTENCY, []) == [] and stages.get(Stage.UNMASK, []) == []
    assert len(refusals(attacked["logs"], r"view signature is invalid")) == len(PARTIES)


def test_identities_of_the_owners_own_are_colluders_and_forged_names_are_refused(attacked):
    for what in ("strangers", "forged"):
        outcome = attacked[what]
        assert outcome["result"] is None
        assert dict(outcome["received"]).get(Stage.SHARE_KEYS, []) == [], what  # A sent no share of anything
    log = attacked["logs"]["party-a"]
    assert re.search(r"2 round members are not on this party's roster and count as colluders", log)
    assert re.search(r"claims to be 'party-b', but its keys are not signed by 'party-b'", log)


def test_the_floors_hold_with_a_colluder_and_a_party_declared_dropped(attacked):
    assert attacked["collusion_0"]["received"][0] == (Stage.ADVERTISE, [])
    assert refusals(attacked["logs"], r"collusion bound 0 is below this party's floor 1") == ["party-a", "party-b"]
    isolate = attacked["isolate"]
    assert isolate["result"] is None
    assert dict(isolate["received"]).get(Stage.CONSISTENCY, []) == []  # A signed nothing
    assert re.search(r"only 2 parties alive, below the threshold 3", attacked["logs"]["party-a"])
    # Across every attack, no party revealed a share outside the honest rounds.
    unmasked = [(n, s) for n, s in attacked["received_after_attacks"] if s == "unmask_shares"]
    assert len(unmasked) == 2 * len(PARTIES)
