"""data_tools.storage: round trips, the manifest contract, and interrupted writes."""

from __future__ import annotations

import io
import json

import datasets
import pytest
from PIL import Image

from data_tools import storage, synth


def _png(size=(8, 6), color=(200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _records_by_task(n_images: int = 2, split: str = "train") -> dict[str, list[dict]]:
    """Records of every task, from the synthetic world (images as PNG bytes)."""
    out: dict[str, list[dict]] = {}
    for i in range(n_images):
        _, per_task = synth.make_image(0, split, i, 64)
        for task, records in per_task.items():
            out.setdefault(task, []).extend(records)
    return out


def _raw(record: dict) -> dict:
    """A stored record with the image as bytes (decode_images=False) compared as the written record."""
    image = record["image"]
    return {**record, "image": None if image is None else image["bytes"]}


def test_round_trip_every_task(tmp_path):
    by_task = _records_by_task()
    manifest = storage.write_dataset(
        tmp_path / "d", {(t, "train"): rs for t, rs in by_task.items()}, source="test", command="pytest"
    )
    assert manifest["tasks"] == {t: {"train": len(rs)} for t, rs in by_task.items()}
    assert storage.read_manifest(tmp_path / "d") == manifest
    for task, records in by_task.items():
        ds = storage.load_split(tmp_path / "d", task, "train", decode_images=False)
        assert set(ds.column_names) == set(storage.task_features(task))
        for stored, written in zip(ds, records, strict=True):
            expected = {name: written.get(name) for name in storage.task_features(task)}
            if expected["image"] is not None:
                expected["image"] = expected["image"]["bytes"]
            assert _raw(stored) == expected
    # Decoded rows: PIL images of the right size; text-only records have image None.
    row = storage.load_split(tmp_path / "d", "detection", "train")[0]
    assert isinstance(row["image"], Image.Image) and row["image"].size == (64, 64)
    assert row["objects"][0].keys() == {"label", "box"}
    assert storage.load_split(tmp_path / "d", "text_infilling", "train")[0]["image"] is None


def test_unused_fields_are_none_and_nested_lists_survive(tmp_path):
    phrase = {
        "id": "p",
        "image": {"bytes": _png(), "path": None},
        "width": 8,
        "height": 6,
        "caption": "a red box",
        "phrases": ["a red box"],
        "boxes": [[0.5, 0.25, 7.75, 6.0]],
    }
    region = {
        "id": "r",
        "image": {"bytes": _png(), "path": None},
        "width": 8,
        "height": 6,
        "region": [1.0, 1.0, 2.0, 2.0],
        "description": "a dot",
    }
    storage.write_dataset(tmp_path, {("grounding", "val"): [phrase, region]}, source="t", command="c")
    ds = storage.load_split(tmp_path, "grounding", "val")
    assert ds[0]["region"] is None and ds[0]["description"] is None
    assert ds[0]["boxes"] == [[0.5, 0.25, 7.75, 6.0]]
    assert ds[1]["caption"] is None and ds[1]["phrases"] is None and ds[1]["boxes"] is None
    assert ds[1]["region"] == [1.0, 1.0, 2.0, 2.0]


def test_image_paths_are_kept_unless_embedded(tmp_path):
    image_file = tmp_path / "img.png"
    image_file.write_bytes(_png())
    record = {"id": "0", "image": str(image_file), "width": 8, "height": 6, "label": "red"}
    storage.write_dataset(tmp_path / "paths", {("classification", "train"): [record]}, source="t", command="c")
    storage.write_dataset(
        tmp_path / "embedded", {("classification", "train"): [record]}, source="t", command="c", embed_images=True
    )
    by_path = storage.load_split(tmp_path / "paths", "classification", "train", decode_images=False)[0]["image"]
    embedded = storage.load_split(tmp_path / "embedded", "classification", "train", decode_images=False)[0]["image"]
    assert by_path == {"bytes": None, "path": str(image_file)}
    assert embedded["bytes"] == _png()
    assert storage.load_split(tmp_path / "paths", "classification", "train")[0]["image"].size == (8, 6)
    # The folder is a plain `datasets` folder.
    assert len(datasets.load_from_disk(str(tmp_path / "paths" / "classification" / "train"))) == 1


def test_interleaved_stream_and_empty_split(tmp_path):
    rec = {"id": "a", "image": None, "width": 0, "height": 0, "text": "hello"}
    stream = [
        (("text_infilling", "train"), rec),
        (("text_infilling", "val"), {**rec, "id": "b"}),
        (("text_infilling", "train"), {**rec, "id": "c"}),
    ]
    manifest = storage.write_dataset(tmp_path, iter(stream), source="t", command="c")
    assert manifest["tasks"] == {"text_infilling": {"train": 2, "val": 1}}
    assert storage.load_split(tmp_path, "text_infilling", "train")["id"] == ["a", "c"]
    manifest = storage.write_dataset(tmp_path / "e", {("text_infilling", "test"): []}, source="t", command="c")
    assert manifest["tasks"] == {"text_infilling": {"test": 0}}
    assert len(storage.load_split(tmp_path / "e", "text_infilling", "test")) == 0


def test_missing_split_error_names_dir_task_split_and_lists_available(tmp_path):
    storage.write_dataset(tmp_path, {("classification", "train"): []}, source="t", command="c")
    with pytest.raises(storage.SplitNotFoundError) as info:
        storage.load_split(tmp_path, "classification", "val")
    message = str(info.value)
    assert str(tmp_path) in message and "classification/val" in message and "available: classification/train" in message
    with pytest.raises(storage.StorageError, match="no manifest.json"):
        storage.load_split(tmp_path / "nowhere", "vqa", "train")


class Boom(RuntimeError):
    pass


def _failing(records, after: int):
    for i, record in enumerate(records):
        if i == after:
            raise Boom("simulated crash in the middle of a conversion")
        yield record


def test_interrupted_write_leaves_nothing_loadable(tmp_path):
    by_task = _records_by_task()
    with pytest.raises(Boom):
        storage.write_dataset(
            tmp_path,
            {("captioning", "train"): by_task["captioning"], ("vqa", "train"): _failing(by_task["vqa"], 3)},
            source="t",
            command="c",
        )
    assert not (tmp_path / storage.MANIFEST_NAME).exists()
    assert list(tmp_path.iterdir()) == []  # staging folder removed, nothing half-written in place
    with pytest.raises(storage.StorageError, match="interrupted"):
        storage.load_split(tmp_path, "captioning", "train")


def test_interrupted_rewrite_keeps_the_previous_complete_dataset(tmp_path):
    by_task = _records_by_task()
    first = storage.write_dataset(tmp_path, {("vqa", "train"): by_task["vqa"]}, source="first", command="c")
    before = [_raw(r) for r in storage.load_split(tmp_path, "vqa", "train", decode_images=False)]
    with pytest.raises(Boom):
        storage.write_dataset(
            tmp_path,
            {("vqa", "train"): _failing([{**r, "question": "changed?"} for r in by_task["vqa"]], 4)},
            source="second",
            command="c",
        )
    assert storage.read_manifest(tmp_path) == first
    after = [_raw(r) for r in storage.load_split(tmp_path, "vqa", "train", decode_images=False)]
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "vqa"]


def test_complete_rewrite_replaces_and_drops_old_splits(tmp_path):
    rec = {"id": "a", "image": None, "width": 0, "height": 0, "text": "old"}
    storage.write_dataset(
        tmp_path, {("text_infilling", "train"): [rec], ("text_infilling", "val"): [rec]}, source="t", command="c"
    )
    storage.write_dataset(tmp_path, {("text_infilling", "train"): [{**rec, "text": "new"}]}, source="t", command="c")
    assert storage.load_split(tmp_path, "text_infilling", "train")["text"] == ["new"]
    assert not (tmp_path / "text_infilling" / "val").exists()
    with pytest.raises(storage.SplitNotFoundError):
        storage.load_split(tmp_path, "text_infilling", "val")


def test_bad_records_and_folders_are_refused(tmp_path):
    rec = {"id": "a", "image": None, "width": 0, "height": 0, "text": "x"}
    with pytest.raises(storage.StorageError, match="'extra_field'"):
        storage.write_dataset(
            tmp_path / "a", {("text_infilling", "train"): [{**rec, "extra_field": 1}]}, source="t", command="c"
        )
    with pytest.raises(storage.StorageError, match="duplicate record id 'a'"):
        storage.write_dataset(tmp_path / "b", {("text_infilling", "train"): [rec, rec]}, source="t", command="c")
    with pytest.raises(storage.StorageError, match="unknown task 'nope'"):
        storage.write_dataset(tmp_path / "c", {("nope", "train"): [rec]}, source="t", command="c")
    import tasks

    with pytest.raises(tasks.RecordError, match="'text'"):
        storage.write_dataset(
            tmp_path / "d", {("text_infilling", "train"): [{**rec, "text": ""}]}, source="t", command="c"
        )
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(storage.StorageError, match="refusing to write"):
        storage.write_dataset(foreign, {("text_infilling", "train"): [rec]}, source="t", command="c")
    assert (foreign / "notes.txt").read_text() == "mine"


def test_manifest_is_json_with_the_documented_keys(tmp_path):
    storage.write_dataset(tmp_path, {("text_infilling", "train"): []}, source="s", command="cmd", extra={"note": [1]})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest == {
        "format": 1,
        "source": "s",
        "command": "cmd",
        "tasks": {"text_infilling": {"train": 0}},
        "note": [1],
    }
