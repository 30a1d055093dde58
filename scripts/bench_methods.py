"""The methods table: what each learned method trains, stores and costs, and how well it adapts.

    python scripts/bench_methods.py scripts/configs/bench_methods.yaml --base runs/main/model \\
        --data ~/.cache/unified-vl/synth-<hash> --out docs/results/methods.md
    # about 45 minutes on an idle 2-core machine; --quick runs the same pipeline in a few minutes
    # (2 steps, one seed, 8 test examples): a check that everything works, not a result

For every method of the config (full fine-tuning and the learned methods of ``unified_vl.prompting``)
and each task (VQA, classification, REC): fine-tune the base model ``--base`` (the main job's model)
for the same steps on the same data, at K = 16 shots and on the whole training split, for each
seed, through the real engine (``unified_vl.engine.trainer.train``), and score the first N test
examples with the task's metric. The first table gives per method: trainable parameters (count
and share of the model), the size of what a run saves (the adapter file; the model's weights for
full fine-tuning), the training time per step, and each metric as mean ± sample std over seeds.
The base model's own scores head it.

The second table is CoCoOp's base-to-new experiment (Zhou et al. 2022, Table 1) on our data: the
classes are the colour-shape names of each image's largest object, alternately split into base and
new; CoOp (``prompt_tuning``) and CoCoOp train on 16 images per base class; each is tested on the
base classes (candidates: the base names) and the new ones (candidates: the new names, never
trained on), with H their harmonic mean; the hand-written template is the base model as it is.

Runs are spread over ``--workers`` one-thread processes (two on a 2-core machine: torch on one
thread per process is fastest for a model this small). Prints both tables as Markdown, writes them
to ``--out`` and every run's numbers to ``--out`` with ``.json`` in place of its suffix.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import yaml

QUICK = {"steps": 2, "seeds": [0], "eval_examples": 8, "warmup_steps": 1}
QUICK_B2N = {"steps": 2, "shots_per_class": 2, "eval_examples": 8}
TASK_TITLES = {"vqa": "VQA", "classification": "classification", "rec": "REC"}
B2N = "base_to_new"


REQUIRED = ("steps", "batch_size", "warmup_steps", "seeds", "shots", "tasks", "eval_examples", "methods")


def load_settings(path: str | Path) -> dict:
    """The settings file, checked: every key there, every method registered with options it has.

    Raises:
        ValueError: a missing key, an unknown task or method, or a bad option (the message names it).
    """
    import tasks
    from unified_vl.prompting import MethodError, get_method

    settings = yaml.safe_load(Path(path).read_text())
    missing = [key for key in REQUIRED if key not in (settings or {})]
    if missing:
        raise ValueError(f"{path}: missing settings {missing}; a settings file has {', '.join(REQUIRED)}")
    unknown = [t for t in settings["tasks"] if t not in tasks.TASKS]
    if unknown:
        raise ValueError(f"{path}: unknown tasks {unknown}")
    b2n = settings.get("base_to_new") or {}
    for row, spec in [*settings["methods"].items(), *b2n.get("methods", {}).items()]:
        try:
            get_method(spec.get("method", row)).resolve_options(spec.get("options"))
        except MethodError as exc:
            raise ValueError(f"{path}: method row {row!r}: {exc}") from None
        if not isinstance(spec.get("lr"), (int, float)):
            raise ValueError(f"{path}: method row {row!r} needs a number 'lr', got {spec.get('lr')!r}")
    return settings


# -- data for base-to-new ----------------------------------------------------------------------
def _largest_object(objects: list[dict]) -> str:
    """The label (colour and shape) of the largest box: the synthetic world's image label, with its colour."""
    return max(objects, key=lambda o: (o["box"][2] - o["box"][0]) * (o["box"][3] - o["box"][1]))["label"]


