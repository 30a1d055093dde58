"""Flickr30k Entities (Plummer et al., 2015) -> ``grounding`` phrase-grounding records.

Official layout (github.com/BryanPlummer/flickr30k_entities, ``annotations.zip``)::

    ROOT/Sentences/<image_id>.txt    one caption per line, phrases marked up as
                                     "[/EN#18/people A man] with [/EN#19/clothing pierced ears] ..."
    ROOT/Annotations/<image_id>.xml  Pascal-VOC-style: <size><width/><height/></size> and
                                     <object><name>18</name>...<bndbox><xmin/>...</bndbox></object>
                                     (<nobndbox>1</nobndbox> or <scene>1</scene> for boxless entities)
    ROOT/train.txt, val.txt, test.txt   image ids of the splits (one per line)

Images are ``--images/<image_id>.jpg`` (Flickr30k). Parsing follows the official
``flickr30k_entities_utils.py`` (``get_sentence_data``, ``get_annotations``): an ``<object>`` may carry
several ``<name>`` ids, an entity may have several boxes.

Per caption one record: ``caption`` = the sentence without markup (tokens joined by single spaces,
as the official parser does), ``phrases`` = the marked phrases that have at least one box, in order,
``boxes`` = per phrase the union of its boxes (the merged-box protocol of the Flickr30k Entities
benchmark; ``tasks.boxes.box_union``). Phrases without boxes (``notvisual``, ``<nobndbox>``,
``<scene>``) are dropped and counted, and so are captions left without any boxed phrase.

Coordinates: VOC boxes are 1-based inclusive pixel indices, so pixel ``xmax`` spans ``[xmax - 1,
xmax)``; in our continuous ``[x1, y1, x2, y2]`` frame that is ``[xmin - 1, ymin - 1, xmax, ymax]``
(the official utility's ``xmin - 1`` start, with the end pixel included).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from pathlib import Path

from data_tools.converters._common import ConversionError, Pair, Report
from tasks.boxes import box_union

DESCRIPTION = "Flickr30k Entities Sentences/ + Annotations/ -> grounding (phrase grounding)"
INPUTS = "--input FLICKR30K_ENTITIES_ROOT (Sentences/, Annotations/, train.txt ...)  --images flickr30k-images/"

SPLIT_FILES = {"train": "train.txt", "val": "val.txt", "test": "test.txt"}
_PHRASE_START = re.compile(r"^\[/EN#(\d+)((?:/[^\s/]+)*)$")


class MarkupError(ValueError):
    """A caption line whose [/EN#...] markup does not parse."""


def parse_sentence(line: str) -> tuple[str, list[dict]]:
    """One marked-up caption -> (plain caption, phrases ``{"phrase", "entity", "types", "first_word"}``).

    Same tokenisation as the official ``get_sentence_data``: split on whitespace; a token starting
    with ``[`` opens a phrase, a token ending with ``]`` closes it.
    """
    words: list[str] = []
    phrases: list[dict] = []
    current: list[str] | None = None
    for token in line.split():
        if current is not None:
            if token.startswith("[/EN#"):
                raise MarkupError(f"phrase opened inside another phrase at {token!r}")
            closing = token.endswith("]")
            token = token[:-1] if closing else token
            if token:
                current.append(token)
                words.append(token)
            if closing:
                if not current:
                    raise MarkupError("empty phrase")
                phrases[-1]["phrase"] = " ".join(current)
                current = None
        elif token.startswith("["):
            match = _PHRASE_START.match(token)
            if match is None:
                raise MarkupError(f"bad phrase opening {token!r} (expected [/EN#<id>/<type>)")
            phrases.append(
                {"entity": match.group(1), "types": match.group(2).strip("/").split("/"), "first_word": len(words)}
            )
            current = []
        elif token.endswith("]"):
            raise MarkupError(f"unmatched ']' at {token!r}")
        else:
            words.append(token)
    if current is not None:
        raise MarkupError("phrase not closed with ']'")
    return " ".join(words), phrases


def parse_annotation(path: Path) -> tuple[int, int, dict[str, list[list[float]]]]:
    """``(width, height, {entity id: boxes [x1, y1, x2, y2]})`` of one Annotations/<id>.xml."""
    root = ET.parse(path).getroot()
    size = root.find("size")
    if size is None or size.findtext("width") is None or size.findtext("height") is None:
        raise ValueError("no <size><width/><height/></size>")
    width, height = int(size.findtext("width")), int(size.findtext("height"))
    boxes: dict[str, list[list[float]]] = {}
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        if box is None:
            continue  # <nobndbox> or <scene>: the entity has no box
        xmin, ymin, xmax, ymax = (int(box.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax"))
        for name in obj.findall("name"):
            boxes.setdefault(name.text.strip(), []).append([xmin - 1.0, ymin - 1.0, float(xmax), float(ymax)])
    return width, height, boxes


def _split_ids(root: Path, split: str | None) -> list[tuple[str, list[str]]]:
    present = {name: root / file for name, file in SPLIT_FILES.items() if (root / file).is_file()}
    if present:
        out = []
        for name, path in present.items():
            ids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            out.append((split or name, ids))
        if split and len(out) > 1:
            raise ConversionError(f"{root}: has {', '.join(SPLIT_FILES[n] for n in present)}; --split would merge them")
        return out
    if not split:
        raise ConversionError(
            f"{root}: no train.txt/val.txt/test.txt split files; pass --split to put every image in one split"
        )
    return [(split, sorted(p.stem for p in (root / "Sentences").glob("*.txt")))]


def records(inputs: Sequence[Path], images: Sequence[Path], *, report: Report, split: str | None) -> Iterator[Pair]:
    """Grounding records of every listed image (see the module docstring)."""
    if len(inputs) != 1 or not inputs[0].is_dir():
        raise ConversionError(
            f"flickr30k_entities: --input takes the dataset root folder (with Sentences/ and Annotations/), got {[str(p) for p in inputs]}"
        )
    if len(images) != 1:
        raise ConversionError("flickr30k_entities: --images takes the one folder of <image_id>.jpg files")
    root = inputs[0]
    for sub in ("Sentences", "Annotations"):
        if not (root / sub).is_dir():
            raise ConversionError(f"{root}: no {sub}/ folder; is this the Flickr30k Entities root?")
    for split_name, ids in _split_ids(root, split):
        for image_id in ids:
            sentences_path = root / "Sentences" / f"{image_id}.txt"
            xml_path = root / "Annotations" / f"{image_id}.xml"
            try:
                lines = sentences_path.read_text(encoding="utf-8").splitlines()
            except (FileNotFoundError, UnicodeDecodeError) as exc:
                report.bad(sentences_path, f"image {image_id}", f"cannot read the sentences file: {exc}")
                continue
            try:
                xml_width, xml_height, entity_boxes = parse_annotation(xml_path)
            except (FileNotFoundError, ET.ParseError, ValueError, TypeError, AttributeError) as exc:
                report.bad(xml_path, f"image {image_id}", f"malformed annotation file: {exc}")
                continue
            image_file = (images[0] / f"{image_id}.jpg").resolve()
            size = report.image(image_file, file=xml_path, record=f"image {image_id}", expected=(xml_width, xml_height))
            if size is None:
                continue
            width, height = size
            merged: dict[str, list[float]] = {}
            bad_box = False
            for entity, entity_box_list in entity_boxes.items():
                checked = [
                    report.box(b, width, height, file=xml_path, record=f"image {image_id} entity {entity}")
                    for b in entity_box_list
                ]
                if any(b is None for b in checked):
                    bad_box = True
                    break
                merged[entity] = box_union(checked)
            if bad_box:
                continue
            for n, line in enumerate(lines):
                if not line.strip():
                    continue
                name = f"line {n + 1}"
                try:
                    caption, phrases = parse_sentence(line)
                except MarkupError as exc:
                    report.bad(sentences_path, name, f"{exc}: {line!r}")
                    continue
                if not caption:
                    report.bad(sentences_path, name, "empty caption")
                    continue
                boxed = [p for p in phrases if p["entity"] in merged]
                if len(boxed) < len(phrases):
                    report.note("phrases without a box dropped", len(phrases) - len(boxed))
                if not boxed:
                    report.note("captions without any boxed phrase dropped")
                    continue
                record = {
                    "id": f"{image_id}-{n}",
                    "image": str(image_file),
                    "width": width,
                    "height": height,
                    "caption": caption,
                    "phrases": [p["phrase"] for p in boxed],
                    "boxes": [merged[p["entity"]] for p in boxed],
                }
                if report.valid("grounding", record, file=sentences_path, name=name):
                    yield ("grounding", split_name), record
