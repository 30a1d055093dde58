"""``cpt``: CPT colour prompts — referring expressions as "which colour is it painted in?".

Yao et al., 2021, "CPT: Colorful Prompt Tuning for Pre-trained Vision-Language Models" (arXiv
2109.11797; code github.com/thunlp/CPT). Grounding becomes a fill-in-the-blank the model can
answer with a word: every candidate region is painted with a semi-transparent block of a different
colour, the model reads a colour template about the expression, each colour word is scored by its
log-likelihood, and the answer is the candidate painted with the most likely colour.

    unified-vl eval --model MODEL --data DIR --task rec --method cpt                  # zero-shot
    unified-vl finetune --task rec --data DIR --init MODEL --method cpt --shots 8     # few-shot
    unified-vl eval ... --method cpt --method-option templates=[sentinel,instruction] # ensembled

Options (``method.options.KEY=VALUE``, ``--method-option KEY=VALUE``):

* ``palette``: ``[[name, r, g, b], ...]``, CPT's five colours by default; ``alpha``: the blocks'
  opacity out of 255 (127, the released code's value);
* ``templates``: which colour templates to ask with; several are ensembled (their scores
  averaged, the seeds' multi-prompt idea; PET, Schick & Schütze 2021). ``sentinel`` is CPT's
  ``{expression} is in [MASK] color.`` in T5's fill-in-the-blank form (the mask is T5's sentinel,
  the target ``<extra_id_0> red``); ``instruction`` asks OFA-style
  ``which color is the block on " {expression} "?`` (target ``red``);
* ``proposals``: a JSON file of candidate boxes (the third source of candidates, after the
  record's ``candidate_boxes``; docs/records.md);
* ``batch_size``: painted images per scoring pass (0: the evaluation's batch size).

More candidates than colours: ceil(N / C) painted copies of the image, copy k painting
candidates kC .. kC + C - 1 with the first colours of the palette; every (copy, colour) pair is
scored and the argmax over all of them wins (the released code's ``val`` in
``Oscar/oscar/zeroshot/refcoco_cpt.py`` concatenates the copies' colour scores and takes one
argmax). Copies are painted and scored ``batch_size`` at a time, so any N fits in memory.
A record may carry ``candidate_masks`` (the rec field: per candidate box its COCO polygons
``[[x1, y1, x2, y2, ...], ...]`` in pixels, ``[]`` for none; in Python also a boolean H x W array):
such a candidate is painted on its mask instead of its box (CPT-Seg). Masks belong to the record's
own candidates, so a proposals file paints boxes.

The answer is written as the chosen candidate's box in location tokens, so that the ``rec`` task
parses and scores it like a generated box (within half a bin of the candidate, ``tasks.boxes``).
Training (``make_example``) paints the copy that holds the gold candidate (the one overlapping the
record's box most) and targets its colour word; the model is fine-tuned in full.

Painting and templates are pure image/text work (Pillow and numpy); only scoring needs torch,
imported where it is used.
"""

from __future__ import annotations

import functools
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from tasks.boxes import BoxError, box_to_tokens, iou, validate_box
from unified_vl.prompting import Answer, Method, MethodError

# CPT's colours (Yao et al. 2021, §3.1, "we use ... red, blue, yellow, purple and green"; the
# RGB values and the opacity are those of the released code, as issue #14 quotes them).
PALETTE: tuple[tuple[str, int, int, int], ...] = (
    ("red", 240, 0, 30),
    ("blue", 0, 10, 255),
    ("yellow", 255, 255, 25),
    ("purple", 155, 50, 210),
    ("green", 0, 255, 0),
)
ALPHA = 127  # out of 255: a half-transparent block keeps the object visible under it


@dataclass(frozen=True)
class Template:
    """A colour template: the instruction about an expression and the target naming a colour."""

    prompt: str  # with {expression}
    target: str  # with {color}


