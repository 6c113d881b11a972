"""LocalTeacher on a tiny random-init Llama: logprobs, top-k, seeds, stops, batching, the hook."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import Future

import pytest
import torch

from stillhouse.teacher.base import SamplingParams, Teacher
from stillhouse.teacher.batcher import BatchConfig, Request, RequestCancelled
from stillhouse.teacher.decoding import (
    TokenText,
    find_stop,
    safe_prefix_len,
    sample_rows,
    tokens_covering,
    top_p_filter,
)
from stillhouse.teacher.local import ContextTooLong, LocalTeacher

CONVS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3? Explain slowly."}],
    [{"role": "user", "content": "Name a colour."}],
]


def manual_logprobs(model, prompt: list[int], gen: list[int]) -> torch.Tensor:
    """Reference: one unpadded forward pass over prompt+completion, log_softmax per position."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + gen])).logits[0].float()
    return torch.log_softmax(logits, -1)[len(prompt) - 1 : len(prompt) - 1 + len(gen)]


def test_is_a_teacher(tiny_teacher):
    assert isinstance(tiny_teacher, Teacher)
    assert tiny_teacher.name == "tiny" and tiny_teacher.revision == "tiny-0"


def test_logprobs_match_a_manual_forward_pass(tiny_teacher, tiny_model):
    params = SamplingParams(max_tokens=10, logprobs=True, top_logprobs=5)
    results = tiny_teacher.generate(CONVS, params)  # one left-padded batch of three lengths
    for conv, res in zip(CONVS, results):
        c = res.completions[0]
        prompt = tiny_teacher.encode(conv)
        assert c.prompt_tokens == len(prompt) and c.completion_tokens == len(c.token_ids) > 0
        ref = manual_logprobs(tiny_model, prompt, c.token_ids)
        got = torch.tensor(c.logprobs.logprobs)
        want = ref[torch.arange(len(c.token_ids)), torch.tensor(c.token_ids)]
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
        # top-k: sorted, the true top-k of the reference, and (greedy) led by the chosen token
        for j, (ids, lps) in enumerate(zip(c.logprobs.top_ids, c.logprobs.top_logprobs)):
            assert lps == sorted(lps, reverse=True)
            assert ids[0] == c.token_ids[j]
            ref_vals, ref_ids = torch.topk(ref[j], 5)
            assert torch.allclose(torch.tensor(lps), ref_vals, atol=1e-4)
            assert set(ids) == set(ref_ids.tolist())
        tt = TokenText(tiny_teacher.tokenizer)
        assert c.logprobs.top_tokens[0] == [tt.text(i) for i in c.logprobs.top_ids[0]]
        assert b"".join(tt.raw(i) for i in c.token_ids).decode("utf-8", "replace") == c.text


def test_greedy_matches_transformers_generate(tiny_teacher, tiny_model):
    """An independent reference: HF generate() one prompt at a time, no padding."""
    results = tiny_teacher.generate(CONVS, SamplingParams(max_tokens=8))
    for conv, res in zip(CONVS, results):
        prompt = tiny_teacher.encode(conv)
        out = tiny_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                  max_new_tokens=8, do_sample=False, pad_token_id=tiny_teacher.batcher.pad_id)
        assert res.completions[0].token_ids == out[0, len(prompt):].tolist()


def test_seeds_reproduce_and_differ(tiny_teacher):
    conv = [CONVS[0]]
    p = SamplingParams(temperature=1.0, max_tokens=12, n=3, seed=7)
    a = tiny_teacher.generate(conv, p)[0].completions
    b = tiny_teacher.generate(conv, p)[0].completions
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert len({tuple(c.token_ids) for c in a}) == 3, "n completions must not be copies"
    other = tiny_teacher.generate(conv, SamplingParams(temperature=1.0, max_tokens=12, n=3, seed=8))[0].completions
    assert [c.token_ids for c in other] != [c.token_ids for c in a]


