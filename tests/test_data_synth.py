"""The synthetic world: determinism, unambiguous texts checked by an independent resolver, held-out pairs."""

from __future__ import annotations

import hashlib
import itertools
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import tasks
from data_tools import storage, synth

N_SCENES = 1500  # per split; scenes and texts only (no drawing): ~2 s

# ---------------------------------------------------------------------------------------------
# An independent reading of the world's language. It shares the vocabulary with the generator but
# none of its code: it parses the text and evaluates it against the ground truth.
# ---------------------------------------------------------------------------------------------

SIZE_RE = "|".join(synth.SIZES)
COLOR_RE = "|".join(synth.COLOR_NAMES)
NOUN_RE = "|".join([*synth.SHAPES, "object"])
PLURAL = {v: k for k, v in synth.SHAPE_PLURALS.items()}
DESC = rf"(?:(?P<{{p}}size>{SIZE_RE}) )?(?:(?P<{{p}}color>{COLOR_RE}) )?(?P<{{p}}noun>{NOUN_RE})"
REL_RE = "left of|right of|above|below"
EXPRESSION = re.compile(
    rf"^the (?:(?P<ordinal>leftmost|rightmost|topmost|bottommost) )?{DESC.format(p='t')}"
    rf"(?: (?P<rel>{REL_RE}) the {DESC.format(p='l')})?$"
)


def holds(rel: str, a, b) -> bool:
    """Dominant-axis reading of a relation between box centres (image y grows downwards)."""
    dx, dy = b.cx - a.cx, b.cy - a.cy
    horizontal = abs(dx) > abs(dy)
    return {
        "left of": horizontal and dx > 0,
        "right of": horizontal and dx < 0,
        "above": not horizontal and dy > 0,
        "below": not horizontal and dy < 0,
    }[rel]


def matches(obj, size, color, noun) -> bool:
    return (
        (size is None or obj.size == size) and (color is None or obj.color == color) and noun in ("object", obj.shape)
    )


def group(m, prefix, objects):
    return [
        i
        for i, o in enumerate(objects)
        if matches(o, m.group(prefix + "size"), m.group(prefix + "color"), m.group(prefix + "noun"))
    ]


def resolve(expression: str, scene) -> list[int]:
    """Indices of the objects ``expression`` can refer to (a good expression gives exactly one)."""
    m = EXPRESSION.match(expression)
    assert m, f"expression outside the grammar: {expression!r}"
    objects = scene.objects
    candidates = group(m, "t", objects)
    if m.group("rel"):
        landmarks = group(m, "l", objects)
        if len(landmarks) != 1:  # "the X" must name one landmark
            return []
        (landmark,) = landmarks
        candidates = [i for i in candidates if i != landmark and holds(m.group("rel"), objects[i], objects[landmark])]
    if m.group("ordinal"):
        key = {
            "leftmost": lambda i: objects[i].cx,
            "rightmost": lambda i: -objects[i].cx,
            "topmost": lambda i: objects[i].cy,
            "bottommost": lambda i: -objects[i].cy,
        }[m.group("ordinal")]
        if len(candidates) < 2:
            return []  # an ordinal over a single object is not how the grammar is used
        best = min(key(i) for i in candidates)
        candidates = [i for i in candidates if key(i) == best]
    return candidates


def answer_question(question: str, scene, *, margin: float = 0.1) -> str:
    """The true answer of a generated question, computed from the scene (``margin``: the least
    distance, x S, of an object asked about from the middle line)."""
    objects = scene.objects
    desc = DESC.format(p="")
    if m := re.fullmatch(rf"what color is the {desc}\?", question):
        (i,) = group(m, "", objects)
        return objects[i].color
    if m := re.fullmatch(rf"what shape is the {desc}\?", question):
        (i,) = group(m, "", objects)
        return objects[i].shape
    if m := re.fullmatch(
        rf"how many (?:(?P<size>{SIZE_RE}) )?(?:(?P<color>{COLOR_RE}) )?(?P<noun>\w+) are there\?", question
    ):
        noun = PLURAL[m.group("noun")]
        return str(sum(matches(o, m.group("size"), m.group("color"), noun) for o in objects))
    if m := re.fullmatch(rf"is there an? {desc}\?", question):
        return "yes" if group(m, "", objects) else "no"
    if m := re.fullmatch(rf"is the {desc} (?:on|at) the (?P<first>\w+) or (?P<second>\w+) of the image\?", question):
        (i,) = group(m, "", objects)
        first_half, second_half = sorted(
            [m.group("first"), m.group("second")], key=["left", "right", "top", "bottom"].index
        )
        centre = objects[i].cx if first_half == "left" else objects[i].cy
        assert abs(centre - scene.size / 2) >= margin * scene.size  # never on the middle line
        return first_half if centre < scene.size / 2 else second_half
    a, b = DESC.format(p="a"), DESC.format(p="b")
    if m := re.fullmatch(rf"is the {a} (?P<rel>{REL_RE}) the {b}\?", question):
        ((i,), (j,)) = group(m, "a", objects), group(m, "b", objects)
        return "yes" if holds(m.group("rel"), objects[i], objects[j]) else "no"
    if m := re.fullmatch(rf"is the {a} (?P<first>\w+) or (?P<second>\w+)(?: of)? the {b}\?", question):
        ((i,), (j,)) = group(m, "a", objects), group(m, "b", objects)
        options = {m.group("first"), m.group("second")}
        assert options in ({"left", "right"}, {"above", "below"}), question
        true = [o for o in options if holds(o if o in ("above", "below") else f"{o} of", objects[i], objects[j])]
        assert len(true) == 1, question  # exactly one option holds: asked along the dominant axis
        return true[0]
    raise AssertionError(f"question outside the grammar: {question!r}")