def base_to_new_data(data_dir: str, out: Path) -> dict:
    """A classification data folder labelled by colour and shape, split into base and new classes (cached in ``out``).

    Classes are the labels seen in ``train``, sorted; even positions are base, odd ones new, so
    every colour and every shape word occurs on both sides and a new class is a new combination.
    Splits: ``train`` and ``val_base`` (base classes: training and choosing the learning rate),
    ``test_base``, ``test_new``.
    """
    from data_tools import storage

    manifest = out / storage.MANIFEST_NAME
    if manifest.is_file():
        return json.loads(manifest.read_text())["classes"]
    splits = {s: storage.load_split(data_dir, "detection", s, decode_images=False) for s in ("train", "val", "test")}
    labels = {s: [_largest_object(objects) for objects in ds["objects"]] for s, ds in splits.items()}
    names = sorted(set(labels["train"]))
    classes = {"base": names[0::2], "new": names[1::2]}

    def records(split: str, keep: list[str]):
        for record, label in zip(splits[split], labels[split], strict=True):
            if label in keep:
                image = {"id": record["id"], "image": record["image"]["bytes"], "width": record["width"]}
                yield {**image, "height": record["height"], "label": label}

    storage.write_dataset(
        out,
        {
            ("classification", "train"): records("train", classes["base"]),
            ("classification", "val_base"): records("val", classes["base"]),
            ("classification", "test_base"): records("test", classes["base"]),
            ("classification", "test_new"): records("test", classes["new"]),
        },
        source="scripts/bench_methods.py base-to-new",
        command=f"base_to_new_data({data_dir!r})",
        extra={"classes": classes, "label": "colour and shape of the largest object"},
    )
    return classes


# -- one run, in a worker process --------------------------------------------------------------
def _evaluator(data_dir: str, task: str, *, cap: int, own_candidates: bool):
    """The tasks' evaluation on the first ``cap`` examples of a split (candidates from that split itself when asked)."""
    from data_tools import storage
    from unified_vl.app.jobs.evaluate import TaskEvaluator

    class Capped(TaskEvaluator):
        # Every evaluation path (generate, score, kept predictions) reads its records here.
        def records(self, task, split, max_examples, **kwargs):
            return super().records(task, split, cap, **kwargs)

        def candidates(self, task_obj, split):
            if not own_candidates:
                return super().candidates(task_obj, split)
            records = storage.load_split(self.data_dir, task_obj.name, split, decode_images=False)
            return task_obj.candidates(records.remove_columns("image"))

    return Capped(data_dir, [task], batch_size=64)


def _config(job: dict, work: Path):
    from unified_vl.app.jobs.finetune import FINETUNE
    from unified_vl.engine.config import load_config

    options = yaml.safe_dump(job["options"], default_flow_style=True).strip()
    return load_config(
        None,
        [
            f"data.tasks={{{job['task']}: 1}}",
            f"data.path={job['data']}",
            f"data.shots={'null' if job.get('shots') is None else job['shots']}",
            f"model.init={job['base']}",
            f"method.name={job['method']}",
            f"method.options={options}",
            f"train.seed={job['seed']}",
            f"train.max_steps={job['steps']}",
            f"train.global_batch_size={job['batch_size']}",
            f"train.micro_batch_size={job['batch_size']}",
            "train.max_minutes=null",
            "train.num_threads=1",
            "train.local_processes=1",
            "train.log_every=1000",
            f"optim.lr={job['lr']}",
            f"optim.warmup_steps={job['warmup_steps']}",
            "eval.every=0",
            f"eval.final_splits=[{', '.join(job['splits'])}]",
            "checkpoint.every=0",
            "checkpoint.keep_last=1",
            f"output_dir={work / 'runs' / job['name']}",
        ],
        defaults=FINETUNE,
    )


def _per_class(dataset, shots: int, seed: int):
    """``shots`` examples of each label, drawn from the seed (CoOp's K shots per class)."""
    import numpy as np

    rng = np.random.default_rng([seed, 16])
    labels = np.array(dataset["label"])
    keep = [int(i) for label in sorted(set(labels)) for i in rng.choice(np.flatnonzero(labels == label), shots, False)]
    return dataset.select(sorted(keep))


def run_job(job: dict, work: Path) -> dict:
    """Trains (or, for ``method: null``, only evaluates the base model) and returns the run's numbers.

    The run's own output (parameter report, progress) goes to ``<work>/logs/<name>.log``.
    """
    log = work / "logs" / f"{job['name']}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cpu = time.process_time()
    with open(log, "w") as stream, contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
        result = _run_job(job, work)
    return {**result, "cpu_seconds": time.process_time() - cpu}  # the whole run, loading and scoring included


