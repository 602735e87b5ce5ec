"""Is clip_model's forward pass as fast as open_clip's? ViT-B/16, CPU, fp32, batch 8.

Both models hold the same random weights (open_clip's init, copied into ours by
build_model). One repeat = encode_image on 8 images + encode_text on 8 COCO-like captions.
Repeats alternate ours, open_clip, ours, ... after a warm-up, so that a change of machine
load hits both alike; the medians (total, and image / text apart) and their ratio are
reported. Our encode_text stops at the longest caption's EOT, open_clip's runs all 77
positions: expect the text part to differ most.
Usage:  python benchmarks/clip_speed.py [--repeats 7] [--threads N] [--batch 8] [--json out.json]
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import clip_model  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="ViT-B-16-quickgelu", help="open_clip model name")
parser.add_argument("--batch", type=int, default=8)
parser.add_argument("--repeats", type=int, default=7)
parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
parser.add_argument("--json", default=None, help="also write the figures to this file")
args = parser.parse_args()

import open_clip  # noqa: E402  (after argparse: --help should not wait for the import)

if args.threads is not None:
    torch.set_num_threads(args.threads)

CAPTIONS = [  # COCO-style, 10-20 words
    "A man in a red jacket is riding a bicycle down a busy city street.",
    "Two small dogs are playing with a yellow ball on the green grass in a park.",
    "A plate of pasta with tomato sauce and basil sits on a wooden kitchen table.",
    "A group of people stand on a snowy mountain slope holding skis and poles.",
    "An old red double decker bus drives past a row of shops on a rainy day.",
    "A young girl in a blue dress is flying a kite on a sandy beach.",
    "Several boats are docked in a harbor with houses and hills in the background.",
    "A black and white cat is sleeping on top of a laptop keyboard next to a mug.",
]

torch.manual_seed(0)
ref = open_clip.create_model(args.model, pretrained=None).eval()
ours = clip_model.build_model(ref.state_dict())
res = ours.visual.input_resolution
images = torch.randn(args.batch, 3, res, res, generator=torch.Generator().manual_seed(0))
captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(args.batch)]
tokens = clip_model.tokenize(captions)
assert torch.equal(tokens, open_clip.get_tokenizer(args.model)(captions))


def forward(model):
    """Seconds for encode_image and for encode_text on the batch, and the features."""
    with torch.inference_mode():
        start = time.perf_counter()
        img = model.encode_image(images)
        middle = time.perf_counter()
        txt = model.encode_text(tokens)
        end = time.perf_counter()
    return (middle - start, end - middle), img, txt


# Warm-up (allocator, kernels' first calls), and a check that the two compute the same thing.
_, img_ours, txt_ours = forward(ours)
_, img_ref, txt_ref = forward(ref)
max_diff = max((img_ours - img_ref).abs().max().item(), (txt_ours - txt_ref).abs().max().item())

times = {"ours": [], "open_clip": []}            # (image s, text s) per repeat
for _ in range(args.repeats):
    times["ours"].append(forward(ours)[0])
    times["open_clip"].append(forward(ref)[0])

median = {k: statistics.median(i + t for i, t in v) for k, v in times.items()}
median_image = {k: statistics.median(i for i, _ in v) for k, v in times.items()}
median_text = {k: statistics.median(t for _, t in v) for k, v in times.items()}
ratio = median["ours"] / median["open_clip"]
load = os.getloadavg() if hasattr(os, "getloadavg") else None
result = {
    "model": args.model, "batch": args.batch, "repeats": args.repeats,
    "threads": torch.get_num_threads(), "cpu_cores": os.cpu_count(), "load_avg": load,
    "torch": torch.__version__, "open_clip": open_clip.__version__, "python": platform.python_version(),
    "machine": platform.processor() or platform.machine(),
    "median_s": median, "median_image_s": median_image, "median_text_s": median_text, "times_s": times, "ratio_ours_over_open_clip": ratio,
    "max_abs_feature_diff": max_diff,
}

print(f"{args.model}, batch {args.batch}, CPU fp32: encode_image + encode_text, "
      f"median of {args.repeats} interleaved repeats")
print(f"machine: {os.cpu_count()} cores ({result['machine']}), torch {torch.__version__} "
      f"with {torch.get_num_threads()} threads, open_clip {open_clip.__version__}"
      + (f", load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}" if load else ""))
for k in times:
    print(f"  {k:<9} {median[k]:.3f} s  (image {median_image[k]:.3f} s, text {median_text[k]:.3f} s; "
          f"all: {', '.join(f'{i + t:.2f}' for i, t in times[k])})")
print(f"  ratio ours / open_clip = {ratio:.3f}   (features differ by at most {max_diff:.1e})")
if args.json:
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
