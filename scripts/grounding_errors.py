"""What a run's phrase-grounding misses are, from the predictions its final evaluation wrote.

    python scripts/grounding_errors.py RUN [RUN ...] --split test heldout --out X.md

Reads ``RUN/predictions/{split}.jsonl`` (what `unified-vl pretrain` writes at the end; no model is
loaded) and sorts every gold phrase of the grounding task's phrase records, matched to the output
as the task's metric matches them (``tasks.grounding.match_phrases``), into: boxed right (IoU >= 0.5,
what ``phrase_acc@0.5`` counts), boxed as another object of the same record (IoU >= 0.5 with another
gold phrase's box: the phrase went to the wrong object), boxed elsewhere, and not written. Also the
order the output listed the phrases in, on records with two or more phrases all written: the
record's (the caption's) order, or reading order (box centre, top to bottom, then left to right:
``data.target_order=position``). Prints a Markdown table; ``--out`` writes it, and the numbers as
JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

KINDS = ("right", "another object", "elsewhere", "not written")


def classify(prediction, phrases: list[str], gold_boxes: list[list[float]]) -> tuple[list[str], list[int] | None]:
    """Each gold phrase's kind, and the order the output wrote the gold phrases in (None: not all written)."""
    from tasks import boxes
    from tasks.grounding import IOU_THRESHOLD, match_phrases, valid_items

    items = valid_items(prediction)
    matched = match_phrases(phrases, items)
    kinds = []
    for g, p in enumerate(matched):
        if p is None:
            kinds.append("not written")
        elif boxes.iou(items[p][1], gold_boxes[g]) >= IOU_THRESHOLD:
            kinds.append("right")
        elif any(boxes.iou(items[p][1], b) >= IOU_THRESHOLD for k, b in enumerate(gold_boxes) if k != g):
            kinds.append("another object")
        else:
            kinds.append("elsewhere")
    if any(p is None for p in matched):
        return kinds, None
    return kinds, sorted(range(len(phrases)), key=lambda g: matched[g])


def reading_order(gold_boxes: list[list[float]]) -> list[int]:
    from tasks import boxes

    return sorted(range(len(gold_boxes)), key=lambda g: boxes.reading_order_key(gold_boxes[g]))


def score_file(path: Path) -> dict[str, float]:
    """Shares of gold phrases per kind, and of multi-phrase records per order, in one predictions file."""
    kinds, orders = Counter(), Counter()
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        row = json.loads(line)
        if row.get("task") != "grounding" or not isinstance(row.get("gold"), list):
            continue  # other tasks, and grounded-captioning records (a description, no boxes)
        try:
            phrases = [phrase for phrase, _ in row["gold"]]
            gold_boxes = [list(box) for _, box in row["gold"]]
        except (TypeError, ValueError) as e:
            raise SystemExit(f"{path}:{line_number}: gold must be a list of [phrase, box] pairs ({e})") from e
        row_kinds, order = classify(row.get("prediction"), phrases, gold_boxes)
        kinds.update(row_kinds)
        if order is not None and len(phrases) > 1:
            orders["records"] += 1
            orders["record order"] += order == list(range(len(phrases)))
            orders["reading order"] += order == reading_order(gold_boxes)
    total = sum(kinds.values())
    if not total:
        raise SystemExit(f"{path}: no grounding phrase records")
    result = {kind: kinds[kind] / total for kind in KINDS}
    result["phrases"] = total
    for key in ("record order", "reading order"):
        result[key] = orders[key] / orders["records"] if orders["records"] else float("nan")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders (each with predictions/{split}.jsonl)")
    parser.add_argument("--split", nargs="+", default=["test"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from benchlib import markdown_table, report

    rows, data = [], {}
    for run in args.runs:
        for split in args.split:
            path = Path(run) / "predictions" / f"{split}.jsonl"
            if not path.is_file():
                raise SystemExit(f"{path}: no such predictions file (a run writes it at its final evaluation)")
            scores = score_file(path)
            data[f"{run}:{split}"] = scores
            rows.append(
                [
                    run,
                    split,
                    scores["phrases"],
                    *(f"{scores[k]:.3f}" for k in KINDS),
                    f"{scores['record order']:.2f}",
                    f"{scores['reading order']:.2f}",
                ]
            )
    headers = ["run", "split", "gold phrases", *KINDS, "written in record order", "in reading order"]
    report(args.out, markdown_table(headers, rows), data)


if __name__ == "__main__":
    main()
