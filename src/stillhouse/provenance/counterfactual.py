"""The counterfactual test: does a suspect prefer our answers to the ones other keys would have drawn?

For every watermarked answer in the source (a guard's log, or JSONL rows with their ``key_id``), the watermarking
teacher draws ``K`` more answers to the same prompt with the same recipe (scheme, delta, gate, temperature, top-p,
max_tokens, seed as the request recorded them), each under a key of its own derived from the secret and the
answer's key id (``counterfactual/<j>/<key id>``), each shaped as serve answers (a leading ``<think>`` block moved
out of the content the guard logs; requests with ``tools`` are left out, as the redraw does not replay them). The
suspect scores all ``K + 1`` and our answer gets its rank (1 = the suspect's favourite, ties broken by a coin seeded
from the key id):

- **likelihood** (open weights, ``--reading text``): ``log p_suspect(answer | prompt) - log p_reference(answer |
  prompt)``, teacher-forced, over each answer's first 64 tokens by default (``--prefix-tokens``: a student remembers
  an answer's opening best), the reference the watermarking teacher by default (it takes out how likely the teacher
  itself found each draw; ``--reference none`` keeps the raw log-probability). Each model reads with its own
  tokenizer and chat template, so a suspect of another family can be tested;
- **overlap** (the suspect's own answers: closed mode over HTTP, or ``--reading own``): the share of a candidate's
  distinct 4-grams (teacher tokens) that the suspect's answer to the prompt contains (greedy; in closed mode pooled
  with 4 more sampled at T 0.7 by default, ``--sampled-answers``); ``--overlap idf`` weighs each 4-gram by 1 / the
  number of candidates holding it.

Why it is exact. Under H0 for an account ("the suspect learned nothing from this account's answers") the suspect
is independent of the keys that drew them. With a key per request (the guard's ``watermark_per_request``) our
answer and its ``K`` counterfactuals are ``K + 1`` independent draws of one sampler given the prompt, so they are
exchangeable to the suspect and our answer's rank is uniform on ``1..K+1``; the keys of different answers are
independent, so the ranks are too, and ``S = sum(K + 1 - rank)`` is a sum of independent uniforms on ``0..K`` with
the exact tail :func:`~stillhouse.provenance.stats.log_rank_sum_sf`. Every answer with a prompt is used, whatever
its text, since keeping answers by a property of ours alone would break the exchangeability. One key per account
is refused: the same key shapes all of an account's answers (shared windows draw the same tokens), so their ranks
are not independent and the tail would be too small. Accounts (and ``--group``s, and the clusters the guard's
detector linked) are the hypotheses; Holm runs over all of them.

What it measures that the green-list tests do not: a student that memorised our answers prefers them, as whole
sequences, to equally likely answers it never saw. docs/results.md: a self-distilled student whose data held 32
of our answers among 640 rows (5%) ranked every one first among 10 (p = 1e-32), where the green-list test on the
same kind of student gave 3.4e-3 to 5e-8 across draws; clean students on the same answers gave 0.03 to 0.08.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stillhouse.provenance.stats import holm, log_rank_sum_sf
from stillhouse.provenance.texts import Sample
from stillhouse.watermark.green import WatermarkParams
from stillhouse.watermark.keys import KeyId, WatermarkKeyError

if TYPE_CHECKING:
    from stillhouse.progress import StepProgress
    from stillhouse.provenance.gate import AnswerView
    from stillhouse.teacher.base import SamplingParams

OVERLAP_N = 4
"""The overlap score's n-gram length, in teacher tokens."""
TINY_LOG = -103.3
"""``log`` of a probability that underflowed to 0 in float32 (below the smallest subnormal, 1.4e-45)."""


class CounterfactualError(ValueError):
    """The source cannot be tested this way; the message says why and what to do."""


