"""Training throughput (pairs/s) of one LPI step against an S-Prompts step, an L2P step and
a plain CLIP forward + backward with every weight trainable; and the peak memory of the
default `python lpi.py` run.

Same batch, same machine, one process: after a warm-up the steps run interleaved (LPI,
S-Prompts, L2P, CLIP, LPI, ...) so that a change of machine load hits all alike; the
median step time of each gives pairs/s = batch / median. A step = forward of the batch's
images and captions, the method's whole loss, backward, SGD update of what it trains.
LPI steps train task 2 of 2, so the task contrastive loss is in (old prompts frozen).
Speed does not depend on the weights: both backbones are randomly initialised.
  --clip tiny    the tiny CLIP of the built-in data (32x32, 4+4 layers of width 128), batch 64
  --clip vitb16  ViT-B/16-shaped (224x224, 12+12 layers, 768 / 512 wide), batch 8
Usage:  python benchmarks/throughput.py [--clip tiny|vitb16] [--repeats 7] [--json out.json]
        python benchmarks/throughput.py --peak-memory [--lpi-args "--cache-dir DIR"]
"""
import argparse
import copy
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CAPTIONS = [  # COCO-style, 10-20 words (for --clip vitb16)
    "A man in a red jacket is riding a bicycle down a busy city street.",
    "Two small dogs are playing with a yellow ball on the green grass in a park.",
    "A plate of pasta with tomato sauce and basil sits on a wooden kitchen table.",
    "A large passenger airplane is taking off from a runway on a cloudy day.",
    "Several people are standing under umbrellas at a bus stop in the rain.",
    "A cat is sleeping on the back of a brown leather couch near a window.",
    "A young girl in a blue dress holds a kite on a sandy beach.",
    "An old red truck is parked in front of a barn next to a field of wheat.",
]


def make_steps(clip, images, captions, J: int, M: int):
    """{name: step()} for the four methods on one batch; each step returns its loss."""
    import torch
    import lpi

    steps = {}
    for name in ("lpi", "sprompts", "l2p"):
        cfg = lpi.method_config(name, lpi.LPIConfig(J=J, M=M))
        model = lpi.L2P(clip, cfg) if name == "l2p" else lpi.LPI(clip, cfg)
        model.add_task(); model.add_task()          # train task 2 (index 1): old prompts frozen
        tokens = model.tokenize(captions)
        similarity = lpi.task_targets(torch.tensor([[1.0, 0.5], [0.5, 1.0]]), lpi.LPIConfig.theta)  # Y: related
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
        model.train()

        def step(model=model, tokens=tokens, similarity=similarity, opt=opt):
            loss = model.losses(images, tokens, 1, similarity)["total"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss
        steps[name] = step

    full = copy.deepcopy(clip).requires_grad_(True).train()  # plain CLIP, every weight trainable
    tokens = lpi.clip_model.tokenize(captions, full.context_length, truncate=True)
    opt = torch.optim.SGD(full.parameters(), lr=1e-6, momentum=0.9)

    def clip_step():
        loss = lpi.clip_loss(full.encode_image(images), full.encode_text(tokens), full.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    steps["clip (all weights)"] = clip_step
    return steps


def throughput(a) -> dict:
    import torch
    import lpi
    import clip_model

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.clip == "tiny":
        cfg, batch = clip_model.TINY, a.batch or lpi.TINY_DEFAULTS["batch_size"]
        J, M = lpi.TINY_DEFAULTS["J"], lpi.TINY_DEFAULTS["M"]
        task = lpi.BUILTIN_TASKS["sea-animals"](n_train=batch, n_test=1, seed=0)
        images, captions = lpi.world.normalize_images(task.train.images), [c[0] for c in task.train.captions]
    else:
        cfg, batch = clip_model.CLIPConfig(), a.batch or 8  # CLIPConfig's defaults are ViT-B/16's
        J, M = lpi.PAPER_DEFAULTS["J"], lpi.PAPER_DEFAULTS["M"]
        images = torch.randn(batch, 3, cfg.image_resolution, cfg.image_resolution)
        captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]
    clip = clip_model.CLIP(cfg).eval()
    steps = make_steps(clip, images, captions, J, M)
    for step in steps.values():  # warm-up
        for _ in range(a.warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(a.repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    res = {"clip": a.clip, "batch": batch, "J": J, "M": M, "R": lpi.LPIConfig.R, "repeats": a.repeats,
           "torch_threads": torch.get_num_threads(), "machine": platform.platform(),
           "processor": platform.processor() or platform.machine(), "torch": torch.__version__, "methods": {}}
    for name, ts in times.items():
        med = statistics.median(ts)
        res["methods"][name] = {"median_step_s": med, "pairs_per_s": batch / med, "step_times_s": ts}
    ref = res["methods"]["lpi"]["pairs_per_s"]
    print(f"training throughput, {a.clip} CLIP (random weights), batch {batch}, J={J}, M={M}, "
          f"{res['torch_threads']} threads, median of {a.repeats} interleaved repeats")
    print(f"{'step':<20}{'median s/step':>14}{'pairs/s':>10}{'vs LPI':>9}")
    for name, r in res["methods"].items():
        print(f"{name:<20}{r['median_step_s']:>14.4f}{r['pairs_per_s']:>10.1f}{r['pairs_per_s'] / ref:>8.2f}x")
    return res


def peak_memory(a) -> dict:
    """Run `python lpi.py` (its defaults plus --lpi-args) in a child process; its peak RSS
    from getrusage(RUSAGE_CHILDREN) (the largest finished child: the only one here)."""
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, str(ROOT / "lpi.py"), "--no-progress", "--out", str(Path(d) / "run"),
               *shlex.split(a.lpi_args)]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        t0 = time.time()
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.time() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    res = {"command": " ".join(cmd[1:]), "peak_rss_mib": kib / 1024, "wall_s": wall, "machine": platform.platform()}
    print(f"peak RSS of `python lpi.py {a.lpi_args}`: {kib / 1024:.0f} MiB (run took {wall:.0f} s)")
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clip", default="tiny", choices=["tiny", "vitb16"])
    p.add_argument("--batch", type=int, default=None, help="default 64 (tiny), 8 (vitb16)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--peak-memory", action="store_true", help="instead: peak RSS of the default lpi.py run")
    p.add_argument("--lpi-args", default="", help="extra lpi.py flags for --peak-memory (e.g. --cache-dir DIR)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    a = p.parse_args(argv)
    res = peak_memory(a) if a.peak_memory else throughput(a)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
