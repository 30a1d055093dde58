"""`UnifiedVLProcessor`: images + prompts (+ targets) -> the model's batch tensors.

Speaks tokens (DESIGN.md §7.2): ``pixel_values`` (K, 3, S, S), ``input_ids`` / ``attention_mask``
(B, T) and ``labels`` (B, L) with -100 outside the target.

Interleaved images: a prompt may come with several images (or none) and holds one placeholder
``<image>`` (:data:`unified_vl.tokenizer.IMAGE_TOKEN`) where each goes, e.g. Frozen's few-shot
``"<image> this is a dax. <image> this is a blicket. <image> question: what is this? answer:"``
(Tsimpoukelli et al. 2021, §4.3). ``pixel_values`` holds the batch's K images in order, prompt by
prompt, and the model puts each image's vectors at its placeholder. A prompt without placeholders
takes a single image in front, as every prompt did before interleaving (PaliGemma's processor
prepends its image tokens the same way when a prompt has none); a batch made only of such prompts
is tokenized exactly as before. A placeholder counts one token of ``max_text_length``.

Images are resized to S x S *without cropping* (unlike timm's eval transform, which centre-crops):
a crop would cut boxes off, and location tokens are normalised by the original width and height.
Mean and std come from the backbone's timm data config.

Long text: prompts are truncated to ``max_text_length`` tokens and targets to
``max_target_length`` tokens (the end-of-sequence token is kept); a warning says so once.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers import ProcessorMixin
from transformers.image_processing_base import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

from tasks.boxes import DEFAULT_NUM_BINS
from unified_vl.tokenizer import IMAGE_TOKEN, image_token_id, load_tokenizer

logger = logging.getLogger(__name__)

PROCESSOR_CONFIG = "processor_config.json"
ImageInput = Image.Image | np.ndarray | str | os.PathLike
# What one prompt comes with: an image, a list of images (interleaved; [] or None: none).
PromptImages = ImageInput | Sequence[ImageInput] | None


class ImageLoadError(ValueError):
    """An image that cannot be read (missing, corrupt, or of an unknown kind)."""


def load_image(image: ImageInput, *, what: str = "image") -> Image.Image:
    """A PIL RGB image from a PIL image, a numpy array (H, W), (H, W, 1|3|4) or a file path.

    Grayscale, palette and RGBA images are converted to RGB (alpha is dropped).

    Raises:
        ImageLoadError: the path does not exist, the file is not an image, or the array's shape
            or dtype is not an image's. The message names ``what`` and the path.
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ImageLoadError(f"{what}: file {str(path)!r} does not exist")
        try:
            with Image.open(path) as img:
                img.load()
                return img.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise ImageLoadError(f"{what}: {str(path)!r} is not a readable image ({exc})") from exc
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise ImageLoadError(f"{what}: expected an array of shape (H, W) or (H, W, 3|4), got {array.shape}")
        if array.dtype != np.uint8:
            if np.issubdtype(array.dtype, np.floating) and array.size and 0.0 <= array.min() and array.max() <= 1.0:
                array = (array * 255).round()
            array = np.clip(array, 0, 255).astype(np.uint8)
        return Image.fromarray(array).convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    raise ImageLoadError(f"{what}: expected a PIL image, a numpy array or a file path, got {type(image).__name__}")


