"""`generate_texts`: the one entry point that evaluation and serving call to generate text.

It batches, preprocesses, applies the decoding a task asks for (``task.decoding``: ``"open"``,
``"loc4"``, ``"candidates"`` or ``"phrases"``, through :mod:`unified_vl.generation.constraints`) and
returns text.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessorList

from unified_vl.generation.constraints import (
    LocationOnlyLogitsProcessor,
    PhraseSpanLogitsProcessor,
    candidate_rows,
    row_tries,
    trie_prefix_fn,
)

DECODINGS = ("open", "loc4", "candidates", "phrases")


def _check_arguments(
    images, prompts, decoding: str, candidates, sources, batch_size: int, generation_kwargs: dict
) -> None:
    if decoding not in DECODINGS:
        raise ValueError(f"unknown decoding {decoding!r}; expected one of {', '.join(map(repr, DECODINGS))}")
    if decoding == "candidates" and candidates is None:
        raise ValueError("decoding='candidates' needs candidates (a list of texts, or one list per input)")
    if decoding != "candidates" and candidates is not None:
        raise ValueError(f"candidates are only used with decoding='candidates', not decoding={decoding!r}")
    if decoding == "phrases" and (sources is None or len(sources) != len(prompts)):
        got = "none" if sources is None else len(sources)
        raise ValueError(f"decoding='phrases' needs one source text (or None) per prompt: {len(prompts)}, got {got}")
    if decoding != "phrases" and sources is not None:
        raise ValueError(f"sources are only used with decoding='phrases', not decoding={decoding!r}")
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; give one prompt per image")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if generation_kwargs.get("num_return_sequences", 1) != 1:
        raise ValueError("generate_texts returns one text per input; num_return_sequences must be 1")
    if decoding == "candidates" and "prefix_allowed_tokens_fn" in generation_kwargs:
        raise ValueError("decoding='candidates' sets prefix_allowed_tokens_fn itself; do not pass one")


def generate_texts(
    model,
    processor,
    images: Sequence,
    prompts: Sequence[str],
    *,
    decoding: str = "open",
    candidates: Sequence[str] | Sequence[Sequence[str]] | None = None,
    sources: Sequence[str | None] | None = None,
    num_beams: int = 1,
    max_new_tokens: int | None = None,
    batch_size: int = 32,
    return_scores: bool = False,
    adapter_names: Sequence[str] | None = None,
    **generation_kwargs,
) -> list[str] | tuple[list[str], list[float]]:
    """Generates one text per (image, prompt), optionally constrained; what evaluation and serving call.

    Outputs do not depend on how inputs are batched (padding never reaches a real token). The
    model's mode is left as it is: call ``model.eval()`` first.

    Args:
        model: a :class:`~unified_vl.modeling.UnifiedVLForConditionalGeneration`.
        processor: its :class:`~unified_vl.processor.UnifiedVLProcessor`.
        images: one image per prompt (PIL, numpy or path).
        prompts: the instructions, e.g. ``task.prompt(record)``.
        decoding: ``"open"`` (free text), ``"loc4"`` (exactly four location tokens, then end),
            ``"candidates"`` (one of ``candidates``, through a :class:`CandidateTrie`) or
            ``"phrases"`` (phrase grounding's ``phrase<loc>x4 ; ...``, each phrase a run of words of
            the input's source text, in its order: :class:`PhraseSpanLogitsProcessor`).
        candidates: for ``"candidates"``: a list of texts shared by all inputs, or one list per input.
        sources: for ``"phrases"``: one source text (the caption) per input; None leaves that input
            unconstrained.
        num_beams: 1 for greedy, more for beam search.
        max_new_tokens: the longest output in tokens. None: the model's default for ``"open"``,
            exactly enough for ``"loc4"`` and for the longest candidate.
        batch_size: inputs per ``generate`` call.
        return_scores: also return each output's score, taken from the generation pass itself (no
            second pass): see :func:`sequence_scores`.
        adapter_names: one per input, the adapter its row runs with in a model holding several
            that mix in one batch (LoRA; ``model.rows``); None: the model as it is.
        **generation_kwargs: passed to ``generate`` (e.g. ``length_penalty``, ``logits_processor``).

    Returns:
        The decoded texts (special tokens removed, location tokens kept), one per input; with
        ``return_scores``, ``(texts, scores)``.

    Raises:
        ValueError: an unknown ``decoding``; ``"candidates"`` without candidates or candidates with
            another decoding; ``"phrases"`` without one source per input, or sources with another
            decoding; ``max_new_tokens`` too short for the constraint; mismatched lengths.
    """
    _check_arguments(images, prompts, decoding, candidates, sources, batch_size, generation_kwargs)
    if adapter_names is not None and len(adapter_names) != len(prompts):
        raise ValueError(f"got {len(adapter_names)} adapter names for {len(prompts)} prompts; give one per prompt")

    tries, needed = _constraints(processor, decoding, candidates, len(prompts), generation_kwargs)
    if needed is not None:
        if max_new_tokens is not None and max_new_tokens < needed:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} cannot complete decoding={decoding!r}, which needs {needed}; "
                "pass None to use exactly that"
            )
        max_new_tokens = max_new_tokens or needed
    if max_new_tokens is not None:
        generation_kwargs["max_new_tokens"] = max_new_tokens

    user_processors = list(generation_kwargs.get("logits_processor") or [])
    if return_scores:  # the raw logits of every step, to score the outputs without a second pass
        generation_kwargs.update(return_dict_in_generate=True, output_logits=True)
    texts: list[str] = []
    scores: list[float] = []
    for start in range(0, len(prompts), batch_size):
        stop = start + batch_size
        batch = processor(images=list(images[start:stop]), text=list(prompts[start:stop]))
        batch = {k: v.to(model.device) for k, v in batch.items()}
        if adapter_names is not None:
            generation_kwargs["adapter_names"] = list(adapter_names[start:stop])
        rows = slice(start, stop)
        kwargs = {**generation_kwargs, **_chunk_constraints(processor, decoding, tries, sources, user_processors, rows)}
        out = model.generate(**batch, num_beams=num_beams, **kwargs)
        sequences = out.sequences if return_scores else out  # (b, 1 + t)
        texts.extend(processor.decode(sequences))
        if return_scores:
            scores.extend(sequence_scores(model, out, eos_token_id=processor.tokenizer.eos_token_id).tolist())
    return (texts, scores) if return_scores else texts


def _constraints(processor, decoding: str, candidates, num_inputs: int, generation_kwargs: dict):
    """``(one trie per input or None, the fewest new tokens that complete the output or None)``; a
    ``"loc4"`` decoding adds its processor to ``generation_kwargs``."""
    if decoding == "loc4":
        loc_processor = LocationOnlyLogitsProcessor(processor.tokenizer, num_bins=processor.num_bins)
        generation_kwargs["logits_processor"] = LogitsProcessorList(
            [*(generation_kwargs.get("logits_processor") or []), loc_processor]
        )
        return None, loc_processor.num_locations + 1  # the location tokens, then eos
    if decoding == "candidates":
        tries = row_tries(processor.tokenizer, candidate_rows(candidates, num_inputs))
        return tries, max((trie.max_length for trie in set(tries)), default=1)
    return None, None


def _chunk_constraints(processor, decoding: str, tries, sources, user_processors: list, rows: slice) -> dict:
    """The constraint arguments of ``generate`` for one chunk of inputs: its rows' tries or captions."""
    if tries is not None:  # generate's batch_id counts rows of this chunk, not of all inputs
        return {"prefix_allowed_tokens_fn": trie_prefix_fn(tries[rows], shared=False)}
    if decoding == "phrases":  # one processor per chunk: it holds the chunk's rows' captions
        phrases = PhraseSpanLogitsProcessor(processor.tokenizer, sources[rows], num_bins=processor.num_bins)
        return {"logits_processor": LogitsProcessorList([*user_processors, phrases])}
    return {}


