"""Data for lpi.py: image-caption sets and tasks, the built-in tasks, COCO and Flickr30K
(Karpathy splits), COCO split by super-category, reading images from files, and the training
recipe's sampling and augmentation.

  sets and tasks        ImageCaptionSet, Task
  built-in tasks        drawn by builtin_world.py (the benchmark, not the method)
  real data             Karpathy's COCO / Flickr30K, COCO's 12 super-category tasks
  subsampling           --max-train-per-task / --max-test-per-task
  images                ImageFileDataset (an unreadable file is counted, never fatal), batches
  the recipe            training pairs per caption or per image; crop + flip augmentation
  encoding              a set through a model's encoders (encode_set); an epoch's batches
  --tasks               a comma-separated list of task names
  the backbone          --clip: tiny, a released CLIP, a checkpoint, random:NAME
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

import builtin_world as world
import clip_model
from run_support import Env, LPIError, atomic_write, autocast, gather_rows, pick_device, shard


@dataclass
class ImageCaptionSet:
    """Images and their captions: images[i] is described by captions[i] (one or more).
    images: file paths (COCO, Flickr30K), or uint8 (N, 3, H, W) at the model's
    resolution (built-in data)."""
    images: torch.Tensor | list[str]
    captions: list[list[str]]

    def __len__(self) -> int:
        return len(self.captions)


@dataclass
class Task:
    """One task of the continual sequence: a name, its train / test pairs, and a readable
    name (label) from which CLIP's text encoder gauges how related two tasks are (§5)."""
    name: str
    train: ImageCaptionSet
    test: ImageCaptionSet
    label: str = ""  # default: the name

    @property
    def readable(self) -> str:
        return self.label or self.name

# ========================================================================================
# Data (1/2): the built-in tasks (builtin_world.py: the benchmark, not the method)
# ========================================================================================

