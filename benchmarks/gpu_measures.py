"""The measurements of the GPU check (`benchmarks.gpu_check` runs each in a process of its own): each takes a
scratch folder, returns its figures and raises (AssertionError, with the numbers) when what it checks does not
hold. All run on the embedded SmolLM2-135M-Instruct on `cuda`, with short runs (a few steps, one or two rounds),
so the whole check stays within minutes on one GPU. `GPU_CHECK_DEVICE=cpu` runs them on the CPU instead, to try
one out where there is no GPU (slowly; the GPU-only assertions then name the CPU).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")
CUDA = torch.device(DEVICE)
# a short simulated run: enough for a round of every node, little else
SHORT_RUN = ("--rounds", "1", "--local-steps", "4", "--batch-size", "4", "--max-length", "256", "--align-pre-steps",
             "2", "--align-steps", "1", "--eval-items", "8", "--public-limit", "16", "--quiet")


def _examples(count: int):
    from tasks.datasets import Example  # noqa: PLC0415

    colours = "red blue green yellow".split()
    return [Example(f"Name a colour for item {i}.", f"Item {i} is {colours[i % 4]}, as always.")
            for i in range(count)]


def _owner_models(dtype: torch.dtype, share: bool = True):
    """(loaded full model, compressed model, manifest) on cuda, as the owner builds them."""
    from owner.compress import compress  # noqa: PLC0415
    from owner.models import Placement, load_model  # noqa: PLC0415

    loaded = load_model(None, dtype, Placement({"": f"{DEVICE}:0" if DEVICE == "cuda" else DEVICE}, None, None))
    compressed, manifest = compress(loaded.model, 2, 0.2, loaded.identity, share_weights=share)
    return loaded, compressed, manifest


def _aligner(loaded, compressed, manifest, **settings):
    """The owner's aligner on the default public set (dolly, up to 256 tokens an item, batch 4: the defaults)."""
    from learning.lora import LoraSettings, attach_lora  # noqa: PLC0415
    from owner.alignment import AlignSettings, EmulatorAligner  # noqa: PLC0415
    from owner.config import RunConfig  # noqa: PLC0415
    from tasks.datasets import load_examples  # noqa: PLC0415
    from tasks.prompts import tokenize_examples  # noqa: PLC0415

    lora = LoraSettings(r=8, alpha=16)
    student = attach_lora(compressed, manifest.emulator_layers + manifest.adapter_layers, lora, seed=1)
    teacher = attach_lora(loaded.model, manifest.full_adapter_layers, lora, seed=1)
    data = tokenize_examples(load_examples(RunConfig().public_data, limit=32), loaded.tokenizer, 256, "auto")
    return EmulatorAligner(student, teacher, manifest, data, loaded.tokenizer.pad_token_id,
                           AlignSettings(batch_size=4, lr=1e-3, **settings), seed=0)