def scene_layout(scene) -> str:
    """The layout a scene was drawn in: grid scenes have every centre near a cell centre."""
    cell = scene.size / synth.GRID
    near = all(
        min(abs(c - (k + 0.5) * cell) for k in range(synth.GRID)) <= synth.JITTER * scene.size + 1e-6
        or o.r >= cell / 2  # a large shape pulled inwards at the border
        for o in scene.objects
        for c in (o.cx, o.cy)
    )
    return "grid" if near else "free"


def _scenes(split: str, n: int = N_SCENES, *, layout: str = "grid"):
    for i in range(n):
        scene, records = synth.make_image(7, split, i, 64, render=False, layout=layout)
        yield scene, records


@pytest.fixture(scope="module")
def world():
    return {split: list(_scenes(split)) for split in ("train", "heldout")}


def test_every_referring_expression_picks_out_exactly_one_object(world):
    checked = Counter()
    for _split, scenes in world.items():
        for scene, records in scenes:
            assert synth.all_pairs_crisp(scene)
            for record in records["rec"]:
                hits = resolve(record["expression"], scene)
                assert len(hits) == 1, (record["id"], record["expression"], hits)
                assert scene.objects[hits[0]].box == record["box"]
                assert record["box"] in record["candidate_boxes"]
                kind = (
                    "ordinal"
                    if "most " in record["expression"]
                    else "relation"
                    if re.search(REL_RE, record["expression"])
                    else "attribute"
                )
                checked[kind] += 1
    # All three kinds occur often (the generator balances them).
    assert min(checked.values()) > 0.15 * sum(checked.values()), checked
    assert sum(checked.values()) > 5000


def test_every_object_of_a_scene_can_be_referred_to_directly():
    rng = __import__("random").Random(0)
    for scene, _ in _scenes("val", 300):
        for i in range(len(scene.objects)):
            expression = synth.referring_expression(scene, i, rng)
            if expression is not None:
                assert resolve(expression, scene) == [i]


def test_vqa_answers_are_true_and_the_majority_of_ten(world):
    types = Counter()
    for scene, records in world["train"]:
        for record in records["vqa"]:
            truth = answer_question(record["question"], scene)
            assert len(record["answers"]) == 10
            assert Counter(record["answers"]).most_common(1)[0][0] == truth
            assert record["answers"].count(truth) >= synth.MIN_CORRECT_ANSWERS
            types[record["question_type"]] += 1
            expected_type = {"yes": "yes/no", "no": "yes/no"}.get(truth, "number" if truth.isdigit() else "other")
            assert record["answer_type"] == expected_type
    assert set(types) == {"what color is the", "what shape is the", "how many", "is there a", "is the"}
    answers = Counter(
        answer_question(r["question"], s) for s, rs in world["train"] for r in rs["vqa"] if r["answer_type"] == "yes/no"
    )
    assert 0.4 < answers["yes"] / (answers["yes"] + answers["no"]) < 0.6