def _run_job(job: dict, work: Path) -> dict:
    import torch

    from unified_vl.checkpoint import load_pretrained

    torch.set_num_threads(1)
    evaluator = _evaluator(job["data"], job["task"], cap=job["eval_examples"], own_candidates=job["kind"] == B2N)
    splits = job["splits"]
    if job["method"] is None:  # the base model as it is (the hand-written template)
        model, processor = load_pretrained(job["base"])
        metrics = {}
        for split in splits:
            metrics.update(evaluator.evaluate(model.eval(), processor, split=split, max_examples=job["eval_examples"]))
        return {**job, "metrics": metrics}
    from unified_vl.app.jobs.common import training_data
    from unified_vl.engine.trainer import TrainData, train

    config = _config(job, work)
    data = training_data(config)
    if job.get("shots_per_class"):
        data = TrainData(
            {job["task"]: _per_class(data.datasets[job["task"]], job["shots_per_class"], job["seed"])},
            data.make_example,
        )
    result = train(config, data, evaluator=evaluator, job=job["name"])
    weights = next(result.model_dir.glob("*.safetensors"))
    out = {**job, "metrics": result.metrics, "seconds_per_step": result.train_seconds / max(result.steps, 1)}
    out["file_bytes"] = weights.stat().st_size
    shutil.rmtree(result.run_dir / "checkpoints", ignore_errors=True)  # only the exported folder is kept
    return out


def parameter_counts(base: str, *, method: str, options: dict, lr: float = 0.0) -> tuple[int, int]:
    """``(trainable, total)`` parameters of the base model with ``method`` attached (full: all trainable)."""
    from unified_vl.checkpoint import load_pretrained
    from unified_vl.prompting import get_method

    model, _ = load_pretrained(base)
    spec = get_method(method)
    if spec.attach is not None:
        spec.attach(model, spec.resolve_options(options))
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# -- the plan ------------------------------------------------------------------------------------
def plan(settings: dict, args) -> list[dict]:
    """Every run: the base model's scores, each (row, task, shots, seed), then base-to-new.

    A row of ``methods`` is named by its key; ``method`` names the registered method when the key
    is not one (a learning-rate sweep has several rows of one method).
    """
    common = {"base": str(args.base), "batch_size": settings["batch_size"], "warmup_steps": settings["warmup_steps"]}
    split = settings.get("eval_split", "test")
    jobs = []
    for task in settings["tasks"]:
        jobs.append({**common, "kind": "table", "name": f"base-{task}", "row": None, "method": None, "task": task})
        for row, spec in settings["methods"].items():
            for shots in settings["shots"]:
                for seed in settings["seeds"]:
                    name = f"{row}-{task}-{'full' if shots is None else f'k{shots}'}-s{seed}"
                    run = {"kind": "table", "name": name, "row": row, "task": task, "shots": shots, "seed": seed}
                    jobs.append({**common, **run, **_method(row, spec)})
    for job in jobs:
        job.update(data=str(args.data), steps=settings["steps"], eval_examples=settings["eval_examples"])
        job.update(seed=job.get("seed", 0), splits=[split])
    b2n = settings.get("base_to_new")
    if not b2n:
        return jobs
    b2n_common = {**common, "kind": B2N, "task": "classification", "data": str(args.work / "base_to_new_data")}
    b2n_splits = b2n.get("eval_splits", ["test_base", "test_new"])
    b2n_common.update(steps=b2n["steps"], eval_examples=b2n["eval_examples"], splits=b2n_splits)
    jobs.append({**b2n_common, "name": "b2n-template", "row": None, "method": None, "seed": 0})
    for row, spec in b2n["methods"].items():
        for seed in settings["seeds"]:
            run = {"name": f"b2n-{row}-s{seed}", "row": row, "seed": seed, "shots_per_class": b2n["shots_per_class"]}
            jobs.append({**b2n_common, **run, **_method(row, spec)})
    return jobs


def _method(row: str, spec: dict) -> dict:
    return {"method": spec.get("method", row), "lr": spec["lr"], "options": spec.get("options", {})}


# -- the tables ----------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {std:.3f}"


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 1024:.0f} KiB" if num_bytes < 1024**2 else f"{num_bytes / 1024**2:.1f} MiB"


