"""``unified-vl data ...``: parses the arguments and calls the data layer's functions.

    unified-vl data synth --out data/synth [--layout free]      # the synthetic world, all tasks
    unified-vl data convert vqav2 --input q.json a.json --images train2014/ --out data/vqav2 [--skip-bad]
    unified-vl data show --data data/synth --n 16 --out grid.png [--task rec] [--split val]
    unified-vl data show --data data/synth --predictions preds.jsonl --worst --out failures.png

`main` takes the arguments after the command word (``unified_vl.app.cli`` calls it with
``sys.argv[2:]``) and returns the exit status: 0 success, 1 bad input (the message names the file
and the record), 2 bad usage.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from data_tools import storage


def _synth(args: argparse.Namespace, command: str) -> int:
    from data_tools import synth

    synth.generate(
        args.out,
        num_images=args.num_images,
        num_eval_images=args.num_eval_images,
        image_size=args.image_size,
        seed=args.seed,
        workers=args.workers,
        layout=args.layout,
        vqa_evidence=args.vqa_evidence,
        command=command,
    )
    return 0


def _convert(args: argparse.Namespace, command: str) -> int:
    from data_tools.converters import convert

    convert(
        args.source,
        inputs=args.input,
        images=args.images,
        out=args.out,
        skip_bad=args.skip_bad,
        split=args.split,
        embed_images=args.embed_images,
        verify_images=args.verify_images,
        confine_images=not args.allow_outside_images,
        command=command,
    )
    return 0


def _show(args: argparse.Namespace, command: str) -> int:
    from data_tools.show import show, show_predictions

    if args.predictions is not None:
        width, height = show_predictions(
            args.data,
            args.predictions,
            n=args.n,
            out=args.out,
            task=args.task,
            split=args.split,
            worst=args.worst,
            cell_size=args.cell_size,
        )
        print(f"wrote {args.out} ({width}x{height})")
        return 0
    if args.worst:
        raise storage.StorageError("--worst orders predictions: give --predictions FILE")
    width, height = show(args.data, n=args.n, out=args.out, task=args.task, split=args.split, cell_size=args.cell_size)
    print(f"wrote {args.out} ({width}x{height})")
    return 0


def _data_parser() -> argparse.ArgumentParser:
    from data_tools import synth
    from data_tools.converters._common import available_sources, get_converter

    parser = argparse.ArgumentParser(prog="unified-vl data", description="Make, convert and look at stored records.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{synth,convert,show}")

    p = sub.add_parser("synth", help="write the synthetic scene world (every task; train/val/test/heldout)")
    p.add_argument("--out", required=True, help="data folder to write")
    p.add_argument(
        "--num-images", type=int, default=synth.DEFAULT_NUM_IMAGES, help="train images (default: %(default)s)"
    )
    p.add_argument(
        "--num-eval-images",
        type=int,
        default=None,
        help="images of each of val, test and heldout (default: 7.5%% of --num-images, 600 for 8000)",
    )
    p.add_argument(
        "--image-size", type=int, default=synth.DEFAULT_IMAGE_SIZE, help="image side in pixels (default: %(default)s)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="same seed, byte-identical records and PNGs (default: %(default)s)"
    )
    p.add_argument("--workers", type=int, default=0, help="processes drawing images (default: 0 = this one)")
    p.add_argument(
        "--layout",
        choices=synth.LAYOUTS,
        default="grid",
        help="grid: objects in the cells of a 4 x 4 grid (the main job's world); free: anywhere, any size, "
        "possibly touching, with relation questions (default: %(default)s)",
    )
    p.add_argument(
        "--vqa-evidence",
        action="store_true",
        help="VQA records also name the objects each question is about, with their boxes (evidence_phrases, "
        "evidence_boxes): training writes them before the answer (docs/records.md)",
    )
    p.set_defaults(run=_synth)

    sources = available_sources()
    lines = [
        f"  {name:20s} {get_converter(name).DESCRIPTION}\n  {'':20s} {get_converter(name).INPUTS}" for name in sources
    ]
    p = sub.add_parser(
        "convert",
        help="convert a source dataset (official annotation files) into stored records",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="sources:\n" + "\n".join(lines),
    )
    p.add_argument("source", choices=sources, help="the source dataset")
    p.add_argument("--input", nargs="+", required=True, help="annotation file(s) or folder (see sources below)")
    p.add_argument("--images", nargs="*", default=[], help="image folder, or one per --input file")
    p.add_argument("--out", required=True, help="data folder to write")
    p.add_argument("--skip-bad", action="store_true", help="skip bad records (counted and listed) instead of stopping")
    p.add_argument("--split", default=None, help="put every record in this split instead of the source's own")
    p.add_argument("--embed-images", action="store_true", help="store image bytes in the dataset instead of paths")
    p.add_argument(
        "--verify-images", action="store_true", help="decode every image fully (catches truncated files; slower)"
    )
    p.add_argument(
        "--allow-outside-images",
        action="store_true",
        help="csv, jsonl: allow image paths that lead outside --images (.., absolute paths, symlinks out)",
    )
    p.set_defaults(run=_convert)

    p = sub.add_parser("show", help="draw a grid of records with their boxes and texts into a PNG")
    p.add_argument("--data", required=True, help="data folder")
    p.add_argument("--n", type=int, default=16, help="records to draw (default: %(default)s)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--task", default=None, help="only this task (default: take turns over all)")
    p.add_argument("--split", default=None, help="only this split (default: train, else the first)")
    p.add_argument(
        "--cell-size", type=int, default=192, help="side of each image cell in pixels (default: %(default)s)"
    )
    p.add_argument(
        "--predictions",
        default=None,
        help="a predictions file (predict --data, eval --predictions): draw each beside its gold",
    )
    p.add_argument("--worst", action="store_true", help="with --predictions: the lowest-scored predictions first")
    p.set_defaults(run=_show)
    return parser


def _run(run, args: argparse.Namespace, command: str) -> int:
    import tasks
    from data_tools.converters import ConversionError
    from data_tools.predictions import PredictionsError
    from tasks.boxes import BoxError

    try:
        return run(args, command)
    except (ConversionError, storage.StorageError, tasks.RecordError, BoxError, PredictionsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """``unified-vl data {synth,convert,show} ...``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _data_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and on bad usage (2)
        return int(exc.code or 0)
    return _run(args.run, args, "unified-vl data " + shlex.join(argv))
