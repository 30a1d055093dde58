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

Adapters (``unified_vl.adapters``): ``Predictor.from_pretrained(base, adapters={"name": path})``
serves the base model and each adapter; every call takes ``adapter="name"`` (None: the base). One
batch may mix adapters: LoRA rows (and base rows) share a forward pass with each row's adapter
named, prompt-method rows run as one group per adapter; each row's answer is the one its adapter
gives alone.

A method that reads answers its own way (``unified_vl.prompting``; ``method="cpt"`` paints
candidate boxes and scores colour words) answers through its ``predict`` hook, the same one
evaluation uses (``generate``), so that a served answer still equals an evaluated one:
``predictor.locate(images, expressions, method="cpt", candidates=boxes)``.
"""

from __future__ import annotations

import logging
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
from unified_vl.adapters import AdapterSet
from unified_vl.app.inference.results import Result
from unified_vl.checkpoint import load_pretrained
from unified_vl.generation import CandidateTrie, generate_texts, score_candidates
from unified_vl.processor import ImageInput, PromptImages, load_image
from unified_vl.prompting import Answer, MethodError, get_method

logger = logging.getLogger(__name__)

GENERATE = "generate"  # the pseudo-task of a free instruction (Predictor.generate)
DEFAULT_BATCH_SIZE = 16  # inputs per forward pass; uvl-base at 384 px fits a 16 GB GPU in fp16 with it

_LOC4_TOKENS = 5  # "loc4" decoding writes four <loc_*> and eos (LocationOnlyLogitsProcessor's default)
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
        adapter: the adapter that answers (None: the base model).
        method: the method that reads the answer its own way (``unified_vl.prompting``), or None.
        method_options: its resolved options.
    """

    task: str
    image: Image.Image | tuple[Image.Image, ...]
    record: Mapping[str, Any]
    prompt: str
    decoding: str
    candidates: tuple[str, ...] | None = None
    label_words: tuple[tuple[str, tuple[str, ...]], ...] | None = None
    source: str | None = None  # decoding "phrases": the caption the phrases are copied from (not a group key)
    top_k: int = 1
    with_score: bool = True
    generation: Mapping[str, Any] = field(default_factory=dict)
    prompt_tokens: int = 0  # tokens of the prompt the encoder reads, after truncation to max_text_length
    adapter: str | None = None
    method: str | None = None
    method_options: Mapping[str, Any] = field(default_factory=dict)

    def group_key(self) -> tuple:
        """Queries with equal keys run in one forward pass (per model: see ``AdapterSet.plan``)."""
        key = (self.decoding, self.candidates, self.label_words, self.with_score, _freeze(dict(self.generation)))
        return (*key, self.method, _freeze(dict(self.method_options)))


