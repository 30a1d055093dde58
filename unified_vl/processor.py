"""`UnifiedVLProcessor`: images + prompts (+ targets) -> the model's batch tensors.

Speaks tokens (DESIGN.md §7.2): ``pixel_values`` (B, 3, S, S), ``input_ids`` / ``attention_mask``
(B, T) and ``labels`` (B, L) with -100 outside the target.

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

from tasks.boxes import DEFAULT_NUM_BINS
from unified_vl.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

PROCESSOR_CONFIG = "processor_config.json"
ImageInput = Image.Image | np.ndarray | str | os.PathLike


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


class UnifiedVLProcessor:
    """Turns images and text into the model's batch.

    Args:
        tokenizer: a tokenizer from :func:`unified_vl.tokenizer.load_tokenizer`.
        image_size: square size images are resized to.
        image_mean: per-channel mean (the backbone's timm data config).
        image_std: per-channel std.
        max_text_length: prompts longer than this (in tokens) are truncated.
        max_target_length: targets longer than this are truncated.
        num_bins: number of location tokens, for the box helpers of callers.
    """

    def __init__(
        self,
        tokenizer,
        *,
        image_size: int,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        max_text_length: int = 128,
        max_target_length: int = 64,
        num_bins: int = DEFAULT_NUM_BINS,
    ):
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.max_text_length = int(max_text_length)
        self.max_target_length = int(max_target_length)
        self.num_bins = int(num_bins)
        self._warned_truncation = False

    @classmethod
    def from_config(cls, config, tokenizer=None, *, vision_backbone=None) -> UnifiedVLProcessor:
        """A processor matching a :class:`UnifiedVLConfig` (and its timm backbone's mean/std)."""
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        if vision_backbone is not None:
            import timm.data

            data_config = timm.data.resolve_model_data_config(vision_backbone)
            mean, std = data_config["mean"], data_config["std"]
        return cls(
            tokenizer if tokenizer is not None else load_tokenizer(num_bins=config.num_bins),
            image_size=config.image_size,
            image_mean=mean,
            image_std=std,
            max_text_length=config.max_text_length,
            max_target_length=config.max_target_length,
            num_bins=config.num_bins,
        )

    # -- images -------------------------------------------------------------------------------
    def preprocess_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """(B, 3, S, S) float tensor, resized (bicubic, no crop) and normalised."""
        arrays = []
        for i, image in enumerate(images):
            img = load_image(image, what=f"image {i}")
            img = img.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
            arrays.append(np.asarray(img, dtype=np.float32) / 255.0)  # (S, S, 3)
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, S, S)
        mean = torch.tensor(self.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std).view(1, 3, 1, 1)
        return (batch - mean) / std

    # -- text ---------------------------------------------------------------------------------
    def _tokenize(self, texts: Sequence[str], max_length: int, field: str) -> dict[str, torch.Tensor]:
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
        rows = [seq[: max_length - 1] + [eos] if len(seq) > max_length else list(seq) for seq in ids]
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

    def tokenize_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` (B, T), right-padded."""
        return self._tokenize(prompts, self.max_text_length, "prompts")

    def tokenize_targets(self, targets: Sequence[str]) -> torch.Tensor:
        """``labels`` (B, L) with -100 on padding."""
        out = self._tokenize(targets, self.max_target_length, "targets")
        labels = out["input_ids"].masked_fill(out["attention_mask"] == 0, -100)
        return labels

    def __call__(
        self,
        images: Sequence[ImageInput] | ImageInput | None = None,
        text: Sequence[str] | str | None = None,
        targets: Sequence[str] | str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Builds a batch.

        Args:
            images: one image or a list (PIL, numpy, or file paths).
            text: one prompt or a list, one per image.
            targets: optional target texts, one per prompt; gives ``labels``.

        Returns:
            A dict with ``pixel_values``, ``input_ids``, ``attention_mask`` and (with targets)
            ``labels``.
        """
        if isinstance(images, (Image.Image, np.ndarray, str, os.PathLike)):
            images = [images]
        if isinstance(text, str):
            text = [text]
        if isinstance(targets, str):
            targets = [targets]
        batch: dict[str, torch.Tensor] = {}
        if images is not None:
            batch["pixel_values"] = self.preprocess_images(images)
        if text is not None:
            if images is not None and len(text) != len(images):
                raise ValueError(f"got {len(images)} images but {len(text)} prompts; give one prompt per image")
            batch.update(self.tokenize_prompts(text))
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
    def to_dict(self) -> dict:
        return {
            "processor_class": type(self).__name__,
            "image_size": self.image_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "max_text_length": self.max_text_length,
            "max_target_length": self.max_target_length,
            "num_bins": self.num_bins,
        }

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Writes ``processor_config.json`` and the tokenizer files into ``save_directory``."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(folder))
        tmp = folder / (PROCESSOR_CONFIG + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, folder / PROCESSOR_CONFIG)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> UnifiedVLProcessor:
        """Loads a processor saved by :meth:`save_pretrained` (a local folder)."""
        folder = Path(path)
        config_file = folder / PROCESSOR_CONFIG
        if not config_file.is_file():
            raise FileNotFoundError(f"{str(folder)!r} has no {PROCESSOR_CONFIG}; is it a unified-vl model folder?")
        fields = json.loads(config_file.read_text())
        fields.pop("processor_class", None)
        tokenizer = load_tokenizer(folder, num_bins=fields.get("num_bins", DEFAULT_NUM_BINS))
        return cls(tokenizer, **fields)
