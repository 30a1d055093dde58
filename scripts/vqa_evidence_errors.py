"""Whether a run's grounded evidence was right, and what it answered when it was, per question type.

    python scripts/vqa_evidence_errors.py RUN [RUN ...] --data DATA_DIR --split test --out X.md

For data whose VQA records carry grounded evidence (``unified-vl data synth --vqa-evidence``: the objects a
question names, with their boxes; the target writes them before ``answer: ...``). Reads
``RUN/predictions/{split}.jsonl`` (what `unified-vl pretrain` writes at the end; no model is loaded) and
the split's VQA records. Per question type: the accuracy (the official VQA metric, as evaluation scores
it); the share of questions whose written evidence is right (as many items as the record's evidence,
each box at IoU >= 0.5 with the gold box in the same place; the phrases are not compared); the accuracy
on those and on the rest; and, for the relation questions (two objects named), the share whose two
written boxes' centres are in the gold boxes' order along the pair's dominant axis (what a relation's
answer depends on, whatever the boxes' sizes). ``--out`` writes the table, and the numbers as JSON beside it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path


def _centre(box: Sequence[float]) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def order_right(gold: Sequence[Sequence[float]], written: Sequence[Sequence[float]]) -> bool:
    """Whether two written boxes' centres are in the two gold boxes' order along the gold pair's dominant axis
    (the axis of the larger centre distance, as the world's relations are drawn: data_tools.synth.relation)."""
    (gx0, gy0), (gx1, gy1) = _centre(gold[0]), _centre(gold[1])
    (wx0, wy0), (wx1, wy1) = _centre(written[0]), _centre(written[1])
    if abs(gx1 - gx0) >= abs(gy1 - gy0):
        return (gx1 - gx0) * (wx1 - wx0) > 0
    return (gy1 - gy0) * (wy1 - wy0) > 0


def score(outputs: Mapping[str, tuple[str, str | None]], records: Sequence[Mapping]) -> dict[str, dict]:
    """Per question type: accuracy, evidence right, accuracy with and without it, pair order right.

    Args:
        outputs: VQA record id -> (the generated text, the parsed answer).
        records: the split's VQA records (``id``, ``question_type``, ``answers``, ``width``, ``height``,
            ``evidence_phrases``, ``evidence_boxes``).
    """
    from tasks._common import parse_labelled_boxes
    from tasks.boxes import iou
    from tasks.vqa import ANSWER_MARKER, evidence_of, vqa_accuracy
    from unified_vl.app.baselines import RELATION_QUESTION_TYPES

    sums: dict[str, dict[str, float]] = {}
    for record in records:
        evidence = evidence_of(record)
        if evidence is None:
            raise SystemExit(f"record {record['id']!r}: no evidence (data written with --vqa-evidence has it)")
        if record["id"] not in outputs:
            raise SystemExit(f"record {record['id']!r}: no prediction for it in the predictions file")
        text, answer = outputs[record["id"]]
        head = text.rpartition(ANSWER_MARKER)[0]
        written = [box for _, box in parse_labelled_boxes(head, record["width"], record["height"]) or []]
        gold = [box for _, box in evidence]
        right = len(written) == len(gold) and all(iou(g, w) >= 0.5 for g, w in zip(gold, written, strict=True))
        accuracy = vqa_accuracy(answer, record["answers"])
        s = sums.setdefault(
            record.get("question_type") or "", dict.fromkeys(("n", "acc", "right", "acc_right", "pairs", "order"), 0.0)
        )
        s["n"] += 1
        s["acc"] += accuracy
        s["right"] += right
        s["acc_right"] += accuracy if right else 0.0
        if record.get("question_type") in RELATION_QUESTION_TYPES and len(gold) == 2:
            s["pairs"] += 1
            s["order"] += len(written) == 2 and order_right(gold, written)
    out = {}
    for kind, s in sorted(sums.items()):
        wrong = s["n"] - s["right"]
        out[kind] = {
            "questions": int(s["n"]),
            "accuracy": s["acc"] / s["n"],
            "evidence right": s["right"] / s["n"],
            "accuracy, evidence right": s["acc_right"] / s["right"] if s["right"] else None,
            "accuracy, evidence wrong": (s["acc"] - s["acc_right"]) / wrong if wrong else None,
            "pair order right": s["order"] / s["pairs"] if s["pairs"] else None,
        }
    return out


def _outputs(run: str, split: str) -> dict[str, tuple[str, str | None]]:
    from benchlib import prediction_rows

    return {row["id"]: (row.get("text") or "", row.get("prediction")) for row in prediction_rows(run, split, "vqa")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders (each with predictions/{split}.jsonl)")
    parser.add_argument("--data", required=True, help="the data folder the runs were scored on (VQA with evidence)")
    parser.add_argument("--split", nargs="+", default=["test"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from benchlib import markdown_table, report

    from data_tools import storage

    columns = ["id", "question_type", "answers", "width", "height", "evidence_phrases", "evidence_boxes"]
    splits = {split: list(storage.load_split(args.data, "vqa", split).select_columns(columns)) for split in args.split}
    rows, data = [], {}
    for run in args.runs:
        for split, records in splits.items():
            scores = score(_outputs(run, split), records)
            data[f"{run}:{split}"] = scores
            for kind, s in scores.items():
                cells = [f"{v:.3f}" if isinstance(v, float) else "-" if v is None else v for v in s.values()]
                rows.append([run, split, kind, *cells])
    headers = ["run", "split", "question type", "questions", "accuracy", "evidence right", "accuracy, evidence right"]
    headers += ["accuracy, evidence wrong", "pair order right"]
    report(args.out, markdown_table(headers, rows), data)


if __name__ == "__main__":
    main()
