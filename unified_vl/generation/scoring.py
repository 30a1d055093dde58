"""Candidate scoring: the log-likelihood of each answer text, and rank classification over prompts.

Rank classification picks the candidate the model finds most likely instead of generating
(GPT-3, Brown et al. 2020 §2.4; T0, Sanh et al. 2022, "rank classification"; PET's verbalizers,
Schick & Schütze 2021). GPT-3 normalises by length for most tasks, T0 does not; both are offered.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.modeling_outputs import BaseModelOutput

from unified_vl.generation.constraints import candidate_rows


def _sequence_log_likelihood(logits: torch.Tensor, labels: torch.Tensor, *, length_normalize: bool) -> torch.Tensor:
    """Per-row sum (or mean) of the target tokens' log-probabilities; labels are -100 outside targets."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # (R, L, V)
    target = labels != -100  # (R, L)
    token_ll = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * target  # (R, L)
    total = token_ll.sum(dim=1)  # (R,)
    return total / target.sum(dim=1) if length_normalize else total


@torch.no_grad()
def score_candidates(
    model,
    processor,
    images: Sequence,
    prompts: Sequence[str],
    candidates: Sequence[str] | Sequence[Sequence[str]],
    *,
    length_normalize: bool = True,
    batch_size: int = 32,
    adapter_names: Sequence[str] | None = None,
) -> torch.Tensor:
    """Log-likelihood of every candidate text given each (image, prompt).

    Each input is encoded once (:meth:`encode`); its encoder output is then shared by its K
    candidates, and the decoder runs teacher-forced on (input, candidate) pairs, ``batch_size``
    pairs at a time, without gradients. The model's mode is left as it is: call ``model.eval()`` first.

    Args:
        model: a :class:`~unified_vl.modeling.UnifiedVLForConditionalGeneration`.
        processor: its :class:`~unified_vl.processor.UnifiedVLProcessor`.
        images: one image per prompt.
        prompts: the instructions.
        candidates: K texts shared by every input, or one list of K texts per input.
        length_normalize: the mean log-probability per target token (eos included) instead of
            the sum, so that longer candidates are not penalised for their length.
        batch_size: inputs per encoder pass, and (input, candidate) pairs per decoder pass.
        adapter_names: one per input, the adapter its rows run with (LoRA mixed batches,
            ``model.rows``); None: the model as it is.

    Returns:
        A float32 tensor (B, K) on the CPU; ``scores.argmax(1)`` is the rank classification.

    Raises:
        ValueError: mismatched lengths, no candidates, or per-input lists of different lengths.
    """
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; give one prompt per image")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if adapter_names is not None and len(adapter_names) != len(prompts):
        raise ValueError(f"got {len(adapter_names)} adapter names for {len(prompts)} prompts; give one per prompt")
    rows = candidate_rows(candidates, len(prompts))
    num_candidates = len(rows[0]) if rows else len(candidates)
    for i, row in enumerate(rows):
        if len(row) != num_candidates:
            raise ValueError(
                f"candidate list {i} has {len(row)} texts, list 0 has {num_candidates}; all need the same K"
            )
    shared = isinstance(candidates[0], str)
    shared_labels = processor.tokenize_targets(candidates) if shared else None  # (K, L)

    scores = []
    for start in range(0, len(prompts), batch_size):
        stop = start + batch_size
        batch = processor(images=list(images[start:stop]), text=list(prompts[start:stop]))
        batch = {k: v.to(model.device) for k, v in batch.items()}
        names = None if adapter_names is None else list(adapter_names[start:stop])
        encoder_outputs, encoder_mask = model.encode(**batch, adapter_names=names)  # (b, N + T, D), (b, N + T)
        hidden = encoder_outputs.last_hidden_state
        b = hidden.shape[0]
        if shared:
            labels = shared_labels.repeat(b, 1)  # (b * K, L), pair i = (input i // K, candidate i % K)
        else:
            labels = processor.tokenize_targets([text for row in rows[start:stop] for text in row])  # (b * K, L)
        labels = labels.to(model.device)
        example = torch.arange(b, device=model.device).repeat_interleave(num_candidates)  # (b * K,)
        pair_scores = []
        for first in range(0, b * num_candidates, batch_size):
            pairs = slice(first, first + batch_size)
            pair_labels = labels[pairs]  # (p, L)
            # Right-padded labels and a causal decoder: cutting the all-padding tail changes nothing.
            pair_labels = pair_labels[:, : int((pair_labels != -100).sum(dim=1).max())].contiguous()
            idx = example[pairs]  # (p,)
            out = model(
                encoder_outputs=BaseModelOutput(last_hidden_state=hidden[idx]),  # (p, N + T, D)
                encoder_attention_mask=encoder_mask[idx],  # (p, N + T)
                labels=pair_labels,
                adapter_names=None if names is None else [names[i] for i in idx.tolist()],  # each pair's input's
            )
            pair_scores.append(_sequence_log_likelihood(out.logits, pair_labels, length_normalize=length_normalize))
        scores.append(torch.cat(pair_scores).view(b, num_candidates).cpu())  # (b, K)
    return torch.cat(scores) if scores else torch.zeros(0, num_candidates)


