"""What :class:`~unified_vl.app.inference.predictor.Predictor` returns: plain dataclasses with scores.

Every result keeps ``text``, what the model wrote, next to the parsed value (the task's
``parse``, the same value evaluation scores), and ``score``: the mean log-probability per token
of ``text`` (end-of-sequence token included) given the image and the instruction, as
:func:`unified_vl.generation.score_candidates` computes it. It lies in (-inf, 0]; ``exp(score)``
is the geometric-mean token probability (NaN where a query asked for no score,
``with_score=False``). Boxes are ``[x1, y1, x2, y2]`` in pixels of the original
image. ``to_dict()`` gives JSON-ready dicts (the HTTP server's payload).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


class _Result:
    def to_dict(self) -> dict[str, Any]:
        """The result as plain JSON-ready data."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Caption(_Result):
    """``Predictor.caption``: ``caption`` is None when the model wrote nothing."""

    caption: str | None
    score: float
    text: str


@dataclass(frozen=True)
class Answer(_Result):
    """``Predictor.answer``: the answer (one of the candidates when they were given)."""

    answer: str | None
    score: float
    text: str


@dataclass(frozen=True)
class Location(_Result):
    """``Predictor.locate``: the box of the expression, None when the output was not a box."""

    box: list[float] | None
    score: float
    text: str


@dataclass(frozen=True)
class GroundedPhrase(_Result):
    """One phrase with its box."""

    phrase: str
    box: list[float]


@dataclass(frozen=True)
class Grounding(_Result):
    """``Predictor.ground``: the caption's phrases with their boxes (empty when none parsed)."""

    phrases: list[GroundedPhrase]
    score: float
    text: str


@dataclass(frozen=True)
class LabelScore(_Result):
    """One label of a ranking with its score."""

    label: str
    score: float


@dataclass(frozen=True)
class Classification(_Result):
    """``Predictor.classify``: the best label and the ``top_k`` ranking (best first).

    With ``labels`` the ranking is rank classification over them and each score is the label's
    best label-word score; without, the model writes the label and the ranking holds it alone.
    """

    label: str | None
    score: float
    top_k: list[LabelScore]
    text: str


@dataclass(frozen=True)
class DetectedObject(_Result):
    """One detected object."""

    label: str
    box: list[float]


@dataclass(frozen=True)
class Detection(_Result):
    """``Predictor.detect``: the objects the model listed (empty when none parsed)."""

    objects: list[DetectedObject]
    score: float
    text: str


@dataclass(frozen=True)
class Generation(_Result):
    """``Predictor.generate``: the text for a free instruction."""

    text: str
    score: float


@dataclass(frozen=True)
class Prediction(_Result):
    """``Predictor.predict`` for a task without a dedicated result (``itm``, ``text_infilling``,
    tasks registered at run time): ``prediction`` is ``task.parse(text, record)``."""

    task: str
    prediction: Any
    score: float
    text: str
