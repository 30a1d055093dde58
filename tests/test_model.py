"""The foundation: model, processor, checkpoints, local backbones, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import random_images
from unified_vl.checkpoint import CheckpointError, load_pretrained, save_pretrained
from unified_vl.config import PRESETS, UnifiedVLConfig
from unified_vl.modeling import UnifiedVLForConditionalGeneration, build_model
from unified_vl.processor import ImageLoadError, UnifiedVLProcessor

PROMPTS = [
    "what does the image describe?",
    "question: what color is the small circle left of the big blue square?",
    'which region does the text " the red circle " describe?',
    "what is the main object?",
]


def _scramble(model, seed=1):
    """Random init of a tiny T5 greedily emits pad forever; spread the embeddings so an untrained
    model writes varied tokens and the batching test can actually fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        emb = model.language_model.shared.weight
        emb.copy_(torch.randn(emb.shape, generator=g))
        emb[0] = 0.0  # the decoder start (pad) no longer predicts itself
        for name, param in model.language_model.decoder.named_parameters():
            if "weight" in name and param.ndim == 2:
                param.add_(torch.randn(param.shape, generator=g) * 0.5)
    return model


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_generation_equals_one_at_a_time(tiny_model, processor, num_beams):
    model = _scramble(tiny_model)
    images = random_images(len(PROMPTS))
    batch = processor(images=images, text=PROMPTS)
    assert batch["attention_mask"].sum(1).unique().numel() > 1, "prompts must have different lengths"
    batched = model.generate(**batch, num_beams=num_beams, max_new_tokens=8)
    singles = []
    for image, prompt in zip(images, PROMPTS, strict=True):
        one = processor(images=[image], text=[prompt])
        singles.append(model.generate(**one, num_beams=num_beams, max_new_tokens=8)[0].tolist())
    texts = processor.decode(batched)
    assert len(set(texts)) > 1, f"untrained model wrote identical outputs, the test would be vacuous: {texts}"
    for row, single in zip(batched.tolist(), singles, strict=True):
        assert _until_eos(row, processor.tokenizer) == _until_eos(single, processor.tokenizer)


def _until_eos(ids, tokenizer):
    """Tokens up to the first eos, pads dropped (beam search fills finished rows with eos)."""
    out = []
    for t in ids:
        if t == tokenizer.eos_token_id:
            break
        if t != tokenizer.pad_token_id:
            out.append(t)
    return out


def test_padding_does_not_change_encoder_states(tiny_model, processor):
    images = random_images(2)
    batch = processor(images=images, text=PROMPTS[:2])
    out, mask = tiny_model.encode(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    one = processor(images=images[:1], text=PROMPTS[:1])
    out1, _ = tiny_model.encode(one["pixel_values"], one["input_ids"], one["attention_mask"])
    n = out1.last_hidden_state.shape[1]
    assert mask.shape == out.last_hidden_state.shape[:2]
    torch.testing.assert_close(out.last_hidden_state[0, :n], out1.last_hidden_state[0], atol=1e-5, rtol=1e-5)


def test_overfits_eight_examples_with_location_targets(tiny_config, tokenizer):
    torch.manual_seed(0)
    model = build_model(tiny_config, tokenizer)
    processor = UnifiedVLProcessor.from_config(tiny_config, tokenizer, vision_backbone=model.visual.backbone)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(8)]
    prompts = PROMPTS * 2
    targets = [
        "a red circle left of a blue square",
        "red",
        "<loc_112><loc_340><loc_298><loc_501>",
        "circle",
        "two green triangles",
        "blue",
        "<loc_7><loc_900><loc_450><loc_999>",
        "square",
    ]
    batch = processor(images=images, text=prompts, targets=targets)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        model.train()
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.eval()
        generated = processor.decode(model.generate(**{k: v for k, v in batch.items() if k != "labels"}))
        if generated == targets:
            break
    assert generated == targets