def test_a_seeded_sample_does_not_depend_on_its_batch_neighbours(tiny_teacher):
    p = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=10, seed=3)
    alone = tiny_teacher.generate([CONVS[1]], p)[0].completions[0]
    crowded = tiny_teacher.generate(CONVS, p)[1].completions[0]
    assert alone.token_ids == crowded.token_ids


def test_stop_string_truncates_text_and_tokens(tiny_teacher):
    free = tiny_teacher.generate([CONVS[2]], SamplingParams(max_tokens=16))[0].completions[0]
    assert free.finish_reason == "length" and len(free.text) > 12
    stop = free.text[8:11]
    cut = free.text.find(stop)
    got = tiny_teacher.generate([CONVS[2]], SamplingParams(max_tokens=16, stop=(stop, "never-seen-xyz")))[0]
    c = got.completions[0]
    assert c.finish_reason == "stop" and c.text == free.text[:cut]
    assert c.token_ids == free.token_ids[: len(c.token_ids)]
    assert tiny_teacher.tokenizer.decode(c.token_ids).startswith(c.text)


def test_max_tokens_gives_length(tiny_teacher):
    c = tiny_teacher.generate([CONVS[0]], SamplingParams(max_tokens=3))[0].completions[0]
    assert c.finish_reason == "length" and c.completion_tokens == 3 == len(c.token_ids)


def test_logits_processor_hook_changes_choice_and_logprobs(tiny_teacher):
    forced = tiny_teacher.tokenizer.encode(" banana", add_special_tokens=False)[0]
    seen_shapes = []

    def force(input_ids, scores):
        seen_shapes.append((tuple(input_ids.shape), tuple(scores.shape)))
        out = torch.full_like(scores, -1e9)
        out[:, forced] = 0.0
        return out

    tiny_teacher.logits_processors.append(force)
    c = tiny_teacher.generate([CONVS[0]], SamplingParams(max_tokens=4, logprobs=True))[0].completions[0]
    assert c.token_ids == [forced] * 4
    assert all(abs(x) < 1e-6 for x in c.logprobs.logprobs)  # logprobs come from the processed scores
    prompt_len = len(tiny_teacher.encode(CONVS[0]))
    assert seen_shapes[0][0] == (1, prompt_len) and seen_shapes[-1][0] == (1, prompt_len + 3)
    tiny_teacher.logits_processors.clear()


def test_white_box_logits_match_the_model(tiny_teacher, tiny_model):
    seqs = [tiny_teacher.encode(CONVS[0]), tiny_teacher.encode(CONVS[1])]
    got = tiny_teacher.logits(seqs, batch_size=2)
    for s, lg in zip(seqs, got):
        with torch.inference_mode():
            ref = tiny_model(torch.tensor([s])).logits[0].float()
        assert lg.shape == (len(s), tiny_model.config.vocab_size)
        assert torch.allclose(lg, ref, atol=1e-4)


def test_a_request_joins_a_running_batch_and_matches_its_solo_run(tiny_model, smol_tokenizer):
    teacher = LocalTeacher(tiny_model, smol_tokenizer, batch=BatchConfig(max_batch=4, batch_window_s=0.0))
    try:
        ids_a, ids_b = teacher.encode(CONVS[1]), teacher.encode(CONVS[0])
        p = SamplingParams(max_tokens=40, logprobs=True)
        solo_b = teacher.submit(ids_b, p).future.result(timeout=60)
        long_a = teacher.submit(ids_a, SamplingParams(max_tokens=400))
        deadline = time.monotonic() + 30
        while teacher.batcher.steps < 5 + solo_b.completion_tokens and time.monotonic() < deadline:
            time.sleep(0.005)
        joined = teacher.submit(ids_b, p).future.result(timeout=60)
        assert not long_a.future.done(), "the first request should still be running when the second finishes"
        assert teacher.batcher.max_rows_seen == 2
        assert joined.token_ids == solo_b.token_ids
        assert max(abs(x - y) for x, y in zip(joined.logprobs.logprobs, solo_b.logprobs.logprobs)) < 1e-4
        long_a.cancel()
        with pytest.raises(RequestCancelled):
            long_a.future.result(timeout=30)
        assert teacher.batcher.active == 0
    finally:
        teacher.close()


