"""What :class:`~unified_vl.app.inference.predictor.Predictor` returns: one `Result` for every task.

A result keeps ``text``, what the model wrote; ``prediction``, the task's parse of it (the value
evaluation scores); ``score``, the mean log-probability per token of ``text`` (end-of-sequence
token included) given the image and the instruction, as
:func:`unified_vl.generation.score_candidates` computes it — it lies in (-inf, 0] and
``exp(score)`` is the geometric-mean token probability (NaN where a query asked for no score,
``with_score=False``); and ``fields``, how the task presents the prediction to users
(``Task.present``: ``{"answer": ...}`` for vqa, ``{"box": ...}`` for rec, ...). The fields read as
attributes (``result.answer``, ``result.top_k[0].label``); ``to_dict()`` is the server's JSON:
the fields, then ``score`` and ``text``. Boxes are ``[x1, y1, x2, y2]`` in pixels of the original image.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class Fields(dict):
    """A dict whose keys also read as attributes (nested dicts too); JSON-ready as it is."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no field {name!r}; the fields are {', '.join(self) or 'none'}") from None


def _wrap(value: Any) -> Any:
    if isinstance(value, Mapping):
        return Fields({k: _wrap(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return [_wrap(v) for v in value]
    return value


@dataclass(frozen=True)
class Result:
    """One prediction (see the module docstring).

    Attributes:
        task: the task name, or ``"generate"`` for a free instruction.
        fields: the task's presentation of the prediction (empty for ``"generate"``).
        score: mean log-probability per token of ``text``.
        text: what the model wrote (location tokens kept).
        prediction: ``task.parse(text, record)``; for ``"generate"`` the text itself.
    """

    task: str
    fields: Fields
    score: float
    text: str
    prediction: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", _wrap(self.fields))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # copy, pickle and dataclasses probe dunders
            raise AttributeError(name)
        return getattr(self.fields, name)

    def to_dict(self) -> dict[str, Any]:
        """The fields, ``score`` and ``text`` as plain JSON-ready data (the server's payload)."""
        return {**self.fields, "score": self.score, "text": self.text}
