"""CPT colour prompts against location-token fine-tuning on the synthetic world's rec (issue #14, docs/cpt.md).

    python scripts/cpt_table.py --main-model runs/main/model --out docs/cpt_table.md            # ~30 min, 2 idle cores
    python scripts/cpt_table.py --main-model runs/main/model --out /tmp/p.md --shots 0 4 16 --seeds 0 1   # a proxy
    python scripts/cpt_table.py --main-model runs/main/model --out /tmp/cpt_quick.md --quick    # ~3 min, numbers meaningless

Expect: a pretraining run without rec and grounding (the main job's mixture minus those two, step
bounded; ~10 min; skipped when --work already holds it), then every (starting point, setting, K,
seed) fine-tuning run of `Protocol` (scripts/configs/cpt_pretrain_norec.yaml and
cpt_finetune_fewshot.yaml hold the runs' settings), two at a time (~190 runs of ~10 s of CPU each), each evaluated on the test expressions; K = 0 is the starting model evaluated as it is
(deterministic: one run), "all" a one-seed reference on every training example. Prints
and writes the Markdown table of test Acc@0.5 (x100, mean +- sample std over the seeds) to --out
and the raw per-seed numbers to the same name with .json. Finished runs are kept in --work and
reused, so an interrupted table resumes where it stopped.

Starting points: ``norec``, pretrained here without rec and grounding (CPT's setting: the model
never learnt to write a box), and ``main``, the main job's model (--main-model), which did.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import math
import multiprocessing
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STARTS = {"norec": "pretrained without rec and grounding", "main": "the main job's model (all five tasks)"}


# -- the protocol --------------------------------------------------------------------------------
PRETRAIN_CONFIG = ROOT / "scripts/configs/cpt_pretrain_norec.yaml"  # the norec start
FINETUNE_CONFIG = ROOT / "scripts/configs/cpt_finetune_fewshot.yaml"  # every fine-tuning run, any method


@dataclass(frozen=True)
class Setting:
    """A method configuration: one row of the table (two with ``snapped_row``).

    Attributes:
        name: the row's name.
        method: ``full`` (location tokens, the rec task's templates) or ``cpt``.
        options: the method's options.
        starts: the starting points it runs from.
        snapped_row: also a row where each written box is replaced by the candidate it overlaps most.
        distractors: >0: candidates are the record's objects plus random boxes up to this many, from a
            proposals file the script writes (the multi-copy path: 8 candidates, 5 colours, 2 copies).
    """

    name: str
    method: str
    options: dict = field(default_factory=dict)
    starts: tuple[str, ...] = tuple(STARTS)
    snapped_row: bool = False
    distractors: int = 0


SETTINGS = (
    Setting("location tokens (fine-tuning)", "full", snapped_row=True),
    Setting("CPT colours, sentinel template", "cpt", {"templates": ["sentinel"]}),
    Setting("CPT colours, instruction template", "cpt", {"templates": ["instruction"]}, starts=("norec",)),
    Setting(
        "CPT colours, both templates ensembled", "cpt", {"templates": ["sentinel", "instruction"]}, starts=("norec",)
    ),
    Setting(
        "CPT colours, sentinel, 8 candidates (objects + distractor boxes)",
        "cpt",
        {"templates": ["sentinel"]},
        starts=("norec",),
        distractors=8,
    ),
)


@dataclass
class Protocol:
    """Everything that decides the table's numbers (written into its JSON)."""

    shots: list = field(default_factory=lambda: [0, 1, 2, 4, 8, 16])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])  # a seed draws the K examples and the order
    pretrain_overrides: list[str] = field(default_factory=list)  # KEY=VALUE after PRETRAIN_CONFIG
    finetune_overrides: list[str] = field(default_factory=list)  # KEY=VALUE after FINETUNE_CONFIG
    split: str = "test"
    max_examples: int = 1200  # every test expression (600 images)
    settings: tuple[Setting, ...] = SETTINGS
    # A one-seed column on every training example, 400 steps of 16: can the method learn rec from this
    # start at all when data is plentiful? For these settings (indices).
    reference_label: str = "every training example, 400 steps of 16, seed 0"
    reference_settings: tuple[int, ...] = (0, 1)
    reference_overrides: list[str] = field(
        default_factory=lambda: [
            "train.max_steps=400",
            "train.global_batch_size=16",
            "train.micro_batch_size=16",
            "optim.warmup_steps=20",
        ]
    )
    workers: int = 2  # fine-tuning runs at a time, one thread each