class CancelledMidResolve(Future):
    """A future its caller cancels right after the worker checked ``done()`` (the race, made certain)."""

    def done(self) -> bool:
        was = super().done()
        if not was:
            self.cancel()
        return was


def test_a_future_cancelled_while_being_resolved_does_not_fail_its_batch(tiny_model, smol_tokenizer):
    teacher = LocalTeacher(tiny_model, smol_tokenizer, batch=BatchConfig(max_batch=4, batch_window_s=0.05))
    try:
        ids_a, ids_b = teacher.encode(CONVS[0]), teacher.encode(CONVS[1])
        racy = teacher.batcher.submit(Request(ids_a, SamplingParams(max_tokens=3), future=CancelledMidResolve()))
        neighbour = teacher.submit(ids_b, SamplingParams(max_tokens=12))
        done = neighbour.future.result(timeout=60)  # raised InvalidStateError before the fix
        assert done.completion_tokens == 12 and teacher.batcher.max_rows_seen == 2
        assert racy.future.cancelled()
    finally:
        teacher.close()


def test_a_future_cancelled_by_its_caller_frees_its_slot(tiny_model, smol_tokenizer):
    teacher = LocalTeacher(tiny_model, smol_tokenizer, batch=BatchConfig(max_batch=4, batch_window_s=0.0))
    try:
        ids = teacher.encode(CONVS[1])
        long = teacher.submit(ids, SamplingParams(max_tokens=400))
        deadline = time.monotonic() + 30
        while teacher.batcher.steps < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert long.future.cancel()  # what asyncio.wrap_future does when the awaiting task is cancelled
        while teacher.batcher.active and time.monotonic() < deadline:
            time.sleep(0.005)
        assert teacher.batcher.active == 0, "the cancelled request kept its batch slot"
        assert teacher.batcher.steps < 200
        assert teacher.submit(ids, SamplingParams(max_tokens=4)).future.result(timeout=60).completion_tokens == 4
    finally:
        teacher.close()


def test_batch_size_one_runs_requests_one_at_a_time(tiny_model, smol_tokenizer):
    teacher = LocalTeacher(tiny_model, smol_tokenizer, batch=BatchConfig(max_batch=1))
    try:
        res = teacher.generate(CONVS, SamplingParams(max_tokens=5))
        assert teacher.batcher.max_rows_seen == 1 and all(r.completions[0].completion_tokens == 5 for r in res)
    finally:
        teacher.close()


def test_context_limit_is_enforced(tiny_model, smol_tokenizer):
    teacher = LocalTeacher(tiny_model, smol_tokenizer, max_context=40)
    try:
        with pytest.raises(ContextTooLong, match="limit is 40 tokens"):
            teacher.generate([[{"role": "user", "content": "word " * 50}]], SamplingParams(max_tokens=5))
    finally:
        teacher.close()


async def test_chat_does_not_block_the_event_loop(tiny_teacher):
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    task = asyncio.create_task(ticker())
    res = await asyncio.gather(*(tiny_teacher.chat(c, SamplingParams(max_tokens=30)) for c in CONVS))
    task.cancel()
    assert all(r.completions[0].completion_tokens == 30 for r in res)
    assert ticks > 5
    assert tiny_teacher.batcher.max_rows_seen == 3  # concurrent chats shared forward passes