def test_save_and_load_round_trip_gives_identical_logits(tiny_model, tokenizer, tiny_config, tmp_path):
    processor = UnifiedVLProcessor.from_config(tiny_config, tokenizer, vision_backbone=tiny_model.visual.backbone)
    batch = processor(
        images=random_images(2), text=PROMPTS[:2], targets=["a red circle", "<loc_1><loc_2><loc_3><loc_4>"]
    )
    folder = save_pretrained(tiny_model, processor, tmp_path / "model")
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    model2, processor2 = load_pretrained(folder)
    model2.eval()
    batch2 = processor2(
        images=random_images(2), text=PROMPTS[:2], targets=["a red circle", "<loc_1><loc_2><loc_3><loc_4>"]
    )
    for key in batch:
        torch.testing.assert_close(batch[key], batch2[key])
    torch.testing.assert_close(tiny_model(**batch).logits, model2(**batch2).logits, atol=0, rtol=0)


def test_transformers_auto_classes_load_a_saved_folder(tiny_model, tokenizer, tiny_config, tmp_path):
    import json

    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, T5Config

    import unified_vl  # noqa: F401  (registers the auto classes)
    from unified_vl.processor import UnifiedVLImageProcessor

    processor = UnifiedVLProcessor.from_config(tiny_config, tokenizer, vision_backbone=tiny_model.visual.backbone)
    folder = save_pretrained(tiny_model, processor, tmp_path / "model")
    config = AutoConfig.from_pretrained(folder)
    assert isinstance(config.text_config, T5Config) and config.text_config.d_model == tiny_config.text_config.d_model
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    auto = AutoProcessor.from_pretrained(folder)
    assert isinstance(model, type(tiny_model)) and isinstance(auto, UnifiedVLProcessor)
    assert isinstance(auto.image_processor, UnifiedVLImageProcessor)
    ours, our_processor = load_pretrained(folder)
    targets = ["a red circle", "<loc_1><loc_2><loc_3><loc_4>"]
    batch = our_processor(images=random_images(2), text=PROMPTS[:2], targets=targets)
    auto_batch = auto(images=random_images(2), text=PROMPTS[:2], targets=targets)
    for key in batch:
        torch.testing.assert_close(batch[key], auto_batch[key], atol=0, rtol=0)
    torch.testing.assert_close(ours.eval()(**batch).logits, model(**auto_batch).logits, atol=0, rtol=0)

    # A folder saved before the processor was a ProcessorMixin (a flat processor_config.json) still loads.
    legacy = {"processor_class": "UnifiedVLProcessor", "image_size": tiny_config.image_size, "num_bins": 1000}
    legacy |= {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "max_text_length": 128, "max_target_length": 64}
    (folder / "processor_config.json").write_text(json.dumps(legacy))
    _, old = load_pretrained(folder)
    assert old.image_size == tiny_config.image_size and old.image_processor.image_std == [0.5] * 3


def test_loading_a_folder_of_another_architecture_is_a_clear_error(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    T5ForConditionalGeneration(
        T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=64)
    ).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="'t5' model, not a 'unified_vl'"):
        load_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(tmp_path / "nothing")


def test_local_t5_folder_and_timm_weight_file_become_the_backbones(tmp_path, tokenizer):
    import timm
    from safetensors.torch import save_file
    from transformers import T5Config, T5ForConditionalGeneration

    from unified_vl.tokenizer import default_tokenizer_dir, load_tokenizer

    # A tiny "pretrained" T5 folder with its own spiece.model, as a Hugging Face checkpoint has.
    t5_dir = tmp_path / "t5"
    t5_dir.mkdir()
    (t5_dir / "spiece.model").write_bytes((default_tokenizer_dir() / "spiece.model").read_bytes())
    base_vocab = len(load_tokenizer(t5_dir)) - 1001  # pieces + sentinels; location tokens and <image> aside
    t5 = T5ForConditionalGeneration(
        T5Config(
            d_model=32,
            d_ff=64,
            num_layers=1,
            num_decoder_layers=1,
            num_heads=2,
            d_kv=16,
            vocab_size=base_vocab,
            decoder_start_token_id=0,
        )
    )
    t5.save_pretrained(t5_dir)
    # A tiny timm weight file with a classification head, as released timm weights have.
    vit_kwargs = {"patch_size": 8, "embed_dim": 24, "depth": 1, "num_heads": 2}
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=5, **vit_kwargs)
    save_file(source.state_dict(), str(tmp_path / "vit.safetensors"))
    torch.save(source.state_dict(), tmp_path / "vit.pth")

    for weights in ("vit.safetensors", "vit.pth"):
        t5_tokenizer = load_tokenizer(t5_dir)
        config = UnifiedVLConfig(
            text_model_path=str(t5_dir),
            vision_model="vit_tiny_patch16_224",
            vision_kwargs=vit_kwargs,
            vision_weights_path=str(tmp_path / weights),
            image_size=32,
        )
        model = build_model(config, t5_tokenizer)
        assert model.config.text_config.d_model == 32
        assert model.language_model.config.vocab_size == len(t5_tokenizer) - 1 == base_vocab + 1000  # no <image> row
        shared = model.language_model.shared.weight
        torch.testing.assert_close(shared[:base_vocab], t5.shared.weight, atol=0, rtol=0)
        torch.testing.assert_close(
            model.language_model.encoder.block[0].layer[0].SelfAttention.q.weight,
            t5.encoder.block[0].layer[0].SelfAttention.q.weight,
            atol=0,
            rtol=0,
        )
        torch.testing.assert_close(
            model.visual.backbone.patch_embed.proj.weight, source.patch_embed.proj.weight, atol=0, rtol=0
        )
        torch.testing.assert_close(
            model.visual.backbone.blocks[0].mlp.fc1.weight, source.blocks[0].mlp.fc1.weight, atol=0, rtol=0
        )