def builtin_task(name: str, n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> Task:
    """The built-in task `name` (a family of builtin_world.FAMILIES), with the readable
    name the tiny CLIP was taught ("sea animals"), from which task similarity is read."""
    sizes = dict(world.TASK_SIZES, **{k: v for k, v in (("n_train", n_train), ("n_test", n_test)) if v})
    (train_img, train_cap), (test_img, test_cap) = world.make_split(name, seed=seed, **sizes)
    return Task(name, ImageCaptionSet(train_img, train_cap), ImageCaptionSet(test_img, test_cap),
                label=world.FAMILIES[name].label)


BUILTIN_TASKS: dict[str, Callable[..., Task]] = {name: partial(builtin_task, name) for name in world.FAMILIES}


# ========================================================================================
# Data (2/2): COCO and Flickr30K (Karpathy splits), COCO by super-category
# ========================================================================================

# ----------------------------------------------------------------------------------------
# The layout under --data-root
#
# Captions and splits come from Karpathy's JSON files (dataset_coco.json,
# dataset_flickr30k.json), the de-facto standard of retrieval papers: COCO 113,287 train
# images (his "train" + "restval") and 5,000 test images; Flickr30K 29,000 / 1,000.
# Training uses "train" and "restval", evaluation "test"; "val" is not used.
# ----------------------------------------------------------------------------------------

COCO_KARPATHY_JSON = os.path.join("coco", "dataset_coco.json")
COCO_INSTANCE_JSONS = (os.path.join("coco", "annotations", "instances_train2014.json"),
                       os.path.join("coco", "annotations", "instances_val2014.json"))
FLICKR_KARPATHY_JSON = os.path.join("flickr30k", "dataset_flickr30k.json")
FLICKR_IMAGE_DIR = os.path.join("flickr30k", "flickr30k-images")

TRAIN_SPLITS = ("train", "restval")
TEST_SPLITS = ("test",)
KARPATHY_SPLITS = ("train", "restval", "val", "test")

# A few COCO images have 6 or 7 captions; the standard protocol (e.g. the 5K test set with
# 25,000 captions) uses the first 5 of each image, and so do we, in training too.
CAPTIONS_PER_IMAGE = 5

DATA_LAYOUT = """\
  DATA_ROOT/coco/dataset_coco.json                 Karpathy's COCO split (captions, train/test)
  DATA_ROOT/coco/train2014/*.jpg, val2014/*.jpg    COCO 2014 images
  DATA_ROOT/coco/annotations/instances_train2014.json, instances_val2014.json
                                                   COCO 2014 instances (only for coco:supercategory)
  DATA_ROOT/flickr30k/dataset_flickr30k.json       Karpathy's Flickr30K split
  DATA_ROOT/flickr30k/flickr30k-images/*.jpg       Flickr30K images"""


def read_json(path: str, missing_hint: str = "") -> object:
    """json.load with errors that name the file: missing, not UTF-8, or malformed (line/column)."""
    if not os.path.isfile(path):
        hint = missing_hint or f"Expected this layout under --data-root:\n{DATA_LAYOUT}"
        raise LPIError(f"file not found: {path}\n{hint}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise LPIError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except UnicodeDecodeError as e:
        raise LPIError(f"{path} is not UTF-8 text (byte {e.start}): is it really a JSON file?") from None


# ----------------------------------------------------------------------------------------
# Karpathy's split files
#
#   {"dataset": "coco", "images": [{"filepath": "val2014", "filename": "COCO_val2014_...jpg",
#     "split": "test", "cocoid": 391895, "sentences": [{"raw": "A man ...", "tokens": [...]}, ...]},
#     ...]}
# Flickr30K entries look the same without "filepath" and "cocoid".
# ----------------------------------------------------------------------------------------


@dataclass
class KarpathyImage:
    """One entry of a Karpathy file: where its image is, its captions, its split."""
    path: str
    captions: list[str]
    split: str
    cocoid: int | None  # COCO's image id (matches the instance files); None for Flickr30K


def _caption_text(sentence: dict) -> str:
    # "raw" keeps case and punctuation (CLIP's tokenizer lower-cases itself); older files
    # may only have the tokens.
    if "raw" in sentence:
        return sentence["raw"].strip()
    return " ".join(sentence["tokens"])


def read_karpathy(json_path: str, image_path_of: Callable[[dict], str],
                  max_captions: int = CAPTIONS_PER_IMAGE) -> list[KarpathyImage]:
    """All entries of a Karpathy split file, validated; image_path_of(entry) -> the image's path."""
    data = read_json(json_path)
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise LPIError(f"{json_path} is not in Karpathy's split format: expected a JSON object with an "
                       f"'images' list (the dataset_coco.json / dataset_flickr30k.json of Karpathy & Fei-Fei)")
    images = []
    for i, entry in enumerate(entries):
        where = f"{json_path}: images[{i}]"
        if not isinstance(entry, dict):
            raise LPIError(f"{where} is a {type(entry).__name__}, not an object: not a Karpathy split file")
        missing = [key for key in ("filename", "split", "sentences") if key not in entry]
        if missing:
            raise LPIError(f"{where} has no {', '.join(map(repr, missing))}: not a Karpathy split file "
                           f"(each entry needs 'filename', 'split' and 'sentences' [{{'raw': ...}}, ...])")
        if entry["split"] not in KARPATHY_SPLITS:
            raise LPIError(f"{where} has split {entry['split']!r}; expected one of {', '.join(KARPATHY_SPLITS)}")
        try:
            captions = [_caption_text(s) for s in entry["sentences"]][:max_captions]
            path = image_path_of(entry)
        except (KeyError, TypeError, AttributeError) as e:
            raise LPIError(f"{where} is malformed ({type(e).__name__}: {e}); expected 'sentences' as a "
                           f"list of {{'raw': ...}} objects and the keys the image path needs") from None
        if not captions:
            raise LPIError(f"{where} ({entry['filename']}) has no sentences")
        images.append(KarpathyImage(path, captions, entry["split"], entry.get("cocoid")))
    return images


def make_set(images: list[KarpathyImage]) -> ImageCaptionSet:
    return ImageCaptionSet(images=[im.path for im in images], captions=[im.captions for im in images])


def split_train_test(images: list[KarpathyImage], source: str) -> tuple[ImageCaptionSet, ImageCaptionSet]:
    """Karpathy entries -> (train = "train" + "restval", test = "test"); both must be non-empty."""
    train = [im for im in images if im.split in TRAIN_SPLITS]
    test = [im for im in images if im.split in TEST_SPLITS]
    for role, items, splits in (("training", train, TRAIN_SPLITS), ("test", test, TEST_SPLITS)):
        if not items:
            raise LPIError(f"{source} has no {role} images (no entry with split "
                           f"{' or '.join(map(repr, splits))}): is it the full Karpathy file?")
    return make_set(train), make_set(test)


def load_karpathy(json_path: str, image_path_of: Callable[[dict], str]) -> tuple[ImageCaptionSet, ImageCaptionSet]:
    """A Karpathy split file -> (train, test) ImageCaptionSets with image file paths."""
    return split_train_test(read_karpathy(json_path, image_path_of), json_path)


def check_image_dirs(sets: list[ImageCaptionSet], task: str) -> None:
    """Fail early if an image folder is missing: otherwise every image would be skipped as
    unreadable and the run would train on nothing. Single missing files are tolerated
    (ImageFileDataset flags them)."""
    dirs = {os.path.dirname(p) for s in sets for p in s.images}
    missing = sorted(d for d in dirs if not os.path.isdir(d))
    if missing:
        raise LPIError(f"task {task!r}: image folder not found: {', '.join(missing)}\n"
                       f"Expected this layout under --data-root:\n{DATA_LAYOUT}")


# ----------------------------------------------------------------------------------------
# COCO and Flickr30K as single tasks (e.g. --tasks coco,flickr: COCO, then Flickr30K)
# ----------------------------------------------------------------------------------------


def coco_image_path(root: str) -> Callable[[dict], str]:
    return lambda entry: os.path.join(root, "coco", entry["filepath"], entry["filename"])


def flickr_image_path(root: str) -> Callable[[dict], str]:
    return lambda entry: os.path.join(root, FLICKR_IMAGE_DIR, entry["filename"])


def coco_task(root: str) -> Task:
    """COCO (Karpathy split) as one task named "coco"."""
    train, test = load_karpathy(os.path.join(root, COCO_KARPATHY_JSON), coco_image_path(root))
    check_image_dirs([train, test], "coco")
    return Task("coco", train, test, label="common objects in context")  # what "COCO" stands for


def flickr_task(root: str) -> Task:
    """Flickr30K (Karpathy split) as one task named "flickr"."""
    train, test = load_karpathy(os.path.join(root, FLICKR_KARPATHY_JSON), flickr_image_path(root))
    check_image_dirs([train, test], "flickr")
    return Task("flickr", train, test, label="people in everyday scenes")  # what Flickr30K pictures


# ----------------------------------------------------------------------------------------
# COCO split by super-category: the paper's 12 tasks
#
# COCO's 80 object categories fall into 12 super-categories. The authors number them
# from a preprocessed file we do not have; we number them 1..12 in the order they first
# appear in COCO's own category list (sorted by category id) [ours], which gives
#   1 person, 2 vehicle, 3 outdoor, 4 animal, 5 accessory, 6 sports, 7 kitchen, 8 food,
#   9 furniture, 10 electronic, 11 appliance, 12 indoor.
# An image belongs to the super-category that covers most of its annotated instance
# area [ours]:
#     s*(image) = argmax_s  Σ_{annotations a of the image, supercat(a) = s}  area(a)
# ties going to the lower number; images without any annotation are dropped. Crowd
# annotations count like the others: they are annotated area too.
# ----------------------------------------------------------------------------------------

# The authors' task order, as super-category numbers (METHOD.md §7): appliance, sports,
# outdoor, electronic, accessory, indoor, kitchen, furniture, vehicle, food, animal, person.
COCO_TASK_ORDER = (11, 6, 3, 10, 5, 12, 7, 9, 2, 8, 4, 1)


def number_supercategories(categories: list[dict]) -> tuple[list[str], dict[int, int]]:
    """COCO's "categories" -> (names, number_of_category): names[s - 1] is super-category s,
    numbered 1.. by first appearance in the list sorted by category id."""
    numbers: dict[str, int] = {}
    number_of_category = {}
    for cat in sorted(categories, key=lambda c: c["id"]):
        number_of_category[cat["id"]] = numbers.setdefault(cat["supercategory"], len(numbers) + 1)
    return list(numbers), number_of_category   # dicts keep insertion order = numbering


def dominant_supercategory(area: dict[int, float]) -> int:
    """The super-category number with the largest summed area; ties -> the lower number."""
    return max(area, key=lambda s: (area[s], -s))


def read_instance_areas(paths: list[str]) -> tuple[list[str], dict[int, dict[int, float]]]:
    """COCO instance files -> (super-category names, {image id: {super-category: summed area}}).

    The train2014 and val2014 files are merged: Karpathy's splits mix images of both.
    """
    hint = ("The COCO 2014 instance annotations are needed only for the coco:supercategory tasks "
            "(get annotations_trainval2014.zip from cocodataset.org). Expected:\n" + DATA_LAYOUT)
    categories: dict[int, dict] = {}
    annotations = []
    for path in paths:
        data = read_json(path, missing_hint=hint)
        if not isinstance(data, dict) or not {"categories", "annotations"} <= data.keys():
            raise LPIError(f"{path} is not a COCO instances file: expected a JSON object with "
                           f"'categories' and 'annotations' lists")
        try:
            for cat in data["categories"]:
                old = categories.setdefault(cat["id"], cat)
                if (old["name"], old["supercategory"]) != (cat["name"], cat["supercategory"]):
                    raise LPIError(f"{path}: category {cat['id']} is defined twice, differently: "
                                   f"{old['name']}/{old['supercategory']} vs {cat['name']}/{cat['supercategory']}")
            annotations += [(a["image_id"], a["category_id"], float(a["area"])) for a in data["annotations"]]
        except (KeyError, TypeError) as e:
            raise LPIError(f"{path} is malformed ({type(e).__name__}: {e}): each category needs "
                           f"'id', 'name', 'supercategory'; each annotation 'image_id', 'category_id', 'area'") from None
        del data  # the train2014 file is over 300 MB of JSON: free it before reading the next

    names, number_of_category = number_supercategories(list(categories.values()))
    area: dict[int, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for image_id, category_id, a in annotations:
        if category_id not in number_of_category:
            raise LPIError(f"an annotation of image {image_id} has category {category_id}, "
                           f"which is not in the instance files' 'categories'")
        area[image_id][number_of_category[category_id]] += a
    return names, {image_id: dict(by_super) for image_id, by_super in area.items()}


@dataclass
class SupercategorySplit:
    """The 12 COCO super-category tasks, and what the split did."""
    tasks: list[Task]            # in COCO_TASK_ORDER
    names: list[str]             # names[s - 1] = super-category number s
    dropped: dict[str, int]      # Karpathy images without annotated instances, per role ("train", "test")

    def summary(self) -> str:
        lines = [f"coco:supercategory: {len(self.tasks)} tasks; dropped images without annotated "
                 f"instances: {self.dropped['train']} train, {self.dropped['test']} test"]
        for k, (task, number) in enumerate(zip(self.tasks, COCO_TASK_ORDER), 1):
            lines.append(f"  task {k:2d}  {task.name:<17} (super-category {number:2d})  "
                         f"train {len(task.train):6d}  test {len(task.test):5d}")
        return "\n".join(lines)


def split_coco_by_supercategory(root: str) -> SupercategorySplit:
    """Karpathy's COCO split, each image given to its dominant super-category (see above)."""
    json_path = os.path.join(root, COCO_KARPATHY_JSON)
    images = read_karpathy(json_path, coco_image_path(root))
    names, area = read_instance_areas([os.path.join(root, p) for p in COCO_INSTANCE_JSONS])
    if len(names) != len(COCO_TASK_ORDER):
        raise LPIError(f"the COCO instance files list {len(names)} super-categories ({', '.join(names)}); "
                       f"the 12-task protocol expects COCO 2014's {len(COCO_TASK_ORDER)}")

    groups = {(s, role): [] for s in COCO_TASK_ORDER for role in ("train", "test")}
    dropped = Counter(train=0, test=0)
    for im in images:
        role = "train" if im.split in TRAIN_SPLITS else "test" if im.split in TEST_SPLITS else None
        if role is None:
            continue  # Karpathy's "val" split is not used
        if im.cocoid is None:
            raise LPIError(f"{json_path}: the entry of {im.path} has no 'cocoid', which links it to the "
                           f"COCO instance annotations: use Karpathy's dataset_coco.json")
        if im.cocoid not in area:  # no annotation at all (or an image absent from the instance files)
            dropped[role] += 1
            continue
        groups[dominant_supercategory(area[im.cocoid]), role].append(im)

    tasks = []
    for s in COCO_TASK_ORDER:
        name = f"coco:{names[s - 1]}"
        for role in ("train", "test"):
            if not groups[s, role]:
                raise LPIError(f"task {name} has no {role} images after the super-category split of {json_path}")
        tasks.append(Task(name, make_set(groups[s, "train"]), make_set(groups[s, "test"]), label=names[s - 1]))
    check_image_dirs([t.train for t in tasks] + [t.test for t in tasks], "coco:supercategory")
    return SupercategorySplit(tasks, names, dict(dropped))


def coco_supercategory_tasks(root: str, verbose: bool = True) -> list[Task]:
    """The paper's 12 COCO tasks, in the authors' order; prints the split's summary."""
    split = split_coco_by_supercategory(root)
    if verbose:
        print(split.summary())
    return split.tasks


# ----------------------------------------------------------------------------------------
# Subsampling (--max-train-per-task / --max-test-per-task)
# ----------------------------------------------------------------------------------------


def subsample(data: ImageCaptionSet, n: int | None, seed: int = 0) -> ImageCaptionSet:
    """n images drawn without replacement (all their captions kept), in their original order.

    Deterministic: depends only on (len(data), n, seed), never on the global RNG.
    n = None or n >= len(data) returns data unchanged.
    """
    if n is None or n >= len(data):
        return data
    keep = sorted(random.Random(seed).sample(range(len(data)), n))
    images = data.images[torch.tensor(keep)] if isinstance(data.images, torch.Tensor) else [data.images[i] for i in keep]
    return ImageCaptionSet(images=images, captions=[data.captions[i] for i in keep])


def subsample_task(task: Task, max_train: int | None, max_test: int | None, seed: int = 0) -> Task:
    return Task(task.name, subsample(task.train, max_train, seed), subsample(task.test, max_test, seed), task.label)


# ----------------------------------------------------------------------------------------
# Loading images from files
#
# A big image collection nearly always has a few unreadable files (a broken download, a
# truncated JPEG). One of them must not kill a run of hours, and must not pass silently
# either. So __getitem__ never raises on a bad image: it returns ok = False and a zero
# tensor of the right shape, and the *caller* drops those items and counts them. The
# count has to live in the caller: with DataLoader(num_workers > 0) every worker is a
# separate process holding its own copy of the dataset, so a counter kept in the dataset
# would never reach the main process.
# ----------------------------------------------------------------------------------------

# What a bad image file raises in PIL: OSError for missing / truncated / unidentified files
# (UnidentifiedImageError is an OSError), SyntaxError from some format plugins, and
# DecompressionBombError for absurdly large images. Errors inside `preprocess` are bugs,
# not bad files, and are not caught.
UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError, Image.DecompressionBombError)


class ImageFileDataset(Dataset):
    """The images of an ImageCaptionSet (file paths), read with PIL: item k is
    (preprocess(image k), k, ok). A missing or undecodable file gives a zero tensor of the
    same shape and ok = False; the default collate_fn batches ok into a bool tensor."""

    def __init__(self, data: ImageCaptionSet, preprocess: Callable):
        self.data, self.preprocess = data, preprocess
        self._blank = None  # zero tensor standing in for an unreadable image, made on first need

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int, bool]:
        try:
            with Image.open(self.data.images[k]) as img:
                img = img.convert("RGB")  # forces the full decode, so truncated files fail here
        except UNREADABLE_IMAGE_ERRORS:
            if self._blank is None:
                # preprocess resizes and crops to a fixed size, so any blank image gives the shape
                self._blank = torch.zeros_like(self.preprocess(Image.new("RGB", (64, 64))))
            return self._blank, k, False
        return self.preprocess(img), k, True


# ----------------------------------------------------------------------------------------
# --tasks: a comma-separated list of task names, in training order
# ----------------------------------------------------------------------------------------

REAL_TASK_NAMES = ("coco", "flickr", "coco:supercategory")


def _require_data_root(data_root: str | None, task: str) -> str:
    if data_root is None:
        raise LPIError(f"task {task!r} reads real data: pass --data-root DIR, with this layout:\n{DATA_LAYOUT}")
    if not os.path.isdir(data_root):
        raise LPIError(f"--data-root {data_root} is not a directory (needed by task {task!r}); "
                       f"expected this layout:\n{DATA_LAYOUT}")
    return data_root


def parse_task_specs(spec: str, data_root: str | None,
                     builtin: dict[str, Callable[[], Task]]) -> list[Task]:
    """"coco,flickr" -> [Task("coco"), Task("flickr")]; "coco:supercategory" expands to the 12
    COCO tasks; a key of `builtin` is built by calling builtin[key](). All names are checked
    before anything is loaded."""
    names = [s.strip() for s in spec.split(",")]
    valid = list(REAL_TASK_NAMES) + [k for k in builtin if k not in REAL_TASK_NAMES]
    if not any(names):
        raise LPIError(f"--tasks is empty; valid task names: {', '.join(valid)}")
    if not all(names):
        raise LPIError(f"--tasks {spec!r} has an empty task name (two commas in a row, or one at an end); "
                       f"expected task names separated by single commas")
    for name in names:
        if name not in valid:
            raise LPIError(f"unknown task {name!r} in --tasks {spec!r}; valid task names: {', '.join(valid)}")

    tasks: list[Task] = []
    for name in names:
        if name == "coco":
            tasks.append(coco_task(_require_data_root(data_root, name)))
        elif name == "flickr":
            tasks.append(flickr_task(_require_data_root(data_root, name)))
        elif name == "coco:supercategory":
            tasks += coco_supercategory_tasks(_require_data_root(data_root, name))
        else:
            tasks.append(builtin[name]())
    seen = Counter(t.name for t in tasks)
    repeated = [n for n, count in seen.items() if count > 1]
    if repeated:
        raise LPIError(f"--tasks {spec!r} gives task(s) {', '.join(repeated)} more than once; "
                       f"each task must appear once (results are kept per task name)")
    return tasks



# ========================================================================================
# Batches of images, and the authors' training recipe
# ========================================================================================


def image_batches(data: ImageCaptionSet, batches: list[list[int]], preprocess, workers: int):
    """Yield (images (b, 3, H, W) float, ok (b,) bool) for each list of image indices.
    Built-in sets are tensors already at the model's resolution: index and normalise.
    File sets go through a DataLoader; a missing or corrupt file comes back with ok=False
    (the worker cannot count it for us: the caller does)."""
    if isinstance(data.images, torch.Tensor):
        for idx in batches:
            yield world.normalize_images(data.images[torch.tensor(idx, dtype=torch.long)]), torch.ones(len(idx), dtype=torch.bool)
        return
    ds = ImageFileDataset(data, preprocess)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=workers,
                                         pin_memory=torch.cuda.is_available())  # page-locked: faster copies to the GPU
    for x, _, ok in loader:
        yield x, ok


