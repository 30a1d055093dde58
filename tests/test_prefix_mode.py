"""visual_mode=prefix (Frozen): the frozen language model, training, checkpoints, jobs and serving."""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from test_engine import DATA, TINY, make_example, run
from test_jobs import FAST, synth_data  # noqa: F401  (synth_data is a fixture)

from tests.conftest import random_images
from unified_vl.checkpoint import CheckpointError, load_pretrained, save_pretrained
from unified_vl.config import UnifiedVLConfig
from unified_vl.engine.config import ConfigError, load_config
from unified_vl.engine.trainer import TrainData, build_model_and_processor, parameter_counts, train
from unified_vl.modeling import VisualPrefix, build_model
from unified_vl.processor import UnifiedVLProcessor
from unified_vl.tokenizer import model_vocab_size

PREFIX = TINY.replace("model.overrides={", "model.overrides={visual_mode: prefix, prefix_length: 3, ")
TEXT_SIDE = ("language_model.", "type_embed")


def _text_side(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith(TEXT_SIDE)}


@pytest.fixture()
def prefix_model(tokenizer):
    config = UnifiedVLConfig.from_preset(
        "uvl-tiny", text_config={"vocab_size": model_vocab_size(tokenizer)}, visual_mode="prefix"
    )
    torch.manual_seed(0)
    model = build_model(config, tokenizer).eval()
    return model, UnifiedVLProcessor.from_config(config, tokenizer)


def test_the_prefix_is_n_vectors_of_the_text_width_and_the_language_model_is_frozen_by_design(prefix_model):
    model, processor = prefix_model
    assert isinstance(model.visual, VisualPrefix) and model.visual.num_tokens == 2  # Frozen's n
    prefix = model.visual(processor.preprocess_images(random_images(3)))
    assert prefix.shape == (3, 2, 128)
    assert model.frozen_by_design == ["language_model", "type_embed"]
    fused = build_model(
        UnifiedVLConfig.from_preset("uvl-tiny", text_config={"vocab_size": model.config.text_config.vocab_size})
    )
    assert fused.frozen_by_design == []


def test_prefix_training_leaves_every_t5_weight_bit_identical_and_reports_it(tmp_path, capsys):
    result = run(tmp_path, "prefix", PREFIX, "train.max_steps=3")
    out = capsys.readouterr().out
    torch.manual_seed(0)  # the run's initial weights (the trainer seeds before building)
    initial, _ = build_model_and_processor(load_config(None, ["data.tasks={colors: 1}", PREFIX]))
    trained, _ = load_pretrained(result.model_dir)
    before, after = initial.state_dict(), trained.state_dict()
    assert set(_text_side(before)) and _text_side(before).keys() == _text_side(after).keys()
    for key in _text_side(before):
        assert torch.equal(after[key], before[key]), key
    changed = [k for k in before if k.startswith("visual.") and not torch.equal(after[k], before[k])]
    assert "visual.proj.weight" in changed and any(k.startswith("visual.backbone.") for k in changed)
    # The report: the text side 0 % trainable, the visual side 100 %, and why.
    assert "frozen: language_model, type_embed (by the model design)" in out
    counts = parameter_counts(initial)
    visual = counts["visual"][1]
    total = sum(n for _, n in counts.values())
    assert f"parameters: {visual:,} of {total:,} trainable ({100 * visual / total:.2f}%)" in out
    for line in out.splitlines():
        name = line.strip().split(" ")[0]
        if name.startswith("language_model") or name == "type_embed":
            assert line.rstrip().endswith("trainable (  0.00%)") and " 0 of " in line, line
        if name == "visual":
            assert line.rstrip().endswith("(100.00%)"), line


def test_train_freeze_replaces_the_design_freeze_frozen_finetuned(tmp_path, capsys):
    result = run(tmp_path, "finetuned", PREFIX, "train.max_steps=2", "train.freeze=[]")
    assert "frozen: nothing (train.freeze)" in capsys.readouterr().out
    torch.manual_seed(0)
    initial, _ = build_model_and_processor(load_config(None, ["data.tasks={colors: 1}", PREFIX]))
    trained, _ = load_pretrained(result.model_dir)
    before, after = initial.state_dict(), trained.state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in _text_side(before))


