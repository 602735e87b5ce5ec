"""How long does Recall@K take at COCO-5k test scale on CPU?

5,000 images x 25,000 captions (5 per image), random unit 512-d features. Times the
similarity matmul and the rank/recall computation separately, median of a few runs.
Usage:  python benchmarks/recall_speed.py [--threads 2] [--repeats 3] [--chunk 64]
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
try:
    from lpi import i2t_ranks, recall_from_ranks, t2i_ranks
except ImportError:
    from _parts.eval_routing import i2t_ranks, recall_from_ranks, t2i_ranks

parser = argparse.ArgumentParser()
parser.add_argument("--images", type=int, default=5000)
parser.add_argument("--caps-per-image", type=int, default=5)
parser.add_argument("--dim", type=int, default=512)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--chunk", type=int, default=64)
args = parser.parse_args()

torch.set_num_threads(args.threads)
g = torch.Generator().manual_seed(0)
n_img, n_cap = args.images, args.images * args.caps_per_image
img = F.normalize(torch.randn(n_img, args.dim, generator=g), dim=-1)
cap = F.normalize(torch.randn(n_cap, args.dim, generator=g), dim=-1)
cap2img = torch.arange(n_img).repeat_interleave(args.caps_per_image)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def rank_and_recall():
    r_i2t = i2t_ranks(sim, cap2img, chunk=args.chunk)
    r_t2i = t2i_ranks(sim, cap2img, chunk=args.chunk)
    return recall_from_ranks(r_i2t), recall_from_ranks(r_t2i)


load_before = os.getloadavg()[0]
t_sim, t_i2t, t_t2i, t_rec = [], [], [], []
for _ in range(args.repeats):
    sim, t = timed(lambda: img @ cap.T)                                # (N_img, N_cap)
    t_sim.append(t)
    t_i2t.append(timed(lambda: i2t_ranks(sim, cap2img, chunk=args.chunk))[1])
    t_t2i.append(timed(lambda: t2i_ranks(sim, cap2img, chunk=args.chunk))[1])
    recalls, t = timed(rank_and_recall)
    t_rec.append(t)
    del sim

med = statistics.median
print(f"load average before: {load_before:.2f}, after: {os.getloadavg()[0]:.2f} "
      "(other processes on the machine distort the timings)")
print(f"{n_img} images x {n_cap} captions, d={args.dim}, {torch.get_num_threads()} threads, "
      f"chunk {args.chunk}, median of {args.repeats}")
print(f"  similarity matmul      {med(t_sim):6.3f} s")
print(f"  i2t ranks              {med(t_i2t):6.3f} s")
print(f"  t2i ranks              {med(t_t2i):6.3f} s")
print(f"  ranks + recall (both)  {med(t_rec):6.3f} s")
print(f"  total (matmul + recall) {med(t_sim) + med(t_rec):5.3f} s")
print(f"  i2t {recalls[0]}\n  t2i {recalls[1]}")
