"""Shared fixtures: tiny models and images built here, nothing downloaded."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer():
    from unified_vl.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def tiny_config(tokenizer):
    from unified_vl.config import UnifiedVLConfig
    from unified_vl.tokenizer import model_vocab_size

    return UnifiedVLConfig.from_preset("uvl-tiny", text_config={"vocab_size": model_vocab_size(tokenizer)})


@pytest.fixture()
def tiny_model(tiny_config, tokenizer):
    import torch

    from unified_vl.modeling import build_model

    torch.manual_seed(0)
    return build_model(tiny_config, tokenizer).eval()


@pytest.fixture(scope="session")
def processor(tiny_config, tokenizer):
    from unified_vl.processor import UnifiedVLProcessor

    return UnifiedVLProcessor.from_config(tiny_config, tokenizer)


def random_images(n: int, size: int = 48, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(size, size + 8 * i, 3), dtype=np.uint8) for i in range(n)]
