"""Which test images each side of the learning benchmark gets wrong, image by image.

    python scripts/classification_misses.py --data DIR --ours RUN [RUN ...] --baseline B.json [B.json ...] --out X.md

Reads our runs' ``RUN/predictions/test.jsonl`` (what `unified-vl pretrain` writes at the end) and the
baseline's result files (``python -m unified_vl.app.baselines ... --out B.json``; the learning
benchmark keeps each as ``<row>-seed<S>-<time>.baseline.json`` under ``--work``'s ``runs/``), both
keyed by test record id; the gold labels come from the data folder's classification test split. No
model is loaded. Prints, per side, each run's misses and the images missed by every run of that
side, and how the two sides' misses overlap: whether a side's steady misses are images the other
side also misses (hard images) or reads right (that side's own blind spots). ``--out`` writes the
Markdown, and the per-image misses as JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def gold_labels(data: str) -> dict[str, str]:
    """Test record id -> label, from the data folder's classification test split."""
    from data_tools import storage

    split = storage.load_split(data, "classification", "test", decode_images=False)
    return dict(zip(split["id"], split["label"], strict=True))


def _check_ids(predicted: dict[str, str], gold: dict[str, str], where: str) -> None:
    missing, unknown = sorted(set(gold) - set(predicted)), sorted(set(predicted) - set(gold))
    if missing or unknown:
        raise ValueError(
            f"{where}: its predictions do not cover the data's test split "
            f"({len(missing)} test ids without a prediction, e.g. {missing[:3]}; "
            f"{len(unknown)} ids not in the split, e.g. {unknown[:3]}); was it run on another data folder?"
        )


def ours_predictions(run: Path) -> dict[str, str | None]:
    """Test record id -> the label our run predicted (its ``predictions/test.jsonl``)."""
    path = run / "predictions" / "test.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no test predictions; is {run} a finished `unified-vl pretrain` run?")
    out = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        row = json.loads(line)
        if row.get("task") == "classification":
            if "id" not in row or "prediction" not in row:
                raise ValueError(f"{path} line {number}: expected 'id' and 'prediction' fields, got {sorted(row)}")
            out[str(row["id"])] = row["prediction"]
    return out


def baseline_predictions(path: Path) -> dict[str, str | None]:
    """Test record id -> the label the baseline predicted (its result file's ``test_predictions``)."""
    import tasks

    result = json.loads(path.read_text())
    texts = result.get("test_predictions")
    if not texts:
        raise ValueError(
            f"{path}: no 'test_predictions' (baseline results written before they were kept); run the baseline again"
        )
    task = tasks.get_task("classification")
    return {str(k): task.parse(v, {}) for k, v in texts.items()}


def misses(predicted: dict[str, str | None], gold: dict[str, str]) -> set[str]:
    return {k for k, label in gold.items() if predicted.get(k) != label}


def compare(gold: dict[str, str], sides: dict[str, list[tuple[str, dict[str, str | None]]]]) -> dict:
    """Per side: each run's misses, the images every run missed, and their overlap with the other side."""
    report: dict = {"images": len(gold), "sides": {}}
    for side, runs in sides.items():
        per_run = {name: sorted(misses(p, gold)) for name, p in runs}
        every = set.intersection(*(set(m) for m in per_run.values()))
        some = set.union(*(set(m) for m in per_run.values()))
        report["sides"][side] = {"runs": per_run, "every_run": sorted(every), "some_run": sorted(some)}
    names = list(sides)
    for side in names:
        other = next(n for n in names if n != side)
        mine, theirs = report["sides"][side], report["sides"][other]
        mine["steady_also_missed_by_other"] = {
            "every_run": sorted(set(mine["every_run"]) & set(theirs["every_run"])),
            "some_run": sorted(set(mine["every_run"]) & set(theirs["some_run"])),
        }
    report["predicted"] = {
        side: {k: [p.get(k) for _, p in runs] for k in report["sides"][side]["some_run"]}
        for side, runs in sides.items()
    }
    return report


def markdown(report: dict, gold: dict[str, str], sides: dict[str, list]) -> str:
    lines = [
        f"{report['images']} test images",
        "",
        "| side | misses per run | missed by every run | of those, missed by every run of the other side | by some run of it |",
        "|---|---|---|---|---|",
    ]
    for side, entry in report["sides"].items():
        per_run = ", ".join(str(len(m)) for m in entry["runs"].values())
        steady = entry["steady_also_missed_by_other"]
        lines.append(
            f"| {side} | {per_run} | {len(entry['every_run'])} | {len(steady['every_run'])} | {len(steady['some_run'])} |"
        )
    lines += ["", "| image | gold | " + " | ".join(sides) + " |", "|---|---|" + "---|" * len(sides)]
    steady = sorted(set().union(*(set(e["every_run"]) for e in report["sides"].values())))
    for k in steady:
        cells = [", ".join(str(p.get(k)) for _, p in runs) for runs in sides.values()]
        lines.append(f"| {k} | {gold[k]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from unified_vl.checkpoint import atomic_write_text

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the classification data folder both sides ran on")
    parser.add_argument("--ours", nargs="+", required=True, type=Path, help="our run folders")
    parser.add_argument("--baseline", nargs="+", required=True, type=Path, help="the baseline's result files")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown here (and .json beside it)")
    args = parser.parse_args(argv)
    for flag, paths in (("--ours", args.ours), ("--baseline", args.baseline)):
        twice = sorted({str(p) for p in paths if paths.count(p) > 1})
        if twice:
            parser.error(f"{flag} names {', '.join(twice)} more than once; give each run once")
    gold = gold_labels(args.data)
    sides = {"ours": [], "baseline": []}
    for run in args.ours:
        predicted = ours_predictions(run)
        _check_ids(predicted, gold, str(run))
        sides["ours"].append((str(run), predicted))
    for path in args.baseline:
        predicted = baseline_predictions(path)
        _check_ids(predicted, gold, str(path))
        sides["baseline"].append((str(path), predicted))
    report = compare(gold, sides)
    text = markdown(report, gold, sides)
    print(text, end="")
    if args.out:
        atomic_write_text(args.out, text)
        atomic_write_text(args.out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
