"""The `Task` object, record validation and small helpers shared by the task modules.

A task speaks text only (DESIGN.md §7.2): it turns a record (docs/records.md) into an instruction
(the encoder prefix) and a target (the decoder text), parses generated text back into a prediction
and scores predictions. Pure Python on purpose: this package never imports torch.

A task module builds one `Task` from plain functions (composition, DESIGN.md §7.8) and names it
``TASK``; ``tasks/__init__.py`` finds it.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from tasks import boxes

DECODING_MODES = ("open", "loc4", "candidates", "phrases")
ROLES = ("input", "label", "source")

Record = Mapping[str, Any]


class RecordError(ValueError):
    """A record that a task cannot use; the message names the task, the field and the record id."""


# --------------------------------------------------------------------------------------------
# Field specifications
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldSpec:
    """One record field a task reads.

    Attributes:
        name: the record key.
        type: the expected type in words, used in error messages (e.g. ``"list[str]"``).
        check: ``check(value, record)`` raises ``ValueError(reason)`` when ``value`` is unusable;
            ``reason`` completes the sentence "field 'x' ..." (e.g. "must be str, got int 3").
        role: ``"input"`` when the prompt or the output parser needs the field (it must be present
            at serving time too), ``"label"`` when only targets and metrics need it, ``"source"`` for
            the source dataset's identifier of the record (VQAv2's ``question_id``, COCO's
            ``image_id``): nothing reads it but the official results formats (``data_tools.formats``).
        required: a required field may be neither absent nor None; an optional one is checked only
            when it is present and not None (records from a `datasets` table carry every column).
        storage: how the field is stored on disk (``data_tools.storage`` builds each task's schema
            from these): one of `STORAGE_TYPES`, ``[type]`` for a list, or ``{"key": type, ...}``
            for an object, nested as needed (detection's objects: ``[{"label": "string", "box": "box"}]``).
    """

    name: str
    type: str
    check: Callable[[Any, Record], None]
    role: str = "label"
    required: bool = True
    storage: Any = "string"

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"field {self.name!r}: role must be one of {ROLES}, got {self.role!r}")
        check_storage_type(self.storage, f"field {self.name!r}")


# The leaf storage types a field may have ("box": [x1, y1, x2, y2] as four float64, exact round trips).
STORAGE_TYPES = ("string", "bool", "int32", "int64", "float64", "box")


def storage_holds(storage: Any, leaf: str) -> bool:
    """Whether a field stored as ``storage`` holds values of the leaf type ``leaf`` at any depth."""
    if isinstance(storage, str):
        return storage == leaf
    if isinstance(storage, list):
        return storage_holds(storage[0], leaf)
    if isinstance(storage, dict):
        return any(storage_holds(s, leaf) for s in storage.values())
    return False


def check_storage_type(storage: Any, what: str) -> None:
    """Raises ``ValueError`` unless ``storage`` is a leaf type, ``[type]`` or ``{key: type}`` of them."""
    if isinstance(storage, str):
        if storage not in STORAGE_TYPES:
            raise ValueError(
                f"{what}: storage type must be one of {STORAGE_TYPES}, a [list] or a {{key: ...}}, got {storage!r}"
            )
    elif isinstance(storage, list) and len(storage) == 1:
        check_storage_type(storage[0], what)
    elif isinstance(storage, dict) and storage and all(isinstance(k, str) for k in storage):
        for value in storage.values():
            check_storage_type(value, what)
    else:
        raise ValueError(
            f"{what}: storage type must be one of {STORAGE_TYPES}, a [list] or a {{key: ...}}, got {storage!r}"
        )


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def string_field(name: str, *, role: str = "label", required: bool = True, forbid: Sequence[str] = ()) -> FieldSpec:
    """A non-empty string field.

    Args:
        name: record key.
        role: ``"input"`` or ``"label"`` (see `FieldSpec`).
        required: whether the field must be present.
        forbid: substrings the text may not contain (e.g. the separators of a target format).
    """

    def check(value: Any, record: Record) -> None:
        if not isinstance(value, str):
            raise ValueError(f"must be str, got {_describe(value)}")
        if not value.strip():
            raise ValueError("must be a non-empty string")
        for bad in forbid:
            if bad in value:
                raise ValueError(f"must not contain {bad!r} (it separates items of the target text), got {value!r}")

    return FieldSpec(name, "str", check, role, required, "string")


def string_list_field(
    name: str, *, role: str = "label", required: bool = True, min_items: int = 1, forbid: Sequence[str] = ()
) -> FieldSpec:
    """A list of non-empty strings with at least ``min_items`` items."""
    item_check = string_field(name, forbid=forbid).check

    def check(value: Any, record: Record) -> None:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"must be list[str], got {_describe(value)}")
        if len(value) < min_items:
            raise ValueError(f"must hold at least {min_items} item(s), got {len(value)}")
        for i, item in enumerate(value):
            try:
                item_check(item, record)
            except ValueError as exc:
                raise ValueError(f"item {i} {exc}") from None

    return FieldSpec(name, "list[str]", check, role, required, ["string"])


def bool_field(name: str, *, role: str = "label", required: bool = True) -> FieldSpec:
    """A bool field (True/False, not 0/1: a stray int usually means a wrong column)."""

    def check(value: Any, record: Record) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"must be bool, got {_describe(value)}")

    return FieldSpec(name, "bool", check, role, required, "bool")


def choice_field(name: str, choices: Sequence[str], *, role: str = "label", required: bool = True) -> FieldSpec:
    """A string that must be one of ``choices``."""
    allowed = tuple(choices)

    def check(value: Any, record: Record) -> None:
        if value not in allowed:
            raise ValueError(f"must be one of {list(allowed)}, got {_describe(value)}")

    return FieldSpec(name, f"one of {list(allowed)}", check, role, required, "string")


def size_field(name: str) -> FieldSpec:
    """An image side in pixels (``width``/``height``), > 0: boxes are normalised by it."""

    def check(value: Any, record: Record) -> None:
        if not _is_number(value) or value <= 0:
            raise ValueError(
                f"must be a positive number of pixels (boxes are normalised by it), got {_describe(value)}"
            )

    return FieldSpec(name, "int > 0", check, "input", True, "int32")


def source_id_field(name: str) -> FieldSpec:
    """An optional source-dataset identifier (role ``"source"``): an integer >= 0, stored as int64.

    Converters keep these (VQAv2 ``question_id``, COCO ``image_id``, RefCOCO ``ref_id``/``sent_id``)
    so that predictions can be written in the official results formats, which key on them.
    """

    def check(value: Any, record: Record) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"must be an integer >= 0 (the source dataset's id), got {_describe(value)}")

    return FieldSpec(name, "int >= 0", check, "source", False, "int64")


def _check_box(value: Any, record: Record, what: str) -> None:
    try:
        boxes.validate_box(value, record.get("width"), record.get("height"), what=what)
    except boxes.BoxError as exc:
        raise ValueError(str(exc)) from None


def box_field(name: str, *, role: str = "label", required: bool = True) -> FieldSpec:
    """A box ``[x1, y1, x2, y2]`` in pixels inside the record's ``width`` x ``height`` image."""

    def check(value: Any, record: Record) -> None:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"must be a box [x1, y1, x2, y2] in pixels, got {_describe(value)}")
        _check_box(value, record, "box")

    return FieldSpec(name, "list[float] ([x1, y1, x2, y2] pixels)", check, role, required, "box")


