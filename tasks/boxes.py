"""Boxes <-> location tokens, and IoU. The one place this convention is written.

Convention (DESIGN.md §3, following Pix2Seq / OFA's quantised coordinates):

* a box is ``[x1, y1, x2, y2]`` in pixels of the original image, ``0 <= x1 <= x2 <= width`` and
  ``0 <= y1 <= y2 <= height``;
* each coordinate is normalised per axis (x by width, y by height) and quantised to
  ``bin = min(floor(v * B), B - 1)``, written as ``<loc_{bin}>``;
* decoding returns the bin centre ``(bin + 0.5) / B`` times the axis length, so a round trip is
  exact to within half a bin (``0.5 * length / B`` pixels).

The bottom layer of the project (tests/test_layout.py): pure Python, importing nothing of ours, so
that the tasks (which write and parse box targets), the data tools (which validate boxes) and the
model library (whose tokenizer adds the location tokens) all share it without depending on each other.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

DEFAULT_NUM_BINS = 1000  # OFA quantises to 1000 bins (Wang et al., 2022, §3.1); Pix2Seq also.

LOC_TOKEN_RE = re.compile(r"<loc_(\d+)>")


class BoxError(ValueError):
    """A box that cannot be a box of the given image."""


def loc_token(index: int) -> str:
    """The text of location token ``index``: ``<loc_{index}>``."""
    return f"<loc_{index}>"


def loc_tokens(num_bins: int = DEFAULT_NUM_BINS) -> list[str]:
    """All location tokens, in bin order."""
    return [loc_token(i) for i in range(num_bins)]


def validate_box(box: Sequence[float], width: float, height: float, *, what: str = "box") -> list[float]:
    """Checks that ``box`` is ``[x1, y1, x2, y2]`` inside a ``width`` x ``height`` image.

    Args:
        box: four numbers, pixels of the original image.
        width: image width in pixels (> 0).
        height: image height in pixels (> 0).
        what: how to name the box in the error message (e.g. ``"record 17 field 'box'"``).

    Returns:
        The box as a list of four floats.

    Raises:
        BoxError: wrong length, a non-finite value, x2 < x1 or y2 < y1, or outside the image.
    """
    if not (isinstance(width, (int, float)) and isinstance(height, (int, float))) or not (
        width > 0 and height > 0 and math.isfinite(width) and math.isfinite(height)
    ):
        raise BoxError(f"{what}: image size must be two positive numbers, got width={width!r}, height={height!r}")
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError) as exc:
        raise BoxError(f"{what}: expected four numbers [x1, y1, x2, y2], got {box!r}") from exc
    if len(values) != 4:
        raise BoxError(f"{what}: expected four numbers [x1, y1, x2, y2], got {len(values)}: {box!r}")
    if not all(math.isfinite(v) for v in values):
        raise BoxError(f"{what}: coordinates must be finite, got {box!r}")
    x1, y1, x2, y2 = values
    if x2 < x1 or y2 < y1:
        raise BoxError(f"{what}: expected x1 <= x2 and y1 <= y2 ([x1, y1, x2, y2] in pixels), got {box!r}")
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise BoxError(f"{what}: {box!r} lies outside the {width:g}x{height:g} image")
    return values


def quantize(value: float, length: float, num_bins: int = DEFAULT_NUM_BINS) -> int:
    """Pixel coordinate -> bin index: ``min(floor(value / length * B), B - 1)``."""
    return min(int(math.floor(value / length * num_bins)), num_bins - 1)


def dequantize(index: int, length: float, num_bins: int = DEFAULT_NUM_BINS) -> float:
    """Bin index -> pixel coordinate at the bin centre: ``(index + 0.5) / B * length``."""
    if not 0 <= index < num_bins:
        raise BoxError(f"location bin {index} is outside 0..{num_bins - 1}")
    return (index + 0.5) / num_bins * length


def box_to_bins(box: Sequence[float], width: float, height: float, num_bins: int = DEFAULT_NUM_BINS) -> list[int]:
    """``[x1, y1, x2, y2]`` in pixels -> four bin indices (x by width, y by height)."""
    x1, y1, x2, y2 = validate_box(box, width, height)
    return [
        quantize(x1, width, num_bins),
        quantize(y1, height, num_bins),
        quantize(x2, width, num_bins),
        quantize(y2, height, num_bins),
    ]


def bins_to_box(bins: Sequence[int], width: float, height: float, num_bins: int = DEFAULT_NUM_BINS) -> list[float]:
    """Four bin indices -> ``[x1, y1, x2, y2]`` in pixels (bin centres)."""
    if len(bins) != 4:
        raise BoxError(f"expected four location bins, got {len(bins)}: {list(bins)!r}")
    b1, b2, b3, b4 = bins
    return [
        dequantize(b1, width, num_bins),
        dequantize(b2, height, num_bins),
        dequantize(b3, width, num_bins),
        dequantize(b4, height, num_bins),
    ]


def box_to_tokens(box: Sequence[float], width: float, height: float, num_bins: int = DEFAULT_NUM_BINS) -> str:
    """``[x1, y1, x2, y2]`` in pixels -> ``"<loc_a><loc_b><loc_c><loc_d>"``."""
    return "".join(loc_token(b) for b in box_to_bins(box, width, height, num_bins))


def parse_loc_bins(text: str) -> list[int]:
    """All ``<loc_N>`` indices in ``text``, in order."""
    return [int(m) for m in LOC_TOKEN_RE.findall(text)]


def tokens_to_box(text: str, width: float, height: float, num_bins: int = DEFAULT_NUM_BINS) -> list[float]:
    """``"<loc_a><loc_b><loc_c><loc_d>"`` -> ``[x1, y1, x2, y2]`` in pixels.

    Raises:
        BoxError: not exactly four location tokens, or a bin outside ``0..B-1``.
    """
    bins = parse_loc_bins(text)
    if len(bins) != 4:
        raise BoxError(f"expected exactly four location tokens, found {len(bins)} in {text!r}")
    return bins_to_box(bins, width, height, num_bins)


def box_area(box: Sequence[float]) -> float:
    """Area of ``[x1, y1, x2, y2]`` (0 for a degenerate box)."""
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``[x1, y1, x2, y2]`` boxes (0 when both are empty)."""
    ix1, iy1 = max(a[0], b[0]), max(a[1], b[1])
    ix2, iy2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, ix2 - ix1) * max(0.0, iy2 - iy1)
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


def reading_order_key(box: Sequence[float]) -> tuple[float, float]:
    """Sort key of reading order: the box centre's y (top to bottom), then its x (left to right)."""
    return ((box[1] + box[3]) / 2, (box[0] + box[2]) / 2)


def box_union(boxes: Sequence[Sequence[float]]) -> list[float]:
    """The smallest box holding all ``boxes`` (Flickr30k Entities' merged-box protocol)."""
    if not boxes:
        raise BoxError("box_union of no boxes")
    return [
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    ]
