"""``lora``: low-rank updates of the attention projections, through ``peft``.

LoRA (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models"): a frozen projection
``W`` becomes ``W + (alpha / r) B A`` with ``A`` (r, in) and ``B`` (out, r) trained, ``B`` starting
at zero so that training starts from the pretrained model. The targets are the self-attention
projections ``q``, ``k``, ``v``, ``o`` of every T5 encoder and decoder block (Hu et al. adapt the
attention weights, §4.2), and with ``vision=true`` the ViT blocks' ``qkv`` and ``proj`` too.
``alpha`` defaults to ``rank``, so the update's scale is 1 (§4.1: "we simply set alpha to the first
r we try and do not tune it").

Targets are regular expressions over full module names, which ``peft`` matches whole: a T5 block's
self-attention is ``layer.0.SelfAttention``, its cross-attention ``layer.1.EncDecAttention``, whose
projections have the same short names (``q``, ``v``); matching by suffix, as ``peft``'s default
T5 targets do, would adapt cross-attention by accident. A target that matches no module is an
error naming what there is.

Serving: adapters are injected side by side into one model under their names
(:func:`add_adapter`), and :func:`rows` makes each row of a batch use its own, through the
``adapter_names`` of ``peft``'s LoRA layers (mixed-adapter batches; ``"__base__"`` is a row
without adapter).
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Mapping, Sequence

import torch

from unified_vl.prompting import Method

TRAINING_NAME = "default"  # the adapter's name in the model during training (peft's default)
TEXT_TARGETS = r"language_model\.(encoder|decoder)\.block\.\d+\.layer\.0\.SelfAttention\.({names})"
VISION_TARGETS = r"visual\.backbone\.blocks\.\d+\.attn\.({names})"


def _patterns(model, options) -> list[str]:
    """One full-name regular expression per target family; raises when a target name matches no linear layer."""
    families = [(TEXT_TARGETS, list(options["targets"]), "T5 self-attention")]
    if options["vision"]:
        families.append((VISION_TARGETS, list(options["vision_targets"]), "ViT attention"))
    # Linear layers, also those already wrapped by peft for another adapter (a model serving several).
    names = [n for n, m in model.named_modules() if isinstance(getattr(m, "base_layer", m), torch.nn.Linear)]
    patterns = []
    for template, targets, what in families:
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"lora: the {what} targets must be a non-empty list of module names, got {targets!r}")
        for target in targets:
            if not any(re.fullmatch(template.format(names=re.escape(target)), n) for n in names):
                have = sorted({n.rsplit(".", 1)[-1] for n in names if re.fullmatch(template.format(names=r"\w+"), n)})
                raise ValueError(
                    f"lora: target {target!r} matches no {what} projection of this model; "
                    f"the {what} projections are named: {', '.join(have) or 'none'}"
                )
        patterns.append(template.format(names="|".join(re.escape(t) for t in targets)))
    return patterns


def _inject(model, name: str, options) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    if options["rank"] < 1:
        raise ValueError(f"lora: option 'rank' must be >= 1, got {options['rank']}")
    config = LoraConfig(
        r=options["rank"],
        lora_alpha=options["alpha"] or options["rank"],
        lora_dropout=options["dropout"],
        target_modules="|".join(f"(?:{p})" for p in _patterns(model, options)),
    )
    with warnings.catch_warnings():
        # peft warns that a model holding adapters gets another; several adapters is the point here.
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        inject_adapter_in_model(config, model, adapter_name=name)  # freezes everything but the LoRA weights


def attach(model, options) -> None:
    """Adds LoRA weights to the configured projections; everything else is frozen."""
    _inject(model, TRAINING_NAME, options)


def add_adapter(model, name: str, options, weights: Mapping[str, torch.Tensor]) -> None:
    """Injects a trained adapter under ``name`` next to those ``model`` holds; rows pick it by name."""
    from unified_vl.adapters import AdapterError

    _inject(model, name, options)
    renamed = {re.sub(rf"\.{TRAINING_NAME}\.", f".{name}.", key, count=1): value for key, value in weights.items()}
    params = dict(model.named_parameters())
    missing = sorted(k for k in params if re.search(rf"\.lora_[AB]\.{re.escape(name)}\.", k) and k not in renamed)
    unexpected = sorted(k for k in renamed if k not in params)
    if missing or unexpected:
        raise AdapterError(f"lora adapter {name!r} does not fit: missing {missing[:6]}, unexpected {unexpected[:6]}")
    with torch.no_grad():
        for key, value in renamed.items():
            params[key].copy_(value)
    model.adapter_rows = rows


@contextlib.contextmanager
def rows(model, names: Sequence[str]):
    """Every LoRA layer of ``model`` runs row ``i`` of its input with adapter ``names[i]`` (peft's mixed batch)."""
    from peft.tuners.lora import LoraLayer

    def inject_names(module, args, kwargs):
        return args, {**kwargs, "adapter_names": names}

    handles = [
        module.register_forward_pre_hook(inject_names, with_kwargs=True)
        for module in model.modules()
        if isinstance(module, LoraLayer)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


METHOD = Method(
    name="lora",
    description="low-rank updates of the encoder and decoder self-attention (vision=true: the ViT's too) via peft",
    options={
        "rank": 8,
        "alpha": 0.0,  # 0: alpha = rank (scale 1)
        "dropout": 0.0,
        "targets": ["q", "k", "v", "o"],
        "vision": False,
        "vision_targets": ["qkv", "proj"],
    },
    attach=attach,
    saves_adapter=True,
    add_adapter=add_adapter,
)
