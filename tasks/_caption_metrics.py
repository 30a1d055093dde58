"""Caption metrics (CIDEr-D, BLEU-4, ROUGE-L) with pycocoevalcap's scorers and a pure-Python tokenizer.

Why not pycocoevalcap's own pipeline: its `PTBTokenizer` runs the Stanford CoreNLP jar (Java) and
METEOR is Java too; SPICE downloads Stanford models at first use. Training machines may have no
Java and no network, so we tokenise in Python (`ptb_tokenize`, an approximation of PTBTokenizer
plus pycocoevalcap's punctuation removal) and call only the pure-Python scorers.

Scores are corpus-level like the COCO caption evaluation: CIDEr's IDF is computed from the
references of all records passed together (see `caption_scores`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# pycocoevalcap/tokenizer/ptbtokenizer.py drops these tokens after PTB tokenisation. PTB writes
# brackets as -LRB- etc.; we never produce those, so brackets are dropped as characters instead.
_PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
    + ["(", ")", "{", "}", "[", "]", '"']
)
# PTB splits clitics off their word: "dog's" -> "dog 's", "don't" -> "do n't".
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
# A token: a clitic, a word (with inner hyphens, periods, commas, slashes, apostrophes kept, as
# PTB keeps "black-and-white", "3.5", "1,000"), an ellipsis, or one other non-space character.
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|\w+(?:[-.,/'&]\w+)*|\.\.\.|--|``|''|\S")


def ptb_tokenize(text: str) -> str:
    """Lower-cases and tokenises like pycocoevalcap's PTBTokenizer, then drops punctuation tokens.

    An approximation (no Java, see the module docstring): lower-case, split clitics, split
    punctuation off words, drop pycocoevalcap's punctuation list.

    Returns:
        The tokens joined by single spaces, the input format of pycocoevalcap's scorers.
    """
    text = text.lower().replace("\u2019", "'").replace("\u2018", "'")
    text = _CLITIC.sub(r" \1", text)
    return " ".join(token for token in _TOKEN.findall(text) if token not in _PTB_PUNCTUATION)


def caption_scores(predictions: Sequence[str | None], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus CIDEr-D, BLEU-4 and ROUGE-L of ``predictions`` against ``references``.

    ``pycocoevalcap.cider.Cider`` is CIDEr-D (Vedantam et al., 2015, §4 and the coco-caption
    implementation): n = 1..4, Gaussian length penalty with sigma = 6, clipped n-gram counts and a
    factor 10. Its IDF is log(#images) - log(df) over the references passed in one call, so it must
    see the whole split: for a single image every n-gram has df = 1 = #images and CIDEr is 0.

    Args:
        predictions: one caption per image; None (no prediction) is scored as the empty caption.
        references: the reference captions of each image (>= 1 each).

    Returns:
        ``{"cider": ..., "bleu4": ..., "rouge_l": ...}`` as floats.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference sets")
    res = {i: [ptb_tokenize(p) if isinstance(p, str) else ""] for i, p in enumerate(predictions)}
    gts = {i: [ptb_tokenize(r) for r in refs] for i, refs in enumerate(references)}
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)  # verbose=0: it prints otherwise
    rouge, _ = Rouge().compute_score(gts, res)
    return {"cider": float(cider), "bleu4": float(bleu[3]), "rouge_l": float(rouge)}
