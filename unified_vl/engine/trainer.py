"""The training loop on DeepSpeed: build -> initialize -> for each step: batch, forward, backward,
step -> maybe evaluate -> maybe checkpoint -> export.

The engine knows nothing about tasks: the application layer (``unified_vl.app.jobs``) passes the
training records per task, a function that turns a record into an `Example` (image, instruction,
target) and an `Evaluator`. DeepSpeed is imported here and in the other ``engine`` modules only.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from unified_vl.checkpoint import CheckpointError, atomic_write_text
from unified_vl.config import UnifiedVLConfig
from unified_vl.engine import distributed
from unified_vl.engine.checkpoints import CheckpointManager
from unified_vl.engine.config import ConfigError, Derived, RunConfig, deepspeed_config, derive, dump_yaml
from unified_vl.engine.export import SPEC, export_checkpoint, export_model
from unified_vl.engine.mixture import MixtureSampler, few_shot_indices, mixture_probabilities, shard
from unified_vl.engine.monitor import Monitor
from unified_vl.tokenizer import loc_token_ids

# Architecture fields that must agree between a checkpoint and the model built to resume it.
ARCH_FIELDS = ("vision_model", "vision_kwargs", "vision_out_index", "image_size", "num_bins", "visual_mode")
ARCH_TEXT_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads")


@dataclass
class Example:
    """One training example as text and an image."""

    image: Any  # PIL image, numpy array or path (what the processor reads)
    prompt: str  # the instruction (encoder text)
    target: str  # the decoder text


class Evaluator(Protocol):
    """Evaluation by generation; implemented by the application layer (``unified_vl.app.jobs.evaluate``)."""

    def generate(
        self, model: Any, processor: Any, *, split: str, max_examples: int | None, rank: int, world_size: int
    ) -> dict[str, list[tuple[int, str]]]:
        """Texts generated for this rank's share of ``split``: ``{task: [(record index, text)]}``."""

    def score(
        self, texts: dict[str, list[tuple[int, str]]], *, split: str, max_examples: int | None
    ) -> dict[str, float]:
        """Metrics ``{task}/{split}/{metric}`` of all ranks' texts (called on rank 0), and
        ``mean/{split}/primary``, the mean of the tasks' primary metrics (the default for the best checkpoint)."""


@dataclass
class TrainData:
    """What the engine trains on.

    Attributes:
        datasets: task -> its training records (anything indexable with ``len``: a ``datasets.Dataset``).
        make_example: ``make_example(task, record, rng) -> Example``; ``rng`` is a ``random.Random``
            seeded from (seed, step, slot), so prompts and targets are reproducible.
    """

    datasets: Mapping[str, Sequence]
    make_example: Callable[[str, Mapping, random.Random], Example]


@dataclass
class TrainResult:
    """What a finished (or time-bounded) run produced."""

    run_dir: Path
    model_dir: Path | None  # the exported Hugging Face folder
    steps: int
    losses: list[float] = field(default_factory=list)  # mean training loss of each step of this process's run
    metrics: dict[str, float] = field(default_factory=dict)  # final evaluation
    samples_per_s: float = 0.0
    train_seconds: float = 0.0


class TimeBudget:
    """Fits the schedule's length to a time budget from the measured step time, re-measured as it goes.

    The first steps of a process include one-off costs (allocations, DeepSpeed's first all-reduce)
    and are skipped; after that the horizon is re-estimated every ``window`` steps from the mean
    speed since then, so a machine that slows down (a shared CPU) still ends with a decayed rate,
    without the jitter a per-window estimate puts into the learning rate.
    """

    def __init__(self, minutes: float, *, max_steps: int, skip: int = 5, window: int = 20):
        self.seconds, self.max_steps, self.skip, self.window = minutes * 60, max_steps, skip, window
        self.mark: tuple[int, float] | None = None  # (step, seconds) where the measurement began

    def update(self, steps_this_process: int, step: int, seconds: float) -> int | None:
        """A new horizon every ``window`` steps, else None."""
        if steps_this_process == self.skip:
            self.mark = (step, seconds)
        if self.mark is None or step == self.mark[0] or (step - self.mark[0]) % self.window:
            return None
        per_step = (seconds - self.mark[1]) / (step - self.mark[0])
        return max(step + 1, min(self.max_steps, step + int((self.seconds - seconds) / max(per_step, 1e-9))))


