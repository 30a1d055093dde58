"""Checkpoints, one place for the words: the model folder, its errors and atomic writes.

Three kinds of file, three modules:

* **model folders** (here): the Hugging Face folder users load, ``config.json`` +
  ``model.safetensors`` (no pickle) + tokenizer files + ``processor_config.json`` (DESIGN.md §3);
* **training checkpoints** (:mod:`unified_vl.engine.checkpoints`): DeepSpeed's state of a run,
  saved and resumed atomically;
* **export** (:mod:`unified_vl.engine.export`): a training checkpoint -> a model folder, live at
  the end of a run or offline from any kept checkpoint.

Every one of them raises :class:`CheckpointError`. Saving a folder writes a temporary sibling
folder and renames it into place, so a kill or a full disk never leaves a half-written folder
under the final name, and an existing one survives until the new one is complete.
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


class CheckpointError(RuntimeError):
    """A model folder or training checkpoint that cannot be read, written or resumed; the message
    names the folder and says what is intact."""


def atomic_write_text(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` so that readers see the old or the new file, never a mix."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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
    if model.config.image_token_id is None:  # a folder saved before interleaving: its tokenizer's <image>
        model.config.image_token_id = processor.image_token_id
    return model, processor
