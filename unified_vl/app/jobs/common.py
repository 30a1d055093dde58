"""What the training jobs share: command-line parsing, the data (synthetic world cache, tokenizer),
records -> examples through the task modules, and the checks that run before any training.

This is the application layer (DESIGN.md §4): it may import ``tasks`` and ``data_tools`` and
hands them to the engine as plain functions and records.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import random
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from unified_vl.engine import distributed
from unified_vl.engine.config import AugmentConfig, ConfigError, RunConfig, allowed_keys, derive, load_config
from unified_vl.engine.trainer import Example, TrainData, check_precision

EPILOG = "Config keys (set as KEY=VALUE, dotted; a YAML file sets the same keys as nested sections):\n  " + "\n  ".join(
    allowed_keys()
)


def strip_launcher_args(argv: Sequence[str]) -> list[str]:
    """Drops ``--local_rank=N`` that the ``deepspeed`` launcher appends (the rank is in the environment)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--local_rank", "--local-rank"):
            skip = True
        elif not arg.startswith(("--local_rank=", "--local-rank=")):
            out.append(arg)
    return out


def split_config_args(items: Sequence[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG.yaml] [key=value ...]`` -> (config path or None, overrides)."""
    path, overrides = None, []
    for i, item in enumerate(items):
        if "=" in item:
            overrides.append(item)
        elif i == 0 and item.endswith((".yaml", ".yml")):
            path = item
        else:
            raise ConfigError(f"argument {item!r} is neither a config file (first, *.yaml) nor KEY=VALUE")
    return path, overrides


def cache_root(config: RunConfig) -> Path:
    """Where generated data and trained tokenizers are kept between runs."""
    if config.data.cache_dir:
        return Path(config.data.cache_dir)
    return Path(os.environ.get("UNIFIED_VL_CACHE", Path.home() / ".cache" / "unified-vl"))


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def synth_settings(config: RunConfig) -> tuple:
    """``(num_images, image_size, seed, layout[, "vqa_evidence"])`` of the configured synthetic world, data_tools'
    defaults filled in (the last only when set, so that the cache of every other world keeps its key)."""
    from data_tools import synth

    s = config.data.synth
    return (
        s.num_images if s.num_images is not None else synth.DEFAULT_NUM_IMAGES,
        s.image_size if s.image_size is not None else synth.DEFAULT_IMAGE_SIZE,
        s.seed,
        s.layout,
    ) + (("vqa_evidence",) if s.vqa_evidence else ())


def _code_digest(module) -> str:
    return hashlib.sha256(Path(module.__file__).read_bytes()).hexdigest()  # changed code: a new cache entry


def synth_dir(config: RunConfig) -> Path:
    """The cache folder of the synthetic world these settings (and this version of its code) make."""
    from data_tools import synth

    return cache_root(config) / f"synth-{_digest(*synth_settings(config), _code_digest(synth))}"


def prepare_data(config: RunConfig, dist: distributed.DistInfo) -> RunConfig:
    """Fills ``data.path`` (generating the synthetic world if needed) and ``model.tokenizer``
    (training one on the data if ``model.tokenizer_vocab_size`` is set). Rank 0 makes, the others wait.
    """
    from data_tools import corpus, storage

    if config.data.path is None:
        folder = synth_dir(config)
        if dist.is_main and not (folder / storage.MANIFEST_NAME).is_file():
            from data_tools import synth

            num_images, image_size, seed, layout, *evidence = synth_settings(config)
            print(f"generating the synthetic world into {folder} (cached for later runs)", flush=True)
            synth.generate(
                str(folder),
                num_images=num_images,
                image_size=image_size,
                seed=seed,
                layout=layout,
                vqa_evidence=bool(evidence),
                command=f"unified-vl data synth --out {folder} --num-images {num_images} --image-size {image_size} "
                f"--seed {seed} --layout {layout}" + (" --vqa-evidence" if evidence else ""),
            )
        config.data.path = str(folder)
    distributed.barrier()
    if config.model.tokenizer is None and config.model.tokenizer_vocab_size and config.model.init is None:
        manifest = storage.read_manifest(config.data.path)
        digest = _digest(manifest, config.model.tokenizer_vocab_size, _code_digest(corpus))
        folder = cache_root(config) / f"tokenizer-{digest}"
        if dist.is_main and not (folder / "tokenizer.json").is_file():
            from unified_vl.tokenizer import train_tokenizer

            print(f"training a tokenizer on {config.data.path} into {folder}", flush=True)
            train_tokenizer(
                corpus.corpus([config.data.path]), out_dir=folder, vocab_size=config.model.tokenizer_vocab_size
            )
        config.model.tokenizer = str(folder)
    distributed.barrier()
    return config


def check_before_start(config: RunConfig) -> None:
    """Existence checks that need no process group and no generated data; run before any process starts.

    Task names against the registry; with ``data.path``, the folder's manifest: every task's training
    split, and that each split named in ``eval.splits`` (when evaluating during training) and
    ``eval.final_splits`` exists for at least one task (a task without it is skipped). Without
    ``data.path`` the splits are the synthetic world's.

    Raises:
        ConfigError: the message names the key, the value and what the data has.
        StorageError: ``data.path`` is not a complete dataset.
    """
    check_task_names(config)
    if config.data.path is None:
        from data_tools import synth

        available = {task: dict.fromkeys(synth.SPLITS, 1) for task in config.data.tasks}
    else:
        from data_tools import storage

        available = storage.available(config.data.path)
        check_tasks_and_data(config)
    have = sorted({s for t in config.data.tasks for s in available.get(t, {})})
    used = [("eval.final_splits", config.eval.final_splits)]
    if config.eval.every:
        used.append(("eval.splits", config.eval.splits))
    held_out = [s for s in ("val", "test", *have) if s in have and s != config.data.train_split][:1]
    for key, splits in used:
        for split in splits:
            if not any(split in available.get(t, {}) for t in config.data.tasks):
                where = config.data.path or "the synthetic world"
                hint = f"set {key}=[{held_out[0]}]" if held_out else f"set {key}=[]"
                if key == "eval.splits":
                    hint += " or eval.every=0"
                raise ConfigError(
                    f"{key}: no task of data.tasks has a split {split!r} in {where}; the splits there: "
                    f"{', '.join(have) or 'none'} ({hint})"
                )


def check_tasks_and_data(config: RunConfig) -> None:
    """Every configured task has a training split in the data folder (and vqa is one, for ``train.answer_prior``).

    Raises:
        ConfigError: a task the data folder lacks (the message lists what it has).
    """
    from data_tools import storage

    available = storage.available(config.data.path)
    have = ", ".join(f"{t} ({'/'.join(s)})" for t, s in available.items()) or "nothing"
    for task in config.data.tasks:
        if config.data.train_split not in available.get(task, {}):
            raise ConfigError(
                f"data.tasks names {task!r} but the data folder {config.data.path} has no "
                f"{task}/{config.data.train_split}; it has: {have}"
            )
    if config.train.answer_prior and "vqa" not in config.data.tasks:
        raise ConfigError(
            f"train.answer_prior={config.train.answer_prior} weighs a prior over VQA answers, but data.tasks "
            f"has no vqa (it has {', '.join(config.data.tasks)})"
        )


def record_images(record: Mapping) -> Any:
    """What a record's prompt comes with: its image, or no image (``[]``) for a text-only record."""
    image = record.get("image")
    return image if image is not None else []


def make_example(task_name: str, record: Mapping, rng: random.Random) -> Example:
    """A record -> (image, instruction, target) through its task; the template and target are drawn with ``rng``."""
    import tasks

    task = tasks.get_task(task_name)
    return Example(
        image=record_images(record),
        prompt=task.prompt(record, rng=rng),
        target=task.target(record, rng=rng),
    )


def training_data(config: RunConfig) -> TrainData:
    """The training split of every configured task, memory-mapped (images decode on access).

    Records become examples through the method's ``make_example`` when it has one (CPT paints the
    image), else through the task's templates; with ``data.augment.shift`` (or ``scale``) each record's
    image is first translated (zoomed) at random, its boxes with it (`data_tools.augment`); with
    ``data.target_order=position`` a target that lists boxes lists them in reading order.
    """
    from data_tools import storage
    from unified_vl.prompting import get_method

    method = get_method(config.method.name)
    examples = make_example
    if method.make_example is not None:
        options = method.resolve_options(config.method.options)
        examples = functools.partial(_method_example, method.make_example, options=options)
    if config.data.target_order == "position":
        # Inside the shift: the order is that of the boxes the example is made from.
        examples = functools.partial(_ordered_example, examples)
    if config.data.augment.shift > 0 or config.data.augment.scale > 0:
        # Before the method's hook, so that CPT paints the boxes where the shifted image has them.
        examples = functools.partial(_shifted_example, examples, augment=config.data.augment)
    datasets = {task: storage.load_split(config.data.path, task, config.data.train_split) for task in config.data.tasks}
    from tasks.vqa import ANSWER_MARKER  # lazily, as the other task imports here

    prior = answer_prior_of(datasets) if config.train.answer_prior else None
    markers = {"vqa": ANSWER_MARKER} if "vqa" in datasets else {}  # train.answer_weight: VQA's evidence targets
    return TrainData(datasets, examples, prior, markers)


def _column(records: Sequence, name: str) -> list:
    """One field of every record; a datasets.Dataset reads the column without decoding the images."""
    names = getattr(records, "column_names", None)
    if names is not None:
        return list(records[name]) if name in names else [None] * len(records)
    return [record.get(name) for record in records]


def answer_prior_of(datasets: Mapping[str, Sequence]) -> Callable[[str, int], Mapping[str, float] | None]:
    """``train.answer_prior``'s question-only prior for each VQA training record (`tasks.vqa.QuestionPrior`).

    Counted from the whole training split; other tasks' records have none, and nor has a VQA record with
    grounded evidence (its target starts with the evidence, not the answer the prior weighs).
    """
    from tasks.vqa import QuestionPrior

    vqa = datasets["vqa"]
    questions, answers, types = (_column(vqa, name) for name in ("question", "answers", "question_type"))
    grounded = [phrases is not None for phrases in _column(vqa, "evidence_phrases")]
    rows = [
        {"question": q, "answers": a, "question_type": t} for q, a, t in zip(questions, answers, types, strict=True)
    ]
    # Memoised per question: a synthetic world repeats a few hundred questions; VQAv2 repeats few.
    prior = functools.lru_cache(maxsize=4096)(QuestionPrior(rows))

    def answer_prior(task: str, index: int) -> Mapping[str, float] | None:
        return prior(questions[index], types[index]) if task == "vqa" and not grounded[index] else None

    return answer_prior


def _shifted_example(inner, task_name: str, record: Mapping, rng: random.Random, *, augment: AugmentConfig) -> Example:
    import tasks
    from data_tools.augment import shift_record

    if augment.tasks is not None and task_name not in augment.tasks:
        return inner(task_name, record, rng)  # draws nothing: the example an unshifted run makes
    shifted = shift_record(
        tasks.get_task(task_name),
        record,
        rng,
        augment.shift,
        content_threshold=augment.content_threshold,
        max_scale=augment.scale,
    )
    return inner(task_name, shifted, rng)


def _ordered_example(inner, task_name: str, record: Mapping, rng: random.Random) -> Example:
    import tasks

    reorder = tasks.get_task(task_name).order_by_position
    return inner(task_name, record if reorder is None else reorder(record), rng)


def _method_example(hook, task_name: str, record: Mapping, rng: random.Random, *, options) -> Example:
    return hook(task_name, record, rng, options)


def check_task_names(config: RunConfig) -> None:
    """Every task named in ``data.tasks`` and ``data.augment.tasks`` is a known task."""
    import tasks

    for key, names in (("data.tasks", config.data.tasks), ("data.augment.tasks", config.data.augment.tasks or [])):
        unknown = [t for t in names if t not in tasks.TASKS]
        if unknown:
            raise ConfigError(f"{key}: unknown task(s) {unknown}; known tasks: {', '.join(sorted(tasks.TASKS))}")


def preflight(config: RunConfig) -> distributed.DistInfo:
    """Checks that need no data (task names, batch arithmetic, precision), then joins the process group."""
    check_task_names(config)
    derive(config, distributed.world_size_from_env())
    check_precision(config.train.precision)
    return distributed.init_distributed()


def relaunch_locally(config: RunConfig, job: str, argv: Sequence[str]) -> int | None:
    """Runs the job as ``train.local_processes`` processes on this machine and returns their status.

    None when this process should run the job itself: one process asked for (or one GPU), or the
    process already runs under a launcher (``RANK`` and ``WORLD_SIZE`` are set). The batch arithmetic is checked
    for the new world size first, so that a bad setting fails here and not in every child.
    """
    import subprocess

    import torch

    processes = config.train.local_processes
    if torch.cuda.is_available():
        processes = min(processes, torch.cuda.device_count())  # NCCL needs a GPU per process
    if processes <= 1 or distributed.launched():
        return None
    derive(config, processes)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    command += ["-m", "unified_vl.app.cli", job, *argv]
    print(f"starting {processes} processes: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    return subprocess.run(command, check=False).returncode


def run_main(body, argv: Sequence[str]) -> int:
    """Runs a job body, turning configuration and data errors into one clear line and exit status 2/1."""
    from data_tools.storage import StorageError
    from unified_vl.checkpoint import CheckpointError, ModelFileError
    from unified_vl.engine.trainer import NonFiniteError
    from unified_vl.prompting import MethodError

    try:
        return body(strip_launcher_args(argv))
    except ModelFileError:
        raise  # unified_vl.app.cli.exit_2_on_bad_model_files: one line, status 2
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # MethodError: a record the method refuses
    except (CheckpointError, StorageError, FileNotFoundError, NonFiniteError, MethodError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The flags every training job has besides ``[CONFIG.yaml] [KEY=VALUE ...]``."""
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in output_dir from its latest checkpoint"
    )


def config_from(path: str | None, overrides: list[str], *, defaults: dict, resume: bool) -> RunConfig:
    """The run config: job defaults <- the YAML file <- ``KEY=VALUE`` (``--resume`` is ``resume=true``)."""
    return load_config(path, [*overrides, *(["resume=true"] if resume else [])], defaults=defaults)
