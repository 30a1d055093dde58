"""Plain baselines for the learning benchmark (``scripts/bench_vs_baseline.py``): what a user would train
instead of our model, on the same records, scored by the same task metric.

* ``classification``: a small CNN (strided conv-BN-ReLU blocks, global average pooling, a linear
  layer) -> softmax over the training labels.
* ``vqa``: the same CNN's spatial feature map, flattened, and an LSTM over the question's words,
  joined by an MLP -> softmax over the training answers. This is the CNN+LSTM baseline of
  Sort-of-CLEVR (Santoro et al. 2017, "A simple neural network module for relational reasoning",
  §5.1) and the CNN + question encoding of Zhou et al. 2015 ("Simple Baseline for Visual Question
  Answering", bag of words there); an LSTM rather than a bag of words because our questions differ
  in word order only ("is the left digit larger than the right digit?").

Written plainly and tuned a little (see the benchmark's docs): AdamW with warm-up and a cosine
decay over the budget (steps, or seconds of wall-clock), random shifts of a few pixels as
augmentation, and early stopping by the validation metric (evaluated every tenth of the budget; the
best weights score test). The budget counts everything from loading the records to the last
validation, as our recipe's does.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import io
import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import nn

from unified_vl.engine import sharpness

TASKS = ("classification", "vqa")
PRECISIONS = ("fp32", "bf16")
PAD, UNK = 0, 1  # word ids of the question vocabulary


@dataclass
class BaselineConfig:
    """The baseline's settings (the defaults are the benchmark's; tuned a little, see docs).

    Attributes:
        image_size: input side in pixels; None: the data's image side clamped to [32, 64].
        width: channels of the first conv block (doubled twice).
        batch_size: examples per step.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW's decoupled weight decay.
        warmup_steps: linear warm-up.
        shift: random translation of up to this many pixels (of ``image_size``) in training.
        scale: a random zoom about the centre by a factor in ``[1 - scale, 1 + scale]`` before the shift
            (bilinear, zero padding); 0: none. Our side's ``data.augment.scale``, so that a comparison can
            give both sides the same augmentation.
        dropout: before the output layer.
        word_dim: question word embedding size (VQA).
        hidden: LSTM and MLP size (VQA).
        evals: validation evaluations over the budget (the best one's weights score test).
        max_answers: the most frequent training answers kept as classes (VQA; 3000 in many VQAv2 baselines).
        precision: ``fp32``, or ``bf16``: forward passes under torch's CPU autocast (weights and AdamW stay
            float32), the speed our side gets from ``train.precision=bf16``, so that a comparison can give both
            sides the same trick.
        mixup: classification only, mixup's Beta(a, a) (Zhang et al. 2018: images mixed in pairs within a batch,
            the loss mixed alike; one lambda per batch); 0: off. Our side's ``train.mixup``, for a fair comparison.
        sam: SAM's radius rho (Foret et al. 2021; ``unified_vl.engine.sharpness``): each step's gradient is
            taken at ``w + rho g / ||g||``; 0: off. Our side's ``train.sam_rho``, for a fair comparison.
    """

    image_size: int | None = None
    width: int = 32
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    shift: int = 2
    scale: float = 0.0
    dropout: float = 0.1
    word_dim: int = 64
    hidden: int = 256
    evals: int = 10
    max_answers: int = 3000
    precision: str = "fp32"
    mixup: float = 0.0
    sam: float = 0.0


@dataclass
class BaselineResult:
    """What a baseline run produced."""

    task: str
    metrics: dict[str, float]  # {task}/test/{metric} of the best-on-val weights
    val_metric: float  # the best validation score (primary metric)
    steps: int
    train_seconds: float
    parameters: int
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, val primary metric)
    by_question_type: dict[str, float] = field(default_factory=dict)  # VQA accuracy per question type on test
    # Test record id -> the text the best weights predicted (what ours writes to predictions/test.jsonl),
    # so that the two sides' misses can be compared image by image.
    test_predictions: dict[str, str] = field(default_factory=dict)


def words(text: str) -> list[str]:
    """Lower-cased word tokens of a question (letters and digits)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def image_side(records, config: BaselineConfig) -> int:
    """The input side: the configured one, else the first image's longer side clamped to [32, 64]."""
    if config.image_size is not None:
        return config.image_size
    first = records[0]
    return int(min(64, max(32, max(first["width"], first["height"]))))


