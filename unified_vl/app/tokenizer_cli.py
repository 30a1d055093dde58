"""``unified-vl tokenizer train``: a SentencePiece tokenizer (with location tokens) on stored records.

    unified-vl tokenizer train --data data/synth data/vqav2 --vocab-size 8000 --out my_tokenizer/

Expect "wrote my_tokenizer/: N tokens". The text is :func:`data_tools.corpus.corpus` (every task's
templates and the records' text fields; the project's default corpus without ``--data``); the
training is :func:`unified_vl.tokenizer.train_tokenizer`. Exit status: 0 success, 1 bad input, 2 bad usage.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tasks.boxes import DEFAULT_NUM_BINS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unified-vl tokenizer", description="Train the SentencePiece tokenizer (with location tokens)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train}")
    p = sub.add_parser("train", help="train on the text of stored records and every task's templates")
    p.add_argument(
        "--data",
        nargs="*",
        default=[],
        help="data folder(s) whose records' text to train on (none: the project's default corpus, data_tools.corpus)",
    )
    p.add_argument(
        "--vocab-size", type=int, default=8000, help="SentencePiece pieces, a soft limit (default: %(default)s)"
    )
    p.add_argument(
        "--num-bins",
        type=int,
        default=DEFAULT_NUM_BINS,
        help="location tokens <loc_0>..<loc_{N-1}> (default: %(default)s)",
    )
    p.add_argument("--out", required=True, help="tokenizer folder to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``unified-vl tokenizer train ...``; returns the exit status."""
    from data_tools.corpus import corpus
    from data_tools.storage import StorageError
    from unified_vl.tokenizer import train_tokenizer

    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # argparse exits on --help (0) and on bad usage (2)
        return int(exc.code or 0)
    try:
        tokenizer = train_tokenizer(
            corpus(args.data), out_dir=args.out, vocab_size=args.vocab_size, num_bins=args.num_bins
        )
    except (StorageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {len(tokenizer)} tokens")
    return 0