def test_vision_weights_of_another_model_are_refused(tmp_path):
    import timm

    other = timm.create_model("resnet18", pretrained=False, num_classes=0)
    torch.save(other.state_dict(), tmp_path / "resnet.pth")
    config = UnifiedVLConfig.from_preset("uvl-tiny", vision_weights_path=str(tmp_path / "resnet.pth"))
    with pytest.raises(ValueError, match="do not fit 'vit_tiny_patch16_224'"):
        build_model(config)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_model(UnifiedVLConfig.from_preset("uvl-tiny", vision_weights_path=str(tmp_path / "missing.pth")))


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(KeyError, match="uvl-base, uvl-large, uvl-medium, uvl-tiny"):
        UnifiedVLConfig.from_preset("uvl-huge")
    assert set(PRESETS) == {"uvl-tiny", "uvl-medium", "uvl-base", "uvl-large"}


def test_unknown_visual_mode_is_an_error():
    with pytest.raises(ValueError, match="visual_mode must be one of"):
        UnifiedVLConfig(visual_mode="sideways")


def one_layer_t5(tokenizer) -> dict:
    """A T5 of one encoder and one decoder layer, 32 wide: the text side of the vision-stem tests."""
    return {
        "vocab_size": len(tokenizer),
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 64,
        "num_layers": 1,
        "num_decoder_layers": 1,
    }


def test_conv_stem_replaces_the_patchify_convolution_with_the_same_grid(tokenizer, tmp_path):
    from torch import nn

    from unified_vl.modeling import ConvStem

    vit = {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
    text = one_layer_t5(tokenizer)
    config = UnifiedVLConfig.from_preset("uvl-tiny", vision_kwargs=vit, image_size=32, text_config=text)
    patch = build_model(config, tokenizer)
    conv = build_model(
        UnifiedVLConfig.from_preset("uvl-tiny", vision_kwargs=vit, image_size=32, text_config=text, vision_stem="conv"),
        tokenizer,
    )
    stem = conv.visual.backbone.patch_embed.proj
    assert isinstance(stem, ConvStem)
    # log2(8) = 3 stride-2 convolutions, channels doubling up to the width (Xiao et al. 2021), then 1x1.
    convs = [m for m in stem.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.stride[0], c.kernel_size[0]) for c in convs] == [
        (8, 2, 3),
        (16, 2, 3),
        (32, 2, 3),
        (32, 1, 1),
    ]
    assert (conv.visual.grid_h, conv.visual.grid_w) == (patch.visual.grid_h, patch.visual.grid_w) == (4, 4)
    pixels = torch.randn(2, 3, 32, 32)
    assert conv.visual(pixels).shape == patch.visual(pixels).shape == (2, 16, 32)
    conv.eval()
    processor = UnifiedVLProcessor.from_config(conv.config, tokenizer)
    save_pretrained(conv, processor, tmp_path / "m")
    loaded, _ = load_pretrained(tmp_path / "m")
    assert loaded.config.vision_stem == "conv"
    ids = torch.tensor([[5, 6, 1], [7, 1, 0]])
    with torch.no_grad():
        logits = conv(pixels, ids, ids.ne(0).long(), decoder_input_ids=ids).logits
        again = loaded(pixels, ids, ids.ne(0).long(), decoder_input_ids=ids).logits
    torch.testing.assert_close(again, logits)
    # "conv-deep": a stride-1 3x3 convolution after each of the first two strided ones, same grid.
    deep = build_model(
        UnifiedVLConfig.from_preset(
            "uvl-tiny", vision_kwargs=vit, image_size=32, text_config=text, vision_stem="conv-deep"
        ),
        tokenizer,
    )
    convs = [m for m in deep.visual.backbone.patch_embed.proj.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.stride[0], c.kernel_size[0]) for c in convs] == [
        (8, 2, 3),
        (8, 1, 3),
        (16, 2, 3),
        (16, 1, 3),
        (32, 2, 3),
        (32, 1, 1),
    ]
    assert deep.visual(pixels).shape == (2, 16, 32)


