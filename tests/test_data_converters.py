"""Converters on tiny fixtures written here in each source's official format."""

from __future__ import annotations

import collections
import json
import pickle

import pytest
from PIL import Image

from data_tools import storage
from data_tools.converters import ConversionError, available_sources, convert


def _image(path, size=(40, 30), fmt=None, color=(120, 30, 200)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt or ("JPEG" if path.suffix == ".jpg" else "PNG"))
    return path


def _json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def _load(out, task, split):
    """Stored records with the image as its path (converters store paths by default)."""
    rows = storage.load_split(out, task, split, decode_images=False)
    return [{**r, "image": r["image"]["path"]} for r in rows]


def _run(source, tmp_path, *, inputs, images=(), **kw):
    lines = []
    manifest = convert(source, inputs=inputs, images=images, out=tmp_path / "out", log=lines.append, **kw)
    return manifest, lines


def test_every_source_has_a_converter_module():
    assert available_sources() == [
        "coco_captions",
        "coco_karpathy",
        "csv",
        "flickr30k_entities",
        "imagefolder",
        "jsonl",
        "refcoco",
        "vqav2",
    ]


# --------------------------------------------------------------------------------------------- COCO


def coco_captions_fixture(root):
    images = root / "train2017"
    for image_id, size in ((1, (40, 30)), (2, (20, 20)), (3, (10, 10))):
        _image(images / f"{image_id:012d}.jpg", size)
    annotations = _json(
        root / "annotations" / "captions_train2017.json",
        {
            "info": {},
            "licenses": [],
            "images": [
                {"id": 1, "file_name": "000000000001.jpg", "width": 40, "height": 30},
                {"id": 2, "file_name": "000000000002.jpg", "width": 20, "height": 20},
                {"id": 3, "file_name": "000000000003.jpg", "width": 10, "height": 10},
            ],
            "annotations": [
                {"image_id": 1, "id": 10, "caption": "A cat on a mat."},
                {"image_id": 2, "id": 11, "caption": " Two  dogs\nplaying "},
                {"image_id": 1, "id": 12, "caption": "A cat sitting."},
            ],
        },
    )
    return annotations, images


def test_coco_captions(tmp_path):
    annotations, images = coco_captions_fixture(tmp_path)
    manifest, lines = _run("coco_captions", tmp_path, inputs=[annotations], images=[images])
    assert manifest["tasks"] == {"captioning": {"train": 2}}
    assert manifest["notes"] == {"images without captions": 1} and manifest["skipped"] == []
    assert _load(tmp_path / "out", "captioning", "train") == [
        {
            "id": "1",
            "image": str(images / "000000000001.jpg"),
            "width": 40,
            "height": 30,
            "captions": ["A cat on a mat.", "A cat sitting."],
            "image_id": 1,
        },
        {
            "id": "2",
            "image": str(images / "000000000002.jpg"),
            "width": 20,
            "height": 20,
            "captions": ["Two dogs playing"],
            "image_id": 2,
        },
    ]
    assert any("captioning      train=2" in line for line in lines)
    assert any(line.endswith("records/s") for line in lines)


