"""``relation_tokens``: a Relation Network over the encoder's grid tokens, read by the decoder."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import random_images
from tests.test_model import _scramble, _until_eos, one_layer_t5
from unified_vl.checkpoint import load_pretrained, save_pretrained
from unified_vl.config import UnifiedVLConfig
from unified_vl.modeling import RelationNetwork, build_model
from unified_vl.processor import UnifiedVLProcessor
from unified_vl.prompting.prompt_tuning import PromptVectors

VIT = {"patch_size": 8, "embed_dim": 32, "depth": 0, "num_heads": 2}
# Rows of different lengths: the image in front (no placeholder) or after some words (a placeholder).
PROMPTS = ["is the red circle left of the blue square?", "look: <image> what shape is the large object?"]


def _pair(tokenizer, **fields):
    """A model with two relation tokens and the same model without, built from the same seed."""
    fields = dict(
        vision_kwargs=VIT, image_size=32, text_config=one_layer_t5(tokenizer), vision_stem="conv-deep", **fields
    )
    torch.manual_seed(0)
    plain = build_model(UnifiedVLConfig.from_preset("uvl-tiny", **fields), tokenizer).eval()
    torch.manual_seed(0)
    model = build_model(UnifiedVLConfig.from_preset("uvl-tiny", relation_tokens=2, **fields), tokenizer).eval()
    return plain, model, UnifiedVLProcessor.from_config(model.config, tokenizer)


def _batch(processor, prompts=PROMPTS, seed=0):
    images = random_images(len(prompts), seed=seed)
    return processor(images=[[image] for image in images], text=list(prompts))


@pytest.mark.parametrize("prompt_length", [0, 3])
def test_relation_tokens_follow_the_encoders_output_and_read_the_grid_and_the_question(tokenizer, prompt_length):
    plain, model, processor = _pair(tokenizer)
    if prompt_length:  # prompt tuning's vectors in front of every row: neither object nor question
        vectors = torch.randn(prompt_length, 32, generator=torch.Generator().manual_seed(1))
        plain.encoder_prompt, model.encoder_prompt = PromptVectors(vectors), PromptVectors(vectors)
    batch = _batch(processor)
    with torch.no_grad():
        before, before_mask = plain.encode(**batch)
        after, mask = model.encode(**batch)
        embeds, _ = model.embed_inputs(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    hidden, length = after.last_hidden_state, before_mask.shape[1]
    assert hidden.shape == (2, length + 2, 32)
    torch.testing.assert_close(hidden[:, :length], before.last_hidden_state)  # the encoder's output unchanged
    assert mask[:, :length].equal(before_mask) and bool((mask[:, length:] == 1).all())
    # By hand: the grid's 16 tokens as they enter the encoder, where each row's image is; the mean of the
    # encoder's output over the row's text tokens.
    ids, token = batch["input_ids"], processor.image_token_id
    for row in range(2):
        start = int((ids[row] == token).nonzero()[0]) if (ids[row] == token).any() else 0
        start += prompt_length
        objects = embeds[row, start : start + 16]
        text = [i for i in range(prompt_length, int(before_mask[row].sum())) if not start <= i < start + 16]
        question = before.last_hidden_state[row, text].mean(dim=0)
        with torch.no_grad():
            expected = model.relation(objects[None], question[None])[0]
        torch.testing.assert_close(hidden[row, length:], expected)
    assert start > prompt_length  # row 1's image comes after "look:": the test saw a placeholder after text


def test_relation_network_is_g_over_every_ordered_pair_with_coordinates_then_f():
    # Santoro et al. 2017, eq. 1 with a mean: f(mean_ij g([o_i, x_i, y_i, o_j, x_j, y_j, q])).
    torch.manual_seed(0)
    rn = RelationNetwork(8, 2, 3, num_tokens=2).eval()
    objects, question = torch.randn(1, 6, 8), torch.randn(1, 8)
    coords = torch.tensor([[x, y] for y in (-1.0, 1.0) for x in (-1.0, 0.0, 1.0)])  # raster order
    weight = torch.cat([rn.first.weight, rn.second.weight, rn.query.weight], dim=1)  # one layer on the concatenation
    outputs = []
    for i in range(6):
        for j in range(6):
            pair = torch.cat([objects[0, i], coords[i], objects[0, j], coords[j], question[0]])
            outputs.append(rn.g(pair @ weight.T + rn.first.bias))
    expected = rn.norm(rn.f(torch.stack(outputs).mean(dim=0)).view(2, 8))
    with torch.no_grad():
        torch.testing.assert_close(rn(objects, question)[0], expected)
        # Where an object is matters: the same objects in other cells give another output.
        assert not torch.allclose(rn(objects.flip(1), question), rn(objects, question))


def test_batched_generation_with_relation_tokens_equals_one_at_a_time(tokenizer):
    _, model, processor = _pair(tokenizer)
    model = _scramble(model)
    prompts = [*PROMPTS, "a much longer prompt with many more words than the others: <image> what is it?"]
    batch = _batch(processor, prompts)
    batched = model.generate(**batch, max_new_tokens=6).tolist()
    texts = processor.decode(batched)
    assert len(set(texts)) > 1, f"untrained model wrote identical outputs, the test would be vacuous: {texts}"
    for i, image in enumerate(random_images(len(prompts), seed=0)):
        single = model.generate(**processor(images=[[image]], text=[prompts[i]]), max_new_tokens=6)[0].tolist()
        assert _until_eos(batched[i], tokenizer) == _until_eos(single, tokenizer), i


def test_relation_network_trains_and_round_trips(tokenizer, tmp_path):
    _, model, processor = _pair(tokenizer)
    batch = processor(images=random_images(2), text=PROMPTS[:1] * 2, targets=["yes", "no"])
    model.train()
    model(**batch).loss.backward()
    for name in ("relation.first.weight", "relation.query.weight", "relation.f.2.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    stem = model.visual.backbone.patch_embed.proj.layers[0].weight
    assert stem.grad.abs().sum() > 0  # through the encoder's grid tokens
    model.eval()
    save_pretrained(model, processor, tmp_path / "m")
    loaded, _ = load_pretrained(tmp_path / "m")
    assert loaded.config.relation_tokens == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


def test_relation_tokens_need_one_image_per_prompt(tokenizer):
    _, model, processor = _pair(tokenizer)
    two = processor(images=[random_images(2)], text=["<image> and <image>: which is left?"])
    with pytest.raises(
        ValueError, match="relation_tokens .a Relation Network over one image's grid. needs exactly one image"
    ):
        model.encode(**two)
    text_only = processor(images=[[]], text=["no picture"])
    with pytest.raises(ValueError, match="needs exactly one image per prompt"):
        model.encode(**text_only)


@pytest.mark.parametrize("bad", [-1, True, 1.5, "2"])
def test_relation_tokens_errors_name_the_value(bad):
    with pytest.raises(
        ValueError, match=f"relation_tokens must be an integer >= 0 .0: no Relation Network., got {bad!r}"
    ):
        UnifiedVLConfig(relation_tokens=bad)


def test_relation_tokens_need_the_fused_grid():
    with pytest.raises(ValueError, match="relation_tokens needs visual_mode='fused' .the grid's tokens., not 'prefix'"):
        UnifiedVLConfig(relation_tokens=1, visual_mode="prefix")
