"""Linear probes of a model's image tokens: can a linear read-out tell each object's colour and shape?

    python scripts/probe_image_tokens.py --model RUN/model --data DATA [--train-images 2000] [--out X.md]

DATA is a synthetic world's folder (``unified-vl data synth``): its detection records name every object
("red circle") with its box. Each object is read at the grid token that holds its box's centre; an object
whose token also holds another object's centre is left out (the vector is not its alone). The features,
from the pixels to what the decoder attends to:

* ``pixels``: the mean RGB of the token's cell of the normalised image (no learning: the reference);
* ``stem``: the backbone's grid at that cell (before the projection to the language model's width);
* ``tokens``: the image tokens the language model reads (projection, LayerNorm, row and column positions);
* ``encoder``: the T5 encoder's output there, for the image and the question "what color is the object?"
  as the VQA task prompts it (its words name no object, so the token's vector has to carry the colour).

With ``--stem-layers`` (a convolutional stem, ``model.overrides.vision_stem``): also the output of each of
the stem's ReLUs, averaged over each token's cell (``relu K``: layer K of ``ConvStem.layers``), to see at
which depth an attribute is lost.

For each (features, attribute) a multinomial logistic regression (standardised features, L-BFGS, a small
L2 penalty) is fitted on the objects of the train split's first ``--train-images`` images and scored on
every test image's objects. Chance is the share of the most frequent class in test. A probe says what a
linear read-out could take from the vectors, not what the model does take (Alain & Bengio 2016,
"Understanding intermediate layers using linear classifier probes").
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

FEATURES = ("pixels", "stem", "tokens", "encoder")
ATTRIBUTES = ("colour", "shape")
PROBE_QUESTION = "what color is the object?"


def object_cells(record: dict, grid_h: int, grid_w: int) -> list[tuple[int, str, str]]:
    """``(token index, colour, shape)`` of each object alone on the token that holds its box's centre."""
    cells = []
    for obj in record["objects"]:
        x0, y0, x1, y1 = obj["box"]
        row = min(grid_h - 1, int((y0 + y1) / 2 / record["height"] * grid_h))
        col = min(grid_w - 1, int((x0 + x1) / 2 / record["width"] * grid_w))
        colour, shape = obj["label"].split(" ", 1)
        cells.append((row * grid_w + col, colour, shape))
    counts = Counter(index for index, _, _ in cells)
    return [cell for cell in cells if counts[cell[0]] == 1]


