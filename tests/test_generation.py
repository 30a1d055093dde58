"""Constrained decoding (candidate trie, location-only) and candidate scoring on a scrambled uvl-tiny."""

from __future__ import annotations

import random
import re

import pytest
import torch

from tasks.boxes import tokens_to_box
from tests.conftest import random_images
from tests.test_model import _scramble
from unified_vl.generation import (
    CandidateTrie,
    LocationOnlyLogitsProcessor,
    PhraseSpanLogitsProcessor,
    candidates_prefix_fn,
    generate_texts,
    rank_classify,
    score_candidates,
)
from unified_vl.modeling import build_model
from unified_vl.tokenizer import loc_token_ids

# Different lengths, shared prefixes ("red" / "red circle", "blue" / "blue square"), a long one.
POOL = ["red", "red circle", "blue", "blue square", "a red circle left of a blue square", "green", "yes", "no"]
WORDS = ["what", "is", "the", "color", "of", "red", "circle", "left", "blue", "square", "which", "region", "?"]
NUM_INPUTS = 30
LOC4 = re.compile(r"(<loc_\d+>){4}")
ITEM = re.compile(r"(?P<phrase>[^<]+?)(<loc_\d+>){4}")  # "phrase<loc>x4"; the box may be reversed (untrained)


def _items(text: str) -> list[str] | None:
    """The phrases of "phrase<loc>x4 ; phrase<loc>x4 ...", or None when the text is not of that form."""
    matches = [ITEM.fullmatch(item) for item in text.split(" ; ")]
    return [m["phrase"] for m in matches] if all(matches) else None


@pytest.fixture(scope="module")
def model(tiny_config, tokenizer):
    torch.manual_seed(0)
    return _scramble(build_model(tiny_config, tokenizer).eval())


@pytest.fixture(scope="module")
def inputs():
    """30 random images of different sizes with random prompts of different lengths."""
    rng = random.Random(0)
    prompts = [" ".join(rng.choices(WORDS, k=rng.randint(1, 12))) for _ in range(NUM_INPUTS)]
    return random_images(NUM_INPUTS, size=32), prompts


def _per_row_candidates(n: int, seed: int = 0) -> list[list[str]]:
    """One random subset of POOL per input, with 1 and 2 candidates among them (fewer than 3 beams)."""
    rng = random.Random(seed)
    rows = [rng.sample(POOL, rng.randint(1, len(POOL))) for _ in range(n)]
    rows[0], rows[1] = ["red circle"], ["red", "red circle"]
    return rows


def _captions(n: int, seed: int = 0) -> list[str | None]:
    """A caption of 2-5 distinct words per input (a word names where its phrase starts); rows 0 and 2
    have none (a grounded-captioning record: unconstrained)."""
    rng = random.Random(seed)
    rows: list[str | None] = [" ".join(rng.sample(WORDS[:-1], rng.randint(2, 5))) for _ in range(n)]
    rows[0] = rows[2] = None
    return rows


def _split_fill(ids: list[int], tokenizer) -> tuple[list[int], set[int]]:
    """Generated ids -> (the ids up to and including the first eos, the set of tokens after it).

    The decoder start token is dropped. What fills a finished row differs by search: greedy
    writes pad, while transformers 5's beam search fills with eos whenever pad's id is 0
    (``pad_token_id or eos_token_id`` in ``_beam_search`` reads the 0 tensor as false).
    """
    ids = ids[1:]
    end = ids.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in ids else len(ids)
    return ids[:end], set(ids[end:])


