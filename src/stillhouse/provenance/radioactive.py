"""The radioactivity test: did a suspect model learn from text watermarked with one of our keys?

After Sander et al., "Watermarking Makes Language Models Radioactive" (NeurIPS 2024). A model
fine-tuned on watermarked text inherits a bias toward the green lists of the contexts it saw;
the test looks for that bias in what the suspect itself predicts or writes.

- **open-weight** (``reading_tuples``): the suspect reads texts (teacher-forced, one forward pass
  per batch) and its top-1 next-token prediction at every position is scored as the tuple
  ``(the h tokens read before it, the predicted token)``;
- **open-weight, its own answers** (``own_answers``): the suspect answers prompts greedily on this
  machine, so every token it writes is its top-1 prediction after its own text, and those tuples are
  scored. With the prompts our watermarked answers went to (the guard's log has them: Sander et al.'s
  supervised setting) this finds a student that learned those answers: it writes them again, green
  tuples and all. A clean model's answers never depend on the key, so the test stays exact;
- **closed** (``closed_texts``): the suspect answers prompts through any OpenAI-compatible URL and
  its answers are scored like any text (:mod:`.detect`).

Either way two filters keep the test valid (under H0 the tuples' green bits are independent
Bernoulli(gamma)): every distinct tuple is scored once, and a tuple that occurs in the text read
or in the prompt is dropped. Without the second filter a clean model that merely predicts the
watermarked text it is reading (or copies its prompt) inherits that text's green bias and looks
radioactive. Dropping those tuples can only make the test conservative: a token the watermarked
text did *not* take after a window is, if anything, less likely to be green there.

The suspect must share the teacher's tokenizer for the open-weight test (green lists are over the
teacher's token ids); a model of another family is tested closed (its text is tokenized again).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from stillhouse.provenance.detect import Tuple
from stillhouse.watermark.green import scored_tuples

if TYPE_CHECKING:
    from stillhouse.progress import StepProgress
    from stillhouse.provenance.texts import Sample


class SuspectError(ValueError):
    """The suspect cannot be tested as asked; the message names the problem and the fix."""


def reading_inputs(tokenizer: Any, samples: Sequence[Sample], max_len: int) -> list[tuple[list[int], int]]:
    """``(token ids, first scored position)`` per sample: chat-templated prompt plus answer, scored from
    the answer on (the whole text when there is no prompt); at most ``max_len`` tokens."""
    out = []
    for s in samples:
        if not s.text:
            continue
        answer = tokenizer(s.text, add_special_tokens=False)["input_ids"]
        prompt: list[int] = []
        if s.prompt and getattr(tokenizer, "chat_template", None):
            got = tokenizer.apply_chat_template(s.prompt, tokenize=True, add_generation_prompt=True)
            if isinstance(got, dict) or hasattr(got, "input_ids"):  # newer transformers: a BatchEncoding
                got = got["input_ids"]
            prompt = [int(t) for t in got]
        ids = (prompt + list(answer))[:max_len]
        if len(ids) > len(prompt) + 1:
            out.append((ids, len(prompt)))
    return out


def reading_tuples(model: Any, inputs: Sequence[tuple[list[int], int]], context: int, batch_size: int = 8,
                   pad_id: int = 0) -> tuple[list[Tuple], dict[str, int]]:
    """The suspect's top-1 predictions while reading ``inputs``, as deduplicated scored tuples.

    Position ``i`` predicts token ``i+1`` from ids ``0..i``; its tuple is ``(ids[i-h+1..i], pred)``,
    kept when ``i+1`` is at or after the sample's first scored position. Tuples that occur in any
    text read are dropped. Returns the tuples and counts (predicted, duplicates, in-text)."""
    import torch

    in_text: set[Tuple] = set()
    for ids, _ in inputs:
        in_text.update(scored_tuples(ids, context))
    seen: set[Tuple] = set()
    out: list[Tuple] = []
    counts = {"predictions": 0, "duplicates": 0, "in_text": 0}
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        batch = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, (ids, _) in enumerate(chunk):
            batch[j, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[j, :len(ids)] = 1
        with torch.inference_mode():
            preds = model(input_ids=batch, attention_mask=mask, use_cache=False).logits.argmax(-1)
        for j, (ids, first) in enumerate(chunk):
            row = preds[j].tolist()
            for i in range(max(context - 1, first - 1), len(ids) - 1):
                tup = (*ids[i - context + 1:i + 1], row[i])
                counts["predictions"] += 1
                if tup in in_text:
                    counts["in_text"] += 1
                elif tup in seen:
                    counts["duplicates"] += 1
                else:
                    seen.add(tup)
                    out.append(tup)
    return out, counts


def check_same_tokenizer(suspect_tok: Any, teacher_tok: Any) -> None:
    """Raise SuspectError unless the two tokenizers map text to the same ids."""
    if suspect_tok.get_vocab() != teacher_tok.get_vocab():
        raise SuspectError("the suspect's tokenizer differs from the teacher's, so its token ids are not the "
                           "ones the green lists are over: test it closed (serve it, then "
                           "--suspect http://HOST:PORT/v1) so that its text is tokenized again")


def own_answers(model: Any, tokenizer: Any, samples: Sequence[Sample], max_tokens: int,
                max_batch: int = 32, progress: StepProgress | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """The prompt ids (chat template and assistant cue) and the suspect's greedy answer ids for every sample
    with a prompt, generated here with continuous batching (``progress`` hears of each answer, in order)."""
    from stillhouse.teacher.base import SamplingParams
    from stillhouse.teacher.batcher import BatchConfig
    from stillhouse.teacher.local import LocalTeacher

    asked = [s.prompt for s in samples if s.prompt]
    if not asked:
        raise SuspectError("reading=own needs prompts: give a JSONL of rows with 'messages' or 'prompt'")
    teacher = LocalTeacher(model, tokenizer, name="suspect", revision="", batch=BatchConfig(max_batch=max_batch))
    try:
        prompts = [teacher.encode(m) for m in asked]
        greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        handles = [teacher.submit(p, greedy, index=i) for i, p in enumerate(prompts)]
        answers = []
        for h in handles:
            answers.append(list(h.future.result().token_ids or []))  # a local teacher always has ids
            if progress is not None:
                progress("suspect answers", len(answers), len(handles))
    finally:
        teacher.close()
    return prompts, answers


async def closed_texts(url: str, samples: Sequence[Sample], max_tokens: int, runs: Sequence[tuple[float, int]],
                       concurrency: int, timeout_s: float = 600.0) -> list[list[str]]:
    """The suspect's answers to the samples' prompts through an OpenAI-compatible URL, once per ``(temperature,
    seed)`` run (prompt ``i`` asked with ``seed + i``). Every run's requests share one pool of ``concurrency`` in
    flight, so a few prompts asked several times still fill the server's batch: 6 prompts asked 17 times of a
    student behind `stillhouse serve` took 210-280 s in one pool of 32, against 620 s run by run (beside two
    trainings on 2 cores, 2026-12-07). Each run in a pool of its own (136 in flight) timed out: requests beyond the
    server's batch wait in its queue. ``timeout_s``: seconds to wait for one answer (32 answers of 200 tokens
    from a student on one loaded core took more than 120 s)."""
    from stillhouse.teacher.base import SamplingParams, TeacherError, chat_all
    from stillhouse.teacher.spec import make_teacher

    prompts = [s.prompt for s in samples if s.prompt]
    if not prompts:
        raise SuspectError("closed mode needs prompts: give a JSONL of rows with 'messages' or 'prompt'")
    asks = [(m, SamplingParams(max_tokens=max_tokens, temperature=t, seed=seed + i))
            for t, seed in runs for i, m in enumerate(prompts)]
    try:
        results = await chat_all(make_teacher(url, timeout_s=timeout_s), asks, concurrency)
    except TeacherError as exc:
        raise SuspectError(f"the suspect at {url} failed: {exc}") from exc
    texts = [r.completions[0].text for r in results]
    return [texts[j * len(prompts):(j + 1) * len(prompts)] for j in range(len(runs))]
