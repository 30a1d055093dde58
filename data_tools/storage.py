"""Records on disk: one Hugging Face ``datasets`` folder per (task, split) plus a manifest.

Layout (docs/records.md, "Stored data")::

    DIR/manifest.json          {"format": 1, "source": ..., "command": ..., "tasks": {task: {split: count}}, ...}
    DIR/<task>/<split>/        a folder that ``datasets.load_from_disk`` reads (``data-*.arrow``,
                               ``dataset_info.json``, ``state.json``); ``image`` is a ``datasets.Image()``

Guarantees:

* **Nothing half-written looks complete.** Every split of a write is first written into a staging
  folder inside DIR (``DIR/.staging-*``); only when *all* record iterables are exhausted without an
  error are the folders moved into place with ``os.replace`` and the manifest written, last and
  atomically (temp file + ``os.replace``). A (task, split) that the manifest does not list is never
  loaded. A failing write leaves a previous complete dataset in DIR untouched.
* **Streaming.** Records are encoded and written in batches as the iterables yield them, so a
  conversion never holds all records (or images) in memory; loading memory-maps the Arrow files.
* **One schema per task** (:func:`task_features`, from the task's own field specs), shared by all
  splits and all sources, so any two datasets of a task concatenate; unused optional fields are
  stored as null and read back as ``None``. A task registered at run time is stored like a built-in one.

Why the split folder is written here rather than by ``Dataset.save_to_disk``: since ``datasets`` 4.x
``save_to_disk`` always embeds the bytes of local image files (``ArrowWriter(embed_local_files=True)``
in ``Dataset._save_to_disk_single``). Converters store image *paths* by default because VQAv2 and
RefCOCO have several records per image and embedding would copy each image once per record. We
therefore write the same on-disk layout (one ``data-00000-of-00001.arrow`` shard, ``state.json``,
``dataset_info.json``, with the keys ``save_to_disk`` writes) with ``datasets.arrow_writer.ArrowWriter``
directly; ``datasets.load_from_disk`` reads it, and the round-trip tests check that it does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import datasets
from datasets import Features, Image, List, Value
from datasets.arrow_writer import ArrowWriter

import tasks

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
_STAGING_PREFIX = ".staging-"
_TRASH_PREFIX = ".trash-"
_SHARD_NAME = "data-00000-of-00001.arrow"  # the name save_to_disk gives a single shard
# Rows per Arrow record batch: small enough that a batch of embedded COCO-sized JPEGs (~200 KB each)
# stays far below Arrow's 2 GB binary-array limit, large enough for fast writes.
_WRITER_BATCH_SIZE = 256

# Every task's records share these; the rest of a task's schema comes from its field specs.
COMMON_FEATURES = {
    "id": Value("string"),
    "image": Image(),
    "width": Value("int32"),
    "height": Value("int32"),
}


def _feature(storage_type: Any):
    """A task field's storage type (``tasks.FieldSpec.storage``) as a ``datasets`` feature."""
    if isinstance(storage_type, list):
        return List(_feature(storage_type[0]))
    if isinstance(storage_type, dict):
        return {key: _feature(value) for key, value in storage_type.items()}
    if storage_type == "box":  # [x1, y1, x2, y2] in pixels; float64 so boxes round-trip exactly
        return List(Value("float64"))
    return Value(storage_type)


class StorageError(RuntimeError):
    """A dataset folder that cannot be written or read as asked."""


class SplitNotFoundError(StorageError, LookupError):
    """A (task, split) that the manifest of a data folder does not list."""


def task_features(task: str) -> Features:
    """The ``datasets.Features`` schema of ``task`` (shared by all its splits): the common fields and
    one column per field spec of the registered task, typed by the spec's ``storage``.

    Raises:
        StorageError: unknown task; the message lists the known ones.
    """
    import tasks

    if task not in tasks.TASKS:
        raise StorageError(f"unknown task {task!r}; known tasks: {', '.join(sorted(tasks.TASKS))}")
    fields = {name: _feature(spec.storage) for name, spec in tasks.get_task(task).fields.items()}
    return Features({**COMMON_FEATURES, **{k: v for k, v in fields.items() if k not in COMMON_FEATURES}})


def _encode_record(features: Features, record: Mapping[str, Any], *, task: str, split: str) -> dict:
    """Fills unused fields with None and rejects fields the schema does not have."""
    unknown = set(record) - set(features)
    if unknown:
        raise StorageError(
            f"record {record.get('id')!r} of {task}/{split} has fields {sorted(unknown)} that the {task!r} "
            f"schema does not have; allowed: {sorted(features)}"
        )
    full = {name: record.get(name) for name in features}
    return features.encode_example(full)