class Predictor:
    """Image + task inputs -> parsed predictions with scores, through the evaluation path.

    Args:
        model: a :class:`~unified_vl.modeling.UnifiedVLForConditionalGeneration` (put in eval mode here).
        processor: its :class:`~unified_vl.processor.UnifiedVLProcessor`.
        batch_size: inputs per forward pass.
        name: the model's name (the HTTP server reports it).
        adapters: the adapters served besides the base (an ``AdapterSet`` over ``model``).
    """

    def __init__(
        self,
        model,
        processor,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        name: str = "unified-vl",
        adapters: AdapterSet | None = None,
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if adapters is not None and adapters.base is not model:
            raise ValueError("adapters must be an AdapterSet over this predictor's model")
        self.model = model.eval()
        self.processor = processor
        self.batch_size = batch_size
        self.name = name
        self.adapters = adapters

    @property
    def adapter_names(self) -> list[str]:
        """The names of the adapters served besides the base, in the order they were loaded."""
        return list(self.adapters.adapters) if self.adapters is not None else []

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        adapters: Mapping[str, str | os.PathLike] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> Predictor:
        """Loads a model folder (``unified_vl.checkpoint.save_pretrained``) and adapters trained on it.

        Args:
            path: the model folder.
            device: where to run; None picks ``"cuda"`` when available, else ``"cpu"``.
            dtype: ``"float32"``, ``"float16"``, ``"bfloat16"`` or a ``torch.dtype``; None keeps float32.
            adapters: name -> adapter folder (a run's ``adapter/``, ``unified_vl.adapters``); calls
                pick one with ``adapter="name"``.
            batch_size: inputs per forward pass.

        Raises:
            CheckpointError: ``path`` is not a unified-vl model folder.
            AdapterError: an adapter folder that cannot be read, or one trained on another base
                model (the message names both).
            ValueError: an unknown dtype, or a bad adapter name.
        """
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(_DTYPES)}")
            dtype = _DTYPES[dtype]
        model, processor = load_pretrained(path, **({"dtype": dtype} if dtype is not None else {}))
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        model = model.to(device).eval()
        adapter_set = None
        if adapters:
            if not isinstance(adapters, Mapping):
                raise ValueError(f"adapters must map names to adapter folders, got {type(adapters).__name__}")
            adapter_set = AdapterSet(model, path)
            for name, adapter_path in adapters.items():
                adapter_set.add(name, adapter_path)
        name = Path(path).resolve().name
        return cls(model, processor, batch_size=batch_size, name=name, adapters=adapter_set)

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
        adapter: str | None = None,
        method: str | None = None,
        method_options: Mapping[str, Any] | None = None,
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
            adapter: the adapter that answers (``from_pretrained(adapters=...)``); None: the base.
            method: a method that reads answers its own way (``"cpt"``); None or one without
                such hooks (``"full"``): the task's decoding.
            method_options: the method's options (``Method.resolve_options``).
            **generation_kwargs: passed to ``generate_texts``.

        Raises:
            InputError: unknown task, unknown/missing/wrong-typed field, an unknown adapter, an
                option that does not fit the task, an input the method cannot answer, or
                placeholders that do not pair up with the images.
            ImageLoadError: the image cannot be read.
        """
        self.check_adapter(adapter)
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
        # Everything a batch would do with this query's text is tried here, on this query alone, so
        # that a text the tokenizer refuses fails this query and never the batch it would join.
        for name, value in inputs.items():
            _check_unicode(value, name)
        prompt_ids = self._tokenize([prompt], "the prompt", _text_param(inputs))[0]
        self._check_outputs(decoding, candidates, label_words, generation_kwargs)
        reader, options = _method(method, method_options, task, record, candidates=candidates, labels=labels)
        if reader is not None:
            record = _method_record(reader, record, originals, adapter)
        return Query(
            task=task,
            image=resized if several else resized[0],
            record=record,
            prompt=prompt,
            decoding=decoding,
            candidates=candidates,
            label_words=label_words,
            source=task_obj.source(record) if decoding == "phrases" else None,
            top_k=top_k,
            with_score=with_score,
            generation=dict(generation_kwargs),
            prompt_tokens=min(len(prompt_ids), self.processor.max_text_length),
            adapter=adapter,
            method=reader,
            method_options=options,
        )

    def check_adapter(self, adapter: str | None) -> None:
        """Raises `InputError` (param ``adapter``) unless ``adapter`` is None or a served adapter's name."""
        if adapter is None or adapter in self.adapter_names:
            return
        served = ", ".join(self.adapter_names) or "none"
        raise InputError(
            f"unknown adapter {adapter!r:.60}; this model ({self.name}) serves the adapters: {served}", param="adapter"
        )

    def _check_outputs(self, decoding: str, candidates, label_words, generation: Mapping[str, Any]) -> None:
        """The outputs a query asks for can be written: candidates and label words tokenize, fit the
        model's target length and the query's ``max_new_tokens`` (checked here, not in its batch)."""
        longest = self.processor.max_target_length  # the longest target the model was trained to write
        needed = _LOC4_TOKENS if decoding == "loc4" else None
        if candidates is not None:
            self._tokenize(list(candidates), "candidates", "candidates")
            try:
                needed = CandidateTrie.from_texts(self.processor.tokenizer, list(candidates)).max_length
            except (TypeError, ValueError) as exc:  # e.g. a candidate holding the end-of-sequence token
                raise InputError(f"candidates: {exc}", param="candidates") from None
            if needed > longest:
                raise InputError(
                    f"candidates: the longest is {needed} tokens; the model writes at most {longest}",
                    param="candidates",
                )
        if label_words is not None:
            ids = self._tokenize([w for _, words in label_words for w in words], "labels", "labels")
            if max(len(x) for x in ids) > longest:
                raise InputError(f"labels: a label is longer than the model's {longest} target tokens", param="labels")
        requested = generation.get("max_new_tokens")
        if needed is not None and requested is not None and requested < needed:
            raise InputError(
                f"max_new_tokens={requested} cannot complete this output, which needs {needed} tokens",
                param="max_new_tokens",
            )

    def _tokenize(self, texts: list[str], what: str, param: str | None) -> list[list[int]]:
        for i, text in enumerate(texts):
            _check_unicode(text, param or what, index=i if len(texts) > 1 else None)
        try:
            return self.processor.tokenizer(texts)["input_ids"]
        except Exception as exc:  # any tokenizer failure is this input's, reported as such
            raise InputError(f"{what} cannot be tokenized: {type(exc).__name__}: {exc}", param=param) from None

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
            except Exception:
                # One query must never fail another: run the group's queries one at a time, so that
                # a query that fails alone gets its error and every other one its own answer (the
                # same answer as in a batch: padding never changes a prediction).
                logger.exception("a batch of %d queries failed; running them one at a time", len(group))
                results = [self._run_alone(query) for query in group]
            for i, result in zip(indices, results, strict=True):
                out[i] = result
        return out

    def _run_alone(self, query: Query) -> Result | Exception:
        try:
            return self._run_group([query])[0]
        except Exception as exc:
            return exc

    def _run_group(self, group: Sequence[Query]) -> list[Result]:
        """One forward pass per model the group's adapters need (one, without adapters)."""
        if self.adapters is None:
            return self._run_on(self.model, group, None)
        out: list[Any] = [None] * len(group)
        for model, rows, names in self.adapters.plan([q.adapter for q in group]):
            for i, result in zip(rows, self._run_on(model, [group[i] for i in rows], names), strict=True):
                out[i] = result
        return out

    def _run_on(self, model, group: Sequence[Query], adapter_names: list[str] | None) -> list[Result]:
        first = group[0]
        if first.method is not None:
            return self._run_method(model, group)
        images = [q.image for q in group]
        prompts = [q.prompt for q in group]
        common = {"batch_size": self.batch_size, "adapter_names": adapter_names}
        if first.decoding == "rank":
            words = [w for _, ws in first.label_words for w in ws]
            scores = score_candidates(model, self.processor, images, prompts, words, **common)
            return [_ranked(q, row.tolist(), words) for q, row in zip(group, scores, strict=True)]
        # The score comes from the generation pass itself (one encoder pass per image, no second
        # teacher-forced pass): the same mean token log-probability score_candidates gives (tested).
        out = generate_texts(
            model,
            self.processor,
            images,
            prompts,
            decoding=first.decoding,
            candidates=list(first.candidates) if first.decoding == "candidates" else None,
            sources=[q.source for q in group] if first.decoding == "phrases" else None,
            return_scores=first.with_score,
            **common,
            **first.generation,
        )
        texts, scores = out if first.with_score else (out, [math.nan] * len(out))
        return [_result(q, text, score) for q, text, score in zip(group, texts, scores, strict=True)]

    def _run_method(self, model, group: Sequence[Query]) -> list[Result]:
        """Answers read by the queries' method: its ``predict`` (with scores), else its ``generate``."""
        first = group[0]
        method = get_method(first.method)
        records = [dict(q.record) for q in group]
        options = dict(first.method_options)
        if method.predict is not None:
            answers = method.predict(model, self.processor, first.task, records, options, batch_size=self.batch_size)
        else:
            num_beams = first.generation.get("num_beams", 1)
            texts = method.generate(
                model,
                self.processor,
                first.task,
                records,
                options,
                batch_size=self.batch_size,
                num_beams=num_beams,
            )
            answers = [Answer(text) for text in texts]
        return [_result(q, a.text, a.score, details=a.details) for q, a in zip(group, answers, strict=True)]

    def predict(
        self,
        task: str,
        images: Sequence[ImageInput] | ImageInput,
        inputs: Sequence[Mapping[str, Any]] | Mapping[str, Any] | None = None,
        *,
        candidates: Sequence[str] | None = None,
        labels: Sequence[str] | None = None,
        top_k: int = 1,
        adapter: str | None = None,
        method: str | None = None,
        method_options: Mapping[str, Any] | None = None,
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
            adapter: the adapter that answers (None: the base model).
            method: a method that reads answers its own way (``"cpt"``); see :meth:`query`.
            method_options: its options.
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
                self.query(
                    task,
                    image,
                    fields,
                    candidates=candidates,
                    labels=labels,
                    top_k=top_k,
                    adapter=adapter,
                    method=method,
                    method_options=method_options,
                    **generation_kwargs,
                )
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
        self,
        images: Sequence[ImageInput] | ImageInput,
        expressions: Sequence[str] | str,
        *,
        method: str | None = None,
        candidates: Sequence | None = None,
        method_options: Mapping[str, Any] | None = None,
        **generation_kwargs,
    ) -> list[Result]:
        """The box each expression refers to, in pixels of its original image (task ``rec``).

        Args:
            images: the images.
            expressions: one referring expression per image.
            method: None writes the box in location tokens; ``"cpt"`` chooses among ``candidates``
                by colour prompts (the result adds ``candidate``, ``color`` and ``painted_copy``).
            candidates: candidate boxes ``[x1, y1, x2, y2]`` in pixels: one list shared by every
                image, or one list per image (the rec field ``candidate_boxes``).
            method_options: the method's options (``{"templates": ["sentinel", "instruction"]}``).
            **generation_kwargs: passed to ``generate_texts`` (no method only).
        """
        inputs = _each("expression", expressions)
        if candidates is not None:
            if method is None:
                raise InputError(
                    "rec: candidates do not apply to a task that writes a box, unless a method chooses among "
                    "candidate boxes (method='cpt', candidates=[[x1, y1, x2, y2], ...])",
                    param="candidates",
                )
            inputs = _with_candidate_boxes(inputs, candidates)
        return self.predict("rec", images, inputs, method=method, method_options=method_options, **generation_kwargs)

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


