"""The SentencePiece tokenizer (T5's tokenizer class) with location tokens added.

Vocabulary layout: the SentencePiece pieces, then T5's 100 sentinels ``<extra_id_*>`` (used by the
text-infilling task, Raffel et al. 2020 §3.1.4), then ``<loc_0>``..``<loc_{B-1}>``, then the image
placeholder ``<image>``. Location tokens are added as ordinary added tokens, not special ones, so
``decode(skip_special_tokens=True)`` keeps them (a box is part of the answer).

``<image>`` marks where an image goes in an interleaved prompt (PaliGemma and LLaVA use the same
word); the model puts the image's vectors there and never embeds the token itself. It is a special
token, so decoding drops it. The model never looks it up (it puts the image there) and never writes
it, so it has no row in the embedding table: :func:`model_vocab_size` is the table's size, and
``<image>`` comes last, one past the table, in the tokenizers of new and older folders alike.

A small default SentencePiece model ships with the package (``unified_vl/assets/tokenizer``). It is
trained by ``scripts/train_default_tokenizer.py`` on text the project produces itself (task
templates, the synthetic world's vocabulary), so a processor works with nothing downloaded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from transformers import T5Tokenizer

from tasks.boxes import DEFAULT_NUM_BINS, loc_tokens

# T5 reserves 100 sentinel tokens for span corruption (Raffel et al. 2020, §3.1.4).
NUM_EXTRA_IDS = 100
IMAGE_TOKEN = "<image>"  # where an image goes in a prompt (unified_vl.processor)


def default_tokenizer_dir() -> Path:
    """The folder of the SentencePiece model shipped as package data."""
    return Path(str(resources.files("unified_vl") / "assets" / "tokenizer"))


def _add_loc_tokens(tokenizer: T5Tokenizer, num_bins: int) -> T5Tokenizer:
    missing = [t for t in loc_tokens(num_bins) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing)
    if IMAGE_TOKEN not in tokenizer.get_vocab():  # after the location tokens: their ids never move
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return tokenizer


def load_tokenizer(path: str | os.PathLike | None = None, *, num_bins: int = DEFAULT_NUM_BINS) -> T5Tokenizer:
    """Loads a T5 tokenizer from a local folder and makes sure it has the location tokens and ``<image>``.

    Args:
        path: a folder holding a saved tokenizer (``tokenizer.json``) or a bare SentencePiece
            ``spiece.model`` (e.g. a Hugging Face T5 checkpoint). ``None`` uses the packaged default.
        num_bins: number of location tokens ``<loc_0>``..``<loc_{num_bins-1}>``.

    Returns:
        The tokenizer; :func:`model_vocab_size` is the embedding size the model needs.

    Raises:
        FileNotFoundError: the folder holds neither ``tokenizer.json`` nor ``spiece.model``.
    """
    folder = Path(path) if path is not None else default_tokenizer_dir()
    if not ((folder / "tokenizer.json").is_file() or (folder / "spiece.model").is_file()):
        raise FileNotFoundError(
            f"no tokenizer in {str(folder)!r}: expected 'tokenizer.json' (a saved tokenizer) or "
            "'spiece.model' (a SentencePiece model); train one with `unified-vl tokenizer train`"
        )
    # transformers 5 converts a bare spiece.model into the fast tokenizer (needs protobuf).
    tokenizer = T5Tokenizer.from_pretrained(str(folder), extra_ids=NUM_EXTRA_IDS, local_files_only=True)
    return _add_loc_tokens(tokenizer, num_bins)


def _follow_umask(folder: Path) -> None:
    # unified_vl.checkpoint.follow_umask, which imports the model; the tokenizer stays light.
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)
    os.chmod(folder, 0o777 & ~umask)


def loc_token_ids(tokenizer: T5Tokenizer, num_bins: int = DEFAULT_NUM_BINS) -> list[int]:
    """Ids of ``<loc_0>``..``<loc_{num_bins-1}>``, in bin order."""
    ids = tokenizer.convert_tokens_to_ids(loc_tokens(num_bins))
    if tokenizer.unk_token_id in ids:
        raise ValueError(f"tokenizer lacks location tokens for {num_bins} bins; load it with load_tokenizer()")
    return ids


def model_vocab_size(tokenizer: T5Tokenizer) -> int:
    """Rows of the model's embedding table: every token but a trailing ``<image>``, which the model
    neither reads (an image goes there) nor writes."""
    size = len(tokenizer)
    return size - 1 if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == size - 1 else size


def image_token_id(tokenizer: T5Tokenizer) -> int:
    """The id of the image placeholder ``<image>``."""
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer lacks the image placeholder {IMAGE_TOKEN!r}; load it with load_tokenizer()")
    return token_id


def train_tokenizer(
    texts: Iterable[str],
    *,
    out_dir: str | os.PathLike,
    vocab_size: int,
    num_bins: int = DEFAULT_NUM_BINS,
) -> T5Tokenizer:
    """Trains a SentencePiece BPE model on ``texts`` and saves a full tokenizer folder.

    The folder gets ``spiece.model`` and the Hugging Face tokenizer files; it is written to a
    temporary folder first and moved into place, so an interrupted run leaves nothing half-made.

    Args:
        texts: training sentences (records' text and task templates).
        out_dir: where to save; replaced if it exists.
        vocab_size: SentencePiece pieces (before the sentinels and location tokens); a soft limit,
            lowered automatically when the corpus is too small for it.
        num_bins: number of location tokens to add.

    Returns:
        The trained tokenizer, as :func:`load_tokenizer` would load it from ``out_dir``.
    """
    import sentencepiece as spm  # only needed for training

    if vocab_size < 16:
        raise ValueError(f"vocab_size must be at least 16, got {vocab_size}")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [t.strip() for t in texts if t and t.strip()]
    if not lines:
        raise ValueError("train_tokenizer got no text to train on")
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=out.parent))
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_prefix=str(tmp / "spiece"),
            vocab_size=vocab_size,
            model_type="bpe",
            # T5's special ids: pad 0, eos 1, unk 2, no bos (t5 spiece.model convention).
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            character_coverage=1.0,
            hard_vocab_limit=False,
            # Keep "<", ">" and "_" out of learnt pieces' way: location tokens are added separately.
            split_digits=True,
            minloglevel=2,
        )
        (tmp / "spiece.vocab").unlink(missing_ok=True)
        tokenizer = load_tokenizer(tmp, num_bins=num_bins)
        tokenizer.save_pretrained(str(tmp))
        _follow_umask(tmp)  # mkdtemp made it 0700: the final folder gets the modes mkdir would give it
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(out, num_bins=num_bins)
