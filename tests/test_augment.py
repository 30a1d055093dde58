"""Box-preserving augmentation (data_tools.augment): pixels and boxes move together, boxes stay whole."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

import tasks
from data_tools.augment import content_box, shift_record
from unified_vl.engine.config import ConfigError, load_config


def _square_image(box, size=(64, 48), colour=(255, 255, 255)) -> Image.Image:
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    x1, y1, x2, y2 = (int(v) for v in box)
    pixels[y1:y2, x1:x2] = colour
    return Image.fromarray(pixels)


def _bright_box(image: Image.Image) -> list[int]:
    ys, xs = np.nonzero(np.asarray(image)[..., 0] > 128)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def grounding_record(caption: str, boxes: dict[str, list], image_size=(64, 48)) -> dict:
    """A phrase-grounding record of a 64 x 48 picture whose first phrase's box is a white square."""
    first = next(iter(boxes.values()))
    return {
        "id": "g1",
        "image": _square_image(first, image_size),
        "width": image_size[0],
        "height": image_size[1],
        "caption": caption,
        "phrases": list(boxes),
        "boxes": [list(b) for b in boxes.values()],
    }


def rec_record(box, image_size=(64, 48), **extra):
    return {
        "id": "r1",
        "image": _square_image(box, image_size),
        "width": image_size[0],
        "height": image_size[1],
        "expression": "the white square",
        "box": list(box),
        **extra,
    }


def test_the_box_moves_with_its_pixels():
    rec = tasks.get_task("rec")
    record = rec_record([20, 10, 36, 30])
    moved = set()
    for seed in range(40):
        out = shift_record(rec, record, random.Random(seed), 0.125)
        assert out["image"].size == (64, 48)
        assert _bright_box(out["image"]) == [int(v) for v in out["box"]]
        moved.add(tuple(out["box"]))
    # 8 pixels each way in x, 6 in y: many different shifts, the original among them at most once.
    assert len(moved) > 20
    xs = {b[0] - 20 for b in moved}
    ys = {b[1] - 10 for b in moved}
    assert min(xs) >= -8 and max(xs) <= 8 and min(ys) >= -6 and max(ys) <= 6
    assert record["box"] == [20, 10, 36, 30]  # the record itself is not touched


def test_boxes_stay_whole_at_the_border():
    rec = tasks.get_task("rec")
    # Touching the left and top edges: the shift can only go right and down.
    record = rec_record([0, 0, 20, 20])
    for seed in range(30):
        out = shift_record(rec, record, random.Random(seed), 0.2)
        x1, y1, x2, y2 = out["box"]
        assert 0 <= x1 and 0 <= y1 and x2 <= 64 and y2 <= 48
    # A box as large as the image cannot move at all.
    full = shift_record(rec, rec_record([0, 0, 64, 48]), random.Random(1), 0.2)
    assert full["box"] == [0.0, 0.0, 64.0, 48.0]
    assert np.array_equal(np.asarray(full["image"]), np.asarray(rec_record([0, 0, 64, 48])["image"]))


def test_the_uncovered_strip_repeats_the_edge():
    rec = tasks.get_task("rec")
    pixels = np.zeros((48, 64, 3), np.uint8)
    pixels[:, :, 2] = 90  # a blue background, not black
    pixels[10:30, 20:36] = 255
    record = {**rec_record([20, 10, 36, 30]), "image": Image.fromarray(pixels)}
    out = shift_record(rec, record, random.Random(3), 0.125)
    shifted = np.asarray(out["image"])
    assert set(np.unique(shifted[..., 2])) <= {90, 255}  # no black strip appears


def test_palette_and_grey_images_keep_their_look():
    rec = tasks.get_task("rec")
    for mode in ("P", "L"):
        record = {**rec_record([20, 10, 36, 30]), "image": rec_record([20, 10, 36, 30])["image"].convert(mode)}
        out = shift_record(rec, record, random.Random(4), 0.125)
        assert _bright_box(out["image"].convert("RGB")) == [int(v) for v in out["box"]]


