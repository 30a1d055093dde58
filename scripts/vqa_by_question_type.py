"""VQA accuracy of a model folder per question type, on stored splits (e.g. the free layout's relations).

    python scripts/vqa_by_question_type.py --model RUN/model --data DATA_DIR --split test heldout --out X.md

``--max-examples N`` scores each split's first N records (how well a run fits its own train split, say).

The task's own metric (official VQAv2 accuracy, ``tasks/vqa.py``) per ``question_type`` of the
records, as the official evaluation's ``perQuestionType``; the free layout's two relation forms
(``relation``, ``relation choice``) also as their mean. Prints a Markdown table; ``--out`` writes
it, and the numbers as JSON beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model folder (a run's model/)")
    parser.add_argument("--data", required=True, help="a data folder with a vqa task")
    parser.add_argument("--split", nargs="+", default=["test"])
    parser.add_argument("--max-examples", type=int, default=None, help="each split's first N records (default: all)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from benchlib import machine_line, markdown_table, report

    from unified_vl.app.baselines import RELATION_QUESTION_TYPES, model_accuracy_by_question_type

    by_split = {
        split: model_accuracy_by_question_type(args.model, args.data, split, args.max_examples) for split in args.split
    }
    for accuracies in by_split.values():
        relations = [accuracies[t] for t in RELATION_QUESTION_TYPES if t in accuracies]
        if relations:
            accuracies["relations (both forms, mean)"] = sum(relations) / len(relations)
    types = sorted({t for accuracies in by_split.values() for t in accuracies})
    rows = [[t, *(f"{by_split[s][t]:.3f}" if t in by_split[s] else "-" for s in args.split)] for t in types]
    table = markdown_table(["question type", *args.split], rows)
    report(args.out, f"{machine_line()}\nmodel {args.model}, data {args.data}\n\n{table}", {"accuracy": by_split})


if __name__ == "__main__":
    main()
