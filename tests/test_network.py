"""The networked run for real: `owner --listen` and `party --connect` as separate processes on 127.0.0.1.

Four scenarios, each one run of real processes shared by the tests that check it (process start-up is
what costs time here, so each run exercises several requirements). Every party pins the consortium roster;
secure scenarios run the parties without --allow-plain.

- plain: 3 parties, --min-parties 2, no secure aggregation. party-3 vanishes in round 1 (frozen before the
  round opens, so it cannot answer by chance, then SIGKILLed); an unknown key and a party pinning the wrong
  owner key try to join; an allowlisted fuzzer floods the owner with over 10,000 hypothesis-generated
  malformed messages. The result must equal the in-process run of the two honest parties (parties started
  with --reproducible: their randomness then follows the run seed, as in process).
- secure + owner crash: 3 parties with secure aggregation; the owner is SIGKILLed while the parties join and
  restarted with --resume while the parties keep running (they rejoin and finish their download). Exactly
  rounds 1..R are recorded, and the result equals the in-process secure run (--reproducible again).
- a resumed run, then a second job: the owner is killed after the parties masked round 1 and resumed; then a
  new job runs with the same party work directories.
- secure dropouts: 4 parties (one colluder assumed: t = 3); party-4 exits right after sending its key shares
  (test hook), round 1 completes through Shamir recovery; party-2 is killed before round 2, leaving fewer than
  --min-parties: a clean abort with the round-1 checkpoint intact. Then the owner resumes (extending the run
  to 3 rounds) and all four parties restart and reuse their downloaded model; round 2, claimed by the two
  parties that advertised in it before the abort, is skipped; party-3 is killed before round 3, which
  completes without it (invited, it never advertises keys).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file

from learning.lora import LoraSettings
from owner.cli import main as owner_main
from owner.config import RunConfig
from owner.state import latest_checkpoint_dir, load_checkpoint
from protocol import messages as m
from protocol.codec import decode, encode, encode_tensors
from protocol.errors import ProtocolError
from protocol.keys import generate_keypair
from protocol.messages import Message, MessageType
from protocol.sockets import connect_dealer
from secure_agg.identity import ConsortiumRoster, generate_identity
from tasks.datasets import load_examples
from tasks.splits import split_iid
from tests import faulty_party

ROOT = Path(__file__).resolve().parents[1]
SEED = 0
PARTY_TIMEOUT_S = 10  # the owner gives up on a silent party after this long (heartbeats every 2 s)
FROZEN_TIMEOUT_S = 20  # the same in the plain run, where a frozen party must still count until round 1
WAIT_S = 180  # upper bound for anything the tests wait for (the 2-core machine is shared)
JOIN_TIMEOUT_S = 300  # the owner waits longer for parties than the tests wait for anything
FUZZ_MESSAGES = 10_500  # malformed messages the fuzzer sends (>= 10,000 are required)
FUZZ_LATE = 300  # of those, sent while the honest parties train round 1
TRAIN_ARGS = [
    "--public-limit", "16", "--eval-items", "4", "--max-length", "96", "--local-steps", "2",
    "--batch-size", "4", "--align-pre-steps", "2", "--align-steps", "1", "--lr", "1e-2", "--seed", str(SEED),
    "--rounds", "2", "--dtype", "float32",  # float32 on every CPU, as the in-process comparison runs
]
# Subprocesses: one thread each (two cores, several processes), no hub, unbuffered logs.
ENV = dict(os.environ) | {
    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
}


# ------------------------------------------------------------------------------------------ processes


class Node:
    """One owner or party process, its output in a log file."""

    def __init__(self, name: str, args: list[str], log: Path, env: dict[str, str]) -> None:
        self.name, self.log = name, log
        with log.open("wb") as out:
            self.proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = WAIT_S) -> re.Match:
        """Block until `pattern` (a regex) shows up in the log; fail if the process exits first."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.text())
            if found:
                return found
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited ({self.proc.returncode}) before logging {pattern!r}:\n"
                            f"{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name} did not log {pattern!r} within {timeout} s:\n{self.text()[-3000:]}")
            time.sleep(0.02)

    def exit_code(self, timeout: float = WAIT_S) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.name} did not exit within {timeout} s:\n{self.text()[-3000:]}")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(10)


