"""``vpt``: trained tokens in the vision transformer's input (shallow) or in every block (deep).

Visual Prompt Tuning (Jia et al. 2022, ECCV): ``P`` learned tokens go between the class token and
the patch tokens, ``[CLS ; P ; E]``; VPT-shallow adds them before the first block, VPT-deep gives
every block its own set, replacing the previous block's outputs at those positions (§3.2). The
backbone is frozen, and so is the rest of the model here: the language model plays the part of
VPT's task head and is already trained. The prompt tokens leave with the block outputs; the patch
grid the model reads keeps its size.

Initialisation follows the official code (KMnP/vpt, ``src/models/vit_prompt/vit.py``): uniform in
``±sqrt(6 / (3 * patch_area + C))``, Xavier's bound for a patch-sized fan-in.

Only timm Vision Transformers (``patch_embed``, ``_pos_embed``, ``blocks``) take tokens; a CNN
backbone has no token sequence to put them in, and is refused with a clear error.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from unified_vl.prompting import Method
from unified_vl.prompting.prompt_tuning import check_length

VIT_PARTS = ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "blocks", "norm")


class VisualPrompt(nn.Module):
    """``forward(backbone, pixel_values)``: timm ViT ``forward_features`` with prompt tokens, which leave again.

    Args:
        tokens: (L, P, C) initial prompts; L = 1 (shallow) or the number of blocks (deep).
    """

    def __init__(self, tokens: torch.Tensor):
        super().__init__()
        self.tokens = nn.Parameter(tokens.clone())  # (L, P, C)

    def forward(self, backbone: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        # timm's VisionTransformer.forward_features, with the prompts spliced in (timm 1.0).
        x = backbone.patch_embed(pixel_values)
        x = backbone._pos_embed(x)  # (B, prefix + N, C), position embeddings added
        x = backbone.patch_drop(x)
        x = backbone.norm_pre(x)
        b, first = x.shape[0], backbone.num_prefix_tokens
        length = self.tokens.shape[1]
        for i, block in enumerate(backbone.blocks):
            if i < self.tokens.shape[0]:
                prompts = self.tokens[i].to(x.dtype).unsqueeze(0).expand(b, -1, -1)  # (B, P, C)
                rest = x[:, first:] if i == 0 else x[:, first + length :]  # deep: replace the last block's prompts
                x = torch.cat([x[:, :first], prompts, rest], dim=1)  # (B, prefix + P + N, C)
            x = block(x)
        x = backbone.norm(x)
        return torch.cat([x[:, :first], x[:, first + length :]], dim=1)  # (B, prefix + N, C)


def check_backbone(model) -> nn.Module:
    """The model's timm ViT backbone; a clear error for anything else (a CNN)."""
    backbone = model.visual.backbone
    missing = [part for part in VIT_PARTS if not hasattr(backbone, part)]
    if model.visual.out_index is not None or missing:
        raise ValueError(
            f"vpt puts tokens into a vision transformer's token sequence, but this model's backbone "
            f"{model.config.vision_model!r} is a CNN (it has no {', '.join(missing) or 'token sequence'}); "
            "use prompt_tuning, cocoop, prefix_tuning or lora, or a timm ViT backbone (vit_*, deit_*)"
        )
    return backbone


def attach(model, options) -> None:
    """Freezes the model and adds VPT prompts to its ViT (every block's with ``deep``)."""
    length = check_length(options, name="vpt")
    backbone = check_backbone(model)
    channels = backbone.embed_dim
    patch = backbone.patch_embed.patch_size  # (h, w)
    bound = math.sqrt(6.0 / (3 * patch[0] * patch[1] + channels))
    layers = len(backbone.blocks) if options["deep"] else 1
    model.requires_grad_(False)
    model.visual.vision_prompt = VisualPrompt(torch.empty(layers, length, channels).uniform_(-bound, bound))


METHOD = Method(
    name="vpt",
    description="trained tokens in the ViT's input (deep=true: in every block), the rest frozen (Jia et al. 2022)",
    options={"length": 8, "deep": False},
    attach=attach,
    saves_adapter=True,
)
