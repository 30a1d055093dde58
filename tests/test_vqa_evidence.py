"""VQA with grounded evidence: records that name the objects a question is about, and the target that
writes them (phrase and four location tokens each) before ``answer: ...``."""

from __future__ import annotations

import pytest

import tasks
from data_tools import storage, synth
from tasks import RecordError, boxes
from tasks.vqa import ANSWER_MARKER, most_common_answer

VQA = tasks.get_task("vqa")


def record(**extra) -> dict:
    base = {
        "id": "q1", "image": None, "width": 64, "height": 64, "question": "is the red circle left of the blue square?",
        "answers": ["yes"] * 10, "answer_type": "yes/no", "question_type": "relation",
    }  # fmt: skip
    return {**base, **extra}


def test_evidence_is_written_before_the_answer_and_the_metric_reads_the_answer_only():
    r = record(evidence_phrases=["red circle", "blue square"], evidence_boxes=[[0, 0, 16, 16], [32, 32, 64, 64]])
    target = VQA.target(r)
    first, second = boxes.box_to_tokens([0, 0, 16, 16], 64, 64), boxes.box_to_tokens([32, 32, 64, 64], 64, 64)
    assert target == f"red circle{first} ; blue square{second} ; answer: yes"
    assert VQA.parse(target, r) == "yes"
    assert VQA.metric([VQA.parse(target, r)], [r])["accuracy"] == 1.0
    # An answer after evidence the model wrote differently still counts; evidence cut off before the
    # answer is no prediction; a record without evidence keeps its plain answer target.
    assert VQA.parse(f"green star{first} ; {ANSWER_MARKER}  no ", r) == "no"
    assert VQA.parse(f"red circle{first} ; blue sq", r) is None
    assert VQA.target(record()) == "yes"
    assert VQA.parse("yes", record()) == "yes"
    # Evidence of nothing (no object matches): the marker and the answer alone.
    none = record(question="how many stars are there?", answers=["0"] * 10, evidence_phrases=[], evidence_boxes=[])
    assert VQA.target(none) == "answer: 0"
    VQA.validate(none)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"evidence_phrases": ["red circle"]}, "field 'evidence_phrases' needs evidence_boxes beside it"),
        (
            {"evidence_phrases": ["red circle", "blue square"], "evidence_boxes": [[0, 0, 16, 16]]},
            "field 'evidence_phrases' holds 2 item(s) for 1 in evidence_boxes",
        ),
        (
            {"evidence_phrases": ["red; circle"], "evidence_boxes": [[0, 0, 16, 16]]},
            "must not contain ';'",
        ),
        ({"evidence_phrases": ["red circle"], "evidence_boxes": [[0, 0, 80, 16]]}, "field 'evidence_boxes'"),
    ],
)
def test_bad_evidence_is_rejected_naming_the_record_and_field(extra, message):
    with pytest.raises(RecordError) as info:
        VQA.validate(record(**extra))
    assert "q1" in str(info.value) and message in str(info.value)


def test_synth_adds_only_the_evidence_fields_and_they_name_the_questions_objects():
    for index in range(6):
        scene, grounded = synth.make_image(3, "train", index, 64, render=False, layout="free", vqa_evidence=True)
        _, plain = synth.make_image(3, "train", index, 64, render=False, layout="free")
        assert len(grounded["vqa"]) == len(plain["vqa"])
        for g, p in zip(grounded["vqa"], plain["vqa"], strict=True):
            assert {k: v for k, v in g.items() if not k.startswith("evidence_")} == p
            VQA.validate(g)
            boxes_of_scene = [o.box for o in scene.objects]
            assert all(box in boxes_of_scene for box in g["evidence_boxes"])
            kind = g["question_type"]
            if kind in ("relation", "relation choice"):
                assert len(g["evidence_phrases"]) == 2
                assert g["question"].startswith(f"is the {g['evidence_phrases'][0]} ")
                assert g["question"].endswith(f" the {g['evidence_phrases'][1]}?")
            elif kind == "how many":
                assert len(g["evidence_boxes"]) == int(most_common_answer(g["answers"]))
            elif kind == "is there a":
                assert bool(g["evidence_boxes"]) == (most_common_answer(g["answers"]) == "yes")
            else:  # colour, shape, position: the one object named
                assert len(g["evidence_phrases"]) == 1 and f"the {g['evidence_phrases'][0]}" in g["question"]
        # Every other task's records are unchanged.
        assert {t: r for t, r in grounded.items() if t != "vqa"} == {t: r for t, r in plain.items() if t != "vqa"}