def in_batches(items: range | list, size: int) -> list:
    """Consecutive chunks of `size` (the last one shorter)."""
    return [items[s:s + size] for s in range(0, len(items), size)]


def union(sets: list[ImageCaptionSet]) -> ImageCaptionSet:
    """All pairs of several sets in one (for joint training)."""
    caps = [c for s in sets for c in s.captions]
    if all(isinstance(s.images, torch.Tensor) for s in sets):
        return ImageCaptionSet(torch.cat([s.images for s in sets]), caps)
    return ImageCaptionSet([p for s in sets for p in s.images], caps)




# ---------------------------------------------------------------------------------------
# The authors' training recipe, each part a switch:
# - --pairs per-caption [code]: an epoch visits every (image, caption) pair once, so an
#   image comes back once per caption (and two captions of one image may share a batch,
#   each then a false negative of the other). per-image: each image once per epoch, with
#   one of its captions at random (never two captions of an image in one batch). The
#   built-in tasks have one caption per image: there the two are the same.
# - --augment [code]: RandomResizedCrop (torchvision's default scale 0.08-1) and a random
#   horizontal flip of the training images. On by default for real data; off for the
#   built-in world, whose captions name positions ("left of", "above") that a flip or a
#   crop would falsify.
# ---------------------------------------------------------------------------------------

