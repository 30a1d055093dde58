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
from collections.abc import Callable
from pathlib import Path

from unified_vl.config import UnifiedVLConfig
from unified_vl.modeling import UnifiedVLForConditionalGeneration
from unified_vl.processor import UnifiedVLProcessor


class CheckpointError(RuntimeError):
    """A model folder or training checkpoint that cannot be read, written or resumed; the message
    names the folder and says what is intact."""


def current_umask() -> int:
    """The process's umask (reading it means setting it; set back at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def follow_umask(folder: Path) -> None:
    """Gives ``folder`` and everything in it the modes ``mkdir`` and ``open`` would: 0777 / 0666 less the umask.

    A folder written under a temporary name (``mkdtemp``: 0700) and files some libraries write
    through ``mkstemp`` (0600) would otherwise keep private modes that no other tool's output has.
    """
    umask = current_umask()
    os.chmod(folder, 0o777 & ~umask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


class ModelFileError(CheckpointError):
    """A file of a model folder that is missing, truncated or malformed; the message names the file
    and what is wrong with it, in one line (``predict``, ``serve`` and ``eval`` exit with status 2)."""


def atomic_write_text(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` so that readers see the old or the new file, never a mix."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_folder(out_dir: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Writes a folder atomically: ``write(tmp)`` fills a temporary sibling, which then replaces
    ``out_dir`` (an older folder of that name is moved aside first and removed after); returns it.

    A crash leaves either the old folder or the new one, never a half-written one.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        follow_umask(tmp)  # mkdtemp made it 0700, and safetensors files come out 0600
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


def save_pretrained(
    model: UnifiedVLForConditionalGeneration, processor: UnifiedVLProcessor, out_dir: str | os.PathLike
) -> Path:
    """Saves model, tokenizer and processor into ``out_dir`` atomically; returns the folder."""

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp), safe_serialization=True)
        processor.save_pretrained(tmp)

    return write_folder(out_dir, write)


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{file} is not valid JSON ({exc})") from None
    except OSError as exc:
        raise ModelFileError(f"{file} cannot be read ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


def check_model_folder(path: str | os.PathLike) -> dict:
    """Reads ``config.json`` of a model folder; raises a clear error for anything else."""
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{str(folder)!r} is not a model folder: it has no config.json")
    config = _read_json(config_file)
    if config.get("model_type") != UnifiedVLConfig.model_type:
        raise CheckpointError(
            f"{str(folder)!r} holds a {config.get('model_type')!r} model, not a {UnifiedVLConfig.model_type!r} one"
        )
    return config


def check_model_files(path: str | os.PathLike) -> None:
    """Every file a model folder is loaded from can be read: ``config.json``, ``model.safetensors``
    (its header and its length), ``processor_config.json`` and ``tokenizer.json``.

    Raises:
        ModelFileError: naming the file and what is wrong (missing, truncated, not JSON, ...).
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(path)
    check_model_folder(folder)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ModelFileError(f"{weights} is missing: the model folder has no weights")
    try:
        # safe_open reads the header and checks that the file covers every tensor it lists.
        with safe_open(str(weights), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as exc:
        raise ModelFileError(f"{weights} is not a complete safetensors file ({exc})") from None
    for name in ("processor_config.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            _read_json(folder / name)
    tokenizer_file = folder / "tokenizer.json"
    if tokenizer_file.is_file():
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
            raise ModelFileError(f"{tokenizer_file} is not a tokenizer file tokenizers can read ({exc})") from None


def load_pretrained(
    path: str | os.PathLike, **model_kwargs
) -> tuple[UnifiedVLForConditionalGeneration, UnifiedVLProcessor]:
    """Loads ``(model, processor)`` from a folder written by :func:`save_pretrained`.

    Raises:
        CheckpointError: not a unified-vl model folder.
        ModelFileError: a file of the folder is missing, truncated or malformed (the message names it).
    """
    check_model_files(path)
    try:
        model = UnifiedVLForConditionalGeneration.from_pretrained(str(path), **model_kwargs)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        # config.json parses but does not describe a model these weights fit (a field of the wrong
        # type, a shape that differs from the weights).
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(
            f"{Path(path) / 'config.json'} and model.safetensors do not make a model ({first})"
        ) from None
    try:
        processor = UnifiedVLProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(f"{Path(path)}: the processor and tokenizer files do not load ({first})") from None
    if model.config.image_token_id is None:  # a folder saved before interleaving: its tokenizer's <image>
        model.config.image_token_id = processor.image_token_id
    return model, processor