TEMPLATES: dict[str, Template] = {
    # CPT's best template, "{} is in [MASK] color." (template3 of the released
    # refcoco_zsl_cpt_dataset.py); T5 fills a blank with a sentinel and writes "<sentinel> span".
    "sentinel": Template("{expression} is in <extra_id_0> color.", "<extra_id_0> {color}"),
    # An instruction in the words of the rec task's OFA template.
    "instruction": Template('which color is the block on " {expression} "?', "{color}"),
}


class CPTError(MethodError):
    """A record, candidate list or option CPT cannot use; the message names it."""


@dataclass(frozen=True)
class Palette:
    """The colours candidates are painted with, and their opacity."""

    names: tuple[str, ...]
    rgb: tuple[tuple[int, int, int], ...]
    alpha: int  # 1..255

    def __len__(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class Choice:
    """CPT's answer for one expression.

    Attributes:
        index: the chosen candidate (into the candidate list).
        box: its box, ``[x1, y1, x2, y2]`` pixels.
        color: the colour it was painted with.
        copy: the painted copy it was in (candidate ``index`` = ``copy * C + colour index``).
        score: the winning colour's log-likelihood (mean per token, averaged over templates).
        scores: ``scores[copy][colour]``, -inf where a copy has fewer candidates than colours.
    """

    index: int
    box: list[float]
    color: str
    copy: int
    score: float
    scores: list[list[float]] = field(repr=False)


# -- options --------------------------------------------------------------------------------------
def palette_from(options: Mapping[str, Any]) -> Palette:
    """The palette of the options (``palette``, ``alpha``), checked.

    Raises:
        CPTError: a malformed entry, a channel outside 0..255, a colour (name or RGB) given twice,
            or an alpha outside 1..255.
    """
    entries = options.get("palette", PALETTE)
    if not entries:
        raise CPTError("cpt option 'palette' is empty; give at least one [name, r, g, b]")
    names: list[str] = []
    rgbs: list[tuple[int, int, int]] = []
    for i, entry in enumerate(entries):
        ok = isinstance(entry, (list, tuple)) and len(entry) == 4 and isinstance(entry[0], str) and entry[0].strip()
        channels = list(entry[1:]) if ok else []
        if not ok or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in channels):
            raise CPTError(
                f"cpt option 'palette' entry {i}: expected [name, r, g, b] with r, g, b in 0..255, got {entry!r}"
            )
        name, rgb = entry[0].strip(), (channels[0], channels[1], channels[2])
        if name in names:
            raise CPTError(
                f"cpt option 'palette': colour {name!r} is given twice (entries {names.index(name)} and {i})"
            )
        if rgb in rgbs:
            raise CPTError(
                f"cpt option 'palette': RGB {rgb} is given twice ({names[rgbs.index(rgb)]!r} and {name!r}); "
                "two candidates would look alike"
            )
        names.append(name)
        rgbs.append(rgb)
    alpha = options.get("alpha", ALPHA)
    if not isinstance(alpha, int) or isinstance(alpha, bool) or not 1 <= alpha <= 255:
        raise CPTError(f"cpt option 'alpha' must be an integer from 1 to 255 (opacity out of 255), got {alpha!r}")
    return Palette(tuple(names), tuple(rgbs), alpha)


def templates_from(options: Mapping[str, Any]) -> list[Template]:
    """The templates the options name (``templates``); several are ensembled.

    Raises:
        CPTError: no template, or an unknown name (the message lists the known ones).
    """
    names = options.get("templates", ["sentinel"])
    if isinstance(names, str):
        names = [names]
    if not names:
        raise CPTError(f"cpt option 'templates' is empty; choose from {', '.join(TEMPLATES)}")
    for name in names:
        if name not in TEMPLATES:
            raise CPTError(f"cpt option 'templates': unknown template {name!r}; known: {', '.join(TEMPLATES)}")
    return [TEMPLATES[name] for name in names]


def _record_name(record: Mapping[str, Any]) -> str:
    # A served request has no id (unified_vl.app.inference builds its record from the request).
    return f"rec record {record['id']!r}" if record.get("id") is not None else "rec request"