# -- the trie ---------------------------------------------------------------------------------
def test_trie_allows_exactly_the_continuations_of_candidates(tokenizer):
    trie = CandidateTrie.from_texts(tokenizer, ["red", "red circle", "blue"])
    red, red_circle, blue = (tokenizer(t)["input_ids"] for t in ("red", "red circle", "blue"))
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert red[-1] == eos and red_circle[: len(red) - 1] == red[:-1], "'red circle' must extend 'red'"
    assert sorted(trie.allowed([])) == sorted({red[0], blue[0]})
    # After "red": end here or go on to "red circle".
    assert sorted(trie.allowed(red[:-1])) == sorted({eos, red_circle[len(red) - 1]})
    assert trie.allowed(red_circle[:-1]) == [eos]
    assert trie.allowed(red) == [pad] and trie.allowed(red + [pad, pad]) == [pad]
    assert trie.allowed([blue[0], red[0]]) == [eos], "a prefix off the trie may only end (OFA)"
    assert trie.max_length == len(red_circle)


def test_trie_refuses_empty_candidates_and_sequences_without_eos(tokenizer):
    with pytest.raises(ValueError, match="at least one candidate"):
        CandidateTrie.from_texts(tokenizer, [])
    with pytest.raises(ValueError, match="must end in eos"):
        CandidateTrie([[5, 6]], eos_token_id=1, pad_token_id=0)


def test_prefix_fn_drops_the_decoder_start_and_indexes_rows(tokenizer):
    start = tokenizer.pad_token_id  # T5 starts decoding with pad
    red, blue = tokenizer("red")["input_ids"], tokenizer("blue")["input_ids"]
    shared = candidates_prefix_fn(tokenizer, ["red"])
    assert shared(0, torch.tensor([start])) == [red[0]]
    assert shared(7, torch.tensor([start, *red[:-1]])) == [tokenizer.eos_token_id]
    per_row = candidates_prefix_fn(tokenizer, [["red"], ["blue"]])
    assert per_row(0, torch.tensor([start])) == [red[0]]
    assert per_row(1, torch.tensor([start])) == [blue[0]]
    with pytest.raises(IndexError, match="batch row 2 has no candidate list; 2 lists"):
        per_row(2, torch.tensor([start]))


# -- constrained decoding ---------------------------------------------------------------------
@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per_row"])
def test_candidate_decoding_only_writes_candidates(model, processor, inputs, num_beams, per_row):
    images, prompts = inputs
    candidates = _per_row_candidates(NUM_INPUTS) if per_row else POOL
    rows = candidates if per_row else [POOL] * NUM_INPUTS
    texts = generate_texts(
        model, processor, images, prompts, decoding="candidates", candidates=candidates, num_beams=num_beams
    )
    assert len(texts) == NUM_INPUTS
    for text, row in zip(texts, rows, strict=True):
        assert text in row
    assert len(set(texts)) > 1, f"every input got the same answer, the test would be vacuous: {texts}"

    # Token level: each row is one candidate's ids (eos included), then only filler.
    batch = processor(images=images, text=prompts)
    fn = candidates_prefix_fn(processor.tokenizer, candidates)
    sequences = model.generate(**batch, num_beams=num_beams, max_new_tokens=16, prefix_allowed_tokens_fn=fn)
    tok = processor.tokenizer
    for seq, row in zip(sequences.tolist(), rows, strict=True):
        written, fill = _split_fill(seq, tok)
        assert written in [tok(t)["input_ids"] for t in row], seq
        assert fill <= {tok.pad_token_id, tok.eos_token_id}, seq


@pytest.mark.parametrize("num_beams", [1, 3])
def test_loc4_decoding_writes_four_location_tokens_then_ends(model, processor, inputs, num_beams):
    images, prompts = inputs
    open_texts = generate_texts(model, processor, images, prompts, max_new_tokens=6)
    assert not all(LOC4.fullmatch(t) for t in open_texts), "unconstrained outputs are boxes already: vacuous"

    texts = generate_texts(model, processor, images, prompts, decoding="loc4", num_beams=num_beams)
    for text, image in zip(texts, images, strict=True):
        assert LOC4.fullmatch(text), text
        height, width = image.shape[:2]
        box = tokens_to_box(text, width, height)
        assert len(box) == 4 and all(0 <= v <= max(width, height) for v in box)
    assert len(set(texts)) > 1

    batch = processor(images=images, text=prompts)
    logits_processor = [LocationOnlyLogitsProcessor(processor.tokenizer, num_bins=processor.num_bins)]
    sequences = model.generate(**batch, num_beams=num_beams, max_new_tokens=9, logits_processor=logits_processor)
    tok = processor.tokenizer
    locs = set(loc_token_ids(tok, processor.num_bins))
    for seq in sequences.tolist():
        written, fill = _split_fill(seq, tok)
        assert len(written) == 5 and set(written[:4]) <= locs, seq
        assert fill <= {tok.pad_token_id, tok.eos_token_id}, seq


