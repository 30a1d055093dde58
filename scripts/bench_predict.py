"""Images/s of batch prediction against the one-image command in a loop and the Predictor's batched rate.

    python scripts/bench_predict.py --out bench_predict.md        # the docs' table: ~6 min on an idle 2-core CPU
    python scripts/bench_predict.py --quick --out /tmp/bench.md   # the same pipeline, small: ~1 min
    python scripts/bench_predict.py --model runs/main/model --out bench_predict.md   # a trained model

Three ways to answer one VQA question on each of N photo-sized images (640x480 JPEG scenes):

1. ``one-image loop``: ``unified-vl predict --image F --text Q`` run once per image, as a shell loop
   does (a new process each time: Python, torch and the model load for every image), over
   ``--loop-images`` of them;
2. ``batch command``: one ``unified-vl predict --images DIR --text Q --predictions P.jsonl`` over all
   N images, timed end to end (start-up and model load included) and over its prediction phase
   alone (the rate the command reports: ``N predictions in S s``);
3. ``Predictor.predict``: ``Predictor.predict("vqa", paths, ...)`` in this process over the same
   images with the same batch size, timed after loading: the Predictor's batched rate.

Each runs ``--repeats`` times; the table gives the mean images/s with the spread (min-max) and the
ratio to the one-image loop. Every process uses one torch thread (``OMP_NUM_THREADS=1``): on a
shared 2-core CPU more threads than free cores make torch spin instead of compute. The batch
command loads the next batch's images in a second thread while the model runs, so its prediction
phase is expected at or above the Predictor's rate.

Without ``--model`` the model is an untrained uvl-tiny saved to a temporary folder; it never writes
end-of-sequence, so each answer decodes exactly ``--max-new-tokens`` tokens, a fixed workload.
The Markdown table is printed and written to ``--out``; the raw per-repeat numbers go to
``--out`` with ``.json`` in place of its suffix.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
QUESTION = "what color is the circle?"
REPORTED = re.compile(r"(\d+) predictions in ([\d.]+) s")


def _untrained_model(folder: Path) -> Path:
    import torch

    from unified_vl.checkpoint import save_pretrained
    from unified_vl.config import UnifiedVLConfig
    from unified_vl.modeling import build_model
    from unified_vl.processor import UnifiedVLProcessor
    from unified_vl.tokenizer import load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer()
    config = UnifiedVLConfig.from_preset("uvl-tiny", text_config={"vocab_size": len(tokenizer)})
    model = build_model(config, tokenizer)
    processor = UnifiedVLProcessor.from_config(config, tokenizer, vision_backbone=model.visual.backbone)
    return save_pretrained(model, processor, folder / "uvl-tiny")


def _images(folder: Path, n: int) -> list[Path]:
    """``n`` 640x480 JPEG scenes (tens of kB each, like photos), reproducible."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    paths = []
    for i in range(n):
        image = Image.new("RGB", (640, 480), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y, r = (int(v) for v in rng.integers([40, 40, 20], [600, 440, 90]))
            draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        paths.append(folder / f"scene_{i:05d}.jpg")
        image.save(paths[-1], quality=90)
    return paths


def _command(model: Path, max_new_tokens: int) -> list[str]:
    return [sys.executable, "-m", "unified_vl.app.cli", "predict", "--model", str(model), "--device", "cpu",
            "--task", "vqa", "--text", QUESTION, "--max-new-tokens", str(max_new_tokens)]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def one_image_loop(model: Path, paths: list[Path], max_new_tokens: int) -> dict[str, float]:
    start = time.perf_counter()
    for path in paths:
        subprocess.run([*_command(model, max_new_tokens), "--image", str(path)], env=_env(), check=True,
                       capture_output=True)  # fmt: skip
    seconds = time.perf_counter() - start
    return {"images": len(paths), "seconds": seconds, "images_per_s": len(paths) / seconds}


def batch_command(model: Path, folder: Path, out: Path, batch_size: int, max_new_tokens: int) -> dict[str, float]:
    command = [*_command(model, max_new_tokens), "--images", str(folder), "--predictions", str(out), "--overwrite",
               "--batch-size", str(batch_size)]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, env=_env(), check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    count, phase = REPORTED.search(done.stderr).groups()
    return {
        "images": int(count),
        "seconds": seconds,
        "images_per_s": int(count) / seconds,
        "phase_seconds": float(phase),
        "phase_images_per_s": int(count) / float(phase),
    }


def predictor_rate(model: Path, paths: list[Path], batch_size: int, max_new_tokens: int) -> dict[str, float]:
    import torch

    from unified_vl.app.inference.predictor import Predictor

    torch.set_num_threads(1)
    predictor = Predictor.from_pretrained(model, device="cpu", batch_size=batch_size)
    predictor.predict("vqa", paths[:batch_size], {"question": QUESTION}, max_new_tokens=max_new_tokens)  # warm-up
    start = time.perf_counter()
    results = predictor.predict("vqa", paths, {"question": QUESTION}, max_new_tokens=max_new_tokens)
    seconds = time.perf_counter() - start
    assert len(results) == len(paths)
    return {"images": len(paths), "seconds": seconds, "images_per_s": len(paths) / seconds}


def _cell(values: list[float]) -> str:
    mean = statistics.fmean(values)  # three significant digits: the loop runs at a fraction of an image per second
    return f"{mean:.3g}" if len(values) == 1 else f"{mean:.3g} ({min(values):.3g}-{max(values):.3g})"


def table(runs: list[dict], args: argparse.Namespace) -> str:
    """The Markdown table of the repeats' images/s (mean, min-max) and the ratios to the one-image loop."""
    loop = statistics.fmean(r["loop"]["images_per_s"] for r in runs)
    rows = [
        ("one-image command in a loop", "loop", "images_per_s", args.loop_images),
        ("batch command, end to end", "batch", "images_per_s", args.images),
        ("batch command, prediction phase", "batch", "phase_images_per_s", args.images),
        ("Predictor.predict (batched, in process)", "predictor", "images_per_s", args.images),
    ]
    lines = [
        f"| way (batch size {args.batch_size}, {args.max_new_tokens} new tokens) | images | images/s | x one-image loop |",
        "|---|---:|---:|---:|",
    ]
    for name, key, field, images in rows:
        values = [r[key][field] for r in runs]
        lines.append(f"| {name} | {images} | {_cell(values)} | {statistics.fmean(values) / loop:.3g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the Markdown table's file (raw numbers: same name, .json)")
    parser.add_argument("--model", default=None, help="a model folder (default: an untrained uvl-tiny)")
    parser.add_argument("--images", type=int, default=512, help="images for the batch command and the Predictor")
    parser.add_argument("--loop-images", type=int, default=24, help="images for the one-image loop")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="32 images, 3 in the loop, 1 repeat: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.loop_images, args.repeats = 32, 3, 1
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        tmp = Path(tmp)
        model = Path(args.model) if args.model else _untrained_model(tmp)
        paths = _images(tmp / "images", args.images)
        runs = []
        for repeat in range(args.repeats):
            run = {
                "loop": one_image_loop(model, paths[: args.loop_images], args.max_new_tokens),
                "batch": batch_command(model, tmp / "images", tmp / "p.jsonl", args.batch_size, args.max_new_tokens),
                "predictor": predictor_rate(model, paths, args.batch_size, args.max_new_tokens),
            }
            runs.append(run)
            print(f"repeat {repeat + 1}/{args.repeats}: {json.dumps(run)}", file=sys.stderr, flush=True)
    markdown = table(runs, args)
    print(markdown)
    out = Path(args.out)
    out.write_text(markdown + "\n")
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    out.with_suffix(".json").write_text(json.dumps({"settings": settings, "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
