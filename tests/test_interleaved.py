"""Interleaved images: a prompt with one <image> placeholder per image, in both visual modes."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import random_images
from tests.test_model import _scramble, _until_eos
from unified_vl.config import UnifiedVLConfig
from unified_vl.modeling import build_model
from unified_vl.processor import UnifiedVLProcessor
from unified_vl.tokenizer import model_vocab_size

# Rows with three, one (no placeholder: in front), none and two images; prompts of different lengths.
PROMPTS = [
    "<image> this is a dax. <image> this is a blicket. <image> question: what is this? answer:",
    "what does the image describe?",
    "a text with no image at all",
    "<image> and <image> : which one is red?",
]
COUNTS = [3, 1, 0, 2]


def _images_per_row(seed: int = 0):
    images = random_images(sum(COUNTS), seed=seed)
    rows, start = [], 0
    for count in COUNTS:
        rows.append(images[start : start + count])
        start += count
    return rows


@pytest.fixture(params=["fused", "prefix"])
def mode_model(request, tokenizer):
    config = UnifiedVLConfig.from_preset(
        "uvl-tiny", text_config={"vocab_size": model_vocab_size(tokenizer)}, visual_mode=request.param
    )
    torch.manual_seed(0)
    model = _scramble(build_model(config, tokenizer).eval())
    with torch.no_grad():  # a prefix that moves the output: the test must see the images
        for param in model.visual.parameters():
            param.mul_(4.0)
    return model, UnifiedVLProcessor.from_config(config, tokenizer)


def test_interleaved_batched_generation_equals_one_at_a_time(mode_model):
    model, processor = mode_model
    rows = _images_per_row()
    batch = processor(images=rows, text=PROMPTS)
    assert batch["pixel_values"].shape == (6, 3, 64, 64)
    batched = model.generate(**batch, max_new_tokens=8).tolist()
    texts = processor.decode(batched)
    assert len(set(texts)) > 1, f"untrained model wrote identical outputs, the test would be vacuous: {texts}"
    for i, (images, prompt) in enumerate(zip(rows, PROMPTS, strict=True)):
        single = model.generate(**processor(images=[images], text=[prompt]), max_new_tokens=8)[0].tolist()
        assert _until_eos(batched[i], processor.tokenizer) == _until_eos(single, processor.tokenizer), i


def test_each_image_lands_at_its_placeholder(mode_model):
    model, processor = mode_model
    rows = _images_per_row()
    batch = processor(images=rows, text=PROMPTS)
    embeds, mask = model.embed_inputs(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    per_image = model.visual.num_tokens
    images = model.visual(batch["pixel_values"]) + model.type_embed[0]  # (6, N, D)
    ids = batch["input_ids"][0].tolist()  # row 0: three placeholders between text
    token = processor.image_token_id
    position, k = 0, 0
    for t, token_id in enumerate(ids):
        if token_id == token:
            torch.testing.assert_close(embeds[0, position : position + per_image], images[k])
            position, k = position + per_image, k + 1
        else:
            text = model.language_model.shared.weight[token_id] + model.type_embed[1]
            torch.testing.assert_close(embeds[0, position], text, msg=f"token {t}")
            position += 1
    assert k == 3 and int(mask[0].sum()) == position
    assert int(mask[2].sum()) == int(batch["attention_mask"][2].sum())  # the text-only row: text alone
    # Swapping two images of a prompt changes what the model reads.
    swapped = processor(images=[[rows[0][1], rows[0][0], rows[0][2]]], text=[PROMPTS[0]])
    other, _ = model.embed_inputs(swapped["pixel_values"], swapped["input_ids"], swapped["attention_mask"])
    assert not torch.allclose(other[0], embeds[0, : other.shape[1]])


def test_a_placeholder_in_front_equals_a_prompt_without_one(mode_model):
    model, processor = mode_model
    image = random_images(1)
    implicit = processor(images=image, text=["what does the image describe?"], targets=["a red circle"])
    explicit = processor(images=[image], text=["<image> what does the image describe?"], targets=["a red circle"])
    assert implicit["input_ids"].shape[1] + 1 == explicit["input_ids"].shape[1]  # as before interleaving
    a = model(**implicit).logits
    b = model(**explicit).logits
    torch.testing.assert_close(a, b)


def test_placeholders_and_images_must_pair_up(processor):
    image = random_images(3)
    with pytest.raises(ValueError, match=r"prompt 0 holds 2 image placeholder\(s\) '<image>' but comes with 1 image"):
        processor(images=[[image[0]]], text=["<image> a <image> b"])
    with pytest.raises(ValueError, match=r"prompt 1 holds 1 image placeholder\(s\) '<image>' but comes with 3 image"):
        processor(images=[image[0], image], text=["fine", "<image> too few"])
    with pytest.raises(ValueError, match=r"prompt 0 holds 0 image placeholder\(s\) '<image>' but comes with 2 image"):
        processor(images=[image[:2]], text=["no placeholder for two images"])
    with pytest.raises(ValueError, match=r"prompt 0 holds 1 image placeholder\(s\).* comes with 0 image"):
        processor(images=[[]], text=["<image> but no image"])
    with pytest.raises(ValueError, match="target 0 holds the image placeholder"):
        processor(images=[image[0]], text=["a"], targets=["<image>"])


def test_model_refuses_images_that_do_not_pair_with_placeholders(tiny_model, processor):
    batch = processor(images=[random_images(2)], text=["<image> one <image> two"])
    with pytest.raises(ValueError, match="the prompts hold 2 image placeholders but pixel_values holds 1 images"):
        tiny_model.embed_inputs(batch["pixel_values"][:1], batch["input_ids"], batch["attention_mask"])


def test_images_past_max_text_length_are_an_error(tiny_config, tokenizer):
    processor = UnifiedVLProcessor.from_config(tiny_config, tokenizer)
    processor.max_text_length = 12
    images = random_images(5)
    prompt = " ".join(["<image> this is a dax."] * 5)
    with pytest.raises(ValueError, match=r"prompt 0: its 5 images and text take \d+ tokens.*past max_text_length=12"):
        processor(images=[images], text=[prompt])
    # Text after the last image is cut as before, and an image in front does not count.
    fits = processor(images=[images[:1], images[0]], text=["<image> " + "word " * 40, "word " * 40])
    assert fits["attention_mask"][0].sum() == 12  # the placeholder and 11 tokens, the last one eos
    assert fits["attention_mask"][1].sum() == 12 + 1  # 12 text tokens and the image in front


def test_a_folder_saved_before_interleaving_gets_its_placeholder_id(tiny_model, processor, tmp_path):
    import json

    from unified_vl.checkpoint import load_pretrained, save_pretrained

    save_pretrained(tiny_model, processor, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    del config["image_token_id"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    model, loaded = load_pretrained(tmp_path / "m")
    assert model.config.image_token_id == loaded.image_token_id == processor.image_token_id
    batch = loaded(images=[random_images(2)], text=["<image> a <image> b"])
    model.eval().generate(**batch, max_new_tokens=2)