def test_a_stored_world_with_evidence_reads_back_and_the_prior_skips_its_grounded_records(tmp_path):
    from unified_vl.app.jobs.common import answer_prior_of

    data = tmp_path / "data"
    manifest = synth.generate(
        str(data), num_images=3, num_eval_images=1, image_size=32, layout="free", vqa_evidence=True, log=lambda *a: None
    )
    assert manifest["synth"]["vqa_evidence"] is True
    vqa = storage.load_split(data, "vqa", "train")
    first = vqa[0]
    assert first["evidence_phrases"] is not None and len(first["evidence_phrases"]) == len(first["evidence_boxes"])
    assert VQA.target(dict(first)).endswith(f"{ANSWER_MARKER} {most_common_answer(first['answers'])}")
    prior = answer_prior_of({"vqa": vqa})
    assert all(prior("vqa", i) is None for i in range(len(vqa)))
    # A world written without it has no such column; its records keep plain targets and get the prior.
    plain = tmp_path / "plain"
    synth.generate(str(plain), num_images=3, num_eval_images=1, image_size=32, layout="free", log=lambda *a: None)
    plain_vqa = storage.load_split(plain, "vqa", "train")
    assert plain_vqa[0].get("evidence_phrases") is None
    assert VQA.target(dict(plain_vqa[0])) == most_common_answer(plain_vqa[0]["answers"])
    assert answer_prior_of({"vqa": plain_vqa})("vqa", 0) is not None


def test_answer_weight_weighs_the_tokens_after_the_marker_in_the_loss_and_the_count(processor):
    import torch

    from unified_vl.engine.config import ConfigError
    from unified_vl.engine.trainer import answer_marker_ids, answer_token_weights, token_losses

    r = record(evidence_phrases=["red circle"], evidence_boxes=[[0, 0, 16, 16]])
    targets = [VQA.target(r), VQA.target(record()), "a caption without the marker"]
    labels = processor.tokenizer(targets, padding=True, return_tensors="pt").input_ids
    lengths = (labels != processor.tokenizer.pad_token_id).sum(1)
    labels[labels == processor.tokenizer.pad_token_id] = -100
    marker = answer_marker_ids(processor.tokenizer, {"vqa": ANSWER_MARKER})["vqa"]
    assert processor.tokenizer.decode(marker) == ANSWER_MARKER
    with pytest.raises(ConfigError, match="train.answer_weight weighs the answer after a task's answer marker, but no"):
        answer_marker_ids(processor.tokenizer, {})  # no trained task writes one (classification alone)
    weights = answer_token_weights(labels, marker, 8.0)
    # The evidence target: its phrase, four location tokens, ";" and the marker weigh 1, then "yes" and
    # the end of the sequence 8; the target without evidence and the caption weigh 1 throughout.
    answer = len(processor.tokenizer("yes").input_ids)  # "yes" and </s>
    n = int(lengths[0])
    assert weights[0, : n - answer].tolist() == [1.0] * (n - answer)
    assert weights[0, n - answer : n].tolist() == [8.0] * answer
    assert (weights[1:] == 1).all()
    # Rows not marked (another task's target that holds the marker) weigh 1 throughout.
    assert (answer_token_weights(labels, marker, 8.0, torch.tensor([False, True, True])) == 1).all()

    torch.manual_seed(0)
    logits = torch.randn(*labels.shape, int(labels.max()) + 1)
    weighted, count = token_losses(logits, labels, answer_weight=(marker, 8.0))
    plain, plain_count = token_losses(logits, labels)
    mask = labels != -100
    nll = -logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask
    w = answer_token_weights(labels, marker, 8.0)
    torch.testing.assert_close(weighted, (nll * w).sum(1))
    torch.testing.assert_close(count, (mask * w).sum(1))
    assert count[0] == plain_count[0] + 7 * answer
    torch.testing.assert_close(weighted[1:], plain[1:])
