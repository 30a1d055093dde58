"""VQA accuracy on questions whose answer never followed them in training, from a run's predictions.

    python scripts/vqa_unseen_answers.py RUN [RUN ...] --data DATA_DIR --split test heldout --out X.md

Reads ``RUN/predictions/{split}.jsonl`` (what `unified-vl pretrain` writes at the end; no model is
loaded) and the data folder's VQA records. A question's target answer is *unseen after it* when no
training record with the same question (compared as `tasks.vqa.QuestionPrior` compares them) has
that target: on the synthetic world's heldout split, "what color is the circle?" about a red circle
(red circles never occur in training). Prints, per run and split, the official VQA accuracy of those
questions and of the others, and the share of the unseen ones' misses that gave an answer which did
follow the question in training (what a learnt question prior would answer). ``--out`` writes the
table, and the numbers as JSON beside it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path


def score(predictions: Mapping[str, str | None], records: Sequence[Mapping], seen: Mapping[str, set]) -> dict:
    """Counts and accuracies of the unseen-after-their-question records and of the rest.

    Args:
        predictions: record id -> the parsed prediction.
        records: the split's VQA records (``id``, ``question``, ``answers``).
        seen: question key -> the targets that followed it in training.
    """
    from tasks.vqa import QuestionPrior, most_common_answer, vqa_accuracy

    groups = {"unseen": [], "seen": []}
    prior_answers = 0
    for record in records:
        if record["id"] not in predictions:
            raise SystemExit(f"record {record['id']!r}: no prediction for it in the predictions file")
        prediction = predictions[record["id"]]
        followed = seen.get(QuestionPrior.key(record["question"]), set())
        group = "seen" if most_common_answer(record["answers"]) in followed else "unseen"
        accuracy = vqa_accuracy(prediction, record["answers"])
        groups[group].append(accuracy)
        prior_answers += group == "unseen" and accuracy < 1 and prediction in followed
    out = {}
    for group, accuracies in groups.items():
        out[f"{group} questions"] = len(accuracies)
        out[f"{group} accuracy"] = sum(accuracies) / len(accuracies) if accuracies else float("nan")
    misses = sum(1 for a in groups["unseen"] if a < 1)
    out["unseen misses answered as after training"] = prior_answers / misses if misses else float("nan")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders (each with predictions/{split}.jsonl)")
    parser.add_argument("--data", required=True, help="the data folder the runs trained and were scored on")
    parser.add_argument("--split", nargs="+", default=["heldout"])
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from benchlib import markdown_table, report, run_predictions

    from data_tools import storage
    from tasks.vqa import QuestionPrior

    def records(split: str) -> list[dict]:
        ds = storage.load_split(args.data, "vqa", split).select_columns(["id", "question", "answers"])
        return list(ds)

    # The prior's own per-question counts: the targets that followed each question in training.
    seen = {key: set(counts) for key, counts in QuestionPrior(records(args.train_split)).by_question.items()}
    splits = {split: records(split) for split in args.split}
    rows, data = [], {}
    for run in args.runs:
        for split, split_records in splits.items():
            predictions = run_predictions(run, split, "vqa")
            scores = score(predictions, split_records, seen)
            data[f"{run}:{split}"] = scores
            rows.append(
                [
                    run,
                    split,
                    scores["unseen questions"],
                    f"{scores['unseen accuracy']:.3f}",
                    f"{scores['unseen misses answered as after training']:.2f}",
                    scores["seen questions"],
                    f"{scores['seen accuracy']:.3f}",
                ]
            )
    headers = ["run", "split", "unseen after the question", "accuracy", "misses answered as after training"]
    report(args.out, markdown_table([*headers, "the other questions", "accuracy"], rows), data)


if __name__ == "__main__":
    main()