def test_coco_karpathy(tmp_path):
    for folder, name, size in (
        ("train2014", "a.jpg", (8, 8)),
        ("val2014", "b.jpg", (9, 7)),
        ("val2014", "c.jpg", (6, 6)),
        ("val2014", "d.jpg", (5, 5)),
    ):
        _image(tmp_path / "coco" / folder / name, size)

    def image(filepath, filename, split, cocoid, *raws):
        return {
            "filepath": filepath,
            "filename": filename,
            "split": split,
            "cocoid": cocoid,
            "imgid": cocoid,
            "sentids": [],
            "sentences": [{"raw": r, "tokens": r.lower().split(), "imgid": cocoid, "sentid": 0} for r in raws],
        }

    data = _json(
        tmp_path / "dataset_coco.json",
        {
            "dataset": "coco",
            "images": [
                image("train2014", "a.jpg", "train", 11, "A red bus.", "A bus."),
                image("val2014", "b.jpg", "restval", 12, "A tree."),
                image("val2014", "c.jpg", "val", 13, "A car."),
                image("val2014", "d.jpg", "test", 14, "A boat."),
            ],
        },
    )
    manifest, _ = _run("coco_karpathy", tmp_path, inputs=[data], images=[tmp_path / "coco"])
    assert manifest["tasks"] == {"captioning": {"train": 2, "val": 1, "test": 1}}
    train = _load(tmp_path / "out", "captioning", "train")
    assert [(r["id"], r["width"], r["height"], r["captions"], r["image_id"]) for r in train] == [
        ("11", 8, 8, ["A red bus.", "A bus."], 11),
        ("12", 9, 7, ["A tree."], 12),
    ]
    assert train[1]["image"] == str(tmp_path / "coco" / "val2014" / "b.jpg")
    assert _load(tmp_path / "out", "captioning", "test")[0]["captions"] == ["A boat."]


# --------------------------------------------------------------------------------------------- VQAv2


def vqav2_fixture(root, *, question="What color is the bus?"):
    images = root / "train2014"
    _image(images / "COCO_train2014_000000000042.jpg", (32, 24))
    _image(images / "COCO_train2014_000000000007.jpg", (16, 16))
    questions = _json(
        root / "v2_OpenEnded_mscoco_train2014_questions.json",
        {
            "info": {},
            "task_type": "Open-Ended",
            "data_type": "mscoco",
            "data_subtype": "train2014",
            "license": {},
            "questions": [
                {"image_id": 42, "question": question, "question_id": 420},
                {"image_id": 42, "question": "Is it raining?", "question_id": 421},
                {"image_id": 7, "question": "How many cats?", "question_id": 70},
            ],
        },
    )

    def answers(*texts):
        return [{"answer": t, "answer_confidence": "yes", "answer_id": i + 1} for i, t in enumerate(texts)]

    annotations = _json(
        root / "v2_mscoco_train2014_annotations.json",
        {
            "info": {},
            "license": {},
            "data_subtype": "train2014",
            "data_type": "mscoco",
            "annotations": [
                {
                    "question_id": 421,
                    "image_id": 42,
                    "answers": answers(*["no"] * 9, "yes"),
                    "multiple_choice_answer": "no",
                    "answer_type": "yes/no",
                    "question_type": "is it",
                },
                {
                    "question_id": 420,
                    "image_id": 42,
                    "answers": answers(*["red"] * 8, "dark red", "orange"),
                    "multiple_choice_answer": "red",
                    "answer_type": "other",
                    "question_type": "what color is the",
                },
                {
                    "question_id": 70,
                    "image_id": 7,
                    "answers": answers(*["2"] * 7, "two", "3", "2"),
                    "multiple_choice_answer": "2",
                    "answer_type": "number",
                    "question_type": "how many",
                },
            ],
        },
    )
    return questions, annotations, images


def test_vqav2(tmp_path):
    questions, annotations, images = vqav2_fixture(tmp_path)
    manifest, _ = _run(
        "vqav2", tmp_path, inputs=[annotations, questions], images=[tmp_path]
    )  # any order; images found in train2014/
    assert manifest["tasks"] == {"vqa": {"train": 3}}
    image = str(images / "COCO_train2014_000000000042.jpg")
    assert _load(tmp_path / "out", "vqa", "train") == [
        {
            "id": "420",
            "image": image,
            "width": 32,
            "height": 24,
            "question": "What color is the bus?",
            "answers": ["red"] * 8 + ["dark red", "orange"],
            "answer_type": "other",
            "question_type": "what color is the",
            "evidence_phrases": None,  # unused optional fields are stored as None
            "evidence_boxes": None,
            "question_id": 420,
            "image_id": 42,
        },
        {
            "id": "421",
            "image": image,
            "width": 32,
            "height": 24,
            "question": "Is it raining?",
            "answers": ["no"] * 9 + ["yes"],
            "answer_type": "yes/no",
            "question_type": "is it",
            "evidence_phrases": None,
            "evidence_boxes": None,
            "question_id": 421,
            "image_id": 42,
        },
        {
            "id": "70",
            "image": str(images / "COCO_train2014_000000000007.jpg"),
            "width": 16,
            "height": 16,
            "question": "How many cats?",
            "answers": ["2"] * 7 + ["two", "3", "2"],
            "answer_type": "number",
            "question_type": "how many",
            "evidence_phrases": None,
            "evidence_boxes": None,
            "question_id": 70,
            "image_id": 7,
        },
    ]


