"""``cocoop``: prompt vectors shifted per image by a small meta-network (CoCoOp).

Conditional prompt learning (Zhou et al. 2022, "Conditional Prompt Learning for Vision-Language
Models", CVPR): each learned context vector becomes ``v_m + pi(x)``, where ``pi`` is a two-layer
bottleneck meta-network (Linear-ReLU-Linear, hidden width D/16, §4 "Meta-Net") of the image
feature ``x``, so the prompt adapts to each image; the paper's claim is that this generalises to
classes unseen in training better than CoOp's static context. ``x`` here is the mean of the patch
tokens, L2-normalised as CoCoOp's code normalises CLIP's image feature before the meta-network.

The meta-network's output layer starts at zero, so the method starts as prompt tuning (the
pretrained model's behaviour plus the same sampled-vocabulary context) and learns the shift. The
context length defaults to CoCoOp's 4 (§5: "the context length is fixed to 4").
"""

from __future__ import annotations

import torch
from torch import nn

from unified_vl.prompting import Method
from unified_vl.prompting.prompt_tuning import check_length, sampled_vocab_embeddings

BOTTLENECK = 16  # CoCoOp §4: the hidden layer reduces the input dimension 16-fold


class ConditionalPrompt(nn.Module):
    """``forward(image_tokens (B, N, D)) -> (B, P, D)``: learned vectors plus ``pi(mean image token)``."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        d = init.shape[1]
        hidden = max(1, d // BOTTLENECK)
        self.vectors = nn.Parameter(init.clone())  # (P, D)
        self.meta_net = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, d))
        nn.init.zeros_(self.meta_net[2].weight)
        nn.init.zeros_(self.meta_net[2].bias)

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        feature = nn.functional.normalize(image_tokens.mean(dim=1), dim=-1)  # (B, D)
        shift = self.meta_net(feature.to(self.vectors.dtype))  # (B, D)
        return (self.vectors.unsqueeze(0) + shift.unsqueeze(1)).to(image_tokens.dtype)  # (B, P, D)


def attach(model, options) -> None:
    """Freezes the model; image-conditioned context vectors go in front of its encoder input."""
    length = check_length(options, name="cocoop")
    model.requires_grad_(False)
    model.encoder_prompt = ConditionalPrompt(sampled_vocab_embeddings(model, length))


METHOD = Method(
    name="cocoop",
    description="prompt vectors shifted per image by a meta-network of the image feature (CoCoOp, Zhou et al. 2022)",
    options={"length": 4},
    attach=attach,
    saves_adapter=True,
)
