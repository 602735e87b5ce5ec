"""The built-in world: a miniature of the paper's COCO protocol that runs on a CPU in minutes.

COCO's super-category tasks differ in *content*, and they overlap: "a man holding a frisbee
next to a dog" belongs to one task (the super-category covering most of its area) but shares
words and a scene with items of others, so every query competes with look-alikes of other
tasks, and the task of a query cannot always be told from the frozen features. This module
draws a small copy of that, deterministic by seed, with no file to download:

- six tasks, each a family of three objects with nouns of its own, and a setting of its own
  (under water, a meadow, soil, kitchen tiles, a road at night, a foggy harbour) whose light
  changes how colours look. The families come in three related pairs: their names share a
  word ("sea animals", "farm animals") and their objects an outline (animals round, tools a
  diamond, vehicles a wide box);
- the tasks overlap in three partner pairs that cross the related ones (sea animals and water
  vehicles, farm animals and garden tools, kitchen tools and road vehicles): a picture of a
  task is taken in its partner's setting some of the time (in its own light), and its second
  object is often of the partner's family. A picture belongs to the task of its larger
  object, as COCO gives an image to the super-category of largest area; its caption names
  both objects and never says which is larger. So neither a background nor a caption gives
  a task away for certain;
- captions are compositional: two objects, each with a colour, and where they are ("a red
  fish left of a blue boat in a foggy harbour"), so that retrieval inside a task needs every word;
- a tiny CLIP pre-trained here on a mixture that holds every noun, colour, relation, setting
  and family name of the world: fine captions in plain light, coarse ones ("a fish and a
  boat in a foggy harbour") in the settings. It knows the world broadly but has never read a
  colour in a setting's light: that is what each task's prompts have to learn.

lpi.py holds the method, the loop, the real-data loaders and the command line; it imports
this module for the built-in tasks and the tiny CLIP. Nothing here depends on lpi.py.
"""
from __future__ import annotations

import hashlib
import io
import json
import lzma
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

import clip_model

