"""Bytes on the ZeroMQ wire, counted from the messages the networked nodes really build.

Every figure is the length of the frames `protocol.codec.encode` produces for the message a node sends
(header frame + safetensors frame); ZMTP/CurveZMQ framing adds a few tens of bytes per frame on top and is
not counted. Secure aggregation runs the real state machines with every message carried through the
protocol codec and decoded again on the other side (`aggregate_in_process(..., transit=...)`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from learning.secure_update import secagg_config
from protocol import messages as m
from protocol.chunks import pack_dir
from protocol.codec import decode, encode
from secure_agg import aggregate_in_process

DEADLINE_S = 600.0
# What PartyTrainer reports; the values only change the JSON header by a few bytes.
STATS = {"loss_first": 1.234567, "loss_last": 1.234567, "loss_mean": 1.234567, "steps": 8, "tokens": 4096,
         "seconds": 12.345678, "tokens_per_s": 123.456789}


def frame_bytes(msg: m.Message) -> int:
    return sum(len(frame) for frame in encode(msg))


def protocol_transit(round_id: int):
    """A secure_agg transit that sends each stage message as a protocol SECAGG message and decodes it."""

    def transit(header: dict, arrays: dict[str, np.ndarray]) -> tuple[int, dict, dict[str, np.ndarray]]:
        frames = encode(m.secagg(round=round_id, stage=header["type"], data=header, arrays=arrays))
        got = decode(frames)
        return sum(len(f) for f in frames), got["data"], dict(got.tensors)

    return transit


@dataclass
class RoundBytes:
    """Per party and round: bytes down (owner -> party) and up, plain and with secure aggregation."""

    down_plain: int
    up_plain: int
    down_secure: int
    up_secure: int
    raw_adapter: int  # the adapter LoRA as bare float32 values
    ring_bits: int
    frac_bits: int
    parties: int

    def to_dict(self) -> dict:
        return {**vars(self), "up_plain_ratio": self.up_plain / self.raw_adapter,
                "up_secure_ratio": self.up_secure / self.raw_adapter}


def round_bytes(adapter: Mapping[str, torch.Tensor], emulator: Mapping[str, torch.Tensor],
                n_examples: Sequence[int], seed: int = 0, round_id: int = 1) -> RoundBytes:
    """Wire bytes of one round for the first of `len(n_examples)` parties with these data sizes."""
    n = len(n_examples)
    round_end = frame_bytes(m.round_end(round=round_id, summary={}))
    down_plain = frame_bytes(m.round_start(round=round_id, deadline_s=DEADLINE_S, adapter=adapter,
                                           emulator=emulator)) + round_end
    up_plain = frame_bytes(m.update(round=round_id, n_examples=n_examples[0], stats=STATS,
                                    tensors=dict(adapter)))
    raw = 4 * sum(t.numel() for t in adapter.values())
    cfg = secagg_config(n_examples, seed)
    fields = {"config": cfg.to_dict(), "n_parties": n, "session": "run-0123456789abcdef", "party_id": 0}
    start = frame_bytes(m.round_start(round=round_id, deadline_s=DEADLINE_S, adapter=adapter, emulator=emulator,
                                     secagg=fields))
    length = sum(t.numel() for t in adapter.values())
    rng = np.random.default_rng([seed, round_id, length])
    vectors = [rng.normal(0.0, 1e-3, length) for _ in range(n)]
    result = aggregate_in_process(vectors, list(n_examples), cfg, round_id=round_id, seed=seed,
                                  transit=protocol_transit(round_id))
    stats_only = frame_bytes(m.round_stats(round=round_id, stats=STATS))
    return RoundBytes(down_plain=down_plain, up_plain=up_plain,
                      down_secure=start + result.party_received[0] + round_end,
                      up_secure=stats_only + result.party_sent[0], raw_adapter=raw,
                      ring_bits=result.ring_bits, frac_bits=cfg.frac_bits, parties=n)


def shipping_bytes(compressed_dir: Path, archive: Path) -> dict[str, int]:
    """The compressed model as shipped once: archive size and the CHUNK messages that carry it."""
    source = pack_dir(compressed_dir, archive)
    wire = sum(frame_bytes(m.chunk(i, source.chunk(i))) for i in range(source.info.n_chunks))
    files = sum(p.stat().st_size for p in Path(compressed_dir).rglob("*") if p.is_file())
    return {"files": files, "archive": source.info.model_size, "wire": wire, "chunks": source.info.n_chunks}