def test_detection_objects_and_grounding_boxes_move():
    detection = tasks.get_task("detection")
    record = {
        "id": "d1",
        "image": _square_image([10, 10, 20, 20]),
        "width": 64,
        "height": 48,
        "objects": [{"label": "square", "box": [10.0, 10.0, 20.0, 20.0]}, {"label": "dot", "box": [40, 30, 44, 34]}],
    }
    out = shift_record(detection, record, random.Random(5), 0.125)
    dx = out["objects"][0]["box"][0] - 10
    dy = out["objects"][0]["box"][1] - 10
    assert (dx, dy) != (0, 0)
    assert out["objects"][1] == {"label": "dot", "box": [40 + dx, 30 + dy, 44 + dx, 34 + dy]}
    assert _bright_box(out["image"]) == [int(v) for v in out["objects"][0]["box"]]

    grounding = tasks.get_task("grounding")
    record = grounding_record("a square and a dot", {"a square": [10, 10, 20, 20], "a dot": [50, 40, 54, 44]})
    grounding.validate(record)
    out = shift_record(grounding, record, random.Random(2), 0.125)
    grounding.validate(out)
    dx, dy = (out["boxes"][0][0] - 10, out["boxes"][0][1] - 10)
    assert (dx, dy) != (0, 0)
    assert out["boxes"][1] == [50 + dx, 40 + dy, 54 + dx, 44 + dy]
    assert _bright_box(out["image"]) == [int(v) for v in out["boxes"][0]]
    # A grounded-captioning record: its input region moves too.
    region = {"id": "g2", "image": _square_image([10, 10, 20, 20]), "width": 64, "height": 48}
    region.update(region=[10, 10, 20, 20], description="a white square")
    out = shift_record(grounding, region, random.Random(2), 0.125)
    grounding.validate(out)
    assert _bright_box(out["image"]) == [int(v) for v in out["region"]] != [10, 10, 20, 20]


def test_boxes_in_a_larger_frame_scale_the_shift():
    """A record whose width/height are twice the decoded image's: the box moves 2 units per pixel."""
    rec = tasks.get_task("rec")
    record = rec_record([20, 10, 36, 30])
    record.update(width=128, height=96, box=[40.0, 20.0, 72.0, 60.0])
    out = shift_record(rec, record, random.Random(7), 0.125)
    px = _bright_box(out["image"])
    assert out["box"] == [2.0 * px[0], 2.0 * px[1], 2.0 * px[2], 2.0 * px[3]]


def test_off_or_without_an_image_is_a_copy():
    vqa = tasks.get_task("vqa")
    record = {"id": "q", "image": _square_image([1, 1, 5, 5]), "question": "what?", "answers": ["x"]}
    same = shift_record(vqa, record, random.Random(0), 0.0)
    assert same["image"] is record["image"] and same is not record
    text_only = {"id": "t", "image": None, "question": "what?", "answers": ["x"]}
    assert shift_record(vqa, text_only, random.Random(0), 0.2) == text_only


def test_the_trainer_applies_it_only_when_configured(monkeypatch):
    from unified_vl.app.jobs import common

    record = rec_record([20, 10, 36, 30])

    def fake_load_split(path, task, split):
        return [record]

    monkeypatch.setattr("data_tools.storage.load_split", fake_load_split)
    for shift, expect_moved in ((0.0, False), (0.125, True)):
        config = load_config(None, ["data.path=/nowhere", "data.tasks={rec: 1}", f"data.augment.shift={shift}"])
        data = common.training_data(config)
        targets = {data.make_example("rec", data.datasets["rec"][0], random.Random(seed)).target for seed in range(10)}
        assert (len(targets) > 1) == expect_moved


