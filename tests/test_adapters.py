"""Learned prompts and adapters on uvl-tiny: each method trains only its own weights (the base stays
bit-identical), an adapter saves and loads exactly, one batch mixes adapters, and bad input gets a
clear error.

The base is the briefly trained uvl-tiny folder of tests/test_inference.py; the methods train on
the small synthetic world of tests/test_jobs.py through the real engine (`unified-vl finetune`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_inference import QUESTION, scene_images, served_model_dir, torch_threads  # noqa: F401  (fixture)
from test_jobs import FAST, synth_data  # noqa: F401  (synth_data is a fixture)

from tasks.vqa import PROMPTS as VQA_PROMPTS
from unified_vl.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterError,
    base_identity,
    method_weights,
    read_adapter,
    save_adapter,
)
from unified_vl.app.jobs import evaluate, finetune
from unified_vl.prompting import get_method

METHODS = ["prompt_tuning", "cocoop", "vpt", "prefix_tuning", "lora"]
STEPS = 3


@pytest.fixture(scope="module")
def train_run(served_model_dir, synth_data, tmp_path_factory):  # noqa: F811
    """``train_run(method) -> run folder``: a few steps of VQA through `unified-vl finetune`, once per method."""
    runs: dict[str, Path] = {}

    def run(method: str) -> Path:
        if method not in runs:
            out = tmp_path_factory.mktemp(method) / "run"
            args = ["--task", "vqa", "--data", str(synth_data), "--init", str(served_model_dir), "--method", method]
            args += [*FAST[1:], f"train.max_steps={STEPS}", "optim.lr=1e-2", "checkpoint.every=1"]
            args += ["checkpoint.keep_last=3", "eval.every=0", "eval.final_splits=[]", f"output_dir={out}"]
            assert finetune.main(args) == 0
            runs[method] = out
        return runs[method]

    return run


def _module_state(run: Path, step: int) -> dict[str, torch.Tensor]:
    path = run / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]  # our own ZeRO-0 checkpoint


def _batch(processor):
    images = scene_images()
    return processor(images=images, text=[f"question: {QUESTION}"] * len(images), targets=["red"] * len(images))


@pytest.mark.parametrize("method", METHODS)
def test_a_method_trains_only_its_own_weights_and_saves_them_as_a_small_adapter(
    method,
    train_run,
    served_model_dir,  # noqa: F811
):
    run = train_run(method)
    adapter = read_adapter(run / "adapter")
    assert adapter.method == method and adapter.base["name"] == str(served_model_dir.resolve())
    first, last = _module_state(run, 1), _module_state(run, STEPS)
    base = load_file(str(served_model_dir / "model.safetensors"))
    own = set(adapter.state)
    assert own and own <= set(last)
    for key, value in last.items():
        if key in own:
            continue
        # LoRA wraps a projection: its weight moves to `<projection>.base_layer`. Tied tables are saved once.
        base_key = key.replace(".base_layer.", ".")
        expected = base.get(
            base_key, base.get("language_model.shared.weight") if "embed" in key or "lm_head" in key else None
        )
        assert expected is not None, key
        assert torch.equal(value, expected), f"{method} changed the base weight {key}"
    changed = [key for key in own if not torch.equal(first[key], last[key])]
    assert sorted(changed) == sorted(own)  # every tensor of the method trains
    for key in own:
        assert torch.equal(adapter.state[key], last[key].float())  # the file holds the trained weights
    size = (run / "adapter" / ADAPTER_WEIGHTS).stat().st_size
    assert size < 0.05 * (served_model_dir / "model.safetensors").stat().st_size
    assert json.loads((run / "adapter" / ADAPTER_CONFIG).read_text())["parameters"] == adapter.num_parameters


@pytest.mark.parametrize("method", METHODS)
def test_an_adapter_loads_to_the_outputs_it_was_trained_to(method, train_run, served_model_dir):  # noqa: F811
    from unified_vl import Predictor
    from unified_vl.checkpoint import load_pretrained
    from unified_vl.generation import generate_texts

    run = train_run(method)
    trained, processor = load_pretrained(served_model_dir)
    get_method(method).attach(trained, read_adapter(run / "adapter").options)
    trained.load_state_dict(_module_state(run, STEPS), strict=False)  # tied tables: one copy in the state
    trained.eval()
    batch = _batch(processor)
    # The prompt the Predictor writes for a question: the vqa task's canonical template.
    images, prompts = scene_images(), [VQA_PROMPTS[0].format(question=QUESTION)] * 4
    with torch_threads(1), torch.no_grad():
        predictor = Predictor.from_pretrained(served_model_dir, device="cpu", adapters={"a": run / "adapter"})
        ((model, rows, names),) = predictor.adapters.plan(["a"] * 4)
        assert rows == [0, 1, 2, 3]
        torch.testing.assert_close(model(**batch, adapter_names=names).logits, trained(**batch).logits)
        expected = generate_texts(trained, processor, images, prompts)
        assert [r.answer for r in predictor.answer(images, QUESTION, adapter="a")] == expected
        base = predictor.model(**batch).logits
    assert not torch.allclose(base, trained(**batch).logits)  # the adapter does change the model


def test_lora_targets_self_attention_only(served_model_dir):  # noqa: F811
    from peft.tuners.lora import LoraLayer

    from unified_vl.checkpoint import load_pretrained

    model, _ = load_pretrained(served_model_dir)
    method = get_method("lora")
    method.attach(model, method.resolve_options({"vision": True}))
    adapted = sorted(name for name, module in model.named_modules() if isinstance(module, LoraLayer))
    assert not [name for name in adapted if "EncDecAttention" in name]  # cross-attention: never by accident
    blocks = 2 * 2  # uvl-tiny: 2 encoder + 2 decoder blocks, q k v o each; 2 ViT blocks, qkv and proj
    assert len([n for n in adapted if n.endswith(tuple(f"SelfAttention.{p}" for p in "qkvo"))]) == 4 * blocks
    assert len([n for n in adapted if n.startswith("visual.backbone.blocks.")]) == 2 * 2
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n in dict(model.named_parameters()) if ".lora_" in n
    }


def _random_adapter(base_dir: Path, method: str, out: Path, *, seed: int, options=None) -> Path:
    """An adapter whose weights are random (large enough to change answers), for serving tests."""
    from unified_vl.checkpoint import load_pretrained

    model, _ = load_pretrained(base_dir)
    torch.manual_seed(seed)
    spec = get_method(method)
    options = spec.resolve_options(options)
    spec.attach(model, options)
    weights = {k: torch.randn_like(v) * (0.5 if "lora_" in k else 1.0) for k, v in method_weights(model).items()}
    base = base_identity(base_dir, model.config)
    return save_adapter(out, method=method, options=options, base=base, state=weights)


@pytest.fixture(scope="module")
def adapters(served_model_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("adapters")
    return {
        "lora_a": _random_adapter(served_model_dir, "lora", out / "lora_a", seed=1),
        "lora_b": _random_adapter(served_model_dir, "lora", out / "lora_b", seed=2, options={"rank": 4}),
        "prompt": _random_adapter(served_model_dir, "prompt_tuning", out / "prompt", seed=3),
        "prefix": _random_adapter(served_model_dir, "prefix_tuning", out / "prefix", seed=4),
    }


def test_one_batch_mixes_adapters_and_each_row_gets_its_adapters_answer(served_model_dir, adapters):  # noqa: F811
    from unified_vl import Predictor

    images = scene_images()
    with torch_threads(1):
        predictor = Predictor.from_pretrained(served_model_dir, device="cpu", adapters=adapters, batch_size=16)
        queries = [
            predictor.query(task, image, fields, adapter=name, **options)
            for name in [None, *adapters]
            for image in images[:2]
            for task, fields, options in (
                ("vqa", {"question": QUESTION}, {}),
                ("captioning", {}, {"num_beams": 2}),  # beams: the decoder's rows repeat each input's adapter
                ("rec", {"expression": "the shape"}, {}),
                ("classification", {}, {"labels": ["circle", "square", "star"]}),
            )
        ]
        random.Random(0).shuffle(queries)
        mixed = predictor.run(queries)
        alone = {}  # each adapter's queries run without the others
        for name in [None, *adapters]:
            own = [q for q in queries if q.adapter == name]
            alone.update(zip(map(id, own), predictor.run(own), strict=True))
        alone = [alone[id(query)] for query in queries]
    for query, got, want in zip(queries, mixed, alone, strict=True):
        assert got.text == want.text, (query.adapter, query.task)
        assert got.score == pytest.approx(want.score, abs=1e-4)
    by_adapter = {}
    for query, result in zip(queries, mixed, strict=True):
        by_adapter.setdefault(query.adapter, []).append(round(result.score, 3))
    assert len({tuple(scores) for scores in by_adapter.values()}) == len(by_adapter)  # each adapter answers its own way
    ((host, rows, names),) = [p for p in predictor.adapters.plan([None, "lora_a", "lora_b"]) if p[2] is not None]
    assert rows == [0, 1, 2] and names == ["__base__", "lora_a", "lora_b"]  # LoRA and base rows: one forward pass


def test_an_adapter_of_another_base_is_refused_naming_both(served_model_dir, adapters, tmp_path):  # noqa: F811
    from unified_vl import Predictor
    from unified_vl.checkpoint import load_pretrained, save_pretrained

    model, processor = load_pretrained(served_model_dir)
    with torch.no_grad():
        model.type_embed[0, 0] += 1.0  # one number differs
    other = save_pretrained(model, processor, tmp_path / "other-base")
    with pytest.raises(AdapterError) as info:
        Predictor.from_pretrained(other, device="cpu", adapters={"a": adapters["lora_a"]})
    message = str(info.value)
    assert "was trained on another base model" in message
    assert str(served_model_dir.resolve()) in message and str(other.resolve()) in message
    with pytest.raises(AdapterError, match="is a model folder: it has no adapter_config.json"):
        Predictor.from_pretrained(served_model_dir, device="cpu", adapters={"a": other})


def test_unknown_adapter_in_a_call_names_the_served_ones(served_model_dir, adapters):  # noqa: F811
    from unified_vl import Predictor
    from unified_vl.app.inference.predictor import InputError

    predictor = Predictor.from_pretrained(served_model_dir, device="cpu", adapters={"p": adapters["prompt"]})
    with pytest.raises(InputError, match=r"unknown adapter 'nope'; this model \(served-model\) serves the adapters: p"):
        predictor.caption(scene_images()[0], adapter="nope")


def test_vpt_on_a_cnn_backbone_is_a_clear_error():
    from unified_vl.config import UnifiedVLConfig
    from unified_vl.modeling import build_model

    config = UnifiedVLConfig(
        vision_model="resnet18",
        vision_out_index=3,
        image_size=32,
        text_config={"vocab_size": 64, "d_model": 16, "d_kv": 8, "d_ff": 32, "num_layers": 1, "num_heads": 2},
    )
    model = build_model(config)
    with pytest.raises(ValueError, match=r"vpt .* backbone 'resnet18' is a CNN .* use prompt_tuning, cocoop"):
        get_method("vpt").attach(model, {"length": 4, "deep": False})


def test_a_lora_target_that_matches_nothing_stops_the_run(served_model_dir, synth_data, tmp_path, capsys):  # noqa: F811
    args = ["--task", "vqa", "--data", str(synth_data), "--init", str(served_model_dir), "--method", "lora"]
    args += [*FAST[1:], "method.options.targets=[q, query]", f"output_dir={tmp_path / 'run'}"]
    assert finetune.main(args) == 2
    err = capsys.readouterr().err
    assert "method 'lora': lora: target 'query' matches no T5 self-attention projection" in err
    assert "projections are named: k, o, q, v" in err


def test_an_adapter_method_needs_a_base_folder(synth_data, tmp_path, capsys):  # noqa: F811
    args = ["--task", "vqa", "--data", str(synth_data), "--method", "prompt_tuning", *FAST, f"output_dir={tmp_path}"]
    assert finetune.main(args) == 2
    assert (
        "saves an adapter for a base model folder: give one with model.init (--init MODEL)" in capsys.readouterr().err
    )


def test_prefix_tuning_decodes_with_the_cache_as_teacher_forcing_reads(served_model_dir, adapters):  # noqa: F811
    """The prefix joins cached keys correctly: each greedy token is the argmax of a full teacher-forced pass."""
    from unified_vl import Predictor

    with torch_threads(1), torch.no_grad():
        predictor = Predictor.from_pretrained(served_model_dir, device="cpu", adapters={"x": adapters["prefix"]})
        ((model, _, _),) = predictor.adapters.plan(["x"])
        batch = predictor.processor(images=scene_images()[:2], text=["what does the image describe?"] * 2)
        sequences = model.generate(**batch, max_new_tokens=8)  # (2, 1 + t), starts with the decoder start
        logits = model(**batch, decoder_input_ids=sequences[:, :-1]).logits  # (2, t, V)
    finished = (sequences[:, 1:] == 1).cumsum(dim=1) - (sequences[:, 1:] == 1).long()  # after eos: padding
    live = finished == 0
    assert torch.equal(logits.argmax(-1)[live], sequences[:, 1:][live])


def test_eval_cli_evaluates_the_base_with_an_adapter(train_run, served_model_dir, synth_data, tmp_path):  # noqa: F811
    run = train_run("lora")
    out = tmp_path / "eval.json"
    args = ["--model", str(served_model_dir), "--adapter", str(run / "adapter"), "--data", str(synth_data)]
    assert evaluate.main([*args, "--task", "vqa", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["adapter"] == str(run / "adapter") and "vqa/test/accuracy" in result["metrics"]


def test_the_server_picks_the_adapter_by_model_and_keeps_serving_after_an_unknown_one(
    served_model_dir,  # noqa: F811
    adapters,
):
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from test_server import ServerThread, b64, data_uri, png_bytes

    from unified_vl import Predictor
    from unified_vl.app.inference.server import create_app

    image = scene_images()[1]
    served = {"lora_a": adapters["lora_a"], "prompt": adapters["prompt"]}
    with torch_threads(1):
        predictor = Predictor.from_pretrained(served_model_dir, device="cpu", adapters=served)
        expected = {name: predictor.answer(image, QUESTION, adapter=name)[0].answer for name in (None, *served)}
        chat_expected = predictor.generate(image, "what does the image describe?", adapter="prompt")[0].text
        app = create_app(predictor, max_batch=8, max_wait_ms=200)
        with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=120) as http:
            cards = http.get("/v1/models").json()["data"]
            assert [c["id"] for c in cards] == ["served-model", "lora_a", "prompt"]
            assert cards[1]["parent"] == "served-model" and cards[1]["root"] == str(served["lora_a"])
            assert cards[1]["method"] == "lora" and cards[2]["method"] == "prompt_tuning"
            body = {"task": "vqa", "image": b64(png_bytes(image)), "question": QUESTION}
            names = [None, "served-model", "lora_a", "prompt"]
            with ThreadPoolExecutor(len(names)) as pool:  # concurrent: one dynamic batch mixes them
                answers = list(pool.map(lambda m: http.post("/v1/predict", json={**body, "model": m}).json(), names))
            for name, answer in zip(names, answers, strict=True):
                assert answer["prediction"]["answer"] == expected[None if name == "served-model" else name]
                assert answer["model"] == (name or "served-model")
            bad = http.post("/v1/predict", json={**body, "model": "nope"})
            assert bad.status_code == 404
            error = bad.json()["error"]
            assert error["param"] == "model" and "served-model, lora_a, prompt" in error["message"]
            messages = [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_uri(png_bytes(image))}},
                {"type": "text", "text": "what does the image describe?"}]}]  # fmt: skip
            chat = http.post("/v1/chat/completions", json={"model": "prompt", "messages": messages}).json()
            assert chat["model"] == "prompt" and chat["choices"][0]["message"]["content"] == chat_expected
            assert http.post("/v1/chat/completions", json={"model": "gpt-4", "messages": messages}).status_code == 404
            assert http.post("/v1/predict", json=body).status_code == 200  # still serving


def test_predict_cli_answers_with_an_adapter(served_model_dir, adapters, tmp_path, capsys):  # noqa: F811
    from unified_vl import Predictor
    from unified_vl.app.cli import main
    from unified_vl.app.inference.cli import parse_adapters

    image = scene_images()[2]
    image.save(tmp_path / "scene.png")
    with torch_threads(1):
        code = main(["predict", "--model", str(served_model_dir), "--adapter", str(adapters["prompt"]),
                     "--task", "vqa", "--image", str(tmp_path / "scene.png"), "--text", QUESTION, "--device", "cpu"])  # fmt: skip
        assert code == 0
        out = json.loads(capsys.readouterr().out)
        predictor = Predictor.from_pretrained(served_model_dir, device="cpu", adapters={"p": adapters["prompt"]})
        assert out["prediction"]["answer"] == predictor.answer(tmp_path / "scene.png", QUESTION, adapter="p")[0].answer
    assert out["model"] == "prompt"  # named after its folder
    assert parse_adapters(["a=/x/y", "/runs/ft/adapter"]) == {"a": "/x/y", "adapter": "/runs/ft/adapter"}
    with pytest.raises(ValueError, match="the name 'a' is given twice"):
        parse_adapters(["a=/x", "a=/y"])


def test_any_checkpoint_of_an_adapter_run_exports_offline_as_an_adapter(train_run, tmp_path):
    from unified_vl.engine.export import main as export_main

    run = train_run("lora")
    assert export_main([str(run), "--tag", "step_00000001", "--out", str(tmp_path / "first")]) == 0
    first, final = read_adapter(tmp_path / "first"), read_adapter(run / "adapter")
    assert first.base == final.base and first.options == final.options and set(first.state) == set(final.state)
    step_one = _module_state(run, 1)
    for key, value in first.state.items():
        assert torch.equal(value, step_one[key].float())


def test_the_methods_benchmark_settings_load(tmp_path):
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("bench_methods", root / "scripts" / "bench_methods.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    files = sorted((root / "scripts" / "configs").glob("bench_methods*.yaml"))
    assert len(files) == 2
    for path in files:
        settings = bench.load_settings(path)
        assert {spec.get("method", row) for row, spec in settings["methods"].items()} == {"full", *METHODS}
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("rank: 8", "rnk: 8"))
    with pytest.raises(ValueError, match=r"method row '.*lora.*': method 'lora' has no option 'rnk'"):
        bench.load_settings(bad)
