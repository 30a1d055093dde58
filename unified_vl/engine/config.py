"""The typed training configuration, its YAML / ``key=value`` loading, and the values derived from it.

Typed dataclasses are the schema (DESIGN.md §5). A run is built in layers, later ones winning::

    dataclass defaults  <-  job defaults (pretrain / finetune)  <-  CONFIG.yaml  <-  key=value ...

``key=value`` uses dotted keys (``optim.lr=3e-4``, ``data.tasks.vqa=2``,
``model.overrides.text_config.d_model=64``); a value is parsed for the field's type. An unknown key
or a value of the wrong type is a `ConfigError` that lists what is allowed.

Derived values (gradient accumulation, the DeepSpeed JSON) are computed here from the config and
the world size, never configured twice.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Precision = Literal["fp32", "bf16", "fp16"]
Weighting = Literal["explicit", "size", "temperature"]
Schedule = Literal["cosine", "linear", "constant"]
ZeroStage = Literal[0, 1, 2, 3]
FinalWeights = Literal["last", "best"]
TargetOrder = Literal["record", "position"]


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key, the value and what is allowed."""


@dataclass
class ModelConfig:
    """Which model to train."""

    preset: str | None = None  # a key of unified_vl.config.PRESETS; None: uvl-tiny, or the architecture of `init`
    # UnifiedVLConfig fields over the preset, e.g. {"image_size": 32, "text_config": {"d_model": 64}};
    # text_config merges field by field (UnifiedVLConfig.from_preset).
    overrides: dict[str, Any] = field(default_factory=dict)
    init: str | None = None  # a model folder (unified_vl.checkpoint.save_pretrained) to start from
    tokenizer: str | None = None  # a tokenizer folder; None: trained on the data if tokenizer_vocab_size, else packaged
    tokenizer_vocab_size: int | None = None  # train a SentencePiece tokenizer of this size on the training data


@dataclass
class SynthConfig:
    """The synthetic world generated (and cached) when ``data.path`` is None."""

    num_images: int | None = None  # train images; None: data_tools.synth.DEFAULT_NUM_IMAGES (the main job's world)
    image_size: int | None = None  # None: data_tools.synth.DEFAULT_IMAGE_SIZE
    seed: int = 0
    # grid: objects in the cells of a 4 x 4 grid (the main job's world); free: anywhere, any size,
    # with relation questions (data_tools.synth.LAYOUTS)
    layout: Literal["grid", "free"] = "grid"
    # VQA records also name the objects each question is about, with boxes (data synth --vqa-evidence):
    # VQA is then trained to write them before the answer (tasks.vqa.ANSWER_MARKER)
    vqa_evidence: bool = False


@dataclass
class AugmentConfig:
    """Training-time augmentation (data_tools.augment); evaluation never sees it."""

    # The largest random translation per axis, as a fraction of the image side (0.0625: 4 pixels of
    # 64); boxes move with the image and stay whole. 0: off (the main job's default).
    shift: float = 0.0
    # The tasks whose records are shifted; None: every task. A shift keeps boxes valid but not every
    # text: a VQA record holds no box to bound it, and "is the red circle on the left of the image?"
    # or a count can change when an object at the edge moves, so a recipe may shift only the tasks
    # whose targets a small translation cannot change (classification, and the box tasks).
    tasks: list[str] | None = None
    # Also keep the picture's content whole: a pixel whose colour differs from the background (the
    # median of the image's one-pixel frame) by more than this, of 255, in any channel is content, and
    # the shift moves none of it out of the image or under the repeated edge. For labels no box bounds
    # (a class; our world's classification is the shape of the largest object, which a cut object can
    # change); pictures on a plain background. 64 sits above our world's grey clutter (lines at most
    # 40 from the background, speckle 12) and below its colours. None: off (boxes alone bound the shift).
    content_threshold: int | None = None
    # A random zoom about the image's centre before the shift, by a factor in [1 - scale, 1 + scale]
    # (torchvision's RandomAffine(scale=...)); boxes scale with the image, and a zoom that would push a
    # box or the kept content out of the picture is not made. Uniform scaling keeps which object is the
    # largest and what a digit is. 0: off.
    scale: float = 0.0


