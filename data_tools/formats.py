"""Official results formats: predictions lines (`data_tools.predictions`) -> the JSON the official tools read.

    vqav2           [{"question_id": int, "answer": str}]                      VQAv2 on EvalAI; the VQA API's loadRes
    coco_captions   [{"image_id": int, "caption": str}]                        pycocotools' loadRes + pycocoevalcap's COCOEvalCap
    coco_detection  [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}] pycocotools' loadRes + COCOeval
    refcoco         [{"ref_id": int, "sent_id": int, "bbox": [x, y, w, h] | null}]  one box per sentence

Each format reads the predictions of one task and the source ids that the converters keep on the
records (docs/records.md): a record without them is an error that names it. Formats follow the
official descriptions: VQA results (visualqa.org/evaluation, "Results Format"), COCO results
(cocodataset.org/#format-results); boxes are COCO's ``[x, y, width, height]`` in pixels.

Choices where the official tools leave room:

* an unparseable prediction is written as the empty answer or caption (EvalAI and COCOEvalCap want
  an entry for every question or image), as ``"bbox": null`` for RefCOCO, and as no boxes for detection;
* detection ``score`` is 1.0 for every box: text generation gives no per-box confidence, and with
  equal scores COCOeval ranks boxes as our ``map@0.5`` does (tasks/detection.py), so both agree;
* detection labels map to COCO category ids through the ``categories`` of a COCO annotation file
  (``instances_val2017.json``, or ``image_info_test-dev2017.json`` for test-dev), matched without
  case or extra spaces; boxes whose label is not a category are left out and counted;
* RefCOCO has no official results file or server; ours keys each sentence's box by ``ref_id`` and
  ``sent_id``, the refer API's ids (github.com/lichengunc/refer), with its ``[x, y, w, h]`` boxes.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_tools.predictions import PredictionsError, check_new_output, write_atomically


def _xywh(box: Sequence[float]) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def _is_box(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 4 and all(isinstance(v, (int, float)) for v in value)


def _text(prediction: Any) -> str:
    return prediction if isinstance(prediction, str) else ""


@dataclass(frozen=True)
class ResultsFormat:
    """One official results format.

    Attributes:
        name: the ``--format`` value.
        task: the task whose predictions it writes.
        source_ids: the record fields each entry is keyed by (a record without them is an error).
        entries: ``entries(line, categories, dropped) -> list of JSON objects`` for one line.
        description: one line for ``--help``.
    """

    name: str
    task: str
    source_ids: tuple[str, ...]
    entries: Callable[[Mapping[str, Any], Mapping[str, int] | None, Counter], list[dict]]
    description: str


def _vqav2(line, categories, dropped) -> list[dict]:
    return [{"question_id": line["question_id"], "answer": _text(line["prediction"])}]


def _coco_captions(line, categories, dropped) -> list[dict]:
    return [{"image_id": line["image_id"], "caption": _text(line["prediction"])}]


def _refcoco(line, categories, dropped) -> list[dict]:
    box = line["prediction"]
    return [{"ref_id": line["ref_id"], "sent_id": line["sent_id"], "bbox": _xywh(box) if _is_box(box) else None}]


def _coco_detection(line, categories, dropped) -> list[dict]:
    out = []
    for item in line["prediction"] or []:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str) and _is_box(item[1])):
            continue
        category = categories.get(_category_key(item[0]))
        if category is None:
            dropped[item[0]] += 1
            continue
        out.append({"image_id": line["image_id"], "category_id": category, "bbox": _xywh(item[1]), "score": 1.0})
    return out


FORMATS: dict[str, ResultsFormat] = {
    f.name: f
    for f in (
        ResultsFormat("vqav2", "vqa", ("question_id",), _vqav2, "VQAv2 results for EvalAI: [{question_id, answer}]"),
        ResultsFormat(
            "coco_captions", "captioning", ("image_id",), _coco_captions, "COCO caption results: [{image_id, caption}]"
        ),
        ResultsFormat(
            "coco_detection",
            "detection",
            ("image_id",),
            _coco_detection,
            "COCO detection results: [{image_id, category_id, bbox, score}] (needs --categories)",
        ),
        ResultsFormat("refcoco", "rec", ("ref_id", "sent_id"), _refcoco, "RefCOCO results: [{ref_id, sent_id, bbox}]"),
    )
}


def _category_key(name: str) -> str:
    return " ".join(name.split()).lower()


def load_categories(path: str | os.PathLike) -> dict[str, int]:
    """``{name: category id}`` from the ``categories`` of a COCO annotation file.

    Raises:
        PredictionsError: no such file, not JSON, no ``categories`` list, or a repeated name.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PredictionsError(f"--categories {path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PredictionsError(f"--categories {path}: not valid JSON ({exc})") from None
    items = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise PredictionsError(f"--categories {path}: expected a COCO annotation file with a 'categories' list")
    out: dict[str, int] = {}
    for k, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("id"), int) or not isinstance(item.get("name"), str):
            raise PredictionsError(f"--categories {path}: categories[{k}] must be {{'id': int, 'name': str}}")
        key = _category_key(item["name"])
        if key in out:
            raise PredictionsError(f"--categories {path}: category name {item['name']!r} appears twice")
        out[key] = item["id"]
    return out