def box_list_field(name: str, *, role: str = "label", required: bool = True, min_items: int = 1) -> FieldSpec:
    """A list of boxes ``[x1, y1, x2, y2]`` in pixels."""

    def check(value: Any, record: Record) -> None:
        if not isinstance(value, (list, tuple)) or len(value) < min_items:
            raise ValueError(f"must be a list of at least {min_items} box(es) [x1, y1, x2, y2], got {_describe(value)}")
        for i, box in enumerate(value):
            if not isinstance(box, (list, tuple)):
                raise ValueError(f"item {i} must be a box [x1, y1, x2, y2], got {_describe(box)}")
            _check_box(box, record, f"box {i}")

    return FieldSpec(name, "list[list[float]]", check, role, required, ["box"])


# --------------------------------------------------------------------------------------------
# Randomness: `random.Random` or `numpy.random.Generator`, both accepted
# --------------------------------------------------------------------------------------------


def rng_index(rng: Any, n: int) -> int:
    """A uniform index in ``range(n)`` drawn with ``rng`` (``random.Random`` or numpy ``Generator``)."""
    if n <= 0:
        raise ValueError(f"cannot draw an index from an empty range (n={n})")
    if hasattr(rng, "randrange"):
        return rng.randrange(n)
    if hasattr(rng, "integers"):
        return int(rng.integers(n))
    raise TypeError(f"rng must be a random.Random or a numpy.random.Generator, got {type(rng).__name__}")