def training_pairs(data: ImageCaptionSet, per_caption: bool, g: torch.Generator) -> tuple[list[int], list[int]]:
    """One epoch's (image index, caption index) pairs in random order, as two lists."""
    if per_caption:
        pairs = [(i, c) for i, caps in enumerate(data.captions) for c in range(len(caps))]
        pairs = [pairs[j] for j in torch.randperm(len(pairs), generator=g).tolist()]
    else:
        order = torch.randperm(len(data), generator=g).tolist()
        pairs = [(i, int(torch.randint(len(data.captions[i]), (1,), generator=g))) for i in order]
    return [i for i, _ in pairs], [c for _, c in pairs]


def train_transform(resolution: int):
    """The authors' training augmentation on a PIL image, then CLIP's normalisation."""
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(resolution, interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(clip_model.CLIP_MEAN, clip_model.CLIP_STD)])


def augment_tensors(x: torch.Tensor) -> torch.Tensor:
    """train_transform for images that are tensors already (B, 3, H, W): each image its
    own random crop (resized back to H x W) and flip."""
    from torchvision import transforms as T
    from torchvision.transforms import functional as TF

    H, W = x.shape[-2:]
    out = []
    for img in x:
        i, j, h, w = T.RandomResizedCrop.get_params(img, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
        img = TF.resized_crop(img, i, j, h, w, [H, W], interpolation=T.InterpolationMode.BICUBIC, antialias=True)
        out.append(TF.hflip(img) if torch.rand(()) < 0.5 else img)
    return torch.stack(out)


# ========================================================================================
# A set through a model's encoders, and one epoch's batches of pairs
# ========================================================================================

class Encoded(NamedTuple):
    """A set through the encoders (encode_set): every image's and caption's features, the
    image each caption describes, and which images could be read."""
    img: Tensor        # (N, E)
    cap: Tensor        # (N_cap, E)
    cap2img: Tensor    # (N_cap,)
    ok: Tensor         # (N,) bool; False: an unreadable file, left out of the pool


@torch.no_grad()
def encode_set(model, data: ImageCaptionSet, s, env: Env, img_task=None, cap_task=None,
               progress: str | None = None) -> Encoded:
    """Encode every image and caption of a set with a model of lpi.py (LPI or L2P), with
    per-item task prompts (None: frozen CLIP); s: lpi.RunConfig (batch size, workers,
    progress). With several processes each encodes a contiguous shard and every process gets
    the whole set back."""
    from tqdm import tqdm

    dev, E, size = env.device, model.clip.cfg.embed_dim, s.batch_size
    images = shard(range(len(data)), env.dist)
    img_feats, ok_all = [torch.zeros(0, E)], [torch.zeros(0, dtype=torch.bool)]
    bar = tqdm(total=len(images), desc=progress, leave=False, disable=progress is None or not s.progress)
    for idx, (x, ok) in zip(in_batches(images, size),
                            image_batches(data, in_batches(list(images), size), env.preprocess, s.workers)):
        ids = None if img_task is None else img_task[list(idx)].to(dev)
        with autocast(dev, env.precision):
            img_feats.append(model.encode_image(x.to(dev), ids).float().cpu())
        ok_all.append(ok)
        bar.update(len(x))
    bar.close()
    captions = [c for caps in data.captions for c in caps]
    cap2img = torch.tensor([i for i, caps in enumerate(data.captions) for _ in caps], dtype=torch.long)
    cap_feats = [torch.zeros(0, E)]
    for idx in in_batches(shard(range(len(captions)), env.dist), size):
        batch = [captions[i] for i in idx]
        # frozen CLIP (no task ids) reads plain captions, without the M prompt placeholders
        tokens = (model.tokenize(batch) if cap_task is not None
                  else clip_model.tokenize(batch, model.clip.context_length, truncate=True)).to(dev)
        ids = None if cap_task is None else cap_task[list(idx)].to(dev)
        with autocast(dev, env.precision):
            cap_feats.append(model.encode_text(tokens, ids).float().cpu())
    gather = partial(gather_rows, d=env.dist)
    return Encoded(gather(torch.cat(img_feats)), gather(torch.cat(cap_feats)), cap2img, gather(torch.cat(ok_all)))


def global_batches(n_pairs: int, s, env: Env) -> list[range]:
    """One epoch's global batches of s.batch_size x processes positions; a last batch too
    small to give every process a pair is dropped."""
    world_size = env.dist.world
    return [b for b in in_batches(range(n_pairs), s.batch_size * world_size) if len(b) >= world_size]


def epoch_batches(data: ImageCaptionSet, s, env: Env, g: torch.Generator, preprocess):
    """One epoch in random order (data.training_pairs: --pairs): this process's share of each
    global batch, as (captions, images (b, 3, H, W), ok (b,) bool)."""
    order, pick = training_pairs(data, s.pairs == "per-caption", g)
    mine = [shard(b, env.dist) for b in global_batches(len(order), s, env)]
    images = image_batches(data, [[order[p] for p in P] for P in mine], preprocess, s.workers)
    for P, (x, ok) in zip(mine, images):
        yield [data.captions[order[p]][pick[p]] for p in P], x, ok



# ========================================================================================
# The backbone (--clip)
# ========================================================================================

_TINY_CLIPS: dict[tuple, clip_model.CLIP] = {}  # read (and decompressed) once per process


def load_backbone(s, device: torch.device) -> tuple[clip_model.CLIP, Callable, bool]:
    """s.clip (lpi.RunConfig) -> (CLIP, preprocess, is_tiny), with the MLP activation that
    s.clip_activation asks for or the file says (clip_model.load). random:NAME is NAME's
    architecture with random weights (seeded by s.seed): for smoke tests and timings where no
    checkpoint can be downloaded."""
    if s.clip.startswith("random:"):
        name = s.clip.partition(":")[2]
        if name not in clip_model.ARCHITECTURES:
            raise LPIError(f"--clip {s.clip}: unknown architecture; expected random: followed by one of "
                           f"{', '.join(clip_model.ARCHITECTURES)}")
        torch.manual_seed(s.seed)
        arch = dataclasses.replace(clip_model.ARCHITECTURES[name], activation=s.clip_activation or "quick_gelu")
        return clip_model.CLIP(arch).requires_grad_(False).eval().to(device), clip_model.preprocess_for(arch.image_resolution), False
    if s.clip == "tiny":
        if s.clip_activation not in (None, clip_model.TINY.activation):
            raise LPIError(f"--clip-activation {s.clip_activation}: the tiny CLIP was trained with "
                           f"{clip_model.TINY.activation}; leave the flag out")
        key = (str(s.cache_dir), s.pretrain_steps, str(device))
        if key not in _TINY_CLIPS:
            _TINY_CLIPS[key] = world.load_or_build_tiny_clip(s.cache_dir, steps=s.pretrain_steps, progress=s.progress,
                                                             device=device, workers=s.workers)
        model = copy.deepcopy(_TINY_CLIPS[key]).to(device)
        return model, clip_model.preprocess_for(model.visual.input_resolution), True
    model, preprocess = clip_model.load(s.clip, device=device, activation=s.clip_activation,
                                        trust_torchscript=s.trust_torchscript)
    return model, preprocess, False


def load_tasks(s) -> list[Task]:
    """The tasks of s.tasks (lpi.RunConfig), in order, subsampled as s says (deterministic by s.seed)."""
    sizes = dict(n_train=s.max_train_per_task, n_test=s.max_test_per_task)
    tasks = parse_task_specs(s.tasks, s.data_root, {n: partial(BUILTIN_TASKS[n], **sizes) for n in BUILTIN_TASKS})
    return [subsample_task(t, s.max_train_per_task, s.max_test_per_task, s.seed) for t in tasks]


def convert_clip(s, path: Path) -> int:
    """--convert-clip: s.clip (read as --clip reads it, trusting what --trust-torchscript
    allows) written to path as a .safetensors state dict that records its activation, so that
    later runs read it without trusting anything."""
    if s.clip == "tiny" or s.clip.startswith("random:"):
        raise LPIError(f"--convert-clip converts a CLIP checkpoint file or folder, not --clip {s.clip}")
    if path.suffix != ".safetensors":
        raise LPIError(f"--convert-clip {path}: the file name must end in .safetensors")
    model, _, _ = load_backbone(s, torch.device("cpu"))
    atomic_write(path, lambda tmp: clip_model.save_safetensors(model, tmp))  # a complete file or none
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, activation {model.cfg.activation})")
    return 0


def export_tiny_clip(s, path: Path) -> int:
    """--export-tiny-clip: the tiny CLIP of s.pretrain_steps (cached or pre-trained now) in the
    shipped format (tiny_clip.pt.xz)."""
    model = world.load_or_build_tiny_clip(s.cache_dir, steps=s.pretrain_steps, progress=s.progress,
                                          device=pick_device(s.device), workers=s.workers)
    world.write_tiny_clip(model, world.settings_key(s.pretrain_steps)[1], path)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0