class LRSchedule:
    """Linear warm-up to the peak, then cosine / linear decay to ``min_ratio`` at ``horizon`` (a factor of lr).

    A callable object rather than a function so that ``LambdaLR.state_dict`` saves ``horizon``,
    which a time-bounded run sets once it has measured its speed.
    """

    def __init__(self, *, warmup_steps: int, horizon: int, kind: str, min_ratio: float):
        self.warmup_steps, self.horizon, self.kind, self.min_ratio = warmup_steps, horizon, kind, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.horizon - self.warmup_steps))
        if self.kind == "cosine":
            return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0 - (1 - self.min_ratio) * progress


# -- building ---------------------------------------------------------------------------------


def build_model_and_processor(config: RunConfig):
    """The model and processor a run starts from: a preset (+ overrides) or the folder ``model.init``."""
    from unified_vl.checkpoint import load_pretrained
    from unified_vl.modeling import build_model
    from unified_vl.processor import UnifiedVLProcessor
    from unified_vl.tokenizer import load_tokenizer

    m = config.model
    if m.init is not None:
        return load_pretrained(m.init)  # CheckpointError for anything that is not a unified-vl folder
    tokenizer = load_tokenizer(m.tokenizer)
    overrides = {k: v for k, v in m.overrides.items() if k != "text_config"}
    text = {"vocab_size": len(tokenizer), **m.overrides.get("text_config", {})}
    model_config = UnifiedVLConfig.from_preset(m.preset or "uvl-tiny", text_config=text, **overrides)
    model = build_model(model_config, tokenizer)
    processor = UnifiedVLProcessor.from_config(model_config, tokenizer, vision_backbone=model.visual.backbone)
    return model, processor


def architecture(model_config) -> dict:
    arch = {k: getattr(model_config, k) for k in ARCH_FIELDS}
    arch["text_config"] = {k: model_config.text_config.get(k) for k in ARCH_TEXT_FIELDS}
    return arch


def check_architecture(saved: dict, model_config, where: Path) -> None:
    """Raises `CheckpointError` when the run's saved architecture differs from the model built now."""
    now = architecture(model_config)
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}"
        for k in now
        if saved.get(k) != now[k] and k != "text_config"
    ]
    diffs += [
        f"text_config.{k}: checkpoint {saved.get('text_config', {}).get(k)!r} vs now {v!r}"
        for k, v in now["text_config"].items()
        if saved.get("text_config", {}).get(k) != v
    ]
    if diffs:
        raise CheckpointError(
            f"the checkpoint in {where} is of another architecture than the model configured now:\n  "
            + "\n  ".join(diffs)
            + "\nresume with the run's own config (its config.yaml) or start a new output_dir"
        )