def test_only_the_named_tasks_are_shifted_and_the_others_draw_nothing(monkeypatch):
    from unified_vl.app.jobs import common

    box = [20, 10, 36, 30]
    records = {"rec": rec_record(box), "classification": {"id": "c1", "image": _square_image(box), "label": "square"}}
    monkeypatch.setattr("data_tools.storage.load_split", lambda path, task, split: [records[task]])
    args = ["data.path=/nowhere", "data.tasks={rec: 1, classification: 1}"]
    only = common.training_data(
        load_config(None, [*args, "data.augment.shift=0.125", "data.augment.tasks=[classification]"])
    )
    plain = common.training_data(load_config(None, args))
    for seed in range(6):
        a, b = random.Random(seed), random.Random(seed)
        shifted_run, plain_run = (
            only.make_example("rec", records["rec"], a),
            plain.make_example("rec", records["rec"], b),
        )
        assert shifted_run.target == plain_run.target and shifted_run.image is records["rec"]["image"]
        assert a.random() == b.random()  # nothing drawn for the shift: the run's later examples are unchanged too
    moved = {
        tuple(_bright_box(only.make_example("classification", records["classification"], random.Random(s)).image))
        for s in range(10)
    }
    assert len(moved) > 1


def _picture(size=64, background=200):
    """A grey picture with a faint grey line across it (clutter) and a red square near the right edge."""
    pixels = np.full((size, size, 3), background, np.uint8)
    pixels[30, :] = background - 40  # a line from edge to edge, 40 levels off: not content at 64
    pixels[10:20, 50:62] = (215, 40, 40)
    return Image.fromarray(pixels)


def test_content_box_finds_what_stands_out_from_the_background():
    assert content_box(_picture(), 64) == (50, 10, 62, 20)
    assert content_box(_picture(), 32) == (0, 10, 64, 31)  # a lower threshold takes the line in too
    assert content_box(Image.new("RGB", (8, 8), (9, 9, 9)), 64) is None


def test_the_content_stays_whole_and_unstretched():
    classification = tasks.get_task("classification")
    record = {"id": "c", "image": _picture(), "label": "square"}
    seen = set()
    for seed in range(60):
        out = shift_record(classification, record, random.Random(seed), 0.25, content_threshold=64)
        box = content_box(out["image"], 64)
        assert box[2] - box[0] == 12 and box[3] - box[1] == 10  # the square, whole and no larger
        assert box[2] <= 64
        seen.add(box)
    # 2 pixels of room on the right, 16 (the limit) on the left and both ways in y.
    assert min(b[0] for b in seen) == 50 - 16 and max(b[0] for b in seen) == 52
    assert min(b[1] for b in seen) == 0 and max(b[1] for b in seen) == 26
    # Without the bound the same draws cut the square (or move it out of the picture altogether).
    unbounded = [
        content_box(shift_record(classification, record, random.Random(s), 0.25)["image"], 64) for s in range(60)
    ]
    assert any(b is None or b[2] - b[0] < 12 for b in unbounded)


def test_content_at_an_edge_pins_that_axis():
    classification = tasks.get_task("classification")
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[0:8, 5:9] = 255  # touches the top edge
    record = {"id": "c", "image": Image.fromarray(pixels), "label": "bar"}
    boxes = {
        content_box(shift_record(classification, record, random.Random(s), 0.25, content_threshold=64)["image"], 64)
        for s in range(40)
    }
    assert {b[1] for b in boxes} == {0} and {b[3] for b in boxes} == {8}  # y never moves
    assert len({b[0] for b in boxes}) > 3  # x still does


