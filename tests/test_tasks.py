"""Contract tests over every registered task, the registry, and the no-torch rule for `tasks`.

The contract checks are plain functions so that a task registered at run time (the throw-away
task of `test_load_module_registers_a_task_from_elsewhere`) goes through the same checks as the
discovered ones.
"""

from __future__ import annotations

import ast
import copy
import importlib
import math
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import tasks
from tasks import RecordError, Task, boxes

REPO = Path(__file__).resolve().parents[1]
TASK_NAMES = sorted(tasks.TASKS)
EXPECTED = {"captioning", "vqa", "rec", "grounding", "classification", "itm", "detection", "text_infilling"}


# --------------------------------------------------------------------------------------------
# Contract checks (one function per property; every task must pass all of them)
# --------------------------------------------------------------------------------------------


def _tolerance(record) -> float:
    # Location tokens round a coordinate to its bin centre: at most half a bin off.
    side = max(record.get("width") or 0, record.get("height") or 0)
    return 0.5 * side / boxes.DEFAULT_NUM_BINS + 1e-9


def _close(a, b, tol: float) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= tol
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b, strict=True))
    return a == b


def check_examples(task: Task) -> None:
    assert len(task.examples) >= 3, f"{task.name}: give at least 3 example records"
    ids = [r["id"] for r in task.examples]
    assert len(set(ids)) == len(ids), f"{task.name}: example ids must be unique"
    for record in task.examples:
        task.validate(record)
    assert task.decoding in tasks.DECODING_MODES
    if task.metric_keys:
        assert task.primary_metric in task.metric_keys


def check_templates(task: Task) -> None:
    for record in task.examples:
        templates = task.templates_for(record)
        assert templates, task.name
        for i in range(len(templates)):
            text = task.prompt(record, template=i)
            assert isinstance(text, str) and text.strip(), (task.name, i)
            assert "{" not in text and "}" not in text, f"{task.name}: template {i} left a placeholder: {text!r}"
        # Training draws among the templates.
        drawn = {task.prompt(record, rng=random.Random(seed)) for seed in range(20)}
        assert drawn, task.name
        with pytest.raises(IndexError):
            task.prompt(record, template=len(templates))


def check_prompt_needs_inputs_only(task: Task) -> None:
    # A serving request carries inputs only: no id, no labels.
    for record in task.examples:
        names = set(task.required_fields(record, inputs_only=True))
        names |= {n for n, spec in task.fields.items() if spec.role == "input" and record.get(n) is not None}
        request = {n: record[n] for n in names if n in record}
        prompt = task.prompt(request)
        assert prompt.strip()
        if "id" not in task.required_fields(record, inputs_only=True):
            # Without an id, everything but id-seeded randomness (text infilling) is unchanged.
            assert prompt == task.prompt({**request, "id": record["id"]}) or task.name == "text_infilling"
        assert task.parse(task.target(record), request) == task.parse(task.target(record), record)
        with pytest.raises(RecordError):
            task.target(request)  # labels are needed for a target


def check_deterministic(task: Task) -> None:
    for record in task.examples:
        assert task.prompt(record) == task.prompt(copy.deepcopy(record))
        assert task.target(record) == task.target(copy.deepcopy(record))
        for seed in range(3):
            target = task.target(record, rng=random.Random(seed))
            assert isinstance(target, str) and target.strip()


def check_round_trip(task: Task) -> None:
    for record in task.examples:
        target = task.target(record)
        assert isinstance(target, str) and target.strip(), task.name
        parsed = task.parse(target, record)
        gold = task.gold(record)
        assert _close(parsed, gold, _tolerance(record)), f"{task.name}: parse(target) = {parsed!r} != gold {gold!r}"


def check_gold_scores(task: Task) -> None:
    records = list(task.examples)
    golds = [task.gold(r) for r in records]
    scores = task.evaluate(golds, records)
    assert task.primary_metric in scores, f"{task.name}: evaluate gave {sorted(scores)}"
    assert all(isinstance(v, float) and math.isfinite(v) for v in scores.values()), scores
    if task.metric_keys:
        assert set(scores) <= set(task.metric_keys), scores
    rotated = golds[1:] + golds[:1]
    shuffled = task.evaluate(rotated, records)
    assert scores[task.primary_metric] > shuffled[task.primary_metric], (task.name, scores, shuffled)


def check_missing_and_wrong_fields(task: Task) -> None:
    for record in task.examples:
        for name in task.required_fields(record):
            broken = {k: v for k, v in record.items() if k != name}
            with pytest.raises(RecordError) as info:
                task.validate(broken)
            message = str(info.value)
            assert task.name in message and repr(name) in message, message
            if name != "id":
                assert repr(record["id"]) in message, message
                with pytest.raises(RecordError, match=repr(name)):
                    task.target({**record, name: None})
            with pytest.raises(RecordError):
                task.gold(broken)
        for name in [n for n in task.fields if record.get(n) is not None]:
            with pytest.raises(RecordError) as info:
                task.validate({**record, name: object()})
            assert repr(name) in str(info.value) and repr(record["id"]) in str(info.value)
    with pytest.raises(RecordError, match=task.name):
        task.validate(["not", "a", "dict"])


