"""Step time and memory of LPI at real scale (OpenAI's ViT-B/16 architecture, random weights,
J = 9, M = 16, R = 4, both extra losses active), in fp32 and bf16, against a plain prompt step
of the same batch: the frozen CLIP with one full-rank prompt token at layer 0 per encoder,
the cheapest thing that trains through both encoders (forward + backward of the whole
network, as every prompt method pays). Prints peak GPU memory, ms per step, images per
second and the LPI / plain ratio. Targets on a GPU: peak memory <= 3,500 MB with bf16 at
batch 64; LPI step <= 1.2x the plain step.

Usage:  python benchmarks/gpu_check.py                      (GPU if there is one: batch 64)
        python benchmarks/gpu_check.py --device cpu         (batch 2: a smoke test, the tests run it)
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import clip_model  # noqa: E402
import lpi  # noqa: E402


def build(kind: str, arch: str, device: torch.device) -> lpi.LPI:
    torch.manual_seed(0)
    clip = clip_model.CLIP(clip_model.ARCHITECTURES[arch]).requires_grad_(False).eval().to(device)
    if kind == "lpi":
        cfg = lpi.LPIConfig(J=9, M=16, R=4)
    else:  # one full-rank token at layer 0, nothing else
        cfg = lpi.LPIConfig(J=1, M=1, low_rank=False, interaction=False, hier_prompt=False, hier_factor=False,
                            task_loss=False)
    model = lpi.LPI(clip, cfg).to(device)
    for _ in range(2):       # task 2 of 2: the task loss has an older task to contrast with
        model.add_task()
    return model.to(device)


def time_steps(model: lpi.LPI, batch: int, steps: int, precision: str, device: torch.device) -> dict:
    """Median ms per training step and peak memory (MB, GPU only) over `steps` after one warm-up."""
    res = model.clip.visual.input_resolution
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, res, res, generator=g).to(device)
    tokens = model.tokenize([f"a photo of object number {i}" for i in range(batch)]).to(device)
    Y = torch.tensor([[1.0, 0.0], [0.0, 1.0]], device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with lpi.autocast(device, precision):
            loss = model.losses(images, tokens, 1, Y)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i > 0:  # the first step warms up kernels and the allocator
            times.append(1000 * (time.perf_counter() - t0))
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else float("nan")
    ms = statistics.median(times)
    return {"ms": ms, "peak_mb": peak, "images_per_s": 1000 * batch / ms}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default 64 on a GPU, 2 on the CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10 on a GPU, 1 on the CPU)")
    p.add_argument("--arch", default="ViT-B/16", choices=list(clip_model.ARCHITECTURES))
    a = p.parse_args(argv)
    device = torch.device(a.device)
    gpu = device.type == "cuda"
    batch, steps = a.batch or (64 if gpu else 2), a.steps or (10 if gpu else 1)
    name = torch.cuda.get_device_name(device) if gpu else "CPU"
    print(f"{a.arch}, random weights, batch {batch}, {steps} timed step(s), on {name}")
    print(f"{'precision':<10}{'LPI ms/step':>13}{'plain ms/step':>15}{'LPI/plain':>11}{'LPI img/s':>11}"
          f"{'LPI peak MB':>13}{'plain peak MB':>15}")
    rows = []
    for precision in ("fp32", "bf16"):
        r = {kind: time_steps(build(kind, a.arch, device), batch, steps, precision, device) for kind in ("lpi", "plain")}
        ratio = r["lpi"]["ms"] / r["plain"]["ms"]
        rows.append(dict(precision=precision, ratio=ratio, **{f"{k}_{m}": v for k, d in r.items() for m, v in d.items()}))
        print(f"{precision:<10}{r['lpi']['ms']:>13.1f}{r['plain']['ms']:>15.1f}{ratio:>11.2f}"
              f"{r['lpi']['images_per_s']:>11.1f}{r['lpi']['peak_mb']:>13.0f}{r['plain']['peak_mb']:>15.0f}")
        if gpu:
            torch.cuda.empty_cache()
    if not gpu:
        print(f"(CPU: no per-step memory; the process peaked at "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB resident)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
