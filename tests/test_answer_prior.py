"""train.answer_prior: a question-only prior over VQA answers in a product of experts (Clark et al. 2019)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tasks.vqa import QuestionPrior
from unified_vl.engine.config import ConfigError, load_config
from unified_vl.engine.debias import FirstTokenPrior
from unified_vl.engine.mixture import few_shot_indices
from unified_vl.engine.trainer import TrainData, token_losses, train

RECORDS = [
    {"question": "What color is the circle?", "answers": ["blue"] * 10, "question_type": "what color is the"},
    {"question": "what color is the  circle?", "answers": ["blue"] * 9 + ["red"], "question_type": "what color is the"},
    {"question": "What color is the circle?", "answers": ["green"] * 10, "question_type": "what color is the"},
    {"question": "What color is the square?", "answers": ["red"] * 10, "question_type": "what color is the"},
    {"question": "How many squares are there?", "answers": ["2"] * 10, "question_type": "how many"},
]


def test_the_prior_backs_off_from_the_question_to_its_type_to_all_answers():
    prior = QuestionPrior(RECORDS, beta=1.0)
    overall = {"blue": 2 / 5, "green": 1 / 5, "red": 1 / 5, "2": 1 / 5}
    # The type "what color is the": blue 2, green 1, red 1 of 4, smoothed towards all answers.
    by_type = {
        a: (c + p) / (4 + 1) for a, c, p in zip("blue green red 2".split(), (2, 1, 1, 0), overall.values(), strict=True)
    }
    # The circle question (case and spaces do not matter): blue 2, green 1 of 3; red never followed it.
    got = prior("WHAT COLOR IS THE CIRCLE?", "what color is the")
    for answer, count in {"blue": 2, "green": 1, "red": 0, "2": 0}.items():
        assert got[answer] == pytest.approx((count + by_type[answer]) / (3 + 1))
    assert sum(got.values()) == pytest.approx(1.0)
    assert got["red"] == pytest.approx(0.24 / 4) and got["red"] < got["green"] / 4
    # A question never seen has its type's distribution; an unknown type, all answers'.
    assert prior("what color is the cross?", "what color is the") == pytest.approx(by_type)
    assert prior("is it raining?", "is it") == pytest.approx(overall)
    with pytest.raises(ValueError, match="no training records"):
        QuestionPrior([])


def test_the_bias_is_each_rows_log_mass_on_its_answers_first_tokens():
    from unified_vl.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    first = {word: tokenizer(word, add_special_tokens=False).input_ids[0] for word in ("red", "blue", "2")}
    out = FirstTokenPrior(tokenizer, weight=2.0)(
        [{"red": 0.5, "blue": 0.25, "2": 0.25}, None], vocab_size=len(tokenizer)
    )
    assert out is not None
    bias, rows = out
    assert rows.tolist() == [True, False]
    assert bias.shape == (2, len(tokenizer)) and not bias[1].any()
    # Shifted so that the likeliest answer is at 0, as is every token that starts no answer.
    assert bias[0, first["red"]] == 0
    assert bias[0, first["blue"]].item() == pytest.approx(2.0 * math.log(0.5))
    assert bias[0, first["2"]].item() == pytest.approx(2.0 * math.log(0.5))
    assert (bias[0] != 0).sum() == 2
    assert FirstTokenPrior(tokenizer, weight=1.0)([None, None], vocab_size=10) is None


def test_the_loss_scores_the_first_token_of_the_marked_rows_by_the_product():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 30)
    labels = torch.tensor([[3, 15, 22, 1], [5, 1, -100, -100], [7, 2, 1, -100]])
    bias = torch.zeros(3, 30)
    bias[0, 3], bias[0, 9] = -4.0, -1.0
    bias[1, 5] = -2.0  # row 1 is not marked: its bias is ignored
    rows = torch.tensor([True, False, True])
    plain, _ = token_losses(logits, labels)
    got, count = token_losses(logits, labels, first_token_bias=(bias, rows))
    assert count.tolist() == [4, 2, 3]
    expect = plain.clone()
    for r in (0, 2):
        product = F.cross_entropy((logits[r, 0] + bias[r])[None], labels[r, :1])
        expect[r] = plain[r] - F.cross_entropy(logits[r, :1], labels[r, :1]) + product
    torch.testing.assert_close(got, expect)
    assert got[0] > plain[0] and got[2] == pytest.approx(plain[2].item())  # row 2's bias is all zeros
    # With label smoothing the product's position-0 distribution is the one smoothed.
    smooth, _ = token_losses(logits, labels, label_smoothing=0.1, first_token_bias=(bias, rows))
    logp0 = (logits[0, 0] + bias[0]).log_softmax(-1)
    plain_smooth, _ = token_losses(logits, labels, label_smoothing=0.1)
    logp = logits[0, 0].log_softmax(-1)
    moved = 0.9 * (logp[3] - logp0[3]) + 0.1 * (logp.mean() - logp0.mean())
    torch.testing.assert_close(smooth[0], plain_smooth[0] + moved)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.answer_prior=-1"], "train.answer_prior must be a number in [0, 100), got -1"),
    ],
)
def test_bad_answer_prior_settings(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.tasks={vqa: 1}", *overrides])
    assert message in str(info.value)


def test_the_jobs_want_vqa_for_the_prior(tmp_path, capsys):
    from data_tools import synth
    from unified_vl.app.jobs import pretrain

    data = tmp_path / "data"
    synth.generate(str(data), num_images=4, num_eval_images=2, image_size=32, seed=0, log=lambda *a: None)
    args = [f"data.path={data}", "data.tasks={rec: 1}", "train.answer_prior=1", f"output_dir={tmp_path / 'x'}"]
    assert pretrain.main(args) == 2
    assert "train.answer_prior=1.0 weighs a prior over VQA answers, but data.tasks has no vqa (it has rec)" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "x").exists()
    # The application's prior reads the split's columns: each VQA record's question, others none.
    from data_tools import storage
    from unified_vl.app.jobs.common import answer_prior_of

    vqa = storage.load_split(data, "vqa", "train")
    prior = answer_prior_of({"vqa": vqa, "rec": storage.load_split(data, "rec", "train")})
    records = [dict(vqa[i], image=None) for i in range(len(vqa))]
    for i in (0, len(vqa) - 1):
        assert prior("vqa", i) == pytest.approx(QuestionPrior(records)(vqa[i]["question"], vqa[i]["question_type"]))
    assert prior("rec", 0) is None


def test_training_with_the_prior_reads_the_shots_records_and_moves_the_loss(tmp_path):
    from tests.test_engine import DATA, TINY, make_example

    calls = []

    def prior(task, index):
        calls.append((task, index))
        return {"red": 0.9, "blue": 0.1} if task == "colors" else None

    base = [
        "data.tasks={colors: 1, shapes: 1}",
        TINY,
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
        "train.max_steps=1",
        "train.num_threads=1",
        "checkpoint.export=false",
        "data.shots=6",
    ]

    def loss(name, *overrides, data):
        config = load_config(None, [*base, f"output_dir={tmp_path / name}", *overrides])
        return train(config, data).losses[0]

    with pytest.raises(ConfigError, match="the training data brings no answer prior"):
        loss("none", "train.answer_prior=1", data=TrainData(DATA, make_example))
    plain = loss("plain", data=TrainData(DATA, make_example, prior))
    assert calls == []  # off: never asked
    product = loss("product", "train.answer_prior=1", data=TrainData(DATA, make_example, prior))
    assert len(calls) == 8
    shots = set(few_shot_indices(len(DATA["colors"]), 6, seed=0, task="colors"))
    assert {i for t, i in calls if t == "colors"} <= shots  # the split's indices, not the shots'
    assert product != pytest.approx(plain)
