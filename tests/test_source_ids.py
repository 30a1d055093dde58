"""Source ids: optional record fields that the converters keep and the official results formats read."""

from __future__ import annotations

import pytest

import tasks
from data_tools import storage
from tasks import RecordError
from tasks.detection import mean_ap50

SOURCE_IDS = {
    "vqa": {"question_id", "image_id"},
    "captioning": {"image_id"},
    "rec": {"ref_id", "sent_id"},
    "detection": {"image_id"},
}


@pytest.mark.parametrize("task_name", sorted(SOURCE_IDS))
def test_source_ids_are_optional_int64_fields_that_no_prompt_reads(task_name):
    task = tasks.get_task(task_name)
    declared = {name for name, spec in task.fields.items() if spec.role == "source"}
    assert declared == SOURCE_IDS[task_name]
    features = storage.task_features(task_name)
    for name in declared:
        assert not task.fields[name].required
        assert features[name].dtype == "int64"
    record = dict(task.examples[1])  # without ids: still valid
    task.validate(record)
    with_ids = {**record, **{name: 12 for name in declared}}
    task.validate(with_ids)
    assert task.prompt(with_ids) == task.prompt(record)
    name = sorted(declared)[0]
    with pytest.raises(RecordError, match=rf"record '{record['id']}' field '{name}' must be an integer >= 0.*str '12'"):
        task.validate({**record, name: "12"})
    with pytest.raises(RecordError, match=f"field '{name}' must be an integer"):
        task.validate({**record, name: True})


def test_stored_source_ids_round_trip(tmp_path):
    record = {**tasks.get_task("vqa").examples[0], "question_id": 2**40 + 3}  # beyond int32
    storage.write_dataset(tmp_path / "d", {("vqa", "val"): [record]}, source="t", command="c")
    [row] = list(storage.load_split(tmp_path / "d", "vqa", "val"))
    assert row["question_id"] == 2**40 + 3 and row["image_id"] == 42


def _det(image_id, box):
    record = {"id": f"d{image_id}", "image": None, "width": 100, "height": 100}
    record["objects"] = [{"label": "circle", "box": box}]
    return {**record, "image_id": image_id} if image_id is not None else record


def test_detection_ties_are_broken_by_coco_image_id_when_the_records_have_them():
    # Two images, every box scores 1.0: the order in which COCOeval meets the hit and the miss sets
    # the precision at recall 0.5. With the records' image ids, that order is COCOeval's own on the
    # official results file (sorted ids), not the records' order.
    gold = [10.0, 10.0, 50.0, 50.0]
    miss = [60.0, 60.0, 90.0, 90.0]
    records = [_det(9, gold), _det(3, gold)]
    predictions = [[("circle", gold)], [("circle", miss), ("circle", gold)]]
    by_id = mean_ap50(predictions, records)  # image 3 first: miss, hit; then image 9: hit
    by_position = mean_ap50(predictions, [_det(None, gold), _det(None, gold)])  # hit; then miss, hit
    # COCO's 101-point interpolated precision: 1.0 up to recall 0.5 (51 points), then 2/3 (50 points).
    assert by_position == pytest.approx((51 * 1.0 + 50 * 2 / 3) / 101)
    assert by_id == pytest.approx(2 / 3)  # precision 1/2 at recall 0.5 is lifted to the later 2/3