def test_the_stem_skip_adds_the_first_blocks_pooled_features_to_the_stems_output(tokenizer, tmp_path):
    from torch import nn

    vit = {"patch_size": 8, "embed_dim": 32, "depth": 0, "num_heads": 2}
    text = one_layer_t5(tokenizer)

    def model(**kwargs):
        torch.manual_seed(0)
        config = UnifiedVLConfig.from_preset(
            "uvl-tiny", vision_kwargs=vit, image_size=32, text_config=text, vision_stem="conv-deep", **kwargs
        )
        return build_model(config, tokenizer).eval()

    plain, skipped = model(), model(vision_stem_skip=True)
    stem = skipped.visual.backbone.patch_embed.proj
    assert (stem.skip.in_channels, stem.skip.out_channels, stem.skip.kernel_size) == (8, 32, (1, 1))
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # The same layers and the first block's output, averaged over each 8-pixel patch (4 x 4 of the
        # first block's 16 x 16), through the skip's 1x1 convolution.
        first = stem.layers[:6](pixels)
        pooled = first.view(2, 8, 4, 4, 4, 4).mean(dim=(3, 5))  # (B, 8, 4, 4)
        expected = stem.layers(pixels) + torch.einsum("oc,bchw->bohw", stem.skip.weight[:, :, 0, 0], pooled)
        torch.testing.assert_close(stem(pixels), expected)
        # With the skip's weights at zero it is the plain stem with the same other weights.
        other = {k: v for k, v in stem.state_dict().items() if not k.startswith("skip.")}
        plain.visual.backbone.patch_embed.proj.load_state_dict(other)
        nn.init.zeros_(stem.skip.weight)
        torch.testing.assert_close(stem(pixels), plain.visual.backbone.patch_embed.proj(pixels))
    processor = UnifiedVLProcessor.from_config(skipped.config, tokenizer)
    loaded, _ = load_pretrained(save_pretrained(skipped, processor, tmp_path / "m"))
    assert loaded.config.vision_stem_skip is True and loaded.visual.backbone.patch_embed.proj.skip is not None
    with pytest.raises(ValueError, match="vision_stem_skip needs a convolutional stem"):
        UnifiedVLConfig.from_preset("uvl-tiny", vision_stem_skip=True)
    with pytest.raises(ValueError, match="vision_stem_skip must be true or false, got 'yes'"):
        UnifiedVLConfig.from_preset("uvl-tiny", vision_stem="conv", vision_stem_skip="yes")


