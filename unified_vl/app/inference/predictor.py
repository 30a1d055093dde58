"""`Predictor`: the Python inference API over a model folder.

    from unified_vl import Predictor

    predictor = Predictor.from_pretrained("runs/main/model")
    predictor.caption(["cat.jpg"])[0].caption             # "a cat on a sofa"
    predictor.answer(["cat.jpg"], ["what color is the sofa?"])[0].answer
    predictor.locate(["cat.jpg"], ["the cat"])[0].box      # [x1, y1, x2, y2] in pixels of cat.jpg
    predictor.classify(["cat.jpg"], labels=["cat", "dog"], top_k=2)[0].top_k

Every call goes through the evaluation path (DESIGN.md §2): the task module writes the
instruction (``task.prompt(record)``, template 0, the canonical one) and parses the output
(``task.parse``); :func:`unified_vl.generation.generate_texts` decodes with the task's decoding
(``"open"``, ``"loc4"``, ``"candidates"``); so a served answer equals an evaluated one.
Records are built from each image (its width and height) and the call's text.

Interleaved images: an input may come with a list of images and a prompt holding one ``<image>``
placeholder where each goes (Frozen's few-shot prompts, Tsimpoukelli et al. 2021)::

    predictor.generate([[dax, blicket, query]], ["<image> this is a dax. <image> this is a blicket. <image> what is this?"])

The record's width and height are the last image's (the one a question is about). A prompt
without placeholders takes its single image in front, as before.

Inputs are processed ``batch_size`` at a time, images loaded per batch, so a long list never
holds all its images or activations at once. Batched and one-at-a-time results are equal
(padding never reaches a real token; ``tests/test_inference.py`` checks it).

The HTTP server queues :class:`Query` objects and runs many at once with :meth:`Predictor.run`,
which groups queries that can share a forward pass (same decoding, candidates and options),
whatever their tasks.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import tasks
from unified_vl.app.inference.results import Result
from unified_vl.checkpoint import load_pretrained
from unified_vl.generation import generate_texts, score_candidates
from unified_vl.processor import ImageInput, PromptImages, load_image

GENERATE = "generate"  # the pseudo-task of a free instruction (Predictor.generate)
DEFAULT_BATCH_SIZE = 16  # inputs per forward pass; uvl-base at 384 px fits a 16 GB GPU in fp16 with it

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class InputError(ValueError):
    """A request the predictor cannot run: unknown task, missing or wrong-typed field, bad option.

    Attributes:
        param: the offending field or option, when there is one.
    """

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param


def known_tasks() -> list[str]:
    """The task names :meth:`Predictor.predict` accepts: the task registry plus ``"generate"``."""
    return sorted([*tasks.TASKS, GENERATE])


def input_fields(task_name: str) -> list[str]:
    """The request fields of a task: its input fields except the image size, which comes from the image.

    Raises:
        InputError: an unknown task.
    """
    if task_name == GENERATE:
        return ["prompt"]
    task = _get_task(task_name)
    return [name for name, spec in task.fields.items() if spec.role == "input" and name not in ("width", "height")]


def _get_task(name: str):
    if not isinstance(name, str) or name not in tasks.TASKS:
        raise InputError(f"unknown task {name!r}; known tasks: {', '.join(known_tasks())}", param="task")
    return tasks.get_task(name)


def _freeze(value: Any) -> Any:
    """A hashable stand-in for a generation option, so equal options group together."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return value


@dataclass(frozen=True, eq=False)
class Query:
    """One validated input, ready to run: made by :meth:`Predictor.query`.

    Attributes:
        task: a registry task name or ``"generate"``.
        image: the RGB image, resized to the model's input size; a tuple of them for a prompt with
            ``<image>`` placeholders.
        record: the record the task reads (image size and the task's input fields).
        prompt: the instruction, ``task.prompt(record)``.
        decoding: ``"open"``, ``"loc4"``, ``"candidates"`` (constrained to ``candidates``) or
            ``"rank"`` (rank classification over ``label_words``).
        candidates: the candidate texts of ``"candidates"`` decoding.
        label_words: for ``"rank"``: ``(label, its label words)`` pairs.
        top_k: how many ranked labels to return.
        with_score: whether to score the generated text.
        generation: keyword arguments for ``generate_texts`` (``num_beams``, ``max_new_tokens``, ...).
    """

    task: str
    image: Image.Image | tuple[Image.Image, ...]
    record: Mapping[str, Any]
    prompt: str
    decoding: str
    candidates: tuple[str, ...] | None = None
    label_words: tuple[tuple[str, tuple[str, ...]], ...] | None = None
    top_k: int = 1
    with_score: bool = True
    generation: Mapping[str, Any] = field(default_factory=dict)

    def group_key(self) -> tuple:
        """Queries with equal keys run in one forward pass."""
        return (self.decoding, self.candidates, self.label_words, self.with_score, _freeze(dict(self.generation)))


