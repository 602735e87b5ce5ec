"""Tiny on-disk copies of the real data layouts, for testing the loaders without downloads.

`make_coco_fixture` and `make_flickr_fixture` write real (small) JPEG files, Karpathy split
JSONs in the exact format of dataset_coco.json / dataset_flickr30k.json, and COCO 2014
instance JSONs with COCO's real 80 categories. The instance areas are chosen so that the
super-category each image must go to is known by construction (returned as
`expected_super`), including a tie, an image whose dominant super-category wins only by
summed area, and images without annotations.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

# COCO 2014's categories exactly as in instances_*2014.json: (id, name, supercategory).
# 80 categories with ids 1..90 (ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 are unused).
COCO_CATEGORIES = [
    (1, "person", "person"),
    (2, "bicycle", "vehicle"), (3, "car", "vehicle"), (4, "motorcycle", "vehicle"),
    (5, "airplane", "vehicle"), (6, "bus", "vehicle"), (7, "train", "vehicle"),
    (8, "truck", "vehicle"), (9, "boat", "vehicle"),
    (10, "traffic light", "outdoor"), (11, "fire hydrant", "outdoor"), (13, "stop sign", "outdoor"),
    (14, "parking meter", "outdoor"), (15, "bench", "outdoor"),
    (16, "bird", "animal"), (17, "cat", "animal"), (18, "dog", "animal"), (19, "horse", "animal"),
    (20, "sheep", "animal"), (21, "cow", "animal"), (22, "elephant", "animal"), (23, "bear", "animal"),
    (24, "zebra", "animal"), (25, "giraffe", "animal"),
    (27, "backpack", "accessory"), (28, "umbrella", "accessory"), (31, "handbag", "accessory"),
    (32, "tie", "accessory"), (33, "suitcase", "accessory"),
    (34, "frisbee", "sports"), (35, "skis", "sports"), (36, "snowboard", "sports"),
    (37, "sports ball", "sports"), (38, "kite", "sports"), (39, "baseball bat", "sports"),
    (40, "baseball glove", "sports"), (41, "skateboard", "sports"), (42, "surfboard", "sports"),
    (43, "tennis racket", "sports"),
    (44, "bottle", "kitchen"), (46, "wine glass", "kitchen"), (47, "cup", "kitchen"),
    (48, "fork", "kitchen"), (49, "knife", "kitchen"), (50, "spoon", "kitchen"), (51, "bowl", "kitchen"),
    (52, "banana", "food"), (53, "apple", "food"), (54, "sandwich", "food"), (55, "orange", "food"),
    (56, "broccoli", "food"), (57, "carrot", "food"), (58, "hot dog", "food"), (59, "pizza", "food"),
    (60, "donut", "food"), (61, "cake", "food"),
    (62, "chair", "furniture"), (63, "couch", "furniture"), (64, "potted plant", "furniture"),
    (65, "bed", "furniture"), (67, "dining table", "furniture"), (70, "toilet", "furniture"),
    (72, "tv", "electronic"), (73, "laptop", "electronic"), (74, "mouse", "electronic"),
    (75, "remote", "electronic"), (76, "keyboard", "electronic"), (77, "cell phone", "electronic"),
    (78, "microwave", "appliance"), (79, "oven", "appliance"), (80, "toaster", "appliance"),
    (81, "sink", "appliance"), (82, "refrigerator", "appliance"),
    (84, "book", "indoor"), (85, "clock", "indoor"), (86, "vase", "indoor"), (87, "scissors", "indoor"),
    (88, "teddy bear", "indoor"), (89, "hair drier", "indoor"), (90, "toothbrush", "indoor"),
]
assert len(COCO_CATEGORIES) == 80

# Super-categories in order of first appearance (the numbering 1..12 of the loader).
SUPERCATEGORIES = list(dict.fromkeys(sup for _, _, sup in COCO_CATEGORIES))
CATEGORY_IDS = {name: cid for cid, name, _ in COCO_CATEGORIES}
CATEGORIES_OF = {sup: [cid for cid, _, s in COCO_CATEGORIES if s == sup] for sup in SUPERCATEGORIES}
NAME_OF = {cid: name for cid, name, _ in COCO_CATEGORIES}

IMAGE_SIZE = (40, 48)  # (width, height)


# ----------------------------------------------------------------------------------------
# Writing files
# ----------------------------------------------------------------------------------------


def write_jpeg(path: str, rng: random.Random) -> None:
    """A small real JPEG: a random background with two random coloured rectangles."""
    w, h = IMAGE_SIZE
    colour = lambda: tuple(rng.randrange(256) for _ in range(3))
    img = Image.new("RGB", IMAGE_SIZE, colour())
    draw = ImageDraw.Draw(img)
    for _ in range(2):
        x0, y0 = rng.randrange(w - 8), rng.randrange(h - 8)
        draw.rectangle([x0, y0, x0 + rng.randrange(4, w - x0), y0 + rng.randrange(4, h - y0)], fill=colour())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, "JPEG", quality=90)


def corrupt_jpeg(path: str, how: str) -> None:
    """Damage a JPEG in place: "truncate" keeps the header and cuts the data (PIL opens it, then
    fails to decode); "garbage" replaces it with bytes no decoder recognises."""
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2] if how == "truncate" else b"this is not a jpeg" * 10)


def _sentences(words: str, imgid: int, first_sentid: int) -> list[dict]:
    raws = [f"A picture of a {words}.", f"There is a {words} here", f"a {words} in a photo .",
            f"Somebody photographed a {words}.", f"An image showing one {words}"]
    return [{"tokens": raw.lower().replace(".", " ").split(), "raw": raw, "imgid": imgid,
             "sentid": first_sentid + k} for k, raw in enumerate(raws)]


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


def _karpathy_splits(n_train: int, n_val: int, n_test: int) -> list[str]:
    # Karpathy's "train" images come from train2014, his "restval" from val2014; alternate them.
    return (["train" if k % 2 == 0 else "restval" for k in range(n_train)]
            + ["val"] * n_val + ["test"] * n_test)


# ----------------------------------------------------------------------------------------
# COCO
# ----------------------------------------------------------------------------------------


@dataclass
class CocoFixture:
    root: str
    split: dict[int, str] = field(default_factory=dict)                 # cocoid -> Karpathy split
    path: dict[int, str] = field(default_factory=dict)                  # cocoid -> image file
    expected_super: dict[int, str | None] = field(default_factory=dict)  # cocoid -> super-category (None: no annotations)
    corrupt: list[str] = field(default_factory=list)                    # image files written corrupt
    tie_id: int = -1           # annotated with equal areas of animal and outdoor -> outdoor (lower number)
    sum_id: int = -1           # kitchen wins by summed area though vehicle has the largest instance
    unannotated_ids: tuple = ()


def make_coco_fixture(root: str, n_train: int = 24, n_test: int = 24, n_val: int = 2,
                      seed: int = 0, corrupt: int = 0) -> CocoFixture:
    """Write a tiny COCO under root/coco in the layout the loaders expect.

    Images: n_train (alternately "train" / "restval"), n_val "val", n_test "test", plus four
    special images: a tie and a summed-area case (test), and one image without annotations in
    each of train and test. The plain images get dominant super-categories 1, 2, ..., 12, 1, ...
    in turn, so with n_train, n_test >= 12 every one of the 12 tasks has train and test images.
    `corrupt` test images are written damaged (alternately truncated and garbage).
    """
    rng = random.Random(seed)
    fx = CocoFixture(root)
    # (split, annotations as [(category name, area)], expected super-category)
    plan = []
    for k, split in enumerate(_karpathy_splits(n_train, n_val, n_test)):
        sup = SUPERCATEGORIES[k % len(SUPERCATEGORIES)]
        anns = [(rng.choice(CATEGORIES_OF[sup]), rng.uniform(2000, 3000))]
        if rng.random() < 0.5:  # a smaller object of another super-category
            other = rng.choice([s for s in SUPERCATEGORIES if s != sup])
            anns.append((rng.choice(CATEGORIES_OF[other]), rng.uniform(100, 900)))
        plan.append((split, anns, sup))
    c = CATEGORY_IDS
    # A tie between animal (4) and outdoor (3), animal listed first: the lower number must win.
    plan.append(("test", [(c["dog"], 900.0), (c["bench"], 900.0), (c["cup"], 100.0)], "outdoor"))
    # Kitchen (two 700s = 1400) beats vehicle (one 1200): the rule sums areas, it does not
    # take the largest instance.
    plan.append(("test", [(c["car"], 1200.0), (c["cup"], 700.0), (c["fork"], 700.0)], "kitchen"))
    plan.append(("test", [], None))
    plan.append(("train", [], None))

    karpathy, instances = [], {"train2014": ([], []), "val2014": ([], [])}
    sentid = ann_id = 0
    for imgid, (split, anns, sup) in enumerate(plan):
        cocoid = 100000 + 7 * imgid  # any distinct ids
        folder = "train2014" if split == "train" else "val2014"
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        path = os.path.join(root, "coco", folder, filename)
        write_jpeg(path, rng)
        words = " and ".join(NAME_OF[cid] for cid, _ in anns) or "empty room"
        sentences = _sentences(words, imgid, sentid)
        sentid += len(sentences)
        karpathy.append({"filepath": folder, "sentids": [s["sentid"] for s in sentences], "filename": filename,
                         "imgid": imgid, "split": split, "sentences": sentences, "cocoid": cocoid})
        images, annotations = instances[folder]
        images.append({"license": 1, "file_name": filename, "height": IMAGE_SIZE[1], "width": IMAGE_SIZE[0],
                       "id": cocoid})
        for cid, area in anns:
            side = area ** 0.5
            annotations.append({"segmentation": [[0, 0, side, 0, side, side, 0, side]], "area": area,
                                "iscrowd": 0, "image_id": cocoid, "bbox": [0, 0, side, side],
                                "category_id": cid, "id": ann_id})
            ann_id += 1
        fx.split[cocoid], fx.path[cocoid], fx.expected_super[cocoid] = split, path, sup
    ids = list(fx.split)
    fx.tie_id, fx.sum_id = ids[-4], ids[-3]
    fx.unannotated_ids = (ids[-2], ids[-1])

    _write_json(os.path.join(root, "coco", "dataset_coco.json"), {"images": karpathy, "dataset": "coco"})
    categories = [{"supercategory": sup, "id": cid, "name": name} for cid, name, sup in COCO_CATEGORIES]
    for folder, (images, annotations) in instances.items():
        _write_json(os.path.join(root, "coco", "annotations", f"instances_{folder}.json"),
                    {"info": {"description": "test fixture"}, "images": images, "licenses": [],
                     "annotations": annotations, "categories": categories})

    test_ids = [i for i in ids if fx.split[i] == "test" and fx.expected_super[i] is not None]
    for k, cocoid in enumerate(test_ids[:corrupt]):
        corrupt_jpeg(fx.path[cocoid], "truncate" if k % 2 == 0 else "garbage")
        fx.corrupt.append(fx.path[cocoid])
    return fx


# ----------------------------------------------------------------------------------------
# Flickr30K
# ----------------------------------------------------------------------------------------


@dataclass
class FlickrFixture:
    root: str
    split: dict[str, str] = field(default_factory=dict)   # filename -> Karpathy split
    corrupt: list[str] = field(default_factory=list)


def make_flickr_fixture(root: str, n_train: int = 10, n_test: int = 6, n_val: int = 2,
                        seed: int = 0, corrupt: int = 0) -> FlickrFixture:
    """Write a tiny Flickr30K under root/flickr30k (Flickr30K's Karpathy file has no "restval")."""
    rng = random.Random(seed)
    fx = FlickrFixture(root)
    entries, sentid = [], 0
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    for imgid, split in enumerate(splits):
        filename = f"{1000092795 + 13 * imgid}.jpg"
        path = os.path.join(root, "flickr30k", "flickr30k-images", filename)
        write_jpeg(path, rng)
        sentences = _sentences(rng.choice(["dog", "man", "bicycle", "child", "street"]), imgid, sentid)
        sentid += len(sentences)
        entries.append({"sentids": [s["sentid"] for s in sentences], "imgid": imgid, "sentences": sentences,
                        "split": split, "filename": filename})
        fx.split[filename] = split
        if split == "test" and len(fx.corrupt) < corrupt:
            corrupt_jpeg(path, "truncate" if len(fx.corrupt) % 2 == 0 else "garbage")
            fx.corrupt.append(path)
    _write_json(os.path.join(root, "flickr30k", "dataset_flickr30k.json"), {"images": entries, "dataset": "flickr30k"})
    return fx


def make_hf_clip(folder, activation: str = "gelu", seed: int = 0, image_size: int = 64):
    """A small transformers.CLIPModel with random weights, saved with save_pretrained into
    folder (config.json + model.safetensors), as Hugging Face CLIP folders sit on a disk.
    64-wide heads, a 4x MLP (as CLIP's); weights 5x transformers' initial scale, so that the
    MLPs' inputs reach where QuickGELU and GELU differ. Returns the model (eval mode)."""
    import torch
    from transformers import CLIPConfig as HFConfig, CLIPModel

    torch.manual_seed(seed)
    sizes = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                 hidden_act=activation)
    cfg = HFConfig(text_config=dict(sizes, vocab_size=49408, max_position_embeddings=77),
                   vision_config=dict(sizes, image_size=image_size, patch_size=16), projection_dim=64,
                   initializer_factor=5.0)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(str(folder))
    return model