def test_a_vit_of_depth_zero_leaves_the_conv_stem_alone_before_the_language_model(tokenizer, tmp_path):
    # The learning recipe (scripts/configs/learn_recipe.yaml): conv-deep stem, no transformer block.
    vit = {"patch_size": 8, "embed_dim": 32, "depth": 0, "num_heads": 2}
    text = one_layer_t5(tokenizer)
    config = UnifiedVLConfig.from_preset(
        "uvl-tiny", vision_kwargs=vit, image_size=32, text_config=text, vision_stem="conv-deep"
    )
    model = build_model(config, tokenizer)
    backbone = model.visual.backbone
    assert len(backbone.blocks) == 0
    assert not any(name.startswith("blocks.") for name, _ in backbone.named_parameters())
    pixels = torch.randn(2, 3, 32, 32)
    assert model.visual(pixels).shape == (2, 16, 32)
    ids = torch.tensor([[5, 6, 1], [7, 1, 0]])
    model(pixels, ids, ids.ne(0).long(), decoder_input_ids=ids).logits.square().mean().backward()
    first = backbone.patch_embed.proj.layers[0].weight
    assert first.grad is not None and first.grad.abs().sum() > 0  # the stem learns through the language model
    model.eval()
    save_pretrained(model, UnifiedVLProcessor.from_config(model.config, tokenizer), tmp_path / "m")
    loaded, _ = load_pretrained(tmp_path / "m")
    assert loaded.config.vision_kwargs["depth"] == 0 and len(loaded.visual.backbone.blocks) == 0
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(pixels, ids, ids.ne(0).long(), decoder_input_ids=ids).logits,
            model(pixels, ids, ids.ne(0).long(), decoder_input_ids=ids).logits,
        )


def _seeded_conv_deep_models(tokenizer, image_size: int, *variants: dict):
    """One small conv-deep model (8-pixel tokens) per variant of config fields, each built from seed 0."""
    vit = {"patch_size": 8, "embed_dim": 32, "depth": 0, "num_heads": 2}
    fields = dict(
        vision_kwargs=vit, image_size=image_size, text_config=one_layer_t5(tokenizer), vision_stem="conv-deep"
    )
    models = []
    for variant in variants:
        torch.manual_seed(0)
        models.append(build_model(UnifiedVLConfig.from_preset("uvl-tiny", **fields, **variant), tokenizer))
    return models


def test_pooled_token_is_the_grids_mean_after_its_tokens(tokenizer, tmp_path):
    # vision_pooled_token: the global average pool a CNN classifier reads, as one more image token.
    plain, model = _seeded_conv_deep_models(tokenizer, 32, {}, {"vision_pooled_token": True})
    assert (plain.visual.num_tokens, model.visual.num_tokens) == (16, 17)
    model.eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.visual(pixels)  # (2, 17, D)
        grid = model.visual._grid(pixels)  # (2, C, 4, 4)
        expected = model.visual.norm(model.visual.proj(grid.mean(dim=(2, 3)))) + model.visual.pool_embed
    assert tokens.shape == (2, 17, 32)
    torch.testing.assert_close(tokens[:, -1], expected)
    torch.testing.assert_close(tokens[:, :16], plain.eval().visual(pixels).detach())  # the grid's tokens unchanged
    ids = torch.tensor([[5, 6, 1], [7, 1, 0]])
    encoded, mask = model.encode(pixels, ids, ids.ne(0).long())
    assert encoded.last_hidden_state.shape[1] == mask.shape[1] == 17 + 3  # the image in front of its prompt
    model.train()
    model(pixels, ids, ids.ne(0).long(), decoder_input_ids=ids).logits.square().mean().backward()
    assert model.visual.pool_embed.grad.abs().sum() > 0
    model.eval()
    save_pretrained(model, UnifiedVLProcessor.from_config(model.config, tokenizer), tmp_path / "m")
    loaded, _ = load_pretrained(tmp_path / "m")
    assert loaded.config.vision_pooled_token is True and loaded.visual.num_tokens == 17
    with torch.no_grad():
        torch.testing.assert_close(loaded.visual(pixels), model.visual(pixels))


