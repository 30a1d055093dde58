"""train.mixup: images mixed in pairs of rows with the same prompt, the loss mixed alike (Zhang et al. 2018)."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch
from test_engine import DATA, NO_DROPOUT, WORDS, run

from unified_vl.engine.config import ConfigError, load_config
from unified_vl.engine.trainer import Example, TrainData, mixup_forward, mixup_partners, token_losses


def test_partners_are_rows_of_the_named_tasks_with_the_same_prompt():
    prompts = torch.tensor([[5, 6, 1], [5, 6, 1], [7, 6, 1], [5, 6, 1], [5, 6, 1], [7, 6, 1], [5, 6, 1]])
    tasks = ["classification", "classification", "classification", "vqa", "classification", "classification", "vqa"]
    seen = set()
    for seed in range(40):
        partner = mixup_partners(prompts, tasks, ["classification"], random.Random(seed))
        # A VQA row is never mixed, and no row with another prompt or task is its partner.
        assert partner[3] == 3 and partner[6] == 6
        assert sorted(partner[i] for i in (0, 1, 4)) == [0, 1, 4]
        assert sorted(partner[i] for i in (2, 5)) == [2, 5]
        seen.add(tuple(partner))
    assert len(seen) > 4  # drawn from the generator, not fixed
    assert mixup_partners(prompts, tasks, [], random.Random(0)) == list(range(7))


class _Engine:
    """What `mixup_forward` needs of DeepSpeed's engine: calling it and its module."""

    def __init__(self, model):
        self.module = model

    def __call__(self, **kwargs):
        return self.module(**kwargs)


def test_the_loss_is_lambda_times_the_rows_target_plus_the_rest_times_its_partners(tiny_model, processor):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(4)]
    targets = ["red", "blue circle", "green", "square"]  # a two-word target beside one-word ones
    batch = processor(images, ["classify the image."] * 4, targets)
    labels = batch.pop("labels")
    partner, lam = [1, 0, 2, 0], 0.3  # row 2 keeps its own image; row 3 reads row 0's as well
    ce, count = mixup_forward(_Engine(tiny_model), batch, labels, partner, lam, label_smoothing=0.1)

    mixed = lam * batch["pixel_values"] + (1 - lam) * batch["pixel_values"][partner]
    prepare = tiny_model.language_model.prepare_decoder_input_ids_from_labels

    def plain(target_labels):
        out = tiny_model(
            pixel_values=mixed,
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            decoder_input_ids=prepare(labels=target_labels),
        )
        return token_losses(out.logits, target_labels, label_smoothing=0.1)  # both targets smoothed

    ce_a, n_a = plain(labels)
    ce_b, n_b = plain(labels[partner])
    assert ce.tolist() == pytest.approx((lam * ce_a + (1 - lam) * ce_b).tolist(), rel=1e-5)
    assert count.tolist() == pytest.approx((lam * n_a + (1 - lam) * n_b).tolist())
    assert count[1].item() != n_a[1].item()  # "blue circle" mixed with the shorter "red"
    assert ce[2].item() == pytest.approx(ce_a[2].item(), rel=1e-5)
    with pytest.raises(ValueError, match="train.mixup needs one image per record; this micro batch has 3 images for 4"):
        mixup_forward(_Engine(tiny_model), {**batch, "pixel_values": batch["pixel_values"][:3]}, labels, partner, lam)


def _one_prompt_per_task(task: str, record: dict, rng: random.Random) -> Example:
    return Example(record["image"], f"{task}: name it", record["word"])