class Cluster:
    """Starts owner and party processes for one scenario; `close` kills whatever is still running."""

    def __init__(self, root: Path, keys: dict, data: dict, model: Path) -> None:
        self.root, self.keys, self.data, self.model = root, keys, data, model
        self.port = free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.out = root / "out"
        self.nodes: list[Node] = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Node:
        node = Node(name, args, self.root / f"{name}.log", {**ENV, **(env or {})})
        self.nodes.append(node)
        return node

    def owner(self, *extra: str, tag: str = "owner", party_timeout: float = PARTY_TIMEOUT_S) -> Node:
        return self.start(tag, [
            "-m", "owner.cli", "--listen", self.endpoint, "--out", str(self.out), "--model", str(self.model),
            "--key", str(self.keys["owner"][1]), "--allow", str(self.keys["allow"]),
            "--public-data", str(self.data["public"]), "--eval-data", str(self.data["eval"]), *TRAIN_ARGS,
            "--join-timeout", str(JOIN_TIMEOUT_S), "--round-timeout", "120", "--party-timeout", str(party_timeout),
            *extra])

    def party(self, name: str, data: Path, tag: str | None = None, module: str = "party.cli", *,
              flags: tuple[str, ...] = (), env: dict[str, str] | None = None, roster: bool = True) -> Node:
        args = party_args(self.endpoint, name, data, self.keys, self.root, flags=flags, roster=roster)
        return self.start(tag or name, ["-m", module, *args[2:]], env)

    def close(self) -> None:
        for node in self.nodes:
            node.kill()


def party_args(endpoint: str, name: str, data: Path, keys: dict, root: Path, owner_key: Path | None = None,
               flags: tuple[str, ...] = (), roster: bool = True) -> list[str]:
    """The party command as a consortium member runs it (its key, the owner's, the roster; an outsider has
    no roster to pin); `flags` adds what the scenario needs beyond the defaults."""
    return ["-m", "party.cli", "--connect", endpoint, "--data", str(data), "--key", str(keys[name][1]),
            "--owner-key", str(owner_key or keys["owner"][0]), *(["--roster", str(keys["roster"])] if roster else []),
            "--work", str(root / f"work-{name}"), "--privacy-dir", str(root / f"privacy-{name}"),
            "--timeout", str(WAIT_S), *flags]


# The scenarios compared with the in-process run: randomness from the run seed, and float32 on every CPU (auto
# is bfloat16 on one with bf16 instructions, which the in-process run, under the tests' CPU, is not).
PLAIN = ("--allow-plain", "--reproducible", "--dtype", "float32")  # rounds without masking, as in process
REPRODUCIBLE = ("--reproducible", "--dtype", "float32")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def events(out: Path, kind: str) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["event"] == kind]