def test_vqav2_questions_without_annotations_are_refused(tmp_path):
    questions, _, images = vqav2_fixture(tmp_path)
    with pytest.raises(ConversionError, match="without the matching annotations"):
        _run("vqav2", tmp_path, inputs=[questions], images=[images])


# --------------------------------------------------------------------------------------------- RefCOCO


def refcoco_fixture(root, *, bbox_of_101=(2.5, 3.0, 10.0, 12.0)):
    images = root / "train2014"
    _image(images / "COCO_train2014_000000000005.jpg", (50, 40))
    _image(images / "COCO_train2014_000000000006.jpg", (30, 30))
    instances = _json(
        root / "refcoco" / "instances.json",
        {
            "info": {},
            "images": [
                {"id": 5, "file_name": "COCO_train2014_000000000005.jpg", "width": 50, "height": 40},
                {"id": 6, "file_name": "COCO_train2014_000000000006.jpg", "width": 30, "height": 30},
            ],
            "annotations": [
                {"id": 101, "image_id": 5, "bbox": list(bbox_of_101), "category_id": 1, "area": 1.0, "iscrowd": 0},
                {
                    "id": 102,
                    "image_id": 5,
                    "bbox": [20.0, 10.0, 30.0, 30.0],
                    "category_id": 1,
                    "area": 1.0,
                    "iscrowd": 0,
                },
                {"id": 103, "image_id": 6, "bbox": [0.0, 0.0, 30.0, 30.0], "category_id": 2, "area": 1.0, "iscrowd": 0},
            ],
            "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}],
        },
    )
    refs = [
        {
            "ref_id": 1,
            "ann_id": 101,
            "image_id": 5,
            "split": "train",
            "category_id": 1,
            "file_name": "COCO_train2014_000000000005_101.jpg",
            "sent_ids": [7, 8],
            "sentences": [
                {"sent": "man on left", "raw": "Man on LEFT", "tokens": ["man", "on", "left"], "sent_id": 7},
                {"sent": "left guy", "raw": "left guy!", "tokens": ["left", "guy"], "sent_id": 8},
            ],
        },
        {
            "ref_id": 2,
            "ann_id": 103,
            "image_id": 6,
            "split": "testA",
            "category_id": 2,
            "file_name": "COCO_train2014_000000000006_103.jpg",
            "sent_ids": [9],
            "sentences": [{"sent": "the dog", "raw": "The dog", "tokens": ["the", "dog"], "sent_id": 9}],
        },
    ]
    refs_path = root / "refcoco" / "refs(unc).p"
    refs_path.write_bytes(pickle.dumps(refs, protocol=2))  # the official files are protocol-2 pickles
    return refs_path, instances, images


