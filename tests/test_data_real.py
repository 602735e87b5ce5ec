"""Tests for the real-data loaders (COCO / Flickr30K Karpathy splits, COCO super-category
tasks, subsampling, image loading, --tasks parsing) on tiny on-disk fixtures."""

import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from data import (COCO_TASK_ORDER, ImageCaptionSet, ImageFileDataset, LPIError, Task, coco_supercategory_tasks,
                     coco_task, flickr_task, image_batches, load_karpathy, number_supercategories,
                     parse_task_specs, split_coco_by_supercategory, subsample)  # noqa: E402

from fixtures import COCO_CATEGORIES, make_coco_fixture, make_flickr_fixture  # noqa: E402

# The paper's task order written out by name (METHOD.md §7), independently of the loader.
PAPER_ORDER = ["appliance", "sports", "outdoor", "electronic", "accessory", "indoor",
               "kitchen", "furniture", "vehicle", "food", "animal", "person"]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_coco_fixture(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def flickr(tmp_path_factory):
    return make_flickr_fixture(str(tmp_path_factory.mktemp("data")))


def tiny_preprocess(img):
    """PIL image -> (3, 16, 16) float tensor; stands in for CLIP's preprocess."""
    return torch.from_numpy(np.asarray(img.resize((16, 16)), dtype=np.float32)).permute(2, 0, 1) / 255


def cocoid_of(fx, path):
    return {p: i for i, p in fx.path.items()}[path]


# ----------------------------------------------------------------------------------------
# Loading the layouts
# ----------------------------------------------------------------------------------------


def test_coco_task_uses_train_restval_for_training_and_test_for_evaluation(coco):
    task = coco_task(coco.root)
    assert isinstance(task, Task) and task.name == "coco"
    train_ids = [cocoid_of(coco, p) for p in task.train.images]
    test_ids = [cocoid_of(coco, p) for p in task.test.images]
    assert {coco.split[i] for i in train_ids} == {"train", "restval"}
    assert {coco.split[i] for i in test_ids} == {"test"}
    # every non-"val" image is used, including those without instance annotations
    assert sorted(train_ids + test_ids) == sorted(i for i, s in coco.split.items() if s != "val")
    assert all(len(caps) == 5 and all(isinstance(c, str) and c for c in caps) for caps in task.train.captions)
    assert all(os.path.isfile(p) for p in task.train.images + task.test.images)
    assert any("/train2014/" in p for p in task.train.images) and any("/val2014/" in p for p in task.train.images)


def test_flickr_task(flickr):
    task = flickr_task(flickr.root)
    assert task.name == "flickr" and (len(task.train), len(task.test)) == (10, 6)
    assert all(flickr.split[os.path.basename(p)] == "test" for p in task.test.images)
    assert all(os.path.dirname(p).endswith(os.path.join("flickr30k", "flickr30k-images")) for p in task.train.images)
    assert task.test.captions[0][0] == json.load(open(os.path.join(
        flickr.root, "flickr30k", "dataset_flickr30k.json")))["images"][12]["sentences"][0]["raw"]


def test_load_karpathy_keeps_at_most_five_captions(tmp_path):
    sentences = [{"raw": f" caption {k} \n", "tokens": ["caption", str(k)]} for k in range(7)]
    entries = [{"filename": f"{s}.jpg", "split": s, "sentences": sentences} for s in ("train", "test")]
    (tmp_path / "k.json").write_text(json.dumps({"images": entries}))
    train, test = load_karpathy(str(tmp_path / "k.json"), lambda e: e["filename"])
    assert train.images == ["train.jpg"] and test.captions == [[f"caption {k}" for k in range(5)]]


# ----------------------------------------------------------------------------------------
# The 12 super-category tasks
# ----------------------------------------------------------------------------------------


def test_supercategory_numbering_comes_from_the_category_list():
    # first appearance in the list sorted by id, whatever the order of the JSON array
    cats = [{"id": 9, "name": "c", "supercategory": "B"}, {"id": 2, "name": "a", "supercategory": "A"},
            {"id": 5, "name": "b", "supercategory": "B"}, {"id": 1, "name": "z", "supercategory": "C"}]
    names, number_of = number_supercategories(cats)
    assert names == ["C", "A", "B"] and number_of == {1: 1, 2: 2, 5: 3, 9: 3}
    coco_cats = [{"id": i, "name": n, "supercategory": s} for i, n, s in reversed(COCO_CATEGORIES)]
    names, _ = number_supercategories(coco_cats)
    assert names == ["person", "vehicle", "outdoor", "animal", "accessory", "sports", "kitchen",
                     "food", "furniture", "electronic", "appliance", "indoor"]
    assert [names[s - 1] for s in COCO_TASK_ORDER] == PAPER_ORDER


def test_supercategory_tasks_order_and_assignment(coco):
    tasks = coco_supercategory_tasks(coco.root, verbose=False)
    assert [t.name for t in tasks] == [f"coco:{n}" for n in PAPER_ORDER]
    placed = {}
    for task in tasks:
        for role, data in (("train", task.train), ("test", task.test)):
            assert len(data) > 0
            for path in data.images:
                cocoid = cocoid_of(coco, path)
                assert cocoid not in placed, "an image is in two tasks"
                placed[cocoid] = task.name
                assert (coco.split[cocoid] in ("train", "restval")) == (role == "train")
    expected = {i: f"coco:{s}" for i, s in coco.expected_super.items() if s is not None and coco.split[i] != "val"}
    assert placed == expected
    assert placed[coco.tie_id] == "coco:outdoor"    # tie animal (4) / outdoor (3): the lower number
    assert placed[coco.sum_id] == "coco:kitchen"    # summed area, not the largest instance


def test_images_without_annotations_are_dropped_and_counted(coco, capsys):
    split = split_coco_by_supercategory(coco.root)
    assert split.dropped == {"train": 1, "test": 1}
    everywhere = {p for t in split.tasks for p in t.train.images + t.test.images}
    assert not {coco.path[i] for i in coco.unannotated_ids} & everywhere
    coco_supercategory_tasks(coco.root, verbose=True)
    out = capsys.readouterr().out
    assert "dropped" in out and "1 train, 1 test" in out and "coco:appliance" in out


# ----------------------------------------------------------------------------------------
# Subsampling
# ----------------------------------------------------------------------------------------


def test_subsample_is_deterministic_and_keeps_captions_with_their_images():
    data = ImageCaptionSet(images=[f"{i}.jpg" for i in range(50)], captions=[[f"cap {i}", f"alt {i}"] for i in range(50)])
    a, b, c = subsample(data, 10, seed=1), subsample(data, 10, seed=1), subsample(data, 10, seed=2)
    assert a == b and a != c and len(a) == 10
    assert a.images == sorted(a.images, key=lambda p: int(p.split(".")[0]))   # original order kept
    assert all(caps == [f"cap {p[:-4]}", f"alt {p[:-4]}"] for p, caps in zip(a.images, a.captions))
    assert subsample(data, None) is data and subsample(data, 50) is data


# ----------------------------------------------------------------------------------------
# Reading images: bad files are flagged, not fatal
# ----------------------------------------------------------------------------------------


def test_unreadable_images_are_flagged_not_fatal(tmp_path):
    fx = make_coco_fixture(str(tmp_path), n_train=12, n_test=12, corrupt=2)
    test = coco_task(fx.root).test
    missing = next(p for p in test.images if p not in fx.corrupt)
    os.remove(missing)
    bad = set(fx.corrupt) | {missing}

    images = ImageFileDataset(test, tiny_preprocess)
    assert len(images) == len(test)
    items = [images[k] for k in range(len(images))]
    assert all(img.shape == (3, 16, 16) for img, _, _ in items)
    assert {test.images[k] for img, k, ok in items if not ok} == bad
    assert all(img.abs().sum() == 0 for img, _, ok in items if not ok)

    # as the loop reads them (image_batches), through DataLoader worker processes: the flag
    # travels with each batch, in the order of the requested indices
    batches = [[5, 0, 3], list(range(len(test)))]
    got = list(image_batches(test, batches, tiny_preprocess, workers=2))
    for idx, (x, ok) in zip(batches, got):
        assert x.shape == (len(idx), 3, 16, 16)
        assert [not flag for flag in ok.tolist()] == [test.images[i] in bad for i in idx]


def test_flickr_corrupt_images_flagged(tmp_path):
    fx = make_flickr_fixture(str(tmp_path), corrupt=2)
    data = ImageFileDataset(flickr_task(fx.root).test, tiny_preprocess)
    assert sum(not ok for _, _, ok in (data[k] for k in range(len(data)))) == 2


# ----------------------------------------------------------------------------------------
# --tasks parsing
# ----------------------------------------------------------------------------------------


def test_parse_task_specs_order_and_expansion(tmp_path):
    root = str(tmp_path)
    make_coco_fixture(root, n_train=12, n_test=12)
    make_flickr_fixture(root)
    toy = Task("toy", ImageCaptionSet(["a.jpg"], [["a"]]), ImageCaptionSet(["b.jpg"], [["b"]]))
    tasks = parse_task_specs(" toy, coco ,coco:supercategory,flickr", root, {"toy": lambda: toy})
    assert [t.name for t in tasks] == ["toy", "coco"] + [f"coco:{n}" for n in PAPER_ORDER] + ["flickr"]
    assert tasks[0] is toy
    # built-in tasks need no data root
    assert parse_task_specs("toy", None, {"toy": lambda: toy}) == [toy]


# ----------------------------------------------------------------------------------------
# Bad input: an LPIError that names the problem
# ----------------------------------------------------------------------------------------


def test_unknown_task_name_lists_the_valid_names(tmp_path):
    with pytest.raises(LPIError) as e:
        parse_task_specs("coco,cocoo", str(tmp_path), {"night": lambda: None})
    msg = str(e.value)
    assert "'cocoo'" in msg and all(n in msg for n in ("coco", "flickr", "coco:supercategory", "night"))
    with pytest.raises(LPIError, match="empty"):
        parse_task_specs(" , ", None, {})


def test_missing_data_root(tmp_path):
    with pytest.raises(LPIError) as e:
        parse_task_specs("coco", None, {})
    assert "--data-root" in str(e.value) and "dataset_coco.json" in str(e.value)
    nowhere = str(tmp_path / "nowhere")
    with pytest.raises(LPIError) as e:
        parse_task_specs("flickr", nowhere, {})
    assert nowhere in str(e.value) and "not a directory" in str(e.value)


def test_missing_karpathy_json_names_path_and_layout(tmp_path):
    with pytest.raises(LPIError) as e:
        flickr_task(str(tmp_path))
    msg = str(e.value)
    assert os.path.join(str(tmp_path), "flickr30k", "dataset_flickr30k.json") in msg
    assert "flickr30k-images" in msg and "Expected this layout" in msg


def test_missing_image_folder(tmp_path):
    fx = make_flickr_fixture(str(tmp_path))
    shutil.rmtree(os.path.join(fx.root, "flickr30k", "flickr30k-images"))
    with pytest.raises(LPIError, match="image folder not found: .*flickr30k-images"):
        flickr_task(fx.root)


def write_coco_json(root, text):
    os.makedirs(os.path.join(root, "coco"), exist_ok=True)
    path = os.path.join(root, "coco", "dataset_coco.json")
    with open(path, "w") as f:
        f.write(text)
    return path


def test_malformed_json_names_file_line_and_column(tmp_path):
    path = write_coco_json(str(tmp_path), '{"images": [\n  {"split": "test",, "filename": "x.jpg"}\n]}')
    with pytest.raises(LPIError) as e:
        coco_task(str(tmp_path))
    assert path in str(e.value) and "line 2, column 20" in str(e.value)


@pytest.mark.parametrize("content, expected", [
    ({"annotations": []}, "'images' list"),
    ([1, 2, 3], "'images' list"),
    ({"images": [{"filename": "a.jpg", "split": "test"}]}, "images[0] has no 'sentences'"),
    ({"images": [{"filename": "a.jpg", "split": "dev", "sentences": [{"raw": "x"}]}]}, "split 'dev'"),
    ({"images": [{"filename": "a.jpg", "split": "test", "sentences": [{"raw": "x"}]}]}, "'filepath'"),
    ({"images": [{"filename": "a.jpg", "filepath": "val2014", "split": "test", "sentences": ["x"]}]}, "malformed"),
])
def test_wrong_json_schema(tmp_path, content, expected):
    path = write_coco_json(str(tmp_path), json.dumps(content))
    with pytest.raises(LPIError) as e:
        coco_task(str(tmp_path))
    assert path in str(e.value) and expected in str(e.value)


@pytest.mark.parametrize("splits, expected", [(["train", "restval", "val"], "no test images"),
                                             (["val", "test"], "no training images")])
def test_no_train_or_no_test_items(tmp_path, splits, expected):
    entries = [{"filename": f"{k}.jpg", "filepath": "val2014", "split": s, "sentences": [{"raw": "x"}]}
               for k, s in enumerate(splits)]
    path = write_coco_json(str(tmp_path), json.dumps({"images": entries}))
    with pytest.raises(LPIError) as e:
        coco_task(str(tmp_path))
    assert path in str(e.value) and expected in str(e.value)


def test_missing_instance_file_says_it_is_only_for_supercategories(tmp_path):
    fx = make_coco_fixture(str(tmp_path), n_train=12, n_test=12)
    path = os.path.join(fx.root, "coco", "annotations", "instances_val2014.json")
    os.remove(path)
    coco_task(fx.root)  # the plain COCO task does not need it
    with pytest.raises(LPIError) as e:
        parse_task_specs("coco:supercategory", fx.root, {})
    assert path in str(e.value) and "only for the coco:supercategory" in str(e.value)
