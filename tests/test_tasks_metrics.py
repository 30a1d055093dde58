"""Golden values for the task metrics (computed by hand in the comments) and task-specific behaviour."""

from __future__ import annotations

import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

import tasks
from tasks import RecordError
from tasks._caption_metrics import caption_scores, ptb_tokenize
from tasks.classification import Verbalizer, make_task
from tasks.grounding import match_phrases
from tasks.text_infilling import corrupt, random_spans_noise_mask
from tasks.vqa import most_common_answer, normalize_answer, process_punctuation, vqa_accuracy

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------
# VQA: official accuracy (GT-Vision-Lab/VQA vqaEval.py)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("matching", "expected"),
    [
        # k of 10 answers match. Leave one out: dropping a matching answer leaves k-1 matches
        # (k of the 10 subsets), dropping another leaves k (10-k subsets); each scores min(1, m/3).
        (0, 0.0),
        (1, (1 * 0 + 9 * (1 / 3)) / 10),  # 0.3
        (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # 0.6
        (3, (3 * (2 / 3) + 7 * 1) / 10),  # 0.9, not 1.0
        (4, 1.0),  # dropping one of 4 still leaves 3
        (10, 1.0),
    ],
)
def test_vqa_accuracy_leave_one_out(matching, expected):
    answers = ["red"] * matching + ["blue", "green", "pink", "gray", "white", "black", "teal", "tan", "navy", "gold"][
        : 10 - matching
    ]
    assert vqa_accuracy("red", answers) == pytest.approx(expected, abs=1e-12)