def check_garbage_scores_zero(task: Task) -> None:
    records = list(task.examples)
    for record in records:
        for garbage in ("", "   ", "\n\t"):
            assert task.parse(garbage, record) is None
        with pytest.raises(TypeError):
            task.parse(None, record)
    scores = task.evaluate([None] * len(records), records)
    assert scores[task.primary_metric] == 0.0, scores
    with pytest.raises(ValueError, match="predictions"):
        task.evaluate([None], records)


def check_candidates(task: Task) -> None:
    candidates = task.candidates(task.examples)
    if task.decoding == "candidates":
        assert candidates and all(isinstance(c, str) for c in candidates)
        assert candidates == sorted(set(candidates))
        for record in task.examples:
            assert task.target(record) in candidates
    if task.decoding == "loc4":
        for record in task.examples:
            assert len(boxes.parse_loc_bins(task.target(record))) == 4


def check_order_by_position(task: Task) -> None:
    """A reordered record is a valid record with the same gold (the metric is order-free); reordering twice changes nothing."""
    if task.order_by_position is None:
        return
    for record in task.examples:
        ordered = task.order_by_position(copy.deepcopy(record))
        task.validate(ordered)
        as_is = task.evaluate([task.gold(record)], [record])
        assert task.evaluate([task.gold(ordered)], [record]) == as_is, (task.name, record["id"])
        assert task.order_by_position(copy.deepcopy(ordered)) == ordered, (task.name, record["id"])


CONTRACT = [
    check_examples,
    check_templates,
    check_prompt_needs_inputs_only,
    check_deterministic,
    check_round_trip,
    check_gold_scores,
    check_missing_and_wrong_fields,
    check_garbage_scores_zero,
    check_candidates,
    check_order_by_position,
]


@pytest.mark.parametrize("check", CONTRACT, ids=lambda f: f.__name__.removeprefix("check_"))
@pytest.mark.parametrize("name", TASK_NAMES)
def test_task_contract(name, check):
    check(tasks.get_task(name))


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def test_discovery_finds_every_task_module():
    assert EXPECTED <= set(tasks.TASKS)
    for name, task in tasks.TASKS.items():
        assert task.name == name
        assert importlib.import_module(f"tasks.{name}").TASK is task  # task name = module name


def test_get_task_unknown_name_lists_known_ones():
    with pytest.raises(KeyError, match="known tasks") as info:
        tasks.get_task("vqa2")
    assert "'vqa'" in str(info.value) and "'captioning'" in str(info.value)


def test_record_error_names_task_field_and_id():
    vqa = tasks.get_task("vqa")
    record = {"id": "q17", "question": "what?", "answer_type": "other"}
    with pytest.raises(RecordError) as info:
        vqa.target(record)
    assert str(info.value) == "vqa: record 'q17' is missing field 'answers' (expected list[str])"
    with pytest.raises(RecordError, match=r"vqa: record 'q17' field 'answers' must be list\[str\], got int 3"):
        vqa.validate({**record, "answers": 3})
    rec = tasks.get_task("rec")
    bad_box = {**rec.examples[0], "box": [10.0, 10.0, 5000.0, 20.0]}
    with pytest.raises(RecordError, match=r"rec: record 'rec-0' field 'box'.*outside"):
        rec.target(bad_box)


_TOY = '''
"""A throw-away task written by the test: echo the text back."""
from tasks import Task, string_field


def _metric(predictions, records):
    hits = [1.0 if p == r["text"] else 0.0 for p, r in zip(predictions, records, strict=True)]
    return {"exact": sum(hits) / len(hits)}


TASK = Task(
    name="toy_echo",
    fields={"text": string_field("text", role="input")},
    prompts=("repeat: {text}", "say {text}"),
    primary_metric="exact",
    decoding="open",
    format_target=lambda record, rng: record["text"],
    parse_output=lambda text, record: text.strip() or None,
    gold_prediction=lambda record: record["text"],
    metric=_metric,
    examples=[{"id": f"t{i}", "text": word} for i, word in enumerate(["one", "two", "three"])],
    metric_keys=("exact",),
)
'''