def test_refcoco(tmp_path):
    refs, instances, images = refcoco_fixture(tmp_path)
    manifest, _ = _run("refcoco", tmp_path, inputs=[refs, instances], images=[images])
    assert manifest["tasks"] == {"rec": {"train": 2, "testA": 1}, "grounding": {"train": 2, "testA": 1}}
    image5 = str(images / "COCO_train2014_000000000005.jpg")
    candidates = [[2.5, 3.0, 12.5, 15.0], [20.0, 10.0, 50.0, 40.0]]
    assert _load(tmp_path / "out", "rec", "train") == [
        {
            "id": "1-7",
            "image": image5,
            "width": 50,
            "height": 40,
            "expression": "man on left",
            "box": [2.5, 3.0, 12.5, 15.0],
            "candidate_boxes": candidates,
            "ref_id": 1,
            "sent_id": 7,
            "candidate_masks": None,  # COCO instances carry segmentations; the converter keeps boxes only
        },
        {
            "id": "1-8",
            "image": image5,
            "width": 50,
            "height": 40,
            "expression": "left guy",
            "box": [2.5, 3.0, 12.5, 15.0],
            "candidate_boxes": candidates,
            "ref_id": 1,
            "sent_id": 8,
            "candidate_masks": None,  # COCO instances carry segmentations; the converter keeps boxes only
        },
    ]
    grounding = _load(tmp_path / "out", "grounding", "testA")
    assert grounding == [
        {
            "id": "2-9",
            "image": str(images / "COCO_train2014_000000000006.jpg"),
            "width": 30,
            "height": 30,
            "caption": None,
            "phrases": None,
            "boxes": None,
            "region": [0.0, 0.0, 30.0, 30.0],
            "description": "the dog",
        }
    ]


def test_refcoco_pickle_with_classes_is_refused(tmp_path):
    _, instances, images = refcoco_fixture(tmp_path)
    evil = tmp_path / "refs(evil).p"
    evil.write_bytes(pickle.dumps([collections.OrderedDict(ref_id=1)], protocol=2))
    with pytest.raises(
        ConversionError, match=r"refs\(evil\)\.p: not a refs pickle \(refusing to load collections.OrderedDict"
    ):
        _run("refcoco", tmp_path, inputs=[evil, instances], images=[images])


# --------------------------------------------------------------------------------------------- Flickr30k Entities

FLICKR_XML = """<annotation>
  <filename>1000.jpg</filename>
  <size><width>40</width><height>30</height><depth>3</depth></size>
  <object><name>10</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>20</ymax></bndbox></object>
  <object><name>10</name><bndbox><xmin>21</xmin><ymin>5</ymin><xmax>30</xmax><ymax>25</ymax></bndbox></object>
  <object><name>11</name><name>13</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>8</xmax><ymax>8</ymax></bndbox></object>
  <object><name>12</name><scene>1</scene></object>
  <object><name>14</name><nobndbox>1</nobndbox></object>
</annotation>
"""


def flickr_fixture(
    root,
    *,
    xml=FLICKR_XML,
    first_line="[/EN#10/people Two men] walk [/EN#11/animals a dog] in [/EN#12/scene the park] .",
):
    data = root / "flickr30k_entities"
    (data / "Sentences").mkdir(parents=True)
    (data / "Annotations").mkdir()
    (data / "Sentences" / "1000.txt").write_text(
        first_line
        + "\n[/EN#0/notvisual Someone] is [/EN#14/other outside] .\n[/EN#13/animals/other The dog] runs after [/EN#10/people them] .\n",
        encoding="utf-8",
    )
    (data / "Annotations" / "1000.xml").write_text(xml, encoding="utf-8")
    (data / "train.txt").write_text("1000\n", encoding="utf-8")
    (data / "test.txt").write_text("", encoding="utf-8")
    images = root / "flickr30k-images"
    _image(images / "1000.jpg", (40, 30))
    return data, images


