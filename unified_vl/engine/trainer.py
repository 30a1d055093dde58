"""The training loop on DeepSpeed: build -> initialize -> for each step: batch, forward, backward,
step -> maybe evaluate -> maybe checkpoint -> export.

The engine knows nothing about tasks: the application layer (``unified_vl.app.jobs``) passes the
training records per task, a function that turns a record into an `Example` (image, instruction,
target) and an `Evaluator`. DeepSpeed is imported here and in the other ``engine`` modules only.
"""

from __future__ import annotations

import functools
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

from unified_vl.adapters import base_identity, method_weights
from unified_vl.checkpoint import CheckpointError, atomic_write_text
from unified_vl.config import UnifiedVLConfig
from unified_vl.engine import distributed, sharpness
from unified_vl.engine.averaging import WeightAverage
from unified_vl.engine.checkpoints import CheckpointManager
from unified_vl.engine.config import ConfigError, Derived, RunConfig, TrainConfig, deepspeed_config, derive, dump_yaml
from unified_vl.engine.debias import FirstTokenPrior
from unified_vl.engine.export import SPEC, AdapterSpec, export_adapter, export_checkpoint, export_model
from unified_vl.engine.mixture import MixtureSampler, few_shot_indices, mixture_probabilities, shard
from unified_vl.engine.monitor import Monitor
from unified_vl.engine.selection import BestWeights
from unified_vl.prompting import get_method
from unified_vl.tokenizer import loc_token_ids, model_vocab_size

# Architecture fields that must agree between a checkpoint and the model built to resume it.
ARCH_FIELDS = (
    "vision_model",
    "vision_kwargs",
    "vision_out_index",
    "vision_stem",
    "vision_pooled_token",
    "relation_tokens",
    "image_size",
    "num_bins",
    "visual_mode",
    "prefix_length",
)
# What a checkpoint saved before a field existed had: the field's default then.
ARCH_DEFAULTS = {"vision_pooled_token": False, "relation_tokens": 0}
ARCH_TEXT_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads")


class NonFiniteError(RuntimeError):
    """Training reached a non-finite loss, gradient norm or weight: the run stops at that step, and
    neither a checkpoint nor a model folder is written from it (the message names the step)."""


@dataclass
class Example:
    """One training example as text and an image."""

    # PIL image, numpy array or path (what the processor reads); a list of them for a prompt with
    # one <image> placeholder per image ([]: a text-only example)
    image: Any
    prompt: str  # the instruction (encoder text)
    target: str  # the decoder text


class Evaluator(Protocol):
    """Evaluation by generation; implemented by the application layer (``unified_vl.app.jobs.evaluate``)."""

    def generate(
        self, model: Any, processor: Any, *, split: str, max_examples: int | None, rank: int, world_size: int
    ) -> dict[str, list[tuple[int, str]]]:
        """Texts generated for this rank's share of ``split``: ``{task: [(record index, text)]}``.

        The final evaluation also passes ``with_scores=True``: rows are then ``(record index, text, score)``.
        """

    def score(
        self, texts: dict[str, list[tuple[int, str]]], *, split: str, max_examples: int | None
    ) -> dict[str, float]:
        """Metrics ``{task}/{split}/{metric}`` of all ranks' texts (called on rank 0), and
        ``mean/{split}/primary``, the mean of the tasks' primary metrics (the default for the best checkpoint).

        The final evaluation also passes ``predictions_file=`` (``RUN_DIR/predictions/{split}.jsonl``):
        the evaluator writes each record's prediction there."""


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
    # ``answer_prior(task, index) -> {target text: probability}`` or None: the question-only prior of
    # record ``index`` of ``datasets[task]``, for ``train.answer_prior`` (None: that record has none).
    answer_prior: Callable[[str, int], Mapping[str, float] | None] | None = None
    # ``{task: marker}``: the text after which a target of that task holds its answer (VQA with grounded
    # evidence: ``tasks.vqa.ANSWER_MARKER``), for ``train.answer_weight``; the jobs fill it (the engine
    # knows no task's format).
    answer_markers: Mapping[str, str] = field(default_factory=dict)


@dataclass
class TrainResult:
    """What a finished (or time-bounded) run produced."""

    run_dir: Path
    model_dir: Path | None  # the exported Hugging Face folder (the adapter folder, for adapter methods)
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

    @classmethod
    def of(cls, config: RunConfig) -> LRSchedule:
        """The run's schedule over ``train.max_steps`` (a time-bounded run shortens it once it has measured)."""
        o = config.optim
        return cls(
            warmup_steps=o.warmup_steps, horizon=config.train.max_steps, kind=o.schedule, min_ratio=o.min_lr_ratio
        )

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
    text = {"vocab_size": model_vocab_size(tokenizer), **m.overrides.get("text_config", {})}
    model_config = UnifiedVLConfig.from_preset(m.preset or "uvl-tiny", text_config=text, **overrides)
    model = build_model(model_config, tokenizer)
    processor = UnifiedVLProcessor.from_config(model_config, tokenizer, vision_backbone=model.visual.backbone)
    return model, processor


def architecture(model_config) -> dict:
    arch = {k: getattr(model_config, k) for k in ARCH_FIELDS}
    arch["text_config"] = {k: getattr(model_config.text_config, k, None) for k in ARCH_TEXT_FIELDS}
    return arch