# Bump when the drawing, the captions or the pre-training mixture change: it is part of the
# tiny CLIP's key, so a backbone made for another world is never picked up. 5: world v3
# (tasks overlap: partner settings, objects of the partner family, a larger object per picture).
DATA_VERSION = 5
IMAGE_SIZE = 32


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float, normalised with CLIP's own mean / std (not ImageNet's)."""
    mean = torch.tensor(clip_model.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(clip_model.CLIP_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


# ========================================================================================
# The vocabulary: six families in three related pairs, and three partner pairs
# ========================================================================================

@dataclass(frozen=True)
class Family:
    """One task's content: a readable name, three object nouns, the kind it shares with
    its related family (which fixes the outline of its objects), its setting, and its partner:
    the family whose setting and objects its pictures share."""
    name: str                 # task name on the command line
    label: str                # readable name, for the task similarity (lpi.TASK_NAME_TEMPLATE)
    nouns: tuple[str, ...]
    kind: str                 # "animals", "tools" or "vehicles"
    setting: str              # a key of SETTINGS
    partner: str              # the name of the partner family


FAMILIES = {f.name: f for f in (
    Family("sea-animals", "sea animals", ("fish", "crab", "whale"), "animals", "underwater", "water-vehicles"),
    Family("farm-animals", "farm animals", ("cow", "pig", "sheep"), "animals", "meadow", "garden-tools"),
    Family("garden-tools", "garden tools", ("rake", "spade", "shears"), "tools", "soil", "farm-animals"),
    Family("kitchen-tools", "kitchen tools", ("knife", "spoon", "kettle"), "tools", "tiles", "road-vehicles"),
    Family("road-vehicles", "road vehicles", ("car", "bus", "truck"), "vehicles", "night road", "kitchen-tools"),
    Family("water-vehicles", "water vehicles", ("boat", "ship", "canoe"), "vehicles", "foggy harbour", "sea-animals"),
)}
NOUNS = tuple(n for f in FAMILIES.values() for n in f.nouns)               # 18, family by family
COLOURS = {  # name -> RGB in [0, 1]
    "red": (0.86, 0.16, 0.16), "green": (0.16, 0.78, 0.24), "blue": (0.20, 0.32, 0.92),
    "yellow": (0.92, 0.86, 0.20),
}
COLOUR_NAMES = tuple(COLOURS)

# How the tasks overlap (world v3). Set once, before any method was compared on the world, so
# that the pool of all seen tasks and the routing matter (README, "What python lpi.py shows").
MIXED = 0.4           # share of a task's pictures whose second object is of the partner family
IN_PARTNER_SETTING = 0.4  # share of a task's pictures seen in the partner's setting
HALF = 7.5            # half the side of the larger object's box, in pixels: 15 of a cell's 16
HALF_SMALL = 5.0      # half the side of the smaller object's box


# ----------------------------------------------------------------------------------------
# Looks: every object sits in one 16 x 16 cell of the picture. Its outline is its kind's
# (related families share it: animals round, tools a diamond, vehicles a wide box) and
# its surface pattern is its own (stripes of four orientations, a checkerboard, solid),
# so each noun is told apart from its family by the pattern and from the other kinds by
# the outline; the pattern's gaps show the background.
# ----------------------------------------------------------------------------------------

OUTLINES = {  # (u, v) in [-1, 1]^2 over the object's box -> inside?
    "animals": lambda u, v: u * u + v * v < 1.0,
    "tools": lambda u, v: u.abs() + v.abs() < 1.05,
    "vehicles": lambda u, v: (u.abs() < 0.95) & (v.abs() < 0.6),
}
PATTERNS = (  # (x, y) pixel offsets inside the box -> drawn?
    lambda x, y: y % 3 != 2,                    # horizontal stripes
    lambda x, y: x % 3 != 2,                    # vertical stripes
    lambda x, y: (x + y) % 3 != 2,              # diagonal stripes
    lambda x, y: (x - y) % 3 != 2,              # the other diagonal
    lambda x, y: (x // 2 + y // 2) % 2 == 0,    # checkerboard
    lambda x, y: x >= 0,                        # solid
)


def looks() -> list[tuple[str, int]]:
    """(outline, pattern) of every noun, in the order of NOUNS: within a kind, the first
    family takes patterns 0-2 and its related family 3-5."""
    out, used = [], {}
    for fam in FAMILIES.values():
        for noun in fam.nouns:
            out.append((fam.kind, used.get(fam.kind, 0)))
            used[fam.kind] = used.get(fam.kind, 0) + 1
    return out


# ========================================================================================
# Scenes: two objects, each a (noun, colour, size), side by side or one above the other,
# in a setting
# ========================================================================================

@dataclass
class Scenes:
    """N scenes as tensors; (N, 2) fields hold object 0 (left / top) and object 1."""
    noun: torch.Tensor      # (N, 2) index into NOUNS
    colour: torch.Tensor    # (N, 2) index into COLOUR_NAMES
    vertical: torch.Tensor  # (N,) bool: object 0 above object 1 (else left of it)
    small: torch.Tensor     # (N, 2) bool: the object is drawn small (HALF_SMALL)
    setting: torch.Tensor   # (N,) index into SETTING_NAMES: the background and the caption's phrase
    light: torch.Tensor     # (N,) index into SETTING_NAMES: whose light the objects are seen in

    def __len__(self) -> int:
        return len(self.vertical)

    def __getitem__(self, idx) -> "Scenes":
        return Scenes(self.noun[idx], self.colour[idx], self.vertical[idx], self.small[idx], self.setting[idx],
                      self.light[idx])

    def codes(self) -> torch.Tensor:
        """(N,) one integer per caption: scenes with equal codes read the same (the caption
        says nothing of size)."""
        n_obj = len(NOUNS) * len(COLOURS)
        obj = self.noun * len(COLOURS) + self.colour                                  # (N, 2)
        return ((obj[:, 0] * n_obj + obj[:, 1]) * 2 + self.vertical.long()) * len(SETTING_NAMES) + self.setting


def two_colours(n: int, g: torch.Generator) -> torch.Tensor:
    """(n, 2) colour indices, never equal, so that colours alone cannot match a caption."""
    first = torch.randint(len(COLOURS), (n,), generator=g)
    return torch.stack([first, (first + torch.randint(1, len(COLOURS), (n,), generator=g)) % len(COLOURS)], 1)


def pick(choices: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """n draws from a 1-D tensor of choices, uniformly."""
    return choices[torch.randint(len(choices), (n,), generator=g)]


def family_nouns(name: str) -> torch.Tensor:
    """Indices into NOUNS of a family's nouns."""
    return torch.tensor([NOUNS.index(n) for n in FAMILIES[name].nouns])


