"""`UnifiedVLForConditionalGeneration`: a timm image backbone feeding a T5 encoder-decoder.

Read top to bottom (VL-T5, Cho et al. 2021; OFA, Wang et al. 2022)::

    pixel_values (B, 3, S, S)
      -> timm backbone -> patch grid (B, N, C)
      -> Linear(C, D) + LayerNorm + learned 2-D position (row + column) + type embedding 0
    input_ids (B, T) -> T5 token embeddings + type embedding 1
    [patch tokens ; text tokens] (B, N + T, D) -> T5 encoder -> T5 decoder -> logits over the vocab

The attention mask is ``[1] * N`` for the patch tokens followed by the text mask, so padding of
the text never reaches a real token (batched and one-at-a-time generation agree).

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

import timm
import torch
from torch import nn
from transformers import PreTrainedModel, T5ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

from unified_vl.config import UnifiedVLConfig
from unified_vl.tokenizer import loc_token_ids

POSITION_INIT_STD = 0.5


class ConvStem(nn.Module):
    """A convolutional stem in place of ViT's patchify convolution (Xiao et al. 2021, §3).

    ``log2(patch)`` 3x3 convolutions of stride 2, each followed by BatchNorm and ReLU, with the
    channels doubling up to ``dim`` (the paper's ViT-1GF stem for 16-pixel patches and 192 channels is
    24, 48, 96, 192), then one 1x1 convolution to ``dim``. (B, 3, S, S) -> (B, dim, S / patch, S / patch),
    the shape of the convolution it replaces.
    """

    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        n = int(math.log2(patch_size))
        if 2**n != patch_size:
            raise ValueError(f"vision_stem='conv' needs a power-of-two patch size, got {patch_size}")
        channels = [3] + [max(8, dim // 2 ** (n - 1 - i)) for i in range(n)]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.layers = nn.Sequential(*layers, nn.Conv2d(channels[-1], dim, 1))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.layers(pixel_values)  # (B, dim, S / patch, S / patch)


def _use_conv_stem(backbone: nn.Module, name: str) -> None:
    """Swaps a timm ViT's patchify convolution (``patch_embed.proj``) for a `ConvStem` of the same output."""
    proj = getattr(getattr(backbone, "patch_embed", None), "proj", None)
    if not isinstance(proj, nn.Conv2d):
        raise ValueError(f"vision_stem='conv' needs a ViT backbone with patch_embed.proj; {name!r} has none")
    backbone.patch_embed.proj = ConvStem(proj.kernel_size[0], proj.out_channels)