def test_a_run_mixes_only_the_named_tasks_rows(tmp_path):
    data = TrainData(DATA, _one_prompt_per_task)
    args = [NO_DROPOUT, "checkpoint.export=false", "train.max_steps=3", "train.micro_batch_size=8"]
    plain = run(tmp_path, "plain", *args, data=data).losses
    # Turned off, the tasks named do nothing: the same losses, to the bit.
    assert run(tmp_path, "off", *args, "train.mixup=0", "train.mixup_tasks=[colors]", data=data).losses == plain
    mixed = run(tmp_path, "mixed", *args, "train.mixup=0.4", "train.mixup_tasks=[colors]", data=data).losses
    # At the first step both are near log(vocabulary); the mixed targets then train another model.
    assert all(np.isfinite(mixed)) and abs(mixed[-1] - plain[-1]) > 5e-3
    # The same seed mixes the same pairs with the same lambda, and ZeRO-3's sharded weights train alike.
    assert run(tmp_path, "again", *args, "train.mixup=0.4", "train.mixup_tasks=[colors]", data=data).losses == mixed
    sharded = run(
        tmp_path, "zero3", *args, "train.mixup=0.4", "train.mixup_tasks=[colors]", "train.zero_stage=3", data=data
    )
    np.testing.assert_allclose(sharded.losses, mixed, rtol=1e-5)
    assert set(WORDS) >= {r["word"] for r in DATA["colors"]}


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.mixup=-0.2", "train.mixup must be a number in [0, 10] (the Beta distribution's a; 0: off), got -0.2"),
        ("train.mixup=11", "train.mixup must be a number in [0, 10] (the Beta distribution's a; 0: off), got 11.0"),
        ("train.mixup=true", "train.mixup: expected float, got str 'true'"),
        ("train.mixup_tasks=[1]", "train.mixup_tasks[0]: expected str, got int 1"),
    ],
)
def test_bad_mixup_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, ["data.tasks={vqa: 1}", override])


def test_mixup_must_name_a_task_that_is_trained():
    message = (
        "train.mixup mixes the records of train.mixup_tasks (classification), and data.tasks (vqa, rec) trains "
        "none of them; name one, e.g. train.mixup_tasks=[classification]"
    )
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, ["data.tasks={vqa: 1, rec: 1}", "train.mixup=0.2"])
    assert load_config(None, ["data.tasks={vqa: 1, rec: 1}", "train.mixup=0.2", "train.mixup_tasks=[rec]"]).train.mixup


def test_the_answer_weight_follows_each_target_and_its_rows_mask_goes_to_the_partners(tiny_model, processor):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    targets = ["red circle ; answer: yes", "answer: no", "red circle ; answer: yes"]
    batch = processor(images, ["is it?"] * 3, targets)
    labels = batch.pop("labels")
    marker = processor.tokenizer("answer:", add_special_tokens=False).input_ids
    marked = torch.tensor([True, True, False])  # row 2 is not a VQA row: its marker is not weighed
    partner, lam = [1, 2, 0], 0.4
    weight = (marker, 5.0, marked)
    ce, count = mixup_forward(_Engine(tiny_model), batch, labels, partner, lam, answer_weight=weight)
    mixed = lam * batch["pixel_values"] + (1 - lam) * batch["pixel_values"][partner]

    def out(target):
        return tiny_model(
            pixel_values=mixed,
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            decoder_input_ids=tiny_model.language_model.prepare_decoder_input_ids_from_labels(labels=target),
        ).logits

    ce_a, n_a = token_losses(out(labels), labels, answer_weight=weight)
    ce_b, n_b = token_losses(out(labels[partner]), labels[partner], answer_weight=(marker, 5.0, marked[partner]))
    assert ce.tolist() == pytest.approx((lam * ce_a + (1 - lam) * ce_b).tolist(), rel=1e-5)
    assert count.tolist() == pytest.approx((lam * n_a + (1 - lam) * n_b).tolist())
    # "yes" and </s> weigh 5 in row 0, not in row 2 (the same target, unmarked); row 1's partner is row 2.
    plain_counts = (labels != -100).sum(1).tolist()
    yes, no = (4 * len(processor.tokenizer(word).input_ids) for word in ("yes", "no"))  # the answer and </s>
    assert n_a.tolist() == [plain_counts[0] + yes, plain_counts[1] + no, plain_counts[2]]
    assert n_b.tolist() == [plain_counts[1] + no, plain_counts[2], plain_counts[0] + yes]
