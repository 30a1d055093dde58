"""Export: a training checkpoint of a run -> a Hugging Face model folder.

    python -m unified_vl.engine.export runs/pretrain-... --tag best --out runs/pretrain-.../model-best

Two ways in, one way out: :func:`export_model` takes the live DeepSpeed engine at the end of a run
(all ranks call it; ZeRO-3 shards are gathered to rank 0); :func:`export_checkpoint` reads any kept
checkpoint offline, in one process (ZeRO-1/2/3 shards consolidated into float32 weights with
DeepSpeed's ``zero_to_fp32``; a ZeRO-0 checkpoint holds the whole model already). Both load the
weights into a fresh float32 model built from the run's config and save it with
:func:`unified_vl.checkpoint.save_pretrained`. The run's ``spec/`` folder (config, tokenizer,
processor; written when the run starts) supplies everything but the weights offline.

A run of a method that saves adapters (``Method.saves_adapter``) exports its adapter instead: the
method's own weights and its base model's identity (:mod:`unified_vl.adapters`), from the live
engine (:func:`export_adapter`) or offline from a checkpoint (``spec/method.json`` names the method,
its options and the base).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from unified_vl.checkpoint import CheckpointError
from unified_vl.engine.checkpoints import LATEST
from unified_vl.engine.distributed import DistInfo, barrier

SPEC = "spec"  # <run>/spec: config.json + tokenizer + processor_config.json, no weights
METHOD_SPEC = "method.json"  # <run>/spec/method.json: the method that saves an adapter, and its base


@dataclass(frozen=True)
class AdapterSpec:
    """What a run of an adapter-saving method exports besides the weights.

    Attributes:
        method: the method's name.
        options: its resolved options.
        base: the base model's identity (``unified_vl.adapters.base_identity``).
    """

    method: str
    options: dict
    base: dict

    def save(self, spec_dir: Path) -> None:
        from unified_vl.checkpoint import atomic_write_text

        atomic_write_text(spec_dir / METHOD_SPEC, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, spec_dir: Path) -> AdapterSpec | None:
        path = spec_dir / METHOD_SPEC
        return cls(**json.loads(path.read_text())) if path.is_file() else None


def save_weights_as_model_folder(
    config, state: Mapping[str, Any], processor, out_dir: str | Path, *, what: str
) -> Path:
    """A fresh float32 model of ``config`` holding ``state``, saved as a model folder.

    Tied embedding tables may be absent from ``state`` (DeepSpeed saves one of them); any other
    missing or unexpected key is an error naming ``what`` (the checkpoint).
    """
    from unified_vl.checkpoint import save_pretrained
    from unified_vl.modeling import UnifiedVLForConditionalGeneration

    model = UnifiedVLForConditionalGeneration(copy.deepcopy(config))  # no DeepSpeed hooks, no training dtype
    missing, unexpected = model.load_state_dict({k: v.detach().float().cpu() for k, v in state.items()}, strict=False)
    tied = {k for k in missing if k.endswith(("lm_head.weight", "embed_tokens.weight"))}
    if set(missing) - tied or unexpected:
        raise CheckpointError(f"{what} does not fit the run's model: missing {missing}, unexpected {unexpected}")
    return save_pretrained(model, processor, out_dir)


def export_model(engine: Any, processor: Any, out_dir: str | Path, *, dist: DistInfo, zero_stage: int) -> Path:
    """Writes the live engine's model as a model folder; all ranks must call this.

    Under ZeRO-3 the parameter shards are gathered to rank 0 first (DeepSpeed's
    ``_zero3_consolidated_16bit_state_dict``, which keeps the training dtype). The weights are
    saved in float32 whatever the training precision.
    """
    if zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # full tensors on rank 0, None elsewhere
    else:
        state = engine.module.state_dict() if dist.is_main else None
    out = Path(out_dir)
    if dist.is_main:
        save_weights_as_model_folder(engine.module.config, state, processor, out, what="the trained model")
    barrier()
    return out


def export_adapter(
    engine: Any, spec: AdapterSpec, keys: Sequence[str], out_dir: str | Path, *, dist: DistInfo, zero_stage: int
) -> Path:
    """Writes the live engine's adapter (the tensors ``keys``, the method's own) as an adapter folder; all ranks call this."""
    from unified_vl.adapters import save_adapter

    if zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # full tensors on rank 0, None elsewhere
    else:
        state = engine.module.state_dict() if dist.is_main else None
    out = Path(out_dir)
    if dist.is_main:
        save_adapter(out, method=spec.method, options=spec.options, base=spec.base, state={k: state[k] for k in keys})
    barrier()
    return out


def _adapter_from_state(spec: AdapterSpec, config, state: Mapping[str, Any], out_dir: str | Path, *, what: str) -> Path:
    """A fresh model of ``config`` with the method attached and ``state`` loaded; its adapter saved."""
    import torch

    from unified_vl.adapters import method_weights, save_adapter
    from unified_vl.modeling import UnifiedVLForConditionalGeneration
    from unified_vl.prompting import get_method

    model = UnifiedVLForConditionalGeneration(copy.deepcopy(config))
    get_method(spec.method).attach(model, spec.options)
    own = method_weights(model)
    missing = sorted(k for k in own if k not in state)
    if missing:
        raise CheckpointError(f"{what} lacks the {spec.method} weights {missing[:6]}")
    weights = {k: torch.as_tensor(state[k]).detach().float().cpu() for k in own}
    return save_adapter(out_dir, method=spec.method, options=spec.options, base=spec.base, state=weights)


def resolve_tag(checkpoints: Path, tag: str | None) -> str:
    """``None``/"latest" -> the latest tag, "best" -> the best one of index.json, else ``tag`` itself."""
    if tag in (None, "latest"):
        path = checkpoints / LATEST
        if not path.is_file():
            raise CheckpointError(f"{checkpoints} has no {LATEST!r} checkpoint")
        return path.read_text().strip()
    if tag == "best":
        index = checkpoints / "index.json"
        best = json.loads(index.read_text()).get("best") if index.is_file() else None
        if not best:
            raise CheckpointError(
                f"{checkpoints} has no best checkpoint (no evaluation ran, or checkpoint.best_metric never appeared)"
            )
        return best["tag"]
    if not (checkpoints / tag).is_dir():
        have = sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) if checkpoints.is_dir() else []
        raise CheckpointError(f"{checkpoints} has no checkpoint {tag!r}; it has: {', '.join(have) or 'none'}")
    return tag


def export_checkpoint(run_dir: str | Path, out_dir: str | Path, *, tag: str | None = None) -> Path:
    """Writes checkpoint ``tag`` (latest, best or a step tag) of ``run_dir`` as a model folder, offline
    (as an adapter folder for a method that saves adapters)."""
    import torch

    from unified_vl.config import UnifiedVLConfig
    from unified_vl.processor import UnifiedVLProcessor

    run_dir = Path(run_dir)
    checkpoints = run_dir / "checkpoints"
    tag = resolve_tag(checkpoints, tag)
    stage = json.loads((run_dir / "ds_config.json").read_text())["zero_optimization"]["stage"]
    if stage == 0:
        # Our own training checkpoint: trusted, and DeepSpeed stores it as a pickle.
        states = torch.load(checkpoints / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        state = states["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=tag)
    config = UnifiedVLConfig.from_pretrained(run_dir / SPEC)
    adapter = AdapterSpec.load(run_dir / SPEC)
    if adapter is not None:
        return _adapter_from_state(adapter, config, state, out_dir, what=f"checkpoint {tag!r}")
    processor = UnifiedVLProcessor.from_pretrained(run_dir / SPEC)
    return save_weights_as_model_folder(config, state, processor, out_dir, what=f"checkpoint {tag!r}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unified_vl.engine.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a training run folder (with checkpoints/ and spec/)")
    parser.add_argument("--tag", default="latest", help="latest (default), best, or a tag such as step_00001000")
    parser.add_argument("--out", required=True, help="the model folder (adapter folder, for adapter methods) to write")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.run_dir, args.out, tag=args.tag)
    except (CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