def sequence_scores(model, output, *, eos_token_id: int) -> torch.Tensor:
    """Mean log-probability per generated token, end-of-sequence token included, from ``generate``'s output.

    The same number as :func:`unified_vl.generation.score_candidates` gives the generated tokens
    teacher-forced (tested): the log-softmax of the model's raw logits at each step (before any
    constraint's logits processor, so a constrained output is scored by the model itself, not by
    the constraint), gathered along each returned beam (``beam_indices``) by ``transformers``'
    ``compute_transition_scores``, averaged over the tokens up to the first end-of-sequence token.

    Args:
        model: the model that generated (its ``language_model`` computes the transition scores).
        output: ``generate``'s output with ``return_dict_in_generate=True, output_logits=True``.
        eos_token_id: the end-of-sequence token.

    Returns:
        A float tensor (b,) on the CPU.
    """
    sequences = output.sequences[:, 1:]  # (b, t): without the decoder start token
    steps = model.language_model.compute_transition_scores(
        output.sequences, output.logits, getattr(output, "beam_indices", None), normalize_logits=True
    )[:, -sequences.shape[1] :]  # (b, t)
    is_eos = sequences == eos_token_id
    last = torch.where(is_eos.any(1), is_eos.float().argmax(1), sequences.shape[1] - 1)  # (b,)
    counted = torch.arange(sequences.shape[1], device=sequences.device)[None, :] <= last[:, None]  # (b, t)
    return ((steps * counted).sum(1) / counted.sum(1)).float().cpu()