@pytest.mark.parametrize("num_beams", [1, 3])
def test_phrase_decoding_writes_runs_of_the_caption_then_boxes(model, processor, inputs, num_beams):
    images, prompts = inputs
    sources = _captions(NUM_INPUTS)
    # At most 5 one-token words: every start used once ends the grammar within 15 + 5 x 5 tokens.
    kwargs = {"num_beams": num_beams, "max_new_tokens": 48}
    texts = generate_texts(model, processor, images, prompts, decoding="phrases", sources=sources, **kwargs)
    open_texts = generate_texts(model, processor, images, prompts, **kwargs)
    assert [texts[0], texts[2]] == [open_texts[0], open_texts[2]]  # rows without a caption are left alone
    constrained = [i for i, source in enumerate(sources) if source is not None]
    assert not any(_items(open_texts[i]) for i in constrained), "open outputs have the form already: vacuous"
    phrases_seen = set()
    for i in constrained:
        words = sources[i].split()
        spans = {" ".join(words[a:b]) for a in range(len(words)) for b in range(a + 1, len(words) + 1)}
        items = _items(texts[i])
        assert items, f"row {i}: {texts[i]!r} is not phrase<loc>x4 ; ... (caption {sources[i]!r})"
        assert all(phrase in spans for phrase in items), (texts[i], sources[i])
        starts = [words.index(phrase.split()[0]) for phrase in items]
        assert len(starts) == len(set(starts)), f"two phrases start at one word: {texts[i]!r}"
        phrases_seen.update(items)
    assert len(phrases_seen) > 5, f"the outputs hardly differ, the test would be vacuous: {phrases_seen}"


def test_phrase_grammar_token_by_token(processor):
    tok = processor.tokenizer
    ids = tok("red circle left", add_special_tokens=False).input_ids
    grammar = PhraseSpanLogitsProcessor(tok, ["red circle left"], num_bins=processor.num_bins)
    suffixes = grammar.suffixes[0]
    locs = loc_token_ids(tok, processor.num_bins)
    box = locs[:4]
    assert grammar._allowed(suffixes, []) == sorted(set(ids))  # any word can start the first phrase
    assert grammar._allowed(suffixes, ids[:1]) == sorted({ids[1], *locs})  # continue the run, or box it
    assert grammar._allowed(suffixes, [*ids[:1], *box[:2]]) == locs  # a box is four location tokens
    after = [*ids[:2], *box]
    assert grammar._allowed(suffixes, after) == [tok.eos_token_id, *grammar.separator]
    # "red" is taken: a second phrase starts at "circle" or "left".
    assert grammar._allowed(suffixes, [*after, *grammar.separator]) == sorted(ids[1:])
    every_start = [*after, *grammar.separator, ids[1], *box, *grammar.separator, ids[2], *box]
    assert grammar._allowed(suffixes, every_start) == [tok.eos_token_id]  # no word left to start at
    assert grammar._allowed(suffixes, [*every_start, tok.eos_token_id]) == [tok.pad_token_id]


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("decoding", ["open", "loc4", "candidates", "phrases"])
def test_batched_generation_equals_one_at_a_time(model, processor, inputs, decoding, num_beams):
    images, prompts = inputs[0][:7], inputs[1][:7]
    kwargs = {"decoding": decoding, "num_beams": num_beams}
    if decoding == "candidates":
        kwargs["candidates"] = _per_row_candidates(7, seed=1)  # chunks must index their own rows
    elif decoding == "phrases":
        kwargs.update(sources=_captions(7, seed=1), max_new_tokens=12)
    else:
        kwargs["max_new_tokens"] = 8
    batched = generate_texts(model, processor, images, prompts, batch_size=3, **kwargs)
    singles = []
    for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        one = dict(kwargs)
        if decoding == "candidates":
            one["candidates"] = [kwargs["candidates"][i]]
        if decoding == "phrases":
            one["sources"] = [kwargs["sources"][i]]
        singles.extend(generate_texts(model, processor, [image], [prompt], **one))
    assert len(set(batched)) > 1, f"identical outputs make the test vacuous: {batched}"
    assert batched == singles