def test_training_images_carry_extra_count_and_relation_questions(world):
    base = {"what color is the", "what shape is the", "how many", "is there a", "is the"}
    extra = Counter()
    for split, scenes in world.items():
        for _scene, records in scenes:
            vqa = records["vqa"]
            assert [r["id"] for r in vqa] == [f"{vqa[0]['id'][:-3]}-q{k}" for k in range(len(vqa))]
            assert len({r["question"] for r in vqa}) == len(vqa)  # never the same question twice
            types = Counter(r["question_type"] for r in vqa)
            for question_type, n in types.items():
                allowed = 1 + (synth.TRAIN_EXTRA_QUESTIONS.get(question_type, 0) if split == "train" else 0)
                assert n <= allowed, (vqa[0]["id"], question_type, n)
            head = [r["question_type"] for r in vqa[: len(types)]]
            assert len(set(head)) == len(head) and set(head) <= base  # one per type first, extras after
            if split == "train":
                extra.update({t: n - 1 for t, n in types.items()})
    # Most training images get all of their extras (a repeat of an earlier question is dropped).
    n_train = len(world["train"])
    assert extra["how many"] > 0.5 * n_train * synth.TRAIN_EXTRA_QUESTIONS["how many"]
    assert extra["is the"] > 0.8 * n_train * synth.TRAIN_EXTRA_QUESTIONS["is the"]
    assert set(extra) - {"how many", "is the"} <= {t for t in extra if extra[t] == 0}


def test_extra_training_questions_leave_the_other_records_unchanged():
    scene, records = synth.make_image(7, "train", 3, 64, render=False)
    saved = dict(synth.TRAIN_EXTRA_QUESTIONS)
    try:
        synth.TRAIN_EXTRA_QUESTIONS.clear()
        _, plain = synth.make_image(7, "train", 3, 64, render=False)
    finally:
        synth.TRAIN_EXTRA_QUESTIONS.update(saved)
    assert plain["vqa"] == records["vqa"][: len(plain["vqa"])] and len(records["vqa"]) > len(plain["vqa"])
    assert {k: v for k, v in plain.items() if k != "vqa"} == {k: v for k, v in records.items() if k != "vqa"}


def test_captions_grounding_detection_classification_match_the_scene(world):
    for scene, records in world["train"][:300]:
        names = Counter(f"{o.size} {o.color} {o.shape}" for o in scene.objects)
        (caption,) = records["captioning"]
        assert len(caption["captions"]) == 5
        phrase_record, region_record = records["grounding"]
        assert phrase_record["caption"] == caption["captions"][0]
        position = 0
        for phrase, box in zip(phrase_record["phrases"], phrase_record["boxes"], strict=True):
            position = phrase_record["caption"].index(phrase, position)
            words = phrase.split()
            count = 1 if words[0] in ("a", "an") else synth.NUMBER_WORDS.index(words[0])
            size, color, noun = words[1], words[2], PLURAL.get(words[3], words[3])
            members = [o for o in scene.objects if (o.size, o.color, o.shape) == (size, color, noun)]
            assert len(members) == count == names[f"{size} {color} {noun}"]
            assert box == [
                min(o.box[0] for o in members),
                min(o.box[1] for o in members),
                max(o.box[2] for o in members),
                max(o.box[3] for o in members),
            ]
        assert region_record["region"] in [o.box for o in scene.objects]
        (detection,) = records["detection"]
        assert sorted(o["label"] for o in detection["objects"]) == sorted(f"{o.color} {o.shape}" for o in scene.objects)
        largest = max(scene.objects, key=lambda o: (o.box[2] - o.box[0]) * (o.box[3] - o.box[1]))
        second = sorted((o.box[2] - o.box[0]) * (o.box[3] - o.box[1]) for o in scene.objects)[-2]
        assert (largest.box[2] - largest.box[0]) ** 2 > 1.2 * second  # the largest is clearly largest
        assert records["classification"][0]["label"] == largest.shape


def test_itm_is_balanced_and_false_texts_are_false(world):
    matched = Counter()
    for _scene, records in world["train"]:
        (record,) = records["itm"]
        matched[record["match"]] += 1
        if record["match"]:
            assert record["text"] in records["captioning"][0]["captions"]
        else:
            assert record["text"] not in records["captioning"][0]["captions"]
    assert matched[True] == matched[False]
    rng = __import__("random").Random(1)
    for scene, _ in world["train"][:300]:
        caption = synth.false_caption(scene, rng, allow_heldout=False)
        assert not caption.is_true(scene)
    for scene, _ in world["train"][:300]:
        assert all(c.is_true(scene) for c in synth.scene_captions(scene, rng))


def _mentions_heldout(text: str) -> bool:
    return any(
        re.search(rf"\b{color} {shape}", text) or re.search(rf"\b{color} {synth.SHAPE_PLURALS[shape]}", text)
        for color, shape in synth.HELDOUT_PAIRS
    )


