"""Training-time augmentation of records that keeps their boxes valid.

`shift_record` translates a record's image by a random number of pixels per axis and moves every
box the record's task reads by the same amount, so that a rec target, a grounding phrase's boxes or a
detection object still frame the same pixels. The shift is bounded per record so that no box leaves
the image (boxes are never clipped: a clipped box would no longer frame the whole object); the
strip uncovered at one edge repeats that edge's pixels (no new colour appears).

Translation only, and small: no flips (they would turn "left of" into "right of" in VQA answers and
captions) and no crops that could cut an object the text mentions but no box marks. The baseline of
the learning benchmark (`unified_vl.app.baselines`) uses the same kind of shift, after the random
translations of Krizhevsky et al. 2012 and the pad-and-crop of CIFAR training (He et al. 2016, §4.2).

With ``content_threshold`` the shift is also bounded by what the image shows, for records whose
label depends on everything in the picture but holds no box (a class, the shape of the largest
object): no pixel that stands out from the background leaves the image, and none is stretched by
the repeated edge (`content_box`). The background is the median colour of the image's one-pixel
frame, so this suits pictures on a plain background (digits, our world); a photo whose frame is not
one colour has content at every edge and is not shifted at all.

Which fields hold boxes comes from the task's field specifications (`tasks.FieldSpec.storage`:
``"box"``, ``["box"]``, or an object with a ``"box"`` member, such as detection's objects), so a new
task's boxes are moved without code here.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

import tasks


def _moved(value: Any, storage: Any, dx: float, dy: float) -> Any:
    """``value`` (stored as ``storage``) with every box in it translated by (dx, dy)."""
    if value is None:
        return None
    if storage == "box":
        x1, y1, x2, y2 = (float(v) for v in value)
        return [x1 + dx, y1 + dy, x2 + dx, y2 + dy]
    if isinstance(storage, list):
        return [_moved(item, storage[0], dx, dy) for item in value]
    if isinstance(storage, dict):
        return {key: _moved(item, storage.get(key), dx, dy) for key, item in value.items()}
    return value


def _boxes(value: Any, storage: Any) -> list[list[float]]:
    """Every box in ``value`` (stored as ``storage``)."""
    if value is None:
        return []
    if storage == "box":
        return [[float(v) for v in value]]
    if isinstance(storage, list):
        return [box for item in value for box in _boxes(item, storage[0])]
    if isinstance(storage, dict):
        return [box for key, item in value.items() for box in _boxes(item, storage.get(key))]
    return []


def _translate(image: Image.Image, dx: int, dy: int) -> Image.Image:
    """``image`` moved by (dx, dy) pixels at the same size; the uncovered strip repeats the edge."""
    if dx == 0 and dy == 0:
        return image
    if image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGB")  # palette indices would not survive the array round trip
    pixels = np.asarray(image)
    pad = [(max(dy, 0), max(-dy, 0)), (max(dx, 0), max(-dx, 0))] + [(0, 0)] * (pixels.ndim - 2)
    padded = np.pad(pixels, pad, mode="edge")
    h, w = pixels.shape[:2]
    top, left = max(-dy, 0), max(-dx, 0)
    return Image.fromarray(np.ascontiguousarray(padded[top : top + h, left : left + w]))


def content_box(image: Image.Image, threshold: int) -> tuple[int, int, int, int] | None:
    """The pixel bounds ``(x1, y1, x2, y2)`` (exclusive ends) of what stands out from the background.

    A pixel stands out when one of its channels differs from the median of the image's one-pixel frame
    by more than ``threshold`` (of 255). None when nothing does.
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    frame = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background = np.median(frame, axis=0)
    ys, xs = np.nonzero((np.abs(pixels - background) > threshold).any(axis=-1))
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _content_range(image: Image.Image, threshold: int) -> tuple[int, int, int, int]:
    """The whole-pixel shifts ``(lo_x, hi_x, lo_y, hi_y)`` that keep the content whole and unstretched."""
    w, h = image.size
    box = content_box(image, threshold)
    if box is None:
        return -w, w, -h, h
    x1, y1, x2, y2 = box
    # Content touching an edge pins that axis at 0 in the other direction too: moving away from the
    # edge would repeat the edge's pixels, which are the content's, and so stretch it.
    lo_x, hi_x = -x1, w - x2
    lo_y, hi_y = -y1, h - y2
    if x1 == 0:
        hi_x = 0
    if x2 == w:
        lo_x = 0
    if y1 == 0:
        hi_y = 0
    if y2 == h:
        lo_y = 0
    return lo_x, hi_x, lo_y, hi_y


def shift_record(
    task, record: Mapping[str, Any], rng: random.Random, max_shift: float, *, content_threshold: int | None = None
) -> dict[str, Any]:
    """A copy of ``record`` with its image translated and its boxes moved with it.

    Args:
        task: the record's `tasks.Task` (its ``fields`` say which hold boxes).
        record: a record with a decoded ``image`` (a PIL image); a record without one is returned
            unchanged (as a copy).
        rng: draws the shift (the trainer's per-example generator: reproducible from the seed).
        max_shift: the largest shift per axis, as a fraction of the image side (e.g. 0.0625: 4 pixels
            of a 64-pixel image).
        content_threshold: when given, the shift is also narrowed so that every pixel that stands out
            from the background by more than this (of 255, `content_box`) stays inside the image and
            none is stretched by the repeated edge.

    Returns:
        The record, shifted by whole pixels drawn uniformly in ``[-max_shift * side, max_shift * side]``
        per axis, narrowed so that every box (and with ``content_threshold`` the content) stays inside
        the image.
    """
    out = dict(record)
    image = record.get("image")
    if not isinstance(image, Image.Image) or max_shift <= 0:
        return out
    w, h = image.size
    # Boxes are in the record's own pixel frame (its width/height fields where the task has them),
    # which may differ from the decoded image's size.
    sx = float(record.get("width") or w) / w
    sy = float(record.get("height") or h) / h
    box_fields = {name: spec.storage for name, spec in task.fields.items() if tasks.storage_holds(spec.storage, "box")}
    boxes = [b for name, storage in box_fields.items() for b in _boxes(record.get(name), storage)]
    limit_x, limit_y = int(max_shift * w), int(max_shift * h)
    # The range of whole-pixel shifts that keep every box inside [0, width] x [0, height].
    lo_x, hi_x, lo_y, hi_y = -limit_x, limit_x, -limit_y, limit_y
    if content_threshold is not None:
        c_lo_x, c_hi_x, c_lo_y, c_hi_y = _content_range(image, content_threshold)
        lo_x, hi_x, lo_y, hi_y = max(lo_x, c_lo_x), min(hi_x, c_hi_x), max(lo_y, c_lo_y), min(hi_y, c_hi_y)
    for x1, y1, x2, y2 in boxes:
        lo_x = max(lo_x, -int(np.floor(x1 / sx)))
        hi_x = min(hi_x, int(np.floor((w * sx - x2) / sx)))
        lo_y = max(lo_y, -int(np.floor(y1 / sy)))
        hi_y = min(hi_y, int(np.floor((h * sy - y2) / sy)))
    dx = rng.randint(lo_x, hi_x) if lo_x <= hi_x else 0
    dy = rng.randint(lo_y, hi_y) if lo_y <= hi_y else 0
    out["image"] = _translate(image, dx, dy)
    for name, storage in box_fields.items():
        if name in record:  # an absent optional field stays absent
            out[name] = _moved(record[name], storage, dx * sx, dy * sy)
    return out