def test_streaming_events_add_up_to_the_completion(tiny_teacher):
    events = []
    ids = tiny_teacher.encode(CONVS[2])
    p = SamplingParams(max_tokens=12, logprobs=True, top_logprobs=2, stop=("zzz-not-there",))
    c = tiny_teacher.submit(ids, p, on_event=events.append).future.result(timeout=60)
    assert "".join(e.text for e in events) == c.text
    assert sum((e.token_ids for e in events), []) == c.token_ids
    assert sum((e.logprobs for e in events), []) == c.logprobs.logprobs
    assert events[-1].finish_reason == "length" and events[-1].completion is c


def test_bad_messages_are_rejected(tiny_teacher):
    with pytest.raises(ValueError, match="role"):
        tiny_teacher.encode([{"role": "wizard", "content": "x"}])
    with pytest.raises(ValueError, match="non-empty"):
        tiny_teacher.encode([])


def test_close_fails_waiting_requests(tiny_model, smol_tokenizer):
    teacher = LocalTeacher(tiny_model, smol_tokenizer)
    teacher.close()
    with pytest.raises(RuntimeError, match="closed"):
        teacher.submit([1, 2, 3], SamplingParams())


# -- plain decoding functions ----------------------------------------------------------------

def test_top_p_filter_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.3, 0.15])
    kept = top_p_filter(probs, 0.75)
    assert kept.tolist() == pytest.approx([0.0, 0.5, 0.3, 0.0])
    assert top_p_filter(probs, 0.01).nonzero().flatten().tolist() == [1]


def test_sample_rows_follows_the_distribution():
    g = torch.Generator().manual_seed(0)
    scores = torch.log(torch.tensor([[0.1, 0.6, 0.3, 0.0]]))
    draws = [int(sample_rows(scores, [1.0], [1.0], [g])[0]) for _ in range(3000)]
    freq = [draws.count(i) / len(draws) for i in range(4)]
    assert freq[3] == 0.0
    assert freq == pytest.approx([0.1, 0.6, 0.3, 0.0], abs=0.03)


def test_stop_helpers():
    assert find_stop("abc\nde", ("\n", "c")) == 2
    assert find_stop("abc", ("x",)) is None
    assert safe_prefix_len("hello wor", ("world",)) == 6
    assert safe_prefix_len("caf\ufffd", ()) == 3
    assert tokens_covering([2, 5, 9], 5) == 2 and tokens_covering([2, 5, 9], 6) == 3 and tokens_covering([2], 0) == 0


def test_token_bytes_are_exact_for_multibyte_text(smol_tokenizer):
    tt = TokenText(smol_tokenizer)
    text = "naïve café 🙂"
    ids = smol_tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(tt.raw(i) for i in ids) == text.encode()


# -- the model cache ----------------------------------------------------------------------------

def test_conversion_failure_leaves_no_cache(tmp_path, monkeypatch):
    from stillhouse.teacher import bundled

    monkeypatch.setenv("STILLHOUSE_CACHE", str(tmp_path))
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(Exception):
        bundled.cached_gguf_dir(gguf, progress=False)
    models = tmp_path / "models"
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []


def test_file_hash_is_memoised(tmp_path, monkeypatch):
    import hashlib

    from stillhouse.teacher import bundled

    monkeypatch.setenv("STILLHOUSE_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc" * 1000)
    assert bundled.file_sha256(f) == hashlib.sha256(b"abc" * 1000).hexdigest()
    memo = list((tmp_path / "cache" / "sha256").iterdir())
    assert len(memo) == 1
    f.write_bytes(b"abd" * 1000)  # new content, new mtime: the memo must not be reused
    assert bundled.file_sha256(f) == hashlib.sha256(b"abd" * 1000).hexdigest()


def test_bundled_cache_is_keyed_by_the_gguf_hash():
    from stillhouse.teacher import bundled

    path, revision, name = bundled.resolve_model_dir("bundled")
    meta = json.loads((path / "stillhouse.json").read_text())
    assert revision == "sha256:" + meta["sha256"] == "sha256:" + path.name
    assert name == "SmolLM2-135M-Instruct"
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
