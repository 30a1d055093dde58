"""`UnifiedVLConfig`: the text backbone (T5), the vision backbone (timm) and how they are joined.

Presets are Python entries (DESIGN.md §5): ``uvl-tiny`` trains on a laptop CPU in minutes; the
others are shaped like OFA's released sizes (Wang et al. 2022, Table 1: OFA-Medium 93M,
OFA-Base 182M, OFA-Large 472M), with a T5 text model in place of BART and the first three stages
of a ResNet as the image encoder, as OFA does (§3.1: "the first three blocks of ResNet").
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig, T5Config

from tasks.boxes import DEFAULT_NUM_BINS

# How the image reaches the language model (`visual_mode`); unified_vl.modeling has one module per mode.
VISUAL_MODES = ("fused", "prefix")
# Frozen maps the image to n = 2 embeddings (Tsimpoukelli et al. 2021, §3.1 and Appendix: "n = 2").
DEFAULT_PREFIX_LENGTH = 2
# How a ViT backbone turns pixels into patch tokens: "patch" is timm's own (one strided conv, the
# patchify stem); "conv" is a stack of 3x3 stride-2 convolutions (Xiao et al. 2021, "Early
# Convolutions Help Transformers See Better"), which learns from far fewer examples; "conv-deep" adds a
# stride-1 convolution after each of its first two (more capacity at high resolution).
VISION_STEMS = ("patch", "conv", "conv-deep")
T5_SPECIAL_IDS = {"pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}

# OFA's widths and heads, with T5 blocks (relative position bias, no biases) and a T5-sized
# vocabulary (32k SentencePiece + 1000 location tokens) in place of BART's; the layer counts are
# raised so that the parameter totals match OFA's (BART's 59k-token embedding table holds much of
# OFA's count). `unified-vl presets` prints the totals.
# Each preset: the T5 config fields and the timm backbone. `vision_out_index` picks a stage of a
# CNN's `features_only` pyramid (3 = stride-16 "layer3" of a ResNet); None uses forward_features.
PRESETS: dict[str, dict[str, Any]] = {
    "uvl-tiny": {
        "text_config": {
            "d_model": 128,
            "d_kv": 32,
            "d_ff": 512,
            "num_layers": 2,
            "num_decoder_layers": 2,
            "num_heads": 4,
            "dropout_rate": 0.0,
        },
        # 16-pixel patches: one token per cell of the synthetic world's 4 x 4 layout at 64 px.
        "vision_model": "vit_tiny_patch16_224",
        "vision_kwargs": {"patch_size": 16, "embed_dim": 192, "depth": 2, "num_heads": 3},
        "vision_out_index": None,
        "image_size": 64,
    },
    "uvl-medium": {
        "text_config": {
            "d_model": 512,
            "d_kv": 64,
            "d_ff": 2048,
            "num_layers": 9,
            "num_decoder_layers": 9,
            "num_heads": 8,
            "vocab_size": 33128,
        },
        "vision_model": "resnet50",
        "vision_kwargs": {},
        "vision_out_index": 3,
        "image_size": 256,
    },
    "uvl-base": {
        "text_config": {
            "d_model": 768,
            "d_kv": 64,
            "d_ff": 3072,
            "num_layers": 8,
            "num_decoder_layers": 7,
            "num_heads": 12,
            "vocab_size": 33128,
        },
        "vision_model": "resnet101",
        "vision_kwargs": {},
        "vision_out_index": 3,
        "image_size": 384,
    },
    "uvl-large": {
        "text_config": {
            "d_model": 1024,
            "d_kv": 64,
            "d_ff": 4096,
            "num_layers": 14,
            "num_decoder_layers": 13,
            "num_heads": 16,
            "vocab_size": 33128,
        },
        "vision_model": "resnet152",
        "vision_kwargs": {},
        "vision_out_index": 3,
        "image_size": 480,
    },
}


class UnifiedVLConfig(PretrainedConfig):
    """Configuration of :class:`~unified_vl.modeling.UnifiedVLForConditionalGeneration`.

    Args:
        text_config: T5 config fields (a dict or a ``T5Config``); kept as a ``T5Config`` sub-config
            (``config.text_config.d_model``). Fields not given fall back to ``T5Config`` defaults.
            When ``text_model_path`` is given and this is None, the folder's ``config.json`` is read.
        text_model_path: a local Hugging Face T5 folder whose weights (and ``spiece.model``)
            :func:`~unified_vl.modeling.build_model` loads. Only read when building a fresh model.
        vision_model: any timm model name (created with ``pretrained=False``: nothing downloads).
        vision_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. ViT depth).
        vision_weights_path: a local timm weight file (safetensors or a torch state dict).
        vision_out_index: stage of a ``features_only`` pyramid to use as the patch grid, or None
            to use ``forward_features``.
        vision_stem: ``"patch"`` (timm's patchify stem), ``"conv"`` (a convolutional stem in its
            place, Xiao et al. 2021; ViT backbones only, see :data:`VISION_STEMS`) or ``"conv-deep"``
            (that stem with a stride-1 convolution after each of its first two, see `modeling.ConvStem`).
        vision_stem_skip: ``"conv"`` and ``"conv-deep"`` stems only: the stem's first block, averaged over
            each patch, is added to its output through a 1x1 convolution of its own (a hypercolumn; see
            `modeling.ConvStem`), so that what the first block holds (the colour of a patch) reaches the
            tokens whatever the deeper blocks keep.
        vision_position_std: initial standard deviation of a ViT backbone's own position embedding;
            None keeps timm's (0.02). At 0.02 against patch tokens of std ~0.4 the backbone's attention
            starts blind to where a patch is; a larger value lets its blocks keep two objects apart
            from the first step (the reasoning behind `POSITION_INIT_STD` on the language model's side).
        image_position_std: ``"fused"`` mode only: initial standard deviation of the grid tokens' row and
            column embeddings on the language model's side; None keeps `modeling.POSITION_INIT_STD` (0.5,
            readable from the first step, which grounding's location outputs need). 0 starts them at zero:
            the tokens start translation-equivariant (as a CNN's global pool is invariant) and learn
            positions only as far as the loss asks for them. Not for data with boxes: in the main job it
            left REC and grounding near 0.1 after 15 minutes (docs/learning.md, "The prior on a faster day").
        vision_pooled_token: ``"fused"`` mode only: one more image token after the grid's, the grid's
            mean (the global average pool a CNN classifier reads, e.g. the benchmark's baseline), through
            the same projection, with its own learned position.
        relation_tokens: ``"fused"`` mode only: 0 (off) or the number K of vectors a Relation Network
            (Santoro et al. 2017) over the encoder's image tokens adds after the encoder's output, for the
            decoder to read: every ordered pair of grid tokens, with their grid coordinates and the
            question, through a shared MLP, averaged, then mapped to K vectors (`modeling.RelationNetwork`).
            Needs exactly one image per prompt.
        image_size: square input size in pixels; images are resized to it without cropping, so a
            box normalised by the original size stays valid.
        num_bins: number of location tokens (DESIGN.md §3; OFA uses 1000).
        visual_mode: how an image reaches the language model. ``"fused"``: its patch tokens (with
            2-D positions) run through the T5 encoder with the text, and everything trains.
            ``"prefix"`` (Frozen, Tsimpoukelli et al. 2021): the backbone's pooled feature is mapped
            by one linear layer to ``prefix_length`` vectors of the text width, and the language
            model is frozen by design (training leaves it unchanged unless ``train.freeze`` says
            otherwise). Either way an image's vectors go where its ``<image>`` placeholder is in the
            prompt, or in front of a prompt that has none.
        prefix_length: vectors per image in ``"prefix"`` mode (Frozen's n).
        image_token_id: the tokenizer's id of ``<image>``; set by
            :func:`~unified_vl.modeling.build_model` (None in folders saved before interleaving:
            :func:`~unified_vl.checkpoint.load_pretrained` fills it in from the processor).
        max_text_length: prompts are truncated to this many tokens (documented in the README).
        max_target_length: targets are truncated to this many tokens; also generation's default.
    """

    model_type = "unified_vl"
    sub_configs = {"text_config": T5Config}  # saved nested in config.json, read back as a T5Config

    def __init__(
        self,
        text_config: dict | T5Config | None = None,
        text_model_path: str | None = None,
        vision_model: str = "vit_tiny_patch16_224",
        vision_kwargs: dict | None = None,
        vision_weights_path: str | None = None,
        vision_out_index: int | None = None,
        vision_stem: str = "patch",
        vision_stem_skip: bool = False,
        vision_position_std: float | None = None,
        vision_pooled_token: bool = False,
        image_position_std: float | None = None,
        relation_tokens: int = 0,
        image_size: int = 64,
        num_bins: int = DEFAULT_NUM_BINS,
        visual_mode: str = "fused",
        prefix_length: int = DEFAULT_PREFIX_LENGTH,
        image_token_id: int | None = None,
        max_text_length: int = 128,
        max_target_length: int = 64,
        **kwargs,
    ):
        if visual_mode not in VISUAL_MODES:
            raise ValueError(f"visual_mode must be one of {', '.join(map(repr, VISUAL_MODES))}, got {visual_mode!r}")
        if vision_stem not in VISION_STEMS:
            raise ValueError(f"vision_stem must be one of {VISION_STEMS}, got {vision_stem!r}")
        if not isinstance(vision_stem_skip, bool):
            raise ValueError(f"vision_stem_skip must be true or false, got {vision_stem_skip!r}")
        if vision_stem_skip and vision_stem == "patch":
            raise ValueError(
                "vision_stem_skip needs a convolutional stem (vision_stem 'conv' or 'conv-deep'), not 'patch'"
            )
        if vision_position_std is not None and (
            isinstance(vision_position_std, bool)
            or not isinstance(vision_position_std, (int, float))
            or not vision_position_std > 0
        ):
            raise ValueError(f"vision_position_std must be a number > 0 or None, got {vision_position_std!r}")
        if image_position_std is not None and (
            isinstance(image_position_std, bool)
            or not isinstance(image_position_std, (int, float))
            or not image_position_std >= 0
        ):
            raise ValueError(f"image_position_std must be a number >= 0 or None, got {image_position_std!r}")
        if not isinstance(vision_pooled_token, bool):
            raise ValueError(f"vision_pooled_token must be true or false, got {vision_pooled_token!r}")
        if vision_pooled_token and visual_mode != "fused":
            raise ValueError(f"vision_pooled_token needs visual_mode='fused' (the grid's tokens), not {visual_mode!r}")
        if not isinstance(relation_tokens, int) or isinstance(relation_tokens, bool) or relation_tokens < 0:
            raise ValueError(
                f"relation_tokens must be an integer >= 0 (0: no Relation Network), got {relation_tokens!r}"
            )
        if relation_tokens and visual_mode != "fused":
            raise ValueError(f"relation_tokens needs visual_mode='fused' (the grid's tokens), not {visual_mode!r}")
        if not isinstance(prefix_length, int) or isinstance(prefix_length, bool) or prefix_length < 1:
            raise ValueError(f"prefix_length must be an integer >= 1, got {prefix_length!r}")
        if not isinstance(num_bins, int) or num_bins < 2:
            raise ValueError(f"num_bins must be an integer >= 2, got {num_bins!r}")
        if isinstance(text_config, T5Config):
            text_config = text_config.to_dict()
        if text_config is None and text_model_path is not None:
            config_file = Path(text_model_path) / "config.json"
            if not config_file.is_file():
                raise FileNotFoundError(
                    f"text_model_path {text_model_path!r} has no config.json (a Hugging Face T5 folder)"
                )
            text_config = json.loads(config_file.read_text())
        # T5's special ids (pad 0 doubles as decoder start, eos 1) unless the folder says otherwise.
        self.text_config = T5Config(**{**T5_SPECIAL_IDS, **(text_config or {})})  # a real sub-config
        self.text_model_path = os.fspath(text_model_path) if text_model_path is not None else None
        self.vision_model = vision_model
        self.vision_kwargs = dict(vision_kwargs or {})
        self.vision_weights_path = os.fspath(vision_weights_path) if vision_weights_path is not None else None
        self.vision_out_index = vision_out_index
        self.vision_stem = vision_stem
        self.vision_stem_skip = vision_stem_skip
        self.vision_position_std = vision_position_std
        self.vision_pooled_token = vision_pooled_token
        self.image_position_std = image_position_std
        self.relation_tokens = relation_tokens
        self.image_size = image_size
        self.num_bins = num_bins
        self.visual_mode = visual_mode
        self.prefix_length = prefix_length
        self.image_token_id = image_token_id
        self.max_text_length = max_text_length
        self.max_target_length = max_target_length
        kwargs.setdefault("is_encoder_decoder", True)
        super().__init__(**kwargs)

    @property
    def hidden_size(self) -> int:
        return self.text_config.d_model

    @classmethod
    def from_preset(cls, name: str, **overrides) -> UnifiedVLConfig:
        """A preset by name, with field overrides.

        ``text_config`` in ``overrides`` updates the preset's text config field by field.

        Raises:
            KeyError: unknown preset name (the message lists the known ones).
        """
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        fields = copy.deepcopy(PRESETS[name])
        text_overrides = overrides.pop("text_config", None) or {}
        if isinstance(text_overrides, T5Config):
            text_overrides = text_overrides.to_dict()
        fields["text_config"].update(text_overrides)
        fields.update(overrides)
        return cls(**fields)