def _check_lines(lines: Sequence[Mapping[str, Any]], fmt: ResultsFormat, source: str) -> list[Mapping[str, Any]]:
    """The lines of the format's task, each with its source ids, one split, no repeated key."""
    mine = [line for line in lines if line["task"] == fmt.task]
    if not mine:
        have = sorted({line["task"] for line in lines}) or ["nothing"]
        raise PredictionsError(f"{source} holds no {fmt.task} predictions for --format {fmt.name} (it has {have})")
    splits = sorted({str(line.get("split")) for line in mine})
    if len(splits) > 1:
        raise PredictionsError(
            f"{source}: {fmt.task} predictions of several splits ({splits}); write one split per file"
        )
    seen: dict[tuple, str] = {}
    for line in mine:
        for name in fmt.source_ids:
            value = line.get(name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise PredictionsError(
                    f"{source}: record {line['id']!r} has no {name!r} (got {value!r}); --format {fmt.name} keys on "
                    f"it. Convert the source data with `unified-vl data convert`, which keeps its ids, or give "
                    f"{name} in each request"
                )
        key = tuple(line[name] for name in fmt.source_ids)
        if key in seen:
            raise PredictionsError(
                f"{source}: records {seen[key]!r} and {line['id']!r} share {dict(zip(fmt.source_ids, key, strict=True))}; "
                f"--format {fmt.name} takes one prediction per id"
            )
        seen[key] = line["id"]
    return mine


def build_results(
    lines: Sequence[Mapping[str, Any]],
    format_name: str,
    *,
    categories: Mapping[str, int] | None = None,
    source: str = "the predictions",
) -> tuple[list[dict], Counter]:
    """The official results of ``lines`` and the count of detection boxes left out, by label.

    Args:
        lines: predictions lines (`data_tools.predictions.read_predictions`).
        format_name: a key of `FORMATS`.
        categories: for ``coco_detection``: ``{name: category id}`` (`load_categories`).
        source: what the lines came from, for messages.

    Raises:
        PredictionsError: unknown format, no predictions of its task, several splits, a record
            without a source id the format needs, two records with the same id, or
            ``coco_detection`` without categories.
    """
    if format_name not in FORMATS:
        raise PredictionsError(f"unknown --format {format_name!r}; formats: {', '.join(FORMATS)}")
    fmt = FORMATS[format_name]
    if fmt.name == "coco_detection" and not categories:
        raise PredictionsError(
            "--format coco_detection needs --categories FILE: a COCO annotation file whose 'categories' "
            "give each label its COCO category id"
        )
    dropped: Counter = Counter()
    results = [entry for line in _check_lines(lines, fmt, source) for entry in fmt.entries(line, categories, dropped)]
    return results, dropped


def check_inputs(format_name: str, lines: Sequence[Mapping[str, Any]], *, categories=None, source: str) -> None:
    """Fails before any prediction when the inputs cannot make the format's file (missing source
    ids, repeated ids, several splits): ``lines`` are the inputs' lines without predictions yet.

    Raises:
        PredictionsError: as :func:`build_results`.
    """
    stubs = [{**line, "text": "", "prediction": None, "score": None} for line in lines]
    build_results(stubs, format_name, categories=categories, source=source)


def write_results(path: str | os.PathLike, results: list[dict], *, overwrite: bool = False) -> Path:
    """Writes a results list as one JSON array, atomically; an existing file only with ``overwrite``."""

    def write(f) -> None:
        json.dump(results, f, ensure_ascii=False, allow_nan=False)
        f.write("\n")

    return write_atomically(check_new_output(path, overwrite=overwrite), write)