def _atomic_write_json(path: Path, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the manifest gets the mode open() would give it
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class _SplitWriter:
    """Writes one (task, split) folder in the ``save_to_disk`` layout, record by record."""

    def __init__(self, split_dir: Path, task: str, split: str, *, embed_images: bool, validate: bool):
        self.split_dir, self.task, self.split = split_dir, task, split
        self.features = task_features(task)
        self.checker = _task_validator(task) if validate else None
        self.seen_ids: set[str] = set()
        split_dir.mkdir(parents=True)
        self.shard = split_dir / _SHARD_NAME
        # embed_local_files=True makes the writer read each image path and store its bytes.
        self.writer = ArrowWriter(
            features=self.features,
            path=str(self.shard),
            writer_batch_size=_WRITER_BATCH_SIZE,
            embed_local_files=embed_images,
        )

    def write(self, record: Mapping[str, Any]) -> None:
        rid = record.get("id")
        if not isinstance(rid, str) or not rid:
            raise StorageError(f"a record of {self.task}/{self.split} has no string 'id' (got {rid!r})")
        if rid in self.seen_ids:  # records.md: id is unique within (task, split)
            raise StorageError(f"duplicate record id {rid!r} in {self.task}/{self.split}")
        self.seen_ids.add(rid)
        if self.checker is not None:
            self.checker(record)
        self.writer.write(_encode_record(self.features, record, task=self.task, split=self.split))

    def abort(self) -> None:
        self.writer.close()

    def finish(self) -> int:
        """Flushes the shard, writes ``state.json`` and ``dataset_info.json``; returns the count."""
        count, _ = self.writer.finalize()
        self.writer.close()
        dataset = datasets.Dataset.from_file(str(self.shard))
        # The same two JSON files Dataset.save_to_disk writes (datasets/arrow_dataset.py), so that
        # datasets.load_from_disk reads the folder. The fingerprint is a content hash: the same
        # records give byte-identical folders.
        digest = hashlib.sha256()
        with open(self.shard, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        state = {
            "_data_files": [{"filename": _SHARD_NAME}],
            "_fingerprint": digest.hexdigest()[:16],
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        info = dataclasses.asdict(dataset.info)
        del dataset
        with open(self.split_dir / "state.json", "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2, sort_keys=True)
        with open(self.split_dir / "dataset_info.json", "w", encoding="utf-8") as f:
            json.dump({key: info[key] for key in sorted(info)}, f, indent=2)
        return count


def _task_validator(task: str):
    """``tasks.get_task(task).validate``: every stored record satisfies the task's contract."""
    return tasks.get_task(task).validate


def _check_out_dir(out: Path) -> dict | None:
    """Refuses to write into a folder that holds something other than a dataset of ours."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise StorageError(f"output {out} exists and is not a folder")
    manifest_path = out / MANIFEST_NAME
    if manifest_path.exists():
        return read_manifest(out)
    foreign = [
        p.name
        for p in out.iterdir()
        if not (p.name in tasks.TASKS or p.name.startswith((_STAGING_PREFIX, _TRASH_PREFIX, MANIFEST_NAME + ".")))
    ]
    if foreign:
        raise StorageError(
            f"refusing to write a dataset into {out}: it is not empty and has no {MANIFEST_NAME} "
            f"(found {sorted(foreign)[:5]}); choose a new or empty folder"
        )
    return None


RecordStream = (
    Mapping[tuple[str, str], Iterable[Mapping[str, Any]]] | Iterable[tuple[tuple[str, str], Mapping[str, Any]]]
)


def write_dataset(
    out_dir: str | os.PathLike,
    records_by_task_split: RecordStream,
    *,
    source: str,
    command: str,
    embed_images: bool = False,
    validate: bool = True,
    extra: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
) -> dict:
    """Writes records as one dataset per (task, split) and then the manifest.

    ``out_dir`` becomes exactly this dataset: when the write completes, the manifest lists the
    (task, split) pairs written here and the folders of a previous dataset in ``out_dir`` are
    replaced or removed. If an iterable raises, nothing in ``out_dir`` changes (the staging folder is
    deleted and the exception propagates).

    Args:
        out_dir: the data folder (created if missing). It must be new, empty, or a dataset written by
            this function.
        records_by_task_split: either ``{(task, split): iterable of records}`` (each iterable consumed
            once, lazily, in order; a key with no records gives an empty split), or one iterable of
            ``((task, split), record)`` pairs in any interleaving, for sources that make the records
            of several tasks in one pass (the synthetic world draws each image once). Either way
            memory stays flat.
        source: what the records came from (``"synth"``, ``"coco_captions"``, ...).
        command: the command line that made them (reproducibility).
        embed_images: store the bytes of image files given by path instead of the path. Records whose
            ``image`` is bytes or a PIL image are always stored as bytes.
        validate: check every record with ``tasks.get_task(task).validate`` before writing it.
        extra: more manifest keys (e.g. skipped records, generator settings), or a function returning
            them, called after the last record (for numbers computed while streaming).

    Returns:
        The manifest as written.

    Raises:
        StorageError: an unknown task, a record with a field the schema lacks, a missing or duplicate
            id, or an ``out_dir`` that holds foreign files.
    """
    out = Path(out_dir)
    old_manifest = _check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    # Staging leftovers of a killed earlier write (SIGKILL skips the cleanup below) are not data.
    for stale in out.glob(_STAGING_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    if isinstance(records_by_task_split, Mapping):
        declared = list(records_by_task_split)
        pairs = ((key, record) for key, records in records_by_task_split.items() for record in records)
    else:
        declared, pairs = [], records_by_task_split
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=out))
    writers: dict[tuple[str, str], _SplitWriter] = {}

    def writer_for(key) -> _SplitWriter:
        if key not in writers:
            if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, str) and k for k in key)):
                raise StorageError(f"records must be keyed by (task, split) string pairs, got {key!r}")
            task, split = key
            writers[key] = _SplitWriter(
                staging / task / split, task, split, embed_images=embed_images, validate=validate
            )
        return writers[key]

    try:
        for key in declared:
            writer_for(key)
        for key, record in pairs:
            writer_for(key).write(record)
        counts: dict[str, dict[str, int]] = {}
        for (task, split), writer in writers.items():
            counts.setdefault(task, {})[split] = writer.finish()
        manifest = {"format": MANIFEST_FORMAT, "source": source, "command": command, "tasks": counts}
        for key, value in ((extra() if callable(extra) else extra) or {}).items():
            if key in manifest:
                raise StorageError(f"extra manifest key {key!r} would overwrite a required key")
            manifest[key] = value
        json.dumps(manifest)  # fail before touching out_dir if extra is not JSON-serialisable
        _swap_in(out, staging, counts, old_manifest)
        _atomic_write_json(out / MANIFEST_NAME, manifest)
    finally:
        for writer in writers.values():
            writer.abort()
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _swap_in(out: Path, staging: Path, counts: dict[str, dict[str, int]], old_manifest: dict | None) -> None:
    """Moves staged splits into place. The old manifest goes first, so that for the few renames
    below DIR has no manifest and nothing in it loads (a crash here leaves "incomplete", never a mix).
    """
    manifest_path = out / MANIFEST_NAME
    if manifest_path.exists():
        os.remove(manifest_path)
    trash = Path(tempfile.mkdtemp(prefix=_TRASH_PREFIX, dir=out))
    try:
        old = {(t, s) for t, splits in (old_manifest or {}).get("tasks", {}).items() for s in splits}
        new = {(t, s) for t, splits in counts.items() for s in splits}
        for task, split in sorted(old | new):
            target = out / task / split
            if target.exists():
                os.replace(target, trash / f"{task}--{split}")
        for task, split in sorted(new):
            (out / task).mkdir(exist_ok=True)
            os.replace(staging / task / split, out / task / split)
        for task, _ in old - new:
            task_dir = out / task
            if task_dir.is_dir() and not any(task_dir.iterdir()):
                task_dir.rmdir()
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def read_manifest(data_dir: str | os.PathLike) -> dict:
    """The manifest of a data folder.

    Raises:
        StorageError: no manifest (not a dataset, or an interrupted write), unreadable JSON, or an
            unknown format version.
    """
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        raise StorageError(
            f"{data_dir} has no {MANIFEST_NAME}: it is not a complete unified-vl dataset (never written, "
            "or the write was interrupted); run `unified-vl data synth` or `unified-vl data convert` into it"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise StorageError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or "tasks" not in manifest:
        raise StorageError(f"{path}: expected a manifest with format {MANIFEST_FORMAT} and 'tasks'")
    return manifest


def available(data_dir: str | os.PathLike) -> dict[str, dict[str, int]]:
    """``{task: {split: count}}`` of the complete splits of a data folder."""
    return read_manifest(data_dir)["tasks"]


def load_split(data_dir: str | os.PathLike, task: str, split: str, *, decode_images: bool = True) -> datasets.Dataset:
    """One (task, split) of a data folder as a memory-mapped ``datasets.Dataset``.

    Rows are record dicts (docs/records.md): unused optional fields are ``None``; ``image`` is a PIL
    image decoded lazily on access (or ``{"bytes", "path"}`` with ``decode_images=False``), ``None`` for
    text-only records.

    Args:
        data_dir: a folder written by :func:`write_dataset`.
        task: task name.
        split: split name.
        decode_images: decode ``image`` to PIL on access (False: raw ``{"bytes": ..., "path": ...}``).

    Raises:
        SplitNotFoundError: the manifest does not list (task, split); the message lists what exists.
        StorageError: no manifest, or the folder disagrees with the manifest.
    """
    listed = available(data_dir)
    if split not in listed.get(task, {}):
        have = ", ".join(f"{t}/{s}" for t, splits in listed.items() for s in splits) or "nothing"
        raise SplitNotFoundError(
            f"{data_dir} has no complete {task}/{split} (its {MANIFEST_NAME} does not list it); available: {have}"
        )
    path = Path(data_dir) / task / split
    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise StorageError(f"{path} is listed in {data_dir}/{MANIFEST_NAME} but cannot be read: {exc}") from exc
    if len(dataset) != listed[task][split]:
        raise StorageError(
            f"{path} holds {len(dataset)} records but {data_dir}/{MANIFEST_NAME} says {listed[task][split]}"
        )
    if not decode_images:
        dataset = dataset.cast_column("image", Image(decode=False))
    return dataset