def test_prefix_save_load_round_trip_gives_identical_logits(prefix_model, tmp_path):
    model, processor = prefix_model
    save_pretrained(model, processor, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["visual_mode"] == "prefix"
    loaded, loaded_processor = load_pretrained(tmp_path / "m")
    assert isinstance(loaded.visual, VisualPrefix)
    images = random_images(3)
    prompts = ["<image> this is a dax. <image> what is this?", "what does the image describe?"]
    batch = processor(images=[images[:2], images[2]], text=prompts, targets=["dax", "a circle"])
    again = loaded_processor(images=[images[:2], images[2]], text=prompts, targets=["dax", "a circle"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**again).logits, model(**batch).logits, atol=0, rtol=0)


def test_a_prefix_checkpoint_resumed_as_fused_is_a_clear_error(tmp_path):
    run(tmp_path, "p", PREFIX, "train.max_steps=2", "checkpoint.export=false")
    with pytest.raises(
        CheckpointError, match=r"(?s)another architecture.*visual_mode: checkpoint 'prefix' vs now 'fused'"
    ):
        train(
            load_config(
                None,
                [
                    "data.tasks={colors: 1, shapes: 1}",
                    TINY,
                    "train.global_batch_size=8",
                    "train.micro_batch_size=4",
                    f"output_dir={tmp_path / 'p'}",
                    "resume=true",
                ],
            ),
            TrainData(DATA, make_example),
        )


def test_an_unknown_visual_mode_is_refused_before_any_work_listing_the_modes():
    with pytest.raises(
        ConfigError, match="model.overrides: visual_mode must be one of 'fused', 'prefix', got 'sideways'"
    ):
        load_config(None, ["data.tasks={vqa: 1}", "model.overrides.visual_mode=sideways"])
    with pytest.raises(ConfigError, match="prefix_length must be an integer >= 1, got 0"):
        load_config(None, ["data.tasks={vqa: 1}", "model.overrides.prefix_length=0"])


def test_finetune_runs_prefix_mode_with_the_freeze_handled(synth_data, tmp_path, capsys):  # noqa: F811
    from unified_vl.app.jobs import finetune

    args = ["--task", "captioning", "--data", str(synth_data), *FAST, "eval.every=0", f"output_dir={tmp_path / 'r'}"]
    assert finetune.main([*args, "model.overrides.visual_mode=prefix"]) == 0
    assert "frozen: language_model, type_embed (by the model design)" in capsys.readouterr().out
    model, _ = load_pretrained(tmp_path / "r" / "model")
    assert model.config.visual_mode == "prefix"
    assert "captioning/test/cider" in json.loads((tmp_path / "r" / "eval_final.json").read_text())["metrics"]


def _data_uri(image) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_a_prefix_checkpoint_serves_a_two_image_chat_request(prefix_model, tmp_path):
    from fastapi.testclient import TestClient

    from tests.test_model import _scramble
    from unified_vl import Predictor
    from unified_vl.app.inference.server import create_app

    model, processor = prefix_model
    save_pretrained(_scramble(model), processor, tmp_path / "m")
    predictor = Predictor.from_pretrained(tmp_path / "m", device="cpu")
    images = random_images(2, size=64)
    expected = predictor.generate([images], ["<image> this is a dax. <image> what is this?"])[0].text
    swapped = predictor.generate([images[::-1]], ["<image> this is a dax. <image> what is this?"])[0].text
    assert expected != swapped, "the order of the images must matter, or the test would be vacuous"
    content = [
        {"type": "image_url", "image_url": {"url": _data_uri(images[0])}},
        {"type": "text", "text": "this is a dax."},
        {"type": "image_url", "image_url": {"url": _data_uri(images[1])}},
        {"type": "text", "text": "what is this?"},
    ]
    with TestClient(create_app(predictor, max_wait_ms=1)) as client:
        answer = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["choices"][0]["message"]["content"] == expected
        text_tokens = len(processor.tokenizer("this is a dax. what is this?")["input_ids"])
        assert body["usage"]["prompt_tokens"] == text_tokens + 2 * 2  # each image: its n = 2 prefix vectors
        bad = [*content[:3], {"type": "text", "text": "<image> what is this?"}]
        refused = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": bad}]})
        assert refused.status_code == 422 and "holds '<image>', the image placeholder" in refused.text
    with pytest.raises(ValueError, match="holds 1 image placeholder.*comes with 2 image"):
        predictor.generate([images], ["<image> only one placeholder"])