def test_vqa_golden_hand_values():
    assert vqa_accuracy("red", ["red"] * 3 + ["blue"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("red", ["red"] * 2 + ["blue"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy(None, ["red"] * 10) == 0.0
    # One answer counts as ten agreeing annotators (leave-one-out of one answer would give 0).
    assert vqa_accuracy("red", ["red"]) == 1.0 and vqa_accuracy("Red", ["red"]) == 0.0
    # Fewer than ten: the formula as is; 3 identical answers, drop one, 2 left: 2/3.
    assert vqa_accuracy("red", ["red"] * 3) == pytest.approx(2 / 3)


def test_vqa_normalisation_when_answers_disagree():
    # Number words -> digits and lower-casing ("Two" -> "2"): 5 of 10 match.
    assert vqa_accuracy("Two", ["2"] * 5 + ["3"] * 5) == 1.0
    # Trailing period removed ("dogs." -> "dogs"): 4 match.
    assert vqa_accuracy("dogs.", ["dogs"] * 4 + ["cats"] * 6) == 1.0
    # Contractions: "dont" -> "don't".
    assert vqa_accuracy("dont", ["don't"] * 4 + ["no"] * 6) == 1.0
    # Articles dropped: "a dog" -> "dog", 3 match -> 0.9.
    assert vqa_accuracy("a dog", ["dog"] * 3 + ["cat"] * 7) == pytest.approx(0.9)
    # Whitespace (newline, tab) is cleaned in every case.
    assert vqa_accuracy("\tred\n", ["red"] * 10) == 1.0


def test_vqa_no_normalisation_when_all_answers_agree():
    # The official quirk: with ten identical answers nothing is normalised, so these score 0 ...
    assert vqa_accuracy("two", ["2"] * 10) == 0.0
    assert vqa_accuracy("a dog", ["dog"] * 10) == 0.0
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    # ... while one dissenting answer switches normalisation on: 9 of 10 match "2".
    assert vqa_accuracy("two", ["2"] * 9 + ["3"]) == 1.0
    assert vqa_accuracy("a dog", ["dog"] * 9 + ["cat"]) == 1.0


def test_vqa_official_punctuation_rules():
    assert normalize_answer("Two Dogs.") == "2 dogs"
    assert normalize_answer("1.5") == "1.5"  # a period before a digit stays
    assert normalize_answer("5,000") == "5000"  # digit,digit: punctuation removed, not spaced
    assert normalize_answer("hello, world") == "hello world"  # ", " present: "," removed
    assert normalize_answer("yes/no") == "yes no"  # otherwise punctuation becomes a space
    assert process_punctuation("don't") == "don't"  # the apostrophe is not in the official list
    assert normalize_answer("The cat") == "cat"


def test_vqa_target_and_per_type_metrics():
    vqa = tasks.get_task("vqa")
    assert most_common_answer(["b", "a", "a", "b", "c"]) == "b"  # tie: the earliest listed
    records = [
        {"id": "a", "question": "q?", "answers": ["yes"] * 10, "answer_type": "yes/no"},
        {"id": "b", "question": "q?", "answers": ["2"] * 2 + ["3"] * 8, "answer_type": "number"},
        {"id": "c", "question": "q?", "answers": ["red"] * 10, "answer_type": "other"},
    ]
    assert vqa.target(records[1]) == "3"
    scores = vqa.evaluate(["yes", "2", None], records)
    assert scores == pytest.approx(
        {
            "accuracy": (1.0 + 0.6 + 0.0) / 3,
            "accuracy_yes/no": 1.0,
            "accuracy_number": 0.6,
            "accuracy_other": 0.0,
        }
    )
    assert "accuracy_number" not in vqa.evaluate(["yes"], records[:1])
    with pytest.raises(RecordError, match=r"answer_type"):
        vqa.validate({**records[0], "answer_type": "color"})
    assert vqa.prompt(records[0], template=1) == "question: q?"


# --------------------------------------------------------------------------------------------
# Captioning: CIDEr-D, BLEU-4, ROUGE-L
# --------------------------------------------------------------------------------------------


def test_ptb_like_tokenizer():
    assert ptb_tokenize("A man, riding a horse.") == "a man riding a horse"
    assert ptb_tokenize("The dog's ball (red)!") == "the dog 's ball red"
    assert ptb_tokenize("Don't  stop -- ok...") == "do n't stop ok"
    assert ptb_tokenize("a black-and-white photo of 3.5 cats") == "a black-and-white photo of 3.5 cats"


def test_cider_matches_pycocoevalcap_on_a_tiny_corpus():
    captioning = tasks.get_task("captioning")
    records = [
        {"id": "0", "captions": ["A red circle left of a blue square.", "A red circle and a blue square"]},
        {"id": "1", "captions": ["a green triangle above a yellow star", "A star below a triangle."]},
        {"id": "2", "captions": ["two purple hexagons", "a pair of purple hexagons"]},
    ]
    predictions = ["a red circle next to a square", "a green triangle above a star", "two hexagons"]
    # The same corpus, tokenised by hand, straight into pycocoevalcap.
    gts = {
        0: ["a red circle left of a blue square", "a red circle and a blue square"],
        1: ["a green triangle above a yellow star", "a star below a triangle"],
        2: ["two purple hexagons", "a pair of purple hexagons"],
    }
    res = {i: [p] for i, p in enumerate(predictions)}
    expected_cider, _ = Cider().compute_score(gts, res)
    expected_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = captioning.evaluate(predictions, records)
    assert scores["cider"] == pytest.approx(expected_cider, rel=1e-12)
    assert scores["bleu4"] == pytest.approx(expected_bleu[3], rel=1e-12)
    assert 0 < scores["cider"] < 10 and 0 < scores["rouge_l"] <= 1


def test_bleu4_hand_computed():
    # hyp (8 words) vs ref (10 words): clipped n-gram precisions 8/8, 6/7, 4/6, 2/5;
    # brevity penalty exp(1 - 10/8).
    hyp = "a red circle left of a blue square"
    ref = "a red circle to the left of a blue square"
    expected = math.exp(1 - 10 / 8) * (1 * 6 / 7 * 4 / 6 * 2 / 5) ** 0.25
    assert caption_scores([hyp], [[ref]])["bleu4"] == pytest.approx(expected, rel=1e-6)


def test_cider_needs_the_whole_corpus():
    # IDF = log(#images) - log(df): with one image every n-gram has df = 1 = #images, so even a
    # perfect caption gets CIDEr 0. Evaluate a whole split at once, as COCO does.
    captioning = tasks.get_task("captioning")
    record = captioning.examples[0]
    gold = captioning.gold(record)
    assert captioning.evaluate([gold], [record])["cider"] == 0.0
    assert captioning.evaluate([captioning.gold(r) for r in captioning.examples], captioning.examples)["cider"] > 1.0


def test_captioning_target_draws_a_reference_with_rng():
    captioning = tasks.get_task("captioning")
    record = captioning.examples[0]
    assert captioning.target(record) == record["captions"][0]
    drawn = {captioning.target(record, rng=random.Random(seed)) for seed in range(30)}
    assert drawn == set(record["captions"])


# --------------------------------------------------------------------------------------------
# REC: Acc@0.5, mIoU, loc-token parsing
# --------------------------------------------------------------------------------------------


def _rec_record(box=(0.0, 0.0, 100.0, 100.0)):
    return {"id": "r", "width": 200, "height": 200, "expression": "it", "box": list(box)}


def test_rec_iou_exactly_half_is_correct():
    rec = tasks.get_task("rec")
    record = _rec_record()
    # [0, 0, 50, 100] covers half of [0, 0, 100, 100]: IoU = 5000 / 10000 = 0.5 exactly.
    assert rec.evaluate([[0.0, 0.0, 50.0, 100.0]], [record]) == {"acc@0.5": 1.0, "miou": 0.5}
    below = rec.evaluate([[0.0, 0.0, 49.0, 100.0]], [record])
    assert below["acc@0.5"] == 0.0 and below["miou"] == pytest.approx(0.49)
    assert rec.evaluate([[0.0, 0.0, 100.0, 100.0], None], [record, record]) == {"acc@0.5": 0.5, "miou": 0.5}


def test_rec_parse_needs_exactly_four_loc_tokens():
    rec = tasks.get_task("rec")
    record = _rec_record()
    assert rec.parse("<loc_0><loc_0><loc_499><loc_499>", record) == pytest.approx([0.1, 0.1, 99.9, 99.9])
    assert rec.parse(" <loc_0> <loc_0> <loc_499> <loc_499> ", record) == pytest.approx([0.1, 0.1, 99.9, 99.9])
    assert rec.parse("<loc_0><loc_0><loc_499>", record) is None  # three
    assert rec.parse("<loc_0><loc_0><loc_499><loc_499><loc_5>", record) is None  # five
    assert rec.parse("<loc_0><loc_0><loc_1000><loc_499>", record) is None  # bin out of range
    assert rec.parse("<loc_600><loc_0><loc_100><loc_499>", record) is None  # x2 < x1
    assert rec.parse("the red one", record) is None
    assert rec.evaluate([rec.parse("<loc_1><loc_2><loc_3>", record)], [record])["acc@0.5"] == 0.0


def test_rec_box_outside_image_is_a_record_error():
    rec = tasks.get_task("rec")
    with pytest.raises(RecordError, match=r"rec: record 'r' field 'box'"):
        rec.validate(_rec_record((0.0, 0.0, 300.0, 100.0)))
    with pytest.raises(RecordError, match=r"field 'width'"):
        rec.validate({**_rec_record(), "width": 0})


# --------------------------------------------------------------------------------------------
# Grounding
# --------------------------------------------------------------------------------------------


def _phrase_record():
    return {
        "id": "g",
        "width": 100,
        "height": 100,
        "caption": "a red circle and a blue square",
        "phrases": ["a red circle", "a blue square"],
        "boxes": [[0.0, 0.0, 40.0, 40.0], [50.0, 50.0, 100.0, 100.0]],
    }


def test_grounding_phrase_accuracy_matches_by_text_then_position():
    grounding = tasks.get_task("grounding")
    record = _phrase_record()
    red, blue = record["boxes"]
    # Matched by text, in any order.
    assert grounding.evaluate([[("A Blue Square.", blue), ("a red circle", red)]], [record]) == {"phrase_acc@0.5": 1.0}
    # Unknown phrase text: matched by position.
    assert grounding.evaluate([[("circle", red), ("square", blue)]], [record]) == {"phrase_acc@0.5": 1.0}
    # One box wrong, one phrase missing.
    assert grounding.evaluate([[("a red circle", blue)]], [record]) == {"phrase_acc@0.5": 0.0}
    assert grounding.evaluate([[("a blue square", blue)]], [record]) == {"phrase_acc@0.5": 0.5}
    box = [0, 0, 1, 1]
    # Text matches first; a phrase without one takes the item at its own position if still free.
    assert match_phrases(["x", "y"], [("z", box), ("y", box)]) == [0, 1]
    assert match_phrases(["x", "y"], [("y", box), ("z", box)]) == [None, 0]
    assert match_phrases(["x", "x"], [("x", box), ("x", box)]) == [0, 1]


def test_grounding_parse_is_tolerant_and_drops_bad_items():
    grounding = tasks.get_task("grounding")
    record = _phrase_record()
    text = "a red circle <loc_0> <loc_0> <loc_399> <loc_399> ; a blue square<loc_500><loc_500> ; junk"
    assert grounding.parse(text, record) == [("a red circle", pytest.approx([0.05, 0.05, 39.95, 39.95]))]
    assert grounding.parse("<loc_0><loc_0><loc_1><loc_1>", record) is None  # no phrase text
    assert grounding.parse("a red circle", record) is None
    with pytest.raises(RecordError, match="one box per phrase"):
        grounding.validate({**record, "boxes": record["boxes"][:1]})
    with pytest.raises(RecordError, match="must not contain"):
        grounding.validate({**record, "phrases": ["a red circle; x", "a blue square"]})


def test_grounding_region_records_report_region_cider_only():
    grounding = tasks.get_task("grounding")
    regions = [r for r in grounding.examples if r.get("region") is not None]
    assert len(regions) >= 3
    assert grounding.prompt(regions[0]) == "what does the region describe? region: <loc_50><loc_83><loc_312><loc_437>"
    scores = grounding.evaluate([grounding.gold(r) for r in regions], regions)
    assert set(scores) == {"region_cider"} and scores["region_cider"] > 0
    phrases = [r for r in grounding.examples if r.get("region") is None]
    assert set(grounding.evaluate([grounding.gold(r) for r in phrases], phrases)) == {"phrase_acc@0.5"}


# --------------------------------------------------------------------------------------------
# Detection: COCO AP@0.5 by pycocotools
# --------------------------------------------------------------------------------------------


def _detection_records():
    return [
        {
            "id": "d0",
            "width": 100,
            "height": 100,
            "objects": [{"label": "circle", "box": [0, 0, 20, 20]}, {"label": "square", "box": [50, 50, 90, 90]}],
        },
        {
            "id": "d1",
            "width": 100,
            "height": 100,
            "objects": [{"label": "circle", "box": [10, 60, 30, 80]}, {"label": "circle", "box": [60, 10, 80, 30]}],
        },
    ]


def test_detection_map_perfect_and_one_miss():
    detection = tasks.get_task("detection")
    records = _detection_records()
    gold = [detection.gold(r) for r in records]
    assert detection.evaluate(gold, records) == {"map@0.5": 1.0}
    # Miss one of the three circles: circle recall 2/3 at precision 1, so 67 of COCO's 101 recall
    # thresholds (0, 0.01, ..., 0.66) get precision 1 -> AP 67/101; square AP 1; mean of both.
    missed = [gold[0], gold[1][:1]]
    assert detection.evaluate(missed, records)["map@0.5"] == pytest.approx((67 / 101 + 1.0) / 2)
    # Unknown labels and unparseable predictions score nothing.
    assert detection.evaluate([[("hexagon", [0, 0, 20, 20])], None], records) == {"map@0.5": 0.0}


def test_detection_target_raster_order_and_shuffle():
    detection = tasks.get_task("detection")
    record = detection.examples[2]
    target = detection.target(record)
    labels = [item.split("<")[0] for item in target.split(" ; ")]
    assert labels == ["circle", "star", "circle"]  # y1 = 20, 300 (x1 = 20), 300 (x1 = 300)
    assert detection.target(record) == target
    shuffled = {detection.target(record, rng=random.Random(seed)) for seed in range(20)}
    assert len(shuffled) > 1 and target in shuffled
    with pytest.raises(RecordError, match="objects"):
        detection.validate({**record, "objects": []})


# --------------------------------------------------------------------------------------------
# Classification: verbalizer
# --------------------------------------------------------------------------------------------


def test_classification_verbalizer_many_to_one():
    task = make_task({"positive": ["great", "good"], "negative": "terrible"})
    record = {"id": "s", "label": "positive"}
    assert task.target(record) == "great"
    assert task.parse("Good", record) == "positive"
    assert task.parse("terrible", record) == "negative"
    assert task.parse("meh", record) is None
    assert task.candidates([record, {"id": "t", "label": "negative"}]) == ["good", "great", "terrible"]
    assert task.candidates([record]) == ["good", "great"]
    with pytest.raises(RecordError, match="not in the verbalizer"):
        task.validate({"id": "u", "label": "neutral"})
    with pytest.raises(ValueError, match="maps to both"):
        Verbalizer({"a": ["x"], "b": ["X"]})
    with pytest.raises(ValueError, match="no label words"):
        Verbalizer({"a": []})


def test_classification_default_verbalizer_is_identity_and_top5():
    task = tasks.get_task("classification")
    records = task.examples
    assert [task.target(r) for r in records] == [r["label"] for r in records]
    ranked = [
        ["square", "circle"],  # gold circle at rank 2: top1 miss, top5 hit
        ["square"],  # hit
        ["a", "b", "c", "d", "e", "triangle"],  # rank 6: miss both
    ]
    assert task.evaluate(ranked, records) == pytest.approx({"top1": 1 / 3, "top5": 2 / 3})
    assert "top5" not in task.evaluate(["circle", "square", "triangle"], records)


# --------------------------------------------------------------------------------------------
# ITM, text infilling
# --------------------------------------------------------------------------------------------


def test_itm_parse():
    itm = tasks.get_task("itm")
    record = itm.examples[0]
    assert itm.parse("Yes.", record) is True and itm.parse(" no", record) is False
    assert itm.parse("maybe", record) is None
    assert itm.candidates(itm.examples) == ["no", "yes"]
    with pytest.raises(RecordError, match="must be bool"):
        itm.validate({**record, "match": 1})


def test_span_corruption_follows_t5_statistics():
    rng = random.Random(0)
    for length in (2, 5, 20, 100):
        mask = random_spans_noise_mask(length, rng)
        assert len(mask) == length
        # round(L * 0.15) noise words, at least 1 and at most L - 1 (Raffel et al., 2020, §3.1.4).
        assert sum(mask) == min(max(round(length * 0.15), 1), length - 1)
    corrupted = corrupt("one two three four five six seven eight nine ten", random.Random(3))
    words = corrupted.split()
    assert "<extra_id_0>" in words and 7 <= len(words) <= 10
    sentinels = [w for w in words if w.startswith("<extra_id_")]
    assert sentinels == [f"<extra_id_{i}>" for i in range(len(sentinels))]


def test_text_infilling_is_deterministic_across_processes():
    task = tasks.get_task("text_infilling")
    record = task.examples[1]
    prompt = task.prompt(record)
    assert prompt.startswith('what is the complete text of " ') and "<extra_id_0>" in prompt
    code = "import tasks; t = tasks.get_task('text_infilling'); print(t.prompt(t.examples[1]))"
    env = {"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == prompt
    assert task.target(record) == record["text"]


def test_text_infilling_token_accuracy():
    task = tasks.get_task("text_infilling")
    records = [{"id": "a", "text": "a b c d"}, {"id": "b", "text": "x y"}]
    # a: "a b x" -> 2 right of max(3, 4) = 4; b: "x y z" -> 2 right of max(3, 2) = 3.
    assert task.evaluate(["a b x", "x y z"], records) == {"token_accuracy": pytest.approx(4 / 7)}
    assert task.evaluate([None, "x y"], records) == {"token_accuracy": pytest.approx(2 / 6)}