class Predictor:
    """Image + task inputs -> parsed predictions with scores, through the evaluation path.

    Args:
        model: a :class:`~unified_vl.modeling.UnifiedVLForConditionalGeneration` (put in eval mode here).
        processor: its :class:`~unified_vl.processor.UnifiedVLProcessor`.
        batch_size: inputs per forward pass.
        name: the model's name (the HTTP server reports it).
    """

    def __init__(self, model, processor, *, batch_size: int = DEFAULT_BATCH_SIZE, name: str = "unified-vl"):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.model = model.eval()
        self.processor = processor
        self.batch_size = batch_size
        self.name = name

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        adapters: str | os.PathLike | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> Predictor:
        """Loads a model folder (``unified_vl.checkpoint.save_pretrained``).

        Args:
            path: the model folder.
            device: where to run; None picks ``"cuda"`` when available, else ``"cpu"``.
            dtype: ``"float32"``, ``"float16"``, ``"bfloat16"`` or a ``torch.dtype``; None keeps float32.
            adapters: a PEFT adapter folder (``peft``'s ``save_pretrained``) for the language model;
                LoRA-style adapters are merged into the weights, prompt-learning ones stay wrapped.
            batch_size: inputs per forward pass.

        Raises:
            CheckpointError: ``path`` is not a unified-vl model folder.
            ValueError: an unknown dtype.
        """
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(_DTYPES)}")
            dtype = _DTYPES[dtype]
        model, processor = load_pretrained(path, **({"dtype": dtype} if dtype is not None else {}))
        if adapters is not None:
            from peft import PeftModel

            wrapped = PeftModel.from_pretrained(model.language_model, str(adapters))
            prompt_learning = wrapped.peft_config[wrapped.active_adapter].is_prompt_learning
            model.language_model = wrapped if prompt_learning else wrapped.merge_and_unload()
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(model.to(device), processor, batch_size=batch_size, name=Path(path).resolve().name)

    # -- queries ------------------------------------------------------------------------------
    def query(
        self,
        task: str,
        image: PromptImages,
        inputs: Mapping[str, Any] | None = None,
        *,
        candidates: Sequence[str] | None = None,
        labels: Sequence[str] | None = None,
        top_k: int = 1,
        with_score: bool = True,
        **generation_kwargs,
    ) -> Query:
        """Validates one input and builds its :class:`Query`.

        Args:
            task: a task name (``tasks.TASKS``) or ``"generate"``.
            image: a PIL image, a numpy array or a file path; or a list of them for a prompt
                (a task field or ``"prompt"``) with one ``<image>`` placeholder per image.
            inputs: the task's input fields (``{"question": ...}`` for vqa, ``{"prompt": ...}``
                for generate); see :func:`input_fields`.
            candidates: constrain the output to one of these texts.
            labels: rank classification over these labels (tasks with a ``label`` field).
            top_k: how many ranked labels to return (needs ``labels``).
            with_score: compute the result's score (one teacher-forced pass more); without it
                the score is NaN. The chat endpoint, which returns no score, skips it.
            **generation_kwargs: passed to ``generate_texts``.

        Raises:
            InputError: unknown task, unknown/missing/wrong-typed field, an option that does
                not fit the task, or placeholders that do not pair up with the images.
            ImageLoadError: the image cannot be read.
        """
        task_obj = None if task == GENERATE else _get_task(task)
        inputs = _checked_inputs(task, inputs)
        several = not _is_single_image(image)
        originals = (
            [load_image(one, what=f"image {i}") for i, one in enumerate(image)] if several else [load_image(image)]
        )
        size = (originals[-1].width, originals[-1].height) if originals else (0, 0)
        # No image in the record: tasks read only its size, and a queued query should not hold it.
        record = {"id": None, "image": None, "width": size[0], "height": size[1], **inputs}
        prompt = _prompt(task, task_obj, record)
        try:  # the processor's own checks: one placeholder per image, all within max_text_length
            self.processor.tokenize_prompts([prompt], [len(originals)])
        except ValueError as exc:
            raise InputError(str(exc).replace("prompt 0", "the prompt"), param="image") from None
        resized = tuple(self._resize(one) for one in originals)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise InputError(f"top_k must be an integer >= 1, got {top_k!r}", param="top_k")
        if top_k > 1 and labels is None:
            raise InputError("top_k > 1 ranks labels; give labels to rank", param="top_k")
        decoding, candidates, label_words = _decoding(task, task_obj, record, candidates=candidates, labels=labels)
        return Query(
            task=task,
            image=resized if several else resized[0],
            record=record,
            prompt=prompt,
            decoding=decoding,
            candidates=candidates,
            label_words=label_words,
            top_k=top_k,
            with_score=with_score,
            generation=dict(generation_kwargs),
        )

    def _resize(self, image: Image.Image) -> Image.Image:
        # Exactly as the processor resizes (bicubic to S x S, no crop). Pillow's resize to an
        # unchanged size is a copy, so the processor's own resize costs nothing later, and the
        # server resizes in its request threads, off the model thread.
        size = self.processor.image_size
        return image.resize((size, size), Image.Resampling.BICUBIC)

    # -- running ------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, queries: Sequence[Query]) -> list[Result | Exception]:
        """Runs queries, grouping those that can share a forward pass.

        Returns:
            One result per query, in order; an exception object for a query whose group failed.
        """
        out: list[Any] = [None] * len(queries)
        groups: dict[tuple, list[int]] = {}
        for i, query in enumerate(queries):
            groups.setdefault(query.group_key(), []).append(i)
        for indices in groups.values():
            group = [queries[i] for i in indices]
            try:
                results = self._run_group(group)
            except Exception as exc:
                results = [exc] * len(group)
            for i, result in zip(indices, results, strict=True):
                out[i] = result
        return out

    def _run_group(self, group: Sequence[Query]) -> list[Result]:
        first = group[0]
        images = [q.image for q in group]
        prompts = [q.prompt for q in group]
        if first.decoding == "rank":
            words = [w for _, ws in first.label_words for w in ws]
            scores = score_candidates(self.model, self.processor, images, prompts, words, batch_size=self.batch_size)
            return [_ranked(q, row.tolist(), words) for q, row in zip(group, scores, strict=True)]
        texts = generate_texts(
            self.model,
            self.processor,
            images,
            prompts,
            decoding=first.decoding,
            candidates=list(first.candidates) if first.decoding == "candidates" else None,
            batch_size=self.batch_size,
            **first.generation,
        )
        if first.with_score:
            # The score of each text: the same teacher-forced log-likelihood rank classification uses.
            scores = score_candidates(
                self.model, self.processor, images, prompts, [[t] for t in texts], batch_size=self.batch_size
            )[:, 0].tolist()
        else:
            scores = [math.nan] * len(texts)
        return [_result(q, text, score) for q, text, score in zip(group, texts, scores, strict=True)]

    def predict(
        self,
        task: str,
        images: Sequence[ImageInput] | ImageInput,
        inputs: Sequence[Mapping[str, Any]] | Mapping[str, Any] | None = None,
        *,
        candidates: Sequence[str] | None = None,
        labels: Sequence[str] | None = None,
        top_k: int = 1,
        **generation_kwargs,
    ) -> list[Any]:
        """Any task: one result per input, ``batch_size`` inputs at a time.

        Args:
            task: a task name or ``"generate"``.
            images: one entry per input, an image or a list of images for a prompt with ``<image>``
                placeholders (or one image, broadcast over ``inputs``).
            inputs: per image, the task's input fields (or one dict shared by all images).
            candidates: constrain outputs to these texts.
            labels: rank classification over these labels.
            top_k: ranked labels to return.
            **generation_kwargs: passed to ``generate_texts``.

        Returns:
            A :class:`~unified_vl.app.inference.results.Result` per image.

        Raises:
            InputError: a bad task, field or option (the message names it).
            ImageLoadError: an unreadable image.
        """
        images, inputs = _broadcast(images, inputs)
        out: list[Any] = []
        for start in range(0, len(images), self.batch_size):
            stop = start + self.batch_size
            queries = [
                self.query(task, image, fields, candidates=candidates, labels=labels, top_k=top_k, **generation_kwargs)
                for image, fields in zip(images[start:stop], inputs[start:stop], strict=True)
            ]
            for result in self.run(queries):
                if isinstance(result, Exception):
                    raise result
                out.append(result)
        return out

    # -- one method per task ------------------------------------------------------------------
    def caption(self, images: Sequence[ImageInput] | ImageInput, **generation_kwargs) -> list[Result]:
        """A caption per image (task ``captioning``)."""
        return self.predict("captioning", images, None, **generation_kwargs)

    def answer(
        self,
        images: Sequence[ImageInput] | ImageInput,
        questions: Sequence[str] | str,
        *,
        candidates: Sequence[str] | None = None,
        **generation_kwargs,
    ) -> list[Result]:
        """Answers a question per image (task ``vqa``); one image or one question broadcasts.

        Args:
            images: the images.
            questions: one question per image.
            candidates: restrict answers to these texts (OFA's answer-constrained decoding).
            **generation_kwargs: passed to ``generate_texts``.
        """
        return self.predict("vqa", images, _each("question", questions), candidates=candidates, **generation_kwargs)

    def locate(
        self, images: Sequence[ImageInput] | ImageInput, expressions: Sequence[str] | str, **generation_kwargs
    ) -> list[Result]:
        """The box each expression refers to, in pixels of its original image (task ``rec``)."""
        return self.predict("rec", images, _each("expression", expressions), **generation_kwargs)

    def ground(
        self, images: Sequence[ImageInput] | ImageInput, captions: Sequence[str] | str, **generation_kwargs
    ) -> list[Result]:
        """The phrases of each caption with their boxes (task ``grounding``)."""
        return self.predict("grounding", images, _each("caption", captions), **generation_kwargs)

    def classify(
        self,
        images: Sequence[ImageInput] | ImageInput,
        *,
        labels: Sequence[str] | None = None,
        top_k: int = 1,
        **generation_kwargs,
    ) -> list[Result]:
        """The main object of each image (task ``classification``).

        Args:
            images: the images.
            labels: rank classification over these labels (each scored through its label words,
                the task's verbalizer); None lets the model write the label.
            top_k: how many labels to rank (needs ``labels``).
            **generation_kwargs: passed to ``generate_texts`` (open generation only).
        """
        return self.predict("classification", images, None, labels=labels, top_k=top_k, **generation_kwargs)

    def detect(self, images: Sequence[ImageInput] | ImageInput, **generation_kwargs) -> list[Result]:
        """The objects of each image with their boxes (task ``detection``)."""
        return self.predict("detection", images, None, **generation_kwargs)

    def generate(
        self, images: Sequence[PromptImages] | ImageInput, prompts: Sequence[str] | str, **generation_kwargs
    ) -> list[Result]:
        """Text for a free instruction per input (no task template, no parsing).

        Args:
            images: one entry per prompt: an image, or a list of images, one per ``<image>`` placeholder
                of the prompt, in order (interleaved, e.g. few-shot examples before a question).
            prompts: the instructions, used as written.
            **generation_kwargs: passed to ``generate_texts`` (``num_beams``, ``max_new_tokens``, ...).
        """
        return self.predict(GENERATE, images, _each("prompt", prompts), **generation_kwargs)