@pytest.mark.parametrize("length_normalize, length_penalty", [(True, 1.0), (False, 0.0)])
def test_exhaustive_constrained_beam_search_agrees_with_rank_classification(
    model, processor, inputs, length_normalize, length_penalty
):
    # With as many beams as candidates, beam search under the trie tries every candidate; its
    # length penalty 1 (0) ranks by mean (summed) log-likelihood, as score_candidates does.
    images, prompts = inputs
    candidates = POOL[:5]  # without "no", which wins every summed score and would make this vacuous
    scores = score_candidates(model, processor, images, prompts, candidates, length_normalize=length_normalize)
    ranked = [candidates[i] for i in scores.argmax(dim=1)]
    searched = generate_texts(
        model,
        processor,
        images,
        prompts,
        decoding="candidates",
        candidates=candidates,
        num_beams=len(candidates),
        length_penalty=length_penalty,
    )
    assert len(set(ranked)) > 1
    assert searched == ranked


# -- scoring ----------------------------------------------------------------------------------
def _direct_scores(model, processor, images, prompts, rows, *, length_normalize):
    """Full forward pass per candidate (encoder included), log-probs of the labels read off the logits."""
    columns = []
    for k in range(len(rows[0])):
        batch = processor(images=images, text=prompts, targets=[row[k] for row in rows])
        with torch.no_grad():
            logits = model(**batch).logits  # (B, L, V)
        labels = batch["labels"]
        mask = labels != -100
        token_ll = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask
        total = token_ll.sum(1)
        columns.append(total / mask.sum(1) if length_normalize else total)
    return torch.stack(columns, dim=1)  # (B, K)


@pytest.mark.parametrize("length_normalize", [True, False])
@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per_row"])
def test_score_candidates_equals_a_direct_computation(model, processor, inputs, length_normalize, per_row):
    images, prompts = inputs[0][:5], inputs[1][:5]
    shared = ["red", "a red circle left of a blue square", "blue", "red circle"]
    candidates = [random.Random(i).sample(POOL, 4) for i in range(5)] if per_row else shared
    rows = candidates if per_row else [shared] * 5
    # batch_size=2: inputs and (input, candidate) pairs are both split across chunks.
    scores = score_candidates(
        model, processor, images, prompts, candidates, length_normalize=length_normalize, batch_size=2
    )
    assert scores.shape == (5, 4)
    expected = _direct_scores(model, processor, images, prompts, rows, length_normalize=length_normalize)
    # Sums of up to ~10 float32 log-probabilities of size ~2, computed in differently shaped batches:
    # agreement to 1e-4 relative is float32 rounding; a wrong token or mask is off by >= 0.1.
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)


def test_score_candidates_encodes_each_input_once(model, processor, inputs):
    images, prompts = inputs[0][:5], inputs[1][:5]
    encoded, decoded = [], []
    hooks = [
        model.language_model.encoder.register_forward_hook(
            lambda m, a, kw, out: encoded.append(kw["inputs_embeds"].shape[0]), with_kwargs=True
        ),
        model.language_model.decoder.register_forward_hook(
            lambda m, a, kw, out: decoded.append(kw["input_ids"].shape[0]), with_kwargs=True
        ),
    ]
    try:
        score_candidates(model, processor, images, prompts, ["red", "blue", "green", "no"], batch_size=2)
    finally:
        for hook in hooks:
            hook.remove()
    assert encoded == [2, 2, 1]  # 5 inputs, 2 per encoder pass
    assert decoded == [2] * 10  # 5 x 4 (input, candidate) pairs, 2 per decoder pass


