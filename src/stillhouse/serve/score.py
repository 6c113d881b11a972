"""The ``POST /v1/score`` request of ``stillhouse serve``: checked field by field, errors name the field.

    {"model": "...",                                   optional; must be the served model
     "messages": [...]  |  "prompt_token_ids": [...],  the prompt: chat messages (the chat template and
                                                       the assistant cue are applied) or token ids
     "completion": "..." | "completion_token_ids": [...],  what to score: text (tokenized by the server)
                                                       or token ids (scored exactly)
     "top_logprobs": 5}                                0..20 most likely tokens at each position

Pure functions: no I/O, no model.
"""

from __future__ import annotations

from typing import Any

from stillhouse.serve.schema import APIError, json_type

MAX_TOP_LOGPROBS = 20


def _bad(message: str, param: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _ids(body: dict[str, Any], key: str) -> list[int]:
    value = body[key]
    if not isinstance(value, list) or not value or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        raise _bad(f"'{key}' must be a non-empty list of token ids (integers >= 0)", key, "invalid_type")
    return list(value)


def parse_score_request(body: Any) -> tuple[str | None, list[Any], list[int] | str, int]:
    """``(model, prompt, completion, top_logprobs)`` from a decoded body; APIError (400) names the bad field."""
    if not isinstance(body, dict):
        raise _bad(f"the body must be a JSON object, got {json_type(body)}", "body", "invalid_type")
    unknown = sorted(set(body) - {"model", "messages", "prompt_token_ids", "completion", "completion_token_ids",
                                  "top_logprobs"})
    if unknown:
        raise _bad(f"unknown field(s) {unknown}: /v1/score takes model, messages or prompt_token_ids, "
                   "completion or completion_token_ids, and top_logprobs", unknown[0], "unknown_parameter")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad(f"'model' must be a string, got {json_type(model)}", "model", "invalid_type")
    if ("messages" in body) == ("prompt_token_ids" in body):
        raise _bad("give the prompt as exactly one of 'messages' (chat messages) or 'prompt_token_ids'", "messages",
                   "missing_required_parameter")
    if "messages" in body:
        prompt: list[Any] = body["messages"]
        if not isinstance(prompt, list) or not prompt or not all(isinstance(m, dict) for m in prompt):
            raise _bad("'messages' must be a non-empty list of {'role': ..., 'content': ...} objects", "messages",
                       "invalid_type")
    else:
        prompt = _ids(body, "prompt_token_ids")
    if ("completion" in body) == ("completion_token_ids" in body):
        raise _bad("give what to score as exactly one of 'completion' (text) or 'completion_token_ids'",
                   "completion", "missing_required_parameter")
    completion: list[int] | str
    if "completion" in body:
        completion = body["completion"]
        if not isinstance(completion, str) or not completion:
            raise _bad("'completion' must be a non-empty string", "completion", "invalid_type")
    else:
        completion = _ids(body, "completion_token_ids")
    k = body.get("top_logprobs", 0)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_TOP_LOGPROBS:
        raise _bad(f"'top_logprobs'={k!r}: must be an integer between 0 and {MAX_TOP_LOGPROBS}", "top_logprobs")
    return model, prompt, completion, k