def _texts(records: dict[str, list[dict]]) -> list[str]:
    out = []
    for task_records in records.values():
        for r in task_records:
            for key in ("captions", "question", "expression", "caption", "description", "text", "objects"):
                value = r.get(key)
                if isinstance(value, str):
                    out.append(value)
                elif isinstance(value, list):
                    out.extend(v["label"] if isinstance(v, dict) else v for v in value)
    return out


def test_heldout_pairs_never_in_train_and_in_every_heldout_scene(world):
    for scene, records in world["train"]:
        assert not any((o.color, o.shape) in synth.HELDOUT_PAIRS for o in scene.objects)
        assert not any(_mentions_heldout(t) for t in _texts(records))
    for scene, _ in world["heldout"]:
        assert any((o.color, o.shape) in synth.HELDOUT_PAIRS for o in scene.objects)
    # Every shape and every colour is still seen in train.
    seen = {(o.color, o.shape) for scene, _ in world["train"] for o in scene.objects}
    assert {c for c, _ in seen} == set(synth.COLOR_NAMES) and {s for _, s in seen} == set(synth.SHAPES)
    assert seen.isdisjoint(synth.HELDOUT_PAIRS)


def test_records_satisfy_the_task_contracts(world):
    for _scene, records in world["heldout"][:200]:
        for task, task_records in records.items():
            for record in task_records:
                tasks.get_task(task).validate(record)


def _digest_of_images(seed: int, n: int = 4) -> str:
    records = []
    for split in synth.SPLITS:
        for i in range(n):
            for task_records in synth.make_image(seed, split, i, 48)[1].values():
                records.extend(task_records)
    return synth.records_digest(records)


def test_same_seed_same_bytes_different_seed_different_bytes():
    assert _digest_of_images(3) == _digest_of_images(3)
    assert _digest_of_images(3) != _digest_of_images(4)


def test_determinism_does_not_depend_on_the_hash_seed():
    code = "from data_tools import synth; print(synth.records_digest([r for rs in synth.make_image(5, 'train', 3, 64)[1].values() for r in rs]))"
    root = Path(__file__).resolve().parents[1]
    digests = {
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=root,
            env={"PYTHONHASHSEED": str(h), "PATH": ""},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for h in (1, 2)
    }
    assert len(digests) == 1


def test_generate_writes_all_tasks_and_splits_reproducibly(tmp_path):
    lines = []
    manifest = synth.generate(
        str(tmp_path / "a"), num_images=12, num_eval_images=4, image_size=48, seed=1, log=lines.append
    )
    synth.generate(str(tmp_path / "b"), num_images=12, num_eval_images=4, image_size=48, seed=1, log=lambda *_: None)
    assert set(manifest["tasks"]) == set(synth.TASKS_WRITTEN)
    assert all(set(splits) == set(synth.SPLITS) for splits in manifest["tasks"].values())
    assert manifest["synth"]["images"] == {"train": 12, "val": 4, "test": 4, "heldout": 4}
    assert manifest["tasks"]["captioning"] == {"train": 12, "val": 4, "test": 4, "heldout": 4}
    assert {row["task"] for row in manifest["synth"]["baselines"]} == {"vqa", "rec", "classification", "captioning"}
    assert any("images/s" in line for line in lines)
    for task, splits in manifest["tasks"].items():
        for split in splits:
            a = (tmp_path / "a" / task / split / "data-00000-of-00001.arrow").read_bytes()
            b = (tmp_path / "b" / task / split / "data-00000-of-00001.arrow").read_bytes()
            assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest()
    image = storage.load_split(tmp_path / "a", "vqa", "test")[0]["image"]
    assert image.size == (48, 48) and image.mode == "RGB"


def test_vocabulary_covers_every_generated_word(world):
    vocabulary = set(synth.vocabulary())
    for _scene, records in world["train"][:200]:
        for text in _texts(records):
            words = set(re.findall(r"[a-z0-9]+", text))
            assert words <= vocabulary, words - vocabulary


def test_the_resolver_itself_sees_ambiguity():
    def obj(shape, color, size, cx, cy):
        return synth.SceneObject(shape, color, size, cx, cy, 5.0 if size == "small" else 9.0, synth.COLORS[color])

    scene = synth.Scene(
        64,
        (
            obj("circle", "red", "small", 10, 10),
            obj("circle", "red", "small", 50, 12),
            obj("square", "blue", "large", 30, 45),
        ),
        2,
        200,
        (),
        0,
    )
    assert resolve("the red circle", scene) == [0, 1]
    assert resolve("the leftmost red circle", scene) == [0]
    assert resolve("the circle above the blue square", scene) == [0, 1]  # both are above it
    assert resolve("the circle above the circle", scene) == []  # two landmarks: not "the"
    assert resolve("the large object", scene) == [2]
    assert answer_question("how many red circles are there?", scene) == "2"


