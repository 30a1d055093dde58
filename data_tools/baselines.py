"""Trivial baselines: what a model scores without looking at the image (or by a fixed rule).

They tell whether a dataset is far from solved by priors (Goyal et al., 2017 report "per
question type prior" baselines for VQAv2; RefCOCO papers report largest/central box heuristics).
Each prediction goes through the task's own text path (``task.parse`` of the text a model would
write, ``task.target`` for boxes), so quantisation and answer normalisation count exactly as they
do for a model.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Record = Mapping[str, Any]


class BaselineStats:
    """Priors collected from training records, one record at a time (streaming)."""

    def __init__(self) -> None:
        self.vqa_answers: dict[str, Counter] = defaultdict(Counter)
        self.labels: Counter = Counter()
        self.captions: Counter = Counter()

    def observe(self, task: str, record: Record) -> None:
        """Adds one training record of ``task``."""
        if task == "vqa":
            from tasks.vqa import most_common_answer

            self.vqa_answers[record.get("question_type") or record["answer_type"]][
                most_common_answer(record["answers"])
            ] += 1
        elif task == "classification":
            self.labels[record["label"]] += 1
        elif task == "captioning":
            self.captions.update(record["captions"])


def _largest(boxes: Sequence[Sequence[float]]) -> list[float]:
    return list(max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1])))


def _most_central(boxes: Sequence[Sequence[float]], width: float, height: float) -> list[float]:
    return list(min(boxes, key=lambda b: math.hypot((b[0] + b[2]) / 2 - width / 2, (b[1] + b[3]) / 2 - height / 2)))


def trivial_baselines(stats: BaselineStats, test: Mapping[str, Sequence[Record]], *, split: str = "test") -> list[dict]:
    """Scores of the trivial baselines on ``test`` records.

    Baselines: VQA most common training answer per question type; REC the largest and the most
    central candidate box (Acc@0.5); classification the majority training label; captioning the
    most common training caption (CIDEr-D).

    Args:
        stats: priors from the training split.
        test: ``{task: records}`` of the evaluation split; tasks without records are skipped.
        split: the evaluation split's name (for the result rows).

    Returns:
        Rows ``{"task", "split", "baseline", "metric", "value"}``.
    """
    import tasks

    rows = []

    def score(task_name: str, baseline: str, texts: Iterable[str], metric: str | None = None) -> None:
        task = tasks.get_task(task_name)
        records = test[task_name]
        predictions = [task.parse(text, record) for text, record in zip(texts, records, strict=True)]
        result = task.evaluate(predictions, records)
        key = metric or task.primary_metric
        rows.append({"task": task_name, "split": split, "baseline": baseline, "metric": key, "value": result[key]})

    if test.get("vqa") and stats.vqa_answers:
        overall = sum(stats.vqa_answers.values(), Counter()).most_common(1)[0][0]
        prior = {qt: counter.most_common(1)[0][0] for qt, counter in stats.vqa_answers.items()}
        texts = [prior.get(r.get("question_type") or r["answer_type"], overall) for r in test["vqa"]]
        score("vqa", "most common train answer per question type", texts)
    if test.get("rec"):
        rec = tasks.get_task("rec")
        for name, pick in (
            ("largest candidate box", lambda r: _largest(r["candidate_boxes"])),
            ("most central candidate box", lambda r: _most_central(r["candidate_boxes"], r["width"], r["height"])),
        ):
            texts = [rec.target({**r, "box": pick(r)}) for r in test["rec"] if r.get("candidate_boxes")]
            if len(texts) == len(test["rec"]):
                score("rec", name, texts, "acc@0.5")
    if test.get("classification") and stats.labels:
        label = stats.labels.most_common(1)[0][0]
        score("classification", f"majority train label ({label!r})", [label] * len(test["classification"]))
    if test.get("captioning") and stats.captions:
        caption = stats.captions.most_common(1)[0][0]
        score("captioning", f"most common train caption ({caption!r})", [caption] * len(test["captioning"]))
    return rows


def format_baselines(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as aligned text lines."""
    return "\n".join(
        f"  {row['task']}/{row['split']}/{row['metric']} = {row['value']:.3f}   {row['baseline']}" for row in rows
    )
