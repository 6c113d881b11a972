"""Batched generation for experiments: the shared-prefix KV cache changes speed, not outputs."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from stillhouse.distill.modelio import _shared_prefix, chat_prompt_ids, generate_batch  # noqa: E402


def test_shared_prefix_rules() -> None:
    assert _shared_prefix([[1, 2, 3, 4, 5, 9], [1, 2, 3, 4, 5, 8]]) == 5
    assert _shared_prefix([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5]]) == 4  # one token left to start from
    assert _shared_prefix([[1, 2, 3, 4, 5, 9], [1, 2, 3, 4, 9]]) == 0  # lengths differ: left padding
    assert _shared_prefix([[1, 2, 3, 7], [1, 2, 3, 8]]) == 0  # too short to be worth a cache
    assert _shared_prefix([[1, 2, 3, 4, 5, 6]]) == 0


def test_prefix_cache_gives_the_same_generations(tiny_model, smol_tokenizer) -> None:
    tok = smol_tokenizer
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": f"What is {a} + {b}? Reply with just the number."}])
               for a, b in ((12, 34), (56, 78), (90, 11), (23, 45))]
    assert _shared_prefix(prompts) > 10  # the chat template and "What is " are shared
    for temperature, topk in ((0.0, 5), (0.8, 0)):
        plain = generate_batch(tiny_model, tok, prompts, max_new_tokens=6, temperature=temperature,
                               top_k_logprobs=topk, seed=3, prefix_cache=False)
        cached = generate_batch(tiny_model, tok, prompts, max_new_tokens=6, temperature=temperature,
                                top_k_logprobs=topk, seed=3)
        assert [g.token_ids for g in cached] == [g.token_ids for g in plain]
        for a, b in zip(cached, plain):
            for ra, rb in zip(a.top_logprobs, b.top_logprobs):
                assert ra == pytest.approx(rb, abs=1e-4)