def methods_table(settings: dict, results: list[dict], counts: dict[str, tuple[int, int]]) -> str:
    import tasks

    split = settings.get("eval_split", "test")

    def metric(result: dict) -> float:
        return result["metrics"][f"{result['task']}/{split}/{tasks.get_task(result['task']).primary_metric}"]

    regimes = [("full split" if s is None else f"K={s}", s) for s in settings["shots"]]
    columns = [(f"{TASK_TITLES.get(t, t)} {label}", t, s) for label, s in regimes for t in settings["tasks"]]
    header = ["method", "trainable", "share", "file", "ms/step", *(c[0] for c in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table = [r for r in results if r["kind"] == "table"]
    base = {r["task"]: metric(r) for r in table if r["method"] is None}
    lines.append(
        "| base model, untrained | – | – | – | – | " + " | ".join(f"{base[t]:.3f}" for _, t, _ in columns) + " |"
    )
    for row in settings["methods"]:
        runs = [r for r in table if r["row"] == row]
        trainable, total = counts[row]
        cells = [row, f"{trainable:,}", f"{100 * trainable / total:.2f}%", _size(max(r["file_bytes"] for r in runs))]
        cells.append(f"{1000 * statistics.fmean(r['seconds_per_step'] for r in runs):.0f}")
        for _, task, shots in columns:
            cells.append(_mean_std([metric(r) for r in runs if r["task"] == task and r["shots"] == shots]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def base_to_new_table(settings: dict, results: list[dict]) -> str:
    """Top-1 on each evaluated split (base and new classes), with H, their harmonic mean (CoCoOp's summary)."""
    names = {None: "hand-written template (base model)", "prompt_tuning": "CoOp (prompt_tuning)", "cocoop": "CoCoOp"}
    titles = {"test_base": "base classes", "test_new": "new classes", "val_base": "base classes (val)"}
    splits = settings["base_to_new"].get("eval_splits", ["test_base", "test_new"])
    both = {"test_base", "test_new"} <= set(splits)
    header = ["prompt", *(titles.get(s, s) for s in splits), *(["H"] if both else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in [None, *settings["base_to_new"]["methods"]]:
        runs = [r for r in results if r["kind"] == B2N and r["row"] == row]
        top1 = {s: [r["metrics"][f"classification/{s}/top1"] for r in runs] for s in splits}
        cells = [names.get(row, row), *(_mean_std(top1[s]) for s in splits)]
        if both:
            pairs = zip(top1["test_base"], top1["test_new"], strict=True)
            cells.append(_mean_std([2 * b * n / (b + n) if b + n else 0.0 for b, n in pairs]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="scripts/configs/bench_methods.yaml")
    parser.add_argument("--base", type=Path, required=True, help="the base model folder (the main job's model)")
    parser.add_argument("--data", type=Path, required=True, help="its data folder (the main job's synthetic world)")
    parser.add_argument("--out", type=Path, required=True, help="the Markdown file to write (the JSON goes beside it)")
    parser.add_argument("--work", type=Path, default=None, help="where runs go (default: a temporary folder)")
    parser.add_argument("--workers", type=int, default=2, help="one-thread worker processes (default 2)")
    parser.add_argument("--quick", action="store_true", help="a few steps, one seed, 8 examples: checks the pipeline")
    args = parser.parse_args(argv)
    settings = load_settings(args.config)
    if args.quick:
        settings.update(QUICK)
        if settings.get("base_to_new"):
            settings["base_to_new"].update(QUICK_B2N)
    temporary = args.work is None
    args.work = Path(tempfile.mkdtemp(prefix="bench-methods-")) if temporary else args.work
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ["OMP_NUM_THREADS"] = "1"  # the workers inherit it: one thread each
    start = time.perf_counter()
    classes = base_to_new_data(str(args.data), args.work / "base_to_new_data")
    jobs = plan(settings, args)
    print(
        f"{len(jobs)} runs on {args.workers} workers; base classes {classes['base']}, new {classes['new']}", flush=True
    )
    results = []
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(run_job, job, args.work): job for job in jobs}
        for i, future in enumerate(as_completed(futures), 1):
            result = future.result()
            results.append(result)
            shown = ", ".join(f"{k} {v:.3f}" for k, v in result["metrics"].items() if not k.startswith("mean/"))
            print(f"[{i}/{len(jobs)} {time.perf_counter() - start:6.0f} s] {result['name']}: {shown}", flush=True)
    counts = {row: parameter_counts(str(args.base), **_method(row, spec)) for row, spec in settings["methods"].items()}
    minutes = (time.perf_counter() - start) / 60
    split = settings.get("eval_split", "test")
    text = (
        f"Methods on {args.base} ({settings['steps']} steps of {settings['batch_size']}, seeds {settings['seeds']}, "
        f"first {settings['eval_examples']} {split} examples; {minutes:.0f} min"
        f"{', QUICK: not a result' if args.quick else ''})\n\n" + methods_table(settings, results, counts) + "\n"
    )
    if settings.get("base_to_new"):
        text += (
            "\nBase-to-new (colour-shape classes of the largest object)\n\n"
            + base_to_new_table(settings, results)
            + "\n"
        )
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    raw = {"settings": settings, "classes": classes, "parameters": counts, "minutes": minutes, "runs": results}
    args.out.with_suffix(".json").write_text(json.dumps(raw, indent=2, default=str) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    if temporary:
        shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
