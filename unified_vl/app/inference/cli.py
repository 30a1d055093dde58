"""`unified-vl predict` and `unified-vl serve`.

    unified-vl predict --model runs/main/model --task rec --image scene.png --text "the red circle" --out vis.png
    unified-vl predict --model runs/main/model --data DIR --task vqa --split val --predictions preds.jsonl
    unified-vl predict --model runs/main/model --adapter runs/finetune-vqa-.../adapter --task vqa --image scene.png --text "..."
    unified-vl serve --model runs/main/model --port 8000 --max-batch 16 --max-wait-ms 10
    unified-vl serve --model runs/main/model --adapter vqa=runs/ft-vqa/adapter --adapter rec=runs/ft-rec/adapter

``predict`` prints the prediction as JSON; with ``--out`` it also draws the predicted boxes and
text on the image; with ``--adapter`` the adapter answers. With ``--data``, ``--images`` or ``--requests``
it predicts many inputs into a predictions file (:mod:`unified_vl.app.inference.batch`). ``serve`` runs
the HTTP server (:mod:`unified_vl.app.inference.server`) with uvicorn; it binds loopback unless
``--host`` says otherwise; each ``--adapter NAME=PATH`` is served under NAME (a request's ``model`` field).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from unified_vl.app.cli import exit_2_on_bad_model_files

API_KEY_ENV = "UNIFIED_VL_API_KEY"  # read when --api-key is not given: keys stay out of `ps` listings
# Box colours for drawings, cycled (Tableau 10, matplotlib's default colour cycle).
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a model folder (config.json, model.safetensors, ...)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="default: float32")


def parse_adapters(items: list[str] | None) -> dict[str, str]:
    """``NAME=PATH`` (or ``PATH``, named after its folder) items -> ``{name: path}``.

    Raises:
        ValueError: an empty name or path, or a name given twice.
    """
    adapters: dict[str, str] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item.rstrip("/")).name, item
        if not name.strip() or not path.strip():
            raise ValueError(f"--adapter {item!r}: expected NAME=PATH (or an adapter folder)")
        if name in adapters:
            raise ValueError(f"--adapter: the name {name!r} is given twice")
        adapters[name] = path
    return adapters


def build_predict_parser() -> argparse.ArgumentParser:
    """The arguments of ``unified-vl predict``."""
    from data_tools.formats import FORMATS
    from unified_vl.app.inference.predictor import DEFAULT_BATCH_SIZE, known_tasks

    parser = argparse.ArgumentParser(
        prog="unified-vl predict",
        description="Predict on one image (prints JSON), or on many (--data, --images, --requests) into a "
        "predictions file, one JSON line per input.",
    )
    _model_arguments(parser)
    parser.add_argument("--adapter", default=None, help="an adapter folder trained on --model; it answers")
    parser.add_argument("--task", required=True, choices=known_tasks(), help="a task, or 'generate' for a free prompt")
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--image", help="the image file (one prediction, printed)")
    inputs.add_argument("--data", help="a data folder: every record of --task in --split")
    inputs.add_argument("--images", help="a folder of images (recursive) or a quoted glob; --text for all")
    inputs.add_argument("--requests", help="a JSON Lines file: per line image, the task's fields, optional id")
    parser.add_argument("--text", default=None, help="the task's text: question, expression, caption, prompt, ...")
    parser.add_argument("--labels", nargs="+", default=None, help="classification: rank these labels")
    parser.add_argument("--top-k", type=int, default=1, help="classification with --labels: labels to list")
    parser.add_argument("--candidates", nargs="+", default=None, help="restrict the answer to these texts")
    parser.add_argument("--num-beams", type=int, default=None, help="beam search width (default: greedy)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="the longest output in tokens")
    parser.add_argument("--out", default=None, help="also draw the prediction on the image into this file")
    many = parser.add_argument_group("many inputs (--data, --images, --requests)")
    many.add_argument("--split", default="test", help="--data: the split to predict (default: test)")
    many.add_argument("--predictions", default=None, help="the JSON Lines file to write, one line per input")
    many.add_argument("--resume", action="store_true", help="continue --predictions: predict only the inputs not in it")
    many.add_argument("--overwrite", action="store_true", help="replace an existing --predictions (and --results)")
    many.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="inputs per forward pass")
    many.add_argument("--format", default=None, choices=list(FORMATS), help="also write this official results file")
    many.add_argument("--results", default=None, help="the --format file (default: PREDICTIONS.<format>.json)")
    many.add_argument("--categories", default=None, help="coco_detection: a COCO annotation file with 'categories'")
    return parser


def _text_field(task: str) -> str | None:
    """The request field ``--text`` fills: the task's first text input field."""
    from unified_vl.app.inference.predictor import GENERATE, input_fields

    if task == GENERATE:
        return "prompt"
    import tasks

    spec = tasks.get_task(task).fields
    return next((name for name in input_fields(task) if spec[name].type == "str"), None)


