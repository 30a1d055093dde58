"""Methods: the ways to adapt a pretrained model (DESIGN.md §8), one module each, registered by name.

    unified-vl finetune --task rec --method cpt --shots 8 ...       # `--method` chooses; `full` is the default
    unified-vl eval --model MODEL --data DIR --task rec --method cpt

A module of this package that defines ``METHOD`` (a `Method`) is registered under ``METHOD.name``
(= the module's name, like tasks). A method says, in one place:

* what it adds to the model and what it freezes: ``attach(model, options)``, called on the freshly
  built (or loaded) model before training; None adds and freezes nothing (full fine-tuning);
* how a record becomes the model's input: ``make_example(task, record, rng, options)`` -> an
  `Example`; None: the task's own templates and target (``tasks``);
* how the answer is read back: ``generate(model, processor, task, records, options, ...)`` -> one
  text per record, which the task parses and scores as if the model had written it; None: the
  task's own decoding (``generate_texts``). A method that reads answers its own way may also offer
  ``predict`` (the same, as `Answer` objects with a score and details for users: the `Predictor`
  and the server use it) and ``check(task, record, options)`` (refuses a record it cannot answer
  before it joins a batch, so that one bad request does not fail the others);
* what a run saves: ``saves_adapter``: the parameters ``attach`` left trainable (the method's own)
  as an adapter file naming its base model (``unified_vl.adapters``), instead of the whole model
  folder; ``add_adapter(model, name, options, weights)`` loads one more trained adapter into a model
  that may hold others of the method, so that the rows of one batch can each use their own
  (``model.rows``; LoRA). Without it, each adapter is served from its own view of the base model.

The learned methods (prompt tuning / CoOp, CoCoOp, VPT, prefix tuning, LoRA) save adapters;
``full`` and the methods that only change inputs (``cpt``) save the model folder.

Everything else — the trainer, evaluation, export, the predictor, the server — is method-agnostic:
it calls these hooks and never branches on a method's name. ``options`` are the method's settings
(``method.options.KEY=VALUE`` in a run config); `Method.resolve_options` checks them against the
defaults the method declares.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


class MethodError(ValueError):
    """An unknown method, a bad option, or a record the method cannot answer; the message says which."""


@dataclass(frozen=True)
class Answer:
    """One answer a method read its own way (``Method.predict``).

    Attributes:
        text: what the task parses, as if the model had written it.
        score: the method's confidence (a log-likelihood; NaN when it has none).
        details: what users may want besides the task's prediction (JSON-ready values).
    """

    text: str
    score: float = float("nan")
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Method:
    """One way to adapt a model; see the module docstring for the hooks.

    Attributes:
        name: the method's name (= its module's name).
        description: one line for ``--help`` and the docs.
        options: option name -> default value; a given value must have the default's type
            (an int is accepted for a float option).
        attach: ``attach(model, options)``: add the method's parameters, freeze the rest.
        make_example: ``make_example(task_name, record, rng, options) -> Example``.
        generate: ``generate(model, processor, task_name, records, options, *, batch_size, num_beams) -> texts``.
        saves_adapter: a run exports an adapter file of the method's own (trainable) parameters.
        add_adapter: ``add_adapter(model, name, options, weights)``: load a trained adapter under
            ``name`` next to others in one model (rows of a batch pick theirs by name).
        predict: ``predict(model, processor, task_name, records, options, *, batch_size) -> [Answer]``.
        check: ``check(task_name, record, options)``: raises `MethodError` for a record the method
            cannot answer (the message names the record).
    """

    name: str
    description: str
    options: Mapping[str, Any] = field(default_factory=dict)
    attach: Callable[[Any, Mapping[str, Any]], None] | None = None
    make_example: Callable[..., Any] | None = None
    generate: Callable[..., list[str]] | None = None
    saves_adapter: bool = False
    add_adapter: Callable[..., None] | None = None
    predict: Callable[..., list[Answer]] | None = None
    check: Callable[[str, Mapping[str, Any], Mapping[str, Any]], None] | None = None

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"method name must be a Python identifier (it is a module name), got {self.name!r}")
        if self.saves_adapter and self.attach is None:
            raise ValueError(f"method {self.name!r} saves an adapter: it needs attach() to add its parameters")
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    def resolve_options(self, given: Mapping[str, Any] | None) -> dict[str, Any]:
        """The defaults updated with ``given``, each checked against its default's type.

        Raises:
            MethodError: an unknown option or a value of the wrong type (the message lists the options).
        """
        resolved = dict(self.options)
        for key, value in (given or {}).items():
            if key not in self.options:
                allowed = ", ".join(f"{k} (default {v!r})" for k, v in self.options.items()) or "none"
                raise MethodError(f"method {self.name!r} has no option {key!r}; its options: {allowed}")
            default = self.options[key]
            if default is not None and not _fits(value, default):
                raise MethodError(
                    f"method {self.name!r} option {key!r} must be {type(default).__name__} (like its default "
                    f"{default!r}), got {type(value).__name__} {value!r}"
                )
            resolved[key] = float(value) if isinstance(default, float) and isinstance(value, int) else value
        return resolved


def _fits(value: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


METHODS: dict[str, Method] = {}
"""name -> Method, every method known to this process."""


def register(method: Method, *, replace: bool = False) -> Method:
    """Adds ``method`` to `METHODS`; another method of the same name is an error unless ``replace``."""
    if not isinstance(method, Method):
        raise TypeError(f"register expects a unified_vl.prompting.Method, got {type(method).__name__}")
    current = METHODS.get(method.name)
    if current is not None and current is not method and not replace:
        raise ValueError(f"a method named {method.name!r} is already registered; pass replace=True to replace it")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method ``name``.

    Raises:
        MethodError: unknown name; the message lists the known ones with their descriptions.
    """
    try:
        return METHODS[name]
    except KeyError:
        known = "; ".join(f"{n}: {m.description}" for n, m in sorted(METHODS.items()))
        raise MethodError(f"unknown method {name!r}; known methods: {known}") from None


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        method = getattr(module, "METHOD", None)
        if isinstance(method, Method):
            if method.name != info.name:
                raise ValueError(
                    f"{module.__name__} defines METHOD named {method.name!r}; it must equal the module name"
                )
            register(method)


_discover()
