"""Generation speed: batched vs one at a time, KV cache, the image tokens' cost, a Predictor query.

    python scripts/bench_generate.py                                   # untrained uvl-tiny, 32 x 32 tokens
    python scripts/bench_generate.py --preset uvl-base --device cuda --dtype bfloat16 --out docs/bench/generate-gpu.md

Every output is forced to exactly --new-tokens tokens (min = max new tokens), so an untrained model
is a fixed workload. Prints a machine line, then one row per measurement (the median of --repeats
runs, with min..max) and the ratios against the baselines measured in the same run, alternately:

* batch of --batch inputs vs the same inputs one at a time (target >= 8x tokens/s), greedy and beam;
* the KV cache vs none for --new-tokens outputs (target >= 2x);
* our model vs bare T5 ``generate`` over an encoder input of the same length (target <= 1.3x time);
* one ``Predictor`` query (preprocessing, generation, parsing, score) vs the model's own
  ``generate`` on the processor's batch (target <= 1.1x time).
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch
from benchlib import Figure, alternate, machine_line, markdown_table, paired_ratio, report, verdict

QUESTION = "what color is the small object at the top of the image?"


def build(args):
    from unified_vl.app.inference.predictor import Predictor
    from unified_vl.checkpoint import load_pretrained, save_pretrained
    from unified_vl.config import UnifiedVLConfig
    from unified_vl.modeling import build_model
    from unified_vl.processor import UnifiedVLProcessor
    from unified_vl.tokenizer import load_tokenizer

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if args.model is None:
        torch.manual_seed(0)
        tokenizer = load_tokenizer()
        config = UnifiedVLConfig.from_preset(args.preset, text_config={"vocab_size": len(tokenizer)})
        model = build_model(config, tokenizer)
        processor = UnifiedVLProcessor.from_config(config, tokenizer, vision_backbone=model.visual.backbone)
        folder = save_pretrained(model, processor, tempfile.mkdtemp() + "/model")
    else:
        folder = args.model
    model, processor = load_pretrained(folder, dtype=dtype)
    model = model.to(args.device).eval()
    predictor = Predictor(model, processor, batch_size=args.batch)
    return model, processor, predictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="uvl-tiny")
    parser.add_argument("--model", default=None, help="a model folder instead of an untrained preset")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="also write the table (Markdown) and the figures (JSON) here")
    args = parser.parse_args()

    model, processor, predictor = build(args)
    rng = np.random.default_rng(0)
    size = processor.image_size
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(args.batch)]
    batch = {k: v.to(args.device) for k, v in processor(images=images, text=[QUESTION] * args.batch).items()}
    n = args.new_tokens
    fixed = {"max_new_tokens": n, "min_new_tokens": n}

    def generate(rows: slice, **kwargs):
        return model.generate(**{k: v[rows] for k, v in batch.items()}, **fixed, **kwargs)

    def one_at_a_time(**kwargs):
        return lambda: [generate(slice(i, i + 1), **kwargs) for i in range(args.batch)]

    # Bare T5 over an encoder input of the same length as ours: patch tokens + the prompt's tokens.
    length = model.visual.num_patches + batch["input_ids"].shape[1]
    bare_ids = torch.randint(5, processor.tokenizer.vocab_size, (args.batch, length), device=args.device)
    bare_mask = torch.ones_like(bare_ids)

    def bare():
        return model.language_model.generate(input_ids=bare_ids, attention_mask=bare_mask, **fixed)

    one = {k: v[:1] for k, v in batch.items()}

    def model_generate():  # what a caller of the model itself does: preprocess, generate, decode
        b = {k: v.to(args.device) for k, v in processor(images=images[:1], text=[QUESTION]).items()}
        return processor.decode(model.generate(**b, **fixed))

    def predictor_query():
        return predictor.predict("vqa", images[0], {"question": QUESTION}, **fixed)

    with torch.inference_mode():
        greedy, greedy_one = alternate([lambda: generate(slice(None)), one_at_a_time()], repeats=args.repeats)
        beam, beam_one = alternate(
            [lambda: generate(slice(None), num_beams=args.beams), one_at_a_time(num_beams=args.beams)],
            repeats=args.repeats,
        )
        cached, uncached = alternate(
            [lambda: generate(slice(None)), lambda: generate(slice(None), use_cache=False)], repeats=args.repeats
        )
        ours, t5 = alternate([lambda: generate(slice(None)), bare], repeats=args.repeats)
        query, plain = alternate([predictor_query, model_generate], repeats=max(args.repeats, 10))
    del one

    tokens = args.batch * n
    ratios = {
        "batch_vs_one_greedy": paired_ratio(greedy_one, greedy),
        "batch_vs_one_beam": paired_ratio(beam_one, beam),
        "kv_cache": paired_ratio(uncached, cached),
        "vl_over_bare_t5": paired_ratio(ours, t5),
        "predictor_over_generate": paired_ratio(query, plain),
    }
    rows = [
        [f"greedy, batch {args.batch}", greedy.rate(tokens).spread(".0f") + " tok/s", "", ""],
        ["greedy, one at a time", greedy_one.rate(tokens).spread(".0f") + " tok/s", "", ""],
        ["  batch / one at a time", ratios["batch_vs_one_greedy"].spread(".2f") + "x", ">= 8x",
         verdict(ratios["batch_vs_one_greedy"].median, 8)],
        [f"beam {args.beams}, batch {args.batch}", beam.rate(tokens).spread(".0f") + " tok/s", "", ""],
        [f"beam {args.beams}, one at a time", beam_one.rate(tokens).spread(".0f") + " tok/s", "", ""],
        ["  batch / one at a time (beam)", ratios["batch_vs_one_beam"].spread(".2f") + "x", "", ""],
        [f"greedy without KV cache, batch {args.batch}", uncached.rate(tokens).spread(".0f") + " tok/s", "", ""],
        [f"  KV cache / none ({n}-token outputs)", ratios["kv_cache"].spread(".2f") + "x", ">= 2x",
         verdict(ratios["kv_cache"].median, 2)],
        [f"bare T5 generate, encoder length {length}", t5.rate(tokens).spread(".0f") + " tok/s", "", ""],
        ["  ours / bare T5 (time)", ratios["vl_over_bare_t5"].spread(".2f") + "x", "<= 1.3x",
         verdict(ratios["vl_over_bare_t5"].median, 1.3, at_least=False)],
        ["Predictor query, one image (ms)", Figure(tuple(1000 * v for v in query.values)).spread(".1f"), "", ""],
        ["model.generate on the processor's batch (ms)", Figure(tuple(1000 * v for v in plain.values)).spread(".1f"), "", ""],
        ["  Predictor / generate (time)", ratios["predictor_over_generate"].spread(".2f") + "x", "<= 1.1x",
         verdict(ratios["predictor_over_generate"].median, 1.1, at_least=False)],
    ]  # fmt: skip
    name = args.model or f"untrained {args.preset}"
    head = (
        f"{machine_line()}\nmodel: {name}, {args.dtype}, {model.visual.num_patches} image tokens, "
        f"{args.new_tokens}-token outputs, median of {args.repeats} (min..max)\n"
    )
    text = head + "\n" + markdown_table(["measurement", "figure", "target", ""], rows)
    data = {k: {"median": v.median, "min": v.low, "max": v.high} for k, v in ratios.items()}
    data["tokens_per_s"] = {
        "greedy_batch": greedy.rate(tokens).median,
        "greedy_one": greedy_one.rate(tokens).median,
        "beam_batch": beam.rate(tokens).median,
        "beam_one": beam_one.rate(tokens).median,
        "no_cache": uncached.rate(tokens).median,
        "bare_t5": t5.rate(tokens).median,
    }
    report(args.out, text, {"machine": machine_line(), "model": name, **data})


if __name__ == "__main__":
    main()