@dataclass(frozen=True)
class Hypothesis:
    """One account, group or cluster: our answers' ranks among their counterfactuals, and the exact tail."""

    name: str
    kind: str
    """account, group (--group) or cluster (linked by the guard's detector)."""
    accounts: tuple[str, ...]
    ranks: tuple[int, ...]
    k: int

    @property
    def statistic(self) -> int:
        return sum(self.k + 1 - r for r in self.ranks)

    @cached_property
    def log_p(self) -> float:
        """The exact tail, computed once (it takes 0.4 s at 2,000 answers, and the report reads it four times)."""
        return log_rank_sum_sf(len(self.ranks), self.k, self.statistic)

    def to_json(self, p_holm: float) -> dict[str, Any]:
        n = len(self.ranks)
        return {"name": self.name, "kind": self.kind, "accounts": list(self.accounts), "answers": n,
                "first": sum(r == 1 for r in self.ranks), "mean_rank": sum(self.ranks) / n if n else None,
                "uniform_mean_rank": (self.k + 2) / 2, "statistic": self.statistic, "max_statistic": n * self.k,
                "p": math.exp(self.log_p), "log10_p": self.log_p / math.log(10), "p_holm": p_holm,
                "ranks": list(self.ranks)}


def subject(sample: Sample) -> str:
    """Who asked: the account the source records, else the subject of the answer's key id."""
    if sample.account:
        return sample.account
    try:
        return KeyId.parse(sample.key_id).subject
    except WatermarkKeyError as exc:
        raise CounterfactualError(f"{exc}; or give the row an 'account'") from None


def check_keys(samples: Sequence[Sample]) -> None:
    """Raise unless every answer carries a key id of its own (keys per request)."""
    missing = [i for i, s in enumerate(samples) if not s.key_id]
    if missing:
        raise CounterfactualError(
            f"{len(missing)} of {len(samples)} answers carry no key id (first: row {missing[0]}): the counterfactual "
            "test needs the key that answered each one; give the guard's log as SOURCE, or a 'key_id' per JSONL row")
    seen: dict[str, int] = {}
    for i, s in enumerate(samples):
        subject(s)  # raises when neither the row nor its key id names who asked
        if s.key_id in seen:
            raise CounterfactualError(
                f"rows {seen[s.key_id]} and {i} share key id {s.key_id!r}: under one key per account the answers' "
                "ranks are not independent and no exact p-value exists; run the guard with --watermark-per-request "
                "(a key per request) and test the answers served after that")
        seen[s.key_id] = i


def counterfactual_key_id(key_id: str, j: int) -> str:
    """The key id the ``j``-th counterfactual of the answer keyed ``key_id`` is drawn with (never served)."""
    return f"counterfactual/{j}/{key_id}"


def sampling(sample: Sample, default_max_tokens: int, fallback_temperature: float) -> SamplingParams:
    """The recipe the answer was drawn with, from what its request recorded (serve's defaults for the rest)."""
    from stillhouse.teacher.base import SamplingParams

    p = sample.params
    max_tokens = p.get("max_completion_tokens") or p.get("max_tokens") or default_max_tokens
    temperature = sample.temperature if sample.temperature is not None else fallback_temperature
    stop = p.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(str(x) for x in stop) if isinstance(stop, list) else ()
    seed = p.get("seed")
    try:
        return SamplingParams(temperature=temperature, top_p=float(p.get("top_p", 1.0)), max_tokens=int(max_tokens),
                              seed=seed if isinstance(seed, int) else None, stop=stops)
    except (TypeError, ValueError) as exc:
        raise CounterfactualError(f"answer keyed {sample.key_id!r}: its recorded sampling fields cannot be replayed "
                                  f"({exc}); give max_tokens as an integer and top_p as a number in (0, 1]") from None


def served_text(text: str) -> str:
    """A drawn answer as serve answers it and the guard logs it: a leading ``<think>`` block goes to the reasoning
    field, so the content is what follows it (serve's ``shape``); any other text as drawn."""
    from stillhouse.teacher.message import split_think

    thought, answer = split_think(text)
    return answer if thought is not None else text


def _recipe(teacher: str, params: WatermarkParams, sp: SamplingParams, k: int) -> str:
    text = json.dumps([teacher, vars(params), [sp.temperature, sp.top_p, sp.max_tokens, sp.seed, list(sp.stop)], k])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_cache(path: Path | None) -> dict[tuple[str, str], list[str]]:
    """Draws kept from an earlier run (a torn last line, from a kill, is skipped)."""
    out: dict[tuple[str, str], list[str]] = {}
    if path is None or not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            out[(row["key_id"], row["recipe"])] = [str(a) for a in row["answers"]]
        except (ValueError, KeyError, TypeError):
            continue
    return out