class UnifiedVLImageProcessor(BaseImageProcessor):
    """Images -> ``pixel_values`` (B, 3, S, S): RGB, resized to S x S (bicubic, no crop), normalised.

    A ``transformers`` image processor (``AutoImageProcessor`` loads it from a model folder once
    ``unified_vl`` is imported). It keeps its own small pipeline rather than a ``PilBackend``'s
    (which could resize, rescale and normalise too) so that its pixels are exactly those every
    trained model saw.

    Args:
        image_size: square size images are resized to.
        image_mean: per-channel mean (the backbone's timm data config).
        image_std: per-channel std.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        image_size: int = 64,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.image_size = int(image_size)
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]

    def preprocess(self, images: Sequence[ImageInput] | ImageInput, **kwargs) -> BatchFeature:
        """``{"pixel_values": (B, 3, S, S) float tensor}``; a single image makes a batch of one."""
        if isinstance(images, (Image.Image, np.ndarray, str, os.PathLike)):
            images = [images]
        arrays = []
        for i, image in enumerate(images):
            img = load_image(image, what=f"image {i}")
            img = img.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
            arrays.append(np.asarray(img, dtype=np.float32) / 255.0)  # (S, S, 3)
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, S, S)
        mean = torch.tensor(self.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std).view(1, 3, 1, 1)
        return BatchFeature({"pixel_values": (batch - mean) / std})


class UnifiedVLProcessor(ProcessorMixin):
    """Turns images and text into the model's batch; a ``transformers`` ``ProcessorMixin``.

    ``AutoProcessor.from_pretrained(folder)`` loads it once ``unified_vl`` is imported;
    ``save_pretrained`` writes ``processor_config.json`` (the image processor nested in it) and the
    tokenizer files.

    Args:
        image_processor: a :class:`UnifiedVLImageProcessor`.
        tokenizer: a tokenizer from :func:`unified_vl.tokenizer.load_tokenizer`.
        max_text_length: prompts longer than this (in tokens) are truncated.
        max_target_length: targets longer than this are truncated.
        num_bins: number of location tokens, for the box helpers of callers.
    """

    def __init__(
        self,
        image_processor: UnifiedVLImageProcessor,
        tokenizer,
        max_text_length: int = 128,
        max_target_length: int = 64,
        num_bins: int = DEFAULT_NUM_BINS,
        **kwargs,
    ):
        # ProcessorMixin saves the positional-or-keyword arguments of __init__ besides the sub-processors.
        self.max_text_length = int(max_text_length)
        self.max_target_length = int(max_target_length)
        self.num_bins = int(num_bins)
        self._warned_truncation = False
        super().__init__(image_processor, tokenizer, **kwargs)

    @property
    def image_size(self) -> int:
        return self.image_processor.image_size

    @property
    def image_token_id(self) -> int:
        """The id of the image placeholder ``<image>``."""
        return image_token_id(self.tokenizer)

    @classmethod
    def from_config(cls, config, tokenizer=None, *, vision_backbone=None) -> UnifiedVLProcessor:
        """A processor matching a :class:`UnifiedVLConfig` (and its timm backbone's mean/std)."""
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        if vision_backbone is not None:
            import timm.data

            data_config = timm.data.resolve_model_data_config(vision_backbone)
            mean, std = data_config["mean"], data_config["std"]
        return cls(
            UnifiedVLImageProcessor(config.image_size, mean, std),
            tokenizer if tokenizer is not None else load_tokenizer(num_bins=config.num_bins),
            max_text_length=config.max_text_length,
            max_target_length=config.max_target_length,
            num_bins=config.num_bins,
        )

    # -- images -------------------------------------------------------------------------------
    def preprocess_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """(B, 3, S, S) float tensor, resized (bicubic, no crop) and normalised."""
        return self.image_processor(images)["pixel_values"]

    # -- text ---------------------------------------------------------------------------------
    def _tokenize(
        self, texts: Sequence[str], max_length: int, field: str, image_counts: Sequence[int] | None = None
    ) -> dict[str, torch.Tensor]:
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"{field} {i}: expected a string, got {type(t).__name__}")
        ids = self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]  # unpadded, ends in eos
        if any(len(x) > max_length for x in ids) and not self._warned_truncation:
            logger.warning(
                "%s longer than %d tokens are truncated (keeping the end-of-sequence token)", field, max_length
            )
            self._warned_truncation = True
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        guard = self.image_token_id if field == "prompts" else None  # a cut must not drop an image
        rows = [self._truncate(seq, max_length, eos, guard, f"prompt {i}") for i, seq in enumerate(ids)]
        if image_counts is not None:
            rows = self._place_images(rows, image_counts)
        # Right padding: T5's relative positions of real tokens do not depend on the pad count.
        masks = []
        width = max(len(r) for r in rows) if rows else 0
        for r in rows:
            masks.append([1] * len(r) + [0] * (width - len(r)))
            r.extend([pad] * (width - len(r)))
        return {
            "input_ids": torch.tensor(rows, dtype=torch.long),
            "attention_mask": torch.tensor(masks, dtype=torch.long),
        }

    @staticmethod
    def _truncate(seq: list[int], max_length: int, eos: int, token: int | None, what: str) -> list[int]:
        """``seq`` cut to ``max_length`` tokens, eos kept; a placeholder ``token`` past the cut is an error."""
        if len(seq) <= max_length:
            return list(seq)
        if token is not None and token in seq[max_length - 1 :]:
            last = len(seq) - 1 - seq[::-1].index(token)
            raise ValueError(
                f"{what}: its {seq.count(token)} images and text take {len(seq)} tokens, and the image "
                f"placeholder at token {last} lies past max_text_length={max_length} (a placeholder is one token); "
                "give fewer images or shorter text"
            )
        return seq[: max_length - 1] + [eos]

    def _place_images(self, rows: list[list[int]], image_counts: Sequence[int]) -> list[list[int]]:
        """Checks that each prompt has one placeholder per image; puts one in front of a prompt without any."""
        token = self.image_token_id
        placeholders = [row.count(token) for row in rows]
        for i, (have, count) in enumerate(zip(placeholders, image_counts, strict=True)):
            if have != count and not (have == 0 and count == 1):
                raise ValueError(
                    f"prompt {i} holds {have} image placeholder(s) {IMAGE_TOKEN!r} but comes with {count} image(s); "
                    f"put one {IMAGE_TOKEN} where each image goes (a prompt without any takes a single image in front)"
                )
        if all(have == 0 and count == 1 for have, count in zip(placeholders, image_counts, strict=True)):
            return rows  # every image in front: the model puts it there (the layout before interleaving)
        # Outside max_text_length, like the image in front of a prompt in a batch of such prompts.
        return [
            [token, *row] if have == 0 and count == 1 else row
            for row, have, count in zip(rows, placeholders, image_counts, strict=True)
        ]

    def tokenize_prompts(
        self, prompts: Sequence[str], image_counts: Sequence[int] | None = None
    ) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` (B, T), right-padded.

        Args:
            prompts: the prompts.
            image_counts: images per prompt, to check against its placeholders (None: unchecked).

        Raises:
            ValueError: placeholders and images do not pair up, or a placeholder lies past
                ``max_text_length``.
        """
        return self._tokenize(prompts, self.max_text_length, "prompts", image_counts)

    def tokenize_targets(self, targets: Sequence[str]) -> torch.Tensor:
        """``labels`` (B, L) with -100 on padding."""
        out = self._tokenize(targets, self.max_target_length, "targets")
        if (out["input_ids"] == self.image_token_id).any():
            row = int((out["input_ids"] == self.image_token_id).any(dim=1).nonzero()[0, 0])
            raise ValueError(f"target {row} holds the image placeholder {IMAGE_TOKEN!r}; targets are text")
        labels = out["input_ids"].masked_fill(out["attention_mask"] == 0, -100)
        return labels

    def __call__(
        self,
        images: Sequence[PromptImages] | ImageInput | None = None,
        text: Sequence[str] | str | None = None,
        targets: Sequence[str] | str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Builds a batch.

        Args:
            images: one entry per prompt: an image (PIL, numpy, or a file path), or a list of
                images for an interleaved prompt (``[]`` or None: no image); or one image.
            text: one prompt or a list, one per entry of ``images``; a prompt holds one ``<image>``
                per image, or none to take a single image in front.
            targets: optional target texts, one per prompt; gives ``labels``.

        Returns:
            A dict with ``pixel_values`` (K, 3, S, S: the K images in order, prompt by prompt),
            ``input_ids``, ``attention_mask`` and (with targets) ``labels``.

        Raises:
            ValueError: mismatched lengths, or a prompt whose placeholders and images do not pair up.
        """
        images = _image_lists(images)
        if isinstance(text, str):
            text = [text]
        if isinstance(targets, str):
            targets = [targets]
        batch: dict[str, torch.Tensor] = {}
        if images is not None:
            flat = [image for row in images for image in row]
            size = self.image_size
            batch["pixel_values"] = self.preprocess_images(flat) if flat else torch.zeros(0, 3, size, size)
        if text is not None:
            if images is not None and len(text) != len(images):
                raise ValueError(
                    f"got {len(images)} images but {len(text)} prompts; give one prompt per image "
                    "(or a list of images per prompt: images=[[a, b], [c]])"
                )
            counts = [len(row) for row in images] if images is not None else None
            batch.update(self.tokenize_prompts(text, counts))
        if targets is not None:
            if text is not None and len(targets) != len(text):
                raise ValueError(f"got {len(text)} prompts but {len(targets)} targets; give one target per prompt")
            batch["labels"] = self.tokenize_targets(targets)
        return batch

    def decode(self, sequences: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        """Generated ids -> text, special tokens (pad, eos) removed, location tokens kept."""
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        return [self.tokenizer.decode(seq, skip_special_tokens=True).strip() for seq in sequences]

    # -- persistence --------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Writes ``processor_config.json`` and the tokenizer files into ``save_directory``."""
        super().save_pretrained(str(save_directory), **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> UnifiedVLProcessor:
        """Loads a processor saved by :meth:`save_pretrained` (a local folder), or by earlier versions.

        Raises:
            FileNotFoundError: the folder has no ``processor_config.json``.
        """
        folder = Path(path)
        config_file = folder / PROCESSOR_CONFIG
        if not config_file.is_file():
            raise FileNotFoundError(f"{str(folder)!r} has no {PROCESSOR_CONFIG}; is it a unified-vl model folder?")
        fields = json.loads(config_file.read_text())
        num_bins = fields.get("num_bins", DEFAULT_NUM_BINS)
        if "image_processor" not in fields:  # the flat file of folders saved before the ProcessorMixin
            image = {k: fields[k] for k in ("image_size", "image_mean", "image_std")}
            return cls(
                UnifiedVLImageProcessor(**image),
                load_tokenizer(folder, num_bins=num_bins),
                max_text_length=fields["max_text_length"],
                max_target_length=fields["max_target_length"],
                num_bins=num_bins,
            )
        processor = super().from_pretrained(str(folder), local_files_only=True, **kwargs)
        # The folder's tokenizer as load_tokenizer reads it: T5's sentinels and the location tokens.
        processor.tokenizer = load_tokenizer(folder, num_bins=num_bins)
        return processor


def _is_image(value) -> bool:
    return isinstance(value, (Image.Image, np.ndarray, str, os.PathLike))


def _image_lists(images) -> list[list[ImageInput]] | None:
    """``images`` of ``__call__`` as one list of images per prompt (None stays None)."""
    if images is None:
        return None
    if _is_image(images):
        return [[images]]
    return [[] if entry is None else [entry] if _is_image(entry) else list(entry) for entry in images]
