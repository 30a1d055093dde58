"""Export a saved DeepSpeed checkpoint of a run as a Hugging Face model folder, offline (one process).

    python -m unified_vl.engine.export runs/pretrain-... --tag best --out runs/pretrain-.../model-best

ZeRO-1/2/3 shards are consolidated into float32 weights with DeepSpeed's ``zero_to_fp32``; a
ZeRO-0 checkpoint holds the whole model already. The run's ``spec/`` folder (config, tokenizer,
processor; written when the run starts) supplies everything but the weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from unified_vl.engine.checkpoints import LATEST, CheckpointError

SPEC = "spec"  # <run>/spec: config.json + tokenizer + processor_config.json, no weights


def resolve_tag(checkpoints: Path, tag: str | None) -> str:
    """``None``/"latest" -> the latest tag, "best" -> the best one of index.json, else ``tag`` itself."""
    if tag in (None, "latest"):
        path = checkpoints / LATEST
        if not path.is_file():
            raise CheckpointError(f"{checkpoints} has no {LATEST!r} checkpoint")
        return path.read_text().strip()
    if tag == "best":
        best = (
            json.loads((checkpoints / "index.json").read_text()).get("best")
            if (checkpoints / "index.json").is_file()
            else None
        )
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
    """Writes checkpoint ``tag`` (latest, best or a step tag) of ``run_dir`` as a model folder."""
    import torch

    from unified_vl.checkpoint import save_pretrained
    from unified_vl.config import UnifiedVLConfig
    from unified_vl.modeling import UnifiedVLForConditionalGeneration
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
    model = UnifiedVLForConditionalGeneration(UnifiedVLConfig.from_pretrained(run_dir / SPEC))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    tied = {k for k in missing if k.endswith(("lm_head.weight", "embed_tokens.weight"))}
    if set(missing) - tied or unexpected:
        raise CheckpointError(
            f"checkpoint {tag!r} does not fit the run's model: missing {missing}, unexpected {unexpected}"
        )
    return save_pretrained(model, UnifiedVLProcessor.from_pretrained(run_dir / SPEC), out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unified_vl.engine.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a training run folder (with checkpoints/ and spec/)")
    parser.add_argument("--tag", default="latest", help="latest (default), best, or a tag such as step_00001000")
    parser.add_argument("--out", required=True, help="the model folder to write")
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