def draw(teacher_spec: str, samples: Sequence[Sample], k: int, params: Sequence[WatermarkParams], secret: bytes,
         recipes: Sequence[SamplingParams], cache: Path | None = None,
         progress: StepProgress | None = None) -> list[list[str]]:
    """``k`` counterfactual answers per sample: the watermarking teacher (``teacher_spec``, as serve ran it) under
    ``counterfactual_key_id(key id, j)``, with that sample's watermark ``params`` and sampling ``recipes``. Draws
    are appended to ``cache`` (JSONL) as each sample's are done and read back on a rerun."""
    from stillhouse.teacher.local import LocalTeacher
    from stillhouse.watermark.green import RowWatermark, vocab_hashes
    from stillhouse.watermark.keys import derive_key, key_u64

    tags = [_recipe(teacher_spec, p, sp, k) for p, sp in zip(params, recipes)]
    kept = _read_cache(cache)
    todo = [i for i, (s, t) in enumerate(zip(samples, tags)) if (s.key_id, t) not in kept]
    if todo:
        if cache is not None and cache.exists() and not cache.read_bytes().endswith(b"\n"):
            with open(cache, "a") as f:  # a torn last line (a kill mid-write) ends here, not inside the next one
                f.write("\n")
        teacher = LocalTeacher.from_spec(teacher_spec, max_batch=32)
        try:
            hashes = vocab_hashes(int(teacher.model.get_output_embeddings().weight.shape[0]))
            handles = []
            for i in todo:
                ids = teacher.encode(samples[i].prompt)
                kids = [counterfactual_key_id(samples[i].key_id, j) for j in range(k)]
                handles.append([teacher.submit(ids, recipes[i], index=j, row_processor=RowWatermark(
                    key_u64(derive_key(secret, kid)), params[i], hashes, kid)) for j, kid in enumerate(kids)])
            for n, (i, hs) in enumerate(zip(todo, handles)):
                answers = [served_text(h.future.result().text) for h in hs]
                kept[(samples[i].key_id, tags[i])] = answers
                if cache is not None:  # one line per answer's draws, flushed: a kill loses at most the torn line
                    with open(cache, "a") as f:
                        f.write(json.dumps({"key_id": samples[i].key_id, "recipe": tags[i], "answers": answers})
                                + "\n")
                if progress is not None:
                    progress("teacher draws counterfactual answers", n + 1, len(todo))
        finally:
            teacher.close()
    return [kept[(s.key_id, t)] for s, t in zip(samples, tags)]


def readings(spec: str, samples: Sequence[Sample], answers: Sequence[Sequence[str]], batch_size: int = 8,
             progress: StepProgress | None = None, what: str = "suspect",
             prefix: int = 0) -> list[list[tuple[list[int], AnswerView]]]:
    """Every answer of every sample read by the model ``spec`` (its own tokenizer and chat template) after the
    sample's prompt, teacher-forced: the answer's token ids and the model's :class:`AnswerView` of each; rows read
    shortest first so a batch pads little. ``prefix`` > 0 reads only each answer's first ``prefix`` tokens (a causal
    model's view of them is the same without the rest)."""
    from stillhouse.provenance.gate import answer_views
    from stillhouse.teacher.bundled import load_model
    from stillhouse.teacher.local import encode_chat

    model, tok, _ = load_model(spec)
    rows: list[tuple[list[int], list[int]]] = []
    where: list[tuple[int, int]] = []
    for i, (s, alts) in enumerate(zip(samples, answers)):
        prompt = list(encode_chat(tok, s.prompt))
        for j, text in enumerate(alts):
            ids = list(tok(text, add_special_tokens=False)["input_ids"])
            rows.append((prompt, ids[:prefix] if prefix > 0 else ids))
            where.append((i, j))
    order = sorted(range(len(rows)), key=lambda r: len(rows[r][0]) + len(rows[r][1]))

    def heard(_: str, n: int, total: int) -> None:
        if progress is not None:
            progress(f"{what} reads the answers", n, total)

    views = answer_views(model, [rows[r] for r in order], 1.0, batch_size,
                         tok.pad_token_id if tok.pad_token_id is not None else 0, heard)
    placed = {where[r]: (rows[r][1], v) for r, v in zip(order, views)}
    return [[placed[(i, j)] for j in range(len(alts))] for i, alts in enumerate(answers)]