def test_load_module_registers_a_task_from_elsewhere(tmp_path, monkeypatch):
    (tmp_path / "toy_echo.py").write_text(textwrap.dedent(_TOY))
    (tmp_path / "toy_misnamed.py").write_text(textwrap.dedent(_TOY))
    (tmp_path / "toy_empty.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        task = tasks.load_module("toy_echo")
        assert tasks.get_task("toy_echo") is task
        for check in CONTRACT:  # a new task gets the whole contract
            check(task)
        with pytest.raises(ValueError, match="must equal the module name"):
            tasks.load_module("toy_misnamed")
        with pytest.raises(ValueError, match="defines no TASK"):
            tasks.load_module("toy_empty")
        other = Task(**{**{f: getattr(task, f) for f in task.__dataclass_fields__}, "fields": dict(task.fields)})
        with pytest.raises(ValueError, match="already registered"):
            tasks.register(other)
        assert tasks.register(other, replace=True) is other
    finally:
        tasks.TASKS.pop("toy_echo", None)
        for module in ("toy_echo", "toy_misnamed", "toy_empty"):
            sys.modules.pop(module, None)
    assert "toy_echo" not in tasks.TASKS
    with pytest.raises(KeyError):
        tasks.unregister("toy_echo")


def test_register_and_unregister():
    task = tasks.get_task("itm")
    assert tasks.unregister("itm") is task
    try:
        assert "itm" not in tasks.TASKS
        with pytest.raises(TypeError):
            tasks.register("itm")
    finally:
        tasks.register(task)
    assert tasks.get_task("itm") is task


def test_task_rejects_bad_definitions():
    base = tasks.get_task("itm")
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
    with pytest.raises(ValueError, match="decoding"):
        Task(**{**fields, "fields": dict(base.fields), "decoding": "beam"})
    with pytest.raises(ValueError, match="identifier"):
        Task(**{**fields, "fields": dict(base.fields), "name": "my-task"})
    with pytest.raises(ValueError, match="primary_metric"):
        Task(**{**fields, "fields": dict(base.fields), "primary_metric": "f1"})
    with pytest.raises(ValueError, match="itm: decoding 'phrases' and a decoding_source go together"):
        Task(**{**fields, "fields": dict(base.fields), "decoding": "phrases"})
    with pytest.raises(ValueError, match="itm: decoding 'phrases' and a decoding_source go together"):
        Task(**{**fields, "fields": dict(base.fields), "decoding_source": lambda record: record["text"]})


def test_grounding_copies_phrases_from_the_caption_and_describes_regions_freely():
    task = tasks.get_task("grounding")
    phrase_record = {"id": "a", "width": 8, "height": 8, "caption": "a  red circle", "phrases": ["a red circle"]}
    region_record = {"id": "b", "width": 8, "height": 8, "region": [0, 0, 4, 4], "description": "a red circle"}
    assert task.decoding == "phrases"
    assert task.source(phrase_record) == "a red circle"  # squashed, as the prompt writes it
    assert task.source(region_record) is None
    assert tasks.get_task("vqa").source({"question": "q?"}) is None


def test_grounding_in_reading_order_sorts_phrases_by_box_centre_and_keeps_regions():
    task = tasks.get_task("grounding")
    record = {
        "id": "g",
        "width": 64,
        "height": 64,
        "caption": "a red circle, a blue square and a green cross",
        "phrases": ["a red circle", "a blue square", "a green cross"],
        # centres: (40, 40), (56, 8), (8, 40): the square's row first, then the other row left to right
        "boxes": [[32, 32, 48, 48], [48, 0, 64, 16], [0, 30, 16, 50]],
    }
    ordered = task.order_by_position(record)
    assert ordered["phrases"] == ["a blue square", "a green cross", "a red circle"]
    assert ordered["boxes"] == [[48, 0, 64, 16], [0, 30, 16, 50], [32, 32, 48, 48]]
    assert record["phrases"][0] == "a red circle"  # the stored record is not changed
    assert task.target(ordered).startswith("a blue square<loc_")
    region = {"id": "r", "width": 8, "height": 8, "region": [0, 0, 4, 4], "description": "a red circle"}
    assert task.order_by_position(region) is region
    assert tasks.get_task("vqa").order_by_position is None


# --------------------------------------------------------------------------------------------
# Dependency direction: tasks never imports torch (DESIGN.md §4)
# --------------------------------------------------------------------------------------------

FORBIDDEN = {"torch", "transformers", "timm", "deepspeed", "torchvision"}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def test_tasks_modules_do_not_import_torch():
    files = sorted((REPO / "tasks").glob("**/*.py"))
    assert files
    for path in files:
        for name in _imports(path):
            assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"
            if name.startswith("unified_vl") and name != "unified_vl":
                # unified_vl's other modules pull in torch; only the pure-Python boxes module is allowed.
                assert name in ("tasks.boxes",), f"{path.name} imports {name}"


def test_importing_tasks_loads_no_torch():
    code = f"import sys, tasks; print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_two_tasks_share_an_instruction():
    # In a mixture, one instruction with two kinds of target (a label word, a sentence) is ambiguous.
    owners: dict[str, list[str]] = {}
    for name in sorted(tasks.TASKS):
        for template in tasks.get_task(name).prompts:
            owners.setdefault(template, []).append(name)
    assert {t: names for t, names in owners.items() if len(names) > 1} == {}
