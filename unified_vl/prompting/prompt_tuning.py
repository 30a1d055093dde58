"""``prompt_tuning``: n trained vectors in front of the encoder input; everything else frozen.

Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"):
the encoder reads ``[P_1 .. P_n ; patch tokens ; instruction tokens]`` and only ``P`` trains. On
classification this is CoOp (Zhou et al. 2022, "Learning to Prompt for Vision-Language Models"):
a learned context in place of a hand-written template. CoOp's class name sits in CLIP's text
input; here it is what the decoder writes, and the learned context joins the instruction.

The vectors go in front of the patch tokens, not between image and text: T5's relative position
bias reads the distance between a patch and a word, and this keeps the distances the pretrained
model knows. They start as embeddings of sampled vocabulary tokens, Lester et al.'s "sampled
vocab" initialisation (§3.2: from the 5000 most common tokens; SentencePiece ids are in order of
the pieces' scores, so the first ids are the common ones), which beat random initialisation.

Why not ``peft``'s prompt tuning: it wraps the language model as ``PeftModelForSeq2SeqLM``, whose
``generate`` refuses ``inputs_embeds`` for prompt-learning methods, and our encoder input is
embeddings (patch tokens first); it also gives T5 ``num_transformer_submodules=2`` by default,
putting half of the vectors in the decoder. One parameter and one insertion point
(``model.encoder_prompt``) do it.
"""

from __future__ import annotations

import torch
from torch import nn

from unified_vl.prompting import Method
from unified_vl.tokenizer import NUM_EXTRA_IDS

COMMON_TOKENS = 5000  # Lester et al. 2021 §3.2: sampled from the 5000 most common tokens
FIRST_ORDINARY_ID = 3  # after T5's pad, eos and unk


def sampled_vocab_embeddings(model, count: int) -> torch.Tensor:
    """``count`` rows of the token-embedding table drawn (with replacement) from common ordinary tokens, (count, D).

    Ordinary: not pad/eos/unk, not T5's sentinels nor the location tokens, which follow the
    SentencePiece pieces in our vocabulary (``unified_vl.tokenizer``). Drawn with torch's global
    generator, which the trainer seeds.
    """
    table = model.language_model.get_input_embeddings().weight  # (V, D)
    last = min(COMMON_TOKENS, table.shape[0] - model.config.num_bins - NUM_EXTRA_IDS)
    if last <= FIRST_ORDINARY_ID:
        raise ValueError(f"the vocabulary of {table.shape[0]} rows has no ordinary tokens to initialise prompts from")
    ids = torch.randint(FIRST_ORDINARY_ID, last, (count,))
    return table.detach()[ids.to(table.device)].float().cpu().clone()


def check_length(options, *, name: str) -> int:
    length = options["length"]
    if length < 1:
        raise ValueError(f"{name}: option 'length' must be >= 1, got {length}")
    return length


class PromptVectors(nn.Module):
    """Learned vectors (P, D), the same for every input: ``forward(image_tokens) -> (B, P, D)``."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.vectors = nn.Parameter(init.clone())  # (P, D)

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        b = image_tokens.shape[0]
        return self.vectors.to(image_tokens.dtype).unsqueeze(0).expand(b, -1, -1)  # (B, P, D)


def attach(model, options) -> None:
    """Freezes the model and puts ``length`` trained vectors in front of its encoder input."""
    length = check_length(options, name="prompt_tuning")
    model.requires_grad_(False)
    model.encoder_prompt = PromptVectors(sampled_vocab_embeddings(model, length))


METHOD = Method(
    name="prompt_tuning",
    description="trained vectors in front of the encoder input, the rest frozen (Lester et al. 2021; CoOp)",
    options={"length": 16},
    attach=attach,
    saves_adapter=True,
)