def log_probs(view: AnswerView) -> list[float]:
    """Each answer token's log p (:data:`TINY_LOG` where the probability underflowed to 0)."""
    return [math.log(q) if q > 0 else TINY_LOG for q in view.prob]


def likelihoods(spec: str, samples: Sequence[Sample], answers: Sequence[Sequence[str]], batch_size: int = 8,
                progress: StepProgress | None = None, what: str = "suspect", prefix: int = 0) -> list[list[float]]:
    """``log p(answer | prompt)`` under the model ``spec`` for every answer of every sample (:func:`readings`).
    ``prefix`` > 0 sums only the answer's first ``prefix`` tokens (the model's own tokens)."""
    return [[sum(log_probs(v)) for _, v in row] for row in readings(spec, samples, answers, batch_size, progress, what,
                                                                    prefix)]


def grams(tok: Any, text: str, n: int = OVERLAP_N) -> set[tuple[int, ...]]:
    """The distinct ``n``-grams of ``text`` in ``tok``'s tokens."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return {tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)}


def holders(sets: Sequence[set[tuple[int, ...]]]) -> Counter[tuple[int, ...]]:
    """How many of ``sets`` (one per candidate) hold each n-gram."""
    return Counter(x for g in sets for x in g)


def overlaps(tok: Any, suspect_answers: Sequence[str], answers: Sequence[Sequence[str]],
             idf: bool = False, n: int = OVERLAP_N) -> list[list[float]]:
    """For each sample, the share of each candidate's distinct ``n``-grams (``tok``'s tokens) found in the suspect's
    answer to its prompt (0 for a candidate shorter than ``n`` tokens). ``idf``: each n-gram weighted by 1 / the
    number of that sample's candidates holding it (the same weights for every candidate, so the score stays
    symmetric in them and the rank uniform under H0)."""
    out = []
    for mine, alts in zip(suspect_answers, answers):
        have = grams(tok, mine, n)
        held = [grams(tok, a, n) for a in alts]
        df = holders(held)
        weight = (lambda x: 1.0 / df[x]) if idf else (lambda x: 1.0)
        out.append([sum(map(weight, g & have)) / sum(map(weight, g)) if g else 0.0 for g in held])
    return out


def rank(scores: Sequence[float], key_id: str) -> int:
    """Our answer's (``scores[0]``) rank among all, 1 = highest; ties broken by a coin seeded from ``key_id`` (not
    from anything the suspect says), which keeps the rank uniform under H0."""
    ties = sum(x == scores[0] for x in scores[1:])
    coin = random.Random(hashlib.sha256(key_id.encode()).digest())
    return 1 + sum(x > scores[0] for x in scores[1:]) + coin.randint(0, ties)


def hypotheses(samples: Sequence[Sample], ranks: Sequence[int], k: int,
               groups: Sequence[tuple[str, str, tuple[str, ...]]] = ()) -> list[tuple[Hypothesis, float]]:
    """Every account, and each ``(name, kind, accounts)`` group, with its Holm-adjusted p-value (over all of them),
    smallest p first."""
    by: dict[str, list[int]] = {}
    for s, r in zip(samples, ranks):
        by.setdefault(subject(s), []).append(r)
    hyps = [Hypothesis(a, "account", (a,), tuple(rs), k) for a, rs in sorted(by.items())]
    for name, kind, members in groups:
        rs = tuple(r for a in members for r in by.get(a, []))
        hyps.append(Hypothesis(name, kind, tuple(members), rs, k))
    adjusted = holm([math.exp(h.log_p) for h in hyps])
    return sorted(zip(hyps, adjusted), key=lambda x: (x[0].log_p, x[0].name))