def protocol_for(*, quick: bool = False, shots: list[int] | None = None, seeds: list[int] | None = None) -> Protocol:
    """The table's protocol; ``quick``: the whole pipeline in minutes with tiny sizes (numbers meaningless)."""
    protocol = Protocol()
    if quick:
        protocol.shots, protocol.seeds, protocol.max_examples = [0, 2], [0, 1], 24
        protocol.pretrain_overrides = ["train.max_steps=20", "eval.max_examples=24"]
        protocol.finetune_overrides = ["train.max_steps=3", "optim.warmup_steps=1"]
        protocol.reference_overrides = list(protocol.finetune_overrides)
    protocol.shots = list(shots or protocol.shots)
    protocol.seeds = list(seeds or protocol.seeds)
    return protocol


def _write_json(path: Path, obj) -> None:
    """Atomically: a kill never leaves half a file that a resumed table would trust."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# -- the starting point without rec ---------------------------------------------------------------
def pretrain_norec(protocol: Protocol, work: Path, data: str | None) -> tuple[Path, str, dict]:
    """(model folder, data folder, final metrics) of the pretraining without rec and grounding."""
    run = work / "norec"
    if not (run / "eval_final.json").is_file():
        if run.exists():
            shutil.rmtree(run)  # an interrupted pretraining starts again (it is step bounded)
        command = [sys.executable, "-m", "unified_vl.app.cli", "pretrain", str(PRETRAIN_CONFIG)]
        command += protocol.pretrain_overrides
        command += [f"data.path={data}"] if data else []
        command += [f"output_dir={run}"]
        print("pretraining without rec and grounding:", " ".join(command[1:]), flush=True)
        subprocess.run(command, check=True, cwd=ROOT)
    config = yaml.safe_load((run / "config.yaml").read_text())
    metrics = json.loads((run / "eval_final.json").read_text())["metrics"]
    return run / "model", config["data"]["path"], metrics


# -- candidates with distractors ------------------------------------------------------------------
def _distractor(rng: random.Random, size: int) -> list[float]:
    # Boxes of the world's object sizes (data_tools.synth: about 10 to 20 px on a 64 px image).
    side = rng.uniform(0.15, 0.32) * size
    x, y = rng.uniform(0, size - side), rng.uniform(0, size - side)
    return [round(x, 2), round(y, 2), round(x + side, 2), round(y + side, 2)]


def write_distractors(data: str, splits: list[str], total: int, out: Path) -> Path:
    """A proposals file: each record's objects plus random boxes up to ``total``, shuffled (seeded by record id)."""
    from data_tools import storage

    if out.is_file():
        return out
    table = {}
    for split in splits:
        dataset = storage.load_split(data, "rec", split, decode_images=False).remove_columns("image")
        for record in dataset:
            rng = random.Random(f"distractors:{record['id']}")
            boxes = [list(b) for b in record["candidate_boxes"]]
            boxes += [_distractor(rng, record["width"]) for _ in range(total - len(boxes))]
            rng.shuffle(boxes)  # the referent may be in either painted copy
            table[record["id"]] = boxes
    _write_json(out, table)
    return out


def chance(data: str, split: str, max_examples: int, proposals: Path | None) -> float:
    """Expected Acc@0.5 of a candidate drawn uniformly: the mean share of candidates with IoU >= 0.5."""
    from data_tools import storage
    from tasks.boxes import iou

    dataset = storage.load_split(data, "rec", split, decode_images=False).remove_columns("image")
    dataset = dataset.select(range(min(max_examples, len(dataset))))
    table = json.loads(proposals.read_text()) if proposals else None
    shares = []
    for record in dataset:
        cands = table[record["id"]] if table else record["candidate_boxes"]
        shares.append(sum(iou(c, record["box"]) >= 0.5 for c in cands) / len(cands))
    return statistics.fmean(shares)


# -- the runs ------------------------------------------------------------------------------------
def plan(protocol: Protocol, models: dict[str, Path], data: str, work: Path, proposals: dict[int, Path]) -> list[dict]:
    """One spec per run: (start, setting, K, seed); K = 0 once per (start, setting); K = "all": the reference."""
    specs = []
    for start, model in models.items():
        for index, setting in enumerate(protocol.settings):
            if start not in setting.starts:
                continue
            options = dict(setting.options)
            if setting.distractors:
                options["proposals"] = str(proposals[setting.distractors])
            runs = [
                (k, seed, protocol.finetune_overrides)
                for k in protocol.shots
                for seed in protocol.seeds[: 1 if k == 0 else None]
            ]
            if index in protocol.reference_settings:
                runs.append(("all", protocol.seeds[0], [*protocol.finetune_overrides, *protocol.reference_overrides]))
            for k, seed, overrides in runs:
                specs.append(
                    {
                        "start": start,
                        "setting": index,
                        "shots": k,
                        "seed": seed,
                        "model": str(model),
                        "data": data,
                        "method": setting.method,
                        "options": options,
                        "finetune": list(overrides),
                        "split": protocol.split,
                        "max_examples": protocol.max_examples,
                        "dir": str(work / "runs" / start / f"setting{index}" / f"k{k}-s{seed}"),
                    }
                )
    return specs


