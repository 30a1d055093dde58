"""data_tools.splits: a validation split carved out of train, by image, reproducibly."""

from __future__ import annotations

import pytest

from data_tools import storage, synth
from data_tools.splits import carve_split


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A train split of 20 synthetic images (several VQA questions each, images as bytes), and a test split."""
    streams: dict[tuple[str, str], list[dict]] = {}
    for split, count in (("train", 20), ("test", 3)):
        for i in range(count):
            _, per_task = synth.make_image(0, split, i, 64)
            for task in ("vqa", "classification"):
                streams.setdefault((task, split), []).extend(per_task[task])
    folder = tmp_path_factory.mktemp("world") / "data"
    storage.write_dataset(folder, streams, source="synth", command="pytest")
    return folder


def _images(folder, task, split) -> dict[str, bytes]:
    rows = storage.load_split(folder, task, split, decode_images=False)
    return {row["id"]: row["image"]["bytes"] for row in rows}


def test_a_tenth_of_trains_images_becomes_val_with_all_their_questions(world, tmp_path):
    manifest = carve_split(world, tmp_path / "out", task="vqa", fraction=0.1, seed=0)
    train, val = _images(tmp_path / "out", "vqa", "train"), _images(tmp_path / "out", "vqa", "val")
    before = _images(world, "vqa", "train")
    assert set(train) | set(val) == set(before) and not set(train) & set(val)  # every question once
    assert len(set(val.values())) == 2  # 10 % of 20 images
    assert not set(val.values()) & set(train.values())  # no image on both sides
    assert manifest["carved"] == {
        "from": str(world.resolve()),
        "task": "vqa",
        "source": "train",
        "into": "val",
        "fraction": 0.1,
        "seed": 0,
        "images": 2,
        "records": len(val),
    }
    # The other task and split are copied as they were; the source folder is unchanged.
    assert manifest["tasks"]["classification"] == storage.available(world)["classification"]
    assert _images(tmp_path / "out", "vqa", "test") == _images(world, "vqa", "test")
    assert storage.available(world)["vqa"].keys() == {"train", "test"}


def test_the_same_seed_carves_the_same_records_and_another_seed_others(world, tmp_path):
    ids = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        carve_split(world, tmp_path / name, task="classification", fraction=0.25, seed=seed)
        ids.append(set(_images(tmp_path / name, "classification", "val")))
    assert ids[0] == ids[1] and ids[0] != ids[2] and len(ids[0]) == 5


def test_carving_refuses_what_it_cannot_do_and_names_it(world, tmp_path):
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\), got 1.0"):
        carve_split(world, tmp_path / "x", task="vqa", fraction=1.0)
    with pytest.raises(ValueError, match=r"already has a 'test' split \(3 records\)"):
        carve_split(world, tmp_path / "x", task="classification", into="test")
    with pytest.raises(ValueError, match=r"no rec 'train' split to carve from \(its rec splits: none\)"):
        carve_split(world, tmp_path / "x", task="rec")
    small = tmp_path / "small"
    _, per_task = synth.make_image(0, "train", 0, 64)
    storage.write_dataset(small, {("vqa", "train"): per_task["vqa"]}, source="synth", command="pytest")
    with pytest.raises(ValueError, match=r"vqa 'train' has 1 image\(s\); carving needs at least two"):
        carve_split(small, tmp_path / "x", task="vqa")
    assert not (tmp_path / "x").exists()  # nothing written by a refused carve