def task_scenes(name: str, n: int, g: torch.Generator) -> Scenes:
    """n scenes of task `name`: a larger object of its family beside a smaller one, of its
    partner's family with probability MIXED (else of its own), left / right or top / bottom at
    random; in its partner's setting with probability IN_PARTNER_SETTING (else its own), and
    always in its own setting's light (the task's light: see SETTINGS)."""
    fam = FAMILIES[name]
    partner = FAMILIES[fam.partner]
    main = pick(family_nouns(name), n, g)                                            # (n,) the larger object
    mixed = torch.rand(n, generator=g) < MIXED
    second = torch.where(mixed, pick(family_nouns(partner.name), n, g), pick(family_nouns(name), n, g))
    main_first = torch.rand(n, generator=g) < 0.5                                    # the larger one is object 0
    noun = torch.where(main_first[:, None], torch.stack([main, second], 1), torch.stack([second, main], 1))
    away = torch.rand(n, generator=g) < IN_PARTNER_SETTING
    setting = torch.where(away, SETTING_NAMES.index(partner.setting), SETTING_NAMES.index(fam.setting))
    return Scenes(noun, two_colours(n, g), torch.rand(n, generator=g) < 0.5,
                  torch.stack([~main_first, main_first], 1), setting,
                  torch.full((n,), SETTING_NAMES.index(fam.setting)))                       # the task's own light


def distinct(draw: Callable[[int], Scenes], n: int, exclude: torch.Tensor | None = None,
             unique: bool = True) -> Scenes:
    """n scenes from `draw`, none whose caption is in `exclude` (codes), all with different
    captions if `unique`. Draws in rounds, keeping the first acceptable scenes in order."""
    kept, seen = [], set() if exclude is None else set(exclude.tolist())
    while sum(map(len, kept)) < n:
        batch = draw(2 * n + 16)
        ok = []
        for i, c in enumerate(batch.codes().tolist()):
            if c not in seen:
                ok.append(i)
                if unique:
                    seen.add(c)
        kept.append(batch[torch.tensor(ok, dtype=torch.long)])
    out = Scenes(*(torch.cat([getattr(k, f) for k in kept]) for f in Scenes.__dataclass_fields__))
    return out[:n]


# ----------------------------------------------------------------------------------------
# Drawing, vectorised over the batch
# ----------------------------------------------------------------------------------------

def glyph_masks(noun: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor,
                half: torch.Tensor | float = HALF) -> torch.Tensor:
    """Boolean masks (N, H, W) of N objects centred at (cx, cy), 2 * half pixels wide."""
    half = torch.as_tensor(half, dtype=torch.float32).expand(len(noun)).reshape(-1, 1, 1)
    pix = torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5
    u = (pix.view(1, 1, -1) - cx.view(-1, 1, 1)) / half                     # (N, 1, W), [-1, 1] inside
    v = (pix.view(1, -1, 1) - cy.view(-1, 1, 1)) / half                     # (N, H, 1)
    x = (pix.view(1, 1, -1) - cx.view(-1, 1, 1) + half).floor().long()      # pixel offsets in the box
    y = (pix.view(1, -1, 1) - cy.view(-1, 1, 1) + half).floor().long()
    masks = torch.zeros(len(noun), IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool)
    for i, (kind, pattern) in enumerate(looks()):
        sel = noun == i
        if sel.any():
            masks[sel] = OUTLINES[kind](u[sel], v[sel]) & PATTERNS[pattern](x[sel], y[sel])
    return masks