def _finetune_argv(spec: dict, out: Path) -> list[str]:
    """``unified-vl finetune`` for one run; it exports the model and evaluates nothing (`evaluate_rec` does)."""
    argv = ["--task", "rec", "--data", spec["data"], "--init", spec["model"], "--method", spec["method"]]
    argv += ["--shots", str(spec["shots"])] if spec["shots"] != "all" else []
    argv += ["--seed", str(spec["seed"]), str(FINETUNE_CONFIG), *spec["finetune"]]
    argv += [f"method.options.{k}={json.dumps(v)}" for k, v in spec["options"].items()]
    return [*argv, "eval.final_splits=[]", "checkpoint.export=true", f"output_dir={out}"]


def evaluate_rec(model_dir: str, spec: dict) -> dict[str, float]:
    """Test Acc@0.5 of a model read the method's way (`unified-vl eval`'s `TaskEvaluator`), and snapped.

    ``snapped``: each predicted box replaced by the record's candidate that overlaps it most, so that
    location tokens choose among the same candidates as CPT does (a CPT answer is a candidate already).
    """
    import tasks
    from tasks.boxes import iou
    from unified_vl.app.jobs.evaluate import TaskEvaluator
    from unified_vl.checkpoint import load_pretrained

    model, processor = load_pretrained(model_dir)
    evaluator = TaskEvaluator(spec["data"], ["rec"], method=spec["method"], method_options=spec["options"])
    texts = evaluator.generate(model.eval(), processor, split=spec["split"], max_examples=spec["max_examples"])["rec"]
    records = evaluator.records("rec", spec["split"], spec["max_examples"], decode_images=False)
    task = tasks.get_task("rec")
    predictions = [task.parse(text, records[i]) for i, text in texts]
    snapped = [
        max(r["candidate_boxes"], key=lambda c, p=p: iou(c, p)) if p is not None else None
        for p, r in zip(predictions, (records[i] for i, _ in texts), strict=True)
    ]
    rows = [records[i] for i, _ in texts]
    return {
        "acc": task.evaluate(predictions, rows)["acc@0.5"],
        "snapped": task.evaluate(snapped, rows)["acc@0.5"],
    }