def _check_unicode(value: Any, name: str, *, index: int | None = None) -> None:
    """Text fields must be Unicode text: JSON can carry a lone surrogate ("\\ud800"), which no tokenizer takes."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            where = name if index is None else f"{name}[{index}]"
            raise InputError(
                f"{where} is not valid Unicode text ({exc.reason} at position {exc.start})", param=name
            ) from None


def _text_param(inputs: Mapping[str, Any]) -> str | None:
    """The field a prompt's tokenization error is reported on: the request's only text field, if one."""
    texts = [name for name, value in inputs.items() if isinstance(value, str)]
    return texts[0] if len(texts) == 1 else None


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


def _result(query: Query, text: str, score: float, *, details: Mapping[str, Any] | None = None) -> Result:
    if query.task == GENERATE:
        return Result(task=GENERATE, fields={}, score=score, text=text, prediction=text)
    task = tasks.get_task(query.task)
    parsed = task.parse(text, query.record)
    fields = {**task.presentation(parsed, score), **(details or {})}
    return Result(task=query.task, fields=fields, score=score, text=text, prediction=parsed)


def _method(name, options, task: str, record: Mapping[str, Any], *, candidates, labels):
    """``(method name, resolved options)`` of a query whose method reads answers, else ``(None, {})``.

    Raises:
        InputError: an unknown method or option, options it cannot combine with, or a record the
            method refuses (its ``check``), so that the query fails alone before it joins a batch.
    """
    if name is None:
        if options:
            raise InputError("method_options need a method", param="method_options")
        return None, {}
    if not isinstance(name, str):
        raise InputError(f"method must be a method's name, got {type(name).__name__}", param="method")
    try:
        method = get_method(name)
    except MethodError as exc:
        raise InputError(str(exc), param="method") from None
    try:
        resolved = method.resolve_options(options)
    except MethodError as exc:
        raise InputError(str(exc), param="method_options") from None
    if method.predict is None and method.generate is None:
        return None, {}  # the task's own decoding (full fine-tuning's way)
    if candidates is not None or labels is not None:
        raise InputError(f"method {name!r} reads answers its own way; drop candidates and labels", param="method")
    if method.check is not None:
        try:
            method.check(task, record, resolved)
        except MethodError as exc:
            raise InputError(str(exc), param=_field_named_in(str(exc), input_fields(task)) or "method") from None
    return method.name, resolved


def _method_record(reader: str, record: dict[str, Any], originals: list, adapter: str | None) -> dict[str, Any]:
    """The record a reading method answers: with its one original image (CPT paints boxes given in its pixels).

    Raises:
        InputError: an adapter (a method's hooks run the model as it is, without per-row adapters),
            or other than one image.
    """
    if adapter is not None:
        raise InputError(
            f"method {reader!r} reads answers with the base model; it does not combine with an adapter",
            param="method",
        )
    if len(originals) != 1:
        raise InputError(f"method {reader!r} reads one image per prompt, got {len(originals)}", param="image")
    return {**record, "image": originals[0]}


def _with_candidate_boxes(inputs, candidates: Sequence) -> list[dict[str, Any]] | dict[str, Any]:
    """Adds ``candidate_boxes`` to each input: one shared list of boxes, or one list per image."""
    shared = isinstance(candidates, Sequence) and (
        not candidates
        or (isinstance(candidates[0], Sequence) and _is_number(candidates[0][0] if candidates[0] else None))
    )
    if isinstance(inputs, Mapping):
        if shared:
            return {**inputs, "candidate_boxes": list(candidates)}
        inputs = [dict(inputs)] * len(candidates)
    per_image = [list(candidates)] * len(inputs) if shared else list(candidates)
    if len(per_image) != len(inputs):
        raise InputError(
            f"candidates: got {len(per_image)} lists of boxes for {len(inputs)} inputs; give one list per image "
            "or one list for all",
            param="candidates",
        )
    return [{**fields, "candidate_boxes": list(boxes)} for fields, boxes in zip(inputs, per_image, strict=True)]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