def _first(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def shared_storage(work: Path) -> dict:
    """The compressed model's tensors on the GPU are the full model's own (no second copy of any weight)."""
    loaded, compressed, _ = _owner_models(torch.bfloat16)
    full = {p.data_ptr() for p in loaded.model.parameters()}
    params = list(compressed.parameters())
    devices = {str(p.device) for p in params}
    own = [p for p in params if p.data_ptr() not in full]
    assert devices == {str(_first(compressed))} and not own, (devices, len(own))
    return {"tensors_shared": len(params), "bytes_shared": sum(p.numel() * p.element_size() for p in params)}


def cache_equality(work: Path) -> dict:
    """Alignment with the E* cache gives the losses it gives without (float32 and bfloat16 on the GPU)."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        runs = {}
        for cache in (False, True):
            torch.manual_seed(0)
            loaded, compressed, manifest = _owner_models(dtype)
            aligner = _aligner(loaded, compressed, manifest, cache_teacher=cache)
            info = aligner.run(4, -1)
            runs[cache] = (info["loss_first"], info["loss_last"], info["seconds"])
        diff = max(abs(runs[True][0] - runs[False][0]), abs(runs[True][1] - runs[False][1]))
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        name = str(dtype).removeprefix("torch.")
        assert diff <= tol * max(1.0, abs(runs[False][1])), (name, runs)
        out[name] = {"loss_last": runs[False][1], "max_difference": diff,
                     "speedup": runs[False][2] / max(runs[True][2], 1e-9)}
    return out


def owner_memory(work: Path) -> dict:
    """The owner's peak GPU memory in an alignment step against the bytes of its weights (bf16, default batch)."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        loaded, compressed, manifest = _owner_models(dtype)
        model_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
        aligner = _aligner(loaded, compressed, manifest)
        aligner.run(1, -1)  # allocator warm, optimizer state made
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        aligner.run(3, -1)
        peak = torch.cuda.max_memory_allocated()
        out[str(dtype).removeprefix("torch.")] = {"model_gb": model_bytes / 1e9, "peak_gb": peak / 1e9,
                                                  "peak_over_model": peak / model_bytes}
        del aligner, loaded, compressed
        torch.cuda.empty_cache()
    return out


def _simulate(work: Path, label: str, *flags: str) -> tuple[dict, list[dict]]:
    """An `owner --simulate 2` run on cuda: its summary and its round records."""
    from owner.cli import main  # noqa: PLC0415

    out = work / label
    code = main(["--simulate", "2", "--out", str(out), "--device", DEVICE, *SHORT_RUN, *flags])
    assert code == 0, f"{label}: owner exited {code}"
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return summary, [r for r in rows if r.get("event") == "round"]


def _party_figures(summary: dict, rounds: list[dict]) -> dict:
    parties = [s for r in rounds for s in r["parties"].values()]
    assert parties and all(s.get("tokens_per_s", 0) > 0 for s in parties), rounds
    return {"tokens_per_s": sum(s["tokens_per_s"] for s in parties) / len(parties),
            "train_loss": rounds[-1]["train_loss"], "nll_adapfu": summary["nll_adapfu"]}


def party_precision(work: Path) -> dict:
    """Party rounds in float32 and in bfloat16 (named explicitly): tokens/s and losses side by side."""
    out = {dtype: _party_figures(*_simulate(work, dtype, "--dtype", dtype)) for dtype in ("float32", "bfloat16")}
    assert abs(out["bfloat16"]["nll_adapfu"] - out["float32"]["nll_adapfu"]) < 0.1, out
    out["bf16_speedup"] = out["bfloat16"]["tokens_per_s"] / out["float32"]["tokens_per_s"]
    return out


def float16_gradients(work: Path) -> dict:
    """A float16 party on the GPU: finite, nonzero LoRA updates (loss scaling on), and a float16 simulated run."""
    from learning.hardware import Hardware  # noqa: PLC0415
    from learning.lora import LoraSettings, lora_state  # noqa: PLC0415
    from learning.party_model import PartyModel  # noqa: PLC0415
    from learning.training import TrainSettings  # noqa: PLC0415
    from owner.compress import save_compressed  # noqa: PLC0415

    loaded, compressed, manifest = _owner_models(torch.float32, share=False)
    save_compressed(compressed.cpu(), loaded.tokenizer, manifest, work / "compressed")
    del loaded, compressed
    lora = LoraSettings(r=8, alpha=16)
    party = PartyModel.load(work / "compressed", lora, 0, Hardware(CUDA, torch.float16))
    trainer = party.trainer("p", party.tokenize(_examples(16), 256, "chat"), lora,
                            TrainSettings(local_steps=4, batch_size=4, lr=1e-3), 0)
    assert trainer.scaler.is_enabled()
    before = lora_state(party.model, party.manifest.adapter_layers)
    update = trainer.train_round(0, before, lora_state(party.model, party.manifest.emulator_layers))
    moved = max(float((update.adapter_state[n] - before[n]).abs().max()) for n in before)
    finite = all(bool(torch.isfinite(t).all()) for t in update.adapter_state.values())
    assert finite and moved > 0, (finite, moved)
    summary, rounds = _simulate(work, "simulated", "--dtype", "float16")
    assert all(torch.isfinite(torch.tensor(summary[k])) for k in ("nll_adapfu", "nll_adapemu")), summary
    return {"largest_update": moved, "loss_scale": float(trainer.scaler.get_scale()),
            "loss_last": update.stats["loss_last"], **_party_figures(summary, rounds)}


def dp_and_nf4(work: Path) -> dict:
    """DP-SGD parties on the GPU (float32, as Opacus needs) and nf4 parties computing in bfloat16."""
    out = {}
    summary, rounds = _simulate(work, "dp", "--dp-noise", "1.0")
    assert any("dp" in r for r in rounds), rounds
    out["dp"] = _party_figures(summary, rounds)
    try:
        import bitsandbytes  # noqa: F401, PLC0415
    except ImportError:
        out["nf4"] = "skipped: bitsandbytes is not installed"
        return out
    out["nf4_bf16"] = _party_figures(*_simulate(work, "nf4", "--quantize", "nf4", "--dtype", "bfloat16"))
    return out


def device_map(work: Path) -> dict:
    """The owner spread over the GPU and CPU offload by --device-map/--max-memory: the compressed model's layers
    on the GPU (no CPU copy to align on), the footprint it logs, and a finished round."""
    summary, _ = _simulate(work, "spread", "--device-map", "auto", "--max-memory", "0=250MB,cpu=8GB",
                           "--offload-folder", str(work / "offload"))
    rows = [json.loads(line) for line in (work / "spread" / "metrics.jsonl").read_text().splitlines()]
    footprint = next(r for r in rows if r.get("event") == "footprint")
    devices = footprint["devices"]
    assert set(devices) == {"cuda:0"} and footprint["offloaded"].get("cpu", 0) > 0, footprint
    return {"gpu_gb": devices["cuda:0"]["total"] / 1e9, "offloaded_gb": footprint["offloaded"]["cpu"] / 1e9,
            "nll_adapfu": summary["nll_adapfu"], "seconds": summary["seconds"]}


def throughput(work: Path) -> dict:
    """Party tokens/s of FedBiOT (the compressed model) against FedAvg-LoRA on the full model, bfloat16."""
    out = {method: _party_figures(*_simulate(work, method, "--method", method, "--dtype", "bfloat16"))
           for method in ("fedbiot", "fedavg-full")}
    out["fedbiot_over_fedavg"] = out["fedbiot"]["tokens_per_s"] / out["fedavg-full"]["tokens_per_s"]
    return out


def loopback(work: Path) -> dict:
    """`owner --listen` on 127.0.0.1 with two `party --connect` processes for one round, on the GPU."""
    from protocol.keys import generate_keypair  # noqa: PLC0415

    keys = {name: generate_keypair(work / "keys" / name, name) for name in ("owner", "party-1", "party-2")}
    allow = work / "allow"
    allow.mkdir(parents=True, exist_ok=True)
    for name in ("party-1", "party-2"):
        (allow / f"{name}.key").write_bytes(keys[name][0].read_bytes())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    out = work / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    commands = {"owner": ["-m", "owner.cli", "--listen", endpoint, "--parties", "2", "--min-parties", "2",
                          "--no-secure-agg", "--out", str(out), "--key", str(keys["owner"][1]), "--allow",
                          str(allow), "--device", DEVICE, "--join-timeout", "240", "--round-timeout", "240",
                          *SHORT_RUN[:-1]]}
    for name in ("party-1", "party-2"):
        commands[name] = ["-m", "party.cli", "--connect", endpoint, "--key", str(keys[name][1]), "--owner-key",
                          str(keys["owner"][0]), "--work", str(work / f"work-{name}"), "--device", DEVICE,
                          "--data", "gsm8k-train", "--allow-plain", "--timeout", "240"]
    start, procs, logs = time.monotonic(), {}, {}
    try:
        for name, argv in commands.items():
            logs[name] = work / f"{name}.log"
            with logs[name].open("wb") as fh:
                procs[name] = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdout=fh,
                                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        codes = {name: proc.wait(250) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    tails = {n: p.read_text(errors="replace")[-1500:] for n, p in logs.items() if p.is_file()}
    assert all(code == 0 for code in codes.values()), (codes, tails)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1, summary
    return {"seconds": round(time.monotonic() - start, 1), "nll_base": summary["nll_base"],
            "nll_adapfu": summary["nll_adapfu"]}