def test_image_positions_can_start_at_zero_and_the_grid_is_then_shift_equivariant(tokenizer, tmp_path):
    # image_position_std=0: row/column embeddings start at zero; None keeps POSITION_INIT_STD's draws.
    default, half, model = _seeded_conv_deep_models(
        tokenizer, 64, {}, {"image_position_std": 0.5}, {"image_position_std": 0}
    )
    assert torch.equal(default.visual.row_embed, half.visual.row_embed)  # the default is 0.5, same draws
    assert 0.4 < float(default.visual.row_embed.detach().std()) < 0.6
    assert not model.visual.row_embed.any() and not model.visual.col_embed.any()
    # With the ViT's own position embedding zeroed too, moving the picture by one token (8 pixels)
    # moves the interior tokens by one grid column: nothing left says where a token is.
    with torch.no_grad():
        model.visual.backbone.pos_embed.zero_()
    model.eval()
    pixels = torch.zeros(1, 3, 64, 64)
    pixels[..., 20:36, 20:36] = torch.randn(1, 3, 16, 16)
    moved = torch.roll(pixels, shifts=8, dims=-1)
    with torch.no_grad():
        grid, grid_moved = model.visual(pixels).view(8, 8, -1), model.visual(moved).view(8, 8, -1)
    torch.testing.assert_close(grid_moved[2:6, 3:6], grid[2:6, 2:5])
    assert not torch.allclose(grid[2:6, 3:6], grid[2:6, 2:5])  # the content itself differs token to token
    ids = torch.tensor([[5, 6, 1]])
    model.train()
    model(pixels, ids, ids.ne(0).long(), decoder_input_ids=ids).logits.square().mean().backward()
    assert model.visual.row_embed.grad.abs().sum() > 0  # positions are learnt as the loss asks
    save_pretrained(model, UnifiedVLProcessor.from_config(model.config, tokenizer), tmp_path / "m")
    assert load_pretrained(tmp_path / "m")[0].config.image_position_std == 0
    for bad in (-0.1, "0.5", True):
        with pytest.raises(ValueError, match=f"image_position_std must be a number >= 0 or None, got {bad!r}"):
            UnifiedVLConfig(image_position_std=bad)


def test_pooled_token_errors_name_the_problem():
    with pytest.raises(ValueError, match="vision_pooled_token must be true or false, got 'yes'"):
        UnifiedVLConfig(vision_pooled_token="yes")
    with pytest.raises(
        ValueError, match="vision_pooled_token needs visual_mode='fused' .the grid's tokens., not 'prefix'"
    ):
        UnifiedVLConfig(vision_pooled_token=True, visual_mode="prefix")


def test_conv_stem_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"vision_stem must be one of \('patch', 'conv', 'conv-deep'\), got 'hexagon'"):
        UnifiedVLConfig(vision_stem="hexagon")
    with pytest.raises(ValueError, match="needs a ViT backbone with patch_embed.proj; 'resnet18' has none"):
        build_model(UnifiedVLConfig(vision_model="resnet18", vision_stem="conv", image_size=32))
    with pytest.raises(ValueError, match="vision_stem='conv-deep' needs a ViT backbone with patch_embed.proj"):
        build_model(UnifiedVLConfig(vision_model="resnet18", vision_stem="conv-deep", image_size=32))
    with pytest.raises(ValueError, match="needs a power-of-two patch size, got 12"):
        build_model(
            UnifiedVLConfig.from_preset(
                "uvl-tiny",
                vision_kwargs={"patch_size": 12, "embed_dim": 24, "depth": 1, "num_heads": 2},
                image_size=48,
                vision_stem="conv",
            )
        )


def test_vision_position_std_sets_the_vits_own_position_embedding():
    vit = {"patch_size": 8, "embed_dim": 64, "depth": 1, "num_heads": 2}
    text = {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_decoder_layers": 1}

    def pos_embed(**fields):
        torch.manual_seed(0)
        config = UnifiedVLConfig.from_preset("uvl-tiny", vision_kwargs=vit, image_size=64, text_config=text, **fields)
        return UnifiedVLForConditionalGeneration(config).visual.backbone.pos_embed.detach()  # (1, 65, 64)

    default, wide = pos_embed(), pos_embed(vision_position_std=0.5, vision_stem="conv")
    assert default.numel() == wide.numel() == 65 * 64
    assert 0.018 < default.std().item() < 0.022  # timm's own init, unchanged by default
    assert 0.47 < wide.std().item() < 0.53
    config = UnifiedVLConfig.from_preset("uvl-tiny", vision_position_std=0.5)
    assert UnifiedVLConfig.from_dict(config.to_dict()).vision_position_std == 0.5


@pytest.mark.parametrize("bad", [0, -0.1, True, "wide"])
def test_vision_position_std_errors_name_the_value(bad):
    with pytest.raises(ValueError, match=f"vision_position_std must be a number > 0 or None, got {bad!r}"):
        UnifiedVLConfig(vision_position_std=bad)


def test_vision_position_std_needs_a_vit():
    with pytest.raises(
        ValueError, match="vision_position_std needs a backbone with a learned pos_embed .a ViT.; 'resnet18'"
    ):
        build_model(
            UnifiedVLConfig(vision_model="resnet18", vision_out_index=2, vision_position_std=0.2, image_size=32)
        )


def test_processor_batch_names_and_label_padding(processor):
    batch = processor(
        images=random_images(2),
        text=["short", "a much longer prompt than the first one"],
        targets=["red", "a red circle left of a blue square"],
    )
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "labels"}
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    labels = batch["labels"]
    assert (labels[0] == -100).any() and not (labels[1] == -100).any()
    eos = processor.tokenizer.eos_token_id
    assert labels[0][labels[0] != -100][-1] == eos