def run_one(spec: dict) -> dict:
    """Runs one fine-tuning (none for K = 0) and its evaluation in this worker; the result, cached in its folder."""
    out = Path(spec["dir"])
    done = out / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    if out.exists():
        shutil.rmtree(out)  # an interrupted run starts again
    out.mkdir(parents=True)
    import torch

    from unified_vl.app.jobs import finetune

    torch.set_num_threads(1)
    wall, cpu = time.perf_counter(), time.process_time()
    with open(out / "log.txt", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        model_dir = spec["model"]
        if spec["shots"]:
            argv = _finetune_argv(spec, out)
            print("unified-vl finetune " + " ".join(argv), flush=True)
            if (code := finetune.main(argv)) != 0:
                raise RuntimeError(f"finetune failed with status {code}; see {out / 'log.txt'}")
            model_dir = str(out / "model")
        metrics = evaluate_rec(model_dir, spec)
    if spec["shots"]:
        shutil.rmtree(out / "model")  # 150 runs' models would fill a disk; the result is what is kept
    result = {
        **{k: spec[k] for k in ("start", "setting", "shots", "seed")},
        **metrics,
        "wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
    }
    _write_json(done, result)
    return result


def run_all(specs: list[dict], workers: int) -> list[dict]:
    """Every run, ``workers`` at a time (spawned processes, one thread each), in plan order."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the workers before torch loads
    results: list[dict | None] = [None] * len(specs)
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(run_one, spec): i for i, spec in enumerate(specs)}
        for n, future in enumerate(concurrent.futures.as_completed(futures), 1):
            i = futures[future]
            results[i] = future.result()
            r = results[i]
            print(
                f"[{n}/{len(specs)}] {r['start']} setting {r['setting']} K={r['shots']} seed {r['seed']}: "
                f"acc@0.5 {r['acc']:.3f} ({r['wall_s']:.0f} s)",
                flush=True,
            )
    return results


# -- the table -----------------------------------------------------------------------------------
def _cell(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def table(protocol: Protocol, results: list[dict]) -> str:
    """Markdown: one row per (start, setting), one column per K."""
    shots = protocol.shots + (["all"] if protocol.reference_settings else [])
    names = {"all": f"all ({protocol.reference_label})"}
    header = "| start | method | " + " | ".join(names.get(k, f"K={k}") for k in shots) + " |"
    lines = [header, "|" + "---|" * (2 + len(shots))]
    for start in STARTS:
        for index, setting in enumerate(protocol.settings):
            rows = [(setting.name, "acc")]
            if setting.snapped_row:
                rows.append((f"{setting.name}, snapped to the nearest candidate", "snapped"))
            for name, key in rows:
                cells = []
                for k in shots:
                    runs = [r for r in results if (r["start"], r["setting"], r["shots"]) == (start, index, k)]
                    cells.append(_cell([r[key] for r in runs]) if runs else "")
                if any(cells):
                    lines.append(f"| {start} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _primary_keys(split: str) -> set[str]:
    import tasks

    return {f"{name}/{split}/{task.primary_metric}" for name, task in tasks.TASKS.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--main-model", required=True, help="the main job's model folder (unified-vl pretrain)")
    parser.add_argument("--out", required=True, help="the Markdown file to write (and .json beside it)")
    parser.add_argument("--data", default=None, help="the synthetic world (default: the main job's, cached)")
    parser.add_argument("--work", default=None, help="where runs are kept (default: runs/cpt-table[-quick])")
    parser.add_argument("--workers", type=int, default=None, help="runs at a time (default: the config's)")
    parser.add_argument("--quick", action="store_true", help="the whole pipeline with tiny sizes")
    parser.add_argument("--shots", type=int, nargs="+", default=None, help="replace the config's K values")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="replace the config's seeds")
    args = parser.parse_args()
    if not (Path(args.main_model) / "config.json").is_file():
        parser.error(f"--main-model {args.main_model} is not a model folder; run `unified-vl pretrain` first")
    protocol = protocol_for(quick=args.quick, shots=args.shots, seeds=args.seeds)
    work = Path(args.work or ROOT / ("runs/cpt-table-quick" if args.quick else "runs/cpt-table"))
    work.mkdir(parents=True, exist_ok=True)
    start_time = time.perf_counter()

    norec, data, norec_metrics = pretrain_norec(protocol, work, args.data)
    split, max_examples = protocol.split, protocol.max_examples
    totals = sorted({s.distractors for s in protocol.settings if s.distractors})
    proposals = {n: write_distractors(data, ["train", split], n, work / f"proposals-{n}.json") for n in totals}
    specs = plan(protocol, {"norec": norec, "main": Path(args.main_model)}, data, work, proposals)
    pretrain_s = time.perf_counter() - start_time
    results = run_all(specs, args.workers or protocol.workers)
    elapsed = time.perf_counter() - start_time

    baselines = {"candidates of the record": chance(data, split, max_examples, None)}
    baselines |= {
        f"{n} candidates with distractors": chance(data, split, max_examples, p) for n, p in proposals.items()
    }
    cpu_min = sum(r["cpu_s"] for r in results) / 60
    command = "python scripts/cpt_table.py " + " ".join(sys.argv[1:])
    text = "\n".join(
        [
            f"<!-- {command} -->",
            table(protocol, results),
            "",
            f"Test Acc@0.5 x100 on the first {max_examples} `{split}` expressions; mean ± sample std over seeds "
            f"{protocol.seeds} (K=0: the starting model as it is, one deterministic run).",
            "Chance (a candidate drawn uniformly): "
            + "; ".join(f"{name} {100 * value:.1f}" for name, value in baselines.items())
            + ".",
            "Starting points: "
            + "; ".join(f"`{k}` {v}" for k, v in STARTS.items())
            + ". `norec` on test: "
            + ", ".join(f"{k} {v:.3f}" for k, v in sorted(norec_metrics.items()) if k in _primary_keys(split))
            + ".",
            f"{len(results)} runs, {cpu_min:.1f} CPU-minutes; {elapsed / 60:.1f} min in all "
            f"(pretraining and data {pretrain_s / 60:.1f} min).",
        ]
    )
    print("\n" + text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_text(out, text + "\n")
    raw = {
        "command": command,
        "protocol": asdict(protocol)
        | {"pretrain_config": str(PRETRAIN_CONFIG), "finetune_config": str(FINETUNE_CONFIG)},
        "baselines": baselines,
        "norec_metrics": norec_metrics,
        "runs": results,
        "seconds": {"total": elapsed, "pretraining_and_data": pretrain_s},
    }
    _write_json(out.with_suffix(".json"), raw)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0 if all(math.isfinite(r["acc"]) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
