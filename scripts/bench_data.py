"""The training data pipeline's speed against what a training step consumes.

    python scripts/bench_data.py                       # a 400-image synthetic world, uvl-tiny, the main job's mixture

The pipeline is what `unified-vl pretrain` runs for every optimizer step: the mixture sampler picks
records, each is read from the memory-mapped dataset, its image decoded, its task's template and
target drawn (``unified_vl.app.jobs.common.make_example``), and the micro batch is resized,
normalised, tokenised and collated (``unified_vl.engine.trainer.collate``). It is timed on two
stores of the same records: images embedded as PNG bytes (what `data synth` writes) and image files
referenced by path (what the converters write by default). The consumption rate is the training
step's own: forward, backward and optimizer step of the model on an already collated batch, through
the same DeepSpeed engine. Target: pipeline >= 2x consumption, so that training never waits.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from benchlib import Figure, machine_line, markdown_table, report, verdict

MIXTURE = {"captioning": 0.5, "vqa": 3.5, "rec": 3.0, "grounding": 5.0, "classification": 0.75}


def make_stores(folder: Path, num_images: int) -> dict[str, Path]:
    """The synthetic world with embedded images, and the same records with image files by path."""
    from data_tools import storage, synth
    from data_tools.converters import convert

    embedded = folder / "embedded"
    synth.generate(str(embedded), num_images=num_images, num_eval_images=4, seed=0, log=lambda *a: None)
    images = folder / "images"
    images.mkdir()
    lines = []
    for task in MIXTURE:
        dataset = storage.load_split(embedded, task, "train", decode_images=False)
        for record in dataset:
            name = f"{record['id']}.png"
            if not (images / name).exists():
                (images / name).write_bytes(record["image"]["bytes"])
            fields = {k: v for k, v in record.items() if v is not None and k not in ("image", "width", "height")}
            lines.append(json.dumps({"task": task, "split": "train", **fields, "image": name}))
    (folder / "records.jsonl").write_text("\n".join(lines) + "\n")
    paths = folder / "paths"
    convert("jsonl", inputs=[folder / "records.jsonl"], images=[images], out=paths, log=lambda *a: None)
    return {"embedded PNG bytes": embedded, "image files by path": paths}


def pipeline_rate(data_dir: Path, processor, batch: int, steps: int, repeats: int) -> Figure:
    from data_tools import storage
    from unified_vl.app.jobs.common import make_example
    from unified_vl.engine.mixture import MixtureSampler, mixture_probabilities
    from unified_vl.engine.trainer import TrainData, collate

    datasets = {task: storage.load_split(data_dir, task, "train") for task in MIXTURE}
    sizes = {task: len(ds) for task, ds in datasets.items()}
    sampler = MixtureSampler(
        sizes, mixture_probabilities(sizes, MIXTURE, weighting="explicit"), seed=0, global_batch_size=batch
    )
    data = TrainData(datasets, make_example)

    def one_pass():
        for step in range(steps):
            items = [(i, task, index) for i, (task, index) in enumerate(sampler.next_step())]
            collate(items, data, processor, seed=0, step=step)

    one_pass()  # warm-up: page cache, tokenizer
    values = []
    for _ in range(repeats):
        start = time.perf_counter()
        one_pass()
        values.append(time.perf_counter() - start)
    return Figure(tuple(values)).rate(steps * batch)


def consumption_rate(data_dir: Path, batch: int, steps: int, repeats: int) -> tuple[Figure, object]:
    """samples/s of the engine's forward + backward + step on a collated batch (no data work inside)."""
    from bench_train import run_config

    from data_tools import storage
    from unified_vl.app.jobs.common import make_example
    from unified_vl.engine import distributed
    from unified_vl.engine.config import derive
    from unified_vl.engine.trainer import LRSchedule, build_model_and_processor, initialize, token_losses

    config = run_config("uvl-tiny", batch, "fp32", steps)
    dist = distributed.init_distributed()
    torch.manual_seed(0)
    model, processor = build_model_and_processor(config)
    schedule = LRSchedule(warmup_steps=2, horizon=100 * steps, kind="cosine", min_ratio=0.1)
    engine = initialize(model, config, derive(config, dist.world_size), schedule)
    records = storage.load_split(data_dir, "vqa", "train")
    import random

    examples = [make_example("vqa", records[i], random.Random(i)) for i in range(batch)]
    inputs = processor([e.image for e in examples], [e.prompt for e in examples], [e.target for e in examples])
    labels = inputs.pop("labels")
    decoder_input_ids = model.language_model.prepare_decoder_input_ids_from_labels(labels=labels)

    def step():
        out = engine(**inputs, decoder_input_ids=decoder_input_ids)
        ce, count = token_losses(out.logits, labels)
        engine.backward(ce.sum() / count.sum())
        engine.step()

    for _ in range(2):
        step()
    values = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        values.append(time.perf_counter() - start)
    return Figure(tuple(values)).rate(steps * batch), processor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32, help="the main job's global batch")
    parser.add_argument("--steps", type=int, default=20, help="global batches per repetition")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the main job's processes use 1)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        stores = make_stores(Path(tmp), args.num_images)
        consumed, processor = consumption_rate(stores["embedded PNG bytes"], args.batch, args.steps, args.repeats)
        rows, data = [], {"machine": machine_line(), "consumption_samples_per_s": consumed.median, "stores": {}}
        rows.append(["training step (forward, backward, step)", consumed.spread(".0f"), "", ""])
        for name, folder in stores.items():
            rate = pipeline_rate(folder, processor, args.batch, args.steps, args.repeats)
            ratio = rate.median / consumed.median
            rows.append([f"pipeline, {name}", rate.spread(".0f"), f"{ratio:.2f}x", verdict(ratio, 2.0)])
            data["stores"][name] = {"examples_per_s": rate.median, "min": rate.low, "max": rate.high, "ratio": ratio}
    head = f"{machine_line()}\nuvl-tiny, global batch {args.batch}, median of {args.repeats} x {args.steps} batches (min..max)\n"
    table = markdown_table(["", "examples/s", "pipeline / consumption", "target >= 2x"], rows)
    report(args.out, head + "\n" + table, data)


if __name__ == "__main__":
    main()
