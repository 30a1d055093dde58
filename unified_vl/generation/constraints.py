"""Constrained decoding: a candidate trie (answer lists) and a location-only processor (boxes).

Both plug into ``transformers``' ``generate``, which in 5.x no longer has constrained beam search
(``DisjunctiveConstraint`` is gone): the trie becomes a ``prefix_allowed_tokens_fn`` and the box
constraint a ``LogitsProcessor``; each works with greedy and beam search.
:func:`unified_vl.generation.generate.generate_texts` applies them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from transformers import LogitsProcessor

from tasks.boxes import DEFAULT_NUM_BINS
from unified_vl.tokenizer import loc_token_ids


class CandidateTrie:
    """A prefix trie over the token ids of candidate texts, each ending in eos.

    Decoding through it can only write one of the candidates: this is OFA's answer-constrained
    decoding (OFA-Sys/OFA ``utils/trie.py``, built as ``constraint_trie`` in
    ``tasks/mm_tasks/vqa_gen.py``), including its rule that a prefix off the trie may only end.

    Args:
        sequences: token ids of each candidate, each ending in ``eos_token_id``.
        eos_token_id: the end-of-sequence id.
        pad_token_id: the padding id, the only token allowed after eos.

    Raises:
        ValueError: no sequences, or a sequence that does not end in eos.
    """

    def __init__(self, sequences: Iterable[Sequence[int]], *, eos_token_id: int, pad_token_id: int):
        self.eos_token_id = int(eos_token_id)
        self.pad_token_id = int(pad_token_id)
        self._root: dict[int, dict] = {}
        self.max_length = 0  # the longest candidate in tokens, eos included
        for i, seq in enumerate(sequences):
            seq = [int(t) for t in seq]
            if not seq or seq[-1] != self.eos_token_id or self.eos_token_id in seq[:-1]:
                raise ValueError(
                    f"candidate {i}: token ids must end in eos ({self.eos_token_id}) exactly once, got {seq}"
                )
            node = self._root
            for token in seq:
                node = node.setdefault(token, {})
            self.max_length = max(self.max_length, len(seq))
        if not self._root:
            raise ValueError("CandidateTrie needs at least one candidate")

    @classmethod
    def from_texts(cls, tokenizer, texts: Sequence[str]) -> CandidateTrie:
        """A trie over ``texts`` as ``tokenizer`` writes them (with the end-of-sequence token).

        Args:
            tokenizer: the processor's tokenizer (``processor.tokenizer``).
            texts: the candidate texts, e.g. ``task.candidates(records)``.
        """
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"candidate {i}: expected a string, got {type(text).__name__}")
        ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"] if texts else []
        return cls(ids, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    def allowed(self, prefix_ids: Sequence[int]) -> list[int]:
        """The tokens that may follow ``prefix_ids`` (generated ids, without the decoder start).

        After eos only pad is allowed, so a finished sequence stays finished; a prefix that left
        the trie (a dead beam whose score is already -inf) may only end, as in OFA.
        """
        if self.eos_token_id in prefix_ids:
            return [self.pad_token_id]
        node = self._root
        for token in prefix_ids:
            node = node.get(int(token))
            if node is None:
                return [self.eos_token_id]
        return list(node)


def candidate_rows(candidates: Sequence[str] | Sequence[Sequence[str]], num_rows: int | None) -> list[Sequence[str]]:
    """Normalises a shared candidate list or one list per row into one list per row.

    Args:
        candidates: a list of texts shared by every row, or a list of ``num_rows`` lists of texts.
        num_rows: the number of rows, or None when the caller does not know it yet (then a shared
            list is returned as a one-element list).

    Returns:
        A list of candidate lists; a shared list is the same object in every row.

    Raises:
        TypeError: ``candidates`` is a single string or mixes strings and lists.
        ValueError: no candidates, an empty row, or a number of rows other than ``num_rows``.
    """
    if isinstance(candidates, str):
        raise TypeError(f"candidates must be a list of strings (or one list per row), not the string {candidates!r}")
    if len(candidates) == 0:
        raise ValueError("candidates is empty; give at least one candidate text")
    if all(isinstance(c, str) for c in candidates):
        return [candidates] * (1 if num_rows is None else num_rows)
    if not all(isinstance(c, (list, tuple)) for c in candidates):
        raise TypeError(
            "candidates must be a list of strings (shared by all rows) or a list of lists of strings (one per row), not a mix"
        )
    if num_rows is not None and len(candidates) != num_rows:
        raise ValueError(
            f"got {len(candidates)} candidate lists for {num_rows} inputs; give one list per input or one shared list"
        )
    for i, row in enumerate(candidates):
        if len(row) == 0:
            raise ValueError(f"candidate list {i} is empty; give at least one candidate text")
    return list(candidates)


def row_tries(tokenizer, rows: Sequence[Sequence[str]]) -> list[CandidateTrie]:
    """One trie per row; rows with the same texts share one (a shared list is built once)."""
    by_id: dict[int, CandidateTrie] = {}
    by_texts: dict[tuple[str, ...], CandidateTrie] = {}
    tries = []
    for row in rows:
        if id(row) not in by_id:
            key = tuple(row)
            if key not in by_texts:
                by_texts[key] = CandidateTrie.from_texts(tokenizer, row)
            by_id[id(row)] = by_texts[key]
        tries.append(by_id[id(row)])
    return tries


def trie_prefix_fn(row_tries: Sequence[CandidateTrie], *, shared: bool) -> Callable[[int, torch.Tensor], list[int]]:
    def prefix_allowed_tokens_fn(batch_id: int, input_ids: torch.Tensor) -> list[int]:
        if shared:
            trie = row_tries[0]
        elif batch_id < len(row_tries):
            trie = row_tries[batch_id]
        else:
            raise IndexError(f"batch row {batch_id} has no candidate list; {len(row_tries)} lists were given")
        return trie.allowed(input_ids[1:].tolist())  # [1:]: drop the decoder start token

    return prefix_allowed_tokens_fn


def candidates_prefix_fn(
    tokenizer, candidates: Sequence[str] | Sequence[Sequence[str]]
) -> Callable[[int, torch.Tensor], list[int]]:
    """A ``prefix_allowed_tokens_fn`` for ``generate`` that only lets it write a candidate.

    Args:
        tokenizer: the processor's tokenizer.
        candidates: a list of texts shared by every batch row, or one list per batch row.

    Returns:
        ``fn(batch_id, input_ids)``, where ``batch_id`` is the row of the original batch (beam
        search calls it once per beam, with the beam's original row) and ``input_ids`` (t,) is
        the decoder sequence so far, starting with the decoder start token.
    """
    rows = candidate_rows(candidates, None)
    return trie_prefix_fn(row_tries(tokenizer, rows), shared=isinstance(candidates[0], str))


class LocationOnlyLogitsProcessor(LogitsProcessor):
    """Forces exactly ``num_locations`` location tokens, then eos, then pad (the ``rec`` box).

    Every other token gets a score of -inf. The step is read from the sequence itself (how many
    location tokens and whether eos were written), so it works for greedy and beam search.

    Args:
        tokenizer: the processor's tokenizer (with the location tokens).
        num_locations: how many ``<loc_*>`` tokens to write (4: ``x1 y1 x2 y2``).
        num_bins: the number of location tokens in the vocabulary (``processor.num_bins``).
    """

    def __init__(self, tokenizer, *, num_locations: int = 4, num_bins: int = DEFAULT_NUM_BINS):
        if num_locations < 1:
            raise ValueError(f"num_locations must be at least 1, got {num_locations}")
        self.num_locations = num_locations
        self.loc_ids = torch.tensor(loc_token_ids(tokenizer, num_bins), dtype=torch.long)  # (num_bins,)
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        loc_ids = self.loc_ids.to(input_ids.device)
        num_locs = torch.isin(input_ids, loc_ids).sum(dim=1)  # (R,) R = batch * beams
        ended = (input_ids == self.eos_token_id).any(dim=1)  # (R,)
        allowed = torch.zeros_like(scores, dtype=torch.bool)  # (R, V)
        allowed[:, loc_ids] = (~ended & (num_locs < self.num_locations))[:, None]
        allowed[:, self.eos_token_id] = ~ended & (num_locs >= self.num_locations)
        allowed[:, self.pad_token_id] = ended
        return scores.masked_fill(~allowed, float("-inf"))


class PhraseSpanLogitsProcessor(LogitsProcessor):
    """Phrase grounding's output grammar: ``phrase<loc>x4 ( ; phrase<loc>x4 )*`` then eos, each phrase
    a run of words of its row's source text (the caption), no two starting at the same word.

    The records' contract says so (docs/records.md: a grounding record's phrases are substrings of
    its caption), and Flickr30k Entities' protocol localises phrases the caption holds (Plummer et
    al., 2015). Open decoding lets a model write a phrase the caption does not hold: on the world's
    ``heldout`` split (colour-shape pairs never seen in training) ``uvl-tiny`` rewrote four in ten of
    them as a pair it had seen, and then boxed that pair. The order is left to the model: the task's
    metric matches phrases by their text, and a trained ``uvl-tiny`` writes the objects in an order
    of its own, not the caption's.

    Every step it reads the row's state from the sequence itself (so greedy and beam search both
    work): inside a phrase, the next token must continue a run of the caption's words that starts
    at a word no earlier phrase started at, or, once the phrase has a token, start its box; a box
    is exactly four location tokens; after a box come the separator (only while a word is left to
    start a phrase) or eos; after eos, pad. A row whose source is None (a grounded
    captioning record) is left unconstrained.

    Args:
        tokenizer: the processor's tokenizer (with the location tokens).
        sources: one source text per batch row, or None for an unconstrained row.
        num_bins: the number of location tokens in the vocabulary (``processor.num_bins``).
        separator: the text between items (the grounding target's ``" ; "``).
    """

    def __init__(self, tokenizer, sources: Sequence[str | None], *, num_bins: int = DEFAULT_NUM_BINS, separator=" ; "):
        self.loc_ids = loc_token_ids(tokenizer, num_bins)
        self._is_loc = set(self.loc_ids)
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id
        self.separator = tuple(tokenizer(separator.strip(), add_special_tokens=False).input_ids)
        if not self.separator:
            raise ValueError(f"the separator {separator!r} has no tokens")
        # Per row: the token ids of the caption from each word on (a phrase is a prefix of one of them).
        self.suffixes: list[list[tuple[int, ...]] | None] = []
        for source in sources:
            if source is None:
                self.suffixes.append(None)
                continue
            words = source.split()
            self.suffixes.append(
                [tuple(tokenizer(" ".join(words[i:]), add_special_tokens=False).input_ids) for i in range(len(words))]
            )

    def _allowed(self, suffixes: list[tuple[int, ...]], generated: list[int]) -> list[int]:
        """The tokens the grammar allows after ``generated`` (without the decoder start token)."""
        if self.eos_token_id in generated:
            return [self.pad_token_id]
        used: set[int] = set()  # the words that began earlier phrases
        phrase: list[int] = []
        locs, after_box = 0, []
        for token in generated:
            if token in self._is_loc:
                if locs == 0:  # the phrase ends: the first free word it can have started at is taken
                    used.update(self._starts(suffixes, phrase, used)[:1])
                locs += 1
                after_box = []
            elif locs == 4:  # the separator, token by token, then a new phrase
                after_box.append(token)
                if tuple(after_box) == self.separator:
                    phrase, locs, after_box = [], 0, []
            else:
                phrase.append(token)
        if locs == 4:
            if after_box:  # inside a separator of several tokens
                return [self.separator[len(after_box)]]
            # A separator only while a word is left to start another phrase.
            return [self.eos_token_id, *(self.separator[:1] if len(used) < len(suffixes) else ())]
        if 0 < locs < 4:
            return list(self.loc_ids)
        n = len(phrase)
        allowed = {suffixes[i][n] for i in self._starts(suffixes, phrase, used) if len(suffixes[i]) > n}
        if phrase:
            allowed.update(self._is_loc)
        return sorted(allowed) or [self.eos_token_id]

    @staticmethod
    def _starts(suffixes: list[tuple[int, ...]], phrase: list[int], used: set) -> list[int]:
        """The free words a phrase written so far can have started at."""
        prefix = tuple(phrase)
        return [i for i, suffix in enumerate(suffixes) if i not in used and suffix[: len(prefix)] == prefix]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = input_ids.shape[0]
        per_row = rows // len(self.suffixes)  # beam search: num_beams rows per batch row, in order
        mask = torch.zeros_like(scores, dtype=torch.bool)  # (R, V): True where forbidden
        for r in range(rows):
            suffixes = self.suffixes[r // per_row]
            if suffixes is None:
                continue
            allowed = self._allowed(suffixes, input_ids[r, 1:].tolist())  # [1:]: the decoder start token
            mask[r] = True
            mask[r, allowed] = False
        return scores.masked_fill(mask, float("-inf"))