@exit_2_on_bad_model_files
def predict_main(argv: list[str] | None = None) -> int:
    """``unified-vl predict``; returns the exit code (2 for bad input)."""
    from unified_vl.app.inference.predictor import InputError, Predictor
    from unified_vl.checkpoint import CheckpointError
    from unified_vl.processor import ImageLoadError, load_image

    args = build_predict_parser().parse_args(argv)
    field = _text_field(args.task)
    if args.text is not None and field is None:
        print(f"unified-vl predict: error: task {args.task!r} takes no --text", file=sys.stderr)
        return 2
    inputs = {field: args.text} if args.text is not None else {}
    options: dict[str, Any] = {"candidates": args.candidates, "labels": args.labels, "top_k": args.top_k}
    if args.num_beams is not None:
        options["num_beams"] = args.num_beams
    if args.max_new_tokens is not None:
        options["max_new_tokens"] = args.max_new_tokens
    if args.image is None:
        from unified_vl.app.inference.batch import batch_main

        return batch_main(args, inputs, options)
    try:
        image = load_image(args.image)
        adapters = parse_adapters([args.adapter] if args.adapter else None)
        predictor = Predictor.from_pretrained(args.model, device=args.device, dtype=args.dtype, adapters=adapters)
        adapter = next(iter(adapters), None)
        prediction = predictor.predict(args.task, image, inputs, adapter=adapter, **options)[0].to_dict()
    except (CheckpointError, ImageLoadError, InputError, FileNotFoundError, ValueError) as exc:
        print(f"unified-vl predict: error: {exc}", file=sys.stderr)
        return 2
    model = adapter or predictor.name
    print(json.dumps({"task": args.task, "model": model, "image": args.image, "prediction": prediction}, indent=2))
    if args.out is not None:
        draw_prediction(image, prediction).save(args.out)
        print(f"drew the prediction into {args.out}", file=sys.stderr)
    return 0


def draw_prediction(image: Image.Image, prediction: dict[str, Any]) -> Image.Image:
    """A copy of ``image`` with the prediction's boxes (and their labels) and its text drawn on it.

    Args:
        image: the original image (boxes are in its pixels).
        prediction: a result's ``to_dict()``.
    """
    boxes: list[tuple[str, list[float]]] = []
    if prediction.get("box"):
        boxes.append(("", prediction["box"]))
    boxes += [(p["phrase"], p["box"]) for p in prediction.get("phrases") or []]
    boxes += [(o["label"], o["box"]) for o in prediction.get("objects") or []]
    headline = next(
        (prediction[k] for k in ("caption", "answer", "label", "prediction") if isinstance(prediction.get(k), str)),
        None,
    )
    if headline is None and not boxes:
        headline = prediction.get("text") or "(no output)"

    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    size = max(12, min(canvas.size) // 24)
    font = ImageFont.load_default(size=size)
    width = max(1, min(canvas.size) // 150)
    for i, (label, box) in enumerate(boxes):
        colour = COLOURS[i % len(COLOURS)]
        draw.rectangle(box, outline=colour, width=width)
        if label:
            x, y = box[0], max(0, box[1] - size - 2)
            draw.rectangle(draw.textbbox((x, y), label, font=font), fill=colour)
            draw.text((x, y), label, fill="white", font=font)
    if headline:
        bbox = draw.textbbox((2, 2), headline, font=font)
        draw.rectangle((0, 0, bbox[2] + 2, bbox[3] + 2), fill="black")
        draw.text((2, 2), headline, fill="white", font=font)
    return canvas


def build_serve_parser() -> argparse.ArgumentParser:
    """The arguments of ``unified-vl serve``."""
    parser = argparse.ArgumentParser(prog="unified-vl serve", description="HTTP server with dynamic batching.")
    _model_arguments(parser)
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="serve an adapter trained on --model under NAME, which a request's 'model' field picks (repeatable)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=16, help="the most requests run in one forward pass")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a request waits to share a batch")
    parser.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond this get 429")
    parser.add_argument(
        "--api-key", default=None, help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV})"
    )
    parser.add_argument("--max-image-mb", type=float, default=10.0, help="the largest image file")
    parser.add_argument("--max-body-mb", type=float, default=16.0, help="the largest request body")
    _limit_arguments(parser)
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def _limit_arguments(parser: argparse.ArgumentParser) -> None:
    """``--max-image-pixels``, ``--max-labels``, ...: one option per field of the server's `Limits`."""
    import dataclasses

    from unified_vl.app.inference.schema import Limits

    for f in dataclasses.fields(Limits):
        if f.name in ("max_image_bytes", "max_body_bytes"):  # given in MB above
            continue
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(flag, type=int, default=f.default, help=f"{f.metadata['help']} (default: %(default)s)")


@exit_2_on_bad_model_files
def serve_main(argv: list[str] | None = None) -> int:
    """``unified-vl serve``: loads the model and serves it until interrupted."""
    import uvicorn

    from unified_vl.app.inference.predictor import Predictor
    from unified_vl.app.inference.schema import Limits, MiB
    from unified_vl.app.inference.server import create_app
    from unified_vl.checkpoint import CheckpointError

    args = build_serve_parser().parse_args(argv)
    limits = {f.name: getattr(args, f.name) for f in dataclasses.fields(Limits) if hasattr(args, f.name)}
    try:
        limits = Limits(
            max_image_bytes=int(args.max_image_mb * MiB), max_body_bytes=int(args.max_body_mb * MiB), **limits
        )
    except ValueError as exc:
        print(f"unified-vl serve: error: {exc}", file=sys.stderr)
        return 2
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        logging.warning("serving on %s without an API key: anyone who can reach it can use the model", args.host)
    # One gathered batch is one forward pass: the predictor's batch size follows --max-batch.
    try:
        predictor = Predictor.from_pretrained(
            args.model,
            device=args.device,
            dtype=args.dtype,
            adapters=parse_adapters(args.adapter),
            batch_size=args.max_batch,
        )
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"unified-vl serve: error: {exc}", file=sys.stderr)
        return 2
    app = create_app(
        predictor,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        api_key=api_key,
        max_queue=args.max_queue,
        limits=limits,
    )
    logging.info("serving %s (%s) on http://%s:%d", predictor.name, Path(args.model), args.host, args.port)
    for name in predictor.adapter_names:
        logging.info("  adapter %s (%s)", name, predictor.adapters.adapters[name].path)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