@dataclass
class DataConfig:
    """The task mixture."""

    path: str | None = None  # a data folder (data_tools.storage layout); None: the synthetic world, cached
    tasks: dict[str, float] = field(default_factory=dict)  # task -> weight (used as given when weighting=explicit)
    # explicit: the weights above; size: proportional to each task's training examples; temperature:
    # proportional to n ** (1 / temperature) (T5's temperature-scaled mixing, Raffel et al. 2020 §3.5.2).
    weighting: Weighting = "explicit"
    temperature: float = 2.0
    train_split: str = "train"
    shots: int | None = None  # keep K training examples per task, drawn reproducibly from train.seed (few-shot)
    cache_dir: str | None = None  # where the synthetic world and trained tokenizers go; None: ~/.cache/unified-vl
    synth: SynthConfig = field(default_factory=SynthConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # The order of a target that lists boxes (grounding's phrases; tasks with `order_by_position`):
    # "record": as the record lists them (the caption's order); "position": reading order, by box
    # centre (docs/learning.md, "Grounding in reading order"). Evaluation is order-free either way.
    target_order: TargetOrder = "record"


@dataclass
class OptimConfig:
    """AdamW with linear warm-up, then decay (no weight decay on norms and biases)."""

    lr: float = 1e-3
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 100
    schedule: Schedule = "cosine"
    min_lr_ratio: float = 0.1  # the learning rate decays to lr * min_lr_ratio at the last step
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    # Learning-rate multipliers by parameter-name prefix, e.g. {visual.backbone.patch_embed: 4} for a
    # convolutional stem that learns faster than the transformer above it (the longest matching prefix
    # wins; a prefix that names no trainable parameter is an error). Empty: one rate for everything.
    lr_scale: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """Batching, length, precision and parallelism."""

    global_batch_size: int = 32  # examples per optimizer step, over all ranks
    micro_batch_size: int = 32  # examples per forward pass on one rank; accumulation is derived
    max_steps: int = 1000  # optimizer steps; the learning-rate schedule spans them
    # Stop training after this many minutes; the schedule is then shortened to the steps that fit,
    # measured after the first steps (so the learning rate still decays).
    max_minutes: float | None = None
    precision: Precision = "fp32"
    zero_stage: ZeroStage = 0
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state and step on the CPU (stages 1-3)
    offload_params: bool = False  # ZeRO-Infinity-style parameter offload to the CPU (stage 3 only)
    # DeepSpeed `zero_optimization` keys over the engine's own (https://www.deepspeed.ai/docs/config-json/),
    # e.g. {stage3_max_live_parameters: 1e9} to trade memory back for speed; checked by DeepSpeed's schema.
    zero_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    # Parameter-name prefixes kept frozen, e.g. ["visual"]. None: what the model freezes by design
    # (model.frozen_by_design: the language model in visual_mode=prefix, nothing in fused); a list
    # replaces that ([] trains everything: Frozen's "finetuned" control).
    freeze: list[str] | None = None
    log_every: int = 10  # optimizer steps between log lines (progress bar, TensorBoard, metrics.jsonl)
    num_threads: int | None = None  # torch CPU threads; None: torch's default
    # Processes the job starts on this machine when it is not already under a launcher: it re-runs
    # itself under `torch.distributed.run --standalone` (capped at the GPU count where there are
    # GPUs). On a CPU, 2 one-thread processes train ~1.25x faster than 1 two-thread process: torch
    # parallelises a tiny model's small matrices poorly.
    local_processes: int = 1
    # How a micro batch's loss averages its target tokens: "token" (T5 / Hugging Face: every token
    # counts once, so long targets such as grounding's weigh more) or "sample" (each example's mean
    # first, so each task weighs what the mixture gives it).
    loss_reduction: Literal["token", "sample"] = "token"
    # Gaussian label smoothing over neighbouring location bins, its standard deviation in bins
    # (SimCC, Li et al. 2022): a box coordinate one bin off is nearly right, and the soft target
    # says so; with one-hot targets each of the 1000 <loc_*> embeddings learns on its own. 0: off.
    loc_sigma: float = 0.0
    # Label smoothing of every target token, in [0, 1): the target becomes (1 - e) of itself plus e
    # spread evenly over the vocabulary (Szegedy et al. 2016). A regulariser against over-confident
    # answers on small data; the logged training losses include it. 0: off (the main job).
    label_smoothing: float = 0.0
    # A product of experts with a question-only answer prior on the VQA records, the prior's weight
    # (Clark et al. 2019, "bias product"): in training the first answer token is scored by
    # softmax(logits + w log p_prior(token | question)); generation and evaluation use the model
    # alone. The model is then not taught what the question alone predicts, so an answer never seen
    # after a question in training (a colour-shape pair held out) is not learnt away. The prior is
    # counted from the training split (`tasks.vqa.QuestionPrior`); the logged VQA loss is the
    # product's. The jobs need vqa in data.tasks. 0: off (the main job).
    answer_prior: float = 0.0
    # The weight of each answer token of a VQA target with grounded evidence (the tokens after
    # tasks.vqa.ANSWER_MARKER, the end-of-sequence included) against each evidence token, in the loss and
    # in the target's token count. A relation question's target is ~17 evidence tokens and 2 answer
    # tokens, so at 1 the answer is a tenth of its example's loss (`loss_reduction=sample`); 8 makes it
    # about half. Targets without the marker weigh 1 throughout; the logged losses are the weighted
    # ones. Only VQA records are read for the marker. 1: off (the main job).
    answer_weight: float = 1.0
    # An exponential moving average of the weights (Polyak & Juditsky 1992), kept in float32 by timm's
    # ModelEmaV3: a plain average of the weights after each optimizer step until the decay reaches this
    # cap (decay_t = min(cap, (t - 1) / t)), then an average over about 1 / (1 - cap) steps. The final
    # evaluation and the exported model use the average; evaluations during training and a
    # checkpoint's weights are the trained ones (the average rides along in each checkpoint, so a
    # resumed run goes on with it). 0: off (the main job).
    ema_decay: float = 0.0
    # mixup (Zhang et al. 2018, "mixup: Beyond Empirical Risk Minimization"): the images of a micro
    # batch's rows of `mixup_tasks` are mixed in pairs, lambda x_i + (1 - lambda) x_j with one lambda
    # ~ Beta(a, a) per micro batch, and the loss is lambda CE(y_i) + (1 - lambda) CE(y_j). A row is only
    # paired with rows of the same prompt (a classification instruction; a VQA answer belongs to its own
    # question), so the target stays an answer to the prompt read. This value is `a`; 0: off (the main job).
    mixup: float = 0.0
    mixup_tasks: list[str] = field(default_factory=lambda: ["classification"])
    # Sharpness-aware minimisation (Foret et al. 2021; unified_vl/engine/sharpness.py): each micro batch's
    # gradient is taken at w + rho g / ||g|| (g: its gradient at w, on this rank alone) and applied to w.
    # About twice the compute per step. Foret et al. use 0.05 on CIFAR; 0: off (the main job).
    sam_rho: float = 0.0


@dataclass
class EvalConfig:
    """Evaluation by generation through the task modules."""

    every: int = 0  # optimizer steps between evaluations during training; 0: none
    splits: list[str] = field(default_factory=lambda: ["val"])  # evaluated during training
    final_splits: list[str] = field(default_factory=lambda: ["test"])  # evaluated once training ends
    max_examples: int | None = 200  # per (task, split) during training; final evaluation uses all
    batch_size: int = 64
    num_beams: int = 1
    # Which weights the final evaluation and the exported model use: "last" (the last step's) or "best"
    # (those of the best validation during training, by checkpoint.best_metric: early stopping;
    # unified_vl/engine/selection.py). "best" needs eval.every > 0 and eval.splits.
    final_weights: FinalWeights = "last"


@dataclass
class CheckpointConfig:
    """DeepSpeed training checkpoints and the exported model folder."""

    every: int = 0  # optimizer steps between checkpoints; 0: only at the end
    keep_last: int = 2  # newest checkpoints kept (the best one is kept besides them)
    best_metric: str | None = None  # e.g. "vqa/val/accuracy"; None: mean/{first eval split}/primary
    export: bool = True  # write the Hugging Face folder <output_dir>/model when training ends


@dataclass
class MethodConfig:
    """How the model is adapted (``unified_vl.prompting``; DESIGN.md §8)."""

    name: str = "full"  # a registered method: full, or a prompt-learning / adapter method
    options: dict[str, Any] = field(default_factory=dict)  # the method's own settings; unknown ones are errors


@dataclass
class RunConfig:
    """One training run."""

    output_dir: str | None = None  # None: runs/<job>-<date-time>
    resume: bool = False  # continue from <output_dir>/checkpoints/latest
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


# --------------------------------------------------------------------------------------------
# Types: describe, coerce
# --------------------------------------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return "section"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is list:
        return f"list[{_describe(args[0])}]"
    if origin is dict:
        return f"dict[str, {_describe(args[1])}]"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def _parse_text(text: str) -> Any:
    """A command-line value as YAML, with numbers PyYAML 1.1 leaves as strings ("1e-3") made numbers."""
    value = yaml.safe_load(text) if text.strip() else ""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _coerce(value: Any, tp: Any, key: str, *, from_text: bool) -> Any:
    """``value`` as type ``tp``; ``from_text``: it came from the command line as a string."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def fail() -> ConfigError:
        return ConfigError(f"{key}: expected {_describe(tp)}, got {type(value).__name__} {value!r}")

    if tp is Any:
        return _parse_text(value) if from_text and isinstance(value, str) else value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and from_text:
            value = _parse_text(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: is a section; set its keys ({key}.KEY=VALUE) or give a mapping, got {value!r}")
        return _from_dict(tp, value, key, from_text=from_text)
    if origin in (typing.Union, types.UnionType):
        if value is None or (from_text and isinstance(value, str) and value.strip().lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
            raise fail()
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _coerce(value, arm, key, from_text=from_text)
            except ConfigError:
                continue
        raise fail()
    if origin is Literal:
        for allowed in args:
            if value == allowed and type(value) is type(allowed):
                return allowed
            if from_text and isinstance(value, str) and str(allowed) == value.strip():
                return allowed
        raise fail()
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.strip().lower() in ("true", "yes", "1")
        raise fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and not from_text:
            return int(value)
        if from_text and isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise fail() from None
        raise fail()
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # PyYAML 1.1 reads "1e-3" as a string, in files too
            try:
                number = float(value.strip())
            except ValueError:
                raise fail() from None
        if number is None:
            raise fail()
        if not math.isfinite(number):  # inf and nan parse as floats; no setting of a run means them
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail()
    if origin is list:
        if from_text and isinstance(value, str):
            text = value.strip()
            value = _parse_text(text) if text.startswith("[") else [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise fail()
        return [_coerce(v, args[0], f"{key}[{i}]", from_text=from_text) for i, v in enumerate(value)]
    if origin is dict:
        if from_text and isinstance(value, str):
            value = _parse_text(value)
        if not isinstance(value, dict):
            raise fail()
        return {str(k): _coerce(v, args[1], f"{key}.{k}", from_text=from_text) for k, v in value.items()}
    raise TypeError(f"{key}: unsupported config type {tp!r}")  # a schema bug, not a user error


def allowed_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """``"section.key: type"`` for every leaf key of ``cls`` (for error messages and --help)."""
    lines = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            lines += allowed_keys(tp, f"{prefix}{f.name}.")
        else:
            lines.append(f"{prefix}{f.name}: {_describe(tp)}")
    return lines


def _unknown_key(cls: type, key: str, name: str) -> ConfigError:
    section = key.rpartition(".")[0]
    known = ", ".join(f.name for f in dataclasses.fields(cls))
    where = f"section {section!r}" if section else "the top level"
    return ConfigError(
        f"unknown config key {key!r}: {where} has no {name!r}; allowed there: {known}.\n"
        "All keys:\n  " + "\n  ".join(allowed_keys())
    )


def _from_dict(cls: type, values: dict, prefix: str, *, from_text: bool) -> Any:
    """A dataclass from a mapping, every value checked; missing keys keep their defaults."""
    names = {f.name for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in names:
            raise _unknown_key(cls, key, str(name))
        kwargs[name] = _coerce(value, hints[name], key, from_text=from_text)
    return cls(**kwargs)


def to_dict(config: Any) -> dict:
    """A config as plain nested dicts and lists (for YAML and JSON)."""
    return dataclasses.asdict(config)


def _set_dotted(target: dict, cls: type, parts: list[str], value: str, key: str) -> None:
    """Sets ``parts`` (the tail of the dotted ``key``) in the nested dict ``target`` shaped like ``cls``."""
    name = parts[0]
    names = {f.name for f in dataclasses.fields(cls)}
    if name not in names:
        depth = len(key.split(".")) - len(parts)
        raise _unknown_key(cls, ".".join(key.split(".")[: depth + 1]), name)
    tp = _hints(cls)[name]
    if len(parts) == 1:
        target[name] = _coerce(value, tp, key, from_text=True)
        return
    if dataclasses.is_dataclass(tp):
        _set_dotted(target.setdefault(name, {}), tp, parts[1:], value, key)
        return
    if typing.get_origin(tp) is dict:
        # Into a free-form mapping: the rest of the path are its (nested) keys.
        node = target.setdefault(name, {})
        for part in parts[1:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part!r} already holds a value, not a mapping")
        node[parts[-1]] = _coerce(value, typing.get_args(tp)[1], key, from_text=True)
        return
    raise ConfigError(f"{key}: {'.'.join(key.split('.')[:-1])} is a {_describe(tp)}, it has no sub-keys")


def _deep_merge(base: dict, update: dict, cls: type) -> dict:
    """``update`` over ``base``; sections merge key by key, any other value (mappings too) replaces."""
    out = dict(base)
    hints = _hints(cls)
    for name, value in update.items():
        tp = hints.get(name)
        if (
            tp is not None
            and dataclasses.is_dataclass(tp)
            and isinstance(value, dict)
            and isinstance(out.get(name), dict)
        ):
            out[name] = _deep_merge(out[name], value, tp)
        else:
            out[name] = value
    return out


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *, defaults: dict | None = None
) -> RunConfig:
    """The run config from job defaults, a YAML file and ``key=value`` overrides.

    Args:
        path: a YAML run file (sections as in `RunConfig`), or None.
        overrides: ``"dotted.key=value"`` strings, applied last.
        defaults: the job's defaults over the dataclass defaults (nested mapping).

    Raises:
        ConfigError: an unknown key, a wrong type, or an override without ``=``.
    """
    merged: dict = {}
    layers: list[tuple[dict, bool]] = []
    if defaults:
        layers.append((defaults, False))
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file {str(file)!r} does not exist")
        loaded = yaml.safe_load(file.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(file)!r} must hold a mapping of sections, got {type(loaded).__name__}")
        layers.append((loaded, False))
    for data, from_text in layers:
        # Validate each layer on its own so that errors name the right key.
        _from_dict(RunConfig, data, "", from_text=from_text)
        merged = _deep_merge(merged, data, RunConfig)
    config = _from_dict(RunConfig, merged, "", from_text=False)
    if overrides:
        tree = to_dict(config)
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. optim.lr=3e-4)")
            _set_dotted(tree, RunConfig, key.strip().split("."), value, key.strip())
        config = _from_dict(RunConfig, tree, "", from_text=False)
    validate(config)
    return config


def validate(config: RunConfig) -> None:
    """Checks values that types alone do not (ranges, combinations, model overrides)."""
    from unified_vl.config import PRESETS

    def positive(key: str, value: float | None, *, allow_zero: bool = False) -> None:
        if value is not None and (value < 0 or (value == 0 and not allow_zero)):
            raise ConfigError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")

    m, d, o, t, e, c = config.model, config.data, config.optim, config.train, config.eval, config.checkpoint
    if m.preset is not None and m.preset not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {m.preset!r}; known: {', '.join(PRESETS)}")
    if m.init is not None and (m.preset is not None or m.overrides):
        raise ConfigError(
            "model.init fixes the architecture (the folder's config.json); leave model.preset and model.overrides unset"
        )
    _validate_overrides(m.overrides, m.preset)
    positive("model.tokenizer_vocab_size", m.tokenizer_vocab_size)
    _validate_method(config)
    if not d.tasks:
        raise ConfigError("data.tasks is empty; name the tasks to train, e.g. data.tasks={vqa: 1, rec: 1}")
    for task, weight in d.tasks.items():
        if weight < 0 or (d.weighting == "explicit" and weight == 0):
            raise ConfigError(f"data.tasks.{task}: a weight must be > 0, got {weight!r}")
    positive("data.temperature", d.temperature)
    positive("data.shots", d.shots)
    positive("data.synth.num_images", d.synth.num_images)
    positive("data.synth.image_size", d.synth.image_size)
    if not 0 <= d.augment.shift < 0.5:
        raise ConfigError(
            f"data.augment.shift must be in [0, 0.5) (a fraction of the image side), got {d.augment.shift!r}"
        )
    if not 0 <= d.augment.scale < 0.5:
        raise ConfigError(
            f"data.augment.scale must be in [0, 0.5) (the largest change of size), got {d.augment.scale!r}"
        )
    threshold = d.augment.content_threshold
    if threshold is not None and not 0 <= threshold < 255:
        raise ConfigError(
            f"data.augment.content_threshold must be in [0, 255) (a colour difference) or null, got {threshold!r}"
        )
    positive("optim.lr", o.lr)
    positive("optim.eps", o.eps)
    for key, beta in (("optim.beta1", o.beta1), ("optim.beta2", o.beta2)):
        if not 0 <= beta < 1:  # Adam's moment decay rates (Kingma & Ba 2015, Algorithm 1): in [0, 1)
            raise ConfigError(f"{key} must be in [0, 1), got {beta!r}")
    positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
    positive("optim.grad_clip", o.grad_clip, allow_zero=True)
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio!r}")
    for prefix, scale in o.lr_scale.items():
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0:
            raise ConfigError(f"optim.lr_scale[{prefix!r}] must be a number > 0, got {scale!r}")
    for key in ("global_batch_size", "micro_batch_size", "max_steps", "log_every"):
        positive(f"train.{key}", getattr(t, key))
    positive("train.max_minutes", t.max_minutes)
    positive("train.num_threads", t.num_threads)
    positive("train.local_processes", t.local_processes)
    positive("train.loc_sigma", t.loc_sigma, allow_zero=True)
    check_training_extras(t)
    if t.mixup and not set(t.mixup_tasks) & set(d.tasks):
        raise ConfigError(
            f"train.mixup mixes the records of train.mixup_tasks ({', '.join(t.mixup_tasks) or 'none'}), and "
            f"data.tasks ({', '.join(d.tasks)}) trains none of them; name one, e.g. train.mixup_tasks=[classification]"
        )
    for key in ("ema_decay", "sam_rho"):
        if getattr(t, key) and t.zero_stage == 3:
            raise ConfigError(
                f"train.{key} needs whole weights on every rank (train.zero_stage 0, 1 or 2); ZeRO-3 shards them"
            )
    if t.offload_params and t.zero_stage != 3:
        raise ConfigError(f"train.offload_params needs train.zero_stage=3, got zero_stage={t.zero_stage}")
    if t.offload_optimizer and t.zero_stage == 0:
        raise ConfigError("train.offload_optimizer needs train.zero_stage 1, 2 or 3 (ZeRO-Offload), got 0")
    if t.zero_options:
        check_zero_options(t.zero_options)
    positive("eval.every", e.every, allow_zero=True)
    positive("eval.max_examples", e.max_examples)
    positive("eval.batch_size", e.batch_size)
    positive("eval.num_beams", e.num_beams)
    check_final_weights(config)
    positive("checkpoint.every", c.every, allow_zero=True)
    positive("checkpoint.keep_last", c.keep_last)
    if c.best_metric is not None and len(c.best_metric.split("/")) != 3:
        raise ConfigError(f"checkpoint.best_metric must be a metric key 'task/split/metric', got {c.best_metric!r}")


def check_training_extras(t: TrainConfig) -> None:
    """The ranges of the loss's and the weights' optional extras (smoothing, prior, average, mixup, SAM)."""
    if isinstance(t.label_smoothing, bool) or not 0 <= t.label_smoothing < 1:
        raise ConfigError(f"train.label_smoothing must be a number in [0, 1), got {t.label_smoothing!r}")
    if (
        isinstance(t.answer_prior, bool)
        or not isinstance(t.answer_prior, (int, float))
        or not 0 <= t.answer_prior < 100
    ):
        raise ConfigError(f"train.answer_prior must be a number in [0, 100), got {t.answer_prior!r}")
    if (
        isinstance(t.answer_weight, bool)
        or not isinstance(t.answer_weight, (int, float))
        or not 0 < t.answer_weight <= 100
    ):
        raise ConfigError(f"train.answer_weight must be a number in (0, 100], got {t.answer_weight!r}")
    if isinstance(t.ema_decay, bool) or not isinstance(t.ema_decay, (int, float)) or not 0 <= t.ema_decay < 1:
        raise ConfigError(f"train.ema_decay must be a number in [0, 1), got {t.ema_decay!r}")
    if isinstance(t.mixup, bool) or not isinstance(t.mixup, (int, float)) or not 0 <= t.mixup <= 10:
        raise ConfigError(
            f"train.mixup must be a number in [0, 10] (the Beta distribution's a; 0: off), got {t.mixup!r}"
        )
    if isinstance(t.sam_rho, bool) or not isinstance(t.sam_rho, (int, float)) or not 0 <= t.sam_rho <= 10:
        raise ConfigError(f"train.sam_rho must be a number in [0, 10] (SAM's radius; 0: off), got {t.sam_rho!r}")


def check_final_weights(config: RunConfig) -> None:
    """``eval.final_weights=best`` needs validations to choose from and whole weights to keep."""
    e, t = config.eval, config.train
    if e.final_weights != "best":
        return
    if not e.every or not e.splits:
        raise ConfigError(
            "eval.final_weights=best chooses among validations during training: set eval.every > 0 and "
            f"eval.splits (now every={e.every}, splits={e.splits})"
        )
    if t.ema_decay:
        raise ConfigError("eval.final_weights=best and train.ema_decay both choose the final weights; set one")
    if t.zero_stage == 3:
        raise ConfigError(
            "eval.final_weights=best keeps whole weights (train.zero_stage 0, 1 or 2); ZeRO-3 shards them"
        )


# T5Config integer fields that are sizes or counts (T5Config's docstring): at least 1.
_T5_SIZES = (
    "vocab_size",
    "d_model",
    "d_kv",
    "d_ff",
    "num_layers",
    "num_decoder_layers",
    "num_heads",
    "relative_attention_num_buckets",
    "relative_attention_max_distance",
)


def _check_type(key: str, value: Any, expected: Any) -> None:
    """``value`` has the type ``expected`` (a type hint, or the default value whose type it must share)."""
    if not isinstance(expected, type) and typing.get_origin(expected) is None:
        if expected is None:
            return  # a default of None says nothing about the type
        expected = type(expected)
    arms = typing.get_args(expected) if typing.get_origin(expected) in (typing.Union, types.UnionType) else (expected,)
    arms = tuple(
        typing.get_origin(a) or a for a in arms if a is not type(None) and isinstance(typing.get_origin(a) or a, type)
    )
    if value is None and type(None) in typing.get_args(expected):
        return
    ok = any(
        (arm is float and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
        or (arm is int and isinstance(value, int) and not isinstance(value, bool))
        or (arm not in (int, float) and isinstance(value, arm))
        for arm in arms
    )
    if not ok:
        names = " | ".join(a.__name__ for a in arms)
        raise ConfigError(f"{key}: expected {names}, got {type(value).__name__} {value!r}")


def _validate_overrides(overrides: dict[str, Any], preset: str | None) -> None:
    """``model.overrides``: known fields of the right types and ranges, and a model config they can build."""
    from transformers import T5Config

    from unified_vl.config import UnifiedVLConfig

    hints = typing.get_type_hints(UnifiedVLConfig.__init__)
    allowed = set(inspect.signature(UnifiedVLConfig.__init__).parameters) - {"self", "kwargs"}
    for name, value in overrides.items():
        key = f"model.overrides.{name}"
        if name not in allowed:
            raise ConfigError(f"model.overrides: unknown field {name!r}; allowed: {', '.join(sorted(allowed))}")
        if name != "text_config":
            _check_type(key, value, hints[name])
            if name in ("image_size", "max_text_length", "max_target_length") and value < 2:
                raise ConfigError(f"{key} must be >= 2, got {value!r}")
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"model.overrides.text_config must be a mapping, got {value!r}")
        defaults = T5Config().to_dict()
        for k, v in value.items():
            if k not in defaults:
                raise ConfigError(
                    f"model.overrides.text_config: unknown T5Config field {k!r}; allowed: {', '.join(sorted(defaults))}"
                )
            _check_type(f"{key}.{k}", v, defaults[k])
            if k in _T5_SIZES and v is not None and v < 1:
                raise ConfigError(f"{key}.{k} must be >= 1, got {v!r}")
            if k == "dropout_rate" and not 0 <= v < 1:
                raise ConfigError(f"{key}.{k} must be in [0, 1), got {v!r}")
    text = overrides.get("text_config", {})
    rest = {k: v for k, v in overrides.items() if k != "text_config"}
    try:  # what only the constructor checks (visual_mode, num_bins); builds a config, no weights
        UnifiedVLConfig.from_preset(preset or "uvl-tiny", text_config=text, **rest)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"model.overrides: {exc}") from None


def _validate_method(config: RunConfig) -> None:
    from unified_vl.prompting import MethodError, get_method

    try:
        method = get_method(config.method.name)
        method.resolve_options(config.method.options)
    except MethodError as exc:
        raise ConfigError(f"method: {exc}") from None
    if method.saves_adapter and config.model.init is None:
        raise ConfigError(
            f"method {method.name!r} saves an adapter for a base model folder: give one with model.init (--init MODEL)"
        )


def dump_yaml(config: RunConfig, derived: Derived | None = None) -> str:
    """The resolved config as YAML (what each run saves beside its checkpoints)."""
    text = yaml.safe_dump(to_dict(config), sort_keys=False)
    if derived is not None:
        lines = "\n".join(f"#   {k}: {v}" for k, v in dataclasses.asdict(derived).items())
        text += f"# derived (computed, not configured):\n{lines}\n"
    return text


# --------------------------------------------------------------------------------------------
# Derived values and the DeepSpeed config
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Derived:
    """Values computed from the config and the world size."""

    world_size: int
    gradient_accumulation_steps: int  # global batch / (micro batch x world size)
    examples_per_rank_per_step: int


def derive(config: RunConfig, world_size: int) -> Derived:
    """Gradient accumulation and per-rank batch; errors on a global batch that does not divide.

    Raises:
        ConfigError: ``global_batch_size`` is not a multiple of ``micro_batch_size x world_size``.
    """
    t = config.train
    per_pass = t.micro_batch_size * world_size
    if t.global_batch_size % per_pass:
        low = max(per_pass, t.global_batch_size // per_pass * per_pass)
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size x world size "
            f"= {t.micro_batch_size} x {world_size} = {per_pass}; use a multiple of {per_pass} "
            f"(e.g. {low} or {low + per_pass}) or change train.micro_batch_size"
        )
    return Derived(
        world_size=world_size,
        gradient_accumulation_steps=t.global_batch_size // per_pass,
        examples_per_rank_per_step=t.global_batch_size // world_size,
    )


def stage3_memory_options(hidden_size: int) -> dict[str, int]:
    """ZeRO-3 settings that put memory first, scaled to the model width ``d``.

    DeepSpeed's own defaults (1e9 live parameters, reuse distance 1e9, 5e8-element buckets and
    sub-groups) are sized for models of billions of parameters: for ours they keep every gathered
    weight and a whole model's gradients alive, so ZeRO 3 held more memory per process than ZeRO 0
    (scripts/bench_memory.py, docs/BENCHMARKS.md). The prefetch bucket and persistence threshold are
    Hugging Face Trainer's "auto" values (0.9 d^2 and 10 d, transformers.integrations.deepspeed);
    the rest bound what is alive at once to a few layers' worth (d^2 to 20 d^2 elements), release a
    gathered weight as soon as its module is done (reuse distance 0) and step the optimizer in
    sub-groups, so that Adam's temporaries are not the size of the whole partition.
    """
    d2 = hidden_size * hidden_size
    return {
        "reduce_bucket_size": d2,
        "allgather_bucket_size": d2,
        "stage3_prefetch_bucket_size": int(0.9 * d2),
        "stage3_param_persistence_threshold": 10 * hidden_size,
        "stage3_max_live_parameters": 20 * d2,
        "stage3_max_reuse_distance": 0,
        "sub_group_size": 20 * d2,
    }


def check_zero_options(options: dict[str, Any]) -> None:
    """``train.zero_options`` through DeepSpeed's own schema of `zero_optimization`; ConfigError naming the key."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    try:
        DeepSpeedZeroConfig(**options)
    except ValidationError as e:
        problems = "; ".join(f"train.zero_options.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ConfigError(
            f"{problems} (keys of DeepSpeed's zero_optimization, https://www.deepspeed.ai/docs/config-json/)"
        ) from None


def deepspeed_config(config: RunConfig, derived: Derived, *, hidden_size: int | None = None) -> dict:
    """The DeepSpeed JSON for this run (https://www.deepspeed.ai/docs/config-json/).

    The optimizer and scheduler are not in it: the engine passes its own (AdamW with parameter
    groups, a warm-up-then-decay ``LambdaLR``) to ``deepspeed.initialize``. ``hidden_size`` (the
    model's width) sizes ZeRO 3's buffers (`stage3_memory_options`); ``train.zero_options`` come last.
    """
    t = config.train
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if t.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    if t.zero_stage == 3:
        # Gather the full weights on save so that an export needs no offline consolidation.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if hidden_size is not None:
            zero.update(stage3_memory_options(hidden_size))
    zero.update(t.zero_options)
    ds: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": derived.gradient_accumulation_steps,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # Our own progress bar and logs report; DeepSpeed's per-step prints would repeat them.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if config.optim.grad_clip > 0:
        ds["gradient_clipping"] = config.optim.grad_clip
    return ds