def test_processor_accepts_paths_grayscale_rgba_and_arrays(processor, tmp_path):
    Image.new("L", (40, 30), 128).save(tmp_path / "gray.png")
    Image.new("RGBA", (20, 50), (255, 0, 0, 10)).save(tmp_path / "rgba.png")
    Image.new("P", (16, 16)).save(tmp_path / "palette.png")
    inputs = [
        tmp_path / "gray.png",
        str(tmp_path / "rgba.png"),
        tmp_path / "palette.png",
        np.zeros((10, 12), dtype=np.uint8),
        np.ones((10, 12, 4), dtype=np.uint8),
        np.full((8, 8, 3), 0.5, dtype=np.float32),
        Image.new("I;16", (9, 9)),
    ]
    pixels = processor.preprocess_images(inputs)
    assert pixels.shape == (len(inputs), 3, 64, 64)
    assert torch.isfinite(pixels).all()
    # RGBA's red stays red after conversion (alpha dropped, not composited to black).
    assert pixels[1, 0].mean() > pixels[1, 1].mean()


def test_processor_bad_images_name_the_path(processor, tmp_path):
    with pytest.raises(ImageLoadError, match="does not exist"):
        processor.preprocess_images([tmp_path / "missing.png"])
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    with pytest.raises(ImageLoadError, match="corrupt.png.*not a readable image"):
        processor.preprocess_images([tmp_path / "corrupt.png"])
    with pytest.raises(ImageLoadError, match="expected an array of shape"):
        processor.preprocess_images([np.zeros((2, 3, 4, 5), dtype=np.uint8)])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        processor(images=random_images(2), text=["one"])


def test_long_text_is_truncated_keeping_eos(processor, caplog):
    long_prompt = " ".join(["red circle"] * 400)
    batch = processor(images=random_images(1), text=[long_prompt], targets=[" ".join(["blue"] * 300)])
    assert batch["input_ids"].shape[1] == processor.max_text_length
    assert batch["input_ids"][0, -1] == processor.tokenizer.eos_token_id
    assert batch["labels"].shape[1] == processor.max_target_length
    assert "truncated" in caplog.text


@pytest.mark.parametrize("tied", [True, False])
def test_location_embeddings_start_smooth_in_the_bin(tokenizer, tied):
    from unified_vl.tokenizer import loc_token_ids, model_vocab_size

    text = {"vocab_size": model_vocab_size(tokenizer), "tie_word_embeddings": tied}
    model = build_model(UnifiedVLConfig.from_preset("uvl-tiny", text_config=text), tokenizer)
    ids = torch.tensor(loc_token_ids(tokenizer))
    others = torch.ones(model_vocab_size(tokenizer), dtype=torch.bool)
    others[ids] = False
    tables = [model.language_model.shared.weight]
    if not tied:
        tables.append(model.language_model.lm_head.weight)
    for weight in tables:
        loc = weight[ids].detach()
        cos = torch.nn.functional.cosine_similarity
        assert cos(loc[500], loc[505], dim=0) > 0.8  # neighbouring bins start alike
        assert abs(cos(loc[500], loc[900], dim=0)) < 0.3  # distant ones do not
        assert loc.std() == pytest.approx(weight[others].detach().std().item(), rel=0.2)  # the table's scale
    if not tied:  # an untied output layer gets the same features, at its own scale
        a, b = (t[ids].detach() for t in tables)
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999