class VisualEmbedding(nn.Module):
    """timm backbone -> (B, N, D) patch tokens with 2-D position and type embeddings."""

    def __init__(self, config: UnifiedVLConfig):
        super().__init__()
        kwargs = dict(config.vision_kwargs)
        if config.vision_out_index is not None:
            # A CNN stage as the grid (OFA uses ResNet's first three stages, §3.1).
            self.backbone = timm.create_model(
                config.vision_model,
                pretrained=False,
                features_only=True,
                out_indices=(config.vision_out_index,),
                **kwargs,
            )
        else:
            try:  # transformer backbones take the input size; CNNs refuse the argument
                self.backbone = timm.create_model(
                    config.vision_model, pretrained=False, num_classes=0, img_size=config.image_size, **kwargs
                )
            except TypeError:
                self.backbone = timm.create_model(config.vision_model, pretrained=False, num_classes=0, **kwargs)
        if config.vision_stem == "conv":
            _use_conv_stem(self.backbone, config.vision_model)
        self.out_index = config.vision_out_index
        # VPT (unified_vl.prompting.vpt): ``vision_prompt(backbone, pixel_values)`` runs the ViT with
        # trained tokens among its patch tokens and returns forward_features' output without them.
        self.vision_prompt: nn.Module | None = None
        # One dummy pass fixes the grid size and channel count for this image size.
        with torch.no_grad():
            was_training = self.backbone.training
            self.backbone.eval()
            grid = self._grid(torch.zeros(1, 3, config.image_size, config.image_size))
            self.backbone.train(was_training)
        _, channels, self.grid_h, self.grid_w = grid.shape
        d = config.hidden_size
        self.proj = nn.Linear(channels, d)
        self.norm = nn.LayerNorm(d)
        # The patch features leave the LayerNorm at unit scale; position starts at a comparable scale
        # (std 0.5, not ViT's 0.02) so that where a patch is can be read from the first step, which
        # the location outputs of grounding need.
        self.row_embed = nn.Parameter(torch.randn(self.grid_h, d) * POSITION_INIT_STD)  # (H, D)
        self.col_embed = nn.Parameter(torch.randn(self.grid_w, d) * POSITION_INIT_STD)  # (W, D)

    @property
    def num_patches(self) -> int:
        return self.grid_h * self.grid_w

    def _grid(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Backbone features as a (B, C, H, W) grid, whatever the backbone's output layout."""
        if self.out_index is not None:
            return self.backbone(pixel_values)[0]  # (B, C, H, W)
        if self.vision_prompt is not None:
            feats = self.vision_prompt(self.backbone, pixel_values)  # (B, prefix + H*W, C)
        else:
            feats = self.backbone.forward_features(pixel_values)
        if feats.ndim == 4:
            return feats  # CNN: (B, C, H, W)
        # Transformer: (B, prefix + H*W, C); drop class/register tokens.
        feats = feats[:, getattr(self.backbone, "num_prefix_tokens", 0) :]
        b, n, c = feats.shape
        h, w = self.backbone.patch_embed.grid_size
        return feats.transpose(1, 2).reshape(b, c, h, w)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        grid = self._grid(pixel_values)  # (B, C, H, W)
        tokens = grid.flatten(2).transpose(1, 2)  # (B, N, C), raster order
        pos = (self.row_embed[:, None, :] + self.col_embed[None, :, :]).reshape(-1, self.row_embed.shape[-1])  # (N, D)
        return self.norm(self.proj(tokens)) + pos  # (B, N, D)


class UnifiedVLForConditionalGeneration(PreTrainedModel):
    """Image + instruction -> text, with one T5 encoder-decoder over [patch tokens ; text tokens]."""

    config_class = UnifiedVLConfig
    base_model_prefix = "unified_vl"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["T5Block"]

    def __init__(self, config: UnifiedVLConfig):
        super().__init__(config)
        self.visual = VisualEmbedding(config)
        self.language_model = T5ForConditionalGeneration(config.text_config)  # shares the sub-config
        d = config.hidden_size
        # Type embeddings tell image tokens from text tokens (VL-T5 §3.1); zero-initialised so
        # that a pretrained T5's text path starts unchanged.
        self.type_embed = nn.Parameter(torch.zeros(2, d))  # (2, D): 0 = image, 1 = text
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

    # -- encoder side -------------------------------------------------------------------------
    def embed_inputs(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder input embeddings and mask for [prompt vectors ;] [patch tokens ; text tokens]."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        visual = self.visual(pixel_values.to(self.dtype))  # (B, N, D)
        image = visual + self.type_embed[0]  # (B, N, D)
        text = self.language_model.shared(input_ids) + self.type_embed[1]  # (B, T, D)
        parts = [image, text]
        if self.encoder_prompt is not None:
            # In front of everything: the distances between patch and text tokens, which T5's relative
            # position bias reads, stay those the pretrained model knows.
            parts.insert(0, self.encoder_prompt(visual))  # (B, P, D)
        embeds = torch.cat(parts, dim=1)  # (B, [P +] N + T, D)
        always = attention_mask.new_ones(embeds.shape[0], embeds.shape[1] - text.shape[1])  # (B, [P +] N)
        mask = torch.cat([always, attention_mask], dim=1)  # (B, [P +] N + T)
        return embeds, mask

    def encode(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        adapter_names: Sequence[str] | None = None,
    ) -> tuple[BaseModelOutput, torch.Tensor]:
        """Runs the T5 encoder; returns its output (B, [P +] N + T, D) and the matching mask.

        ``adapter_names`` (one per row) pick each row's LoRA adapter (see :meth:`rows`).
        """
        with self.rows(adapter_names):
            embeds, mask = self.embed_inputs(pixel_values, input_ids, attention_mask)
            encoder_outputs = self.language_model.encoder(inputs_embeds=embeds, attention_mask=mask, return_dict=True)
        return encoder_outputs, mask

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
        **kwargs,
    ) -> Seq2SeqLMOutput:
        """Teacher-forced pass; with ``labels`` (B, L), -100 outside the target, returns the loss.

        ``encoder_outputs`` with ``encoder_attention_mask`` (both from :meth:`encode`) skip the
        encoder, e.g. to score several candidates against one encoded input. ``adapter_names``:
        each row's LoRA adapter (:meth:`rows`).
        """
        if encoder_outputs is None:
            if pixel_values is None or input_ids is None:
                raise ValueError("forward needs pixel_values and input_ids (or encoder_outputs from encode())")
            encoder_outputs, encoder_attention_mask = self.encode(
                pixel_values, input_ids, attention_mask, adapter_names=adapter_names
            )
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
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
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
        tokenizer: if given, the token embeddings are resized to ``len(tokenizer)`` (the added
            location tokens of a pretrained T5 get fresh rows).
    """
    model = UnifiedVLForConditionalGeneration(config)
    if config.text_model_path is not None:
        model.language_model = T5ForConditionalGeneration.from_pretrained(config.text_model_path, local_files_only=True)
    if config.vision_weights_path is not None:
        load_vision_weights(model, config.vision_weights_path)
    if tokenizer is not None:
        if len(tokenizer) != model.language_model.config.vocab_size:
            model.resize_token_embeddings(len(tokenizer))
        init_location_embeddings(model, loc_token_ids(tokenizer, config.num_bins))
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
