"""Training-time augmentation of records that keeps their boxes valid.

`shift_record` translates a record's image by a random number of pixels per axis and moves every
box the record's task reads by the same amount, so that a rec target, a grounding phrase's boxes or a
detection object still frame the same pixels. The shift is bounded per record so that no box leaves
the image (boxes are never clipped: a clipped box would no longer frame the whole object); the
strip uncovered at one edge repeats that edge's pixels (no new colour appears).

Translation (and a small zoom) only: no flips (they would turn "left of" into "right of" in VQA answers and
captions) and no crops that could cut an object the text mentions but no box marks. The baseline of
the learning benchmark (`unified_vl.app.baselines`) uses the same kind of shift, after the random
translations of Krizhevsky et al. 2012 and the pad-and-crop of CIFAR training (He et al. 2016, §4.2).

With ``max_scale`` the image is first zoomed about its centre by a random factor near 1 (boxes
scale with it, and a zoom that would push a box out is not made): uniform scaling keeps what a digit
is and which object is the largest.

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


def _moved(value: Any, storage: Any, x: tuple[float, float], y: tuple[float, float]) -> Any:
    """``value`` (stored as ``storage``) with every box in it mapped by ``v -> v * scale + offset`` per axis."""
    if value is None:
        return None
    if storage == "box":
        x1, y1, x2, y2 = (float(v) for v in value)
        return [x1 * x[0] + x[1], y1 * y[0] + y[1], x2 * x[0] + x[1], y2 * y[0] + y[1]]
    if isinstance(storage, list):
        return [_moved(item, storage[0], x, y) for item in value]
    if isinstance(storage, dict):
        return {key: _moved(item, storage.get(key), x, y) for key, item in value.items()}
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


def _place(image: Image.Image, size: tuple[int, int], left: int, top: int) -> Image.Image:
    """``image`` resized to ``size`` with its top-left corner at (left, top) of a canvas of the original
    size; the uncovered strips repeat the nearest edge."""
    w, h = image.size
    if size == (w, h) and left == 0 and top == 0:
        return image
    if image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGB")  # palette indices would not survive the array round trip
    if size != (w, h):
        image = image.resize(size, Image.Resampling.BILINEAR)
    pixels = np.asarray(image)
    sw, sh = size
    pads = [(max(top, 0), max(h - sh - top, 0)), (max(left, 0), max(w - sw - left, 0))]
    padded = np.pad(pixels, pads + [(0, 0)] * (pixels.ndim - 2), mode="edge")
    y0, x0 = pads[0][0] - top, pads[1][0] - left
    return Image.fromarray(np.ascontiguousarray(padded[y0 : y0 + h, x0 : x0 + w]))


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


def _placements(
    side: int, scaled: int, limit: int, spans: list[tuple[float, float]], content: tuple[int, int] | None
) -> tuple[int, int]:
    """The whole-pixel positions ``[lo, hi]`` of a ``scaled``-pixel image on a ``side``-pixel canvas (its
    first pixel's) that move it at most ``limit`` from the centre, keep every box span inside and the
    content span whole and unstretched; ``lo > hi`` when none does."""
    z = scaled / side
    centre = (side - scaled) // 2
    lo, hi = centre - limit, centre + limit
    for a1, a2 in spans:
        lo, hi = max(lo, -int(np.floor(a1 * z))), min(hi, int(np.floor(side - a2 * z)))
    if content is not None:
        c1, c2 = content
        lo, hi = max(lo, -int(np.floor(c1 * z))), min(hi, side - int(np.ceil(c2 * z)))
        # Content touching an edge pins that axis: moving away from the edge would repeat the edge's
        # pixels, which are the content's, and so stretch it.
        if c1 == 0:
            hi = min(hi, 0)
        if c2 == side:
            lo = max(lo, 0)
    return lo, hi


def shift_record(
    task,
    record: Mapping[str, Any],
    rng: random.Random,
    max_shift: float,
    *,
    content_threshold: int | None = None,
    max_scale: float = 0.0,
) -> dict[str, Any]:
    """A copy of ``record`` with its image translated (and with ``max_scale`` zoomed) and its boxes moved
    with it.

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
        max_scale: a zoom about the image's centre by a factor drawn uniformly in ``[1 - max_scale,
            1 + max_scale]`` before the shift (bilinear), as torchvision's ``RandomAffine(scale=...)``;
            a zoom that would push a box (or the content) out of the image, or content that touches an
            edge, leaves the record at its own scale. 0: translation only.

    Returns:
        The record, shifted by whole pixels drawn uniformly in ``[-max_shift * side, max_shift * side]``
        per axis, narrowed so that every box (and with ``content_threshold`` the content) stays inside
        the image.
    """
    out = dict(record)
    image = record.get("image")
    if not isinstance(image, Image.Image) or (max_shift <= 0 and max_scale <= 0):
        return out
    w, h = image.size
    # Boxes are in the record's own pixel frame (its width/height fields where the task has them),
    # which may differ from the decoded image's size.
    sx = float(record.get("width") or w) / w
    sy = float(record.get("height") or h) / h
    box_fields = {name: spec.storage for name, spec in task.fields.items() if tasks.storage_holds(spec.storage, "box")}
    boxes = [b for name, storage in box_fields.items() for b in _boxes(record.get(name), storage)]
    content = content_box(image, content_threshold) if content_threshold is not None else None
    zoom = rng.uniform(1 - max_scale, 1 + max_scale) if max_scale > 0 else 1.0
    if content is not None and (min(content[:2]) == 0 or content[2] == w or content[3] == h):
        zoom = 1.0
    limits = (int(max_shift * w), int(max_shift * h))

    def ranges(size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        return (
            _placements(w, size[0], limits[0], [(b[0] / sx, b[2] / sx) for b in boxes], content and content[0::2]),
            _placements(h, size[1], limits[1], [(b[1] / sy, b[3] / sy) for b in boxes], content and content[1::2]),
        )

    size = (max(1, round(w * zoom)), max(1, round(h * zoom)))
    (lo_x, hi_x), (lo_y, hi_y) = ranges(size)
    if size != (w, h) and (lo_x > hi_x or lo_y > hi_y):  # no room at this zoom: the record's own scale
        size = (w, h)
        (lo_x, hi_x), (lo_y, hi_y) = ranges(size)
    left = rng.randint(lo_x, hi_x) if lo_x <= hi_x else (w - size[0]) // 2
    top = rng.randint(lo_y, hi_y) if lo_y <= hi_y else (h - size[1]) // 2
    out["image"] = _place(image, size, left, top)
    x_map, y_map = (size[0] / w, left * sx), (size[1] / h, top * sy)
    for name, storage in box_fields.items():
        if name in record:  # an absent optional field stays absent
            out[name] = _moved(record[name], storage, x_map, y_map)
    return out