def test_flickr30k_entities(tmp_path):
    data, images = flickr_fixture(tmp_path)
    manifest, lines = _run("flickr30k_entities", tmp_path, inputs=[data], images=[images])
    assert manifest["tasks"] == {"grounding": {"train": 2}}  # test.txt lists no image
    assert manifest["notes"] == {"phrases without a box dropped": 3, "captions without any boxed phrase dropped": 1}
    image = str(images / "1000.jpg")
    men, dog = (
        [0.0, 0.0, 30.0, 25.0],
        [4.0, 4.0, 8.0, 8.0],
    )  # union of entity 10's two boxes; VOC 1-based -> [x-1, y-1, x2, y2]
    common = {"image": image, "width": 40, "height": 30, "region": None, "description": None}
    assert _load(tmp_path / "out", "grounding", "train") == [
        {
            "id": "1000-0",
            **common,
            "caption": "Two men walk a dog in the park .",
            "phrases": ["Two men", "a dog"],
            "boxes": [men, dog],
        },
        {
            "id": "1000-2",
            **common,
            "caption": "The dog runs after them .",
            "phrases": ["The dog", "them"],
            "boxes": [dog, men],
        },
    ]
    assert any("note: phrases without a box dropped: 3" in line for line in lines)


def test_flickr30k_bad_markup_names_file_and_line(tmp_path):
    data, images = flickr_fixture(tmp_path, first_line="[/EN#10/people Two men walk .")
    with pytest.raises(ConversionError, match=r"Sentences/1000\.txt: line 1: phrase not closed"):
        _run("flickr30k_entities", tmp_path, inputs=[data], images=[images])


# --------------------------------------------------------------------------------------------- classification


def test_imagefolder(tmp_path):
    root = tmp_path / "pets"
    _image(root / "train" / "cat" / "a.png", (8, 8))
    _image(root / "train" / "dog" / "sub" / "b.jpg", (9, 6))
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    _image(root / "val" / "cat" / "c.png", (5, 5))
    manifest, _ = _run("imagefolder", tmp_path, inputs=[root])
    assert manifest["tasks"] == {"classification": {"train": 2, "val": 1}}
    assert manifest["notes"] == {"files without an image extension skipped": 1}
    assert _load(tmp_path / "out", "classification", "train") == [
        {"id": "cat/a.png", "image": str(root / "train" / "cat" / "a.png"), "width": 8, "height": 8, "label": "cat"},
        {
            "id": "dog/sub/b.jpg",
            "image": str(root / "train" / "dog" / "sub" / "b.jpg"),
            "width": 9,
            "height": 6,
            "label": "dog",
        },
    ]


def test_imagefolder_without_split_folders_uses_split_option(tmp_path):
    root = tmp_path / "flowers"
    _image(root / "rose" / "1.png", (4, 4))
    _image(root / "tulip" / "2.png", (4, 4))
    manifest, _ = _run("imagefolder", tmp_path, inputs=[root], split="test")
    assert manifest["tasks"] == {"classification": {"test": 2}}
    assert [r["label"] for r in _load(tmp_path / "out", "classification", "test")] == ["rose", "tulip"]


def test_csv(tmp_path):
    _image(tmp_path / "imgs" / "x.png", (7, 3))
    _image(tmp_path / "imgs" / "y.png", (3, 7))
    labels = tmp_path / "labels.csv"
    labels.write_text('label,path,split\nzebra,x.png,train\n"horse, brown",y.png,val\n', encoding="utf-8")
    manifest, _ = _run("csv", tmp_path, inputs=[labels], images=[tmp_path / "imgs"])
    assert manifest["tasks"] == {"classification": {"train": 1, "val": 1}}
    assert _load(tmp_path / "out", "classification", "val") == [
        {"id": "y.png", "image": str(tmp_path / "imgs" / "y.png"), "width": 3, "height": 7, "label": "horse, brown"}
    ]
    headerless = tmp_path / "plain.csv"
    headerless.write_text("imgs/x.png,zebra\n", encoding="utf-8")
    manifest = convert("csv", inputs=[headerless], out=tmp_path / "out2", log=lambda *_: None)
    assert _load(tmp_path / "out2", "classification", "train")[0]["label"] == "zebra"


# --------------------------------------------------------------------------------------------- bad input


