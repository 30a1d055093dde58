"""Carving a split out of another: a validation split for data that ships only train and test.

Many small datasets come as train and test only (MNIST's and CIFAR's own files, most ImageFolder
trees), while training with periodic validation, early stopping and the learning benchmark need a
``val`` split that test never feeds. `carve_split` writes a new data folder in which a fixed fraction of
one split's records, drawn by a seeded shuffle, form the new split, and every other (task, split) is
copied as it is. Records that share an image stay together (VQAv2 asks several questions about one
image: a question of the same image in both splits would let validation see a training picture), as
VQAv2's own train/val split is by image (Goyal et al. 2017, §3).

The source folder is not touched. Image files stored by path stay where they are (the new folder
points at them); stored bytes are copied.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator
from pathlib import Path

from data_tools import storage


def _image_key(record: dict) -> str:
    """What identifies a record's image: its file path, else a digest of its bytes, else the record."""
    image = record.get("image") or {}
    if image.get("path"):
        return "path:" + str(image["path"])
    if image.get("bytes"):
        return "bytes:" + hashlib.sha1(image["bytes"]).hexdigest()
    return "id:" + str(record["id"])


def carve_split(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    task: str,
    source: str = "train",
    into: str = "val",
    fraction: float = 0.1,
    seed: int = 0,
) -> dict:
    """Writes ``out_dir``: ``data_dir`` with ``fraction`` of ``task``'s ``source`` records moved to ``into``.

    Args:
        data_dir: a data folder (`unified-vl data convert`).
        out_dir: the new folder (new, empty, or a data folder, which is replaced).
        task: the task whose split is carved; the folder's other tasks are copied as they are.
        source: the split the records leave.
        into: the split they form; it must not exist yet.
        fraction: the share of ``source``'s images (with all their records) that move, in (0, 1):
            at least one image moves and at least one stays.
        seed: the shuffle's seed (the same seed, the same split).

    Returns:
        The new folder's manifest; its ``carved`` key records what was done.

    Raises:
        ValueError: a fraction outside (0, 1), a task or source split the folder lacks, an ``into``
            split it already has, or a source split with fewer than two images.
        StorageError: ``data_dir`` is not a data folder, or ``out_dir`` holds foreign files.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    held = storage.available(data_dir)
    if task not in held or source not in held[task]:
        have = ", ".join(sorted(held.get(task, {}))) or "none"
        raise ValueError(f"{data_dir}: no {task} {source!r} split to carve from (its {task} splits: {have})")
    if into in held[task]:
        raise ValueError(f"{data_dir}: {task} already has a {into!r} split ({held[task][into]} records)")
    records = storage.load_split(data_dir, task, source, decode_images=False)
    groups: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        groups.setdefault(_image_key(record), []).append(index)
    keys = sorted(groups)
    if len(keys) < 2:
        raise ValueError(f"{data_dir}: {task} {source!r} has {len(keys)} image(s); carving needs at least two")
    random.Random(seed).shuffle(keys)
    moved_count = min(len(keys) - 1, max(1, round(fraction * len(keys))))
    moved = {index for key in keys[:moved_count] for index in groups[key]}

    def part(inside: bool) -> Iterator[dict]:
        # One sequential pass over the split (indexing row by row would read Arrow once per record).
        return (record for i, record in enumerate(records) if (i in moved) == inside)

    streams = {(task, source): part(False), (task, into): part(True)}
    for other_task, splits in held.items():
        for split in splits:
            if (other_task, split) != (task, source):
                streams[(other_task, split)] = iter(
                    storage.load_split(data_dir, other_task, split, decode_images=False)
                )
    carved = {
        "from": str(Path(data_dir).resolve()),
        "task": task,
        "source": source,
        "into": into,
        "fraction": fraction,
        "seed": seed,
        "images": moved_count,
        "records": len(moved),
    }
    origin = storage.read_manifest(data_dir)
    return storage.write_dataset(
        out_dir,
        streams,
        source=str(origin.get("source", "unknown")),
        command=f"carve_split({str(data_dir)!r}, task={task!r}, source={source!r}, into={into!r}, "
        f"fraction={fraction}, seed={seed})",
        validate=False,  # the records were validated when the source folder was written
        extra={"carved": carved},
    )
