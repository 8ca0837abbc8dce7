"""The `owner --listen` node's start-up: check the options, bind the CurveZMQ socket, start the run as the
in-process run does (`owner.startup`: run directory, config, the same `OwnerSession`), ship the compressed
model, run the rounds, say BYE.

`owner.links` holds the connections (sessions, liveness, admission) and `owner.rounds` the rounds.
"""

from __future__ import annotations

import secrets
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
import zmq

from console.progress import counted
from errors import ConfigError
from owner.config import RunConfig
from owner.links import OwnerLinks
from owner.metrics import MetricsLog, megabytes
from owner.models import decoder_layers
from owner.rounds import RoundDriver
from owner.serve_options import ServeOptions
from owner.startup import OwnerStart
from protocol.chunks import pack_dir
from protocol.codec import DEFAULT_LIMITS
from protocol.keys import load_allowlist, write_public_key
from protocol.messages import RUN_FINISHED, RUN_UNTRAINED
from protocol.sockets import bind_router, close_router
from secure_agg.identity import ConsortiumRoster


def inbound_limit(model: torch.nn.Module, config: RunConfig) -> int:
    """The largest frame a party may send: its adapter update, as float32 (plain) or in a ring of at most 64
    bits (masked), with room to spare. ZeroMQ drops a connection whose frame is bigger before buffering it,
    so an allowlisted party cannot make the owner hold hundreds of MB per message."""
    layers = decoder_layers(model)
    bottom, top = config.adapter_layout(len(layers))
    adapter = [*layers[:bottom], *layers[len(layers) - top:]]
    numel = sum(config.lora.r * (mod.in_features + mod.out_features)
                for layer in adapter for mod in layer.modules() if isinstance(mod, torch.nn.Linear))
    return min(8 * numel + (1 << 20), DEFAULT_LIMITS.max_frame_bytes)


def refusal_monitor(sock: zmq.Socket) -> zmq.Socket:
    """A monitor of `sock` that reports only ZAP refusals (see `OwnerLinks.watch_refusals`)."""
    return sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def run_id_for(out_dir: Path) -> str:
    """The run's id (the secure-aggregation session, what parties' ledgers are keyed by): drawn at random when
    the run starts and kept in OUT/run-id, so `--resume` continues the same run and a new run in the same
    directory is a new run to every party."""
    path = Path(out_dir) / "run-id"
    if path.is_file():
        run_id = path.read_text().strip()
        if run_id.startswith("run-") and len(run_id) == 36 and all(c in "0123456789abcdef" for c in run_id[4:]):
            return run_id
        raise ConfigError(f"{path} is damaged: expected run- and 32 hex digits")
    run_id = "run-" + secrets.token_hex(16)
    path.write_text(run_id + "\n")
    return run_id


@contextmanager
def allowlist_dir(allow: Path) -> Iterator[Path]:
    """`--allow` as a directory of NAME.key files, as it is; or a consortium roster (the file every party pins,
    `secure_agg.identity`) as such a directory, written for the life of the run."""
    if Path(allow).is_dir():
        yield Path(allow)
        return
    if not Path(allow).exists():
        raise ConfigError(f"--allow {allow}: no such directory of party keys, nor a roster file")
    roster = ConsortiumRoster.load(allow)
    with tempfile.TemporaryDirectory(prefix="fedbiot-allow-") as tmp:
        for name, key in roster.allowlist().items():
            write_public_key(tmp, name, key)
        yield Path(tmp)


def serve(config: RunConfig, opts: ServeOptions, log: MetricsLog) -> dict:
    """`owner --listen`: validate inputs, bind, prepare the session, serve rounds, export."""
    with allowlist_dir(opts.allow) as allow:
        return _serve(config, replace(opts, allow=allow), log)


def _serve(config: RunConfig, opts: ServeOptions, log: MetricsLog) -> dict:
    start = OwnerStart.begin(config, opts.out, opts.resume, log)
    config, out_dir = start.config, start.out_dir
    min_parties = opts.min_parties or config.parties
    if not 1 <= min_parties <= config.parties:
        raise ConfigError(f"--min-parties must be between 1 and --parties ({config.parties})")
    if config.secure_agg and min_parties < 3:
        raise ConfigError("secure aggregation needs at least 3 parties per round (--min-parties >= 3): with one "
                          "colluder assumed, as every party assumes by default, fewer cannot keep two honest "
                          "inputs in every sum; or pass --no-secure-agg")
    for flag, value in (("--join-timeout", opts.join_timeout), ("--round-timeout", opts.round_timeout),
                        ("--party-timeout", opts.party_timeout)):
        if not value > 0:
            raise ConfigError(f"{flag} must be a positive number of seconds, got {value}")
    allowlist = load_allowlist(opts.allow)
    base, owner_data = start.load_inputs()
    limit = inbound_limit(base.model, config)
    # Bind before --out is created: a busy port leaves nothing behind.
    sock, auth = bind_router(opts.listen, opts.key, opts.allow, max_msg_size=limit)
    monitor = refusal_monitor(sock)  # from the start: parties may knock while the owner pre-aligns
    links = None
    try:
        log.say(f"listening on {opts.listen} for {counted(config.parties, 'party')} "
                f"({counted(len(allowlist), 'key')} allowed)")
        with start.session(base, owner_data) as session:
            archive = pack_dir(session.compressed_dir, out_dir / "compressed.tar")
            log.say(f"compressed model archive: {megabytes(archive.info.model_size):.1f} MB in "
                    f"{archive.info.n_chunks} chunks")
            driver: RoundDriver | None = None
            run_id = run_id_for(out_dir)
            links = OwnerLinks(sock, allowlist, archive, log, run_id=run_id, welcome=lambda: driver.welcome(),
                               party_timeout=opts.party_timeout, monitor=monitor)
            driver = RoundDriver(session, config, links, log, run_id=run_id,
                                 min_parties=min_parties, join_timeout=opts.join_timeout,
                                 round_timeout=opts.round_timeout, party_timeout=opts.party_timeout)
        summary = driver.run()
        untrained = summary.get("untrained")
        links.goodbye(f"{RUN_UNTRAINED}: {untrained}" if untrained else RUN_FINISHED)
        return summary
    except BaseException as exc:
        if links is not None:
            links.goodbye(f"owner stopped: {exc or type(exc).__name__}"[:200])
        raise
    finally:
        if links is not None:
            time.sleep(0.2)  # let the BYEs leave before the socket closes
        sock.disable_monitor()
        monitor.close(linger=0)
        close_router(sock, auth)
