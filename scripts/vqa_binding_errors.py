"""What a run's wrong colours and shapes of a named object are, on the synthetic world, from its predictions.

    python scripts/vqa_binding_errors.py RUN [RUN ...] --data DATA_DIR --split test heldout --out X.md

Reads ``RUN/predictions/{split}.jsonl`` (what `unified-vl pretrain` writes at the end; no model is
loaded), the world's VQA records and its detection records of the same pictures (a VQA record
``test-000012-q3`` asks about the picture of detection record ``test-000012``; each object's label
is "colour shape"). For the questions "what color is the ..." and "what shape is the ...", a miss is
*another object's* when the answer given is the colour (shape) of some object in the picture, and
*not in the picture* otherwise: the first is a failure to bind the question's phrase to its object
(the model read a colour it saw, from the wrong object), the second a failure to see. Prints, per run
and split, the questions' accuracy and the two kinds of misses as shares of the questions; ``--out``
writes the table, and the numbers as JSON beside it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

# The world's question types about one named object's attribute, and which word of an object's label answers each.
ATTRIBUTE_QUESTIONS = {"what color is the": 0, "what shape is the": -1}


def score(predictions: Mapping[str, str | None], records: Sequence[Mapping], objects: Mapping[str, Sequence]) -> dict:
    """Accuracy and the two kinds of misses, as shares of the attribute questions.

    Args:
        predictions: VQA record id -> the parsed prediction.
        records: the split's VQA records (``id``, ``question_type``, ``answers``).
        objects: picture id -> its detection objects (``label``: "colour shape").
    """
    from tasks.vqa import most_common_answer

    counts = {"right": 0, "another object's": 0, "not in the picture": 0}
    for record in records:
        word = ATTRIBUTE_QUESTIONS.get(record.get("question_type"))
        if word is None:
            continue
        if record["id"] not in predictions:
            raise SystemExit(f"record {record['id']!r}: no prediction for it in the predictions file")
        picture = record["id"].rsplit("-q", 1)[0]
        if picture not in objects:
            raise SystemExit(f"record {record['id']!r}: no detection record {picture!r} for its picture")
        prediction, gold = predictions[record["id"]], most_common_answer(record["answers"])
        seen = {obj["label"].split()[word] for obj in objects[picture]}
        if prediction == gold:
            counts["right"] += 1
        else:
            counts["another object's" if prediction in seen else "not in the picture"] += 1
    total = sum(counts.values())
    return {"questions": total, **{k: v / total if total else float("nan") for k, v in counts.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders (each with predictions/{split}.jsonl)")
    parser.add_argument("--data", required=True, help="the synthetic world the runs were scored on")
    parser.add_argument("--split", nargs="+", default=["test"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from benchlib import markdown_table, report, run_predictions

    from data_tools import storage

    def split_data(split: str) -> tuple[list[dict], dict[str, list]]:
        vqa = storage.load_split(args.data, "vqa", split).select_columns(["id", "question_type", "answers"])
        detection = storage.load_split(args.data, "detection", split).select_columns(["id", "objects"])
        return list(vqa), {row["id"]: row["objects"] for row in detection}

    splits = {split: split_data(split) for split in args.split}
    rows, data = [], {}
    for run in args.runs:
        for split, (records, objects) in splits.items():
            predictions = run_predictions(run, split, "vqa")
            scores = score(predictions, records, objects)
            data[f"{run}:{split}"] = scores
            rows.append([run, split, scores["questions"], *(f"{scores[k]:.3f}" for k in list(scores)[1:])])
    headers = ["run", "split", "colour / shape questions", "right", "another object's", "not in the picture"]
    report(args.out, markdown_table(headers, rows), data)


if __name__ == "__main__":
    main()
