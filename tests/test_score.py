"""Prompt scoring: ``Teacher.score`` in process, and ``POST /v1/score`` of ``stillhouse serve`` over real HTTP,
against a direct forward pass of the same tiny model."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from stillhouse.serve.app import ServeConfig, ServerThread, create_app
from stillhouse.teacher.base import BadRequest
from stillhouse.teacher.fake import FakeTeacher
from stillhouse.teacher.openai import OpenAITeacher

MSGS = [{"role": "user", "content": "What is 12 + 30?"}]


def _direct(model: Any, prompt: list[int], completion: list[int], k: int) -> tuple[list[float], Any, Any]:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].float()
    lp = torch.log_softmax(logits[len(prompt) - 1: len(prompt) + len(completion) - 1], -1)
    tok = lp.gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1).tolist()
    vals, ids = lp.topk(k, -1)
    return tok, vals, ids


def _post(base: str, body: Any) -> tuple[int, dict]:
    req = urllib.request.Request(base + "/score", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_local_score_equals_a_direct_forward_pass(tiny_teacher, tiny_model, smol_tokenizer):
    prompt = tiny_teacher.encode(MSGS)
    completion = smol_tokenizer.encode("12 + 30 = 42", add_special_tokens=False) + [smol_tokenizer.eos_token_id]
    res = asyncio.run(tiny_teacher.score(MSGS, completion, top_logprobs=5))
    tok, vals, ids = _direct(tiny_model, prompt, completion, 5)
    assert res.prompt_tokens == len(prompt) and res.logprobs.token_ids == completion
    assert res.logprobs.logprobs == pytest.approx(tok, abs=1e-5)
    assert res.logprobs.top_ids == ids.tolist()
    assert torch.allclose(torch.tensor(res.logprobs.top_logprobs), vals, atol=1e-5)
    # ids as the prompt, text as the completion: the same numbers
    again = asyncio.run(tiny_teacher.score(prompt, "12 + 30 = 42", top_logprobs=0))
    assert again.logprobs.logprobs == pytest.approx(tok[:-1], abs=1e-5)
    with pytest.raises(ValueError, match="empty"):
        asyncio.run(tiny_teacher.score(MSGS, []))
    with pytest.raises(ValueError, match="vocabulary"):
        asyncio.run(tiny_teacher.score(MSGS, [10**9]))


def test_score_route_over_http_equals_a_direct_forward_pass(tiny_teacher, tiny_model, smol_tokenizer):
    prompt = tiny_teacher.encode(MSGS)
    completion = smol_tokenizer.encode("12 + 30 = 42", add_special_tokens=False)
    tok, vals, ids = _direct(tiny_model, prompt, completion, 3)
    with ServerThread(create_app(tiny_teacher, ServeConfig(teacher="fake", max_context=64))) as srv:
        async def go() -> Any:
            client = OpenAITeacher(srv.base_url)
            try:
                return (await client.score(prompt, completion, top_logprobs=3),
                        await client.score(MSGS, completion, top_logprobs=3))
            finally:
                await client.aclose()

        by_ids, by_msgs = asyncio.run(go())
        for res in (by_ids, by_msgs):
            assert res.logprobs.token_ids == completion and res.prompt_tokens == len(prompt)
            assert res.logprobs.logprobs == pytest.approx(tok, abs=1e-5)
            assert res.logprobs.top_ids == ids.tolist()
            assert torch.allclose(torch.tensor(res.logprobs.top_logprobs), vals, atol=1e-5)
        assert by_ids.logprobs.tokens == smol_tokenizer.convert_ids_to_tokens(completion) or by_ids.logprobs.tokens
        # bad input: one-line 4xx errors naming the field
        cases = [({"completion_token_ids": completion}, "messages"),
                 ({"messages": MSGS, "prompt_token_ids": prompt, "completion": "x"}, "messages"),
                 ({"messages": MSGS}, "completion"),
                 ({"messages": MSGS, "completion_token_ids": [1.5]}, "completion_token_ids"),
                 ({"messages": MSGS, "completion": "x", "top_logprobs": 21}, "top_logprobs"),
                 ({"messages": MSGS, "completion": "x", "temperature": 1}, "temperature"),
                 ({"messages": MSGS, "completion_token_ids": [10**9]}, "completion_token_ids"),
                 ({"messages": MSGS, "completion_token_ids": [5] * 80}, "completion_token_ids"),
                 ({"model": "other", "messages": MSGS, "completion": "x"}, "model")]
        for body, param in cases:
            status, err = _post(srv.base_url, body)
            assert 400 <= status < 500, (body, status, err)
            assert err["error"]["param"] == param and "\n" not in err["error"]["message"]
        status, err = _post(srv.base_url, {"messages": MSGS, "completion_token_ids": [5] * 80})
        assert "context" in err["error"]["message"]

        async def bad() -> None:
            client = OpenAITeacher(srv.base_url)
            try:
                await client.score(MSGS, [10**9])
            finally:
                await client.aclose()

        with pytest.raises(BadRequest, match="vocabulary"):
            asyncio.run(bad())


def test_fake_teacher_scores_deterministically_through_serve():
    with ServerThread(create_app(FakeTeacher(seed=3), ServeConfig(teacher="fake:3"))) as srv:
        status, body = _post(srv.base_url, {"messages": MSGS, "completion": "12 + 30 = 42", "top_logprobs": 2})
        assert status == 200 and [e["token"] for e in body["logprobs"]["content"]] == ["12", "+", "30", "=", "42"]
        _, body2 = _post(srv.base_url, {"messages": MSGS, "completion": "12 + 30 = 42", "top_logprobs": 2})
        assert body2["logprobs"] == body["logprobs"]
        assert all(len(e["top_logprobs"]) == 2 for e in body["logprobs"]["content"])