def as_random(rng: Any) -> random.Random:
    """``rng`` as a ``random.Random`` (a numpy ``Generator`` seeds a fresh one from its stream)."""
    if isinstance(rng, random.Random):
        return rng
    if hasattr(rng, "integers"):
        return random.Random(int(rng.integers(2**63 - 1)))
    raise TypeError(f"rng must be a random.Random or a numpy.random.Generator, got {type(rng).__name__}")


# --------------------------------------------------------------------------------------------
# Boxes in target text
# --------------------------------------------------------------------------------------------

ITEM_SEPARATOR = " ; "  # between "label<loc>x4" items (DESIGN.md §1, grounding row)
LABEL_FORBIDDEN = ("<loc_", ";")  # in a label, these would break the "label<loc>x4 ; ..." format


def decode_box(text: str, width: float, height: float) -> list[float] | None:
    """Exactly four ``<loc_*>`` tokens in ``text`` -> a box in pixels, else None.

    Text around the tokens is ignored. A bin outside ``0..B-1`` or a reversed box (x2 < x1 or
    y2 < y1) is no prediction: it cannot overlap anything.
    """
    bins = boxes.parse_loc_bins(text)
    if len(bins) != 4:
        return None
    try:
        box = boxes.bins_to_box(bins, width, height)
    except boxes.BoxError:
        return None
    if box[2] < box[0] or box[3] < box[1]:
        return None
    return box


def format_labelled_boxes(items: Sequence[tuple[str, Sequence[float]]], width: float, height: float) -> str:
    """``[(label, box), ...]`` -> ``"label<loc_a><loc_b><loc_c><loc_d> ; label<loc_..>..."``."""
    return ITEM_SEPARATOR.join(f"{squash(label)}{boxes.box_to_tokens(box, width, height)}" for label, box in items)


_LABELLED_BOX = re.compile(r"^(?P<label>[^<]*?)\s*(?P<locs>(?:<loc_\d+>\s*){4})$")


def parse_labelled_boxes(text: str, width: float, height: float) -> list[tuple[str, list[float]]] | None:
    """Inverse of `format_labelled_boxes`; tolerant of spaces around the tokens.

    A malformed item (not "text then exactly four loc tokens", an empty label, a reversed box) is
    dropped and the others kept, so one bad item costs that item only. No valid item -> None.
    """
    items = []
    for chunk in text.split(";"):
        match = _LABELLED_BOX.match(chunk.strip())
        if match is None or not match.group("label").strip():
            continue
        box = decode_box(match.group("locs"), width, height)
        if box is not None:
            items.append((squash(match.group("label")), box))
    return items or None


# --------------------------------------------------------------------------------------------
# Text helpers
# --------------------------------------------------------------------------------------------


def squash(text: str) -> str:
    """Collapses runs of whitespace (newlines and tabs included) into one space and strips."""
    return " ".join(text.split())


def normalize_phrase(text: str) -> str:
    """Lower-case, whitespace-collapsed, without punctuation at either end (for matching names)."""
    return squash(text.lower()).strip(string.punctuation + " ")


def safe_mean(values: Sequence[float]) -> float:
    """Mean of ``values`` (0.0 for none: a metric over nothing has nothing right)."""
    return float(sum(values)) / len(values) if values else 0.0


# --------------------------------------------------------------------------------------------
# Task
# --------------------------------------------------------------------------------------------


def _no_candidates(records: Sequence[Record]) -> None:
    return None


