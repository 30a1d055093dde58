"""Phrase grounding of a model folder with open decoding and with the phrase-span decoding, per split.

    python scripts/grounding_decoding.py --model RUN/model --data DATA_DIR --split test heldout --out X.md

For each split, the phrase records of the grounding task (grounded-captioning records decode the
same way under both) are generated twice from one loaded model: ``decoding="open"`` (free text,
what evaluation used before) and ``decoding="phrases"`` (each phrase a run of the caption's words
in the caption's order, ``PhraseSpanLogitsProcessor``: the task's decoding now). Printed per split
and decoding: ``phrase_acc@0.5`` (the task's own metric), the share of gold phrases the output
wrote word for word, and the box accuracy on those. ``--out`` writes the table, and the numbers
as JSON beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DECODINGS = ("open", "phrases")


def score_split(model, processor, records: list[dict], *, decoding: str, batch_size: int) -> dict[str, float]:
    """phrase_acc@0.5, the share of gold phrases written exactly, and the accuracy on those."""
    import tasks
    from tasks import boxes
    from tasks._common import normalize_phrase
    from tasks.grounding import IOU_THRESHOLD, match_phrases, valid_items
    from unified_vl.app.jobs.common import record_images
    from unified_vl.generation import generate_texts

    task = tasks.get_task("grounding")
    texts = generate_texts(
        model,
        processor,
        [record_images(r) for r in records],
        [task.prompt(r) for r in records],
        decoding=decoding,
        sources=[task.source(r) for r in records] if decoding == "phrases" else None,
        batch_size=batch_size,
    )
    predictions = [
        task.parse(text, record) if text.strip() else None for text, record in zip(texts, records, strict=True)
    ]
    exact = exact_correct = total = 0
    for prediction, record in zip(predictions, records, strict=True):
        items = valid_items(prediction)  # the items the task's metric scores
        for g, p in enumerate(match_phrases(record["phrases"], items)):
            total += 1
            if p is not None and normalize_phrase(items[p][0]) == normalize_phrase(record["phrases"][g]):
                exact += 1
                exact_correct += boxes.iou(items[p][1], record["boxes"][g]) >= IOU_THRESHOLD
    metrics = task.evaluate(predictions, records)
    return {
        "phrase_acc@0.5": metrics["phrase_acc@0.5"],
        "phrases written exactly": exact / max(total, 1),
        "phrase_acc@0.5 on those": exact_correct / max(exact, 1),
        "phrases": total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model folder (a run's model/)")
    parser.add_argument("--data", required=True, help="a data folder with a grounding task")
    parser.add_argument("--split", nargs="+", default=["test"])
    parser.add_argument("--max-records", type=int, default=None, help="the first N phrase records per split")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from benchlib import machine_line, markdown_table, report

    from data_tools import storage
    from tasks.grounding import is_region_record
    from unified_vl.checkpoint import load_pretrained

    model, processor = load_pretrained(args.model)
    model.eval()
    results: dict[str, dict[str, dict[str, float]]] = {}
    for split in args.split:
        records = [r for r in storage.load_split(args.data, "grounding", split) if not is_region_record(r)]
        records = records[: args.max_records] if args.max_records else records
        if not records:
            raise SystemExit(f"{args.data}: the grounding task's {split} split has no phrase records")
        results[split] = {
            decoding: score_split(model, processor, records, decoding=decoding, batch_size=args.batch_size)
            for decoding in DECODINGS
        }
    keys = ["phrase_acc@0.5", "phrases written exactly", "phrase_acc@0.5 on those"]
    rows = [
        [split, decoding, *(f"{values[k]:.3f}" for k in keys), str(values["phrases"])]
        for split, by_decoding in results.items()
        for decoding, values in by_decoding.items()
    ]
    table = markdown_table(["split", "decoding", *keys, "gold phrases"], rows)
    report(args.out, f"{machine_line()}\nmodel {args.model}, data {args.data}\n\n{table}", results)


if __name__ == "__main__":
    main()