def test_the_trainer_passes_the_content_threshold(monkeypatch):
    from unified_vl.app.jobs import common

    record = {"id": "c", "image": _picture(), "label": "square"}
    monkeypatch.setattr("data_tools.storage.load_split", lambda path, task, split: [record])
    args = ["data.path=/nowhere", "data.tasks={classification: 1}", "data.augment.shift=0.25"]
    for extra, always_whole in (([], False), (["data.augment.content_threshold=64"], True)):
        data = common.training_data(load_config(None, [*args, *extra]))
        images = [data.make_example("classification", record, random.Random(s)).image for s in range(40)]
        whole = all(content_box(i, 64)[2] - content_box(i, 64)[0] == 12 for i in images)
        assert whole == always_whole


@pytest.mark.parametrize("value", ["255", "-1"])
def test_content_threshold_out_of_range_is_a_config_error(value):
    with pytest.raises(ConfigError, match=r"data.augment.content_threshold must be in \[0, 255\)"):
        load_config(None, ["data.tasks={vqa: 1}", f"data.augment.content_threshold={value}"])


def test_a_zoom_scales_the_box_with_its_pixels():
    rec = tasks.get_task("rec")
    record = rec_record([24, 16, 40, 32])  # 16 x 16 in a 64 x 48 image
    widths = set()
    for seed in range(40):
        out = shift_record(rec, record, random.Random(seed), 0.0625, max_scale=0.25)
        x1, y1, x2, y2 = out["box"]
        assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 48
        assert abs((x2 - x1) - (y2 - y1)) < 0.5  # one factor on both axes (each side rounded to whole pixels)
        # The bright pixels are where the moved box says (bilinear edges: within a pixel).
        assert np.abs(np.subtract(_bright_box(out["image"]), out["box"])).max() <= 1
        widths.add(round(x2 - x1, 3))
    assert min(widths) < 14 and max(widths) > 18 and all(12 <= v <= 20 for v in widths)


def test_a_zoom_keeps_the_content_whole_or_is_not_made():
    classification = tasks.get_task("classification")
    record = {"id": "c", "image": _picture(), "label": "square"}  # the square 2 pixels from the right edge
    sizes = set()
    for seed in range(60):
        box = content_box(
            shift_record(classification, record, random.Random(seed), 0.1, content_threshold=64, max_scale=0.3)[
                "image"
            ],
            64,
        )
        width, height = box[2] - box[0], box[3] - box[1]
        assert 8 <= width <= 17 and abs(width * 10 / 12 - height) <= 1.5  # the 12 x 10 square, whole
        sizes.add(width)
    assert min(sizes) < 11 and max(sizes) > 13  # shrunk and grown, where the room allowed
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[0:8, 5:9] = 255  # content at the top edge: never zoomed (it would be cut or stretched)
    edge = {"id": "e", "image": Image.fromarray(pixels), "label": "bar"}
    for seed in range(20):
        out = shift_record(classification, edge, random.Random(seed), 0.1, content_threshold=64, max_scale=0.3)
        box = content_box(out["image"], 64)
        assert (box[2] - box[0], box[3] - box[1]) == (4, 8)


def test_the_trainer_zooms_without_a_shift(monkeypatch):
    from unified_vl.app.jobs import common

    record = rec_record([24, 16, 40, 32])
    monkeypatch.setattr("data_tools.storage.load_split", lambda path, task, split: [record])
    data = common.training_data(
        load_config(None, ["data.path=/nowhere", "data.tasks={rec: 1}", "data.augment.scale=0.2"])
    )
    targets = {data.make_example("rec", record, random.Random(seed)).target for seed in range(10)}
    assert len(targets) > 1


@pytest.mark.parametrize("value", ["0.5", "-0.1"])
def test_scale_out_of_range_is_a_config_error(value):
    with pytest.raises(ConfigError, match=r"data.augment.scale must be in \[0, 0.5\)"):
        load_config(None, ["data.tasks={vqa: 1}", f"data.augment.scale={value}"])


def test_an_unknown_task_to_shift_is_named():
    from unified_vl.app.jobs import common

    config = load_config(None, ["data.tasks={vqa: 1}", "data.augment.shift=0.1", "data.augment.tasks=[clasification]"])
    with pytest.raises(ConfigError, match=r"data.augment.tasks: unknown task\(s\) \['clasification'\]"):
        common.check_task_names(config)