# -- helpers -------------------------------------------------------------------------------------
def _is_single_image(value: Any) -> bool:
    return isinstance(value, (Image.Image, np.ndarray, str, os.PathLike))


def _each(name: str, texts: Sequence[str] | str) -> list[dict[str, Any]] | dict[str, Any]:
    if isinstance(texts, str):
        return {name: texts}
    if not isinstance(texts, Sequence):
        raise InputError(f"{name}: expected a string or a list of strings, got {type(texts).__name__}", param=name)
    return [{name: t} for t in texts]


def _broadcast(images, inputs) -> tuple[list, list[dict[str, Any]]]:
    """Lists of equal length; a single image or a single inputs dict is repeated."""
    images = [images] if _is_single_image(images) else list(images)
    if inputs is None or isinstance(inputs, Mapping):
        return images, [dict(inputs or {})] * len(images)
    inputs = list(inputs)
    if len(images) == 1 and len(inputs) != 1:
        images = images * len(inputs)
    if len(images) != len(inputs):
        raise InputError(
            f"got {len(images)} images but {len(inputs)} texts; give one text per image (or one of either)"
        )
    return images, inputs


def _text_list(values: Any, name: str) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Sequence) or not values:
        raise InputError(f"{name} must be a non-empty list of strings, got {values!r:.80}", param=name)
    for i, value in enumerate(values):
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"{name}[{i}] must be a non-empty string, got {value!r:.80}", param=name)
    return list(values)


