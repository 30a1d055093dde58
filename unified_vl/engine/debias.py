"""A question-only prior over the first answer token, for a product of experts in training.

``train.answer_prior = w``: a VQA record's first target token is scored by
``softmax(logits + w log p_prior(token | question))`` (Clark et al. 2019, "Don't Take the Easy Way
Out", EMNLP: the "bias product"; He et al. 2019 "Unlearn Dataset Bias in Natural Language
Inference by Fitting the Residual"). The gradient then teaches the model what the prior does not
already say; generation uses the model alone. The prior is over answers (`tasks.vqa.QuestionPrior`,
built by the application layer); here it becomes a distribution over the answers' first tokens
(answers that share a first token add up), which is where a one-word answer is decided.

A token that starts no training answer gets the bias of the likeliest answer (0 after the shift
below), not a low one: a low bias would leave its logit untaught (its share of the product stays
near 0 whatever the logit), and a generator that may write any token must still learn not to write
it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch


class FirstTokenPrior:
    """Turns per-row answer priors into a ``(B, V)`` bias on the first target token's logits.

    Args:
        tokenizer: the processor's tokenizer (the targets' token ids).
        weight: ``w``, the prior's weight in the product (> 0).
    """

    def __init__(self, tokenizer, weight: float):
        self.tokenizer, self.weight = tokenizer, float(weight)
        self._first: dict[str, int] = {}

    def first_token(self, text: str) -> int:
        """The first token id of ``text`` as a target (an empty answer: the end-of-sequence token)."""
        if text not in self._first:
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
            self._first[text] = ids[0] if ids else self.tokenizer.eos_token_id
        return self._first[text]

    def __call__(
        self, priors: Sequence[Mapping[str, float] | None], vocab_size: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(bias (B, V), has_prior (B,))`` for logits over ``vocab_size`` tokens; None when no row has a prior.

        Row ``i``'s bias is ``w (log p(t) - max_t' log p(t'))`` on the first tokens ``t`` of its
        prior's answers and 0 elsewhere (a constant shift per row leaves the softmax unchanged).
        """
        has = torch.tensor([p is not None for p in priors], dtype=torch.bool)
        if not has.any():
            return None
        bias = torch.zeros(len(priors), vocab_size)
        for row, prior in enumerate(priors):
            if prior is None:
                continue
            mass: dict[int, float] = {}
            for answer, probability in prior.items():
                token = self.first_token(answer)
                mass[token] = mass.get(token, 0.0) + float(probability)
            top = math.log(max(mass.values()))
            ids = torch.tensor(list(mass))
            logs = torch.tensor([math.log(m) - top if m > 0 else -1e4 for m in mass.values()])
            bias[row, ids] = self.weight * logs
        return bias, has
