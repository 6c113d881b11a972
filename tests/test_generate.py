"""White-box batched generation (teacher/generate.py): the shared-prefix KV cache changes speed, not outputs;
batching and sorting change nothing either."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from stillhouse.teacher.generate import _shared_prefix, chat_prompt_ids, generate, generate_batch


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
        plain = generate_batch(tiny_model, tok, prompts, 6, temperature=temperature,
                               top_logprobs=topk, seed=3, prefix_cache=False)
        cached = generate_batch(tiny_model, tok, prompts, 6, temperature=temperature,
                                top_logprobs=topk, seed=3)
        assert [g.token_ids for g in cached] == [g.token_ids for g in plain]
        for a, b in zip(cached, plain):
            for ra, rb in zip(a.top_logprobs, b.top_logprobs):
                assert ra == pytest.approx(rb, abs=1e-4)


def test_generate_keeps_the_order_and_matches_one_batch(tiny_model, smol_tokenizer) -> None:
    """Prompts of different lengths come back in their order, each as one whole batch would give it;
    the top-k rows cover the stop position when the model stopped, and logprobs its own tokens."""
    tok = smol_tokenizer
    texts = ["What is 12 + 34?", "Hi", "What is 5 + 6? Reply with just the number.", "Say something long, please."]
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": t}]) for t in texts]
    assert len({len(p) for p in prompts}) == len(prompts)
    batched = generate(tiny_model, tok, prompts, 8, batch_size=2, logprobs=True, top_logprobs=3)
    for p, g in zip(prompts, batched):
        alone = generate_batch(tiny_model, tok, [p], 8, logprobs=True, top_logprobs=3)[0]
        assert (g.token_ids, g.finish_reason, g.text) == (alone.token_ids, alone.finish_reason, alone.text)
        assert len(g.top_ids) == len(g.token_ids) + (g.finish_reason == "stop")
        assert len(g.logprobs) == len(g.token_ids)
        for j, t in enumerate(g.token_ids):  # greedy: each token is the top-1 of its position
            assert g.top_ids[j][0] == t and g.logprobs[j] == pytest.approx(g.top_logprobs[j][0], abs=1e-4)
    assert tiny_model.training is False
    tiny_model.train()
    generate(tiny_model, tok, prompts[:1], 2)
    assert tiny_model.training, "generate puts a training model back in training mode"
    with pytest.raises(ValueError, match="batch_size=0"):
        generate(tiny_model, tok, prompts, 2, batch_size=0)


def test_a_stopped_completion_keeps_the_stop_positions_top_k(tiny_model, smol_tokenizer) -> None:
    """With the end-of-turn token's logit raised, the model stops at once: no tokens, finish 'stop', and one
    top-k row (the stop position's), whose top token is the stop token."""
    tok = smol_tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")

    def favour_eos(_module, _inputs, logits):
        return logits + 50.0 * torch.nn.functional.one_hot(torch.tensor(eos), logits.shape[-1])

    hook = tiny_model.lm_head.register_forward_hook(favour_eos)
    try:
        prompts = [chat_prompt_ids(tok, [{"role": "user", "content": t}]) for t in ("Hi", "What is 1 + 2?")]
        for g in generate(tiny_model, tok, prompts, 5, logprobs=True, top_logprobs=2):
            assert (g.token_ids, g.text, g.finish_reason, g.stop_id, g.logprobs) == ([], "", "stop", eos, [])
            assert len(g.top_ids) == 1 and g.top_ids[0][0] == eos and g.top_logprobs[0][0] > -1e-3
    finally:
        hook.remove()