def _field_named_in(message: str, names: Sequence[str]) -> str | None:
    # RecordError messages name the field as 'field'; report it as the error's param.
    return next((n for n in names if f"'{n}'" in message), None)


def _checked_inputs(task: str, inputs: Mapping[str, Any] | None) -> dict[str, Any]:
    inputs = dict(inputs or {})
    allowed = input_fields(task)
    for name in inputs:
        if name not in allowed:
            raise InputError(
                f"{task}: unknown field {name!r}; the fields of {task!r} are {', '.join(allowed) or 'none'}", param=name
            )
    return inputs


def _prompt(task: str, task_obj, record: Mapping[str, Any]) -> str:
    """The instruction: the task's canonical template, or a free instruction used as written."""
    if task_obj is None:
        prompt = record.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"generate: field 'prompt' must be a non-empty string, got {prompt!r}", param="prompt")
        return prompt
    try:
        return task_obj.prompt(record)
    except tasks.RecordError as exc:
        raise InputError(str(exc), param=_field_named_in(str(exc), input_fields(task))) from None


def _decoding(task: str, task_obj, record: Mapping[str, Any], *, candidates, labels):
    """``(decoding, candidates, label_words)``: the task's decoding, or the one the options ask for."""
    decoding = task_obj.decoding if task_obj is not None else "open"
    if labels is not None:
        if task_obj is None or "label" not in task_obj.fields:
            raise InputError(
                f"{task}: labels only apply to tasks with a 'label' field (classification)", param="labels"
            )
        if candidates is not None:
            raise InputError("give labels or candidates, not both", param="candidates")
        return "rank", None, _label_words(task_obj, _text_list(labels, "labels"), record)
    if candidates is not None:
        if decoding == "loc4":
            raise InputError(f"{task}: candidates do not apply to a task that writes a box", param="candidates")
        return "candidates", tuple(_text_list(candidates, "candidates")), None
    if decoding == "candidates":
        # Candidates that do not depend on labels (itm: "no"/"yes"); otherwise write freely.
        fixed = task_obj.candidates([])
        return ("candidates", tuple(fixed), None) if fixed else ("open", None, None)
    return decoding, None, None


