"""Methods plug into training, evaluation and configuration without the loop knowing their names."""

from __future__ import annotations

import json

import pytest
from test_jobs import FAST, synth_data  # noqa: F401  (synth_data is a fixture)

from unified_vl.app.jobs import evaluate, finetune
from unified_vl.engine.config import ConfigError, load_config
from unified_vl.prompting import METHODS, Method, MethodError, get_method, register


def test_full_is_the_default_and_unknown_methods_and_options_are_refused():
    assert load_config(None, ["data.tasks={vqa: 1}"]).method.name == "full"
    assert "full" in METHODS and get_method("full").attach is None
    with pytest.raises(ConfigError, match=r"unknown method 'nosuch'; known methods: .*full: "):
        load_config(None, ["data.tasks={vqa: 1}", "method.name=nosuch"])
    with pytest.raises(ConfigError, match="method 'full' has no option 'rank'; its options: none"):
        load_config(None, ["data.tasks={vqa: 1}", "method.options.rank=4"])


def test_options_are_checked_against_the_defaults_types():
    method = Method(name="probe", description="test", options={"length": 4, "alpha": 0.5, "deep": False})
    assert method.resolve_options({"alpha": 1}) == {"length": 4, "alpha": 1.0, "deep": False}
    with pytest.raises(MethodError, match="option 'length' must be int .* got str 'four'"):
        method.resolve_options({"length": "four"})
    with pytest.raises(MethodError, match="option 'deep' must be bool"):
        method.resolve_options({"deep": 1})
    with pytest.raises(ValueError, match="identifier"):
        Method(name="not a name", description="x")


@pytest.fixture()
def echo_method():
    """A method that freezes the vision backbone, writes its own targets and reads its own answers."""

    def attach(model, options):
        model.visual.requires_grad_(False)

    def make_example(task, record, rng, options):
        from unified_vl.engine.trainer import Example

        return Example(record["image"], f"say {options['word']}", options["word"])

    def generate(model, processor, task, records, options, *, batch_size, num_beams):
        return [r["answers"][0] for r in records]  # the gold answer: accuracy must come out high

    method = register(
        Method(
            name="echo",
            description="test",
            options={"word": "red"},
            attach=attach,
            make_example=make_example,
            generate=generate,
        )
    )
    yield method
    METHODS.pop("echo")


def test_a_method_attaches_writes_examples_and_reads_answers(echo_method, synth_data, tmp_path, capsys):  # noqa: F811
    from unified_vl.checkpoint import load_pretrained

    run = tmp_path / "run"
    args = ["--task", "vqa", "--data", str(synth_data), "--method", "echo", "method.options.word=blue"]
    assert finetune.main([*args, *FAST, "eval.every=0", f"output_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert "method echo" in out and "visual" in out
    report = next(line for line in out.splitlines() if line.strip().startswith("visual"))
    assert " 0 of " in report and "(  0.00%)" in report  # the method froze the backbone
    final = json.loads((run / "eval_final.json").read_text())["metrics"]
    assert final["vqa/test/accuracy"] >= 0.9  # scored from the method's own answers
    config = (run / "config.yaml").read_text()
    assert "name: echo" in config and "word: blue" in config
    out_file = tmp_path / "eval.json"
    model_dir = str(run / "model")
    assert (
        evaluate.main(
            [
                "--model",
                model_dir,
                "--data",
                str(synth_data),
                "--task",
                "vqa",
                "--method",
                "echo",
                "--out",
                str(out_file),
            ]
        )
        == 0
    )
    assert json.loads(out_file.read_text())["metrics"]["vqa/test/accuracy"] >= 0.9
    assert (
        evaluate.main(
            ["--model", model_dir, "--data", str(synth_data), "--method", "echo", "--method-option", "nope=1"]
        )
        == 2
    )
    assert "method 'echo' has no option 'nope'" in capsys.readouterr().err
    load_pretrained(model_dir)
