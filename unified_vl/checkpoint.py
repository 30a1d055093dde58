"""The Hugging Face model folder: model, tokenizer and processor in one place (DESIGN.md §3).

``config.json`` + ``model.safetensors`` (no pickle) + tokenizer files + ``processor_config.json``.
Saving writes a temporary sibling folder and renames it into place, so a kill or a full disk
never leaves a half-written folder under the final name, and an existing one survives until the
new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from unified_vl.config import UnifiedVLConfig
from unified_vl.modeling import UnifiedVLForConditionalGeneration
from unified_vl.processor import UnifiedVLProcessor


class CheckpointError(ValueError):
    """A folder that is not a unified-vl model folder (or of another architecture)."""


def save_pretrained(
    model: UnifiedVLForConditionalGeneration, processor: UnifiedVLProcessor, out_dir: str | os.PathLike
) -> Path:
    """Saves model, tokenizer and processor into ``out_dir`` atomically; returns the folder."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        processor.save_pretrained(tmp)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def check_model_folder(path: str | os.PathLike) -> dict:
    """Reads ``config.json`` of a model folder; raises a clear error for anything else."""
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{str(folder)!r} is not a model folder: it has no config.json")
    config = json.loads(config_file.read_text())
    if config.get("model_type") != UnifiedVLConfig.model_type:
        raise CheckpointError(
            f"{str(folder)!r} holds a {config.get('model_type')!r} model, not a {UnifiedVLConfig.model_type!r} one"
        )
    return config


def load_pretrained(
    path: str | os.PathLike, **model_kwargs
) -> tuple[UnifiedVLForConditionalGeneration, UnifiedVLProcessor]:
    """Loads ``(model, processor)`` from a folder written by :func:`save_pretrained`."""
    check_model_folder(path)
    model = UnifiedVLForConditionalGeneration.from_pretrained(str(path), **model_kwargs)
    processor = UnifiedVLProcessor.from_pretrained(path)
    return model, processor