def adapfu(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapfu" / "adapter_model.safetensors"))


def assert_same_adapter(got: dict, want: dict, tol: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    worst = max(float((got[n] - want[n]).abs().max()) for n in want)
    assert worst <= tol, f"networked and in-process AdapFu differ by {worst:.3g}"
    moved = max(float(t.abs().max()) for n, t in want.items() if "lora_B" in n)
    assert moved > 1e-4, "the adapter never left its zero initialisation: the comparison would be vacuous"


# ------------------------------------------------------------------------------------------- fixtures


MEMBERS = ("party-1", "party-2", "party-3", "party-4")


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict:
    """The owner, four consortium members (the roster every party pins) and a fuzzer; `mallory` and a second
    owner are known to nobody."""
    root = tmp_path_factory.mktemp("keys")
    out = {name: generate_keypair(root / name, name)
           for name in ("owner", "other-owner", *MEMBERS, "fuzzer", "mallory")}
    allow = root / "allow"
    allow.mkdir()
    for name in (*MEMBERS, "fuzzer", "mallory"):
        generate_identity(root / name, name)
    for name in (*MEMBERS, "fuzzer"):
        (allow / f"{name}.key").write_bytes(out[name][0].read_bytes())
    out["allow"] = allow
    out["roster"] = root / "roster.json"
    ConsortiumRoster.from_public_files([root / name for name in MEMBERS]).save(out["roster"])
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Training data split for two and for three parties exactly as `owner --simulate N` splits it, plus owner
    data."""
    root = tmp_path_factory.mktemp("net-data")
    words = "red blue green yellow black white".split()
    train = [{"instruction": f"Colour of item {i}?", "input": "", "output": f"Item {i} is {words[i % 6]}."}
             for i in range(24)]
    # Three whose prompt alone exceeds --max-length: dropped at tokenisation, after the party said HELLO, so
    # the FedAvg weight must be the count trained on (as in the in-process run), not the count announced.
    train += [{"instruction": f"Describe item {i}: " + "in great detail " * 8, "input": "", "output": "No."}
              for i in range(3)]
    public = [{"instruction": f"Say hello {i} times.", "context": "", "response": "hello " * (i % 4 + 1),
               "category": "open_qa"} for i in range(16)]
    evaluation = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}
                  for i in range(6)]
    files = {}
    for name, rows in [("train", train), ("public", public), ("eval", evaluation)]:
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    for n in (2, 3):
        for i, part in enumerate(split_iid(load_examples(files["train"]), n, SEED), 1):
            files[f"{n}:{i}"] = root / f"split{n}-{i}.jsonl"
            files[f"{n}:{i}"].write_text("".join(
                json.dumps({"instruction": e.prompt, "input": "", "output": e.response}) + "\n" for e in part))
    return files


def simulate(model: Path, data: dict, out: Path, parties: int, *extra: str) -> Path:
    """The in-process run of the same parties (owner --simulate N)."""
    args = ["--simulate", str(parties), "--out", str(out), "--model", str(model), "--party-data", str(data["train"]),
            "--public-data", str(data["public"]), "--eval-data", str(data["eval"]), *TRAIN_ARGS, "--quiet",
            *extra]
    assert owner_main(args) == 0
    return out


# ------------------------------------------------------------------------------------------- the fuzzer

S0 = 1 << 40  # seq of the fuzzer's HELLO: any later message with seq <= S0 is a replay
BAD_VALUES = [None, True, False, -1, 1.5, 2**64, "", "x" * 70, [], [1], {}, {"a": 1}]


class FuzzTarget:
    """What a malformed message is mutated from: the run's real adapter spec and model archive."""

    def __init__(self, out: Path) -> None:
        adapter = {k[len("adapter."):]: v for k, v in
                   load_numpy(str(out / "checkpoints" / "round-0000" / "lora.safetensors")).items()
                   if k.startswith("adapter.")}
        self.adapter = {k: np.zeros_like(v, dtype=np.float32) for k, v in sorted(adapter.items())}
        self.spec = {k: (v.shape, "F32") for k, v in self.adapter.items()}
        self.sha = hashlib.sha256((out / "compressed.tar").read_bytes()).hexdigest()
        self.run_id = (out / "run-id").read_text().strip()
        self.n_chunks = 1
        self.bases = [
            m.heartbeat(), m.chunk_request(0), m.ready(self.sha, self.run_id), m.bye("leaving"),
            m.update(round=0, n_examples=3, tensors=self.adapter), m.update(round=0, n_examples=3),
            m.secagg(round=0, stage="advertise_keys", data={"type": "advertise_keys"},
                     arrays={"c_pk": np.zeros(32, np.uint8)}),
            m.hello(name="fuzzer", n_examples=5),
        ]

    def must_reject(self, frames: list[bytes]) -> bool:
        """Whether the owner is bound to refuse these frames from the (HELLO'd, never ready) fuzzer."""
        try:
            msg = decode(frames, sender="party", expect={MessageType.UPDATE: self.spec})
        except ProtocolError:
            return True
        if msg.type is MessageType.HELLO:  # a valid HELLO would open a new session
            return msg["name"] != "fuzzer" or msg["n_examples"] < 1
        if msg.spec.round_role != "none":  # the fuzzer is never in a round
            return True
        if msg.seq <= S0:
            return True
        if msg.type is MessageType.CHUNK_REQUEST:
            return msg["index"] >= self.n_chunks
        if msg.type is MessageType.READY:
            return msg["model_sha256"] != self.sha or msg["run_id"] != self.run_id
        return False


def _encoded(msg: Message, seq: int) -> list[bytes]:
    msg.seq = seq
    return encode(msg)


@st.composite
def malformed(draw, target: FuzzTarget) -> list[bytes]:
    """One mutation of a valid party message (or random bytes); may occasionally be valid: filtered."""
    base = draw(st.sampled_from(target.bases))
    seq = draw(st.integers(0, S0))
    fresh = draw(st.integers(S0 + 1, 2**62))
    kind = draw(st.sampled_from(["flip", "truncate", "random", "field", "version", "type", "frames", "tensor",
                                 "nan", "replay", "round", "chunk", "ready", "hello"]))
    msg = Message(base.type, dict(base.fields), dict(base.tensors), base.blob)
    if kind in ("flip", "truncate", "frames"):
        frames = _encoded(msg, seq)
        i = draw(st.integers(0, len(frames) - 1))
        if kind == "flip":
            buf = bytearray(frames[i])
            buf[draw(st.integers(0, len(buf) - 1))] ^= 1 << draw(st.integers(0, 7))
            frames[i] = bytes(buf)
        elif kind == "truncate":
            frames[i] = frames[i][: draw(st.integers(0, len(frames[i]) - 1))]
        else:
            frames = [*frames, *draw(st.lists(st.binary(max_size=16), min_size=3 - len(frames), max_size=3))]
        return frames
    if kind == "random":
        return draw(st.lists(st.binary(max_size=64), min_size=1, max_size=3))
    if kind in ("field", "version", "type"):
        frames = _encoded(msg, seq)
        header = json.loads(frames[0])
        if kind == "version":
            header["v"] = draw(st.sampled_from([0, 2, -1, "1", 1.0, None, True, 99]))
        elif kind == "type":
            header["type"] = draw(st.one_of(
                st.sampled_from(["welcome", "chunk", "round_start", "round_end", "reject", "Hello", ""]),
                st.text(max_size=12)))
        else:
            action = draw(st.sampled_from(["drop", "add", "wrong"]))
            if action == "drop":
                del header[draw(st.sampled_from(sorted(header)))]
            elif action == "add":
                header[draw(st.sampled_from(["extra", "round", "tensors", "name", "n_examples", "x"]))] = \
                    draw(st.sampled_from(BAD_VALUES))
            else:
                header[draw(st.sampled_from(sorted(header)))] = draw(st.sampled_from(BAD_VALUES))
        return [json.dumps(header).encode(), *frames[1:]]
    update = m.update(round=draw(st.integers(0, 5)), n_examples=3, tensors=dict(target.adapter))
    if kind in ("tensor", "nan"):
        tensors = update.tensors
        name = draw(st.sampled_from(sorted(tensors)))
        if kind == "nan":
            t = tensors[name].copy()
            t.flat[draw(st.integers(0, t.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
            tensors[name] = t
        else:
            fault = draw(st.sampled_from(["rename", "shape", "dtype", "drop", "extra"]))
            t = tensors.pop(name)
            if fault == "rename":
                tensors[name.replace("lora_", "lora")] = t
            elif fault == "shape":
                tensors[name] = t.reshape(-1) if draw(st.booleans()) else np.zeros((*t.shape, 2), np.float32)
            elif fault == "dtype":
                tensors[name] = t.astype(draw(st.sampled_from([np.float16, np.float64, np.int32])))
            elif fault == "extra":
                tensors[name] = t
                tensors[name + "x"] = t
        frames = _encoded(Message(MessageType.UPDATE, update.fields), draw(st.sampled_from([seq, fresh])))
        return [frames[0], encode_tensors(tensors)] if tensors else frames
    if kind == "replay":  # a valid message, but an old seq
        return _encoded(msg, seq) if base.type is not MessageType.HELLO else _encoded(m.heartbeat(), seq)
    if kind == "round":  # a well-formed update or secure-aggregation message for a round it is not in
        if draw(st.booleans()):
            return _encoded(update, fresh)
        return _encoded(m.secagg(round=update["round"], stage="masked_input", data={"x": 1}), fresh)
    if kind == "chunk":
        return _encoded(m.chunk_request(draw(st.integers(target.n_chunks, 2**31 - 1))), fresh)
    if kind == "ready":
        if draw(st.booleans()):
            return _encoded(m.ready(draw(st.text("0123456789abcdef", min_size=64, max_size=64)), target.run_id),
                            fresh)
        return _encoded(m.ready(target.sha, draw(st.sampled_from(["run-other", "run-" + "0" * 32]))), fresh)
    return _encoded(m.hello(name=draw(st.sampled_from(["party-1", "party-2", "mallory", "fuzzer"])),
                            n_examples=draw(st.integers(0, 3))), fresh)


def generate_fuzz(target: FuzzTarget, count: int) -> list[list[bytes]]:
    """At least `count` messages the owner must refuse, generated by hypothesis."""
    out: list[list[bytes]] = []
    batch = 30

    @settings(max_examples=count // batch + 40, deadline=None, database=None, derandomize=True,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(st.lists(malformed(target), min_size=batch, max_size=batch))
    def collect(cases: list[list[bytes]]) -> None:
        out.extend(frames for frames in cases if target.must_reject(frames))

    collect()
    assert len(out) >= count, f"hypothesis produced only {len(out)} malformed messages"
    return out[:count]


def oversize(target: FuzzTarget) -> list[list[bytes]]:
    """Messages beyond the codec's limits (though within the socket's): a 300 kB header, a tensor header
    claiming 2 MiB, and 5000 tensors in one frame."""
    heartbeat = json.loads(_encoded(m.heartbeat(), 1)[0])
    update = _encoded(m.update(round=0, n_examples=3), 2)[0]
    many = encode_tensors({f"t{i}": np.zeros(1, np.float32) for i in range(5000)})
    out = [[json.dumps({**heartbeat, "pad": "x" * 300_000}).encode()],
           [update, (2 * 1024**2).to_bytes(8, "little") + b"{}"],
           [update, many]]
    assert all(target.must_reject(frames) for frames in out)
    return out


def blast(sock: zmq.Socket, messages: list[list[bytes]]) -> None:
    for frames in messages:
        sock.send_multipart(frames)  # blocks (up to the send timeout) when the owner lags behind


def fuzzer_rejects(out: Path) -> int:
    return sum(1 for e in events(out, "reject") if e["party"] == "fuzzer")


def wait_until(check: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


# ---------------------------------------------------------------------------------- scenario: plain run


def stop_when_connecting(nodes: list[Node], timeout: float = WAIT_S) -> None:
    """SIGSTOP each party as soon as it has started up (imports done, about to say HELLO)."""
    deadline, waiting = time.monotonic() + timeout, list(nodes)
    while waiting:
        for node in list(waiting):
            if "connecting to" in node.text():
                node.signal(signal.SIGSTOP)
                waiting.remove(node)
            elif node.proc.poll() is not None:
                pytest.fail(f"{node.name} exited early:\n{node.text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{[n.name for n in waiting]} did not start within {timeout} s")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, tiny_llama_dir, keys, data) -> dict:
    root = tmp_path_factory.mktemp("plain")
    cluster = Cluster(root, keys, data, tiny_llama_dir)
    result: dict = {"root": root, "out": cluster.out}
    ctx = zmq.Context()
    try:
        owner = cluster.owner("--parties", "3", "--min-parties", "2", "--no-secure-agg",
                              party_timeout=FROZEN_TIMEOUT_S)
        owner.wait_log(r"compressed model archive")
        honest = [cluster.party(f"party-{i}", data[f"2:{i}"], flags=PLAIN) for i in (1, 2)]
        doomed = cluster.party("party-3", data["train"], flags=PLAIN)
        with ThreadPoolExecutor(1) as pool:  # hypothesis works while the parties start up
            target = FuzzTarget(cluster.out)
            fuzz_future = pool.submit(generate_fuzz, target, FUZZ_MESSAGES)
            stop_when_connecting([*honest, doomed])  # nobody joins before the flood is refused
            fuzz = oversize(target) + fuzz_future.result()

        # Intruders, as the real party command: an unknown key, and an allowlisted key pinning another owner.
        intruders = [cluster.party("mallory", data["2:1"], roster=False),
                     cluster.start("party-4", party_args(cluster.endpoint, "party-4", data["2:1"], keys, root,
                                                         owner_key=keys["other-owner"][0]))]
        result["mallory"], result["wrong_pin"] = [node.exit_code() for node in intruders]

        fuzzer = connect_dealer(cluster.endpoint, keys["fuzzer"][1], keys["owner"][0], name="fuzzer",
                                context=ctx)
        fuzzer.send_multipart(_encoded(m.hello(name="fuzzer", n_examples=5), S0))
        blast(fuzzer, fuzz[:-FUZZ_LATE])
        wait_until(lambda: fuzzer_rejects(cluster.out) >= len(fuzz) - FUZZ_LATE, "the owner to refuse the flood")

        # party-3 gets ready first and is frozen: it counts as ready until the round opens, never answers.
        doomed.signal(signal.SIGCONT)
        owner.wait_log(r"party-3 is ready")
        doomed.signal(signal.SIGSTOP)
        for node in honest:
            node.signal(signal.SIGCONT)
        owner.wait_log(r"round 1/2: 3 parties")
        blast(fuzzer, fuzz[-FUZZ_LATE:])  # more junk while party-1 and party-2 train
        doomed.kill()  # gone for good in the middle of round 1
        result["owner_rc"] = owner.exit_code()
        result["party_rcs"] = [p.exit_code() for p in honest]
        result["fuzz_sent"] = len(fuzz)
        inbox = []
        while fuzzer.poll(0):
            inbox.append(decode(fuzzer.recv_multipart(), sender="owner"))
        result["fuzzer_inbox"] = inbox
        fuzzer.close(linger=0)
        result["logs"] = {n.name: n.text() for n in cluster.nodes}
    finally:
        cluster.close()
        ctx.destroy(linger=0)
    result["simulated"] = simulate(tiny_llama_dir, data, root / "simulated", 2)
    return result


def test_plain_networked_run_equals_the_in_process_run(plain_run):
    assert plain_run["owner_rc"] == 0, plain_run["logs"]["owner"][-3000:]
    assert plain_run["party_rcs"] == [0, 0]
    assert any("examples whose prompt leaves no response token" in plain_run["logs"][f"party-{i}"] for i in (1, 2))
    out = plain_run["out"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["secure_agg"] is False
    assert_same_adapter(adapfu(out), adapfu(plain_run["simulated"]))


def test_a_party_killed_mid_round_is_left_out_and_the_round_completes(plain_run):
    rounds = events(plain_run["out"], "round")
    assert [r["round"] for r in rounds] == [1, 2]
    assert [r["participants"] for r in rounds] == [["party-1", "party-2"]] * 2
    assert "party-3 is gone" in plain_run["logs"]["owner"]
    # FedAvg renormalised over the two that answered: the same adapter as a two-party run (checked above).


def test_an_unknown_key_is_refused(plain_run):
    assert plain_run["mallory"] == 2
    owner_log = plain_run["logs"]["owner"]
    assert "refused a connection" in owner_log
    # The fuzzer's forged HELLOs may name mallory; nothing else in the owner's log may.
    assert not [line for line in owner_log.splitlines() if "mallory" in line and "fuzzer" not in line]
    assert "this party's key" in plain_run["logs"]["mallory"]
    assert json.loads((plain_run["out"] / "summary.json").read_text())["refused_connections"] >= 1
    assert {e["party"] for e in events(plain_run["out"], "join")} == {"party-1", "party-2", "party-3", "fuzzer"}


def test_a_party_pinning_the_wrong_owner_key_cannot_talk(plain_run):
    assert plain_run["wrong_pin"] == 2
    assert "is not the key of the owner listening there" in plain_run["logs"]["party-4"]
    assert not [line for line in plain_run["logs"]["owner"].splitlines() if "party-4" in line and "fuzzer" not in line]
    assert not [e for e in events(plain_run["out"], "reject") if e["party"] == "party-4"]


def test_the_fuzzed_owner_refuses_every_malformed_message_and_keeps_serving(plain_run):
    out, sent = plain_run["out"], plain_run["fuzz_sent"]
    assert sent >= 10_000
    summary = json.loads((out / "summary.json").read_text())
    rejects = events(out, "reject")
    assert summary["rejected_messages"] == sent == len(rejects)
    assert {e["party"] for e in rejects} == {"fuzzer"} and all(e["reason"] for e in rejects)
    reasons = " | ".join(e["reason"] for e in rejects)
    for why in ("not valid JSON", "protocol version", "unknown message type", "wrong tensor names", "has shape",
                "has dtype", "NaN or Inf", "header frame has", "more than 4096", "safetensors header claims",
                "replayed", "while no round is in progress", "does not exist", "HELLO names", "READY for run"):
        assert why in reasons, f"no message was refused for {why!r}"
    # Nothing it sent was served: the owner only welcomed it, refused it and said goodbye.
    inbox = plain_run["fuzzer_inbox"]
    assert {msg.type for msg in inbox} <= {MessageType.WELCOME, MessageType.REJECT, MessageType.BYE}
    assert sum(msg.type is MessageType.REJECT for msg in inbox) > 0
    assert "fuzzer is ready" not in plain_run["logs"]["owner"]


# --------------------------------------------------------------- scenario: secure aggregation, owner crash


@pytest.fixture(scope="module")
def crash_run(tmp_path_factory, tiny_llama_dir, keys, data) -> dict:
    root = tmp_path_factory.mktemp("crash")
    cluster = Cluster(root, keys, data, tiny_llama_dir)
    result: dict = {"out": cluster.out}
    try:
        first = cluster.owner("--parties", "3", "--secure-agg")
        parties = [cluster.party(f"party-{i}", data[f"3:{i}"], flags=REPRODUCIBLE) for i in (1, 2, 3)]
        # Killed while the parties join: deterministic. (Once a round has started, a party that trained claims it
        # before its first key leaves, so a resumed owner skips that round: the second-job scenario tests that.)
        first.wait_log(r"party-\d joined")
        first.kill()
        result["first_rc"] = first.proc.returncode
        second = cluster.owner("--parties", "3", "--secure-agg", "--resume", tag="owner-resumed")
        result["owner_rc"] = second.exit_code()
        result["party_rcs"] = [p.exit_code() for p in parties]
        result["logs"] = {n.name: n.text() for n in cluster.nodes}
    finally:
        cluster.close()
    result["simulated"] = simulate(tiny_llama_dir, data, root / "simulated", 3, "--secure-agg")
    return result


def test_owner_killed_and_resumed_completes_every_round_once(crash_run):
    assert crash_run["first_rc"] == -signal.SIGKILL  # it really was killed, not finished
    assert crash_run["owner_rc"] == 0, crash_run["logs"]["owner-resumed"][-3000:]
    assert crash_run["party_rcs"] == [0, 0, 0]
    assert [r["round"] for r in events(crash_run["out"], "round")] == [1, 2]
    assert "resumed from round-0000" in crash_run["logs"]["owner-resumed"]
    for name in ("party-1", "party-2", "party-3"):  # the model came once; the restarted owner was rejoined
        assert crash_run["logs"][name].count("downloading the compressed model") == 1


def test_secure_networked_run_equals_the_in_process_secure_run(crash_run):
    out = crash_run["out"]
    assert json.loads((out / "summary.json").read_text())["secure_agg"] is True
    assert all(r["secure_agg"] for r in events(out, "round"))
    assert_same_adapter(adapfu(out), adapfu(crash_run["simulated"]))


# --------------------------------------------- scenario: a resumed run, then a second job with the same parties


@pytest.fixture(scope="module")
def second_job_run(tmp_path_factory, tiny_llama_dir, keys, data) -> dict:
    """Job A: both parties pause right after masking round 1 (tests.faulty_party), the owner is killed in that
    window, before it could close the round, and resumed. Job B: a new owner with a new --out, the same two
    parties with the same work directories (ledgers holding job A's rounds), as a consortium's next job."""
    root = tmp_path_factory.mktemp("second-job")
    cluster = Cluster(root, keys, data, tiny_llama_dir)
    resume = root / "resume"
    result: dict = {"out": cluster.out, "out_b": root / "out-b", "root": root}
    flags = ("--parties", "3", "--secure-agg")
    pause = {"FEDBIOT_TEST_FAULT": "pause", "FEDBIOT_TEST_RESUME": str(resume)}
    try:
        first = cluster.owner(*flags, party_timeout=60)
        paused = [cluster.party(f"party-{i}", data[f"3:{i}"], module="tests.faulty_party", env=pause)
                  for i in (1, 2, 3)]
        for node in paused:
            node.wait_log(re.escape(faulty_party.PAUSED))
        first.kill()  # the parties' masked inputs of round 1 are out; the round was never closed
        result["first_rc"] = first.proc.returncode
        result["checkpoint_at_kill"] = latest_checkpoint_dir(cluster.out).name
        resumed = cluster.owner(*flags, "--resume", tag="owner-resumed", party_timeout=60)
        resume.touch()
        result["resumed_rc"] = resumed.exit_code()
        result["paused_rcs"] = [node.exit_code() for node in paused]

        cluster.out = result["out_b"]
        second = cluster.owner(*flags, "--seed", "1", tag="owner-b")  # its own seed: its own initial state
        again = [cluster.party(f"party-{i}", data[f"3:{i}"], tag=f"party-{i}-b") for i in (1, 2, 3)]
        result["b_rc"] = second.exit_code()
        result["b_party_rcs"] = [node.exit_code() for node in again]
        result["logs"] = {n.name: n.text() for n in cluster.nodes}
    finally:
        cluster.close()
    return result


def test_a_resumed_owner_leaves_out_the_parties_that_masked_its_round_before_the_crash(second_job_run):
    run = second_job_run
    assert run["first_rc"] == -signal.SIGKILL and run["checkpoint_at_kill"] == "round-0000"
    log = run["logs"]["owner-resumed"]
    assert run["resumed_rc"] == 0 and run["paused_rcs"] == [0, 0, 0], log[-3000:]
    for name in ("party-1", "party-2", "party-3"):
        assert f"{name} is ready (took part in this run up to round 1)" in log
        assert f"{name} already took part in round 1 before a restart" in log
    rounds = events(run["out"], "round")
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["participants"] == [] and "never aggregated twice" in rounds[0]["skipped"]
    assert rounds[1]["participants"] == ["party-1", "party-2", "party-3"] and "skipped" not in rounds[1]


def test_a_second_job_with_the_same_party_work_directories_trains_every_round(second_job_run):
    run = second_job_run
    log = run["logs"]["owner-b"]
    assert run["b_rc"] == 0 and run["b_party_rcs"] == [0, 0, 0], log[-3000:]
    assert "already took part" not in log and "skipped" not in log and "took part in this run" not in log
    rounds = events(run["out_b"], "round")
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["participants"] == ["party-1", "party-2", "party-3"] and "skipped" not in r for r in rounds)
    assert "untrained" not in json.loads((run["out_b"] / "summary.json").read_text())
    assert max(float(t.abs().max()) for n, t in adapfu(run["out_b"]).items() if "lora_B" in n) > 1e-4
    for i in (1, 2, 3):  # the ledger holds both jobs; the second was not read as the first
        ledger = json.loads((run["root"] / f"work-party-{i}" / "secagg-ledger.json").read_text())
        assert len(ledger["rounds"]) == 2
        assert "the owner ended the run: run finished" in run["logs"][f"party-{i}-b"]


# ------------------------------------------------------------ scenario: secure aggregation with dropouts


@pytest.fixture(scope="module")
def dropout_run(tmp_path_factory, tiny_llama_dir, keys, data) -> dict:
    root = tmp_path_factory.mktemp("dropout")
    cluster = Cluster(root, keys, data, tiny_llama_dir)
    result: dict = {"out": cluster.out}
    flags = ("--parties", "4", "--min-parties", "3", "--secure-agg")
    try:
        owner = cluster.owner(*flags)
        parties = [cluster.party(f"party-{i}", data[f"3:{i}"]) for i in (1, 2, 3)]
        quitter = cluster.party("party-4", data["train"], module="tests.faulty_party")
        owner.wait_log(r"round 1 alignment")  # round 1 is aggregated: everybody's part in it is done
        parties[1].kill()  # leaves party-1 and party-3 in round 2: fewer than --min-parties
        result["abort_rc"] = owner.exit_code()
        result["first_party_rcs"] = [parties[0].exit_code(), parties[2].exit_code(), quitter.exit_code()]
        result["after_abort"] = latest_checkpoint_dir(cluster.out)
        result["rounds_after_abort"] = [r["round"] for r in events(cluster.out, "round")]

        resumed = cluster.owner(*flags, "--resume", "--rounds", "3", tag="owner-resumed")
        again = [cluster.party(f"party-{i}", data[f"3:{i}"] if i < 4 else data["train"], tag=f"party-{i}-again")
                 for i in (1, 2, 3, 4)]
        resumed.wait_log(r"round 2 alignment")
        again[2].kill()  # between rounds: still counted as ready when round 3 is planned
        result["owner_rc"] = resumed.exit_code()
        result["party_rcs"] = [p.exit_code() for p in again]
        result["logs"] = {n.name: n.text() for n in cluster.nodes}
    finally:
        cluster.close()
    return result


def test_secure_round_completes_when_a_party_drops_after_sharing_keys(dropout_run):
    logs = dropout_run["logs"]
    assert dropout_run["first_party_rcs"][2] == faulty_party.EXIT_STATUS
    assert faulty_party.MESSAGE in logs["party-4"]
    first = events(dropout_run["out"], "round")[0]
    assert first["round"] == 1 and first["secure_agg"]
    assert first["participants"] == ["party-1", "party-2", "party-3"]
    assert re.search(r"party-4 is gone .*round 1 masked inputs", logs["owner"])


def test_too_few_parties_abort_cleanly_with_the_checkpoint_intact(dropout_run):
    assert dropout_run["abort_rc"] == 2
    last = dropout_run["logs"]["owner"].strip().splitlines()[-1]
    assert last.startswith("error: round 2") and "minimum 3" in last and "--resume" in last, last
    assert dropout_run["after_abort"].name == "round-0001"
    assert load_checkpoint(dropout_run["after_abort"]).round == 1
    assert dropout_run["rounds_after_abort"] == [1]
    assert dropout_run["first_party_rcs"][:2] == [1, 1]  # told the run stopped early: not a success
    assert "owner stopped before the end of the run" in dropout_run["logs"]["party-1"]


def test_restarted_parties_rejoin_with_their_downloaded_model(dropout_run):
    assert dropout_run["owner_rc"] == 0, dropout_run["logs"]["owner-resumed"][-3000:]
    assert dropout_run["party_rcs"] == [0, 0, -signal.SIGKILL, 0]
    rounds = events(dropout_run["out"], "round")
    assert [r["round"] for r in rounds] == [1, 2, 3]
    # party-1 and party-3 advertised their keys in the aborted round 2: they claimed it, so the resumed owner
    # cannot start it again with them (no redraw of a round), and with two parties left round 2 is skipped.
    logs = dropout_run["logs"]
    for i in (1, 3):
        assert f"party-{i} already took part in round 2 before a restart" in logs["owner-resumed"]
    assert rounds[1]["participants"] == [] and "already contributed to round 2" in rounds[1]["skipped"]
    for i in (1, 2, 3, 4):
        assert "downloading" not in logs[f"party-{i}-again"]
        assert re.search(rf"party-{i} joined \(at most \d+ examples, has the model\)", logs["owner-resumed"])


def test_secure_round_completes_when_an_invited_party_is_gone_before_advertising(dropout_run):
    last = events(dropout_run["out"], "round")[-1]
    assert last["round"] == 3 and last["secure_agg"]
    assert last["participants"] == ["party-1", "party-2", "party-4"]
    assert json.loads((dropout_run["out"] / "summary.json").read_text())["rounds"] == 3


# ----------------------------------------------------------------------------------- refused before start


def test_a_busy_port_or_bad_flags_leave_no_run_behind(tiny_llama_dir, keys, data, tmp_path, capsys):
    base = ["--out", str(tmp_path / "out"), "--model", str(tiny_llama_dir), "--key", str(keys["owner"][1]),
            "--allow", str(keys["allow"]), "--public-data", str(data["public"]), "--eval-data",
            str(data["eval"]), *TRAIN_ARGS, "--parties", "3", "--quiet"]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert owner_main(["--listen", f"tcp://127.0.0.1:{busy.getsockname()[1]}", *base]) == 2
    assert "cannot listen" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing at all: a plain rerun is not refused as "not empty"
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    assert owner_main(["--listen", endpoint, *base, "--min-parties", "4"]) == 2
    assert "--min-parties" in capsys.readouterr().err
    assert owner_main(["--listen", endpoint, *base, "--min-parties", "2"]) == 2
    assert "secure aggregation needs at least 3" in capsys.readouterr().err
    assert owner_main(["--listen", endpoint, *base, "--party-timeout", "0"]) == 2
    assert "--party-timeout" in capsys.readouterr().err


def test_a_new_run_that_fails_after_creating_out_leaves_nothing_and_a_failed_resume_keeps_the_run(
        tiny_llama_dir, keys, data, tmp_path, capsys):
    """--target-modules that match no layer fail only when the session attaches LoRA, after config.json and
    the compressed model were written into --out: a new run removes them again (and --out, if it made it); a
    failed --resume removes nothing. A non-empty --out is refused before the model is loaded."""
    def listen(out: Path, *extra: str) -> int:
        return owner_main(["--listen", f"tcp://127.0.0.1:{free_port()}", "--out", str(out), "--key",
                           str(keys["owner"][1]), "--allow", str(keys["allow"]), "--public-data", str(data["public"]),
                           "--eval-data", str(data["eval"]), *TRAIN_ARGS, "--parties", "3", "--quiet", *extra])

    model = ["--model", str(tiny_llama_dir)]
    assert listen(tmp_path / "new", *model, "--target-modules", "no_such_proj") == 2
    assert "no_such_proj" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert listen(empty, *model, "--target-modules", "no_such_proj") == 2
    assert "no_such_proj" in capsys.readouterr().err
    assert empty.is_dir() and not any(empty.iterdir())

    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("kept\n")
    assert listen(run, "--model", str(tmp_path / "no-such-model")) == 2  # refused before loading the model
    assert "is not empty" in capsys.readouterr().err
    RunConfig(model=str(tiny_llama_dir), parties=3, rounds=2, public_data=str(data["public"]),
              eval_data=str(data["eval"]), public_limit=16, eval_items=4, max_length=96, secure_agg=True,
              lora=LoraSettings(target_modules=("no_such_proj",))).save(run / "config.json")
    saved = (run / "config.json").read_text()
    assert listen(run, "--resume") == 2
    assert "no_such_proj" in capsys.readouterr().err
    assert (run / "config.json").read_text() == saved and (run / "notes.txt").read_text() == "kept\n"
