"""``prefix_tuning``: trained key/value prefixes in every self-attention layer of the encoder and decoder.

Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation"):
every attention layer attends to ``P`` extra positions whose keys and values are trained, in the
encoder and the decoder (§4.2: the encoder-decoder case prefixes both); all of the model is
frozen. Cross-attention is left alone: it attends to the encoder's output, which the encoder's
prefixes already shape.

The prefixes have no position: T5's relative position bias is 0 towards them, and no mask hides
them (padding and causality apply to the real keys only). They start as the layer's own keys and
values of sampled vocabulary embeddings, a stand-in for Li & Liang's "initialise with the
activations of real words" (§7.2, better in low-data settings). Li & Liang train through an MLP
reparametrisation for stability (§4.3); we train the prefixes directly, which Adam handles at
these sizes, so that the adapter is the prefixes themselves.

Why our own module: ``peft``'s prefix tuning feeds the prefixes as ``past_key_values``, which
T5's encoder ignores, so on an encoder-decoder it reaches only the decoder; and its
``PeftModelForSeq2SeqLM.generate`` refuses ``inputs_embeds``, which our encoder input is. The
insertion is ``transformers``' documented extension point for attention (``AttentionInterface``,
https://huggingface.co/docs/transformers/attention_interface): an attention function that
prepends a layer's prefix to its keys and values, then runs SDPA; T5's own code is untouched.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from unified_vl.prompting import Method
from unified_vl.prompting.prompt_tuning import check_length, sampled_vocab_embeddings

PREFIX_ATTENTION = "unified_vl_prefix"  # our attention function's name in transformers' registry


class KVPrefix(nn.Module):
    """One attention layer's trained keys and values, (H, P, d_kv) each."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor):
        super().__init__()
        self.key = nn.Parameter(key.clone())  # (H, P, d_kv)
        self.value = nn.Parameter(value.clone())  # (H, P, d_kv)


def prefix_attention(module, query, key, value, attention_mask, position_bias=None, **kwargs):
    """SDPA attention over ``[prefix ; keys]`` for a layer with a ``kv_prefix``, plain SDPA otherwise.

    ``query`` (B, H, Q, d), ``key``/``value`` (B, H, K, d); ``attention_mask`` is SDPA's (boolean
    or additive, (B, 1, Q, K)) or None; ``position_bias`` (1 or B, H, Q, K).
    """
    prefix = getattr(module, "kv_prefix", None)
    if prefix is not None:
        b, q_len, k_len = query.shape[0], query.shape[2], key.shape[2]
        length = prefix.key.shape[1]
        key = torch.cat([prefix.key.to(key.dtype).unsqueeze(0).expand(b, -1, -1, -1), key], dim=2)  # (B, H, P+K, d)
        value = torch.cat([prefix.value.to(value.dtype).unsqueeze(0).expand(b, -1, -1, -1), value], dim=2)
        if attention_mask is None and getattr(module, "is_causal", False) and q_len > 1:
            # SDPA would fall back to is_causal, which aligns the triangle to the first key (a
            # prefix): spell the causal mask out, aligned to the last key (the cache's order).
            causal = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
            attention_mask = causal[None, None]  # (1, 1, Q, K)
        if attention_mask is not None:
            fill = True if attention_mask.dtype == torch.bool else 0.0  # the prefix is always visible
            attention_mask = nn.functional.pad(attention_mask, (length, 0), value=fill)  # (., 1, Q, P+K)
        if position_bias is not None:
            position_bias = nn.functional.pad(position_bias, (length, 0))  # no position: bias 0, (., H, Q, P+K)
    return sdpa_attention_forward(module, query, key, value, attention_mask, position_bias=position_bias, **kwargs)


AttentionInterface.register(PREFIX_ATTENTION, prefix_attention)
AttentionMaskInterface.register(PREFIX_ATTENTION, sdpa_mask)  # masks as SDPA takes them


def attach(model, options) -> None:
    """Freezes the model and gives every encoder and decoder self-attention a trained key/value prefix."""
    length = check_length(options, name="prefix_tuning")
    model.requires_grad_(False)
    words = sampled_vocab_embeddings(model, length)  # (P, D)
    lm = model.language_model
    with torch.no_grad():
        for stack in (lm.encoder, lm.decoder):
            for block in stack.block:
                attn = block.layer[0].SelfAttention
                hidden = block.layer[0].layer_norm(words.to(attn.k.weight.dtype))  # (P, D), as the layer sees inputs
                heads = (length, attn.n_heads, attn.key_value_proj_dim)
                key = attn.k(hidden).view(heads).transpose(0, 1)  # (H, P, d_kv)
                value = attn.v(hidden).view(heads).transpose(0, 1)
                attn.kv_prefix = KVPrefix(key.float().cpu(), value.float().cpu())
    lm.set_attn_implementation(PREFIX_ATTENTION)


METHOD = Method(
    name="prefix_tuning",
    description="trained key/value prefixes in every encoder and decoder self-attention (Li & Liang 2021)",
    options={"length": 8},
    attach=attach,
    saves_adapter=True,
)
