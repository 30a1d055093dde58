"""Visual question answering (VQAv2): the question is the instruction, the answer the target.

Metric: the official VQA accuracy, ported line by line from GT-Vision-Lab/VQA,
``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` (master, commit a013f00 "Fixed processing
answers bug", 2021). Quirks kept on purpose, so that our numbers are comparable with published ones:

* an answer is normalised (punctuation, number words -> digits, articles, contractions) only when
  the human answers of the question are not all identical (``if len(set(gtAnswers)) > 1``), for
  the prediction and the human answers alike; otherwise only whitespace is cleaned, so "Two" or
  "a dog" score 0 against ten identical "2" or "dog" answers;
* accuracy is the mean over the leave-one-out subsets of the human answers of
  ``min(1, #matches / 3)``: 3 of 10 matching answers give 0.9, not 1.0;
* ``periodStrip`` has a typo'd look-behind (``(?!<=\\d)`` is a look-ahead for "<=digit"), and
  ``re.UNICODE`` is passed where ``sub`` expects ``count``, so at most 32 periods are removed.

The official script rounds to two decimals of a percentage for display only; we return floats in
[0, 1]. One addition: a question with a single answer (synthetic data) counts as ten agreeing
annotators; the official formula, made for ten, would score it 0 (see `vqa_accuracy`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from tasks._common import (
    LABEL_FORBIDDEN,
    FieldSpec,
    Record,
    Task,
    box_list_field,
    choice_field,
    format_labelled_boxes,
    safe_mean,
    source_id_field,
    squash,
    string_field,
    string_list_field,
)

ANSWER_TYPES = ("yes/no", "number", "other")

# OFA feeds the question itself as the instruction (OFA data/mm_data/vqa_gen_dataset.py:
# `self.encode_text(' {}'.format(question))`); our templates drop OFA's leading space, which only
# served its GPT-2 BPE (a word-initial space is part of the first token); our SentencePiece
# tokenizer marks word starts itself. "question: ..." follows DESIGN.md §1 / VL-T5's "vqa:" prefix.
PROMPTS = (
    "{question}",
    "question: {question}",
    "question: {question} answer:",
)

# ---- official VQA evaluation (vqaEval.py, VQAEval.__init__), copied verbatim ----------------
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've",
    "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've",
    "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
MANUAL_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = ("a", "an", "the")
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: see the module docstring
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
PUNCT = (";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD_STRIP_COUNT = int(re.UNICODE)  # sic: vqaEval passes re.UNICODE (32) as `count`


def process_punctuation(text: str) -> str:
    """``VQAEval.processPunctuation``: strip or space out punctuation, drop periods not before a digit."""
    out = text
    for p in PUNCT:
        # The test reads the *input* text, the replacement edits the output (as in vqaEval.py).
        if (p + " " in text or " " + p in text) or (re.search(COMMA_STRIP, text) is not None):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """``VQAEval.processDigitArticle``: lower-case, number words -> digits, drop articles, fix contractions."""
    words = [MANUAL_MAP.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(text: str) -> str:
    """The full official answer normalisation (what vqaEval applies when the answers disagree)."""
    return process_digit_article(process_punctuation(_clean_whitespace(text)))


def _clean_whitespace(text: str) -> str:
    # vqaEval: answer.replace('\n', ' ').replace('\t', ' ').strip()
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(prediction: str | None, answers: Sequence[str]) -> float:
    """Official VQA accuracy of one predicted answer against the human answers.

    Args:
        prediction: the predicted answer; None (no prediction) scores 0.
        answers: the human answers. The formula assumes VQAv2's 10; a single answer (synthetic
            or single-annotator data) counts as ten agreeing annotators, since leave-one-out of
            one answer would score every prediction 0. Between 2 and 9 answers the formula is
            applied as is (e.g. 3 identical answers give a correct prediction 2/3).

    Returns:
        Mean over the leave-one-out subsets of ``min(1, #matches / 3)``, in [0, 1].
    """
    if prediction is None:
        return 0.0
    res_ans = _clean_whitespace(prediction)
    gt_answers = [_clean_whitespace(a) for a in answers]
    if len(gt_answers) == 1:
        gt_answers = gt_answers * 10
    if len(set(gt_answers)) > 1:
        gt_answers = [process_digit_article(process_punctuation(a)) for a in gt_answers]
        res_ans = process_digit_article(process_punctuation(res_ans))
    accs = []
    for i in range(len(gt_answers)):
        others = gt_answers[:i] + gt_answers[i + 1 :]
        matches = sum(1 for a in others if a == res_ans)
        accs.append(min(1.0, matches / 3))
    return safe_mean(accs)


# ---- task ------------------------------------------------------------------------------------


def most_common_answer(answers: Sequence[str]) -> str:
    """The most frequent human answer (VQAv2's ``multiple_choice_answer``); ties -> earliest listed."""
    cleaned = [squash(a) for a in answers]
    counts = Counter(cleaned)
    best = max(counts.values())
    return next(a for a in cleaned if counts[a] == best)


# A record with grounded evidence (``evidence_phrases`` / ``evidence_boxes``: the objects the question
# names, GQA's question-to-object annotations in our box format) is trained to write them first, each
# phrase with its four location tokens as grounding writes them, then this marker and the answer:
# "red circle<loc_..>x4 ; blue square<loc_..>x4 ; answer: yes". Grounded evidence before the answer, as
# Shikra writes the mentioned objects' coordinates in a chain of thought before its answer (Chen et al.
# 2023, "Shikra: Unleashing Multimodal LLM's Referential Dialogue Magic", arXiv 2306.15195); the metric
# reads only what follows the marker.
ANSWER_MARKER = "answer:"


def evidence_of(record: Record) -> list[tuple[str, list[float]]] | None:
    """The record's ``(phrase, box)`` evidence, or None when it has none (an empty list is evidence of
    nothing: "how many stars?" -> 0)."""
    phrases, boxes_ = record.get("evidence_phrases"), record.get("evidence_boxes")
    if phrases is None and boxes_ is None:
        return None
    return list(zip(phrases or [], boxes_ or [], strict=True))


def _target(record: Record, rng) -> str:
    # Deterministic even in training: OFA trains on the most confident answer as well.
    answer = most_common_answer(record["answers"])
    evidence = evidence_of(record)
    if evidence is None:
        return answer
    written = format_labelled_boxes(evidence, record["width"], record["height"])
    return f"{written} ; {ANSWER_MARKER} {answer}" if written else f"{ANSWER_MARKER} {answer}"


def _parse(text: str, record: Record) -> str | None:
    # Only whitespace is cleaned here: the official metric normalises inside, and only when the
    # human answers disagree; normalising here would change official scores.
    head, marker, answer = text.rpartition(ANSWER_MARKER)
    if not marker and "<loc_" in text:
        return None  # evidence with no answer after it (cut off): no prediction
    answer = squash(answer)
    return answer or None


def _metric(predictions: Sequence[str | None], records: Sequence[Record]) -> dict[str, float]:
    per_type: dict[str, list[float]] = {}
    scores = []
    for prediction, record in zip(predictions, records, strict=True):
        score = vqa_accuracy(prediction if isinstance(prediction, str) else None, record["answers"])
        scores.append(score)
        per_type.setdefault(record["answer_type"], []).append(score)
    result = {"accuracy": safe_mean(scores)}
    for answer_type in ANSWER_TYPES:  # reported for the answer types present only
        if answer_type in per_type:
            result[f"accuracy_{answer_type}"] = safe_mean(per_type[answer_type])
    return result


def _evidence_field(name: str, spec: FieldSpec, other: str) -> FieldSpec:
    # The two evidence lists go together, one box per phrase: a cross-field check around the generic one.
    def check(value, record) -> None:
        spec.check(value, record)
        partner = record.get(other)
        if partner is None:
            raise ValueError(f"needs {other} beside it (one box per evidence phrase)")
        if isinstance(partner, (list, tuple)) and len(partner) != len(value):
            raise ValueError(f"holds {len(value)} item(s) for {len(partner)} in {other} (one box per evidence phrase)")

    return FieldSpec(name, spec.type, check, spec.role, spec.required, spec.storage)


def answer_vocabulary(records: Sequence[Record], *, min_count: int = 1) -> list[str]:
    """Sorted target answers that occur at least ``min_count`` times (for an OFA-style answer trie).

    OFA constrains VQA decoding to a fixed candidate list built from training answers; this gives
    that list from our records. The task itself decodes openly.
    """
    counts = Counter(most_common_answer(r["answers"]) for r in records)
    return sorted(a for a, c in counts.items() if c >= min_count)


class QuestionPrior:
    """A question-only answer model from training counts: ``p(answer | question)``.

    The bias model of a product of experts (Clark et al. 2019, "Don't Take the Easy Way Out:
    Ensemble Based Methods for Avoiding Known Dataset Biases", EMNLP; their VQA-CP bias is the answer
    distribution of the question's type). Here a question's own answers come first, backed off to its
    VQAv2 ``question_type`` and then to all answers by Dirichlet smoothing of strength ``beta``
    (MacKay & Peto 1995): ``p(a | q) = (c(q, a) + beta p(a | type)) / (c(q) + beta)``, and the same
    from the type to all answers. Data whose questions rarely repeat (VQAv2) thus gets the paper's
    question-type prior; data that repeats its questions (our synthetic world) gets the sharper one
    that a question-only network would learn. Answers are each record's target
    (`most_common_answer`); questions are compared lower-cased, whitespace squashed.

    Args:
        records: the training records (``question``, ``answers``, optional ``question_type``).
        beta: the smoothing strength (> 0).
    """

    def __init__(self, records: Sequence[Record], *, beta: float = 1.0):
        if not beta > 0:
            raise ValueError(f"QuestionPrior: beta must be > 0, got {beta!r}")
        self.beta = float(beta)
        self.by_question: dict[str, Counter] = {}
        self.by_type: dict[str, Counter] = {}
        overall: Counter = Counter()
        for record in records:
            answer = most_common_answer(record["answers"])
            overall[answer] += 1
            self.by_question.setdefault(self.key(record["question"]), Counter())[answer] += 1
            self.by_type.setdefault(record.get("question_type") or "", Counter())[answer] += 1
        if not overall:
            raise ValueError("QuestionPrior: no training records to count answers from")
        total = sum(overall.values())
        self.overall = {a: c / total for a, c in overall.items()}

    @staticmethod
    def key(question: str) -> str:
        return squash(question).lower()

    def _backoff(self, counts: Counter | None, base: dict[str, float]) -> dict[str, float]:
        if not counts:
            return base
        n = sum(counts.values())
        return {a: (counts.get(a, 0) + self.beta * p) / (n + self.beta) for a, p in base.items()}

    def __call__(self, question: str, question_type: str | None = None) -> dict[str, float]:
        """``{answer: probability}`` over every training answer (sums to 1)."""
        by_type = self._backoff(self.by_type.get(question_type or ""), self.overall)
        return self._backoff(self.by_question.get(self.key(question)), by_type)


EXAMPLES = [
    {
        "id": "vqa-0", "image": None, "width": 64, "height": 64, "question_id": 420, "image_id": 42,
        "question": "What color is the circle?", "answer_type": "other", "question_type": "what color is the",
        "answers": ["red"] * 8 + ["dark red", "orange"],
    },
    {
        "id": "vqa-1", "image": None, "width": 64, "height": 64,
        "question": "How many squares are there?", "answer_type": "number", "question_type": "how many",
        "answers": ["2"] * 6 + ["two"] * 3 + ["3"],
    },
    {
        "id": "vqa-2", "image": None, "width": 64, "height": 64,
        "question": "Is the triangle left of the square?", "answer_type": "yes/no", "question_type": "is the",
        "answers": ["yes"] * 10,
    },
]  # fmt: skip

TASK = Task(
    name="vqa",
    fields={
        "question": string_field("question", role="input"),
        "answers": string_list_field("answers"),
        "answer_type": choice_field("answer_type", ANSWER_TYPES),
        "question_type": string_field("question_type", required=False),
        # Optional grounded evidence: the objects the question names (see ANSWER_MARKER).
        "evidence_phrases": _evidence_field(
            "evidence_phrases",
            string_list_field("evidence_phrases", required=False, min_items=0, forbid=LABEL_FORBIDDEN),
            "evidence_boxes",
        ),
        "evidence_boxes": _evidence_field(
            "evidence_boxes", box_list_field("evidence_boxes", required=False, min_items=0), "evidence_phrases"
        ),
        # VQAv2's ids (data_tools.converters.vqav2): the EvalAI results file keys on question_id.
        "question_id": source_id_field("question_id"),
        "image_id": source_id_field("image_id"),
    },
    prompts=PROMPTS,
    primary_metric="accuracy",
    decoding="open",
    format_target=_target,
    parse_output=_parse,
    gold_prediction=lambda record: most_common_answer(record["answers"]),
    metric=_metric,
    examples=EXAMPLES,
    prompt_values=lambda record, rng: {"question": squash(record["question"])},
    metric_keys=("accuracy", *(f"accuracy_{t}" for t in ANSWER_TYPES)),
    present=lambda answer, score: {"answer": answer},
    description="Visual question answering; official VQAv2 accuracy.",
)