def _stem_layers(model, pixels: torch.Tensor, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """``relu K``: the output of layer K (a ReLU) of the model's `ConvStem`, averaged over each cell: (B, N, C)."""
    from unified_vl.modeling import ConvStem

    stem = getattr(model.visual.backbone.patch_embed, "proj", None)
    if not isinstance(stem, ConvStem):
        raise SystemExit(f"--stem-layers needs a convolutional stem; this model's is {type(stem).__name__}")
    out, hidden = {}, pixels
    for k, layer in enumerate(stem.layers):
        hidden = layer(hidden)
        if isinstance(layer, torch.nn.ReLU):
            pooled = torch.nn.functional.adaptive_avg_pool2d(hidden, grid)
            out[f"relu {k}"] = pooled.flatten(2).transpose(1, 2)
    return out


@torch.no_grad()
def features(
    model, processor, records: list[dict], *, stem_layers: bool = False, batch_size: int = 64
) -> tuple[dict[str, torch.Tensor], list]:
    """Each kept object's vector under every name of :data:`FEATURES` (and the stem's layers), and its
    ``(colour, shape)``."""
    import tasks

    visual = model.visual
    grid_h, grid_w, size = visual.grid_h, visual.grid_w, processor.image_size
    prompt = tasks.get_task("vqa").prompt({"question": PROBE_QUESTION})
    out: dict[str, list[torch.Tensor]] = {}
    labels = []
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        inputs = processor(images=[r["image"] for r in batch], text=[prompt] * len(batch))
        pixels = inputs["pixel_values"]  # (B, 3, S, S)
        embedded = model.encoder_inputs(pixels, inputs["input_ids"], inputs["attention_mask"])
        at = embedded.image_at  # (B, N): where each image token sits in the encoder's input
        # The T5 encoder over those inputs (`encode` would embed the image a second time).
        hidden = model.language_model.encoder(
            inputs_embeds=embedded.embeds, attention_mask=embedded.mask
        ).last_hidden_state
        places = {
            "pixels": torch.nn.functional.avg_pool2d(pixels, size // grid_h).flatten(2).transpose(1, 2),  # (B, N, 3)
            "stem": visual._grid(pixels).flatten(2).transpose(1, 2),  # (B, N, C)
            "tokens": visual(pixels),  # (B, N, D)
            "encoder": hidden.gather(1, at[..., None].expand(-1, -1, hidden.shape[-1])),  # (B, N, D)
            **(_stem_layers(model, pixels, (grid_h, grid_w)) if stem_layers else {}),
        }
        for b, record in enumerate(batch):
            for index, colour, shape in object_cells(record, grid_h, grid_w):
                for name, values in places.items():
                    out.setdefault(name, []).append(values[b, index].float())
                labels.append((colour, shape))
    return {name: torch.stack(values) for name, values in out.items()}, labels


def probe_accuracy(
    train_x: torch.Tensor, train_y: list[str], test_x: torch.Tensor, test_y: list[str], *, l2: float = 1e-3
) -> float:
    """Test accuracy of a multinomial logistic regression fitted on the train vectors.

    Written out (a dozen lines of torch) rather than taken from scikit-learn, which the project does not
    otherwise need; the fit is the textbook one: standardised inputs, L-BFGS on the mean cross-entropy
    plus ``l2`` times the squared weights.
    """
    classes = sorted(set(train_y))
    index = {c: i for i, c in enumerate(classes)}
    mean, std = train_x.mean(dim=0), train_x.std(dim=0).clamp(min=1e-6)
    x = (train_x - mean) / std
    y = torch.tensor([index[c] for c in train_y])
    torch.manual_seed(0)
    layer = torch.nn.Linear(x.shape[1], len(classes))
    optimizer = torch.optim.LBFGS(layer.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(layer(x), y) + l2 * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        predicted = layer((test_x - mean) / std).argmax(dim=1).tolist()
    return sum(classes[p] == gold for p, gold in zip(predicted, test_y, strict=True)) / len(test_y)


def probe(model_dir: str, data: str, *, train_images: int, stem_layers: bool = False) -> dict:
    """Probe accuracies ``{attribute: {features: accuracy}}``, with chance and the objects counted."""
    from data_tools import storage
    from unified_vl.checkpoint import load_pretrained

    model, processor = load_pretrained(model_dir)
    model.eval()
    train = storage.load_split(data, "detection", "train")
    train = [train[i] for i in range(min(train_images, len(train)))]
    test = storage.load_split(data, "detection", "test")
    test = [test[i] for i in range(len(test))]
    train_x, train_labels = features(model, processor, train, stem_layers=stem_layers)
    test_x, test_labels = features(model, processor, test, stem_layers=stem_layers)
    result: dict = {"objects": {"train": len(train_labels), "test": len(test_labels)}}
    for k, attribute in enumerate(ATTRIBUTES):
        train_y, test_y = [label[k] for label in train_labels], [label[k] for label in test_labels]
        accuracies = {name: probe_accuracy(train_x[name], train_y, test_x[name], test_y) for name in train_x}
        accuracies["chance"] = Counter(test_y).most_common(1)[0][1] / len(test_y)
        result[attribute] = accuracies
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, nargs="+", help="model folders (a run's model/)")
    parser.add_argument("--data", required=True, help="a synthetic world's folder (with detection records)")
    parser.add_argument("--train-images", type=int, default=2000, help="train images the probes are fitted on")
    parser.add_argument("--stem-layers", action="store_true", help="also probe each ReLU of a convolutional stem")
    parser.add_argument("--out", default=None, help="write the table here, the numbers as JSON beside it")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from benchlib import machine_line, markdown_table, report

    torch.set_num_threads(1)
    results = {
        model: probe(model, args.data, train_images=args.train_images, stem_layers=args.stem_layers)
        for model in args.model
    }
    names = [name for name in next(iter(results.values()))["colour"] if name != "chance"]
    rows = [
        [model, attribute, f"{r['objects']['train']} / {r['objects']['test']}", f"{r[attribute]['chance']:.3f}"]
        + [f"{r[attribute][name]:.3f}" if name in r[attribute] else "-" for name in names]
        for model, r in results.items()
        for attribute in ATTRIBUTES
    ]
    table = markdown_table(["model", "attribute", "objects (train / test)", "chance", *names], rows)
    report(args.out, f"{machine_line()}\ndata {args.data}\n\n{table}", results)


if __name__ == "__main__":
    main()