@dataclass(frozen=True, eq=False)
class Task:
    """One task: instruction templates, target formatting, output parsing and metrics.

    Build it from plain functions; the methods add validation around them so that every caller
    gets the same error messages. See docs/records.md for the contract.

    Attributes:
        name: task name = module name = config key = metric prefix (DESIGN.md §3).
        fields: record fields the task reads (besides ``id`` and ``image``), name -> `FieldSpec`.
        prompts: instruction templates (``str.format`` syntax); ``prompts[0]`` is canonical
            (evaluation, serving), training samples among them.
        primary_metric: the key of ``evaluate``'s result to select checkpoints by.
        decoding: ``"open"``, ``"loc4"`` (exactly four ``<loc_*>`` then end), ``"candidates"`` or
            ``"phrases"`` (``phrase<loc>x4 ; ...`` with each phrase a run of words of the record's
            ``decoding_source``, no two starting at the same word, in any order: phrase grounding).
        format_target: ``format_target(record, rng) -> str``; ``rng=None`` must be deterministic.
        parse_output: ``parse_output(text, record) -> prediction | None`` for non-empty text.
        gold_prediction: ``gold_prediction(record) -> prediction`` (what a perfect model predicts).
        metric: ``metric(predictions, records) -> dict[str, float]``; a None prediction scores 0.
        examples: three or more hand-written records; the registry-wide contract tests use them.
        prompt_values: ``prompt_values(record, rng) -> mapping`` filling the templates; default:
            the record itself.
        select_prompts: ``select_prompts(record) -> templates`` for tasks whose record kinds need
            different templates (grounding); default: ``prompts``.
        required_for: ``required_for(record) -> field names`` for tasks whose required fields
            depend on the record kind (grounding); default: the fields marked required.
        candidate_texts: ``candidate_texts(records) -> list[str] | None`` for constrained decoding.
        decoding_source: ``decoding_source(record) -> str | None`` for ``"phrases"``: the text the
            phrases are copied from (the caption); None decodes that record openly.
        metric_keys: every key ``metric`` may return (documentation and tests).
        present: ``present(prediction, score) -> mapping``: how a prediction is shown to users (the
            `Predictor`'s results and the server's JSON), e.g. ``{"answer": "red"}``; JSON-ready
            values only. Default: ``{"task": name, "prediction": prediction}``.
        order_by_position: ``order_by_position(record) -> record`` with its list of boxes (and what
            pairs with them) in reading order, for training with ``data.target_order=position``;
            None: the task's target holds no list of boxes to order.
    """

    name: str
    fields: Mapping[str, FieldSpec]
    prompts: tuple[str, ...]
    primary_metric: str
    decoding: str
    format_target: Callable[[Record, Any], str]
    parse_output: Callable[[str, Record], Any]
    gold_prediction: Callable[[Record], Any]
    metric: Callable[[Sequence[Any], Sequence[Record]], dict[str, float]]
    examples: tuple[Mapping[str, Any], ...] = ()
    prompt_values: Callable[[Record, Any], Mapping[str, Any]] | None = None
    select_prompts: Callable[[Record], Sequence[str]] | None = None
    required_for: Callable[[Record], Sequence[str]] | None = None
    candidate_texts: Callable[[Sequence[Record]], list[str] | None] = _no_candidates
    decoding_source: Callable[[Record], str | None] | None = None
    metric_keys: tuple[str, ...] = ()
    present: Callable[[Any, float], Mapping[str, Any]] | None = None
    order_by_position: Callable[[Record], Record] | None = None
    description: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"task name must be a Python identifier (it is a module name), got {self.name!r}")
        if self.decoding not in DECODING_MODES:
            raise ValueError(f"{self.name}: decoding must be one of {DECODING_MODES}, got {self.decoding!r}")
        if not self.prompts:
            raise ValueError(f"{self.name}: at least one prompt template is needed")
        if (self.decoding == "phrases") != (self.decoding_source is not None):
            raise ValueError(f"{self.name}: decoding 'phrases' and a decoding_source go together")
        specs = dict(self.fields)
        for key, spec in specs.items():
            if key != spec.name:
                raise ValueError(f"{self.name}: fields key {key!r} holds the spec of {spec.name!r}")
        object.__setattr__(self, "fields", MappingProxyType(specs))
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "examples", tuple(self.examples))
        if self.metric_keys and self.primary_metric not in self.metric_keys:
            raise ValueError(f"{self.name}: primary_metric {self.primary_metric!r} is not in {self.metric_keys}")

    def __repr__(self) -> str:
        return f"Task(name={self.name!r}, decoding={self.decoding!r}, primary_metric={self.primary_metric!r})"

    # -- validation ------------------------------------------------------------------------

    def required_fields(self, record: Record | None = None, *, inputs_only: bool = False) -> tuple[str, ...]:
        """Field names a record must carry (``id`` included unless ``inputs_only``).

        Args:
            record: the record whose kind decides, for tasks with several record kinds.
            inputs_only: only what `prompt` and `parse` need (a serving request has no labels).
        """
        if self.required_for is not None and record is not None:
            names = list(self.required_for(record))
        else:
            names = [name for name, spec in self.fields.items() if spec.required]
        if inputs_only:
            return tuple(n for n in names if n in self.fields and self.fields[n].role == "input")
        return ("id", *names)

    def validate(self, record: Record, *, inputs_only: bool = False) -> None:
        """Checks that ``record`` has what this task needs.

        Args:
            record: a record dict (docs/records.md).
            inputs_only: check only the fields `prompt` and `parse` need; ``id`` and the
                labels may then be absent (serving requests).

        Raises:
            RecordError: naming the task, the field and the record id, e.g.
                "vqa: record 'q17' is missing field 'answers' (expected list[str])".
        """
        if not isinstance(record, Mapping):
            raise RecordError(f"{self.name}: a record must be a dict, got {_describe(record)}")
        record_id = record.get("id")
        who = f"record {record_id!r}" if record_id is not None else "record <without id>"
        required = self.required_fields(record, inputs_only=inputs_only)
        if "id" in required:
            if record_id is None:
                raise RecordError(f"{self.name}: {who} is missing field 'id' (expected str)")
            if not isinstance(record_id, str):
                raise RecordError(f"{self.name}: {who} field 'id' must be str, got {_describe(record_id)}")
        for name, spec in self.fields.items():
            if inputs_only and spec.role != "input":
                continue
            value = record.get(name)
            if value is None:
                if name in required:
                    raise RecordError(f"{self.name}: {who} is missing field {name!r} (expected {spec.type})")
                continue
            try:
                spec.check(value, record)
            except ValueError as exc:
                raise RecordError(f"{self.name}: {who} field {name!r} {exc}") from None

    # -- text in, text out -----------------------------------------------------------------

    def templates_for(self, record: Record) -> tuple[str, ...]:
        """The instruction templates that apply to ``record`` (``prompts`` for most tasks)."""
        return tuple(self.select_prompts(record)) if self.select_prompts is not None else self.prompts

    def prompt(self, record: Record, *, template: int = 0, rng: Any = None) -> str:
        """The instruction (encoder text) for ``record``.

        Args:
            record: the record; only its input fields are needed.
            template: index of the template; 0 is canonical (evaluation, serving).
            rng: ``random.Random`` or numpy ``Generator``; when given (training) the template is
                drawn uniformly with it and ``template`` is ignored, and tasks with random input
                corruption (text infilling) draw it from ``rng`` too.

        Raises:
            RecordError: the record lacks an input field.
            IndexError: ``template`` is out of range.
        """
        self.validate(record, inputs_only=True)
        templates = self.templates_for(record)
        index = rng_index(rng, len(templates)) if rng is not None else template
        if not 0 <= index < len(templates):
            raise IndexError(
                f"{self.name}: template {index} does not exist; there are {len(templates)} (0..{len(templates) - 1})"
            )
        values = self.prompt_values(record, rng) if self.prompt_values is not None else record
        return squash(templates[index].format_map(values))

    def target(self, record: Record, *, rng: Any = None) -> str:
        """The target (decoder text); ``rng=None`` gives the deterministic canonical target."""
        self.validate(record)
        return self.format_target(record, rng)

    def parse(self, text: str, record: Record) -> Any:
        """Generated text -> prediction, or None ("no prediction", scores 0) when unparseable."""
        if not isinstance(text, str):
            raise TypeError(f"{self.name}: parse expects the generated text as str, got {type(text).__name__}")
        self.validate(record, inputs_only=True)
        if not text.strip():
            return None
        return self.parse_output(text, record)

    def gold(self, record: Record) -> Any:
        """The prediction a perfect model makes for ``record``."""
        self.validate(record)
        return self.gold_prediction(record)

    def evaluate(self, predictions: Sequence[Any], records: Sequence[Record]) -> dict[str, float]:
        """Scores ``predictions`` (aligned with ``records``; None = no prediction, scores 0).

        Returns:
            Metric name (without the ``{task}/{split}/`` prefix) -> float.
        """
        predictions, records = list(predictions), list(records)
        if len(predictions) != len(records):
            raise ValueError(f"{self.name}: got {len(predictions)} predictions for {len(records)} records")
        if not records:
            raise ValueError(f"{self.name}: nothing to evaluate (no records)")
        for record in records:
            self.validate(record)
        return {key: float(value) for key, value in self.metric(predictions, records).items()}

    def presentation(self, prediction: Any, score: float) -> dict[str, Any]:
        """``present(prediction, score)`` as a dict (see the ``present`` attribute)."""
        if self.present is None:
            return {"task": self.name, "prediction": prediction}
        return dict(self.present(prediction, score))

    def source(self, record: Record) -> str | None:
        """The text a ``"phrases"`` decoding copies from for ``record``; None for other decodings."""
        return None if self.decoding_source is None else self.decoding_source(record)

    def candidates(self, records: Sequence[Record]) -> list[str] | None:
        """Candidate target texts for constrained decoding, or None for open generation."""
        records = list(records)
        for record in records:
            self.validate(record)
        return self.candidate_texts(records)