def _bad_coco(tmp_path, kind):
    annotations, images = coco_captions_fixture(tmp_path)
    data = json.loads(annotations.read_text())
    if kind == "missing image":
        (images / "000000000002.jpg").unlink()
        return annotations, images, "images[1] (id=2)", "image file not found"
    if kind == "corrupt image":
        (images / "000000000002.jpg").write_bytes(b"this is not a JPEG")
        return annotations, images, "images[1] (id=2)", "unreadable or corrupt image"
    if kind == "empty caption":
        data["annotations"][1]["caption"] = "   "
        _json(annotations, data)
        return annotations, images, "annotations[1] (id=11)", "empty caption"
    if kind == "missing key":
        del data["annotations"][1]["caption"]
        _json(annotations, data)
        return annotations, images, "annotations[1] (id=11)", "missing key(s) ['caption']"
    if kind == "wrong size":
        _image(images / "000000000002.jpg", (21, 20))
        return annotations, images, "images[1] (id=2)", "annotation says the image is 20x20"
    raise AssertionError(kind)


BAD_KINDS = ["missing image", "corrupt image", "empty caption", "missing key", "wrong size"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_record_stops_with_file_and_record_named(tmp_path, kind):
    annotations, images, record, reason = _bad_coco(tmp_path, kind)
    with pytest.raises(ConversionError) as info:
        _run("coco_captions", tmp_path, inputs=[annotations], images=[images])
    message = str(info.value)
    assert message.startswith(f"{annotations}: {record}: ") and reason in message and "--skip-bad" in message
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_skip_bad_counts_and_lists(tmp_path, kind):
    annotations, images, record, reason = _bad_coco(tmp_path, kind)
    manifest, lines = _run("coco_captions", tmp_path, inputs=[annotations], images=[images], skip_bad=True)
    assert manifest["skipped_count"] == 1
    (skipped,) = manifest["skipped"]
    assert skipped["file"] == str(annotations) and skipped["record"] == record and reason in skipped["reason"]
    assert storage.read_manifest(tmp_path / "out")["skipped"] == manifest["skipped"]
    assert any("skipped 1 bad record(s)" in line for line in lines)
    assert any(record in line and reason in line for line in lines)
    stored = _load(tmp_path / "out", "captioning", "train")
    if kind in ("empty caption", "missing key"):  # the caption goes, image 2 has no other caption
        assert [r["id"] for r in stored] == ["1"] and manifest["notes"]["images without captions"] == 2
    else:
        assert [r["id"] for r in stored] == ["1"]


def test_truncated_image_is_caught_when_verifying(tmp_path):
    annotations, images = coco_captions_fixture(tmp_path)
    image = images / "000000000002.jpg"  # PIL reads the format from the bytes, not the name
    noise = Image.frombytes("RGB", (20, 20), bytes(range(256)) * 4 + bytes(176))
    noise.save(image, format="PNG")
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])  # header intact, pixel data cut
    _run("coco_captions", tmp_path / "a", inputs=[annotations], images=[images])  # header check passes
    with pytest.raises(ConversionError, match=r"images\[1\] \(id=2\): unreadable or corrupt image"):
        _run("coco_captions", tmp_path / "b", inputs=[annotations], images=[images], verify_images=True)


def test_malformed_files_always_stop(tmp_path):
    bad_json = tmp_path / "captions_train2017.json"
    bad_json.write_text('{"images": [', encoding="utf-8")
    with pytest.raises(ConversionError, match="captions_train2017.json: not valid JSON"):
        _run("coco_captions", tmp_path, inputs=[bad_json], images=[tmp_path], skip_bad=True)
    _json(bad_json, {"images": []})
    with pytest.raises(ConversionError, match=r"missing key\(s\) \['annotations'\]"):
        _run("coco_captions", tmp_path, inputs=[bad_json], images=[tmp_path], skip_bad=True)