def test_objects_stay_visible(world):
    from tasks.boxes import iou

    for scene, _ in world["train"]:
        for a, b in itertools.combinations(scene.objects, 2):
            limit = 0.0 if a.color == b.color else synth.MAX_IOU
            assert iou(a.box, b.box) <= limit + 1e-9
            assert 0 <= min(a.box) and max(a.box) <= scene.size


# ---------------------------------------------------------------------------------------------
# The free layout: objects anywhere, relation questions back
# ---------------------------------------------------------------------------------------------

GRID_TRAIN_3_DIGEST = "9896bf4dd30fd9182c38f473af951ab3c6e66d7c624bf8a36f3a774004967399"


def test_the_grid_layout_is_byte_identical_to_before_layouts_existed():
    # The digest of the world as the main job's models were trained on it (before --layout).
    records = [r for rs in synth.make_image(5, "train", 3, 64)[1].values() for r in rs]
    assert synth.records_digest(records) == GRID_TRAIN_3_DIGEST
    assert synth.make_image(5, "train", 3, 64, layout="grid")[1] == synth.make_image(5, "train", 3, 64)[1]


@pytest.fixture(scope="module")
def free_world():
    return {split: list(_scenes(split, 600, layout="free")) for split in ("train", "test", "heldout")}


def test_free_layout_places_objects_off_the_grid_at_many_sizes(free_world):
    scenes = [scene for scene, _ in free_world["train"]]
    assert sum(scene_layout(scene) == "free" for scene in scenes) > 0.9 * len(scenes)
    radii = sorted(o.r / 64 for scene in scenes for o in scene.objects)
    assert radii[0] < synth.SMALL_R * 0.85 and radii[-1] > synth.LARGE_R * 1.3
    gaps = [
        max(b.box[0] - a.box[2], a.box[0] - b.box[2], b.box[1] - a.box[3], a.box[1] - b.box[3])
        for scene in scenes
        for a, b in itertools.combinations(scene.objects, 2)
    ]
    assert sum(g <= 1.0 for g in gaps) > 0.05 * len(gaps)  # touching (or overlapping) pairs are common
    for scene in scenes:
        assert synth.all_pairs_crisp(scene)
        for a, b in itertools.combinations(scene.objects, 2):
            from tasks.boxes import iou

            assert iou(a.box, b.box) <= (0.0 if a.color == b.color else synth.MAX_IOU) + 1e-9
        largest, second = sorted((o.r for o in scene.objects), reverse=True)[:2]
        assert largest >= 1.1 * second - 0.02


def test_free_layout_asks_true_relation_questions_in_both_forms(free_world):
    types = Counter()
    answers = Counter()
    for split, scenes in free_world.items():
        for scene, records in scenes:
            for record in records["vqa"]:
                truth = answer_question(record["question"], scene, margin=synth.FREE_SIDE_MARGIN)
                assert Counter(record["answers"]).most_common(1)[0][0] == truth, record["question"]
                types[record["question_type"]] += 1
                if record["question_type"] in ("relation", "relation choice"):
                    answers[truth] += 1
            for record in records["rec"]:
                assert len(resolve(record["expression"], scene)) == 1
            for task, task_records in records.items():
                for record in task_records:
                    tasks.get_task(task).validate(record)
            if split != "heldout":
                assert not any(_mentions_heldout(t) for t in _texts(records))
    n = sum(len(scenes) for scenes in free_world.values())
    assert types["relation"] > n and types["relation choice"] > n  # one per image, more on train images
    assert 0.4 < answers["yes"] / (answers["yes"] + answers["no"]) < 0.6
    assert {"left", "right", "above", "below"} <= set(answers)


def test_generate_free_layout_records_its_layout(tmp_path):
    manifest = synth.generate(
        str(tmp_path / "free"), num_images=6, num_eval_images=2, image_size=48, layout="free", log=lambda *_: None
    )
    assert manifest["synth"]["layout"] == "free"
    questions = storage.load_split(tmp_path / "free", "vqa", "test", decode_images=False)["question_type"]
    assert "relation" in questions and "relation choice" in questions
    with pytest.raises(ValueError, match="unknown synthetic layout 'diagonal'; layouts: \\('grid', 'free'\\)"):
        synth.generate(str(tmp_path / "x"), num_images=2, layout="diagonal", log=lambda *_: None)
