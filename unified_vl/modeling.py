"""`UnifiedVLForConditionalGeneration`: a timm image backbone feeding a T5 encoder-decoder.

Read top to bottom (VL-T5, Cho et al. 2021; OFA, Wang et al. 2022)::

    pixel_values (K, 3, S, S)                       the batch's K images, in the order of their placeholders
      -> visual module (by config.visual_mode):
         fused:  timm backbone -> patch grid (K, N, C) -> Linear(C, D) + LayerNorm + 2-D position
         prefix: timm backbone -> pooled (K, C) -> Linear(C, n D) -> (K, n, D)   (Frozen; the LM is frozen)
      + type embedding 0
    input_ids (B, T) -> T5 token embeddings + type embedding 1
    each <image> placeholder widened to its image's vectors (B, L, D) -> T5 encoder -> T5 decoder -> logits
      (config.relation_tokens = K > 0: a Relation Network over the encoder's grid tokens adds K vectors
       after the encoder's output, which the decoder reads with the rest)

A prompt without placeholders that comes with one image gets it in front, ``[image ; text]``, the
layout of every model before interleaving. The attention mask is 1 on every image vector and follows
the text mask elsewhere; rows stay right-padded, so padding never reaches a real token (batched and
one-at-a-time generation agree).

Three insertion points for the learned-prompt methods (``unified_vl.prompting``), each None unless a
method sets it: ``visual.vision_prompt`` (VPT: tokens inside the ViT), ``encoder_prompt`` (prompt
tuning, CoCoOp: vectors in front of the encoder input) and ``adapter_rows`` (LoRA: which adapter each
row of a batch uses). Prefix tuning reaches T5's self-attention through ``transformers``' attention
interface, LoRA through ``peft``; neither needs a line here.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import timm
import torch
from torch import nn
from transformers import PreTrainedModel, T5ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

from unified_vl.config import VISUAL_MODES, UnifiedVLConfig
from unified_vl.tokenizer import image_token_id, loc_token_ids, model_vocab_size

POSITION_INIT_STD = 0.5


def _stem_name(extra: int) -> str:
    """The ``vision_stem`` value a `ConvStem` with ``extra`` stride-1 convolutions was configured by (error messages)."""
    return "conv-deep" if extra else "conv"


class ConvStem(nn.Module):
    """A convolutional stem in place of ViT's patchify convolution (Xiao et al. 2021, §3).

    ``log2(patch)`` 3x3 convolutions of stride 2, each followed by BatchNorm and ReLU, with the
    channels doubling up to ``dim`` (the paper's ViT-1GF stem for 16-pixel patches and 192 channels is
    24, 48, 96, 192), then one 1x1 convolution to ``dim``. (B, 3, S, S) -> (B, dim, S / patch, S / patch),
    the shape of the convolution it replaces.

    ``extra``: a stride-1 3x3 conv-BN-ReLU after each of the first ``extra`` strided convolutions
    (``vision_stem="conv-deep"``: two, as in the benchmark's baseline CNN, `unified_vl.app.baselines.SmallCNN`),
    more capacity where the resolution is high: about twice the paper's stem's compute, about 7% more time
    per training step of uvl-tiny.

    ``skip`` (``vision_stem_skip``): the first block's output (after its stride-2 convolution, and its
    stride-1 one with ``extra``), averaged over each patch, is added to the stem's output through a 1x1
    convolution of its own: a hypercolumn (Hariharan et al. 2015, "Hypercolumns for Object Segmentation
    and Fine-grained Localization"), the same as concatenating it before the last 1x1. On the free layout
    the deep blocks lose the colour the first block holds as training goes on (docs/learning.md,
    "Where the colour goes"); this path keeps it one linear map away from the tokens.
    """

    def __init__(self, patch_size: int, dim: int, extra: int = 0, skip: bool = False):
        super().__init__()
        n = int(math.log2(patch_size))
        if 2**n != patch_size:
            raise ValueError(f"vision_stem={_stem_name(extra)!r} needs a power-of-two patch size, got {patch_size}")
        channels = [3] + [max(8, dim // 2 ** (n - 1 - i)) for i in range(n)]
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:], strict=True)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            if i < extra:
                layers += [nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.layers = nn.Sequential(*layers, nn.Conv2d(channels[-1], dim, 1))
        # The first block's last layer (its ReLU), and the pooling from its stride (2) to the patch's.
        self.skip_after = (6 if extra else 3) - 1 if skip else None
        self.skip = nn.Conv2d(channels[1], dim, 1, bias=False) if skip else None
        self.skip_pool = patch_size // 2

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.skip is None:
            return self.layers(pixel_values)  # (B, dim, S / patch, S / patch)
        hidden = pixel_values
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden)
            if i == self.skip_after:
                first = hidden  # (B, channels[1], S / 2, S / 2)
        return hidden + self.skip(nn.functional.avg_pool2d(first, self.skip_pool))  # (B, dim, S / patch, S / patch)


def _use_conv_stem(backbone: nn.Module, name: str, extra: int = 0, skip: bool = False) -> None:
    """Swaps a timm ViT's patchify convolution (``patch_embed.proj``) for a `ConvStem` of the same output."""
    proj = getattr(getattr(backbone, "patch_embed", None), "proj", None)
    if not isinstance(proj, nn.Conv2d):
        raise ValueError(
            f"vision_stem={_stem_name(extra)!r} needs a ViT backbone with patch_embed.proj; {name!r} has none"
        )
    backbone.patch_embed.proj = ConvStem(proj.kernel_size[0], proj.out_channels, extra, skip)


def create_backbone(config: UnifiedVLConfig) -> nn.Module:
    """The timm backbone the config names (``pretrained=False``: nothing downloads), with its stem."""
    kwargs = dict(config.vision_kwargs)
    if config.vision_out_index is not None:
        # A CNN stage as the grid (OFA uses ResNet's first three stages, §3.1).
        backbone = timm.create_model(
            config.vision_model,
            pretrained=False,
            features_only=True,
            out_indices=(config.vision_out_index,),
            **kwargs,
        )
    else:
        try:  # transformer backbones take the input size; CNNs refuse the argument
            backbone = timm.create_model(
                config.vision_model, pretrained=False, num_classes=0, img_size=config.image_size, **kwargs
            )
        except TypeError:
            backbone = timm.create_model(config.vision_model, pretrained=False, num_classes=0, **kwargs)
    if config.vision_stem in ("conv", "conv-deep"):
        extra = 2 if config.vision_stem == "conv-deep" else 0
        _use_conv_stem(backbone, config.vision_model, extra=extra, skip=config.vision_stem_skip)
    if config.vision_position_std is not None:
        pos_embed = getattr(backbone, "pos_embed", None)
        if not isinstance(pos_embed, nn.Parameter):
            raise ValueError(
                f"vision_position_std needs a backbone with a learned pos_embed (a ViT); {config.vision_model!r} has none"
            )
        with torch.no_grad():
            nn.init.normal_(pos_embed, std=config.vision_position_std)
    return backbone


def backbone_grid(
    backbone: nn.Module, out_index: int | None, pixel_values: torch.Tensor, vision_prompt: nn.Module | None = None
) -> torch.Tensor:
    """Backbone features as a (B, C, H, W) grid, whatever the backbone's output layout.

    ``vision_prompt`` (VPT) runs a ViT with its trained tokens and returns forward_features' output.
    """
    if out_index is not None:
        return backbone(pixel_values)[0]  # (B, C, H, W)
    if vision_prompt is not None:
        feats = vision_prompt(backbone, pixel_values)  # (B, prefix + H*W, C)
    else:
        feats = backbone.forward_features(pixel_values)
    if feats.ndim == 4:
        return feats  # CNN: (B, C, H, W)
    # Transformer: (B, prefix + H*W, C); drop class/register tokens.
    feats = feats[:, getattr(backbone, "num_prefix_tokens", 0) :]
    b, n, c = feats.shape
    h, w = backbone.patch_embed.grid_size
    return feats.transpose(1, 2).reshape(b, c, h, w)


def grid_shape(backbone: nn.Module, out_index: int | None, image_size: int) -> tuple[int, int, int, int]:
    """``(1, C, H, W)`` of the grid for this image size, from one dummy pass."""
    with torch.no_grad():
        was_training = backbone.training
        backbone.eval()
        grid = backbone_grid(backbone, out_index, torch.zeros(1, 3, image_size, image_size))
        backbone.train(was_training)
    return tuple(grid.shape)


class VisualEmbedding(nn.Module):
    """``visual_mode="fused"``: timm backbone -> (B, N, D) patch tokens with 2-D position embeddings."""

    freezes: tuple[str, ...] = ()  # parameter prefixes this mode keeps frozen by design: none

    def __init__(self, config: UnifiedVLConfig):
        super().__init__()
        self.backbone = create_backbone(config)
        self.out_index = config.vision_out_index
        # VPT (unified_vl.prompting.vpt): ``vision_prompt(backbone, pixel_values)`` runs the ViT with
        # trained tokens among its patch tokens and returns forward_features' output without them.
        self.vision_prompt: nn.Module | None = None
        # One dummy pass fixes the grid size and channel count for this image size.
        _, channels, self.grid_h, self.grid_w = grid_shape(self.backbone, self.out_index, config.image_size)
        d = config.hidden_size
        self.proj = nn.Linear(channels, d)
        self.norm = nn.LayerNorm(d)
        # The patch features leave the LayerNorm at unit scale; position starts at a comparable scale
        # (std 0.5, not ViT's 0.02) so that where a patch is can be read from the first step, which
        # the location outputs of grounding need.
        # config.image_position_std replaces that scale (0: positions start at zero, learnt as needed).
        std = POSITION_INIT_STD if config.image_position_std is None else config.image_position_std
        self.row_embed = nn.Parameter(torch.randn(self.grid_h, d) * std)  # (H, D)
        self.col_embed = nn.Parameter(torch.randn(self.grid_w, d) * std)  # (W, D)
        # The grid's mean as one more token (config.vision_pooled_token), with a position of its own.
        self.pool_embed = nn.Parameter(torch.randn(d) * POSITION_INIT_STD) if config.vision_pooled_token else None

    @property
    def num_patches(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def num_tokens(self) -> int:
        """Encoder positions one image takes."""
        return self.num_patches + (self.pool_embed is not None)

    def _grid(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return backbone_grid(self.backbone, self.out_index, pixel_values, self.vision_prompt)  # (B, C, H, W)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        grid = self._grid(pixel_values)  # (B, C, H, W)
        tokens = grid.flatten(2).transpose(1, 2)  # (B, N, C), raster order
        pos = (self.row_embed[:, None, :] + self.col_embed[None, :, :]).reshape(-1, self.row_embed.shape[-1])  # (N, D)
        tokens = self.norm(self.proj(tokens)) + pos  # (B, N, D)
        if self.pool_embed is None:
            return tokens
        pooled = self.norm(self.proj(grid.mean(dim=(2, 3)))) + self.pool_embed  # (B, D)
        return torch.cat([tokens, pooled[:, None]], dim=1)  # (B, N + 1, D)


class VisualPrefix(nn.Module):
    """``visual_mode="prefix"``, Frozen's visual prefix: timm backbone -> pooled (B, C) -> (B, n, D).

    Tsimpoukelli et al. 2021, §3.1: the vision encoder's globally pooled output "is linearly mapped
    and reshaped" into n embeddings of the language model's width, and only the vision encoder and
    that mapping train. The grid is mean-pooled, for CNNs and ViTs alike (a ViT's class token is
    left out, as the fused path leaves it out).
    """

    # Frozen: the language model, and the type embeddings of the text side, stay as they are.
    freezes: tuple[str, ...] = ("language_model", "type_embed")

    def __init__(self, config: UnifiedVLConfig):
        super().__init__()
        self.backbone = create_backbone(config)
        self.out_index = config.vision_out_index
        _, channels, _, _ = grid_shape(self.backbone, self.out_index, config.image_size)
        self.prefix_length = config.prefix_length
        self.proj = nn.Linear(channels, config.prefix_length * config.hidden_size)
        self.vision_prompt: nn.Module | None = None  # VPT, as in VisualEmbedding

    @property
    def num_tokens(self) -> int:
        """Encoder positions one image takes."""
        return self.prefix_length

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        grid = backbone_grid(self.backbone, self.out_index, pixel_values, self.vision_prompt)  # (B, C, H, W)
        pooled = grid.mean(dim=(2, 3))  # (B, C)
        return self.proj(pooled).view(pooled.shape[0], self.prefix_length, -1)  # (B, n, D)


# One visual module per `visual_mode` (a name is a module, DESIGN.md §7.3).
VISUAL_MODULES: dict[str, type[nn.Module]] = {"fused": VisualEmbedding, "prefix": VisualPrefix}
assert set(VISUAL_MODULES) == set(VISUAL_MODES), "unified_vl.config.VISUAL_MODES and VISUAL_MODULES disagree"


class EncoderInputs(NamedTuple):
    """The T5 encoder's input, and where each image's vectors sit in it (None without images)."""

    embeds: torch.Tensor  # (B, L, D)
    mask: torch.Tensor  # (B, L)
    image_rows: torch.Tensor | None = None  # (K,): the row of image k
    image_at: torch.Tensor | None = None  # (K, N): the positions of image k's N vectors in its row
    prompt: int = 0  # a learned encoder prompt's vectors, in front of every row


def interleave(text: torch.Tensor, mask: torch.Tensor, is_image: torch.Tensor, images: torch.Tensor) -> EncoderInputs:
    """Widens each placeholder of ``text`` into its image's vectors.

    Args:
        text: (B, T, D) token embeddings.
        mask: (B, T) attention mask, right-padded.
        is_image: (B, T) True at placeholders; the k-th True in row-major order is image k.
        images: (K, N, D) the images' vectors.

    Returns:
        ``embeds`` (B, L, D) and ``mask`` (B, L) with ``L`` the longest row's ``T + images * (N - 1)``
        (a row keeps its tokens in order from position 0, so a shorter row ends in padding), and where
        the images went.
    """
    b, _, d = text.shape
    n = images.shape[1]
    width = torch.where(is_image, n, 1)  # (B, T): positions each token takes
    start = width.cumsum(dim=1) - width  # (B, T): where each token's vectors begin
    length = int(width.sum(dim=1).max())
    rows, cols = (~is_image).nonzero(as_tuple=True)  # the text tokens
    at = (rows, start[rows, cols])
    embeds = text.new_zeros(b, length, d).index_put(at, text[rows, cols])  # (B, L, D)
    out_mask = mask.new_zeros(b, length).index_put(at, mask[rows, cols])  # (B, L)
    img_rows, img_cols = is_image.nonzero(as_tuple=True)  # row-major, the order of pixel_values
    offsets = start[img_rows, img_cols][:, None] + torch.arange(n, device=start.device)  # (K, N)
    at = (img_rows[:, None].expand(-1, n), offsets)
    embeds = embeds.index_put(at, images.to(embeds.dtype))
    out_mask = out_mask.index_put(at, out_mask.new_ones(offsets.shape))
    return EncoderInputs(embeds, out_mask, img_rows, offsets)


class RelationNetwork(nn.Module):
    """``RN(O, q) = f(mean over i, j of g(o_i, o_j, q))`` over a grid of N objects (Santoro et al. 2017, eq. 1).

    As in the paper's Sort-of-CLEVR model, the objects are the cells of a feature grid with their
    coordinates appended, ``g`` sees every ordered pair of them with the question, and its outputs are
    pooled before ``f``. Ours: the objects are the grid's tokens, the question the T5 encoder's output; ``g`` has
    three layers of ``D`` units (the paper: four of 256) to stay cheap on a CPU, its first layer split
    into a part per object and one for the question (the same linear map, computed once per object
    rather than once per pair); the pairs are averaged rather than summed, so the output's scale does
    not grow with the grid; ``f`` (two layers) ends in K vectors of width D through a LayerNorm, the
    scale of the encoder's normalised output beside them.
    """

    def __init__(self, d: int, grid_h: int, grid_w: int, num_tokens: int):
        super().__init__()
        self.grid = (grid_h, grid_w)
        self.first = nn.Linear(d + 2, d)  # o_i with its (x, y)
        self.second = nn.Linear(d + 2, d, bias=False)  # o_j with its (x, y)
        self.query = nn.Linear(d, d, bias=False)  # the question
        self.g = nn.Sequential(nn.ReLU(), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU())
        self.f = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, num_tokens * d))
        self.norm = nn.LayerNorm(d)
        self.num_tokens = num_tokens

    def forward(self, objects: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        """``objects`` (B, N, D) in raster order, ``question`` (B, D) -> (B, K, D)."""
        b, n, d = objects.shape
        # (x, y) in [-1, 1], made here: a buffer would come back uninitialised from transformers' meta-device
        # loading unless saved, and a grid's coordinates are not a weight.
        rows, cols = (torch.linspace(-1, 1, k, dtype=objects.dtype, device=objects.device) for k in self.grid)
        coords = torch.stack(torch.meshgrid(cols, rows, indexing="xy"), dim=-1).reshape(n, 2)  # (N, 2), raster order
        located = torch.cat([objects, coords.expand(b, -1, -1)], dim=-1)  # (B, N, D + 2)
        pairs = self.first(located)[:, :, None] + self.second(located)[:, None] + self.query(question)[:, None, None]
        pooled = self.g(pairs).mean(dim=(1, 2))  # (B, D): over the N x N ordered pairs
        return self.norm(self.f(pooled).view(b, self.num_tokens, d))


class UnifiedVLForConditionalGeneration(PreTrainedModel):
    """Images + instruction -> text, with one T5 encoder-decoder over the interleaved image and text vectors."""

    config_class = UnifiedVLConfig
    base_model_prefix = "unified_vl"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["T5Block"]

    def __init__(self, config: UnifiedVLConfig):
        super().__init__(config)
        self.visual = VISUAL_MODULES[config.visual_mode](config)
        self.language_model = T5ForConditionalGeneration(config.text_config)  # shares the sub-config
        d = config.hidden_size
        # Type embeddings tell image tokens from text tokens (VL-T5 §3.1); zero-initialised so
        # that a pretrained T5's text path starts unchanged.
        self.type_embed = nn.Parameter(torch.zeros(2, d))  # (2, D): 0 = image, 1 = text
        # config.relation_tokens: K vectors after the encoder's output from pairs of its grid tokens.
        self.relation = (
            RelationNetwork(d, self.visual.grid_h, self.visual.grid_w, config.relation_tokens)
            if config.relation_tokens
            else None
        )
        # Prompt tuning / CoCoOp (unified_vl.prompting): ``encoder_prompt(image_tokens) -> (B, P, D)``
        # vectors put in front of the encoder input.
        self.encoder_prompt: nn.Module | None = None
        # LoRA mixed batches (unified_vl.prompting.lora): ``adapter_rows(model, names)`` is a context in
        # which each row runs with its own adapter (``adapter_names=`` of encode / forward / generate).
        self.adapter_rows: Callable[..., contextlib.AbstractContextManager] | None = None
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # timm and T5 initialise their own modules in their constructors; ours are initialised
        # in VisualEmbedding/__init__. Nothing to redo here.
        return

    @property
    def frozen_by_design(self) -> list[str]:
        """Parameter-name prefixes the visual mode keeps frozen (prefix mode: the text side).

        Training freezes them unless ``train.freeze`` names its own list (``[]`` trains everything).
        """
        return list(self.visual.freezes)

    # -- encoder side -------------------------------------------------------------------------
    def placeholders(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, num_images: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask, is_image)``, (B, T') each: where each image goes in the prompts.

        A batch with no placeholder and one image per row gets one in front of each prompt.

        Raises:
            ValueError: the placeholders and the images do not pair up.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        token_id = self.config.image_token_id
        is_image = input_ids == token_id if token_id is not None else torch.zeros_like(input_ids, dtype=torch.bool)
        if num_images == input_ids.shape[0] > 0 and not is_image.any():  # one image per row, in front
            is_image = torch.cat([torch.ones_like(is_image[:, :1]), is_image], dim=1)  # (B, 1 + T)
            input_ids = torch.cat([torch.zeros_like(input_ids[:, :1]), input_ids], dim=1)
            attention_mask = torch.cat([torch.ones_like(attention_mask[:, :1]), attention_mask], dim=1)
        if int(is_image.sum()) != num_images:
            raise ValueError(
                f"the prompts hold {int(is_image.sum())} image placeholders but pixel_values holds {num_images} "
                "images; the processor pairs them (one <image> per image, in order)"
            )
        return input_ids, attention_mask, is_image

    def embed_inputs(
        self,
        pixel_values: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder input embeddings (B, [P +] L, D) and mask, each image's vectors at its placeholder.

        ``pixel_values`` (K, 3, S, S) holds the batch's images in the order of their ``<image>``
        placeholders, row by row (None or K = 0: text only). A batch with no placeholder and one image
        per row has each image in front of its prompt. A learned encoder prompt (P vectors) goes in
        front of everything.

        Raises:
            ValueError: the placeholders and the images do not pair up.
        """
        inputs = self.encoder_inputs(pixel_values, input_ids, attention_mask)
        return inputs.embeds, inputs.mask

    def encoder_inputs(
        self,
        pixel_values: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> EncoderInputs:
        """:meth:`embed_inputs` and where each image's vectors went (after a learned encoder prompt)."""
        num_images = 0 if pixel_values is None else pixel_values.shape[0]
        input_ids, attention_mask, is_image = self.placeholders(input_ids, attention_mask, num_images)
        visual = self.visual(pixel_values.to(self.dtype)) if num_images else None  # (K, N, D)
        # The placeholder is never looked up: its id may lie past the table of an older model.
        ids = input_ids.masked_fill(is_image, self.config.text_config.pad_token_id)
        text = self.language_model.shared(ids) + self.type_embed[1]  # (B, T, D)
        if visual is None:
            inputs = EncoderInputs(text, attention_mask)
        else:
            inputs = interleave(text, attention_mask, is_image, visual + self.type_embed[0])  # (B, L, D)
        if self.encoder_prompt is not None:
            if visual is None or not bool((is_image.sum(dim=1) == 1).all()):
                raise ValueError("a learned encoder prompt (prompt tuning, CoCoOp) needs exactly one image per prompt")
            # In front of everything: the distances between patch and text tokens, which T5's relative
            # position bias reads, stay those the pretrained model knows.
            prompt = self.encoder_prompt(visual)  # (B, P, D): row k's image is image k
            inputs = EncoderInputs(
                torch.cat([prompt, inputs.embeds], dim=1),  # (B, P + L, D)
                torch.cat([inputs.mask.new_ones(prompt.shape[:2]), inputs.mask], dim=1),  # (B, P + L)
                inputs.image_rows,
                inputs.image_at + prompt.shape[1],
                prompt.shape[1],
            )
        return inputs

    def encode(
        self,
        pixel_values: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        adapter_names: Sequence[str] | None = None,
    ) -> tuple[BaseModelOutput, torch.Tensor]:
        """Runs the T5 encoder; returns its output (B, [P +] L [+ K], D) and the matching mask.

        ``K``: the Relation Network's vectors (``config.relation_tokens``), after the encoder's output.

        ``adapter_names`` (one per row) pick each row's LoRA adapter (see :meth:`rows`).
        """
        with self.rows(adapter_names):
            inputs = self.encoder_inputs(pixel_values, input_ids, attention_mask)
            encoder_outputs = self.language_model.encoder(
                inputs_embeds=inputs.embeds, attention_mask=inputs.mask, return_dict=True
            )
        if self.relation is None:
            return encoder_outputs, inputs.mask
        return self.add_relation_tokens(encoder_outputs, inputs)

    def add_relation_tokens(
        self, encoder_outputs: BaseModelOutput, inputs: EncoderInputs
    ) -> tuple[BaseModelOutput, torch.Tensor]:
        """The encoder's output (B, L, D) with the Relation Network's K vectors after it: (B, L + K, D).

        Its objects are each row's grid tokens as they enter the encoder (``inputs.embeds``: the cells
        of a CNN's map, as in the paper), its question the mean of the encoder's outputs at the row's
        text tokens (the paper: an LSTM's last state). The decoder's cross-attention has no positions,
        so the K vectors can follow the padding.

        Raises:
            ValueError: a row without exactly one image.
        """
        embeds, mask, rows, at, prompt = inputs
        b = embeds.shape[0]
        if rows is None or rows.shape[0] != b or not bool((rows == torch.arange(b, device=rows.device)).all()):
            raise ValueError(
                "relation_tokens (a Relation Network over one image's grid) needs exactly one image per prompt"
            )
        hidden = encoder_outputs.last_hidden_state  # (B, L, D); row k holds image k
        grid = at[:, : self.visual.num_patches]  # (B, N): the grid's tokens (a pooled token follows them)
        objects = embeds.gather(1, grid[..., None].expand(-1, -1, embeds.shape[-1]))  # (B, N, D)
        is_text = mask.clone()
        is_text[:, :prompt] = 0
        is_text.scatter_(1, at, 0)
        weights = is_text.to(hidden.dtype)[..., None]  # (B, L, 1)
        question = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)  # (B, D)
        extra = self.relation(objects, question)  # (B, K, D)
        hidden = torch.cat([hidden, extra], dim=1)
        mask = torch.cat([mask, mask.new_ones(extra.shape[:2])], dim=1)
        return BaseModelOutput(last_hidden_state=hidden), mask

    def rows(self, adapter_names: Sequence[str] | None) -> contextlib.AbstractContextManager:
        """A context in which row ``i`` of every batch runs with adapter ``adapter_names[i]``.

        Only adapters that mix in one batch (LoRA, through ``peft``'s ``adapter_names``) set
        ``adapter_rows``; ``"__base__"`` is a row without adapter. None: nothing changes.

        Raises:
            ValueError: names given to a model that holds no such adapters.
        """
        if adapter_names is None:
            return contextlib.nullcontext()
        if self.adapter_rows is None:
            raise ValueError("adapter_names needs adapters that mix rows in one batch (LoRA); this model holds none")
        return self.adapter_rows(self, list(adapter_names))

    # -- training / scoring -------------------------------------------------------------------
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        adapter_names: Sequence[str] | None = None,
        encoder_rows: torch.Tensor | None = None,
        **kwargs,
    ) -> Seq2SeqLMOutput:
        """Teacher-forced pass; with ``labels`` (B, L), -100 outside the target, returns the loss.

        ``encoder_outputs`` with ``encoder_attention_mask`` (both from :meth:`encode`) skip the
        encoder, e.g. to score several candidates against one encoded input. ``encoder_rows`` (B',):
        the encoded row each decoder row reads, so that one pass scores several targets per input
        (mixup's two, `engine.trainer.mixup_forward`); None: row for row. ``adapter_names``: each row's
        LoRA adapter (:meth:`rows`).
        """
        if encoder_outputs is None:
            if input_ids is None:
                raise ValueError("forward needs input_ids and pixel_values (or encoder_outputs from encode())")
            encoder_outputs, encoder_attention_mask = self.encode(
                pixel_values, input_ids, attention_mask, adapter_names=adapter_names
            )
        if encoder_rows is not None:
            encoder_outputs = BaseModelOutput(last_hidden_state=encoder_outputs.last_hidden_state[encoder_rows])
            encoder_attention_mask = encoder_attention_mask[encoder_rows]
        with self.rows(adapter_names):
            return self.language_model(
                encoder_outputs=encoder_outputs,
                attention_mask=encoder_attention_mask,
                labels=labels,
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask,
                return_dict=True,
                **kwargs,
            )

    # -- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        adapter_names: Sequence[str] | None = None,
        **generation_kwargs,
    ):
        """Greedy or beam search with the KV cache (T5's ``generate`` over our encoder output).

        Any ``transformers`` generation argument passes through (``num_beams``,
        ``max_new_tokens``, ``logits_processor``, ``prefix_allowed_tokens_fn``, ...).
        ``adapter_names``: each row's LoRA adapter (:meth:`rows`).
        """
        encoder_outputs, mask = self.encode(pixel_values, input_ids, attention_mask, adapter_names=adapter_names)
        if "max_length" not in generation_kwargs and "max_new_tokens" not in generation_kwargs:
            generation_kwargs["max_new_tokens"] = self.config.max_target_length
        beams = generation_kwargs.get("num_beams") or 1
        # The decoder runs each input's beams as consecutive rows (generate's repeat_interleave).
        decoder_names = None if adapter_names is None else [n for n in adapter_names for _ in range(beams)]
        with self.rows(decoder_names):
            return self.language_model.generate(
                encoder_outputs=encoder_outputs, attention_mask=mask, **generation_kwargs
            )

    # -- embeddings ---------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def resize_token_embeddings(self, new_num_tokens: int, **kwargs) -> nn.Embedding:
        embeddings = self.language_model.resize_token_embeddings(new_num_tokens, **kwargs)
        self.config.text_config = self.language_model.config
        return embeddings


def load_vision_weights(model: UnifiedVLForConditionalGeneration, path: str | os.PathLike) -> list[str]:
    """Loads a local timm weight file (safetensors or a torch state dict) into the backbone.

    Keys of a classification head that our headless backbone does not have are dropped and
    returned; any other mismatch is an error naming the keys.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vision weight file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        # weights_only: never unpickle code from a weight file.
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
                break
    backbone = model.visual.backbone
    own = backbone.state_dict()
    dropped = [k for k in state if k not in own]
    head_prefixes = ("head", "fc.", "classifier", "fc_norm")
    unexpected = [k for k in dropped if not k.startswith(head_prefixes)]
    missing = [k for k in own if k not in state]
    if unexpected or missing:
        raise ValueError(
            f"vision weights {str(path)!r} do not fit {model.config.vision_model!r}: "
            f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    backbone.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)
    return dropped


def build_model(config: UnifiedVLConfig, tokenizer=None) -> UnifiedVLForConditionalGeneration:
    """A fresh model from ``config``, with local backbone weights loaded where the config names them.

    Args:
        config: the model config; ``text_model_path`` and ``vision_weights_path`` are read here.
        tokenizer: if given, the token embeddings are resized to ``model_vocab_size(tokenizer)``
            (the added location tokens of a pretrained T5 get fresh rows), and
            ``config.image_token_id`` is the tokenizer's ``<image>``.
    """
    model = UnifiedVLForConditionalGeneration(config)
    if config.text_model_path is not None:
        model.language_model = T5ForConditionalGeneration.from_pretrained(config.text_model_path, local_files_only=True)
    if config.vision_weights_path is not None:
        load_vision_weights(model, config.vision_weights_path)
    if tokenizer is not None:
        if model_vocab_size(tokenizer) != model.language_model.config.vocab_size:
            model.resize_token_embeddings(model_vocab_size(tokenizer))
        init_location_embeddings(model, loc_token_ids(tokenizer, config.num_bins))
        model.config.image_token_id = image_token_id(tokenizer)
    model.config.text_config = model.language_model.config
    return model


LOC_KERNEL_WIDTH = 0.02  # in units of the image side: bins 20 apart (of 1000) start with similarity 0.6


def init_location_embeddings(model: UnifiedVLForConditionalGeneration, loc_ids: list[int]) -> None:
    """Gives ``<loc_0>``..``<loc_{n-1}>`` embeddings that vary smoothly with the bin.

    Random Fourier features (Rahimi & Recht, 2007): row ``i`` is ``sqrt(2) cos(w * i / (n - 1) + b)``
    with ``w ~ N(0, 1 / LOC_KERNEL_WIDTH^2)`` per dimension, so the dot product of two rows
    approximates a Gaussian kernel of the distance between their bins. With the output layer tied
    to these rows, a hidden state that scores bin ``t`` high scores its neighbours high too, and
    what one bin learns reaches the bins around it; independent random rows would have to learn
    1000 coordinates one by one (the plateau of writing one repeated token that we saw). The rows
    are scaled to the standard deviation of the other embedding rows and stay trainable.
    """
    lm = model.language_model
    tables = [lm.get_input_embeddings().weight]  # (V, D)
    if lm.get_output_embeddings() is not None and lm.get_output_embeddings().weight is not tables[0]:
        tables.append(lm.get_output_embeddings().weight)  # an untied output layer (T5 v1.1) gets the same
    d = tables[0].shape[1]
    freq = torch.randn(d) / LOC_KERNEL_WIDTH  # (D,)
    phase = torch.rand(d) * 2 * torch.pi  # (D,)
    position = torch.linspace(0, 1, len(loc_ids))[:, None]  # (n, 1)
    features = (2**0.5) * torch.cos(position * freq + phase)  # (n, D), unit variance
    with torch.no_grad():
        for weight in tables:
            ids = torch.tensor(loc_ids, device=weight.device)
            others = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
            others[ids] = False
            scale = weight[others].float().std() if others.any() else 1.0
            weight[ids] = (features * scale).to(device=weight.device, dtype=weight.dtype)
