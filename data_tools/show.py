"""A look at stored records: a grid of images with their boxes and texts (``unified-vl data show``).

Each cell shows one record: the image (scaled to the cell, boxes scaled with it), the task's boxes
(REC gold box over grey candidates, grounding phrases in distinct colours, detection objects with
labels, a region) and a few lines of text (caption, question and answer, expression, ...).

With a predictions file (``--predictions``, `data_tools.predictions`) each cell is a pair: the
record with its gold on the left, the model's prediction on the right (its boxes, its text and its
score, as the task presents it: ``Task.present``); ``--worst`` picks the lowest-scored first.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from data_tools import storage

CELL_SIZE = 192  # image area of a cell, pixels
TEXT_LINES = 5
LINE_HEIGHT = 12  # Pillow's built-in bitmap font is 11 px high
PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (128, 128, 0),
]
GOLD = (255, 0, 0)
GREY = (160, 160, 160)
PREDICTED = (0, 90, 255)  # a predicted box or text, beside the gold


def grid_size(n: int, *, cell_size: int = CELL_SIZE) -> tuple[int, int]:
    """``(width, height)`` of the grid image for ``n`` records."""
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    return cols * cell_size, rows * (cell_size + TEXT_LINES * LINE_HEIGHT)


def _texts(task: str, record: Mapping[str, Any]) -> list[tuple[str, tuple[int, int, int]]]:
    """Lines (with colours) describing a record."""
    black = (0, 0, 0)
    if task == "captioning":
        return [(c, black) for c in record["captions"][:2]]
    if task == "vqa":
        from tasks.vqa import most_common_answer

        return [
            (f"Q: {record['question']}", black),
            (f"A: {most_common_answer(record['answers'])} ({record['answer_type']})", black),
        ]
    if task == "rec":
        return [(record["expression"], GOLD)]
    if task == "grounding":
        if record.get("phrases"):
            return [(p, PALETTE[i % len(PALETTE)]) for i, p in enumerate(record["phrases"])]
        return [(record["description"], GOLD)]
    if task == "classification":
        return [(f"label: {record['label']}", black)]
    if task == "itm":
        return [(record["text"], black), (f"match: {record['match']}", (0, 128, 0) if record["match"] else GOLD)]
    if task == "detection":
        return [(f"{len(record['objects'])} objects", black)]
    return [(str(record.get("text", "")), black)]


def _boxes(task: str, record: Mapping[str, Any]) -> list[tuple[Sequence[float], tuple[int, int, int], str, int]]:
    """``(box, colour, label, line width)`` to draw, in drawing order."""
    if task == "rec":
        out = [(b, GREY, "", 1) for b in record.get("candidate_boxes") or []]
        return [*out, (record["box"], GOLD, "", 2)]
    if task == "grounding":
        if record.get("boxes"):
            return [(b, PALETTE[i % len(PALETTE)], "", 2) for i, b in enumerate(record["boxes"])]
        return [(record["region"], GOLD, "", 2)]
    if task == "detection":
        return [(o["box"], PALETTE[i % len(PALETTE)], o["label"], 1) for i, o in enumerate(record["objects"])]
    return []


def _fit(image: Image.Image, cell: int) -> tuple[Image.Image, float]:
    scale = cell / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # Nearest for enlarging keeps small synthetic images crisp; Lanczos for shrinking photos.
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    return image.convert("RGB").resize(size, resample), scale


def draw_cell(task: str, split: str, record: Mapping[str, Any], *, cell_size: int = CELL_SIZE) -> Image.Image:
    """One record as a cell image of ``cell_size x (cell_size + text)`` pixels."""
    header = (f"{task}/{split} {record['id']}", (90, 90, 90))
    return _cell(record.get("image"), _boxes(task, record), [header, *_texts(task, record)], cell_size)


def _cell(image, boxes, lines: Sequence[tuple[str, tuple[int, int, int]]], cell_size: int) -> Image.Image:
    """An image with ``(box, colour, label, width)`` boxes over it, then ``lines`` of text (the first unwrapped)."""
    text_height = TEXT_LINES * LINE_HEIGHT
    cell = Image.new("RGB", (cell_size, cell_size + text_height), (255, 255, 255))
    draw = ImageDraw.Draw(cell)
    font = ImageFont.load_default()
    if image is None:
        draw.rectangle([0, 0, cell_size - 1, cell_size - 1], fill=(235, 235, 235))
        draw.text((4, cell_size // 2), "text only (no image)", fill=(90, 90, 90), font=font)
    else:
        try:
            if not isinstance(image, Image.Image):
                image = Image.open(image)
            fitted, scale = _fit(image, cell_size)
        except (OSError, ValueError) as exc:
            draw.text((4, 4), f"image unavailable: {exc}"[:60], fill=GOLD, font=font)
        else:
            cell.paste(fitted, (0, 0))
            for box, colour, label, width in boxes:
                x1, y1, x2, y2 = (v * scale for v in box)
                draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=colour, width=width)
                if label:
                    draw.text((x1 + 2, y1 + 1), label, fill=colour, font=font)
    chars = max(8, cell_size // 6)  # the bitmap font is ~6 px per character
    wrapped = list(lines[:1])
    for text, colour in lines[1:]:
        wrapped += [(chunk, colour) for chunk in textwrap.wrap(text, chars) or [""]]
    for k, (text, colour) in enumerate(wrapped[:TEXT_LINES]):
        draw.text((3, cell_size + k * LINE_HEIGHT), text, fill=colour, font=font)
    return cell


def _presented(task: str, prediction: Any, score: Any) -> dict[str, Any]:
    import tasks

    return tasks.get_task(task).presentation(prediction, score if isinstance(score, float) else float("nan"))


def draw_prediction_cell(
    task: str, record: Mapping[str, Any], line: Mapping[str, Any], *, cell_size: int
) -> Image.Image:
    """The prediction of one predictions ``line`` on its record's image, as large as `draw_cell`'s cell."""
    shown = _presented(task, line["prediction"], line["score"])
    boxes = [(shown["box"], PREDICTED, "")] if shown.get("box") else []
    boxes += [(p["box"], PALETTE[i % len(PALETTE)], "") for i, p in enumerate(shown.get("phrases") or [])]
    boxes += [(o["box"], PALETTE[i % len(PALETTE)], o["label"]) for i, o in enumerate(shown.get("objects") or [])]
    score = line["score"]
    lines = [(f"prediction {score:.3f}" if isinstance(score, (int, float)) else "prediction", (90, 90, 90))]
    lines += [(p["phrase"], PALETTE[i % len(PALETTE)]) for i, p in enumerate(shown.get("phrases") or [])]
    texts = [v for k, v in shown.items() if k not in ("task", "box", "phrases", "objects", "top_k") and v is not None]
    if not texts and not boxes and not shown.get("phrases"):
        texts = [f"(no prediction; the model wrote {line['text']!r})"]
    lines += [(str(v), PREDICTED) for v in texts]
    return _cell(record.get("image"), [(b, colour, label, 2) for b, colour, label in boxes], lines, cell_size)


def _pairs(data_dir, lines: Sequence[Mapping[str, Any]], *, task: str | None, split: str | None):
    """``[(task, split, dataset, row index, line)]`` for the lines of ``task``/``split`` (default: all)."""
    keep = [
        line
        for line in lines
        if (task is None or line["task"] == task) and (split is None or line.get("split") == split)
    ]
    if not keep:
        raise storage.StorageError(
            f"the predictions hold nothing for {task or 'any task'}/{split or 'any split'} of a data folder "
            "(lines need a 'split': predictions of --data or of unified-vl eval)"
        )
    datasets: dict[tuple[str, str], tuple[Any, dict[str, int]]] = {}
    out = []
    for line in keep:
        key = (line["task"], line.get("split"))
        if key not in datasets:
            if key[1] is None:
                raise storage.StorageError(f"prediction {line['id']!r} has no 'split': it is not of a data folder")
            meta = storage.load_split(data_dir, *key, decode_images=False)
            datasets[key] = (storage.load_split(data_dir, *key), {rid: i for i, rid in enumerate(meta["id"])})
        dataset, index = datasets[key]
        if line["id"] not in index:
            raise storage.StorageError(f"prediction {line['id']!r} is not a record of {data_dir} {key[0]}/{key[1]}")
        out.append((*key, dataset, index[line["id"]], line))
    return out


def show_predictions(
    data_dir: str | os.PathLike,
    predictions: str | os.PathLike,
    *,
    n: int = 16,
    out: str | os.PathLike,
    task: str | None = None,
    split: str | None = None,
    worst: bool = False,
    cell_size: int = CELL_SIZE,
) -> tuple[int, int]:
    """Draws ``n`` predictions beside their records' gold into a PNG grid (see the module docstring).

    Args:
        data_dir: the data folder the predictions were made on.
        predictions: a predictions file with ``split`` on its lines (``predict --data``, ``eval --predictions``).
        n: pairs to draw: spread evenly over the file, or the ``n`` lowest-scored with ``worst``.
        out: the PNG file to write.
        task: only this task's predictions.
        split: only this split's.
        worst: the lowest scores first (lines without a score last).
        cell_size: side of a cell's image area in pixels.

    Returns:
        The grid's ``(width, height)``.
    """
    from data_tools.predictions import read_predictions

    pairs = _pairs(data_dir, read_predictions(predictions), task=task, split=split)
    if worst:
        pairs.sort(key=lambda p: p[4]["score"] if isinstance(p[4]["score"], (int, float)) else math.inf)
        pairs = pairs[:n]
    else:
        pairs = [pairs[k * len(pairs) // min(n, len(pairs))] for k in range(min(n, len(pairs)))]
    cells = []
    for name, pick, dataset, row, line in pairs:
        record = dataset[row]
        gold, predicted = (
            draw_cell(name, pick, record, cell_size=cell_size),
            draw_prediction_cell(name, record, line, cell_size=cell_size),
        )
        pair = Image.new("RGB", (2 * cell_size, gold.height), (255, 255, 255))
        pair.paste(gold, (0, 0))
        pair.paste(predicted, (cell_size, 0))
        cells.append(pair)
    return _save_grid(cells, out)


def _save_grid(cells: Sequence[Image.Image], out: str | os.PathLike) -> tuple[int, int]:
    cols = math.ceil(math.sqrt(len(cells)))
    rows = math.ceil(len(cells) / cols)
    width, height = cols * cells[0].width, rows * cells[0].height
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    for k, cell in enumerate(cells):
        grid.paste(cell, ((k % cols) * cell.width, (k // cols) * cell.height))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    grid.save(out, format="PNG")
    return width, height


def show(
    data_dir: str | os.PathLike,
    *,
    n: int = 16,
    out: str | os.PathLike,
    task: str | None = None,
    split: str | None = None,
    cell_size: int = CELL_SIZE,
) -> tuple[int, int]:
    """Draws ``n`` records of a data folder into a PNG grid.

    Args:
        data_dir: a folder written by `data_tools.storage.write_dataset`.
        n: records to draw (spread evenly over the split).
        out: the PNG file to write.
        task: only this task (default: take turns over every task in the manifest).
        split: only this split (default: ``train`` if present, else the first listed).
        cell_size: side of a cell's image area in pixels.

    Returns:
        The grid's ``(width, height)``.
    """
    listed = storage.available(data_dir)
    names = [task] if task else list(listed)
    sources = []
    for name in names:
        splits = listed.get(name, {})
        pick = split or ("train" if "train" in splits else next(iter(splits), None))
        if pick is None or pick not in splits:
            raise storage.SplitNotFoundError(
                f"{data_dir} has no {name}/{split or '<any split>'}; available: "
                + ", ".join(f"{t}/{s}" for t, ss in listed.items() for s in ss)
            )
        dataset = storage.load_split(data_dir, name, pick)
        if len(dataset):
            sources.append((name, pick, dataset))
    if not sources:
        raise storage.StorageError(f"{data_dir}: nothing to show (the chosen splits are empty)")
    # Take turns over the tasks; within a task spread the picks evenly over its split.
    quota = [0] * len(sources)
    while sum(quota) < n and any(q < len(d) for q, (_, _, d) in zip(quota, sources, strict=True)):
        for i, (_, _, dataset) in enumerate(sources):
            if sum(quota) < n and quota[i] < len(dataset):
                quota[i] += 1
    rows = [
        (name, pick, dataset[k * len(dataset) // quota[i]])
        for k in range(max(quota))
        for i, (name, pick, dataset) in enumerate(sources)
        if k < quota[i]
    ]
    width, height = grid_size(len(rows), cell_size=cell_size)
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    cols = width // cell_size
    for k, (name, pick, record) in enumerate(rows):
        cell = draw_cell(name, pick, record, cell_size=cell_size)
        grid.paste(cell, ((k % cols) * cell_size, (k // cols) * cell.height))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    grid.save(out, format="PNG")
    return width, height
