"""The Frozen recipe (Tsimpoukelli et al. 2021, "Multimodal Few-Shot Learning with Frozen Language
Models") on the synthetic world, with the paper's controls. docs/frozen.md explains the setup.

    python scripts/frozen.py --out frozen.md                    # the table: about 30 min on 2 idle CPU cores
    python scripts/frozen.py --quick --out /tmp/frozen-quick.md  # the whole pipeline on a tiny setting, ~3 min

Stages (settings: scripts/configs/frozen_lm.yaml and frozen_caption.yaml; ``--seeds`` repeats them):

1. ``lm``: a ``uvl-tiny`` model in ``visual_mode=prefix`` learns text alone (T5 span corruption of the
   training split's captions and answered questions, no image), everything training;
2. ``frozen``: from it, the language model frozen by design, the vision side and the linear map train on
   captioning; the controls on the same data and steps: ``finetuned`` (the language model trains
   too), ``scratch`` (no text pretraining, everything from scratch), ``blind`` (black images);
3. each is evaluated on ``test`` and ``heldout``: captioning CIDEr-D, VQA with 0/1/2/4 solved examples
   before the question (zero-shot: no VQA example with an image was ever seen), fast binding
   2-/5-way, 1/3-shot with nonsense names.

Expect two Markdown tables (test, heldout), printed and written to ``--out``; the per-seed numbers
go to the same name with ``.json``. Finished runs are reused when the script is run again with the
same settings (``--work`` keeps them).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

CONFIGS = ROOT / "scripts" / "configs"
LM_CONFIG, CAPTION_CONFIG = CONFIGS / "frozen_lm.yaml", CONFIGS / "frozen_caption.yaml"
RUNS = ("frozen", "finetuned", "scratch", "blind")
LABELS = {
    "frozen": "Frozen",
    "finetuned": "Frozen finetuned",
    "scratch": "Frozen scratch",
    "blind": "Frozen blind",
}
# --quick: a tiny model on a tiny world, a few steps, a few examples (as tests/test_jobs.py's FAST).
QUICK_MODEL = (
    "model.overrides={visual_mode: prefix, max_text_length: 256, image_size: 32, "
    "vision_kwargs: {patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}, "
    "text_config: {d_model: 32, d_kv: 16, d_ff: 64, num_heads: 2, num_layers: 1, num_decoder_layers: 1}}"
)
QUICK_STEPS = ["train.max_steps=10", "train.global_batch_size=8", "train.micro_batch_size=8", "optim.warmup_steps=2"]
QUICK_LM = ["data.synth.num_images=64", "model.tokenizer_vocab_size=null", QUICK_MODEL, *QUICK_STEPS]


@dataclasses.dataclass
class Recipe:
    """What the run configs do not say: seeds, runs and the evaluation's sizes."""

    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])  # a language model and the runs per seed
    runs: list[str] = dataclasses.field(default_factory=lambda: list(RUNS))
    eval_captions: int = 200  # captioning records per split
    eval_questions: int = 300  # VQA questions per split and number of shots
    eval_episodes: int = 200  # fast-binding episodes per split and setting
    vqa_shots: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2, 4])
    binding: list[tuple[int, int]] = dataclasses.field(default_factory=lambda: [(2, 1), (2, 3), (5, 1), (5, 3)])
    splits: list[str] = dataclasses.field(default_factory=lambda: ["test", "heldout"])
    workers: int = 2  # runs trained and evaluated at once, one thread each
    quick: bool = False
    lm_overrides: list[str] = dataclasses.field(default_factory=list)  # KEY=VALUE over frozen_lm.yaml
    caption_overrides: list[str] = dataclasses.field(default_factory=list)  # KEY=VALUE over frozen_caption.yaml


QUICK = {"eval_captions": 8, "eval_questions": 8, "eval_episodes": 4}


def run_config(recipe: Recipe, stage: str, extra: list[str]):
    """The RunConfig of stage ``lm`` or ``caption``: its YAML file, the quick setting, then ``extra``."""
    from unified_vl.engine.config import load_config

    path = LM_CONFIG if stage == "lm" else CAPTION_CONFIG
    quick = (QUICK_LM if stage == "lm" else QUICK_STEPS) if recipe.quick else []
    own = recipe.lm_overrides if stage == "lm" else recipe.caption_overrides
    return load_config(path, [*quick, *own, *extra])