def expression_of(record: Mapping[str, Any]) -> str:
    """The record's expression, whitespace normalised and without a final full stop (as CPT strips it).

    Raises:
        CPTError: a missing or empty expression (the message names the record).
    """
    value = record.get("expression")
    text = " ".join(value.split()).rstrip(".").strip() if isinstance(value, str) else ""
    if not text:
        raise CPTError(f"{_record_name(record)}: 'expression' must be a non-empty string, got {value!r:.80}")
    return text


# -- candidates -----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _load_proposals(path: str, mtime_ns: int) -> dict[str, list]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CPTError(f"cpt option 'proposals': cannot read {path} as JSON ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise CPTError(
            f"cpt option 'proposals': {path} must hold one JSON object {{key: [[x1, y1, x2, y2], ...]}}, "
            "keys being record ids or image file names"
        )
    return data


def proposals(path: str) -> dict[str, list]:
    """The proposals file: ``{record id or image file name: [[x1, y1, x2, y2], ...]}`` (cached while unchanged)."""
    try:
        mtime = Path(path).stat().st_mtime_ns
    except OSError as exc:
        raise CPTError(f"cpt option 'proposals': cannot read {path} ({exc})") from None
    return _load_proposals(str(path), mtime)


def _image_name(image: Any) -> str | None:
    """The file name of a record's image when it has one (a path, or a PIL image opened from a file)."""
    if isinstance(image, (str, Path)):
        return Path(image).name
    if isinstance(image, Mapping) and image.get("path"):
        return Path(image["path"]).name
    filename = getattr(image, "filename", None)
    return Path(filename).name if filename else None


def candidates_of(record: Mapping[str, Any], *, proposals_file: str = "") -> list[list[float]]:
    """The candidate boxes of a record, checked: its ``candidate_boxes``, or its entry of a proposals file.

    A proposals file is looked up by the record's id, then by its image's file name.

    Raises:
        CPTError: no candidates, a candidate that is not a box inside the image, or a degenerate
            one (x2 <= x1 or y2 <= y1); the message names the record and the candidate.
    """
    name = _record_name(record)
    if proposals_file:
        table = proposals(proposals_file)
        keys = [str(record.get("id")), _image_name(record.get("image"))]
        key = next((k for k in keys if k is not None and k in table), None)
        if key is None:
            tried = " or ".join(repr(k) for k in keys if k is not None)
            raise CPTError(f"{name}: the proposals file {proposals_file} has no boxes for {tried}")
        found, source = table[key], f"proposals[{key!r}]"
    else:
        found, source = record.get("candidate_boxes"), "candidate_boxes"
    if not found:
        raise CPTError(f"{name}: no candidates ({source} is {found!r}); CPT chooses among at least one candidate box")
    width, height = record.get("width"), record.get("height")
    checked = []
    for i, box in enumerate(found):
        try:
            x1, y1, x2, y2 = validate_box(box, width, height, what=f"{name}: {source}[{i}]")
        except BoxError as exc:
            raise CPTError(str(exc)) from None
        if x2 <= x1 or y2 <= y1:
            raise CPTError(f"{name}: {source}[{i}] = {box!r} is degenerate; expected x1 < x2 and y1 < y2")
        checked.append([x1, y1, x2, y2])
    return checked


def masks_of(record: Mapping[str, Any], num_candidates: int, *, proposals_file: str = "") -> list | None:
    """The record's ``candidate_masks`` (one per candidate, None where a candidate has none), or None.

    None with a proposals file: the masks belong to the record's own ``candidate_boxes``.
    """
    masks = record.get("candidate_masks")
    if masks is None or proposals_file:
        return None
    if not isinstance(masks, (list, tuple)) or len(masks) != num_candidates:
        got = len(masks) if isinstance(masks, (list, tuple)) else type(masks).__name__
        raise CPTError(
            f"{_record_name(record)}: 'candidate_masks' needs one entry per candidate ({num_candidates}), got {got}"
        )
    # [] (a candidate without a mask, as stored) and None both mean: paint the box.
    out = [None if m is None or (not isinstance(m, np.ndarray) and len(m) == 0) else m for m in masks]
    return out if any(m is not None for m in out) else None