def _label_words(task, labels: list[str], record: Mapping[str, Any]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    # The task's verbalizer turns each label into its label word(s) (answer engineering, PET).
    out = []
    for i, label in enumerate(labels):
        label_record = {"id": f"label {i}", "image": None, "width": record["width"], "height": record["height"]}
        try:
            words = task.candidates([{**label_record, "label": label}])
        except tasks.RecordError as exc:
            raise InputError(str(exc), param="labels") from None
        out.append((label, tuple(words)))
    return tuple(out)


def _ranked(query: Query, scores: list[float], words: list[str]) -> Result:
    by_word = dict(zip(words, scores, strict=True))
    # A label with several words scores as its best word (PET's many-to-one verbalizer).
    label_scores = [(label, max(by_word[w] for w in ws)) for label, ws in query.label_words]
    ranking = sorted(label_scores, key=lambda item: -item[1])  # stable: ties keep the given order
    best_label, best_score = ranking[0]
    best_word = max(dict(query.label_words)[best_label], key=lambda w: by_word[w])
    top = [{"label": label, "score": score} for label, score in ranking[: query.top_k]]
    fields = {"label": best_label, "top_k": top}
    return Result(task=query.task, fields=fields, score=best_score, text=best_word, prediction=best_label)


def _result(query: Query, text: str, score: float) -> Result:
    if query.task == GENERATE:
        return Result(task=GENERATE, fields={}, score=score, text=text, prediction=text)
    task = tasks.get_task(query.task)
    parsed = task.parse(text, query.record)
    return Result(task=query.task, fields=task.presentation(parsed, score), score=score, text=text, prediction=parsed)