def test_empty_question_and_box_outside_image(tmp_path):
    questions, annotations, images = vqav2_fixture(tmp_path / "v", question=" ")
    with pytest.raises(ConversionError, match=r"questions\.json: questions\[0\] \(question_id=420\): empty question"):
        _run("vqav2", tmp_path / "v", inputs=[questions, annotations], images=[images])
    refs, instances, images = refcoco_fixture(tmp_path / "r", bbox_of_101=(45.0, 3.0, 10.0, 12.0))
    with pytest.raises(
        ConversionError,
        match=r"instances\.json: annotation id=101 \(refs\[0\] \(ref_id=1\)\): .*lies outside the 50x40 image",
    ):
        _run("refcoco", tmp_path / "r", inputs=[refs, instances], images=[images])
    manifest, _ = _run("refcoco", tmp_path / "r", inputs=[refs, instances], images=[images], skip_bad=True)
    assert manifest["tasks"] == {"rec": {"testA": 1}, "grounding": {"testA": 1}} and manifest["skipped_count"] == 1


def test_sub_pixel_overshoot_is_clamped(tmp_path):
    refs, instances, images = refcoco_fixture(tmp_path, bbox_of_101=(-0.4, 3.0, 50.7, 12.0))
    _run("refcoco", tmp_path, inputs=[refs, instances], images=[images])
    assert _load(tmp_path / "out", "rec", "train")[0]["box"] == [0.0, 3.0, 50.0, 15.0]


def test_failed_conversion_keeps_the_previous_dataset(tmp_path):
    annotations, images = coco_captions_fixture(tmp_path)
    _run("coco_captions", tmp_path, inputs=[annotations], images=[images])
    before = _load(tmp_path / "out", "captioning", "train")
    (images / "000000000002.jpg").unlink()  # the second record fails after the first was written
    with pytest.raises(ConversionError):
        _run("coco_captions", tmp_path, inputs=[annotations], images=[images])
    assert _load(tmp_path / "out", "captioning", "train") == before


# --------------------------------------------------------------------------------------------- JSONL
def test_jsonl_records_of_any_task_and_bad_lines_named(tmp_path):
    _image(tmp_path / "a.png", size=(40, 30))
    good = {
        "task": "vqa",
        "id": "q1",
        "image": "a.png",
        "question": "what?",
        "answers": ["red"],
        "answer_type": "other",
    }
    lines = [
        json.dumps(good),
        json.dumps({**good, "id": "q2", "split": "val"}),
        "{not json",
        json.dumps({**good, "id": "q3", "task": "nosuch"}),
        json.dumps({**good, "id": "q4", "image": "missing.png"}),
        json.dumps({**good, "id": "q5", "answers": []}),
        json.dumps({**good, "id": "q6", "width": 41, "height": 30}),
        json.dumps(["a", "list"]),
    ]
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    kwargs = {"inputs": [tmp_path / "r.jsonl"], "out": tmp_path / "out", "log": lambda *_: None}
    with pytest.raises(ConversionError, match=r"r\.jsonl: line 3: not valid JSON"):
        convert("jsonl", **kwargs)
    manifest = convert("jsonl", skip_bad=True, **kwargs)
    assert manifest["tasks"] == {"vqa": {"train": 1, "val": 1}}
    reasons = {item["record"]: item["reason"] for item in manifest["skipped"]}
    assert set(reasons) == {"line 3", "line 4", "line 5", "line 6", "line 7", "line 8"}
    assert "must name a registered task" in reasons["line 4"] and "'nosuch'" in reasons["line 4"]
    assert "image file not found" in reasons["line 5"]
    assert "'answers'" in reasons["line 6"]
    assert "annotation says the image is 41x30" in reasons["line 7"]
    assert "expected a JSON object, got list" in reasons["line 8"]
    record = storage.load_split(tmp_path / "out", "vqa", "train")[0]
    assert (record["width"], record["height"]) == (40, 30) and record["question"] == "what?"
