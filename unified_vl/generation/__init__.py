"""Generation: decoding (`generate_texts`), its constraints (answer tries, location-only) and candidate scoring."""

from unified_vl.generation.constraints import (
    CandidateTrie,
    LocationOnlyLogitsProcessor,
    PhraseSpanLogitsProcessor,
    candidates_prefix_fn,
)
from unified_vl.generation.generate import DECODINGS, generate_texts
from unified_vl.generation.scoring import rank_classify, score_candidates, score_texts

__all__ = [
    "DECODINGS",
    "CandidateTrie",
    "LocationOnlyLogitsProcessor",
    "PhraseSpanLogitsProcessor",
    "candidates_prefix_fn",
    "generate_texts",
    "rank_classify",
    "score_candidates",
    "score_texts",
]