def layout(scenes: Scenes, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Object centres (N, 2) x and y. The picture is 2 x 2 cells of 16 x 16 pixels (2 x 2
    patches of the tiny CLIP each); the two objects sit in two cells of one row (object 0
    left) or of one column (object 0 on top), the free row or column drawn at random."""
    n = len(scenes)
    other = 8.0 + 16.0 * torch.randint(2, (n, 1), generator=g).float()      # the shared row / column
    along = torch.tensor([[8.0, 24.0]]).expand(n, 2)
    vert = scenes.vertical.view(-1, 1)
    return torch.where(vert, other.expand(n, 2), along), torch.where(vert, along, other.expand(n, 2))


def draw(scenes: Scenes, background: torch.Tensor, colours: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Paint the two objects of every scene onto `background` (N, 3, H, W), filled with
    `colours` (N, 2, 3); float images in [0, 1]."""
    cx, cy = layout(scenes, g)
    half = torch.where(scenes.small, HALF_SMALL, HALF)                        # (N, 2)
    img = background.clone()
    for k in range(2):
        mask = glyph_masks(scenes.noun[:, k], cx[:, k], cy[:, k], half[:, k]).unsqueeze(1)  # (N, 1, H, W)
        img = torch.where(mask, colours[:, k].view(-1, 3, 1, 1), img)
    return img


def true_colours(scenes: Scenes, g: torch.Generator, jitter: float = 0.05) -> torch.Tensor:
    """The RGB of each object (N, 2, 3), with a little per-object jitter."""
    rgb = torch.tensor(list(COLOURS.values()))[scenes.colour]
    return (rgb + jitter * (2 * torch.rand(rgb.shape, generator=g) - 1)).clamp(0, 1)


def noise(img: torch.Tensor, std: float, g: torch.Generator) -> torch.Tensor:
    return img + std * torch.randn(img.shape, generator=g)
# ----------------------------------------------------------------------------------------
# Settings: where a family is seen. Each has a background of its own, a phrase that
# captions end with, and a light of its own: a colour transform c -> clamp(A c + b) of the
# objects' true colours, the way water swallows red or a sodium street lamp turns everything
# orange. Every light is invertible (A has full rank), so colours can be read in every
# setting, but not with the plain-light reading: red under water turns a dull rose. LIGHT
# scales how far each light moves the colours.
# A task's light is its own setting's, also in the pictures it takes in its partner's
# setting (a fish in the harbour is still under water): so the partner's prompts, which
# know the background and the objects, do not know the light, and sending a picture to
# the wrong task costs what it costs in COCO, where each task's prompts fit its own content.
# The pre-training mixture shows every setting in its own light, never with a colour word.
# ----------------------------------------------------------------------------------------

LIGHT = 0.5  # how strongly a setting's light acts (1: the full transform); at 1 zero-shot is at chance


@dataclass(frozen=True)
class Setting:
    background: Callable[[int, torch.Generator], torch.Tensor]   # n -> (n, 3, H, W)
    phrase: str                                                   # as COCO captions say "in a kitchen"
    A: tuple                                                      # 3x3, rows = output channel
    b: tuple = (0.0, 0.0, 0.0)

    def light(self, rgb: torch.Tensor) -> torch.Tensor:
        """(..., 3) true colours -> the colours seen in this setting: LIGHT of the way from
        the true colour to A c + b."""
        lit = rgb @ torch.tensor(self.A, dtype=rgb.dtype).t() + torch.tensor(self.b, dtype=rgb.dtype)
        return (rgb + LIGHT * (lit - rgb)).clamp(0, 1)


def _grid() -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates y (1, 1, H, 1) and x (1, 1, 1, W)."""
    r = torch.arange(IMAGE_SIZE, dtype=torch.float32)
    return r.view(1, 1, -1, 1), r.view(1, 1, 1, -1)


def _flat(n: int, rgb, g: torch.Generator, spread: float = 0.04) -> torch.Tensor:
    """Backgrounds of one colour with a random brightness offset each: (N, 3, H, W)."""
    level = torch.tensor(rgb).view(1, 3, 1, 1) + spread * (2 * torch.rand(n, 1, 1, 1, generator=g) - 1)
    return level.expand(n, 3, IMAGE_SIZE, IMAGE_SIZE)


def _grey(n, g):
    return _flat(n, (0.28, 0.28, 0.28), g, spread=0.12) + 0.03 * (2 * torch.rand(n, 3, 1, 1, generator=g) - 1)


def _water(n, g):  # teal with wavy light bands
    y, x = _grid()
    phase = 2 * math.pi * torch.rand(n, 1, 1, 1, generator=g)
    return _flat(n, (0.04, 0.22, 0.32), g) + 0.06 * torch.sin(0.8 * y + 1.5 * torch.sin(0.4 * x + phase) + phase)


def _grass(n, g):  # green in vertical streaks
    return (_flat(n, (0.20, 0.42, 0.12), g) + 0.08 * torch.rand(n, 1, 1, IMAGE_SIZE, generator=g)
            + 0.03 * torch.rand(n, 1, IMAGE_SIZE, IMAGE_SIZE, generator=g))


def _soil(n, g):  # dark brown, speckled
    return _flat(n, (0.30, 0.20, 0.12), g) + 0.10 * (torch.rand(n, 1, IMAGE_SIZE, IMAGE_SIZE, generator=g) < 0.15)


def _tiles(n, g):  # cream and white checkerboard, 4-pixel tiles, random offset
    y, x = _grid()
    off = torch.randint(4, (n, 2, 1, 1), generator=g).float()
    check = (((y + off[:, :1]) // 4 + (x + off[:, 1:]) // 4) % 2).view(n, 1, IMAGE_SIZE, IMAGE_SIZE)
    return _flat(n, (0.80, 0.76, 0.62), g) + 0.10 * check


def _road(n, g):  # asphalt at night with a dashed lane line along the bottom
    lane = torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE)
    lane[..., 30, :] = ((torch.arange(IMAGE_SIZE) // 3) % 2).float()
    return _flat(n, (0.06, 0.06, 0.08), g, spread=0.02) + 0.5 * lane


def _harbour(n, g):  # grey-blue water fading into light fog at the top
    y, _ = _grid()
    t = y / (IMAGE_SIZE - 1)
    sky, sea = torch.tensor([0.62, 0.65, 0.68]).view(1, 3, 1, 1), torch.tensor([0.15, 0.25, 0.40]).view(1, 3, 1, 1)
    return (sky * (1 - t) + sea * t).expand(n, 3, IMAGE_SIZE, IMAGE_SIZE) + _flat(n, (0, 0, 0), g)


I3 = ((1, 0, 0), (0, 1, 0), (0, 0, 1))
SETTINGS: dict[str, Setting] = {
    "plain": Setting(_grey, "", I3),
    # water swallows red first, then green; what is left is tinted blue-green
    "underwater": Setting(_water, "under water", ((0.30, 0.00, 0.00), (0.10, 0.60, 0.20), (0.10, 0.20, 0.60)),
                          (0.02, 0.18, 0.25)),
    # low golden sun: warm, blue dimmed
    "meadow": Setting(_grass, "on a meadow", ((0.70, 0.20, 0.00), (0.10, 0.70, 0.00), (0.00, 0.10, 0.40)),
                      (0.25, 0.15, 0.00)),
    # dust: colours pulled towards their grey and dimmed, a brown tint
    "soil": Setting(_soil, "on the soil", ((0.48, 0.14, 0.14), (0.14, 0.48, 0.14), (0.14, 0.14, 0.48)),
                    (0.08, 0.05, 0.02)),
    # fluorescent glare: washed out, slightly green
    "tiles": Setting(_tiles, "on kitchen tiles", ((0.55, 0.00, 0.00), (0.00, 0.55, 0.00), (0.00, 0.00, 0.55)),
                     (0.38, 0.43, 0.35)),
    # sodium street lamps: red and green merge towards orange, blue almost gone
    "night road": Setting(_road, "on a road at night", ((0.50, 0.30, 0.10), (0.30, 0.30, 0.10), (0.00, 0.05, 0.15)),
                          (0.10, 0.05, 0.02)),
    # fog: half-way to light grey
    "foggy harbour": Setting(_harbour, "in a foggy harbour", ((0.50, 0.00, 0.00), (0.00, 0.50, 0.00),
                                                             (0.00, 0.00, 0.50)), (0.30, 0.32, 0.34)),
}


SETTING_NAMES = tuple(SETTINGS)


def paint(scenes: Scenes, g: torch.Generator) -> torch.Tensor:
    """Scenes -> float images (N, 3, H, W) in [0, 1], each seen in its own setting."""
    images = torch.empty(len(scenes), 3, IMAGE_SIZE, IMAGE_SIZE)
    for k in scenes.setting.unique().tolist():
        idx = (scenes.setting == k).nonzero().flatten()
        s, part = SETTINGS[SETTING_NAMES[k]], scenes[idx]
        colours = true_colours(part, g)                                              # (n, 2, 3)
        for li in part.light.unique().tolist():
            sel = part.light == li
            colours[sel] = SETTINGS[SETTING_NAMES[li]].light(colours[sel])
        images[idx] = draw(part, s.background(len(idx), g), colours, g)
    return noise(images, 0.02, g)


# ----------------------------------------------------------------------------------------
# Captions: "a red fish left of a blue boat in a foggy harbour" (the left or top object
# first, the setting's phrase last; nothing about size). The coarse captions of the
# pre-training mixture name only the objects and the setting: "a fish and a boat in a
# foggy harbour".
# ----------------------------------------------------------------------------------------

def _phrase(setting: int) -> str:
    phrase = SETTINGS[SETTING_NAMES[setting]].phrase
    return f" {phrase}" if phrase else ""


def captions(scenes: Scenes) -> list[str]:
    """Fine captions: every object's colour and noun, and where they are, the left (top)
    object named first: "a red fish left of a blue crab", "a red fish above a blue crab"."""
    out = []
    for nn, cc, vert, st in zip(scenes.noun.tolist(), scenes.colour.tolist(), scenes.vertical.tolist(),
                                scenes.setting.tolist()):
        obj = [f"{COLOUR_NAMES[cc[k]]} {NOUNS[nn[k]]}" for k in range(2)]
        out.append(f"a {obj[0]} {'above' if vert else 'left of'} a {obj[1]}{_phrase(st)}")
    return out


def coarse_captions(scenes: Scenes) -> list[str]:
    """Coarse captions: the two nouns and the setting; nothing that tells scenes of the same
    objects apart (no colour, no relation)."""
    return [f"a {NOUNS[a]} and a {NOUNS[b]}{_phrase(st)}" for (a, b), st in zip(scenes.noun.tolist(),
                                                                               scenes.setting.tolist())]


@contextmanager
def _one_thread():
    """Drawing is many small element-wise ops; on a busy 2-core machine the thread pool's
    synchronisation costs far more than the work (measured: 25x slower), so draw on one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def render(scenes: Scenes, g: torch.Generator, coarse: bool = False) -> tuple[torch.Tensor, list[list[str]]]:
    """Scenes -> uint8 images (N, 3, H, W), and one caption each (fine, or coarse)."""
    with _one_thread():
        images = (paint(scenes, g).clamp(0, 1) * 255).round().to(torch.uint8)
    text = coarse_captions(scenes) if coarse else captions(scenes)
    return images, [[c] for c in text]


def _generator(seed: int, salt: str) -> torch.Generator:
    """A torch RNG seeded by (seed, salt): every family and split gets its own stream."""
    digest = hashlib.sha256(f"{seed}/{salt}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


TASK_SIZES = dict(n_train=1000, n_test=100)  # images per task


def make_split(name: str, n_train: int = TASK_SIZES["n_train"], n_test: int = TASK_SIZES["n_test"], seed: int = 0):
    """The built-in task `name`: ((train images, captions), (test images, captions)). Test
    captions are all different, and none is a training caption. Training scenes may repeat
    (a task has about 1,700 distinct captions), drawn again each time."""
    g = _generator(seed, name)
    draw_task = lambda n: task_scenes(name, n, g)  # noqa: E731
    test = distinct(draw_task, n_test)
    train = distinct(draw_task, n_train, exclude=test.codes(), unique=False)
    return render(train, g), render(test, g)


# ========================================================================================
# The pre-training mixture and the tiny CLIP
#
# Stand-in for CLIP's web-scale pre-training, one fresh batch per step (the generator is
# the data set). It teaches the world broadly but not each task's fine distinctions, and
# knows nothing of how the tasks overlap (MIXED, IN_PARTNER_SETTING):
# - three quarters of each batch: two objects in plain light on a grey background, with a
#   fine caption ("a red fish left of a blue boat"); in each quarter one object is of one
#   family (so that the negatives share nouns), the other of that family or, half of the
#   time, of any: every noun, colour and relation, but in no setting;
# - the last quarter: two objects of any families in any setting, with a coarse caption
#   ("a fish and a boat under water"), or, for a quarter of them, a family's two objects in
#   its own setting captioned with the family's name ("a photo of sea animals", so that task
#   names can be read): every setting, its light and every object in it, but never which
#   colour or place is which there.
# Each object is drawn large or small at random. Every word the tasks use is in this
# mixture; a task's captions join the two kinds (a fine description in a setting's light),
# which the tiny CLIP never saw.
# ========================================================================================

NAME_TEMPLATE = "a photo of {}"   # = lpi.TASK_NAME_TEMPLATE, with which LPI compares task names
NAMED = 0.25                       # share of the setting quarter captioned with a family's name


def mixture_scenes(n: int, g: torch.Generator, first: torch.Tensor, second: torch.Tensor,
                   setting: torch.Tensor) -> Scenes:
    """n scenes: object nouns drawn from `first` and `second` (in random order), sizes at
    random, in the given setting(s)."""
    a, b = pick(first, n, g), pick(second, n, g)
    swap = torch.rand(n, generator=g) < 0.5
    noun = torch.where(swap[:, None], torch.stack([b, a], 1), torch.stack([a, b], 1))
    where = pick(setting, n, g)
    return Scenes(noun, two_colours(n, g), torch.rand(n, generator=g) < 0.5, torch.rand(n, 2, generator=g) < 0.5,
                  where, where)


def generic_mixture(n: int, seed: int = 0) -> tuple[torch.Tensor, list[list[str]]]:
    """n pre-training pairs, deterministic by seed: (uint8 images, captions)."""
    g = _generator(seed, "generic")
    fams, everything = list(FAMILIES), torch.arange(len(NOUNS))
    plain, settings = torch.tensor([SETTING_NAMES.index("plain")]), torch.arange(1, len(SETTING_NAMES))
    images, caps = [], []
    for quarter in range(3):  # fine: one object of the quarter's family, the other of it or of any
        own = family_nouns(fams[int(torch.randint(len(fams), (1,), generator=g))])
        scenes = mixture_scenes(n // 4, g, own, own, plain)
        cross = torch.rand(len(scenes), generator=g) < 0.5
        scenes.noun[:, 1] = torch.where(cross, pick(everything, len(scenes), g), scenes.noun[:, 1])
        img, cap = render(scenes, g)
        images.append(img), caps.extend(cap)
    rest = n - 3 * (n // 4)
    named = torch.rand(rest, generator=g) < NAMED
    img, cap = render(mixture_scenes(int((~named).sum()), g, everything, everything, settings), g, coarse=True)
    images.append(img), caps.extend(cap)
    k = int(named.sum())                           # named: a family's two objects, in its own setting
    f = torch.randint(len(fams), (k,), generator=g)
    table = torch.stack([family_nouns(name) for name in fams])                   # (families, 3)
    own_setting = torch.tensor([SETTING_NAMES.index(FAMILIES[name].setting) for name in fams])
    scenes = Scenes(table[f[:, None], torch.randint(3, (k, 2), generator=g)], two_colours(k, g),
                    torch.rand(k, generator=g) < 0.5, torch.rand(k, 2, generator=g) < 0.5, own_setting[f],
                    own_setting[f])
    images.append(render(scenes, g)[0])
    caps.extend([NAME_TEMPLATE.format(FAMILIES[fams[i]].label)] for i in f.tolist())
    return torch.cat(images), caps


# Prompt-slot augmentation [ours]. A web-scale CLIP shrugs off a few extra tokens: captions
# vary in length and wording, so words move around. Our tiny CLIP sees one template at
# fixed positions and does not: untrained prompt tokens in each encoder would put every
# prompt method below zero-shot from the start. So in a fraction of the batches, random
# vocabulary tokens sit between SOT and the caption (exactly where text prompts go), and
# random tokens after CLS (where visual prompts go); the encoders learn to read past them.
PRETRAIN_DEFAULTS = dict(steps=3000, batch_size=128, lr=2e-3, weight_decay=0.05, warmup=50,
                         slot_augment=0.5, max_slot_tokens=8)


class MixtureBatches(torch.utils.data.Dataset):
    """Batch `step` of the pre-training stream: (images, tokens, visual prompts), a function
    of (seed, step) only, so DataLoader workers can draw the batches in parallel."""

    def __init__(self, steps: int, batch_size: int, seed: int, slot_augment: float, max_slot_tokens: int,
                 config: clip_model.CLIPConfig):
        self.steps, self.batch_size, self.seed, self.cfg = steps, batch_size, seed, config
        self.slot_augment, self.max_slot_tokens = slot_augment, max_slot_tokens

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int):
        B, g = self.batch_size, _generator(self.seed, f"slots/{step}")
        images, caps = generic_mixture(B, seed=self.seed * 1_000_003 + step)
        visual_prompts, m_text = torch.zeros(B, 1, 0, self.cfg.vision_width), 0
        if torch.rand(1, generator=g).item() < self.slot_augment:
            m_text, m_vis = torch.randint(1, self.max_slot_tokens + 1, (2,), generator=g).tolist()
            visual_prompts = torch.randn(B, 1, m_vis, self.cfg.vision_width, generator=g)  # (B, J=1, M, D)
        tokens = clip_model.tokenize([c[0] for c in caps], context_length=self.cfg.context_length, truncate=True,
                                     prompt_length=m_text)
        if m_text:  # the placeholders become random words (ids 256.. are the merged BPE tokens)
            tokens[:, 1:1 + m_text] = torch.randint(256, self.cfg.vocab_size - 2, (B, m_text), generator=g)
        return normalize_images(images), tokens, visual_prompts


def pretrain_tiny_clip(steps: int = PRETRAIN_DEFAULTS["steps"], batch_size: int = PRETRAIN_DEFAULTS["batch_size"],
                       seed: int = 0, lr: float = PRETRAIN_DEFAULTS["lr"],
                       weight_decay: float = PRETRAIN_DEFAULTS["weight_decay"],
                       warmup: int = PRETRAIN_DEFAULTS["warmup"],
                       slot_augment: float = PRETRAIN_DEFAULTS["slot_augment"],
                       max_slot_tokens: int = PRETRAIN_DEFAULTS["max_slot_tokens"],
                       config: clip_model.CLIPConfig = clip_model.TINY, progress: bool = True,
                       device: str | torch.device = "cpu", workers: int = 0) -> clip_model.CLIP:
    """Train clip_model.CLIP(config) from scratch on the generic mixture: AdamW, linear
    warm-up then cosine decay to zero, weight decay on matrices only, prompt-slot
    augmentation in a fraction `slot_augment` of the batches. `workers` processes draw the
    batches. Returns the model on the CPU, in eval mode."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    model = clip_model.CLIP(config).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: (i + 1) / warmup if i < warmup else 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, steps - warmup))))
    batches = torch.utils.data.DataLoader(MixtureBatches(steps, batch_size, seed, slot_augment, max_slot_tokens, config),
                                          batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None)
    model.train()
    bar = tqdm(batches, desc="pre-training tiny CLIP", disable=not progress)
    for images, tokens, visual_prompts in bar:
        images, tokens, visual_prompts = images.to(device), tokens.to(device), visual_prompts.to(device)
        loss = clip_model.clip_loss(model.encode_image(images, visual_prompts if visual_prompts.shape[2] else None),
                                    model.encode_text(tokens), model.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.cpu().eval()


# ----------------------------------------------------------------------------------------
# The shipped tiny CLIP
#
# tiny_clip.pt.xz (a few MB) ships with the repository so that `python lpi.py` spends its
# minutes on LPI, not on pre-training. It is exactly what load_or_build_tiny_clip builds
# from the settings it records (its key); rebuild it with
# `python lpi.py --export-tiny-clip tiny_clip.pt.xz`. Two things keep it small: token rows
# of words the world never uses are zeroed (they never received a gradient), so xz
# compresses them away; and the weights are stored in fp16 (fp32 after loading: fp16
# storage is part of the definition of the tiny CLIP, cache included).
# ----------------------------------------------------------------------------------------

SHIPPED_TINY_CLIP = Path(__file__).with_name("tiny_clip.pt.xz")


def world_vocabulary() -> torch.Tensor:
    """Token ids the world can produce (pre-training captions, every task's captions, the
    task-name template, the prompt placeholder, SOT/EOT), found by tokenizing a large sample."""
    texts = [c[0] for c in generic_mixture(4000, seed=12345)[1]]
    for name, fam in FAMILIES.items():
        texts += [c[0] for c in make_split(name, n_train=1000, n_test=10, seed=12345)[0][1]]
        texts.append(NAME_TEMPLATE.format(fam.label))
    return clip_model.tokenize(texts + [clip_model.PLACEHOLDER], context_length=77, truncate=True).unique()


def settings_key(steps: int, seed: int = 0, batch_size: int = PRETRAIN_DEFAULTS["batch_size"],
                 **train_kwargs) -> tuple[dict, str]:
    """(pre-training settings, the key that names a tiny CLIP made with them)."""
    settings = dict(PRETRAIN_DEFAULTS, steps=steps, batch_size=batch_size, **train_kwargs)
    key = json.dumps(dict(settings, seed=seed, data_version=DATA_VERSION, config=repr(clip_model.TINY)),
                     sort_keys=True)
    return settings, key


def write_tiny_clip(model: clip_model.CLIP, key: str, path: Path) -> None:
    """fp16 weights, unused token rows zeroed, xz-compressed; written atomically."""
    sd = {k: v.detach().half().clone() for k, v in model.state_dict().items()}
    keep = torch.zeros(sd["token_embedding.weight"].shape[0], dtype=torch.bool)
    keep[world_vocabulary()] = True
    sd["token_embedding.weight"][~keep] = 0
    buf = io.BytesIO()
    torch.save({"key": key, "state_dict": sd}, buf)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(lzma.compress(buf.getvalue(), preset=6))
    os.replace(tmp, path)  # an interrupted export never leaves half a file


def read_tiny_clip(path: Path) -> tuple[str, clip_model.CLIP]:
    """(settings key, a fresh model) from a file written by write_tiny_clip."""
    p = Path(path).resolve()
    blob = _decoded_tiny_clip(str(p), p.stat().st_mtime_ns)
    return blob["key"], clip_model.build_model(blob["state_dict"])  # build_model copies: callers never share


@lru_cache(maxsize=4)
def _decoded_tiny_clip(path: str, mtime_ns: int) -> dict:
    """Decompressing costs ~2 s: done once per file version and process (tests, notebooks)."""
    return torch.load(io.BytesIO(lzma.decompress(Path(path).read_bytes())), map_location="cpu", weights_only=True)


def load_or_build_tiny_clip(cache_dir: str | Path, steps: int = PRETRAIN_DEFAULTS["steps"], seed: int = 0,
                            batch_size: int = PRETRAIN_DEFAULTS["batch_size"], progress: bool = True,
                            device: str | torch.device = "cpu", workers: int = 0, **train_kwargs) -> clip_model.CLIP:
    """The tiny CLIP pre-trained with these settings: the shipped file if it was made with
    them, else the cache in `cache_dir`, else pre-train it now and cache it. The cache name
    carries a hash of every setting that changes the weights, so a stale file is never used."""
    settings, key = settings_key(steps, seed, batch_size, **train_kwargs)
    if SHIPPED_TINY_CLIP.is_file():
        shipped_key, model = read_tiny_clip(SHIPPED_TINY_CLIP)
        if shipped_key == key:
            return model
    path = Path(cache_dir) / f"tiny_clip_{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt.xz"
    if path.is_file():
        return read_tiny_clip(path)[1]
    print(f"pre-training the tiny CLIP ({steps} steps; cached in {path} for later runs)")
    model = pretrain_tiny_clip(seed=seed, progress=progress, device=device, workers=workers, **settings)
    write_tiny_clip(model, key, path)
    return read_tiny_clip(path)[1]  # the stored (compact) weights are the tiny CLIP, first run included
