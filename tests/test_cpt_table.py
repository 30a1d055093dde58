"""scripts/cpt_table.py without training: the protocol, the plan of runs, distractor proposals, the table.

The whole pipeline runs with ``--quick`` (minutes: a pretraining and a dozen fine-tunings), which
is beyond the default suite; these tests pin what decides the table's numbers and layout.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from test_jobs import synth_data  # noqa: F401  (a fixture)

from tasks.boxes import iou, validate_box

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("cpt_table", ROOT / "scripts/cpt_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["cpt_table"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("cpt_table")


def test_the_protocol_is_the_issues(script):
    from unified_vl.engine.config import load_config

    protocol = script.protocol_for()
    assert protocol.shots == [0, 1, 2, 4, 8, 16] and len(protocol.seeds) == 5
    assert [s.method for s in protocol.settings][:2] == ["full", "cpt"]
    norec = load_config(script.PRETRAIN_CONFIG)
    assert set(norec.data.tasks) == {"captioning", "vqa", "classification"}
    assert norec.train.max_minutes is None and norec.train.max_steps == 4000  # step bounded, not time bounded
    few = load_config(script.FINETUNE_CONFIG, ["data.tasks={rec: 1}"])
    assert (few.train.max_steps, few.train.global_batch_size, few.optim.lr, few.train.freeze) == (
        60,
        8,
        1e-4,
        ["visual"],
    )
    quick = script.protocol_for(quick=True)
    assert quick.shots == [0, 2] and quick.finetune_overrides == ["train.max_steps=3", "optim.warmup_steps=1"]
    assert script.protocol_for(shots=[0, 4], seeds=[3]).shots == [0, 4]


def test_the_plan_has_one_run_per_start_setting_shot_and_seed(script, tmp_path):
    protocol = script.protocol_for()
    models = {"norec": tmp_path / "norec", "main": tmp_path / "main"}
    specs = script.plan(protocol, models, "DATA", tmp_path, {8: tmp_path / "p8.json"})
    per = {}
    for spec in specs:
        per.setdefault((spec["start"], spec["setting"]), []).append((spec["shots"], spec["seed"]))
    # K=0 once, K>0 five seeds each, and the reference column for settings 0 and 1.
    assert sorted(per) == [("main", 0), ("main", 1), *(("norec", i) for i in range(5))]
    assert len(per[("norec", 0)]) == 1 + 5 * 5 + 1 and ("all", 0) in per[("norec", 1)]
    assert len(per[("norec", 4)]) == 1 + 5 * 5 and ("all", 0) not in per[("norec", 4)]
    assert len({spec["dir"] for spec in specs}) == len(specs)  # every run its own folder
    distractor = next(s for s in specs if s["setting"] == 4)
    assert distractor["options"] == {"templates": ["sentinel"], "proposals": str(tmp_path / "p8.json")}
    same = [s for s in specs if s["start"] == "norec" and s["shots"] == 4 and s["seed"] == 2]
    assert len({tuple(s["finetune"]) for s in same}) == 1  # every method the same steps and optimiser
    reference = next(s for s in specs if s["shots"] == "all")
    argv = script._finetune_argv(reference, tmp_path / "r")
    assert "--shots" not in argv and argv.index("train.max_steps=400") > argv.index(str(script.FINETUNE_CONFIG))
    few = script._finetune_argv(same[1], tmp_path / "f")
    assert few[few.index("--shots") + 1] == "4" and 'method.options.templates=["sentinel"]' in few
    from unified_vl.app.jobs.common import split_config_args

    path, overrides = split_config_args(few[few.index(str(script.FINETUNE_CONFIG)) :])  # what finetune parses
    assert path == str(script.FINETUNE_CONFIG) and overrides[-1] == f"output_dir={tmp_path / 'f'}"


def test_distractor_proposals_keep_the_objects_and_add_boxes_inside_the_image(script, synth_data, tmp_path):  # noqa: F811
    from data_tools import storage

    path = script.write_distractors(str(synth_data), ["test"], 8, tmp_path / "p.json")
    table = json.loads(path.read_text())
    records = list(storage.load_split(synth_data, "rec", "test", decode_images=False).remove_columns("image"))
    assert set(table) == {r["id"] for r in records}
    for record in records:
        boxes = table[record["id"]]
        assert len(boxes) == 8 and all(list(b) in boxes for b in record["candidate_boxes"])
        for box in boxes:
            validate_box(box, record["width"], record["height"])
    # Uniform choice: the gold object's share (distractors may overlap it too, so at least 1/8).
    chance = script.chance(str(synth_data), "test", 100, path)
    assert 1 / 8 <= chance < 0.25
    plain = script.chance(str(synth_data), "test", 100, None)
    assert plain == pytest.approx(
        sum(sum(iou(c, r["box"]) >= 0.5 for c in r["candidate_boxes"]) / len(r["candidate_boxes"]) for r in records)
        / len(records)
    )
    assert script.write_distractors(str(synth_data), ["test"], 8, path).read_text() == path.read_text()


def test_the_table_is_mean_and_sample_std_over_seeds(script):
    protocol = script.protocol_for(shots=[0, 4])
    results = [
        {"start": "norec", "setting": 0, "shots": 0, "seed": 0, "acc": 0.0, "snapped": 0.25},
        {"start": "norec", "setting": 0, "shots": 4, "seed": 0, "acc": 0.10, "snapped": 0.3},
        {"start": "norec", "setting": 0, "shots": 4, "seed": 1, "acc": 0.20, "snapped": 0.5},
        {"start": "main", "setting": 1, "shots": 4, "seed": 0, "acc": 0.5, "snapped": 0.5},
        {"start": "main", "setting": 1, "shots": "all", "seed": 0, "acc": 0.7, "snapped": 0.7},
    ]
    lines = script.table(protocol, results).splitlines()
    assert lines[0].startswith("| start | method | K=0 | K=4 | all (every training example")
    assert "| norec | location tokens (fine-tuning) | 0.0 | 15.0 ± 7.1 |  |" in lines
    assert (
        "| norec | location tokens (fine-tuning), snapped to the nearest candidate | 25.0 | 40.0 ± 14.1 |  |" in lines
    )
    assert "| main | CPT colours, sentinel template |  | 50.0 | 70.0 |" in lines
    assert len(lines) == 5  # header, rule, three rows with runs