def score_texts(
    model, processor, images: Sequence, prompts: Sequence[str], texts: Sequence[str], *, batch_size: int = 32
) -> list[float]:
    """The score of each generated text: its mean log-probability per token (eos included) given its input.

    The one place where a prediction's score is computed (the `Predictor`'s results, evaluation's
    per-record predictions): a teacher-forced pass over the generated text, the same
    log-likelihood rank classification uses (:func:`score_candidates`, length-normalised).

    Args:
        model: the model (in eval mode).
        processor: its processor.
        images: one image per text.
        prompts: the instruction each text was generated for.
        texts: the generated texts (location tokens kept).
        batch_size: inputs per forward pass.

    Returns:
        One float per text, in (-inf, 0].
    """
    if len(texts) != len(prompts):
        raise ValueError(f"got {len(texts)} texts for {len(prompts)} prompts")
    if not texts:
        return []
    rows = [[text] for text in texts]
    return score_candidates(model, processor, images, prompts, rows, batch_size=batch_size)[:, 0].tolist()


def rank_classify(
    model,
    processor,
    images: Sequence,
    prompts_per_template: Sequence[Sequence[str]],
    candidates: Sequence[str] | Sequence[Sequence[str]],
    *,
    length_normalize: bool = True,
    batch_size: int = 32,
) -> torch.Tensor:
    """Candidate scores averaged over several prompt templates (multi-prompt ensembling).

    PET ensembles the predictions of several pattern-verbalizer pairs by averaging their scores
    (Schick & Schütze 2021, "Exploiting Cloze Questions for Few Shot Text Classification and
    Natural Language Inference", EACL); here one model, uniform weights, over templates.

    Args:
        model: a :class:`~unified_vl.modeling.UnifiedVLForConditionalGeneration`.
        processor: its :class:`~unified_vl.processor.UnifiedVLProcessor`.
        images: B images.
        prompts_per_template: ``prompts_per_template[t][b]`` is template t's prompt for input b.
        candidates: K texts shared by every input, or one list of K texts per input.
        length_normalize: as in :func:`score_candidates`.
        batch_size: as in :func:`score_candidates`.

    Returns:
        The mean over templates of :func:`score_candidates`, a float32 tensor (B, K).

    Raises:
        ValueError: no templates, or a template without one prompt per image.
    """
    if len(prompts_per_template) == 0:
        raise ValueError("prompts_per_template is empty; give at least one list of prompts")
    for t, prompts in enumerate(prompts_per_template):
        if isinstance(prompts, str) or len(prompts) != len(images):
            got = "a string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
            raise ValueError(f"template {t}: expected a list of {len(images)} prompts (one per image), got {got}")
    per_template = [
        score_candidates(
            model, processor, images, prompts, candidates, length_normalize=length_normalize, batch_size=batch_size
        )
        for prompts in prompts_per_template
    ]
    return torch.stack(per_template).mean(dim=0)  # (T, B, K) -> (B, K)