def freeze(model: torch.nn.Module, prefixes: Sequence[str]) -> int:
    """Turns off gradients of parameters whose name starts with a prefix; returns how many are frozen."""
    names = [n for n, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(n == prefix or n.startswith(prefix + ".") for n in names):
            tops = sorted({n.split(".")[0] for n in names} | {".".join(n.split(".")[:2]) for n in names})
            raise ConfigError(
                f"train.freeze: {prefix!r} matches no parameter; parameter prefixes include: {', '.join(tops)}"
            )
    frozen = 0
    for name, param in model.named_parameters():
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on biases and norm weights (1-D), as nanoGPT's configure_optimizers."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2]
    no_decay = [p for n, p in trainable if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def initialize(model: torch.nn.Module, config: RunConfig, derived: Derived, schedule: LRSchedule):
    """``deepspeed.initialize`` with AdamW, the schedule and the derived DeepSpeed config."""
    import deepspeed

    o = config.optim
    groups = [g for g in param_groups(model, o.weight_decay) if g["params"]]
    if config.train.offload_optimizer:
        # ZeRO-Offload steps the optimizer on the CPU; DeepSpeed insists on its vectorised CPU Adam
        # there (JIT-built on first use, then cached in TORCH_EXTENSIONS_DIR).
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(config, derived)
    )
    return engine


def collate(
    items: Sequence[tuple[int, str, int]], data: TrainData, processor, *, seed: int, step: int
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Micro batch of (slot, task, index) -> the model's tensors and each row's task."""
    examples, tasks = [], []
    for slot, task, index in items:
        rng = random.Random(f"{seed}:{step}:{slot}")  # string seeds hash with SHA-512: stable across runs
        examples.append(data.make_example(task, data.datasets[task][index], rng))
        tasks.append(task)
    batch = processor([e.image for e in examples], [e.prompt for e in examples], [e.target for e in examples])
    return batch, tasks


def token_losses(
    logits: torch.Tensor, labels: torch.Tensor, *, loc_ids: torch.Tensor | None = None, loc_sigma: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed cross-entropy (B,) and target token counts (B,).

    With ``loc_sigma > 0`` a location target ``<loc_t>`` is the distribution over the bins ``b``
    proportional to ``exp(-(b - t)^2 / (2 sigma^2))`` instead of one-hot (SimCC, Li et al. 2022).
    """
    mask = labels != -100  # (B, L)
    logp = logits.float().log_softmax(dim=-1)  # (B, L, V)
    nll = -logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]  # (B, L)
    if loc_sigma > 0 and loc_ids is not None:
        lookup = torch.full((logits.shape[-1],), -1, dtype=torch.long, device=labels.device)
        lookup[loc_ids] = torch.arange(len(loc_ids), device=labels.device)
        bins = lookup[labels.clamp(min=0)].masked_fill(~mask, -1)  # (B, L): the target's bin, or -1
        is_loc = bins >= 0
        if is_loc.any():
            grid = torch.arange(len(loc_ids), device=labels.device, dtype=torch.float32)  # (num_bins,)
            soft = torch.softmax(-((grid[None, :] - bins[is_loc][:, None]) ** 2) / (2 * loc_sigma**2), dim=-1)
            nll = nll.masked_scatter(is_loc, -(soft * logp[is_loc][:, loc_ids]).sum(-1))  # (N_loc,) into (B, L)
    nll = nll * mask
    return nll.sum(dim=1), mask.sum(dim=1)


def check_precision(precision: str) -> None:
    if precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError(
            "train.precision=fp16 needs a GPU (DeepSpeed's fp16 loss scaling runs on CUDA); on the CPU use fp32 or bf16"
        )


# -- the run ----------------------------------------------------------------------------------


def prepare_run_dir(config: RunConfig, job: str, dist: distributed.DistInfo) -> Path:
    """The run folder, the same on every rank; refuses to overwrite another run's checkpoints."""
    name = config.output_dir or f"runs/{job}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(distributed.broadcast_object(name))
    has_checkpoint = (run_dir / "checkpoints" / "latest").is_file()
    if config.resume and not has_checkpoint:
        raise CheckpointError(f"resume: {run_dir} has no checkpoint to resume (no checkpoints/latest)")
    if not config.resume and has_checkpoint:
        raise CheckpointError(
            f"{run_dir} already holds a run's checkpoints; pass --resume (resume=true) to continue it, "
            "or choose another output_dir"
        )
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    return run_dir


def train(config: RunConfig, data: TrainData, *, evaluator: Evaluator | None = None, job: str = "train") -> TrainResult:
    """Trains (or resumes) one run; see the module docstring for the order of work.

    Everything that can be checked is checked before the first step: the config, the batch
    arithmetic, the precision, the data, the resume checkpoint's architecture.
    """
    # -- build --------------------------------------------------------------------------------
    t, c = config.train, config.checkpoint
    derive(config, distributed.world_size_from_env())  # the batch arithmetic fails before any setup
    check_precision(t.precision)
    missing = [task for task in config.data.tasks if task not in data.datasets]
    if missing:
        raise ConfigError(f"data.tasks names {missing} but no training records were given for them")
    datasets = {task: data.datasets[task] for task in config.data.tasks}
    if config.data.shots:
        small = {task: len(ds) for task, ds in datasets.items() if len(ds) < config.data.shots}
        if small:
            raise ConfigError(f"data.shots={config.data.shots} but these tasks have fewer training examples: {small}")
        datasets = {
            task: _Subset(ds, few_shot_indices(len(ds), config.data.shots, seed=t.seed, task=task))
            for task, ds in datasets.items()
        }
    dist = distributed.init_distributed()
    derived = derive(config, dist.world_size)
    run_dir = prepare_run_dir(config, job, dist)
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    random.seed(t.seed)
    np.random.seed(t.seed)
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    model, processor = build_model_and_processor(config)
    if config.resume:
        check_architecture(architecture(UnifiedVLConfig.from_pretrained(run_dir / SPEC)), model.config, run_dir)
    frozen = freeze(model, t.freeze)
    torch.manual_seed(t.seed + dist.rank)  # dropout streams differ between ranks
    data = TrainData(datasets, data.make_example)
    sizes = {task: len(ds) for task, ds in data.datasets.items()}
    probs = mixture_probabilities(
        sizes, config.data.tasks, weighting=config.data.weighting, temperature=config.data.temperature
    )
    sampler = MixtureSampler(sizes, probs, seed=t.seed, global_batch_size=t.global_batch_size)
    if dist.is_main:
        suffix = "" if not config.resume else f"-resume-{time.strftime('%Y%m%d-%H%M%S')}"
        atomic_write_text(run_dir / f"config{suffix}.yaml", dump_yaml(config, derived))
        atomic_write_text(run_dir / "ds_config.json", json.dumps(deepspeed_config(config, derived), indent=2))
        if not config.resume:  # everything but the weights, for offline export (engine/export.py)
            model.config.save_pretrained(run_dir / SPEC)
            processor.save_pretrained(run_dir / SPEC)

    # -- initialize ---------------------------------------------------------------------------
    schedule = LRSchedule(
        warmup_steps=config.optim.warmup_steps,
        horizon=t.max_steps,
        kind=config.optim.schedule,
        min_ratio=config.optim.min_lr_ratio,
    )
    engine = initialize(model, config, derived, schedule)
    best_metric = c.best_metric or (
        f"mean/{config.eval.splits[0]}/primary" if evaluator and config.eval.splits else None
    )
    checkpoints = CheckpointManager(run_dir / "checkpoints", dist=dist, keep_last=c.keep_last, best_metric=best_metric)
    step, train_seconds = 0, 0.0
    if config.resume:
        client = checkpoints.load(engine)  # model, optimizer, scheduler (with its horizon), RNG
        sampler.load_state_dict(client["sampler"])
        step, train_seconds = client["step"], client["train_seconds"]
        # The checkpoint restored the schedule; the config may have changed its length (training
        # longer). A time-bounded run keeps the horizon it measured.
        schedule.horizon = min(schedule.horizon, t.max_steps) if t.max_minutes is not None else t.max_steps
    budget = TimeBudget(t.max_minutes, max_steps=t.max_steps) if t.max_minutes is not None else None
    monitor = Monitor(run_dir, enabled=dist.is_main, total_steps=schedule.horizon, initial_step=step)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    monitor.write(
        f"run {run_dir}: {trainable / 1e6:.2f}M trainable parameters ({frozen / 1e6:.2f}M frozen), world size "
        f"{dist.world_size}, global batch {t.global_batch_size} = {t.micro_batch_size} x {dist.world_size} ranks x "
        f"{derived.gradient_accumulation_steps} accumulation, ZeRO {t.zero_stage}, {t.precision}; mixture "
        + ", ".join(f"{k} {v:.2f}" for k, v in probs.items())
    )

    def client_state() -> dict:
        return {"step": step, "sampler": sampler.state_dict(), "train_seconds": train_seconds}

    # -- the loop -----------------------------------------------------------------------------
    losses: list[float] = []
    start_step, start_seconds, tic = step, train_seconds, time.perf_counter()
    metrics: dict[str, float] = {}
    last_saved = step if config.resume else -1
    tasks = list(sampler.tasks)
    loc_ids = torch.tensor(loc_token_ids(processor.tokenizer, processor.num_bins), device=engine.device)
    while step < schedule.horizon:
        engine.train()
        slots = [(i, task, index) for i, (task, index) in enumerate(sampler.next_step())]
        # Micro batches of one task pad less (a grounding target is 10x a classification one);
        # the order is a function of the step alone, so every world size cuts the same batches.
        slots.sort(key=lambda slot: (tasks.index(slot[1]), slot[0]))
        sums = np.zeros(2 + 2 * len(tasks))  # [sum of micro-batch losses, micro batches, per task: CE sum, tokens]
        for micro in shard(slots, rank=dist.rank, world_size=dist.world_size, micro_batch_size=t.micro_batch_size):
            batch, row_tasks = collate(micro, data, processor, seed=t.seed, step=step)
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            out = engine(**batch)
            ce, count = token_losses(out.logits, batch["labels"], loc_ids=loc_ids, loc_sigma=t.loc_sigma)  # (B,), (B,)
            if t.loss_reduction == "sample":
                loss = (ce / count.clamp(min=1)).mean()
            else:  # T5's own loss where it is the same, so that the model's loss is what is trained
                loss = out.loss if t.loc_sigma == 0 else ce.sum() / count.sum().clamp(min=1)
            engine.backward(loss)
            engine.step()
            sums[0] += loss.item()
            sums[1] += 1
            for task, row_ce, row_count in zip(row_tasks, ce.tolist(), count.tolist(), strict=True):
                sums[2 + 2 * tasks.index(task) : 4 + 2 * tasks.index(task)] += (row_ce, row_count)
        step += 1
        now = time.perf_counter()
        train_seconds = start_seconds + (now - tic)
        # Rank 0's clock decides when time is up: every rank must stop at the same step.
        reduced = distributed.all_reduce_sum([*sums, train_seconds if dist.is_main else 0.0])
        train_seconds = reduced[-1]
        loss = float(reduced[0] / reduced[1])
        losses.append(loss)
        if budget is not None and (horizon := budget.update(step - start_step, step, train_seconds)) is not None:
            schedule.horizon = horizon  # every rank computes the same: train_seconds is rank 0's
            monitor.set_total(horizon)
        log = step % t.log_every == 0 or step == schedule.horizon
        values = {
            "train/loss": loss,
            "train/lr": engine.get_lr()[0],
            "train/samples_per_s": (step - start_step) * t.global_batch_size / max(train_seconds - start_seconds, 1e-9),
            **{
                f"train/loss/{task}": reduced[2 + 2 * k] / reduced[3 + 2 * k]
                for k, task in enumerate(tasks)
                if reduced[3 + 2 * k]
            },
        }
        monitor.step(step, values, log=log)
        time_up = t.max_minutes is not None and train_seconds >= t.max_minutes * 60
        done = step >= schedule.horizon or time_up
        if evaluator and config.eval.every and step % config.eval.every == 0 and not done:
            metrics = evaluate(
                engine,
                processor,
                evaluator,
                config,
                dist,
                splits=config.eval.splits,
                max_examples=config.eval.max_examples,
            )
            monitor.eval(step, metrics)
        if c.every and step % c.every == 0 and not done:
            checkpoints.save(engine, step, client_state(), metrics)
            last_saved = step
        if time_up:
            monitor.write(f"time budget of {t.max_minutes} min reached at step {step}")
            break

    # -- the end: checkpoint, final evaluation, export -----------------------------------------
    if evaluator and config.eval.every and step != last_saved:
        metrics = evaluate(
            engine, processor, evaluator, config, dist, splits=config.eval.splits, max_examples=config.eval.max_examples
        )
        monitor.eval(step, metrics)
    if step != last_saved:
        checkpoints.save(engine, step, client_state(), metrics)
    final: dict[str, float] = {}
    if evaluator and config.eval.final_splits:
        final = evaluate(engine, processor, evaluator, config, dist, splits=config.eval.final_splits, max_examples=None)
        monitor.eval(step, final)
        if dist.is_main:
            atomic_write_text(run_dir / "eval_final.json", json.dumps({"step": step, "metrics": final}, indent=2))
    model_dir = (
        export_model(engine, processor, run_dir / "model", dist=dist, zero_stage=t.zero_stage) if c.export else None
    )
    best = checkpoints.index().get("best")
    if c.export and dist.is_main and best and best["tag"] != checkpoints.latest_tag():
        export_checkpoint(run_dir, run_dir / "model-best", tag=best["tag"])
        monitor.write(
            f"best checkpoint {best['tag']} ({best['metric']} = {best['value']:.4f}) -> {run_dir / 'model-best'}"
        )
    monitor.close()
    elapsed = train_seconds - start_seconds
    return TrainResult(
        run_dir=run_dir,
        model_dir=model_dir,
        steps=step,
        losses=losses,
        metrics=final,
        samples_per_s=(step - start_step) * t.global_batch_size / elapsed if elapsed > 0 else 0.0,
        train_seconds=train_seconds,
    )


def evaluate(
    engine, processor, evaluator: Evaluator, config: RunConfig, dist: distributed.DistInfo, *, splits, max_examples
) -> dict[str, float]:
    """Generation on every rank's share, metrics on rank 0, the same dict returned on every rank.

    Under ZeRO-3 every forward pass gathers parameters collectively, so all ranks must run the
    same number of passes: each then generates the whole split (the same texts) instead of a share.
    """
    engine.eval()
    rank, world = (0, 1) if config.train.zero_stage == 3 else (dist.rank, dist.world_size)
    metrics: dict[str, float] = {}
    for split in splits:
        with torch.no_grad():
            texts = evaluator.generate(
                engine.module, processor, split=split, max_examples=max_examples, rank=rank, world_size=world
            )
        gathered = distributed.all_gather_object(texts) if world > 1 else [texts]
        if dist.is_main:
            merged: dict[str, list[tuple[int, str]]] = {}
            for part in gathered:
                for task, rows in part.items():
                    merged.setdefault(task, []).extend(rows)
            metrics.update(evaluator.score(merged, split=split, max_examples=max_examples))
    engine.train()
    return distributed.broadcast_object(metrics)


class _Subset:
    """Rows ``indices`` of a dataset (few-shot training sets)."""

    def __init__(self, dataset: Sequence, indices: Sequence[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[self.indices[i]]