def copies(num_candidates: int, num_colors: int) -> list[range]:
    """The candidates of each painted copy: ceil(N / C) copies of at most C consecutive candidates."""
    return [range(k, min(k + num_colors, num_candidates)) for k in range(0, num_candidates, num_colors)]


# -- painting -------------------------------------------------------------------------------------
def _box_pixels(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """The pixel columns c0..c1-1 and rows r0..r1-1 whose centres lie in the box (at least one each)."""
    x1, y1, x2, y2 = box
    c0, c1 = math.ceil(x1 - 0.5), math.ceil(x2 - 0.5)
    r0, r1 = math.ceil(y1 - 0.5), math.ceil(y2 - 0.5)
    c0, r0 = min(max(c0, 0), width - 1), min(max(r0, 0), height - 1)
    return c0, r0, max(min(c1, width), c0 + 1), max(min(r1, height), r0 + 1)


def _region(size: tuple[int, int], box: Sequence[float], mask: Any, alpha: int) -> Image.Image:
    """An ``L`` image that is ``alpha`` where the candidate is (its mask, else its box) and 0 elsewhere."""
    width, height = size
    if mask is None:
        region = np.zeros((height, width), dtype=np.uint8)  # (H, W)
        c0, r0, c1, r1 = _box_pixels(box, width, height)
        region[r0:r1, c0:c1] = alpha
        return Image.fromarray(region, mode="L")
    if isinstance(mask, np.ndarray):
        if mask.shape != (height, width):
            raise CPTError(f"a candidate mask has shape {mask.shape}, the image is {height} x {width}")
        return Image.fromarray(np.where(mask.astype(bool), alpha, 0).astype(np.uint8), mode="L")
    region = Image.new("L", size, 0)
    draw = ImageDraw.Draw(region)
    for polygon in mask:  # COCO polygons: [x1, y1, x2, y2, ...] in pixels
        if len(polygon) < 6 or len(polygon) % 2:
            raise CPTError(f"a candidate mask polygon needs at least three (x, y) points, got {polygon!r:.80}")
        draw.polygon([(float(polygon[i]), float(polygon[i + 1])) for i in range(0, len(polygon), 2)], fill=alpha)
    return region


def paint(
    image: Image.Image,
    candidate_boxes: Sequence[Sequence[float]],
    colors: Sequence[tuple[int, int, int]],
    *,
    alpha: int = ALPHA,
    masks: Sequence[Any] | None = None,
) -> Image.Image:
    """A copy of ``image`` with candidate i covered by a block of ``colors[i]`` at opacity ``alpha``/255.

    A pixel is inside a box when its centre is; a candidate with a mask (``masks[i]`` not None:
    COCO polygons or a boolean H x W array) is painted on its mask instead. Pixels of no
    candidate are left exactly as they are; a painted one becomes ``round(p + (color - p) * alpha / 255)``
    (Pillow's fill with a mask; CPT composites an RGBA overlay, the same blend). Candidates are
    painted in order, so where two overlap the later one lies on top.

    Args:
        image: an RGB image (other modes are converted).
        candidate_boxes: ``[x1, y1, x2, y2]`` pixels, one per colour used.
        colors: RGB colours, at least one per candidate.
        alpha: opacity out of 255.
        masks: per candidate a mask or None (None: boxes only).

    Returns:
        The painted RGB image; ``image`` itself is not changed.
    """
    if len(colors) < len(candidate_boxes):
        raise CPTError(f"paint: {len(candidate_boxes)} candidates but only {len(colors)} colours")
    painted = image.convert("RGB") if image.mode != "RGB" else image.copy()
    for i, box in enumerate(candidate_boxes):
        mask = masks[i] if masks is not None else None
        painted.paste(tuple(colors[i]), None, _region(painted.size, box, mask, alpha))
    return painted


def paint_copy(
    image: Image.Image,
    candidate_boxes: Sequence[Sequence[float]],
    palette: Palette,
    copy: int,
    *,
    masks: Sequence[Any] | None = None,
) -> Image.Image:
    """Painted copy ``copy``: candidates ``copy * C`` .. ``copy * C + C - 1`` in the palette's first colours."""
    members = copies(len(candidate_boxes), len(palette))[copy]
    return paint(
        image,
        [candidate_boxes[i] for i in members],
        palette.rgb,
        alpha=palette.alpha,
        masks=[masks[i] for i in members] if masks is not None else None,
    )


# -- training -------------------------------------------------------------------------------------
def gold_index(record: Mapping[str, Any], candidate_boxes: Sequence[Sequence[float]]) -> int:
    """The candidate that overlaps the record's ``box`` most (the gold box itself for ground-truth candidates)."""
    ious = [iou(box, record["box"]) for box in candidate_boxes]
    return max(range(len(ious)), key=lambda i: (ious[i], -i))


def _make_example(task_name: str, record: Mapping[str, Any], rng: random.Random, options: Mapping[str, Any]):
    """A training example: the copy holding the gold candidate, a template drawn with ``rng``, its colour word."""
    from unified_vl.engine.trainer import Example
    from unified_vl.processor import load_image

    _check_task(task_name)
    palette, templates = palette_from(options), templates_from(options)
    expression = expression_of(record)
    candidate_boxes = candidates_of(record, proposals_file=options.get("proposals", ""))
    masks = masks_of(record, len(candidate_boxes), proposals_file=options.get("proposals", ""))
    if iou(candidate_boxes[gold_index(record, candidate_boxes)], record["box"]) < 0.5:
        # No candidate is the referent (detected proposals missed it): the gold box joins them, so
        # that the target names a region that is right (RefCOCO's IoU >= 0.5, tasks/rec.py).
        candidate_boxes = [*candidate_boxes, [float(v) for v in record["box"]]]
        masks = [*masks, None] if masks is not None else None
    gold = gold_index(record, candidate_boxes)
    copy, color = divmod(gold, len(palette))
    template = templates[rng.randrange(len(templates))]
    image = paint_copy(load_image(record["image"]), candidate_boxes, palette, copy, masks=masks)
    return Example(
        image, template.prompt.format(expression=expression), template.target.format(color=palette.names[color])
    )


def _check_task(task_name: str) -> None:
    if task_name != "rec":
        raise CPTError(f"the cpt method answers referring expressions (task 'rec'), not {task_name!r}")


# -- scoring --------------------------------------------------------------------------------------
def choose(
    model,
    processor,
    images: Sequence[Image.Image],
    expressions: Sequence[str],
    candidate_boxes: Sequence[Sequence[Sequence[float]]],
    *,
    palette: Palette,
    templates: Sequence[Template],
    batch_size: int = 32,
    masks: Sequence[Sequence[Any] | None] | None = None,
) -> list[Choice]:
    """CPT's choice among each input's candidates.

    Every input's candidates are split into painted copies (:func:`copies`); the (input, copy)
    pairs are painted and scored ``batch_size`` at a time — each copy's C colour words under every
    template in one teacher-forced pass of :func:`unified_vl.generation.score_candidates`
    (length-normalised log-likelihood), averaged over templates — and each input takes the argmax
    over all its (copy, colour) pairs, unused colours of a last, partial copy excluded.

    Args:
        model: a :class:`~unified_vl.modeling.UnifiedVLForConditionalGeneration` in eval mode.
        processor: its :class:`~unified_vl.processor.UnifiedVLProcessor`.
        images: one RGB image per input (original size; boxes are in its pixels).
        expressions: one expression per input.
        candidate_boxes: one checked list of candidate boxes per input (:func:`candidates_of`).
        palette: the colours.
        templates: the colour templates (scores averaged over them).
        batch_size: painted images per pass (and the scoring's batch size).
        masks: per input, per-candidate masks or None.

    Returns:
        One :class:`Choice` per input.
    """
    import torch

    from unified_vl.generation import score_candidates

    if not len(images) == len(expressions) == len(candidate_boxes):
        raise ValueError(f"got {len(images)} images, {len(expressions)} expressions, {len(candidate_boxes)} lists")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    num_colors = len(palette)
    jobs = [(i, k) for i, cands in enumerate(candidate_boxes) for k in range(len(copies(len(cands), num_colors)))]
    targets = [[t.target.format(color=name) for name in palette.names] for t in templates]  # (T, C)
    rows: list[torch.Tensor] = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        painted = [
            paint_copy(images[i], candidate_boxes[i], palette, k, masks=masks[i] if masks is not None else None)
            for i, k in chunk
        ]
        per_template = [
            score_candidates(
                model,
                processor,
                painted,
                [t.prompt.format(expression=expressions[i]) for i, _ in chunk],
                targets[j],
                batch_size=batch_size,
            )
            for j, t in enumerate(templates)
        ]
        scores = torch.stack(per_template).mean(dim=0)  # (T, b, C) -> (b, C)
        for row, (i, k) in enumerate(chunk):
            used = len(copies(len(candidate_boxes[i]), num_colors)[k])
            scores[row, used:] = -math.inf  # a partial last copy paints only its first colours
        rows.extend(scores)
    choices, at = [], 0
    for cands in candidate_boxes:
        n_copies = len(copies(len(cands), num_colors))
        grid = torch.stack(rows[at : at + n_copies])  # (copies, C); flat index = candidate index
        at += n_copies
        best = int(grid.flatten().argmax())
        copy, color = divmod(best, num_colors)
        choices.append(
            Choice(best, list(cands[best]), palette.names[color], copy, float(grid.flatten()[best]), grid.tolist())
        )
    return choices


def _inputs(task_name: str, records: Sequence[Mapping[str, Any]], options: Mapping[str, Any]):
    """(images, expressions, candidate lists, masks) of records, every record checked first."""
    from unified_vl.processor import load_image

    _check_task(task_name)
    candidate_lists = [candidates_of(r, proposals_file=options.get("proposals", "")) for r in records]
    expressions = [expression_of(r) for r in records]
    proposals_file = options.get("proposals", "")
    masks = [masks_of(r, len(c), proposals_file=proposals_file) for r, c in zip(records, candidate_lists, strict=True)]
    images = [load_image(r["image"], what=f"{_record_name(r)} image") for r in records]
    return images, expressions, candidate_lists, (masks if any(m is not None for m in masks) else None)


def _predict(model, processor, task_name: str, records, options, *, batch_size: int) -> list[Answer]:
    palette, templates = palette_from(options), templates_from(options)
    images, expressions, candidate_lists, masks = _inputs(task_name, records, options)
    chosen = choose(
        model,
        processor,
        images,
        expressions,
        candidate_lists,
        palette=palette,
        templates=templates,
        batch_size=options.get("batch_size") or batch_size,
        masks=masks,
    )
    return [
        Answer(
            text=box_to_tokens(c.box, r["width"], r["height"]),
            score=c.score,
            details={"candidate": c.index, "color": c.color, "painted_copy": c.copy},
        )
        for c, r in zip(chosen, records, strict=True)
    ]


def _generate(model, processor, task_name: str, records, options, *, batch_size: int, num_beams: int) -> list[str]:
    # num_beams has no say: CPT scores colour words instead of decoding.
    return [a.text for a in _predict(model, processor, task_name, records, options, batch_size=batch_size)]


def _check(task_name: str, record: Mapping[str, Any], options: Mapping[str, Any]) -> None:
    _check_task(task_name)
    palette_from(options)
    templates_from(options)
    candidate_boxes = candidates_of(record, proposals_file=options.get("proposals", ""))
    masks_of(record, len(candidate_boxes), proposals_file=options.get("proposals", ""))
    expression_of(record)


METHOD = Method(
    name="cpt",
    description="CPT colour prompts for rec: paint the candidates, score colour words (Yao et al. 2021)",
    options={
        "palette": [list(entry) for entry in PALETTE],
        "alpha": ALPHA,
        "templates": ["sentinel"],
        "proposals": "",
        "batch_size": 0,
    },
    make_example=_make_example,
    generate=_generate,
    predict=_predict,
    check=_check,
)
