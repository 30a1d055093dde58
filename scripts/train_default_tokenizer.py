"""Trains the default tokenizer shipped as package data (unified_vl/assets/tokenizer).

    python scripts/train_default_tokenizer.py

Expect: a few seconds; rewrites unified_vl/assets/tokenizer/{spiece.model,tokenizer.json,...}.
The corpus is text the project produces itself (task templates filled with the synthetic world's
vocabulary, and captions/questions/expressions of synthetic scenes), so nothing is downloaded.
"""

from data_tools.corpus import default_corpus_texts
from unified_vl.tokenizer import default_tokenizer_dir, train_tokenizer

# Enough pieces for the synthetic world's words to be single pieces; small, so the tiny model's
# embedding table stays small (the location tokens add 1000 rows anyway).
VOCAB_SIZE = 1000

if __name__ == "__main__":
    tokenizer = train_tokenizer(default_corpus_texts(), out_dir=default_tokenizer_dir(), vocab_size=VOCAB_SIZE)
    print(f"saved {default_tokenizer_dir()} ({len(tokenizer)} tokens)")