def load_images(dataset, size: int) -> torch.Tensor:
    """Every record's image as (N, 3, S, S) uint8, each distinct file decoded once (VQA shares images)."""
    raw = dataset.cast_column("image", _image_feature(decode=False))["image"]
    cache: dict[object, np.ndarray] = {}
    out = np.empty((len(raw), size, size, 3), dtype=np.uint8)  # (N, S, S, 3)
    for i, item in enumerate(raw):
        key = item["path"] or item["bytes"]
        if key not in cache:
            source = item["path"] if item["bytes"] is None else io.BytesIO(item["bytes"])
            with Image.open(source) as image:
                cache[key] = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))
        out[i] = cache[key]
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S)


def _image_feature(*, decode: bool):
    from datasets import Image as ImageFeature

    return ImageFeature(decode=decode)


def _block(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
    return [conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """(B, 3, S, S) -> (B, 4w, S/8, S/8): five conv-BN-ReLU blocks, three of them of stride 2.

    Strided from the first layer, like Sort-of-CLEVR's CNN (Santoro et al. 2017: four 3x3 convolutions
    of stride 2, 24 channels), with a stride-1 block after each of the first two for more capacity: a
    quarter of the compute of the same blocks with max-pooling at full resolution, which in a fixed
    time budget buys the baseline four times the training examples.
    """

    def __init__(self, width: int):
        super().__init__()
        w = width
        self.out_channels = 4 * w
        self.layers = nn.Sequential(
            *_block(3, w, 2), *_block(w, w),
            *_block(w, 2 * w, 2), *_block(2 * w, 2 * w),
            *_block(2 * w, 4 * w, 2),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Classifier(nn.Module):
    """Small CNN -> global average pool -> dropout -> linear over the labels."""

    def __init__(self, num_classes: int, config: BaselineConfig):
        super().__init__()
        self.cnn = SmallCNN(config.width)
        self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(self.cnn.out_channels, num_classes))

    def forward(self, images: torch.Tensor, questions: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.cnn(images).mean(dim=(2, 3)))  # (B, classes)


class QuestionAnswerer(nn.Module):
    """CNN feature map (flattened) + LSTM over the question -> MLP -> softmax over the answers."""

    def __init__(self, num_answers: int, vocab_size: int, side: int, config: BaselineConfig):
        super().__init__()
        self.cnn = SmallCNN(config.width)
        cells = (side // 8) ** 2
        self.squeeze = nn.Conv2d(self.cnn.out_channels, 32, 1)  # keeps where things are, in few numbers
        self.image_proj = nn.Linear(32 * cells, config.hidden)
        self.embed = nn.Embedding(vocab_size, config.word_dim, padding_idx=PAD)
        self.lstm = nn.LSTM(config.word_dim, config.hidden, batch_first=True)
        self.mlp = nn.Sequential(
            nn.Linear(2 * config.hidden, config.hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, num_answers),
        )

    def forward(self, images: torch.Tensor, questions: torch.Tensor) -> torch.Tensor:
        image = torch.relu(self.image_proj(self.squeeze(self.cnn(images)).flatten(1)))  # (B, H)
        lengths = (questions != PAD).sum(1).clamp(min=1).cpu()  # (B,)
        packed = nn.utils.rnn.pack_padded_sequence(
            self.embed(questions), lengths, batch_first=True, enforce_sorted=False
        )
        _, (state, _) = self.lstm(packed)  # state: (1, B, H), the last real word's
        return self.mlp(torch.cat([image, state[0]], dim=1))  # (B, answers)


@dataclass
class _Split:
    images: torch.Tensor  # (N, 3, S, S) uint8
    questions: torch.Tensor | None  # (N, T) word ids, or None (classification)
    labels: torch.Tensor  # (N,) class ids, -1 where the answer is not a class
    records: list[dict]


def _encode_questions(records: Sequence[dict], vocab: dict[str, int]) -> torch.Tensor:
    rows = [[vocab.get(w, UNK) for w in words(r["question"])] or [UNK] for r in records]
    out = torch.full((len(rows), max(len(r) for r in rows)), PAD, dtype=torch.long)  # (N, T)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row)
    return out


def _gold(task_name: str, record: dict) -> str:
    import tasks

    return tasks.get_task(task_name).target(record)


def load_splits(data_dir: str, task_name: str, config: BaselineConfig):
    """``({split: _Split}, classes, vocab, side)`` for train / val / test, classes and words from train."""
    from data_tools import storage

    raw = {s: storage.load_split(data_dir, task_name, s, decode_images=False) for s in ("train", "val", "test")}
    plain = {s: ds.remove_columns("image").to_list() for s, ds in raw.items()}
    counts = Counter(_gold(task_name, r) for r in plain["train"])
    classes = [a for a, _ in counts.most_common(config.max_answers)]
    index = {c: i for i, c in enumerate(classes)}
    vocab = {"<pad>": PAD, "<unk>": UNK}
    if task_name == "vqa":
        for r in plain["train"]:
            for w in words(r["question"]):
                vocab.setdefault(w, len(vocab))
    side = image_side(plain["train"], config)
    splits = {}
    for s, ds in raw.items():
        records = plain[s]
        splits[s] = _Split(
            images=load_images(ds, side),
            questions=_encode_questions(records, vocab) if task_name == "vqa" else None,
            labels=torch.tensor([index.get(_gold(task_name, r), -1) for r in records]),
            records=records,
        )
    return splits, classes, vocab, side


def _normalise(images: torch.Tensor) -> torch.Tensor:
    return images.float().div(127.5).sub(1.0)  # (B, 3, S, S) in [-1, 1]


def _shift(images: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by up to ``pixels`` in x and y (zero padding), as a random crop of a padded image."""
    if pixels <= 0:
        return images
    b, _, s, _ = images.shape
    padded = nn.functional.pad(images, (pixels,) * 4)  # (B, 3, S + 2p, S + 2p)
    dx = torch.randint(0, 2 * pixels + 1, (b,), generator=generator)
    dy = torch.randint(0, 2 * pixels + 1, (b,), generator=generator)
    return torch.stack([padded[i, :, dy[i] : dy[i] + s, dx[i] : dx[i] + s] for i in range(b)])


def _zoom(images: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Each image zoomed about its centre by a factor drawn uniformly in [1 - scale, 1 + scale]."""
    if scale <= 0:
        return images
    b = images.shape[0]
    factor = 1 - scale + 2 * scale * torch.rand(b, generator=generator)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / factor  # output -> input coordinates: a factor > 1 enlarges
    grid = nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    out = nn.functional.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.round().clamp(0, 255).to(images.dtype)


def _mixup(
    images: torch.Tensor, alpha: float, mix: random.Random, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """mixup (Zhang et al. 2018): ``lam x + (1 - lam) x[partners]``, one ``lam ~ Beta(alpha, alpha)`` per batch."""
    lam = mix.betavariate(alpha, alpha)
    partners = torch.randperm(images.shape[0], generator=generator)
    return lam * images + (1 - lam) * images[partners], partners, lam


def _autocast(precision: str):
    """torch's CPU autocast for ``bf16`` (convolutions, linear layers and the LSTM in bf16), else nothing."""
    if precision not in PRECISIONS:
        raise ValueError(f"baseline precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def predict(
    model: nn.Module, split: _Split, classes: Sequence[str], *, batch_size: int = 256, precision: str = "fp32"
) -> list[str]:
    """The class name the model scores highest for every record of ``split``."""
    model.eval()
    out = []
    for i in range(0, len(split.labels), batch_size):
        images = _normalise(split.images[i : i + batch_size])
        questions = split.questions[i : i + batch_size] if split.questions is not None else None
        with _autocast(precision):
            logits = model(images, questions)
        out += [classes[k] for k in logits.argmax(-1).tolist()]
    model.train()
    return out


def score(task_name: str, texts: Sequence[str], records: Sequence[dict]) -> dict[str, float]:
    """The task's own metrics of the predicted texts (what our model's evaluation reports)."""
    import tasks

    task = tasks.get_task(task_name)
    return task.evaluate([task.parse(t, r) for t, r in zip(texts, records, strict=True)], records)


class _Budget:
    """Training progress in [0, 1] by steps or by wall-clock seconds, whichever is given."""

    def __init__(self, *, minutes: float | None, max_steps: int | None):
        if (minutes is None) == (max_steps is None):
            raise ValueError("give exactly one budget: minutes (wall-clock) or max_steps")
        self.seconds = minutes * 60 if minutes is not None else None
        self.max_steps = max_steps
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def progress(self, step: int) -> float:
        if self.max_steps is not None:
            return step / self.max_steps
        return self.elapsed() / self.seconds


def _lr_factor(step: int, progress: float, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_baseline(
    data_dir: str,
    task_name: str,
    *,
    config: BaselineConfig | None = None,
    seed: int = 0,
    minutes: float | None = None,
    max_steps: int | None = None,
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> BaselineResult:
    """Trains the task's baseline on ``data_dir``'s train split within the budget and scores test.

    Args:
        data_dir: a data folder with the task's train, val and test splits.
        task_name: ``classification`` or ``vqa``.
        config: the baseline's settings (default: `BaselineConfig()`).
        seed: weights, batches and augmentation.
        minutes: wall-clock budget, from loading the data to the last validation.
        max_steps: a step budget instead (for comparisons on a shared machine).
        threads: torch CPU threads (the benchmark gives the baseline the cores our model's processes use).
        log: where progress lines go.

    Raises:
        ValueError: a task without a baseline, not exactly one budget, or an unknown ``config.precision``.
    """
    if task_name not in TASKS:
        raise ValueError(f"no baseline for task {task_name!r}; baselines exist for {', '.join(TASKS)}")
    config = config or BaselineConfig()
    _autocast(config.precision)  # an unknown precision fails before the data loads
    budget = _Budget(minutes=minutes, max_steps=max_steps)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    random.seed(seed)
    splits, classes, vocab, side = load_splits(data_dir, task_name, config)
    if task_name == "vqa":
        model: nn.Module = QuestionAnswerer(len(classes), len(vocab), side, config)
    else:
        model = Classifier(len(classes), config)
    log(
        f"baseline {type(model).__name__}: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{len(classes)} classes, {side} px, {len(splits['train'].labels)} training records"
    )
    return _fit(model, splits, classes, task_name, config, budget, seed=seed, log=log)


def _batch_loss(model, images, questions, targets, partners, lam: float, precision: str) -> torch.Tensor:
    """The batch's cross-entropy (mixup's two targets weighted by ``lam`` when ``partners`` is given)."""
    with _autocast(precision):
        logits = model(images, questions)
    loss = lam * nn.functional.cross_entropy(logits.float(), targets)
    if partners is not None:
        loss = loss + (1 - lam) * nn.functional.cross_entropy(logits.float(), targets[partners])
    return loss


def _fit(model, splits, classes, task_name, config, budget: _Budget, *, seed: int, log) -> BaselineResult:
    """The loop: batches, steps, validation every tenth of the budget, the best weights scored on test."""
    import tasks

    primary = tasks.get_task(task_name).primary_metric
    train = splits["train"]
    usable = torch.nonzero(train.labels >= 0).flatten()  # answers outside the kept classes are not trained on
    parameters = list(model.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    mix = random.Random(seed)  # mixup's lambdas (torch has no seeded Beta sampler)
    best, best_state, history, step, next_eval = -1.0, None, [], 0, 1
    order = usable[torch.randperm(len(usable), generator=generator)]
    cursor = 0
    while budget.progress(step) < 1.0:
        if cursor + config.batch_size > len(order):
            order, cursor = usable[torch.randperm(len(usable), generator=generator)], 0
        batch = order[cursor : cursor + config.batch_size]
        cursor += config.batch_size
        for group in optimizer.param_groups:
            group["lr"] = config.lr * _lr_factor(step, budget.progress(step), config.warmup_steps)
        images = _normalise(_shift(_zoom(train.images[batch], config.scale, generator), config.shift, generator))
        questions = train.questions[batch] if train.questions is not None else None
        targets, partners, lam = train.labels[batch], None, 1.0
        if config.mixup and questions is None:  # a VQA answer belongs to its own question: not mixed
            images, partners, lam = _mixup(images, config.mixup, mix, generator)
        batch_loss = functools.partial(_batch_loss, model, images, questions, targets, partners, lam, config.precision)
        perturbation = None
        if config.sam:  # the gradient at the worst nearby weights, as our side's train.sam_rho
            with sharpness.batch_norm_statistics_kept(model):
                perturbation = sharpness.ascend(parameters, batch_loss(), config.sam)
        loss = batch_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if perturbation is not None:
            sharpness.descend_back(parameters, perturbation)
        optimizer.step()
        step += 1
        if budget.progress(step) >= next_eval / config.evals or budget.progress(step) >= 1.0:
            next_eval = math.floor(budget.progress(step) * config.evals) + 1
            texts = predict(model, splits["val"], classes, precision=config.precision)
            value = score(task_name, texts, splits["val"].records)[primary]
            history.append((step, value))
            log(f"  step {step}: loss {loss.item():.4f}, val {primary} {value:.4f}")
            if value > best:
                best, best_state = value, copy.deepcopy(model.state_dict())
    seconds = budget.elapsed()
    model.load_state_dict(best_state)
    texts = predict(model, splits["test"], classes, precision=config.precision)
    test = score(task_name, texts, splits["test"].records)
    return BaselineResult(
        task=task_name,
        metrics={f"{task_name}/test/{k}": v for k, v in test.items()},
        val_metric=best,
        steps=step,
        train_seconds=seconds,
        parameters=sum(p.numel() for p in model.parameters()),
        history=history,
        by_question_type=accuracy_by_question_type(texts, splits["test"].records) if task_name == "vqa" else {},
        test_predictions={r["id"]: text for r, text in zip(splits["test"].records, texts, strict=True)},
    )


# The free layout's two relation question types (data_tools.synth), reported on their own by the scripts.
RELATION_QUESTION_TYPES = ("relation", "relation choice")


def accuracy_by_question_type(texts: Sequence[str], records: Sequence[dict]) -> dict[str, float]:
    """VQA accuracy per ``question_type`` (records without one are left out)."""
    import tasks

    vqa = tasks.get_task("vqa")
    groups: dict[str, list[float]] = {}
    for text, record in zip(texts, records, strict=True):
        if record.get("question_type"):
            value = vqa.evaluate([vqa.parse(text, record)], [record])["accuracy"]
            groups.setdefault(record["question_type"], []).append(value)
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def model_accuracy_by_question_type(
    model_dir, data, split: str = "test", max_examples: int | None = None
) -> dict[str, float]:
    """VQA accuracy per ``question_type`` of one of our model folders on a stored split (its first
    ``max_examples`` records, or all)."""
    from data_tools import storage
    from unified_vl.app.jobs.evaluate import TaskEvaluator
    from unified_vl.checkpoint import load_pretrained

    records = storage.load_split(data, "vqa", split, decode_images=False).remove_columns("image")
    if max_examples is not None and len(records) > max_examples:
        records = records.select(range(max_examples))  # the first N, as TaskEvaluator takes them
    records = records.to_list()
    model, processor = load_pretrained(model_dir)
    evaluator = TaskEvaluator(str(data), ["vqa"])
    texts = evaluator.generate(model.eval(), processor, split=split, max_examples=max_examples)
    return accuracy_by_question_type([text for _, text in sorted(texts["vqa"])], records)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m unified_vl.app.baselines --data DIR --task T (--minutes M | --max-steps N) [--out R.json]``."""
    import argparse
    import json
    from pathlib import Path

    from unified_vl.checkpoint import atomic_write_text

    parser = argparse.ArgumentParser(prog="python -m unified_vl.app.baselines", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a data folder with the task's train, val and test splits")
    parser.add_argument("--task", required=True, choices=TASKS)
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=float, help="wall-clock budget")
    budget.add_argument("--max-steps", type=int, help="step budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS, help="bf16: CPU autocast (default fp32)")
    parser.add_argument("--scale", type=float, default=0.0, help="random zoom in [1 - S, 1 + S] (default 0: none)")
    parser.add_argument("--mixup", type=float, default=0.0, help="classification: mixup's Beta(a, a) (default 0: none)")
    parser.add_argument("--sam", type=float, default=0.0, help="SAM's radius rho (default 0: plain AdamW steps)")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    result = train_baseline(
        args.data,
        args.task,
        config=BaselineConfig(precision=args.precision, scale=args.scale, mixup=args.mixup, sam=args.sam),
        seed=args.seed,
        minutes=args.minutes,
        max_steps=args.max_steps,
        threads=args.threads,
    )
    print(json.dumps(result.metrics, indent=2))
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(dataclasses.asdict(result), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
