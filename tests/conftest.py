"""Shared fixtures: the real SmolLM2 tokenizer, a tiny random-init Llama, the bundled teacher.

- ``smol_tokenizer``  the bundled teacher's tokenizer (converts the GGUF once per machine,
                      then reads the cache); session-wide.
- ``tiny_model``      a 2-layer, 32-wide Llama over that vocabulary with random weights,
                      scaled so its next-token distributions have real entropy; session-wide.
- ``tiny_teacher``    a fresh LocalTeacher over ``tiny_model`` per test (closed afterwards).
- ``bundled_teacher`` the real SmolLM2-135M-Instruct as a LocalTeacher, loaded once per
                      session; only integration tests should use it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="session")
def smol_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from stillhouse.teacher.bundled import resolve_model_dir

    path, _, _ = resolve_model_dir("bundled")
    return AutoTokenizer.from_pretrained(str(path))



@pytest.fixture(scope="module")
def tok() -> Any:
    """The SmolLM2 tokenizer, loaded afresh for each test module (the training tests' name for it; its pad
    token is id 2, its end of sequence)."""
    from transformers import AutoTokenizer

    from stillhouse.teacher.bundled import resolve_model_dir

    path, _, _ = resolve_model_dir("bundled")
    return AutoTokenizer.from_pretrained(str(path))

def build_tiny_model(tokenizer: Any, seed: int = 0, max_positions: int = 4096) -> Any:
    """A tiny random Llama over ``tokenizer``'s vocabulary (cheap on 2 CPU cores)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True, initializer_range=0.3,
    )
    model = LlamaForCausalLM(config)
    model.eval()
    return model


@pytest.fixture(scope="session")
def tiny_model(smol_tokenizer: Any) -> Any:
    return build_tiny_model(smol_tokenizer)


@pytest.fixture
def tiny_teacher(tiny_model: Any, smol_tokenizer: Any) -> Iterator[Any]:
    from stillhouse.teacher.local import LocalTeacher

    teacher = LocalTeacher(tiny_model, smol_tokenizer, name="tiny", revision="tiny-0")
    yield teacher
    teacher.close()


@pytest.fixture(scope="session")
def bundled_teacher() -> Iterator[Any]:
    from stillhouse.teacher.local import LocalTeacher

    teacher = LocalTeacher.from_spec("bundled")
    yield teacher
    teacher.close()