def test_rank_classify_averages_templates(model, processor, inputs):
    images, prompts = inputs[0][:4], inputs[1][:4]
    other = [f"question: {p}" for p in prompts]
    candidates = ["red", "blue square", "green"]
    first = score_candidates(model, processor, images, prompts, candidates)
    second = score_candidates(model, processor, images, other, candidates)
    torch.testing.assert_close(rank_classify(model, processor, images, [prompts], candidates), first)
    torch.testing.assert_close(
        rank_classify(model, processor, images, [prompts, other], candidates), (first + second) / 2
    )
    assert not torch.allclose(first, second), "the two templates must score differently"


# -- errors -----------------------------------------------------------------------------------
def test_bad_arguments_are_clear_errors(model, processor, inputs):
    images, prompts = inputs[0][:2], inputs[1][:2]
    with pytest.raises(ValueError, match="unknown decoding 'beam'; expected one of 'open', 'loc4', 'candidates'"):
        generate_texts(model, processor, images, prompts, decoding="beam")
    with pytest.raises(ValueError, match=r"decoding='phrases' needs one source text \(or None\) per prompt: 2, got 1"):
        generate_texts(model, processor, images, prompts, decoding="phrases", sources=["red circle"])
    with pytest.raises(ValueError, match="sources are only used with decoding='phrases', not decoding='open'"):
        generate_texts(model, processor, images, prompts, sources=["red", "blue"])
    with pytest.raises(ValueError, match="decoding='candidates' needs candidates"):
        generate_texts(model, processor, images, prompts, decoding="candidates")
    with pytest.raises(ValueError, match="only used with decoding='candidates'"):
        generate_texts(model, processor, images, prompts, candidates=["red"])
    with pytest.raises(ValueError, match="max_new_tokens=3 cannot complete decoding='loc4', which needs 5"):
        generate_texts(model, processor, images, prompts, decoding="loc4", max_new_tokens=3)
    with pytest.raises(ValueError, match="got 1 candidate lists for 2 inputs"):
        generate_texts(model, processor, images, prompts, decoding="candidates", candidates=[["red"]])
    with pytest.raises(TypeError, match="not the string 'red'"):
        generate_texts(model, processor, images, prompts, decoding="candidates", candidates="red")
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        generate_texts(model, processor, images, prompts[:1])
    with pytest.raises(ValueError, match="num_return_sequences must be 1"):
        generate_texts(model, processor, images, prompts, num_beams=2, num_return_sequences=2)
    with pytest.raises(ValueError, match="candidate list 1 has 1 texts, list 0 has 2"):
        score_candidates(model, processor, images, prompts, [["red", "blue"], ["red"]])
    with pytest.raises(ValueError, match="template 1: expected a list of 2 prompts"):
        rank_classify(model, processor, images, [prompts, prompts[:1]], ["red"])


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("decoding", ["loc4", "candidates"])
def test_scores_from_the_generation_pass_equal_a_second_scoring_pass(model, processor, inputs, decoding, num_beams):
    # Constrained outputs round-trip through the tokenizer, so the second pass scores the same tokens.
    images, prompts = inputs[0][:6], inputs[1][:6]
    kwargs = {"decoding": decoding, "num_beams": num_beams, "batch_size": 4}
    if decoding == "candidates":
        kwargs["candidates"] = _per_row_candidates(6, seed=2)
    texts, scores = generate_texts(model, processor, images, prompts, return_scores=True, **kwargs)
    assert texts == generate_texts(model, processor, images, prompts, **kwargs)
    second = score_candidates(model, processor, images, prompts, [[t] for t in texts])[:, 0]
    assert len(set(texts)) > 1
    torch.testing.assert_close(torch.tensor(scores), second, atol=2e-5, rtol=0)