def digest(recipe: Recipe, *parts: Any) -> str:
    files = [LM_CONFIG.read_text(), CAPTION_CONFIG.read_text()]
    settings = {k: v for k, v in dataclasses.asdict(recipe).items() if k not in ("seeds", "workers")}
    text = json.dumps([settings, files, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- data ---------------------------------------------------------------------------------------


def prepare(recipe: Recipe, work: Path) -> tuple[str, str | None]:
    """The synthetic world and the tokenizer (stage 1's settings; the main job's cache), and the language model's text."""
    from data_tools import frozen, storage
    from unified_vl.app.jobs.common import prepare_data
    from unified_vl.engine.distributed import DistInfo

    config = prepare_data(run_config(recipe, "lm", []), DistInfo(0, 1, 0, "gloo"))
    corpus = work / "lm-text"
    if not (corpus / storage.MANIFEST_NAME).is_file():
        captions = storage.load_split(config.data.path, "captioning", "train", decode_images=False)
        questions = storage.load_split(config.data.path, "vqa", "train", decode_images=False)
        records = frozen.lm_texts(captions.remove_columns("image"), questions.remove_columns("image"))
        storage.write_dataset(
            corpus,
            ((("text_infilling", "train"), r) for r in records),
            source="frozen",
            command=f"data_tools.frozen.lm_texts over {config.data.path} (train)",
        )
        print(f"language-model text: {len(records)} texts from {len(questions)} answered questions -> {corpus}")
    return config.data.path, config.model.tokenizer


# -- training -----------------------------------------------------------------------------------


def black(image):
    from PIL import Image

    return Image.new("RGB", image.size, (0, 0, 0))


def lm_example(task: str, record: dict, rng: random.Random):
    """Text alone, no image: T5 span corruption of the record's text, or its end blanked."""
    from data_tools import frozen
    from unified_vl.engine.trainer import Example

    source, target = frozen.lm_example(record["text"], rng)
    return Example(image=[], prompt=source, target=target)


def caption_example(task: str, record: dict, rng: random.Random, *, blind: bool = False):
    """The image, then the blank its caption fills."""
    from data_tools.frozen import CAPTION_PROMPT, blank_target
    from unified_vl.engine.trainer import Example

    image = black(record["image"]) if blind else record["image"]
    return Example(image=[image], prompt=CAPTION_PROMPT, target=blank_target(rng.choice(record["captions"]) + "."))


def train_stage(recipe: Recipe, name: str, seed: int, work: Path, data: str, tokenizer: str | None) -> Path:
    """Trains one stage (``lm`` or a run of :data:`RUNS`) and returns its model folder."""
    import functools

    from data_tools import storage
    from unified_vl.engine.trainer import TrainData, train

    out = work / f"seed{seed}" / name
    extra = [f"output_dir={out}", f"train.seed={seed}"]
    if name == "lm":
        extra += [f"data.path={work / 'lm-text'}", f"model.tokenizer={tokenizer or 'null'}"]
        world = int(os.environ.get("WORLD_SIZE", "1"))  # under torch.distributed.run: the same global batch
        batch = run_config(recipe, "lm", []).train.global_batch_size
        config = run_config(recipe, "lm", [*extra, f"train.micro_batch_size={batch // world}"])
        records = storage.load_split(work / "lm-text", "text_infilling", "train")
        return train(config, TrainData({"text_infilling": records}, lm_example), job=name).model_dir
    if name == "scratch":  # stage 1's architecture, fresh: no text pretraining
        model = run_config(recipe, "lm", []).model
        extra += [f"model.preset={model.preset}", f"model.overrides={json.dumps(model.overrides)}"]
        extra += [f"model.tokenizer={tokenizer or 'null'}"]
    else:
        extra.append(f"model.init={work / f'seed{seed}' / 'lm' / 'model'}")
    if name in ("finetuned", "scratch"):
        extra.append("train.freeze=[]")  # the language model trains too; frozen and blind keep the design freeze
    config = run_config(recipe, "caption", [f"data.path={data}", *extra])
    make_example = functools.partial(caption_example, blind=name == "blind")
    records = storage.load_split(data, "captioning", "train")
    return train(config, TrainData({"captioning": records}, make_example), job=name).model_dir


# -- evaluation ---------------------------------------------------------------------------------


def fill_blanks(model, processor, images: list[list], prompts: list[str], *, max_new_tokens: int) -> list[str]:
    """What the model writes into each prompt's blank (greedy; batched equals one at a time)."""
    import torch

    from data_tools.frozen import parse_blank

    texts = []
    for start in range(0, len(prompts), 32):
        batch = processor(images=images[start : start + 32], text=prompts[start : start + 32])
        with torch.no_grad():
            sequences = model.generate(**batch, max_new_tokens=max_new_tokens, num_beams=1)
        texts += [parse_blank(processor.tokenizer.decode(s, skip_special_tokens=False)) for s in sequences]
    return texts


def first(dataset, n: int) -> list[dict]:
    """The first ``n`` records (the same ones every time), decoded."""
    return [dataset[i] for i in range(min(n, len(dataset)))]


def evaluate_captioning(model, processor, data: str, split: str, recipe: Recipe, *, blind: bool) -> float:
    import tasks
    from data_tools import storage
    from data_tools.frozen import CAPTION_PROMPT

    records = first(storage.load_split(data, "captioning", split), recipe.eval_captions)
    images = [[black(r["image"]) if blind else r["image"]] for r in records]
    texts = fill_blanks(model, processor, images, [CAPTION_PROMPT] * len(records), max_new_tokens=32)
    task = tasks.get_task("captioning")
    return task.evaluate([task.parse(t, r) for t, r in zip(texts, records, strict=True)], records)["cider"]


def evaluate_vqa(model, processor, data: str, split: str, shots: int, recipe: Recipe, *, seed: int, blind: bool):
    """VQA accuracy with ``shots`` solved training questions (each with its image) before the question."""
    import tasks
    from data_tools import storage
    from data_tools.frozen import answer_of, vqa_prompt

    records = first(storage.load_split(data, "vqa", split), recipe.eval_questions)
    pool = storage.load_split(data, "vqa", "train")
    images, prompts = [], []
    for i, record in enumerate(records):
        rng = random.Random(f"vqa-shots:{seed}:{split}:{shots}:{i}")
        solved = [pool[j] for j in rng.sample(range(len(pool)), shots)]
        row = [s["image"] for s in solved] + [record["image"]]
        images.append([black(image) for image in row] if blind else row)
        prompts.append(vqa_prompt(record["question"], [(s["question"], answer_of(s)) for s in solved]))
    texts = fill_blanks(model, processor, images, prompts, max_new_tokens=8)
    task = tasks.get_task("vqa")
    return task.evaluate([task.parse(t, r) for t, r in zip(texts, records, strict=True)], records)["accuracy"]


def evaluate_binding(model, processor, split: str, ways: int, shots: int, recipe: Recipe, *, seed: int, blind: bool):
    """Fast-binding accuracy, and how often the model wrote one of the episode's names at all."""
    from data_tools.frozen import binding_episodes

    image_size = processor.image_size
    episodes = binding_episodes(
        split, ways=ways, shots=shots, count=recipe.eval_episodes, seed=seed, image_size=image_size
    )
    images = [[*e.supports, e.query] for e in episodes]
    if blind:
        images = [[black(image) for image in row] for row in images]
    texts = fill_blanks(model, processor, images, [e.prompt for e in episodes], max_new_tokens=8)
    correct = sum(t == e.answer for t, e in zip(texts, episodes, strict=True))
    named = sum(t in e.names for t, e in zip(texts, episodes, strict=True))
    return correct / len(episodes), named / len(episodes)


def evaluate_run(recipe: Recipe, name: str, seed: int, model_dir: Path, data: str) -> dict[str, float]:
    """Every metric of one trained run: ``{split}/{metric}``."""
    from unified_vl.checkpoint import load_pretrained

    model, processor = load_pretrained(model_dir)
    model.eval()
    blind = name == "blind"
    metrics: dict[str, float] = {}
    for split in recipe.splits:
        metrics[f"{split}/captioning_cider"] = evaluate_captioning(model, processor, data, split, recipe, blind=blind)
        for shots in recipe.vqa_shots:
            metrics[f"{split}/vqa_{shots}shot"] = evaluate_vqa(
                model, processor, data, split, shots, recipe, seed=seed, blind=blind
            )
        for ways, shots in recipe.binding:
            accuracy, named = evaluate_binding(model, processor, split, ways, shots, recipe, seed=seed, blind=blind)
            metrics[f"{split}/binding_{ways}way_{shots}shot"] = accuracy
            metrics[f"{split}/binding_{ways}way_{shots}shot_named"] = named
    return metrics


# -- one job per process --------------------------------------------------------------------------


def run_job(args: argparse.Namespace, recipe: Recipe) -> int:
    """``--job lm`` / ``--job NAME``: train (and evaluate) one stage of one seed in this process."""
    import torch

    torch.set_num_threads(1)
    work = Path(args.work)
    data, tokenizer = args.data, args.tokenizer
    key = digest(recipe, args.job, args.seed)
    done = work / f"seed{args.seed}" / args.job / "results.json"
    if done.is_file() and json.loads(done.read_text()).get("digest") == key:
        return 0
    main = os.environ.get("RANK", "0") == "0"  # the language model may train as several processes
    if done.parent.exists() and main:  # an interrupted or outdated run: start it again
        shutil.rmtree(done.parent)
    # CPU seconds besides wall seconds: on a shared machine they estimate an idle machine's wall time.
    tic, cpu = time.perf_counter(), time.process_time()
    model_dir = train_stage(recipe, args.job, args.seed, work, data, tokenizer)
    minutes = {"train_minutes": (time.perf_counter() - tic) / 60, "train_cpu_minutes": (time.process_time() - cpu) / 60}
    metrics: dict[str, float] = {}
    if args.job != "lm":
        tic, cpu = time.perf_counter(), time.process_time()
        metrics = evaluate_run(recipe, args.job, args.seed, model_dir, data)
        minutes["eval_minutes"] = (time.perf_counter() - tic) / 60
        minutes["eval_cpu_minutes"] = (time.process_time() - cpu) / 60
    if main:
        done.write_text(json.dumps({"digest": key, "metrics": metrics, **minutes}, indent=2) + "\n")
    return 0


def _command(
    args: argparse.Namespace, job: str, seed: int, data: str, tokenizer: str | None, *, processes: int = 1
) -> list[str]:
    command = [sys.executable]
    if processes > 1:  # two one-thread processes train a tiny model faster than one (the main job's finding)
        command += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    command += [str(Path(__file__).resolve()), "--job", job, "--seed", str(seed)]
    command += ["--work", str(args.work), "--data", data, "--seeds", *map(str, args.seeds)]
    command += ["--tokenizer", tokenizer] if tokenizer else []
    command += ["--lm", *args.lm] if args.lm else []
    command += ["--caption", *args.caption] if args.caption else []
    return command + (["--quick"] if args.quick else [])


def _run(command: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        status = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
    if status:
        raise SystemExit(f"{' '.join(command)} failed with status {status}; its log: {log}")


def orchestrate(args: argparse.Namespace, recipe: Recipe) -> dict:
    """Data, then each seed's language model, then the runs, ``workers`` at a time; the results."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    data, tokenizer = prepare(recipe, work)
    jobs = [("lm", seed) for seed in recipe.seeds]
    runs = [(name, seed) for seed in recipe.seeds for name in recipe.runs]
    with concurrent.futures.ThreadPoolExecutor(recipe.workers) as pool:
        for stage in (jobs, runs):  # every run of a seed starts from that seed's language model
            # Language models with workers to spare train as several processes each.
            processes = max(1, recipe.workers // len(stage)) if stage is jobs else 1
            futures = [
                pool.submit(
                    _run,
                    _command(args, job, seed, data, tokenizer, processes=processes),
                    work / f"seed{seed}" / f"{job}.log",
                )
                for job, seed in stage
            ]
            for future in concurrent.futures.as_completed(futures):
                future.result()
            print(f"{len(stage)} job(s) done after {(time.perf_counter() - tic) / 60:.1f} min", flush=True)
    results = {}
    for name, seed in [*jobs, *runs]:
        results.setdefault(name, {})[seed] = json.loads((work / f"seed{seed}" / name / "results.json").read_text())
    return {"data": data, "minutes": (time.perf_counter() - tic) / 60, "results": results}


# -- the table ------------------------------------------------------------------------------------


def _cell(values: list[float], scale: float) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values) * scale
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {(max(values) - min(values)) * scale / 2:.1f}"


def tables(recipe: Recipe, outcome: dict, baselines: list[dict]) -> str:
    """One Markdown table per split: runs in rows; CIDEr-D, VQA accuracy by shots, binding accuracy (%)."""
    columns = [("captioning_cider", "CIDEr-D", 100.0)]
    columns += [(f"vqa_{k}shot", f"VQA {k}-shot", 100.0) for k in recipe.vqa_shots]
    columns += [(f"binding_{w}way_{s}shot", f"bind {w}-way {s}-shot", 100.0) for w, s in recipe.binding]
    out = []
    for split in recipe.splits:
        head = f"| {split} | " + " | ".join(label for _, label, _ in columns) + " |"
        lines = [head, "|" + "---|" * (len(columns) + 1)]
        for name in recipe.runs:
            per_seed = outcome["results"][name]
            cells = [
                _cell([r["metrics"][f"{split}/{key}"] for r in per_seed.values()], scale) for key, _, scale in columns
            ]
            lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
        chance = {"captioning_cider": _baseline(baselines, "captioning", "cider", split)}
        chance.update({f"vqa_{k}shot": _baseline(baselines, "vqa", "accuracy", split) for k in recipe.vqa_shots})
        chance.update({f"binding_{w}way_{s}shot": 1.0 / w for w, s in recipe.binding})
        cells = [_cell([chance[key]] if chance[key] is not None else [], scale) for key, _, scale in columns]
        lines.append("| chance / trivial baseline | " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    seeds = ", ".join(map(str, recipe.seeds))
    note = f"Seeds {seeds}; mean ± half the range over seeds. CIDEr-D x 100, accuracies in %."
    return "\n\n".join(out) + "\n\n" + note + "\n"


def _baseline(baselines: list[dict], task: str, metric: str, split: str) -> float | None:
    """The best trivial baseline the synthetic world reports (test split only)."""
    values = [b["value"] for b in baselines if b["task"] == task and b["metric"] == metric]
    return max(values) if values and split == "test" else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="the Markdown file of the table; the per-seed numbers go beside it as .json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (default: 0)")
    parser.add_argument("--quick", action="store_true", help="a tiny setting that runs the whole pipeline")
    parser.add_argument("--lm", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of frozen_lm.yaml")
    parser.add_argument(
        "--caption", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of frozen_caption.yaml"
    )
    parser.add_argument("--work", default=None, help="where runs go (default: runs/frozen[-quick])")
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)  # one stage, in a child process
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.work = Path(args.work or ("runs/frozen-quick" if args.quick else "runs/frozen")).resolve()
    recipe = Recipe(
        seeds=args.seeds,
        quick=args.quick,
        lm_overrides=args.lm,
        caption_overrides=args.caption,
        **(QUICK if args.quick else {}),
    )
    if args.job is not None:
        return run_job(args, recipe)
    if args.out is None:
        parser.error("--out is required (the table's Markdown file)")
    outcome = orchestrate(args, recipe)
    from data_tools import storage

    baselines = storage.read_manifest(outcome["data"]).get("synth", {}).get("baselines", [])
    table = tables(recipe, outcome, baselines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    raw = {"recipe": dataclasses.asdict(recipe), "command": " ".join(sys.argv), **outcome}
    out.with_suffix(".json").write_text(json.dumps(raw, indent=2) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')} ({outcome['minutes']:.1f} min)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
