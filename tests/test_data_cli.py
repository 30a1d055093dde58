"""`unified-vl data ...` and `unified-vl tokenizer train` through data_tools.cli, plus the default corpus."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

import tasks
from data_tools import cli, corpus, show, storage, synth
from unified_vl.app import tokenizer_cli


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    code = cli.main(
        [
            "synth",
            "--out",
            str(out),
            "--num-images",
            "10",
            "--num-eval-images",
            "3",
            "--image-size",
            "48",
            "--seed",
            "2",
        ]
    )
    assert code == 0
    return out


def test_synth_command_writes_manifest_and_prints_baselines_and_speed(synth_dir, capsys):
    manifest = storage.read_manifest(synth_dir)
    assert (
        manifest["command"]
        == "unified-vl data synth --out "
        + str(synth_dir)
        + " --num-images 10 --num-eval-images 3 --image-size 48 --seed 2"
    )
    assert manifest["synth"]["images"] == {"train": 10, "val": 3, "test": 3, "heldout": 3}
    out = cli.main(["synth", "--out", str(synth_dir.parent / "again"), "--num-images", "4", "--num-eval-images", "2"])
    printed = capsys.readouterr().out
    assert out == 0
    assert "vqa/test/accuracy" in printed and "rec/test/acc@0.5" in printed and re.search(r"\d+ images/s", printed)


def test_show_writes_a_png_of_the_expected_size(synth_dir, tmp_path):
    png = tmp_path / "grid.png"
    assert cli.main(["show", "--data", str(synth_dir), "--n", "16", "--out", str(png)]) == 0
    assert Image.open(png).size == show.grid_size(16) == (4 * 192, 4 * (192 + show.TEXT_LINES * show.LINE_HEIGHT))
    assert (
        cli.main(
            [
                "show",
                "--data",
                str(synth_dir),
                "--n",
                "5",
                "--out",
                str(png),
                "--task",
                "rec",
                "--split",
                "heldout",
                "--cell-size",
                "64",
            ]
        )
        == 0
    )
    assert Image.open(png).size == (3 * 64, 2 * (64 + show.TEXT_LINES * show.LINE_HEIGHT))


def test_show_of_a_missing_split_fails_clearly(synth_dir, tmp_path, capsys):
    assert (
        cli.main(
            ["show", "--data", str(synth_dir), "--out", str(tmp_path / "g.png"), "--task", "rec", "--split", "nope"]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "rec/nope" in err and "available:" in err


def test_convert_command_reports_bad_input_with_exit_status_1(tmp_path, capsys):
    annotations = tmp_path / "captions_val2017.json"
    annotations.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "x.jpg", "width": 4, "height": 4}],
                "annotations": [{"image_id": 1, "id": 5, "caption": "a cat"}],
            }
        )
    )
    code = cli.main(
        [
            "convert",
            "coco_captions",
            "--input",
            str(annotations),
            "--images",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert f"error: {annotations}: images[0] (id=1): image file not found" in err
    code = cli.main(
        [
            "convert",
            "coco_captions",
            "--input",
            str(annotations),
            "--images",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
            "--skip-bad",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0 and "skipped 1 bad record(s)" in printed and "records/s" in printed
    assert storage.read_manifest(tmp_path / "out")["skipped_count"] == 1


def test_usage_errors_and_help(capsys):
    assert cli.main(["convert", "not_a_source", "--input", "x", "--out", "y"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert cli.main(["convert", "--help"]) == 0
    assert "flickr30k_entities" in capsys.readouterr().out
    assert tokenizer_cli.main(["train"]) == 2


def test_tokenizer_train_on_stored_records(synth_dir, tmp_path):
    texts = list(corpus.corpus([str(synth_dir)]))
    assert "what does the image describe?" in texts  # templates are in
    assert not any("<loc_" in t or "<extra_id_" in t for t in texts)
    stored = storage.load_split(synth_dir, "captioning", "train")[0]["captions"][0]
    assert stored in texts
    out = tmp_path / "tok"
    assert tokenizer_cli.main(["train", "--data", str(synth_dir), "--vocab-size", "300", "--out", str(out)]) == 0
    from unified_vl.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(out))
    ids = tokenizer("a small red circle left of a large blue square").input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a small red circle left of a large blue square"
    assert "<loc_999>" in tokenizer.get_vocab()


def test_default_corpus_is_deterministic_and_covers_templates_and_vocabulary():
    a = corpus.default_corpus_texts(num_scenes=8)
    assert a == corpus.default_corpus_texts(num_scenes=8)
    words = set(" ".join(a).split())
    assert set(synth.vocabulary()) <= words
    for task in tasks.TASKS.values():
        for template in task.prompts:
            fixed = [w for w in re.sub(r"\{[^{}]*\}", " ", template).split()]
            assert set(fixed) <= words, (task.name, template)
    assert not any("<loc_" in t or "<extra_id_" in t for t in a)