@pytest.mark.parametrize("value", ["0.5", "-0.1"])
def test_shift_out_of_range_is_a_config_error(value):
    with pytest.raises(ConfigError, match=r"data.augment.shift must be in \[0, 0.5\)"):
        load_config(None, ["data.tasks={vqa: 1}", f"data.augment.shift={value}"])


@pytest.mark.parametrize("shift", [0.0, 0.125])
def test_the_trainer_writes_grounding_targets_in_reading_order_when_configured(monkeypatch, shift):
    from unified_vl.app.jobs import common

    record = grounding_record(
        "a low square and a high square", {"a low square": [40, 28, 56, 44], "a high square": [8, 4, 24, 20]}
    )
    monkeypatch.setattr("data_tools.storage.load_split", lambda path, task, split: [record])
    args = ["data.path=/nowhere", "data.tasks={grounding: 1}", f"data.augment.shift={shift}"]
    for order, first in (("record", "a low square<loc_"), ("position", "a high square<loc_")):
        data = common.training_data(load_config(None, [*args, f"data.target_order={order}"]))
        for seed in range(5):
            assert data.make_example("grounding", record, random.Random(seed)).target.startswith(first), (order, seed)
    assert record["phrases"][0] == "a low square"  # the stored record is never reordered in place


def test_an_unknown_target_order_is_a_config_error():
    with pytest.raises(ConfigError, match="target_order"):
        load_config(None, ["data.target_order=area"])


def test_the_learning_recipe_shifts_classification_records_within_their_content(monkeypatch):
    """scripts/configs/learn_recipe.yaml: classification moved (content kept whole), VQA untouched."""
    from pathlib import Path

    from unified_vl.app.jobs import common
    from unified_vl.app.jobs.pretrain import MAIN_JOB

    recipe = Path(__file__).resolve().parents[1] / "scripts" / "configs" / "learn_recipe.yaml"
    middle = _square_image([24, 16, 40, 32])
    at_left = _square_image([0, 16, 16, 32])  # content at the left edge: x is pinned, y may move
    records = {
        "vqa": {
            "id": "q1",
            "image": middle,
            "question": "what color is the square?",
            "answers": ["white"],
            "answer_type": "other",
        },
        "classification": {"id": "c1", "image": middle, "label": "square"},
    }
    monkeypatch.setattr("data_tools.storage.load_split", lambda path, task, split: [records[task]])
    args = ["data.path=/nowhere", "data.tasks={vqa: 1, classification: 1}"]
    data = common.training_data(load_config(recipe, args, defaults=MAIN_JOB))
    plain = common.training_data(load_config(recipe, [*args, "data.augment.shift=0"], defaults=MAIN_JOB))
    for seed in range(6):
        a, b = random.Random(seed), random.Random(seed)
        ours, theirs = data.make_example("vqa", records["vqa"], a), plain.make_example("vqa", records["vqa"], b)
        assert ours.image is middle and ours.target == theirs.target
        assert a.random() == b.random()
    moved = {
        tuple(_bright_box(data.make_example("classification", records["classification"], random.Random(s)).image))
        for s in range(20)
    }
    # up to int(0.1 x 64) = 6 pixels across and int(0.1 x 48) = 4 down, the square whole
    assert len(moved) > 1 and all(
        abs(x1 - 24) <= 6 and abs(y1 - 16) <= 4 and (x2 - x1, y2 - y1) == (16, 16) for x1, y1, x2, y2 in moved
    )
    left = {"id": "c2", "image": at_left, "label": "square"}
    boxes = {tuple(_bright_box(data.make_example("classification", left, random.Random(s)).image)) for s in range(20)}
    assert {b[0] for b in boxes} == {0} and len({b[1] for b in boxes}) > 1
