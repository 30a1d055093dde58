"""Official results formats round-trip: the file, scored by the official tools (or an independent
implementation of the official evaluation), equals our metric on the same predictions.

Each test converts a small fixture in the official layout with our converter (so the records carry
the source ids the converters keep), makes predictions lines for its records (right, wrong,
normalisation cases, no prediction), writes the results file with `data_tools.formats`, and scores
that file against the fixture's own official annotation files.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import re

import pytest
from PIL import Image

import tasks
from data_tools import storage
from data_tools.converters import convert
from data_tools.formats import FORMATS, build_results, load_categories, write_results
from data_tools.predictions import PredictionsError, source_ids


def _image(path, size):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 140, 30)).save(path, format="JPEG")


def _json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def _convert(source, tmp_path, inputs, images):
    out = tmp_path / "data"
    convert(source, inputs=inputs, images=images, out=out, log=lambda *a: None)
    return out


def _lines(task_name, split, records, predictions):
    """Predictions lines as `unified-vl predict --data` and `eval --predictions` write them."""
    return [
        {
            "id": r["id"],
            "task": task_name,
            "split": split,
            "text": "",
            "prediction": p,
            "score": -0.5,
            **source_ids(task_name, r),
        }
        for r, p in zip(records, predictions, strict=True)
    ]


def _write(tmp_path, name, results):
    return write_results(tmp_path / f"{name}.json", results)


# ---------------------------------------------------------------------------------------- VQAv2
# (question_id, the ten human answers, answer_type, our prediction): the official normalisation
# cases (number words, articles, punctuation, answers that all agree and so are not normalised).
VQA_CASES = [
    (1001, ["2"] * 10, "number", "two"),  # identical answers: no normalisation, "two" scores 0
    (1002, ["2"] * 7 + ["two", "3", "2"], "number", "Two"),  # they disagree: "Two" -> "2"
    (1003, ["red"] * 2 + ["dark red"] * 8, "other", "red"),  # 2 of 10: 0.6
    (1004, ["yes"] * 10, "yes/no", "yes"),
    (1005, ["no"] * 9 + ["yes"], "yes/no", None),  # no prediction: the empty answer
    (1006, ["the dog"] * 5 + ["dog"] * 5, "other", "a dog"),  # articles dropped
    (1007, ["1,000"] * 4 + ["1000"] * 6, "number", "1000"),
    (1008, ["no."] * 3 + ["no"] * 7, "yes/no", "no"),
]


def vqav2_fixture(root):
    questions, annotations = [], []
    for k, (qid, answers, answer_type, _) in enumerate(VQA_CASES):
        image_id = 40 + k % 3  # several questions per image
        _image(root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg", (24, 16))
        questions.append({"image_id": image_id, "question": f"question {k}?", "question_id": qid})
        annotations.append(
            {
                "question_id": qid,
                "image_id": image_id,
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)
                ],
                "multiple_choice_answer": answers[0],
                "answer_type": answer_type,
                "question_type": "what",
            }
        )
    common = {"info": {}, "license": {}, "data_subtype": "val2014", "data_type": "mscoco"}
    q = _json(
        root / "v2_OpenEnded_mscoco_val2014_questions.json",
        {**common, "task_type": "Open-Ended", "questions": questions},
    )
    a = _json(root / "v2_mscoco_val2014_annotations.json", {**common, "annotations": annotations})
    return q, a


def official_vqa_accuracy(questions_file, annotations_file, results_file) -> float:
    """The VQA evaluation as visualqa.org/evaluation describes it and GT-Vision-Lab/VQA's vqaEval.py
    (commit a013f00, 2021) computes it, written from that description apart from tasks/vqa.py; only
    its word tables (contractions, number words, punctuation), data copied from vqaEval.py, are shared.
    """
    from tasks.vqa import ARTICLES, CONTRACTIONS, MANUAL_MAP, PUNCT

    question_ids = {q["question_id"] for q in json.loads(questions_file.read_text())["questions"]}
    annotations = json.loads(annotations_file.read_text())["annotations"]
    results = json.loads(results_file.read_text())
    assert isinstance(results, list), "results is not an array of objects"  # VQA.loadRes
    answer_of = {r["question_id"]: r["answer"] for r in results}
    assert set(answer_of) == question_ids and len(answer_of) == len(results), "results do not match the questions"

    def clean(text: str) -> str:
        return text.replace("\n", " ").replace("\t", " ").strip()

    def normalise(text: str) -> str:
        out = text
        has_comma_number = re.search(r"(\d)(,)(\d)", text) is not None
        for mark in PUNCT:
            spaced = mark + " " in text or " " + mark in text
            out = out.replace(mark, "" if spaced or has_comma_number else " ")
        out = re.sub(r"(?!<=\d)(\.)(?!\d)", "", out, count=re.UNICODE)  # vqaEval's periodStrip, count and all
        words = [MANUAL_MAP.get(w, w) for w in out.lower().split()]
        return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)

    per_question = []
    for annotation in annotations:
        humans = [clean(a["answer"]) for a in annotation["answers"]]
        answer = clean(answer_of[annotation["question_id"]])
        if len(set(humans)) > 1:
            humans, answer = [normalise(h) for h in humans], normalise(answer)
        subsets = [humans[:i] + humans[i + 1 :] for i in range(len(humans))]
        per_question.append(sum(min(1.0, s.count(answer) / 3) for s in subsets) / len(subsets))
    return sum(per_question) / len(per_question)


def test_vqav2_results_scored_by_the_official_evaluation_equal_our_accuracy(tmp_path):
    questions, annotations = vqav2_fixture(tmp_path)
    data = _convert("vqav2", tmp_path, [questions, annotations], [tmp_path])
    records = list(storage.load_split(data, "vqa", "val", decode_images=False))
    predicted = {qid: prediction for qid, _, _, prediction in VQA_CASES}
    predictions = [predicted[r["question_id"]] for r in records]
    ours = tasks.get_task("vqa").evaluate(predictions, records)["accuracy"]

    results, _ = build_results(_lines("vqa", "val", records, predictions), "vqav2")
    assert results[0] == {"question_id": 1001, "answer": "two"}
    assert {"question_id": 1005, "answer": ""} in results
    official = official_vqa_accuracy(questions, annotations, _write(tmp_path, "vqa", results))
    assert official == pytest.approx(ours, abs=1e-12)
    assert 0.3 < ours < 0.9  # the cases score differently: equality is not 0 == 0


# ------------------------------------------------------------------------------------ COCO captions
CAPTIONS = {
    11: ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave.", "Person surfing in the ocean."],
    12: ["Two dogs playing with a frisbee in the park.", "Dogs run on the grass.", "A pair of dogs at play."],
    13: ["A red bus parked on the street.", "A double decker bus.", "The bus is red and parked by the curb."],
    14: ["A plate of food with broccoli.", "Broccoli and rice on a white plate.", "A healthy meal."],
    15: ["A cat sleeping on a couch.", "The cat is asleep on the sofa.", "A grey cat lies on cushions."],
}
CAPTION_PREDICTIONS = {
    11: "a surfer riding a large wave",
    12: "two dogs playing in the park",
    13: "a red bus on the street",
    14: None,  # no prediction: the empty caption
    15: "a dog on a bed",
}


def test_coco_caption_results_scored_by_cocoevalcap_equal_our_metrics(tmp_path, monkeypatch):
    import pycocoevalcap.eval as cap_eval
    from pycocoevalcap.eval import COCOEvalCap
    from pycocotools.coco import COCO

    from tasks._caption_metrics import ptb_tokenize

    images, annotations = [], []
    for image_id, captions in CAPTIONS.items():
        name = f"COCO_val2014_{image_id:012d}.jpg"
        _image(tmp_path / "val2014" / name, (20, 20))
        images.append({"id": image_id, "file_name": name, "width": 20, "height": 20})
        annotations += [{"image_id": image_id, "id": 100 * image_id + k, "caption": c} for k, c in enumerate(captions)]
    gt = _json(
        tmp_path / "captions_val2014.json", {"info": {}, "licenses": [], "images": images, "annotations": annotations}
    )
    data = _convert("coco_captions", tmp_path, [gt], [tmp_path / "val2014"])
    records = list(storage.load_split(data, "captioning", "val", decode_images=False))
    predictions = [CAPTION_PREDICTIONS[r["image_id"]] for r in records]
    ours = tasks.get_task("captioning").evaluate(predictions, records)

    results, _ = build_results(_lines("captioning", "val", records, predictions), "coco_captions")
    assert {"image_id": 14, "caption": ""} in results
    results_file = _write(tmp_path, "captions", results)

    # Without Java: COCOEvalCap's PTBTokenizer (Stanford CoreNLP) becomes our Python tokenizer,
    # and METEOR and SPICE (Java too) are skipped; BLEU, ROUGE-L and CIDEr are pycocoevalcap's own.
    class PythonPTBTokenizer:
        def tokenize(self, captions_for_image):
            return {i: [ptb_tokenize(c["caption"]) for c in caps] for i, caps in captions_for_image.items()}

    class Skipped:
        def method(self):
            return "skipped (Java)"

        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(res)

    monkeypatch.setattr(cap_eval, "PTBTokenizer", PythonPTBTokenizer)
    monkeypatch.setattr(cap_eval, "Meteor", Skipped)
    monkeypatch.setattr(cap_eval, "Spice", Skipped)
    with contextlib.redirect_stdout(io.StringIO()):  # both libraries print progress
        coco = COCO(str(gt))
        coco_res = coco.loadRes(str(results_file))
        evaluator = COCOEvalCap(coco, coco_res)
        evaluator.params["image_id"] = coco_res.getImgIds()
        evaluator.evaluate()
    assert evaluator.eval["CIDEr"] == pytest.approx(ours["cider"], abs=1e-9)
    assert evaluator.eval["Bleu_4"] == pytest.approx(ours["bleu4"], abs=1e-9)
    assert evaluator.eval["ROUGE_L"] == pytest.approx(ours["rouge_l"], abs=1e-9)
    assert ours["cider"] > 0.3 and ours["rouge_l"] > 0.3 and ours["bleu4"] > 0


# ------------------------------------------------------------------------------------ COCO detection
CATEGORIES = [{"id": 3, "name": "car"}, {"id": 18, "name": "dog"}, {"id": 62, "name": "chair"}]
# image_id -> gold objects (label, [x1, y1, x2, y2]); record order is not image-id order on purpose.
DETECTION_GOLD = {
    30: [("dog", [10, 10, 50, 50]), ("car", [60, 5, 95, 40])],
    10: [("dog", [5, 5, 40, 45])],
    20: [("chair", [20, 30, 70, 90]), ("dog", [70, 70, 95, 95])],
}
DETECTION_PREDICTIONS = {
    30: [("dog", [12, 11, 50, 52]), ("car", [0, 60, 30, 95])],  # a hit, a miss
    10: [("cat", [5, 5, 40, 45]), ("dog", [6, 4, 41, 44])],  # a label that is no category (dropped), a hit
    20: [("dog", [20, 30, 70, 90]), ("chair", [21, 31, 69, 88])],  # a wrong label, a hit
}


def test_coco_detection_results_scored_by_cocoeval_equal_our_map(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ids = {c["name"]: c["id"] for c in CATEGORIES}
    lines, images, annotations = [], [], []
    for image_id, objects in DETECTION_GOLD.items():
        _image(tmp_path / "images" / f"{image_id:012d}.jpg", (100, 100))
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": 100, "height": 100})
        objs = [{"label": label, "box": [float(v) for v in box]} for label, box in objects]
        lines.append({"task": "detection", "split": "val", "id": str(image_id), "image_id": image_id})
        lines[-1] |= {"image": f"{image_id:012d}.jpg", "objects": objs}
        for label, (x1, y1, x2, y2) in objects:
            box = [x1, y1, x2 - x1, y2 - y1]
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": ids[label], "bbox": box}
                | {"area": box[2] * box[3], "iscrowd": 0}
            )
    requests = tmp_path / "detection.jsonl"
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    gt = _json(
        tmp_path / "instances_val2017.json", {"images": images, "annotations": annotations, "categories": CATEGORIES}
    )
    data = _convert("jsonl", tmp_path, [requests], [tmp_path / "images"])
    records = list(storage.load_split(data, "detection", "val", decode_images=False))
    predictions = [
        [(label, [float(v) for v in box]) for label, box in DETECTION_PREDICTIONS[r["image_id"]]] for r in records
    ]
    ours = tasks.get_task("detection").evaluate(predictions, records)["map@0.5"]

    pred_lines = _lines("detection", "val", records, predictions)
    with pytest.raises(PredictionsError, match="needs --categories FILE"):
        build_results(pred_lines, "coco_detection")
    results, dropped = build_results(pred_lines, "coco_detection", categories=load_categories(gt))
    assert dropped == {"cat": 1}
    assert {"image_id": 10, "category_id": 18, "bbox": [6.0, 4.0, 35.0, 40.0], "score": 1.0} in results
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt))
        evaluator = COCOeval(coco, coco.loadRes(str(_write(tmp_path, "detections", results))), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert evaluator.stats[1] == pytest.approx(ours, abs=1e-12)  # stats[1]: AP at IoU 0.5, all areas, 100 dets
    assert 0.3 < ours < 1.0


# ------------------------------------------------------------------------------------------ RefCOCO
def test_refcoco_results_scored_by_pycocotools_iou_equal_our_accuracy(tmp_path):
    from pycocotools import mask

    _image(tmp_path / "train2014" / "COCO_train2014_000000000005.jpg", (100, 80))
    annotations = [
        {"id": 101, "image_id": 5, "bbox": [10.0, 10.0, 30.0, 40.0], "category_id": 1},
        {"id": 102, "image_id": 5, "bbox": [50.0, 20.0, 40.0, 50.0], "category_id": 1},
    ]
    instances = _json(
        tmp_path / "instances.json",
        {
            "images": [{"id": 5, "file_name": "COCO_train2014_000000000005.jpg", "width": 100, "height": 80}],
            "annotations": annotations,
            "categories": [{"id": 1, "name": "person"}],
        },
    )
    sentences = {1: ["left man", "man on the left", "guy in red"], 2: ["right woman", "woman"]}
    refs = [
        {
            "ref_id": ref_id,
            "ann_id": 100 + ref_id,
            "image_id": 5,
            "split": "val",
            "sentences": [{"sent": s, "sent_id": 10 * ref_id + k} for k, s in enumerate(texts)],
        }
        for ref_id, texts in sentences.items()
    ]
    refs_file = tmp_path / "refs(unc).p"
    refs_file.write_bytes(pickle.dumps(refs, protocol=2))
    data = _convert("refcoco", tmp_path, [refs_file, instances], [tmp_path / "train2014"])
    records = list(storage.load_split(data, "rec", "val", decode_images=False))
    guesses = {
        10: [10.0, 10.0, 40.0, 50.0],  # exact
        11: [14.0, 10.0, 44.0, 50.0],  # IoU 0.765
        12: [25.0, 10.0, 55.0, 50.0],  # IoU 0.333
        20: None,  # no prediction
        21: [52.0, 25.0, 88.0, 70.0],
    }
    predictions = [guesses[r["sent_id"]] for r in records]
    ours = tasks.get_task("rec").evaluate(predictions, records)["acc@0.5"]

    results, _ = build_results(_lines("rec", "val", records, predictions), "refcoco")
    assert {"ref_id": 2, "sent_id": 20, "bbox": None} in results
    written = json.loads(_write(tmp_path, "refcoco", results).read_text())
    gold = {(r["ref_id"], s["sent_id"]): annotations[r["ref_id"] - 1]["bbox"] for r in refs for s in r["sentences"]}
    # An independent IoU: pycocotools' box IoU on the file's [x, y, w, h] against the refs' boxes.
    hits = [
        entry["bbox"] is not None
        and mask.iou([entry["bbox"]], [gold[(entry["ref_id"], entry["sent_id"])]], [0])[0][0] >= 0.5
        for entry in written
    ]
    assert len(written) == 5
    assert sum(hits) / len(hits) == pytest.approx(ours) == pytest.approx(3 / 5)


# ------------------------------------------------------------------------------------- bad input
def test_a_record_without_the_source_id_a_format_needs_is_named(tmp_path):
    record = {"id": "q7", "task": "vqa", "split": "val", "text": "red", "prediction": "red", "score": -0.1}
    with pytest.raises(PredictionsError, match=r"preds.jsonl: record 'q7' has no 'question_id'.*--format vqav2"):
        build_results([record], "vqav2", source="preds.jsonl")
    twice = [{**record, "question_id": 3}, {**record, "id": "q8", "question_id": 3}]
    with pytest.raises(PredictionsError, match=r"records 'q7' and 'q8' share \{'question_id': 3\}"):
        build_results(twice, "vqav2")
    with pytest.raises(PredictionsError, match=r"holds no captioning predictions.*\['vqa'\]"):
        build_results(twice, "coco_captions")
    splits = [{**record, "question_id": 3}, {**record, "split": "test", "question_id": 4}]
    with pytest.raises(PredictionsError, match=r"several splits \(\['test', 'val'\]\)"):
        build_results(splits, "vqav2")
    with pytest.raises(PredictionsError, match="unknown --format 'vqa'; formats: vqav2, coco_captions"):
        build_results(twice, "vqa")
    out = _write(tmp_path, "r", [])
    with pytest.raises(PredictionsError, match="r.json exists; pass --overwrite"):
        write_results(out, [])
    with pytest.raises(PredictionsError, match=r"categories\[0\] must be"):
        load_categories(_json(tmp_path / "c.json", {"categories": [{"id": "3", "name": "car"}]}))
    assert set(FORMATS) == {"vqav2", "coco_captions", "coco_detection", "refcoco"}
