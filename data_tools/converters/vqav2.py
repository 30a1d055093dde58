"""VQAv2 (Goyal et al., 2017): questions + annotations JSON -> ``vqa`` records.

Official files (visualqa.org/download.html)::

    v2_OpenEnded_mscoco_train2014_questions.json
        {"data_subtype": "train2014", "questions": [{"image_id", "question", "question_id"}], ...}
    v2_mscoco_train2014_annotations.json
        {"data_subtype": "train2014", "annotations": [{"question_id", "image_id",
         "answers": [{"answer", "answer_confidence", "answer_id"}] x 10, "multiple_choice_answer",
         "answer_type", "question_type"}], ...}

Images are ``COCO_{data_subtype}_{image_id:012d}.jpg`` (found in ``--images`` or its
``{data_subtype}/`` subfolder). Questions and annotations files are told apart by their keys and
paired by ``data_subtype`` (``train2014`` -> split ``train``, ``val2014`` -> ``val``). One record per
question, in question-file order, with the 10 raw human answers (the VQA metric normalises them) and
``answer_type``/``question_type`` as given, and the source ids ``question_id`` and ``image_id`` (the
EvalAI results file keys on ``question_id``). Test questions have no public answers and are refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from data_tools.converters._common import (
    ConversionError,
    Pair,
    Report,
    find_image,
    images_per_input,
    load_json,
    missing_keys,
    source_id,
)

DESCRIPTION = "VQAv2 questions + annotations JSON -> vqa"
INPUTS = "--input v2_OpenEnded_mscoco_train2014_questions.json v2_mscoco_train2014_annotations.json [val pair]  --images FOLDER"

_SUBTYPE_IN_NAME = re.compile(r"((?:train|val|test-dev|test)20\d\d)")


def _subtype(data: dict, path: Path) -> str:
    subtype = data.get("data_subtype")
    if isinstance(subtype, str) and subtype:
        return subtype
    match = _SUBTYPE_IN_NAME.search(path.name)
    if match is None:
        raise ConversionError(f"{path}: no 'data_subtype' key and no train2014/val2014 in the file name")
    return match.group(1)


def _hashable(value: object) -> bool:
    # question_id is an integer in VQAv2; a list or an object from a broken file cannot key a lookup.
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def split_of(subtype: str) -> str:
    """``train2014`` -> ``train``, ``val2014`` -> ``val``."""
    return re.sub(r"20\d\d$", "", subtype)


def pair_files(inputs: Sequence[Path]) -> list[tuple[str, Path, dict, Path, dict]]:
    """``(subtype, questions_path, questions, annotations_path, annotations)`` per subtype."""
    questions: dict[str, tuple[Path, dict]] = {}
    annotations: dict[str, tuple[Path, dict]] = {}
    for path in inputs:
        data = load_json(path)
        if isinstance(data, dict) and "questions" in data:
            questions.setdefault(_subtype(data, path), (path, data))
        elif isinstance(data, dict) and "annotations" in data:
            annotations.setdefault(_subtype(data, path), (path, data))
        else:
            raise ConversionError(
                f"{path}: neither a VQAv2 questions file (key 'questions') nor an annotations file (key 'annotations')"
            )
    for subtype in sorted(set(questions) ^ set(annotations)):
        have, lack = ("questions", "annotations") if subtype in questions else ("annotations", "questions")
        path = (questions if subtype in questions else annotations)[subtype][0]
        raise ConversionError(
            f"{path}: {have} of {subtype} given without the matching {lack} file"
            + (" (test questions have no public answers)" if subtype.startswith("test") else "")
        )
    return [(s, *questions[s], *annotations[s]) for s in sorted(questions)]


def records(inputs: Sequence[Path], images: Sequence[Path], *, report: Report, split: str | None) -> Iterator[Pair]:
    """VQA records of every questions/annotations pair (see the module docstring)."""
    pairs = pair_files(inputs)
    if split and len(pairs) > 1:
        raise ConversionError(
            f"--split {split} would merge {len(pairs)} subsets ({', '.join(p[0] for p in pairs)}); convert them one at a time"
        )
    for (subtype, q_path, q_data, a_path, a_data), roots in zip(
        pairs, images_per_input(images, len(pairs), "vqav2"), strict=True
    ):
        if not isinstance(q_data["questions"], list) or not isinstance(a_data["annotations"], list):
            raise ConversionError(f"{q_path} / {a_path}: 'questions' and 'annotations' must be lists")
        by_question: dict[object, tuple[int, dict]] = {}
        for k, ann in enumerate(a_data["annotations"]):
            if missing_keys(ann, ("question_id",)):
                report.bad(a_path, f"annotations[{k}]", "missing key 'question_id'")
                continue
            if not _hashable(ann["question_id"]):
                report.bad(a_path, f"annotations[{k}]", f"question_id must be a number, got {ann['question_id']!r}")
                continue
            if ann["question_id"] in by_question:  # which of the two holds the right answers is unknown
                first = by_question[ann["question_id"]][0]
                report.bad(
                    a_path,
                    f"annotations[{k}]",
                    f"duplicate question_id {ann['question_id']} (first: annotations[{first}])",
                )
                continue
            by_question[ann["question_id"]] = (k, ann)
        split_name = split or split_of(subtype)
        seen: dict[object, int] = {}  # question_id -> index of its first question
        for k, q in enumerate(q_data["questions"]):
            name = f"questions[{k}]" + (
                f" (question_id={q['question_id']})" if isinstance(q, dict) and "question_id" in q else ""
            )
            lacking = missing_keys(q, ("image_id", "question", "question_id"))
            if lacking:
                report.bad(q_path, name, f"missing key(s) {lacking}")
                continue
            if not _hashable(q["question_id"]):
                report.bad(q_path, name, f"question_id must be a number, got {q['question_id']!r}")
                continue
            if q["question_id"] in seen:
                report.bad(q_path, name, f"duplicate question_id (first: questions[{seen[q['question_id']]}])")
                continue
            seen[q["question_id"]] = k
            if not isinstance(q["question"], str) or not q["question"].strip():
                report.bad(q_path, name, f"empty question {q['question']!r}")
                continue
            _, ann = by_question.get(q["question_id"], (None, None))
            if ann is None:
                report.bad(a_path, name, f"no annotation for question_id {q['question_id']}")
                continue
            lacking = missing_keys(ann, ("answers", "answer_type"))
            if lacking:
                report.bad(a_path, f"annotation of question_id {q['question_id']}", f"missing key(s) {lacking}")
                continue
            answers = (
                [a.get("answer") if isinstance(a, dict) else None for a in ann["answers"]]
                if isinstance(ann["answers"], list)
                else None
            )
            if not answers or any(not isinstance(a, str) or not a.strip() for a in answers):
                report.bad(
                    a_path,
                    f"annotation of question_id {q['question_id']}",
                    f"answers must be a non-empty list of {{'answer': text}}, got {ann['answers']!r}",
                )
                continue
            if not isinstance(q["image_id"], int):
                report.bad(q_path, name, f"image_id must be an integer, got {q['image_id']!r}")
                continue
            file = find_image(roots, f"COCO_{subtype}_{q['image_id']:012d}.jpg", subtype)
            size = report.image(file, file=q_path, record=name)
            if size is None:
                continue
            record = {
                "id": str(q["question_id"]),
                "image": str(file),
                "width": size[0],
                "height": size[1],
                "question": " ".join(q["question"].split()),
                "answers": answers,
                "answer_type": ann["answer_type"],
                "question_type": ann.get("question_type"),
                "question_id": source_id(q["question_id"]),
                "image_id": q["image_id"],
            }
            if report.valid("vqa", record, file=a_path, name=name):
                yield ("vqa", split_name), record