def check_architecture(saved: dict, model_config, where: Path) -> None:
    """Raises `CheckpointError` when the run's saved architecture differs from the model built now."""
    now = architecture(model_config)
    diffs = [
        f"{k}: checkpoint {saved.get(k, ARCH_DEFAULTS.get(k))!r} vs now {now[k]!r}"
        for k in now
        if saved.get(k, ARCH_DEFAULTS.get(k)) != now[k] and k != "text_config"
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


def under(name: str, prefix: str) -> bool:
    """Whether parameter ``name`` lies under the module path ``prefix`` ("visual" reaches "visual.proj.weight",
    not "visual_extra.weight")."""
    return name == prefix or name.startswith(prefix.rstrip(".") + ".")


def freeze(model: torch.nn.Module, prefixes: Sequence[str]) -> int:
    """Turns off gradients of parameters whose name starts with a prefix; returns how many are frozen."""
    names = [n for n, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(under(n, prefix) for n in names):
            tops = sorted({n.split(".")[0] for n in names} | {".".join(n.split(".")[:2]) for n in names})
            raise ConfigError(
                f"train.freeze: {prefix!r} matches no parameter; parameter prefixes include: {', '.join(tops)}"
            )
    frozen = 0
    for name, param in model.named_parameters():
        if any(under(name, p) for p in prefixes):
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


def frozen_prefixes(model: torch.nn.Module, configured: Sequence[str] | None) -> list[str]:
    """``train.freeze`` when set, else the prefixes the model keeps frozen by design (its visual mode's)."""
    return list(configured) if configured is not None else list(getattr(model, "frozen_by_design", []))


def param_groups(
    model: torch.nn.Module, weight_decay: float, lr: float, lr_scale: dict[str, float] | None = None
) -> list[dict]:
    """AdamW groups: decay on matrices, none on biases and norm weights (1-D), as nanoGPT's configure_optimizers.

    With ``lr_scale`` ({parameter-name prefix: multiplier}) each parameter takes the multiplier of the
    longest prefix it starts with (1 where none does), and groups are split by multiplier: a group's
    ``lr`` is ``lr * multiplier``, which the schedule then scales. A prefix that matches no trainable
    parameter raises ConfigError, naming the prefix.
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    scales = lr_scale or {}

    def scale_of(name: str) -> float:
        matches = [prefix for prefix in scales if under(name, prefix)]
        return scales[max(matches, key=len)] if matches else 1.0

    for prefix in scales:
        if not any(under(name, prefix) for name, _ in trainable):
            raise ConfigError(
                f"optim.lr_scale: no trainable parameter's name starts with {prefix!r} "
                f"(e.g. {', '.join(n for n, _ in trainable[:3])})"
            )
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, p in trainable:
        groups.setdefault((scale_of(name), p.ndim >= 2), []).append(p)
    out = []
    # Decayed groups first, and the base rate's first among them: the engine logs the first group's lr.
    for (scale, decay), params in sorted(
        groups.items(), key=lambda item: (not item[0][1], item[0][0] != 1.0, item[0][0])
    ):
        out.append({"params": params, "weight_decay": weight_decay if decay else 0.0, "lr": lr * scale})
    return out


def batch_norm_statistics_like_weights(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Casts BatchNorm's running statistics to ``dtype``, the dtype DeepSpeed gives every parameter under bf16/fp16.

    DeepSpeed casts the parameters but keeps floating buffers as they are (deepspeed/runtime/engine.py,
    ``_cast_module_mixed_precision``), and torch's ``batch_norm`` refuses a bf16 weight beside fp32 running
    statistics ("expected scalar type BFloat16 but found Float"): without this a convolutional stem
    (``vision_stem=conv``/``conv-deep``) or a timm CNN backbone cannot train in bf16. The export casts them
    back to float32 with the rest of the weights.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for name in ("running_mean", "running_var"):
                buffer = getattr(module, name)
                if buffer is not None:
                    buffer.data = buffer.data.to(dtype)


def initialize(model: torch.nn.Module, config: RunConfig, derived: Derived, schedule: LRSchedule):
    """``deepspeed.initialize`` with AdamW, the schedule and the derived DeepSpeed config."""
    import deepspeed

    o = config.optim
    groups = param_groups(model, o.weight_decay, o.lr, o.lr_scale)  # no empty groups: one per (rate, decay) present
    if config.train.offload_optimizer:
        # ZeRO-Offload steps the optimizer on the CPU; DeepSpeed insists on its vectorised CPU Adam
        # there (JIT-built on first use, then cached in TORCH_EXTENSIONS_DIR).
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    if config.train.precision != "fp32":
        batch_norm_statistics_like_weights(model, torch.bfloat16 if config.train.precision == "bf16" else torch.float16)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(config, derived, hidden_size=model.config.hidden_size),
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
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    loc_ids: torch.Tensor | None = None,
    loc_sigma: float = 0.0,
    label_smoothing: float = 0.0,
    first_token_bias: tuple[torch.Tensor, torch.Tensor] | None = None,
    answer_weight: tuple[Sequence[int], float, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed cross-entropy (B,) and target token counts (B,).

    With ``loc_sigma > 0`` a location target ``<loc_t>`` is the distribution over the bins ``b``
    proportional to ``exp(-(b - t)^2 / (2 sigma^2))`` instead of one-hot (SimCC, Li et al. 2022).
    With ``label_smoothing = e > 0`` every target is mixed with the uniform distribution over the
    vocabulary, ``(1 - e) target + e / V`` (Szegedy et al. 2016, "Rethinking the Inception
    Architecture", section 7; the same loss as ``torch.nn.CrossEntropyLoss(label_smoothing=e)``).
    With ``first_token_bias = (bias (B, V), rows (B,))`` the first target token of the rows marked is
    scored by ``softmax(logits + bias)``: a product of experts with a prior (`engine.debias`).
    With ``answer_weight = (marker ids, w, rows (B,) bool or None: every row)`` the tokens after the first
    marker of a row marked weigh ``w`` in its sum and its count (:func:`answer_token_weights`;
    ``train.answer_weight``).
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
    smooth = logp.mean(dim=-1) if label_smoothing > 0 else None  # (B, L)
    if first_token_bias is not None:
        bias, rows = (x.to(logits.device) for x in first_token_bias)
        logp0 = (logits[:, 0].float() + bias).log_softmax(dim=-1)  # (B, V)
        nll0 = -logp0.gather(-1, labels[:, :1].clamp(min=0))[:, 0]  # (B,)
        nll = torch.cat([torch.where(rows, nll0, nll[:, 0])[:, None], nll[:, 1:]], dim=1)
        if smooth is not None:
            smooth = torch.cat([torch.where(rows, logp0.mean(dim=-1), smooth[:, 0])[:, None], smooth[:, 1:]], dim=1)
    if smooth is not None:
        nll = (1 - label_smoothing) * nll - label_smoothing * smooth
    if answer_weight is not None:
        weights = mask * answer_token_weights(labels, *answer_weight)
        return (nll * weights).sum(dim=1), weights.sum(dim=1)
    nll = nll * mask
    return nll.sum(dim=1), mask.sum(dim=1)


def answer_token_weights(
    labels: torch.Tensor, marker: Sequence[int], weight: float, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, L) float weights: ``weight`` on each token after the first occurrence of ``marker`` (token ids)
    in a row of ``labels`` (of the ``rows`` marked True, when given), 1 elsewhere and on rows without it."""
    out = torch.ones(labels.shape, dtype=torch.float32, device=labels.device)
    m = len(marker)
    if not m or labels.shape[1] < m:
        return out
    windows = labels.unfold(1, m, 1)  # (B, L - m + 1, m)
    hit = (windows == torch.tensor(list(marker), device=labels.device)).all(dim=-1)  # (B, L - m + 1)
    start = hit.float().argmax(dim=1) + m  # the first answer token (argmax: the first hit)
    after = hit.any(dim=1)[:, None] & (torch.arange(labels.shape[1], device=labels.device)[None, :] >= start[:, None])
    if rows is not None:
        after &= rows.to(labels.device)[:, None]
    return out.masked_fill(after, float(weight))


def mixup_partners(
    input_ids: torch.Tensor, row_tasks: Sequence[str], tasks: Sequence[str], rng: random.Random
) -> list[int]:
    """For each row of a micro batch, the row whose image and target it is mixed with (itself: not mixed).

    Rows of ``tasks`` are shuffled among the rows with the same prompt (``input_ids``): a classification
    instruction is one prompt, and a VQA answer is an answer to its own question only.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, task in enumerate(row_tasks):
        if task in tasks:
            groups.setdefault(tuple(input_ids[i].tolist()), []).append(i)
    partner = list(range(len(row_tasks)))
    for rows in groups.values():
        shuffled = list(rows)
        rng.shuffle(shuffled)
        for i, j in zip(rows, shuffled, strict=True):
            partner[i] = j
    return partner


def mixup_forward(
    engine, batch: Mapping[str, torch.Tensor], labels: torch.Tensor, partner: Sequence[int], lam: float, **loss_kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """mixup's per-row losses (B,) and target token counts (B,) (``train.mixup``; Zhang et al. 2018).

    Row i reads ``lam x_i + (1 - lam) x_partner(i)`` and is scored ``lam CE(y_i) + (1 - lam) CE(y_partner(i))``,
    its count mixed the same way (a per-token mean of the two targets; exact when they are as long).
    The encoder runs once; the decoder reads the mixed rows twice, once per target, in one pass.
    ``loss_kwargs`` go to :func:`token_losses` for both targets, but ``first_token_bias`` (the answer prior's
    rows are each row's own) to the first only.
    """
    pixel_values = batch["pixel_values"]
    if pixel_values.shape[0] != labels.shape[0]:
        raise ValueError(
            f"train.mixup needs one image per record; this micro batch has {pixel_values.shape[0]} images "
            f"for {labels.shape[0]} records"
        )
    b = labels.shape[0]
    other = torch.tensor(list(partner), device=labels.device)
    rows = torch.tensor([i for i in range(b) if partner[i] != i], dtype=torch.long, device=labels.device)
    second = labels[other[rows]]  # (M, L): the mixed rows' partners' targets, padded as the batch's
    prepare = engine.module.language_model.prepare_decoder_input_ids_from_labels
    # Through the engine's own forward (ZeRO-3 gathers the weights there); the encoder runs once.
    out = engine(
        pixel_values=lam * pixel_values + (1 - lam) * pixel_values[other],
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        decoder_input_ids=torch.cat([prepare(labels=labels), prepare(labels=second)]),
        encoder_rows=torch.cat([torch.arange(b, device=labels.device), rows]),
    )
    ce, count = token_losses(out.logits[:b], labels, **loss_kwargs)
    second_kwargs = {k: v for k, v in loss_kwargs.items() if k != "first_token_bias"}
    if second_kwargs.get("answer_weight") is not None:  # the partners' rows of the answer weight's row mask
        marker, weight, marked = second_kwargs["answer_weight"]
        second_kwargs["answer_weight"] = (marker, weight, None if marked is None else marked[other[rows]])
    ce_b, count_b = token_losses(out.logits[b:], second, **second_kwargs)
    ce = ce.index_put((rows,), lam * ce[rows] + (1 - lam) * ce_b)
    count = count.to(ce.dtype).index_put((rows,), lam * count[rows] + (1 - lam) * count_b)
    return ce, count


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


@dataclass
class _Run:
    """What a run builds before its first step (see :func:`_build`)."""

    config: RunConfig
    dist: distributed.DistInfo
    derived: Derived
    run_dir: Path
    model: torch.nn.Module
    processor: Any
    data: TrainData
    sampler: MixtureSampler
    mixture: dict[str, float]
    adapter: AdapterSpec | None = None  # what an adapter-saving method exports, with ...
    adapter_keys: tuple[str, ...] = ()  # ... the names of its weights
    prior: FirstTokenPrior | None = None  # train.answer_prior's bias on the first answer token
    # train.answer_weight: ({task: its answer marker's token ids}, w)
    answer_weight: tuple[dict[str, tuple[int, ...]], float] | None = None


def _few_shot(config: RunConfig, data: TrainData) -> TrainData:
    """The configured tasks' training records, cut to ``data.shots`` per task when it is set."""
    missing = [task for task in config.data.tasks if task not in data.datasets]
    if missing:
        raise ConfigError(f"data.tasks names {missing} but no training records were given for them")
    datasets = {task: data.datasets[task] for task in config.data.tasks}
    shots, seed, prior = config.data.shots, config.train.seed, data.answer_prior
    if config.train.answer_prior and prior is None:
        raise ConfigError(
            "train.answer_prior is set but the training data brings no answer prior (TrainData.answer_prior)"
        )
    if shots:
        small = {task: len(ds) for task, ds in datasets.items() if len(ds) < shots}
        if small:
            raise ConfigError(f"data.shots={shots} but these tasks have fewer training examples: {small}")
        datasets = {
            task: _Subset(ds, few_shot_indices(len(ds), shots, seed=seed, task=task)) for task, ds in datasets.items()
        }
        if prior is not None:  # the sampler's indices are into the shots; the prior's into the split
            prior = functools.partial(_prior_of_shot, prior, datasets)
    return TrainData(datasets, data.make_example, prior, data.answer_markers)


def _prior_of_shot(prior, shots: Mapping[str, _Subset], task: str, index: int):
    return prior(task, shots[task].indices[index])


def _build(config: RunConfig, data: TrainData, job: str) -> _Run:
    """Checks, joins the process group, makes the run folder, the model and the mixture; saves the spec."""
    t = config.train
    derive(config, distributed.world_size_from_env())  # the batch arithmetic fails before any setup
    check_precision(t.precision)
    data = _few_shot(config, data)
    dist = distributed.init_distributed()
    derived = derive(config, dist.world_size)
    run_dir = prepare_run_dir(config, job, dist)
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    random.seed(t.seed)
    np.random.seed(t.seed)
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    model, processor = build_model_and_processor(config)
    method = get_method(config.method.name)
    options = method.resolve_options(config.method.options)
    adapter = _adapter_spec(config, method, options, model, dist)
    if method.attach is not None:  # the method's own parameters, and what it freezes
        try:
            method.attach(model, options)
        except ValueError as exc:  # an option that does not fit this model (a LoRA target, VPT on a CNN)
            raise ConfigError(f"method {method.name!r}: {exc}") from None
    adapter_keys = tuple(sorted(method_weights(model))) if adapter is not None else ()
    if config.resume:
        check_architecture(architecture(UnifiedVLConfig.from_pretrained(run_dir / SPEC)), model.config, run_dir)
    freeze(model, frozen_prefixes(model, t.freeze))
    torch.manual_seed(t.seed + dist.rank)  # dropout streams differ between ranks
    sizes = {task: len(ds) for task, ds in data.datasets.items()}
    d = config.data
    mixture = mixture_probabilities(sizes, d.tasks, weighting=d.weighting, temperature=d.temperature)
    sampler = MixtureSampler(sizes, mixture, seed=t.seed, global_batch_size=t.global_batch_size)
    run = _Run(config, dist, derived, run_dir, model, processor, data, sampler, mixture, adapter, adapter_keys)
    if t.answer_prior:
        run.prior = FirstTokenPrior(processor.tokenizer, t.answer_prior)
    if t.answer_weight != 1:
        run.answer_weight = (answer_marker_ids(processor.tokenizer, data.answer_markers), float(t.answer_weight))
    if dist.is_main:
        suffix = "" if not config.resume else f"-resume-{time.strftime('%Y%m%d-%H%M%S')}"
        atomic_write_text(run_dir / f"config{suffix}.yaml", dump_yaml(config, derived))
        atomic_write_text(
            run_dir / "ds_config.json",
            json.dumps(deepspeed_config(config, derived, hidden_size=model.config.hidden_size), indent=2),
        )
        if not config.resume:  # everything but the weights, for offline export (engine/export.py)
            model.config.save_pretrained(run_dir / SPEC)
            processor.save_pretrained(run_dir / SPEC)
            if adapter is not None:
                adapter.save(run_dir / SPEC)
    return run


def _adapter_spec(config: RunConfig, method, options: dict, model, dist: distributed.DistInfo) -> AdapterSpec | None:
    """For a method that saves adapters: its spec, with the base model (``model.init``) identified on rank 0."""
    if not method.saves_adapter:
        return None
    base = base_identity(config.model.init, model.config) if dist.is_main else {}
    return AdapterSpec(method=method.name, options=dict(options), base=base)


def parameter_counts(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """``{module: (trainable, total)}`` parameters, by top-level module (the language model by its parts).

    Shared tensors (T5's tied embeddings) count once, under the first name that holds them.
    """
    counts: dict[str, list[int]] = {}
    for name, param in model.named_parameters():  # named_parameters yields a shared tensor once
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] == "language_model" and len(parts) > 2 else parts[0]
        entry = counts.setdefault(key, [0, 0])
        entry[0] += param.numel() if param.requires_grad else 0
        entry[1] += param.numel()
    return {key: (trainable, total) for key, (trainable, total) in counts.items()}


def parameter_report(model: torch.nn.Module) -> str:
    """The trainable-parameter report a run prints: counts and fractions, per module and in all."""
    counts = parameter_counts(model)
    trainable, total = (sum(c[i] for c in counts.values()) for i in (0, 1))
    width = max(len(k) for k in counts)
    lines = [f"parameters: {trainable:,} of {total:,} trainable ({100 * trainable / max(total, 1):.2f}%)"]
    lines += [
        f"  {key:{width}s}  {t:>12,} of {n:>12,} trainable ({100 * t / max(n, 1):6.2f}%)"
        for key, (t, n) in counts.items()
    ]
    return "\n".join(lines)


def _summary(run: _Run) -> str:
    t, derived = run.config.train, run.derived
    frozen = ", ".join(frozen_prefixes(run.model, t.freeze)) or "nothing"
    return (
        f"run {run.run_dir}: method {run.config.method.name}, world size "
        f"{run.dist.world_size}, global batch {t.global_batch_size} = {t.micro_batch_size} x {run.dist.world_size} "
        f"ranks x {derived.gradient_accumulation_steps} accumulation, ZeRO {t.zero_stage}, {t.precision}; mixture "
        + ", ".join(f"{k} {v:.2f}" for k, v in run.mixture.items())
        + f"\nfrozen: {frozen} ({'train.freeze' if t.freeze is not None else 'by the model design'})\n"
        + parameter_report(run.model)
    )


class StepLosses:
    """One optimizer step's losses on this rank, summed over its micro batches; `reduce` adds up the ranks.

    ``loss`` is the mean of the micro-batch losses that were trained; ``tasks`` each task's
    cross-entropy per target token (the same for either ``loss_reduction``).
    """

    def __init__(self, tasks: Sequence[str]):
        self.task_names = list(tasks)
        self.loss_sum, self.micro_batches = 0.0, 0
        self.ce = dict.fromkeys(self.task_names, 0.0)
        self.tokens = dict.fromkeys(self.task_names, 0.0)

    def add(self, loss: torch.Tensor, row_tasks: Sequence[str], ce: torch.Tensor, count: torch.Tensor) -> None:
        self.loss_sum += loss.item()
        self.micro_batches += 1
        for task, row_ce, row_count in zip(row_tasks, ce.tolist(), count.tolist(), strict=True):
            self.ce[task] += row_ce
            self.tokens[task] += row_count

    def reduce(self, seconds: float, *, is_main: bool) -> tuple[float, dict[str, float], float]:
        """``(loss, {task: per-token loss}, rank 0's seconds)`` over all ranks (every rank gets the same)."""
        names = self.task_names
        values = [self.loss_sum, self.micro_batches, *(self.ce[n] for n in names), *(self.tokens[n] for n in names)]
        # Rank 0's clock decides when time is up: every rank must stop at the same step.
        total = distributed.all_reduce_sum([*values, seconds if is_main else 0.0])
        k = len(names)
        ce, tokens = total[2 : 2 + k], total[2 + k : 2 + 2 * k]
        per_task = {n: c / m for n, c, m in zip(names, ce, tokens, strict=True) if m}
        return total[0] / total[1], per_task, total[-1]


def _train_step(engine, run: _Run, step: int, loc_ids: torch.Tensor) -> StepLosses:
    """Forward and backward over this rank's micro batches of one global batch; DeepSpeed steps at the last."""
    t = run.config.train
    engine.train()
    tasks = list(run.sampler.tasks)
    slots = [(i, task, index) for i, (task, index) in enumerate(run.sampler.next_step())]
    # Micro batches of one task pad less (a grounding target is 10x a classification one);
    # the order is a function of the step alone, so every world size cuts the same batches.
    slots.sort(key=lambda slot: (tasks.index(slot[1]), slot[0]))
    losses = StepLosses(tasks)
    trainable = [p for p in engine.module.parameters() if p.requires_grad] if t.sam_rho else []
    for micro in shard(slots, rank=run.dist.rank, world_size=run.dist.world_size, micro_batch_size=t.micro_batch_size):
        batch, row_tasks = collate(micro, run.data, run.processor, seed=t.seed, step=step)
        labels = batch.pop("labels").to(engine.device)
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        prior = None
        if run.prior is not None:
            rows = [run.data.answer_prior(task, index) for _, task, index in micro]
            prior = run.prior(rows, engine.module.language_model.config.vocab_size)  # the logits' width
        partner, lam = list(range(len(micro))), 1.0
        if t.mixup:
            rng = random.Random(f"mixup:{t.seed}:{step}:{micro[0][0]}")  # the micro batch's first slot
            partner = mixup_partners(batch["input_ids"], row_tasks, t.mixup_tasks, rng)
            lam = rng.betavariate(t.mixup, t.mixup)
        forward = functools.partial(
            _micro_loss,
            t=t,
            batch=batch,
            labels=labels,
            partner=partner,
            lam=lam,
            prior=prior,
            loc_ids=loc_ids,
            answer_weight=_answer_weight(run, row_tasks),
        )
        if t.sam_rho:  # the gradient is taken at the worst nearby weights (unified_vl/engine/sharpness.py)
            with sharpness.batch_norm_statistics_kept(engine.module):
                # The loss at the weights themselves is what the log shows. Through the bare module:
                # DeepSpeed refuses any backward through its forward but its own engine.backward.
                logged, ce, count = forward(_Bare(engine.module))
                perturbation = sharpness.ascend(trainable, logged, t.sam_rho)
            engine.backward(forward(engine)[0])
            sharpness.descend_back(trainable, perturbation)
        else:
            logged, ce, count = forward(engine)
            engine.backward(logged)
        engine.step()
        losses.add(logged.detach(), row_tasks, ce.detach(), count)
    return losses


class _Bare:
    """The model called as DeepSpeed's engine is (``engine(**batch)``, ``engine.module``), without the engine."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, **kwargs):
        return self.module(**kwargs)


def answer_marker_ids(tokenizer, markers: Mapping[str, str]) -> dict[str, tuple[int, ...]]:
    """``{task: token ids}`` of each task's answer marker (``TrainData.answer_markers``), for ``train.answer_weight``."""
    if not markers:
        raise ConfigError(
            "train.answer_weight weighs the answer after a task's answer marker, but no trained task has one "
            "(VQA with grounded evidence has; set the weight back to 1)"
        )
    return {task: tuple(tokenizer(marker, add_special_tokens=False).input_ids) for task, marker in markers.items()}


def _answer_weight(run: _Run, row_tasks: Sequence[str]):
    """``train.answer_weight``'s ``(marker ids, w, rows of that marker's task)`` for a micro batch; None when off
    or no row's task has a marker. Only VQA has one today; were there two such tasks, a micro batch holding
    both (`_train_step` sorts the slots by task, so only at a boundary) would weigh the first's rows only."""
    if run.answer_weight is None:
        return None
    markers, weight = run.answer_weight
    task = next((task for task in row_tasks if task in markers), None)
    if task is None:
        return None
    return (markers[task], weight, torch.tensor([row == task for row in row_tasks]))


def _micro_loss(engine, *, t: TrainConfig, batch, labels, partner, lam, prior, loc_ids, answer_weight=None):
    """One micro batch's ``(loss, per-row cross-entropy (B,), target token counts (B,))``."""
    loss_kwargs = dict(
        loc_ids=loc_ids, loc_sigma=t.loc_sigma, label_smoothing=t.label_smoothing, answer_weight=answer_weight
    )
    if partner != list(range(len(partner))):
        ce, count = mixup_forward(engine, batch, labels, partner, lam, first_token_bias=prior, **loss_kwargs)
    else:
        # No labels into the model: its own loss would be a second cross-entropy over the same logits.
        decoder_input_ids = engine.module.language_model.prepare_decoder_input_ids_from_labels(labels=labels)
        out = engine(**batch, decoder_input_ids=decoder_input_ids)
        ce, count = token_losses(out.logits, labels, first_token_bias=prior, **loss_kwargs)  # (B,), (B,)
    if t.loss_reduction == "sample":
        loss = (ce / count.clamp(min=1)).mean()
    else:  # every target token counts once: T5's own loss
        loss = ce.sum() / count.sum().clamp(min=1)
    return loss, ce, count


def check_step_finite(step: int, loss: float, task_losses: Mapping[str, float], grad_norm: Any, lr: float) -> None:
    """Stops the run at a non-finite loss or gradient norm (every rank sees the same, reduced values).

    Stopping is deliberate: DeepSpeed's fp16 loss scaler skips such steps and lowers its scale, but
    at full precision a non-finite value means the weights or the data are broken, and skipping
    would hide it; the weights after the step are not saved, so the last checkpoint stays good.
    """
    problems = [] if math.isfinite(loss) else [f"the training loss is {loss}"]
    if grad_norm is not None and not math.isfinite(float(grad_norm)):
        problems.append(f"the gradient norm is {float(grad_norm)}")
    if problems:
        per_task = ", ".join(f"{t} {v:.4g}" for t, v in task_losses.items())
        raise NonFiniteError(
            f"step {step}: {' and '.join(problems)} (loss per task: {per_task}); training stopped, and no "
            f"checkpoint or model was written from this step. Lower optim.lr (now {lr:g}), keep "
            "optim.grad_clip > 0, or look for a bad record among these tasks."
        )


def check_weights_finite(model: torch.nn.Module, step: int, *, what: str) -> None:
    """Refuses to save weights holding nan or inf (all ranks call it; ZeRO-3 checks each rank's shard)."""
    bad = []
    for name, param in model.named_parameters():
        data = getattr(param, "ds_tensor", None)  # ZeRO-3: this rank's partition
        data = param.detach() if data is None else data
        if data.numel() and not torch.isfinite(data).all():
            bad.append(name)
    if distributed.all_reduce_sum([float(len(bad))])[0]:
        raise NonFiniteError(
            f"step {step}: the weights hold nan or inf ({', '.join(bad[:3]) or 'on another rank'}"
            f"{', ...' if len(bad) > 3 else ''}); {what} was not written. Lower optim.lr or keep optim.grad_clip > 0."
        )


def _resume(
    run: _Run,
    engine,
    checkpoints: CheckpointManager,
    schedule: LRSchedule,
    average: WeightAverage | None,
    best: BestWeights | None,
) -> tuple[int, float]:
    """Restores model, optimizer, scheduler (with its horizon), RNG, the sampler, the weight average and
    the best validation's weights; returns (step, seconds)."""
    t = run.config.train
    client = checkpoints.load(engine)
    run.sampler.load_state_dict(client["sampler"])
    if average is not None:
        average.load_state_dict(client.get("ema"), where=checkpoints.dir / str(checkpoints.latest_tag()))
    if best is not None:
        best.load_state_dict(client.get("best"))
    # The checkpoint restored the schedule; the config may have changed its length (training
    # longer). A time-bounded run keeps the horizon it measured.
    schedule.horizon = min(schedule.horizon, t.max_steps) if t.max_minutes is not None else t.max_steps
    return client["step"], client["train_seconds"]


def _finish(
    run: _Run, engine, checkpoints: CheckpointManager, monitor: Monitor, *, step: int, final: dict
) -> Path | None:
    """Writes the final metrics, exports the model (and the best checkpoint when it is another); the model folder."""
    t, c, dist = run.config.train, run.config.checkpoint, run.dist
    if final:
        monitor.eval(step, final)
        if dist.is_main:
            atomic_write_text(run.run_dir / "eval_final.json", json.dumps({"step": step, "metrics": final}, indent=2))
    if not c.export:
        monitor.close()
        return None
    kind = "adapter" if run.adapter is not None else "model"
    check_weights_finite(engine.module, step, what=f"the {kind} folder")  # never export a NaN model
    distributed.average_batch_norm_statistics(engine.module)  # the statistics of every rank's batches
    if run.adapter is not None:  # only the method's own weights, and the base they belong to
        model_dir = export_adapter(
            engine, run.adapter, run.adapter_keys, run.run_dir / kind, dist=dist, zero_stage=t.zero_stage
        )
    else:
        model_dir = export_model(engine, run.processor, run.run_dir / kind, dist=dist, zero_stage=t.zero_stage)
    best = checkpoints.index().get("best")
    if dist.is_main and best and best["tag"] != checkpoints.latest_tag():
        export_checkpoint(run.run_dir, run.run_dir / f"{kind}-best", tag=best["tag"])
        monitor.write(
            f"best checkpoint {best['tag']} ({best['metric']} = {best['value']:.4f}) -> {run.run_dir / f'{kind}-best'}"
        )
    monitor.close()
    return model_dir


def _weight_keepers(
    config: RunConfig, model: torch.nn.Module, evaluator: Evaluator | None
) -> tuple[WeightAverage | None, BestWeights | None, str | None]:
    """The weight average (``train.ema_decay``), the best validation's weights (``eval.final_weights``) and
    the metric that ranks validations and checkpoints (``checkpoint.best_metric``, else the first eval
    split's mean primary metric)."""
    splits = config.eval.splits
    best_metric = config.checkpoint.best_metric or (f"mean/{splits[0]}/primary" if evaluator and splits else None)
    best = None
    if config.eval.final_weights == "best":
        if best_metric is None:
            raise ConfigError(
                "eval.final_weights=best needs validations during training, and this run has no evaluator"
            )
        best = BestWeights(best_metric)
    return WeightAverage.of(model, config.train.ema_decay), best, best_metric


def _use_final_weights(engine, monitor: Monitor, average: WeightAverage | None, best: BestWeights | None) -> None:
    """Puts the weights the final evaluation and the export use into the model: the average, or the best
    validation's, if the run keeps one (its last checkpoint holds the last step's weights, and the keeper)."""
    if average is not None:
        average.copy_to(engine.module)
        monitor.write(f"the final evaluation and the exported model use the weight average (decay {average.decay})")
    if best is not None:
        best.copy_to(engine.module)
        monitor.write(f"the final evaluation and the exported model use {best.describe()}")


def train(config: RunConfig, data: TrainData, *, evaluator: Evaluator | None = None, job: str = "train") -> TrainResult:
    """Trains (or resumes) one run: build, initialize, then step / evaluate / checkpoint, then finish.

    Everything that can be checked is checked before the first step: the config, the batch
    arithmetic, the precision, the data, the resume checkpoint's architecture.
    """
    t, c = config.train, config.checkpoint
    run = _build(config, data, job)
    dist, run_dir, processor = run.dist, run.run_dir, run.processor
    schedule = LRSchedule.of(config)
    average, best, best_metric = _weight_keepers(config, run.model, evaluator)  # before DeepSpeed casts the model
    engine = initialize(run.model, config, run.derived, schedule)
    checkpoints = CheckpointManager(run_dir / "checkpoints", dist=dist, keep_last=c.keep_last, best_metric=best_metric)
    step, train_seconds = _resume(run, engine, checkpoints, schedule, average, best) if config.resume else (0, 0.0)
    budget = TimeBudget(t.max_minutes, max_steps=t.max_steps) if t.max_minutes is not None else None
    monitor = Monitor(run_dir, enabled=dist.is_main, total_steps=schedule.horizon, initial_step=step)
    monitor.write(_summary(run))

    def client_state() -> dict:
        state = {"step": step, "sampler": run.sampler.state_dict(), "train_seconds": train_seconds}
        keepers = {"ema": average, "best": best}
        return state | {key: keeper.state_dict() for key, keeper in keepers.items() if keeper is not None}

    def evaluate_now(splits, max_examples, **keep) -> dict[str, float]:
        return evaluate(engine, processor, evaluator, config, dist, splits=splits, max_examples=max_examples, **keep)

    def validate() -> dict[str, float]:
        values = evaluate_now(config.eval.splits, config.eval.max_examples)
        monitor.eval(step, values)
        if best is not None:
            best.offer(engine.module, step, values)
        return values

    losses: list[float] = []
    start_step, start_seconds, tic = step, train_seconds, time.perf_counter()
    metrics: dict[str, float] = {}
    last_saved = step if config.resume else -1
    loc_ids = torch.tensor(loc_token_ids(processor.tokenizer, processor.num_bins), device=engine.device)
    while step < schedule.horizon:
        step_losses = _train_step(engine, run, step, loc_ids)
        step += 1
        if average is not None:
            average.update(engine.module, step)
        loss, task_losses, train_seconds = step_losses.reduce(
            start_seconds + (time.perf_counter() - tic), is_main=dist.is_main
        )
        check_step_finite(step, loss, task_losses, engine.get_global_grad_norm(), engine.get_lr()[0])
        losses.append(loss)
        if budget is not None and (horizon := budget.update(step - start_step, step, train_seconds)) is not None:
            schedule.horizon = horizon  # every rank computes the same: train_seconds is rank 0's
            monitor.set_total(horizon)
        values = {
            "train/loss": loss,
            "train/lr": engine.get_lr()[0],
            "train/samples_per_s": (step - start_step) * t.global_batch_size / max(train_seconds - start_seconds, 1e-9),
            **{f"train/loss/{task}": value for task, value in task_losses.items()},
        }
        monitor.step(step, values, log=step % t.log_every == 0 or step == schedule.horizon)
        time_up = t.max_minutes is not None and train_seconds >= t.max_minutes * 60
        done = step >= schedule.horizon or time_up
        if evaluator and config.eval.every and step % config.eval.every == 0 and not done:
            metrics = validate()
        if c.every and step % c.every == 0 and not done:
            check_weights_finite(engine.module, step, what=f"the checkpoint of step {step}")
            checkpoints.save(engine, step, client_state(), metrics)
            last_saved = step
        if time_up:
            monitor.write(f"time budget of {t.max_minutes} min reached at step {step}")
            break

    # -- the end: checkpoint, final evaluation, export -----------------------------------------
    if evaluator and config.eval.every and step != last_saved:
        metrics = validate()
    if step != last_saved:
        check_weights_finite(engine.module, step, what=f"the checkpoint of step {step}")
        checkpoints.save(engine, step, client_state(), metrics)
    _use_final_weights(engine, monitor, average, best)
    keep = {"predictions_dir": run_dir / "predictions"}  # the final evaluation keeps its predictions
    final = evaluate_now(config.eval.final_splits, None, **keep) if evaluator and config.eval.final_splits else {}
    model_dir = _finish(run, engine, checkpoints, monitor, step=step, final=final)
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
    engine,
    processor,
    evaluator: Evaluator,
    config: RunConfig,
    dist: distributed.DistInfo,
    *,
    splits,
    max_examples,
    predictions_dir: Path | None = None,
) -> dict[str, float]:
    """Generation on every rank's share, metrics on rank 0, the same dict returned on every rank.

    Under ZeRO-3 every forward pass gathers parameters collectively, so all ranks must run the
    same number of passes: each then generates the whole split (the same texts) instead of a share.
    With ``predictions_dir`` the texts are scored and each split's predictions written to
    ``predictions_dir/{split}.jsonl``.
    """
    engine.eval()
    distributed.average_batch_norm_statistics(engine.module)  # every rank scores the same model
    rank, world = (0, 1) if config.train.zero_stage == 3 else (dist.rank, dist.world_size)
    keep = {} if predictions_dir is None else {"with_scores": True}
    metrics: dict[str, float] = {}
    for split in splits:
        with torch.no_grad():
            texts = evaluator.generate(
                engine.module, processor, split=split, max_examples=max_examples, rank=rank, world_size=world, **keep
            )
        gathered = distributed.all_gather_object(texts) if world > 1 else [texts]
        if dist.is_main:
            merged: dict[str, list[tuple[int, str]]] = {}
            for part in gathered:
                for task, rows in part.items():
                    merged.setdefault(task, []).extend(rows)
            written = {} if predictions_dir is None else {"predictions_file": predictions_dir / f"{split}.jsonl"}
            metrics.update(evaluator.score(merged, split=split, max_examples=max_examples, **written))
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
