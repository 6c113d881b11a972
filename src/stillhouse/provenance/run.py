"""``provenance text`` and ``provenance model`` as library calls: configs in, a JSON-ready report out.

Both take the candidate keys (key ids from the guard's log, or given) and the scheme's parameters,
and answer with every key's exact p-value, Holm- and Bonferroni-adjusted over the keys tried,
best first, plus the accounts behind the best key when the ids came from a log.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from stillhouse.provenance.candidates import Candidate, derive_all, from_ids, from_log
from stillhouse.provenance.detect import (
    GREEDY_TEMPERATURE,
    KeyScore,
    Selection,
    Tuple,
    exp_keep,
    prompt_tuples,
    score_keys,
    select,
    weight_levels,
)
from stillhouse.provenance.gate import gate_masks
from stillhouse.provenance.texts import Sample, load_samples
from stillhouse.watermark.green import DEFAULT_PARAMS, WatermarkParams
from stillhouse.watermark.keys import SECRET_ENV, WatermarkKeyError, load_secret

if TYPE_CHECKING:
    from stillhouse.progress import StepProgress

Mode = Literal["auto", "open", "closed"]


@dataclass(frozen=True)
class ScoringConfig:
    """What ``provenance text`` and ``provenance model`` share: the source, the candidate keys, the scheme."""

    source: str
    """Text to test: a text file, a JSONL dataset (rows with messages or text), a harvest run directory, or a
    guard's traffic log (sqlite:///guard.db, postgresql://...: the watermarked answers it served, with prompts)."""
    account: str = ""
    """With a guard's log as SOURCE: that account's requests alone (e.g. a suspect account's questions)."""
    log: str = ""
    """The guard's traffic log (sqlite:///guard.db or postgresql://...): every watermark key id in it is a candidate."""
    key_ids: tuple[str, ...] = ()
    """Candidate key ids (account/ID/EPOCH, cluster/ID/EPOCH, server/NAME/EPOCH), besides those of --log."""
    secret_env: str = SECRET_ENV
    """Environment variable holding the watermark secret shared with the guard and serve."""
    tokenizer: str = "bundled"
    """The watermarking teacher (bundled, hf:DIR, gguf:FILE): its tokenizer's ids are what the green lists are over."""
    gamma: float = DEFAULT_PARAMS.gamma
    """Green share used when generating (as served: --watermark-gamma)."""
    context: int = DEFAULT_PARAMS.context
    """Context window used when generating (as served: --watermark-context)."""
    entropy: float | None = None
    """Entropy gate used when generating (as served: --watermark-entropy; the counterfactual test draws with it), in
    nats: only tokens where the teacher's next-token entropy is above it are scored, the teacher (--tokenizer)
    recomputing them from each answer and its prompt; 0 = score every token. Unset (none): serve's default, 2.0
    (with delta 1.5 it kept the teacher's accuracy, docs/results.md), for answers (text; model --reading own or
    closed); no gate for model --reading text."""
    limit: int = 0
    """Test at most this many samples of the source (0 = all)."""
    max_tokens: int = 0
    """Score at most this many leading tokens of each sample (0 = all)."""
    dedup: bool = True
    """Score each distinct (window, token) tuple once. Turning it off makes p-values invalid (for demonstration only)."""
    alpha: float = 1e-3
    """Family-wise level at which a key is named as the source (Holm-adjusted p below this)."""
    score: Literal["weighted", "count"] | None = None
    """weighted: each scored answer token weighted by the evidence it can carry, from the probability the teacher
    (--tokenizer) gave it (a token it would have written anyway says little; one written against the odds, much),
    the p-value the exact tail of the weighted sum (docs/results.md: 78/96 answers at p < 1e-5 within 200 tokens
    against 71/96 counted; a student of 100% watermarked data 1e-17 against 1e-12); count: every scored token counts
    1, the binomial test. Unset (none): weighted for answers (text; model --reading own or closed), count for model
    --reading text (it scores predictions, not answers)."""
    delta: float = DEFAULT_PARAMS.delta
    """Delta used when generating (as served: --watermark-delta); the weighted score's weights depend on it."""
    scheme: Literal["kgw", "exp"] = DEFAULT_PARAMS.scheme  # type: ignore[assignment]
    """Scheme used when generating (as served: --watermark-scheme), for answers whose source does not record it (a
    guard's log records each answer's, as its upstream confirmed it). exp: text answers sampled at a temperature above 0
    take the EXP test (the Gamma tail of sum -log u; their temperature from the source, else --temperature), greedy
    ones the green-list test; a suspect's answers (model --reading own, closed) all take the EXP test (a student of
    EXP-sampled answers writes their small-u tokens again); reading text is always counted. kgw: the green-list test
    for everything. Either test is exact on any text; the wrong one only costs power."""

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("source: give a text file, a JSONL dataset or a harvest run directory")
        WatermarkParams(gamma=self.gamma, context=self.context,  # raises naming the field
                        entropy=DEFAULT_PARAMS.entropy if self.entropy is None else self.entropy)
        if self.limit < 0 or self.max_tokens < 0:
            raise ValueError("limit and max_tokens must be >= 0 (0 = no limit)")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha={self.alpha}: must be in (0, 1), e.g. 1e-3")
        if not self.log and not self.key_ids and self.needs_candidates:
            raise ValueError("no candidate keys: give --log sqlite:///guard.db (its key ids) or --key-ids ID,...")
        if self.score not in (None, "weighted", "count"):
            raise ValueError(f"score={self.score!r}: use weighted (the default for answers) or count")
        WatermarkParams(delta=self.delta, scheme=self.scheme)  # raises naming the field

    @property
    def needs_candidates(self) -> bool:
        """Whether the test tries candidate keys (every test but the counterfactual one, which reads each answer's
        own key id from the source)."""
        return True

    def _check_weights(self) -> None:
        """The weighted score needs a delta (each subclass calls this once its own fields are checked)."""
        if self.weighted and self.delta <= 0:
            raise ValueError("delta=0: the weighted score needs the delta the answers were generated with "
                             "(serve's --watermark-delta), or use --score count")

    @property
    def gate(self) -> float:
        """The entropy gate the test applies: ``entropy``, or the scheme's default when it is unset.

        Which tokens it keeps depends on the text and the teacher alone, never on a key, so the test stays exact."""
        return DEFAULT_PARAMS.entropy if self.entropy is None else self.entropy

    @property
    def weighted(self) -> bool:
        """Whether the weighted score applies: ``score``, or by default for answers."""
        return self.score == "weighted" or self.score is None

    @property
    def params(self) -> WatermarkParams:
        return WatermarkParams(gamma=self.gamma, delta=self.delta, context=self.context, entropy=self.gate,
                               scheme=self.scheme)


@dataclass(frozen=True)
class ProvenanceConfig(ScoringConfig):
    """What ``stillhouse provenance text`` tests, against which keys, with which score."""

    temperature: float = 1.0
    """Temperature the answers were sampled at, for answers whose source does not say (a guard's log and a harvest
    run record each request's; a JSONL row may carry 'temperature'): the weighted score's weights use it, greedy
    (0) weighed as at 0.1. 1 = the API's default. A wrong value costs power, never validity."""
    per_sample: bool = False
    """Also test each sample alone (its own tuples, its own prompt dropped, Holm over the keys): the report's
    ``per_sample`` lists one report per sample with text, ``sample`` its row in the source."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.temperature <= 10.0:
            raise ValueError(f"temperature={self.temperature}: the answers' sampling temperature, in [0, 10] "
                             "(0 = greedy; 1 if unknown)")
        self._check_weights()


@dataclass(frozen=True)
class SuspectConfig(ScoringConfig):
    """What ``stillhouse provenance model`` tests: a suspect model, reading or answering ``source``."""

    suspect: str = ""
    """The suspect: a local model (bundled, hf:DIR, gguf:FILE) tested open-weight, or an OpenAI-compatible
    URL (http://HOST:PORT/v1[#MODEL]) tested closed."""
    mode: Mode = "auto"
    """open = score the suspect's own next-token predictions while it reads source; closed = score its answers
    to source's prompts; auto = open for a local model, closed for a URL."""
    reading: Literal["text", "own"] = "text"
    """Open mode: what the suspect reads. text = SOURCE's texts (prompt plus answer), its top-1 prediction at
    each position scored; own = its own greedy answers to SOURCE's prompts (at most --answer-tokens each),
    written on this machine, every token scored. Use own with the prompts our watermarked answers went to
    (the suspect accounts' prompts in the guard's log): a student that learned those answers writes them again."""
    reading_max_len: int = 256
    """Open mode, reading=text: tokens per text read (prompt plus answer)."""
    batch_size: int = 8
    """Open mode: texts per forward pass."""
    answer_tokens: int = 128
    """Closed mode, and open mode with reading=own: max_tokens of each answer."""
    temperature: float = 0.0
    """Closed mode: sampling temperature of the answers. 0 (greedy, as the open test's own answers): a student
    writes the answers it learned again along its most likely path, and sampling spreads it away from them (a 5%
    student of docs/results.md: p = 4.6e-4 greedy over HTTP, 0.45 at 0.7). The test is exact at any temperature."""
    concurrency: int = 32
    """Closed mode: requests in flight, shared by every answer asked (the --temperature one and --sampled-answers
    per prompt), so a few prompts asked five times fill a batch (`stillhouse serve` batches up to 32 rows). Lower it
    for an API that limits concurrent requests (a 429 stops the test with the server's message)."""
    request_timeout: float = 600.0
    """Closed mode: seconds to wait for one answer before the test stops with the server named (a suspect on a
    busy CPU answering --concurrency requests at once can take minutes)."""
    sampled_answers: int | None = None
    """Closed mode with --test counterfactual: also this many answers per prompt sampled at T 0.7 (seeds 1000 j + i),
    pooled with the --temperature one (their 4-grams together); None = 4 there (0 elsewhere). Chosen on two
    development students (greedy alone 3.8e-7 and 6.1e-3, with 4 sampled 3.2e-9 and 5.7e-5); on two fresh 5% students,
    greedy + 4 sampled gave 1.2e-10 and 7.5e-6 (docs/results.md). 0 keeps the one answer. A few answers per account
    need more: at 1% (6 answers) 64 with --overlap idf gave 8.4e-5 and 8.0e-3 on two fresh students, where 4 gave
    0.091 and 0.037 on two others (about 12 minutes a student served on one thread)."""
    threads: int = 0
    """torch CPU threads (0 = torch's default)."""
    match_keys: bool = False
    """With a guard's log as SOURCE (--reading own, or closed): test each key only on the suspect's answers to
    the prompts that key answered (the log says which), not on every answer; still exact (provenance/matched.py)."""
    groups: tuple[str, ...] = ()
    """With --match-keys: accounts to test together as one hypothesis, comma-separated, repeatable (--group
    camp-0,camp-1): each member's answers scored under the key that answered it, pooled, one exact test."""
    cluster_groups: bool = True
    """With --match-keys (or --test counterfactual): also test, as a group, each cluster of two or more accounts
    that the guard's detector linked in the log (its account_stats) and that asked in SOURCE."""
    test: Literal["tuples", "counterfactual"] = "tuples"
    """tuples: score the suspect's tuples for the candidate keys' green lists (everything above). counterfactual:
    rank each of SOURCE's answers among K answers the teacher (--tokenizer) draws again for its prompt under other
    keys, by how much the suspect prefers it (reading text: its log-likelihood over the reference's; its own
    answers, closed or --reading own: their 4-gram overlap); the exact tail of the ranks' sum per account, Holm over
    accounts and groups (provenance/counterfactual.py). Needs a key per request (the guard's
    --watermark-per-request) and the teacher's weights; no candidate keys."""
    counterfactuals: int = 9
    """--test counterfactual: answers drawn per answer of SOURCE (K); n answers can reach p = (K + 1)^-n at best."""
    reference: str = ""
    """--test counterfactual, reading text: the score is log p_suspect - log p_reference; empty = the teacher
    (--tokenizer), none = the suspect's raw log-likelihood."""
    overlap: Literal["share", "idf"] = "share"
    """--test counterfactual, the suspect's own answers (closed, or --reading own): share = the share of a
    candidate's distinct 4-grams found in them; idf = each 4-gram weighted by 1 / the number of the K + 1
    candidates that hold it, so the words every candidate shares (the prompt's own, the teacher's set phrases) count
    little and a candidate's own turns count most. On three 1% development students with 64 sampled answers: idf
    4.6e-4, 2.8e-5, 4.6e-4 against share 9.2e-4, 2.1e-4, 4.6e-4 (docs/results.md)."""
    prefix_tokens: int | None = None
    """--test counterfactual, reading text: score only each answer's first N tokens (each model's own tokens), 0 =
    all; None = 64 there. A student remembers an answer's opening best (training cuts long rows at its max length,
    and a repetition loop late in an answer, which the reference likes, no longer outweighs it). Chosen at 64 on
    four students whose figures had been read (a 1% student 8.0e-3 -> 1e-6, 5% 3.5e-24 -> 1e-32); on six fresh
    students as strong or stronger (two 5%: 3.3e-31 -> 1e-32 and 1e-32; four 1%: 1e-6 under both). As the default:
    two fresh 1% students 1e-6 and 1e-6; eight clean models in 25 tests none below 1e-3, smallest 0.0061
    (docs/results.md)."""
    cache: str = ""
    """--test counterfactual: a JSONL file that keeps the drawn answers (they depend on the teacher, the recipe and
    the secret, never on the suspect) and gives them back to the next run; empty = draw every time."""
    default_max_tokens: int = 512
    """--test counterfactual: max_tokens of answers whose request gave none (serve's --default-max-tokens)."""

    @property
    def needs_candidates(self) -> bool:
        return self.test != "counterfactual"

    def __post_init__(self) -> None:
        super().__post_init__()
        from stillhouse.guard.detect.logwindow import is_store_url
        from stillhouse.provenance.matched import operator_groups
        from stillhouse.teacher.spec import parse_spec

        if not self.suspect:
            raise ValueError("suspect: give a local model (hf:DIR, bundled, gguf:FILE) or a URL http://HOST:PORT/v1")
        spec = parse_spec(self.suspect)  # raises listing the accepted forms
        if self.mode == "open" and not spec.is_local:
            raise ValueError(f"mode=open needs the suspect's weights; {self.suspect!r} is not local (use mode=closed)")
        if self.reading not in ("text", "own"):
            raise ValueError(f"reading={self.reading!r}: use text (read SOURCE's texts) or own (answer its prompts)")
        if self.mode == "closed" and spec.kind != "http":
            raise ValueError(f"mode=closed needs an OpenAI-compatible URL; serve {self.suspect!r} with "
                             "`stillhouse serve --teacher ...` and give its http://HOST:PORT/v1")
        if self.entropy and self.reads_text and self.test == "tuples":
            raise ValueError(f"entropy={self.entropy:g}: the gate scores answer text (--reading own, or closed mode); "
                             "reading SOURCE's texts scores every prediction, so leave --entropy out (or give 0)")
        if self.score == "weighted" and self.reads_text:
            raise ValueError("score=weighted weighs answer tokens (--reading own, or closed mode); reading SOURCE's "
                             "texts scores predictions, so leave --score out (or give count)")
        for name in ("reading_max_len", "batch_size", "answer_tokens", "concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if not self.request_timeout > 0:
            raise ValueError(f"request_timeout={self.request_timeout}: must be > 0 seconds")
        if self.sampled_answers is not None and self.sampled_answers < 0:
            raise ValueError(f"sampled_answers={self.sampled_answers}: must be >= 0 (0 = the one answer)")
        if self.test not in ("tuples", "counterfactual"):
            raise ValueError(f"test={self.test!r}: use tuples (the green-list tests) or counterfactual")
        if self.test == "counterfactual":
            if self.counterfactuals < 1:
                raise ValueError(f"counterfactuals={self.counterfactuals}: draw at least 1 answer per answer (9 "
                                 "gives p = 10^-n for n answers all ranked first)")
            if self.default_max_tokens < 1:
                raise ValueError(f"default_max_tokens={self.default_max_tokens}: must be >= 1")
            if self.match_keys:
                raise ValueError("match_keys: the counterfactual test already reads each answer's own key; drop it")
            if self.reference not in ("", "none"):
                parse_spec(self.reference)  # raises listing the accepted forms
            if self.prefix_tokens is not None and self.prefix_tokens < 0:
                raise ValueError(f"prefix_tokens={self.prefix_tokens}: must be >= 0 (0 = every token)")
            if self.prefix_tokens and not self.reads_text:
                raise ValueError(f"prefix_tokens={self.prefix_tokens}: applies to the likelihood score (the suspect "
                                 "reading SOURCE's texts, open mode); drop it for --reading own or closed")
            if self.overlap not in ("share", "idf"):
                raise ValueError(f"overlap={self.overlap!r}: use share or idf")
            if self.overlap != "share" and self.reads_text:
                raise ValueError(f"overlap={self.overlap}: weighs the suspect's own answers (closed, or --reading "
                                 "own); reading SOURCE's texts scores likelihoods, so drop --overlap")
            if self.sampled_answers and self.resolved_mode != "closed":
                raise ValueError(f"sampled_answers={self.sampled_answers}: pools answers a closed suspect writes; give "
                                 "--mode closed with an http://HOST:PORT/v1 suspect, or drop it")
            if self.cache and Path(self.cache).is_dir():
                raise ValueError(f"cache={self.cache!r} is a directory: give a JSONL file in it, such as "
                                 f"{Path(self.cache) / 'counterfactuals.jsonl'}")
            if self.cache and not Path(self.cache).parent.is_dir():
                raise ValueError(f"cache={self.cache!r}: its directory {Path(self.cache).parent} does not exist; "
                                 "create it first or give a file in an existing one")
        elif self.cache:
            raise ValueError("cache keeps the counterfactual test's drawn answers; add --test counterfactual or drop it")
        elif self.prefix_tokens:
            raise ValueError("prefix_tokens applies to --test counterfactual's likelihood score; add it or drop "
                             "--prefix-tokens")
        elif self.overlap != "share":
            raise ValueError(f"overlap={self.overlap}: a score of --test counterfactual; add it or drop --overlap")
        elif self.sampled_answers:
            raise ValueError("sampled_answers pools a closed suspect's answers for --test counterfactual; add it or "
                             "drop --sampled-answers")
        elif self.groups and not self.match_keys:
            raise ValueError(f"groups={list(self.groups)}: a group is scored on the keys that answered its accounts; "
                             "add --match-keys (with the guard's log as SOURCE)")
        if self.match_keys:
            if not is_store_url(self.source):
                raise ValueError(f"match_keys: {self.source!r} is not a guard log, and only the log knows which key "
                                 "answered each prompt; give it as SOURCE (sqlite:///guard.db or postgresql://...) "
                                 "or drop --match-keys")
            if self.resolved_mode == "open" and self.reading != "own":
                raise ValueError("match_keys scores the suspect's answers: use --reading own (or closed mode)")
            operator_groups(self.groups)  # raises naming a malformed group
        self._check_weights()

    @property
    def resolved_mode(self) -> Literal["open", "closed"]:
        from stillhouse.teacher.spec import parse_spec

        if self.mode != "auto":
            return self.mode
        return "open" if parse_spec(self.suspect).is_local else "closed"

    @property
    def pooled_answers(self) -> int:
        """The answers sampled per prompt besides the first (--sampled-answers, resolved): 4 for a closed suspect
        under --test counterfactual unless given, else 0."""
        if self.sampled_answers is not None:
            return self.sampled_answers
        return 4 if self.test == "counterfactual" and self.resolved_mode == "closed" else 0

    @property
    def scored_prefix(self) -> int:
        """The tokens of each answer the likelihood score reads (--prefix-tokens, resolved): 64 when the suspect
        reads SOURCE's texts under --test counterfactual unless given, else 0 (every token)."""
        if self.prefix_tokens is not None:
            return self.prefix_tokens
        return 64 if self.test == "counterfactual" and self.reads_text else 0

    @property
    def reads_text(self) -> bool:
        """Open mode reading SOURCE's texts: the suspect's predictions are scored, never answer text."""
        return self.resolved_mode == "open" and self.reading == "text"

    @property
    def gate(self) -> float:
        """As :attr:`ScoringConfig.gate`, but no gate by default when the suspect reads SOURCE's texts."""
        return 0.0 if self.entropy is None and self.reads_text else super().gate

    @property
    def weighted(self) -> bool:
        """As :attr:`ScoringConfig.weighted`, but never when the suspect reads SOURCE's texts."""
        return super().weighted and not self.reads_text


def candidates_for(cfg: ScoringConfig) -> list[Candidate]:
    found = from_log(cfg.log) if cfg.log else []
    if cfg.log and not found and not cfg.key_ids:
        raise WatermarkKeyError(f"{cfg.log}: the log records no watermark key id (its guard ran without --watermark, "
                                "or the log predates key ids): give the keys to try with --key-ids account/ID/EPOCH,...")
    known = {c.key_id for c in found}
    return found + [c for c in from_ids(cfg.key_ids) if c.key_id not in known] if cfg.key_ids else found


def _tokenizer(spec: str) -> Any:
    from transformers import AutoTokenizer

    from stillhouse.teacher.bundled import resolve_model_dir

    path, _, _ = resolve_model_dir(spec)
    return AutoTokenizer.from_pretrained(str(path))


def _report(cfg: ScoringConfig, scores: list[KeyScore], candidates: list[Candidate], extra: dict[str, Any]
            ) -> dict[str, Any]:
    accounts = {c.key_id: sorted(c.accounts) for c in candidates}
    best = scores[0] if scores else None
    named = best is not None and best.p_holm < cfg.alpha
    test = scores[0].test if scores else "weighted" if cfg.weighted else "binomial"
    return {
        **extra,
        "keys_tried": len(scores),
        "params": {"gamma": cfg.gamma, "context": cfg.context, "entropy": cfg.gate, "delta": cfg.delta,
                   "scheme": cfg.scheme},
        "test": test,
        "best": best.to_json() | {"accounts": accounts.get(best.key_id, [])} if best else None,
        "named": named,
        "verdict": (f"{best.key_id} (accounts {', '.join(accounts.get(best.key_id, [])) or '-'}): Holm-adjusted "
                    f"p = {best.p_holm:.3g} over {len(scores)} keys, {test} test" if best and named else
                    f"no key at family-wise level {cfg.alpha:g} (smallest Holm-adjusted p "
                    f"{best.p_holm if best else 1.0:.3g} over {len(scores)} keys, {test} test)"),
        "scores": [s.to_json() | {"accounts": accounts.get(s.key_id, [])} for s in scores],
    }


def _ids(tok: Any, samples: list[Sample], max_tokens: int) -> list[list[int]]:
    """Each sample's token ids (as generated when the source kept them, else tokenized again)."""
    return [list(s.token_ids if s.token_ids is not None else tok(s.text, add_special_tokens=False)["input_ids"])
            [: max_tokens or None] for s in samples]


def text_provenance(cfg: ProvenanceConfig, progress: StepProgress | None = None) -> dict[str, Any]:
    """``provenance text``: which candidate key, if any, the source's text carries (``progress`` hears of the
    teacher's pass over the answers)."""
    t0 = time.perf_counter()
    secret = load_secret(cfg.secret_env)
    candidates = candidates_for(cfg)
    loaded = load_samples(cfg.source, cfg.limit, cfg.account)
    rows = [i for i, s in enumerate(loaded) if s.text]
    samples = [loaded[i] for i in rows]
    tok = _tokenizer(cfg.tokenizer)
    seqs = _ids(tok, samples, cfg.max_tokens)
    prompts = [_prompt_ids(tok, s) if s.prompt else [] for s in samples]
    extra: dict[str, Any] = {"source": cfg.source, "samples": len(samples), "empty": len(loaded) - len(samples),
                             "tokens": sum(map(len, seqs))}
    temps = [cfg.temperature if s.temperature is None else s.temperature for s in samples]  # the source's, if it says
    exp = [sch == "exp" and t > 0 for sch, t in zip(_schemes(cfg, samples, extra), temps)]
    keep, levels = _read(cfg, tok, samples, seqs, extra, temps, progress, exp)
    keys = derive_all(secret, candidates)
    if any(exp):
        extra["exp_samples"] = sum(exp)

    def scored(idx: list[int]) -> Selection:
        """The distinct tuples of samples ``idx``, their prompts' tuples dropped (and their weight levels)."""
        return select(seqs, idx, cfg.context, prompt_tuples([prompts[j] for j in idx], cfg.context), cfg.dedup,
                      keep, levels, exp)

    if per_request(candidates):
        return _text_per_request(cfg, samples, seqs, prompts, keep, levels, exp, keys, extra, t0)
    sel = scored(list(range(len(seqs))))
    scores = score_keys(sel.tuples, keys, cfg.params, sel.levels, sel.exp)
    if cfg.per_sample:  # the same tuples as a one-row source would give
        extra["per_sample"] = []
        for j, ids in enumerate(seqs):
            own = scored([j])
            extra["per_sample"].append(_report(cfg, score_keys(own.tuples, keys, cfg.params, own.levels, own.exp),
                                               candidates,
                                               {"sample": rows[j], "tokens": len(ids), "scored": len(own.tuples)}))
    return _report(cfg, scores, candidates, extra | {"scored": len(sel.tuples),
                                                     "wall_s": round(time.perf_counter() - t0, 2)})


def per_request(candidates: list[Candidate]) -> bool:
    """Whether the candidate keys are keys per request (the guard's --watermark-per-request): each answered one
    request, so no single key covers an account's text."""
    from stillhouse.watermark.keys import KeyId

    def has_request(kid: str) -> bool:
        try:
            return bool(KeyId.parse(kid).request)
        except WatermarkKeyError:
            return False

    return any(has_request(c.key_id) for c in candidates)


def _text_per_request(cfg: ProvenanceConfig, samples: list[Sample], seqs: list[list[int]],
                      prompts: list[list[int]], keep: list[list[bool]] | None, levels: list[list[int]] | None,
                      exp: list[bool], keys: dict[str, int], extra: dict[str, Any], t0: float) -> dict[str, Any]:
    """Keys per request: each account is one hypothesis, and each text is scored under the key of that account's
    logged request it answers (the same answer text, else the same prompt; a text none of its requests answers is
    not scored for it), pooled (:func:`~stillhouse.provenance.matched.pooled_parts`; exact for the reason given
    there: which key a text is scored under depends on the log and the text, never on a key's green lists). A
    prompt two accounts both asked is scored for each under its own key. Holm over the accounts."""
    import json

    from stillhouse.provenance.detect import adjust
    from stillhouse.provenance.matched import pooled_parts, score_pooled

    if not cfg.log:
        raise WatermarkKeyError("the candidate keys are keys per request: give the guard's log with --log, so each "
                                "text can be matched to the request that answered it")
    by_prompt: dict[str, dict[str, list[Sample]]] = {}
    by_text: dict[str, dict[str, str]] = {}
    for rec in load_samples(cfg.log):
        by_prompt.setdefault(rec.account, {}).setdefault(json.dumps(rec.prompt, sort_keys=True), []).append(rec)
        by_text.setdefault(rec.account, {}).setdefault(rec.text, rec.key_id)

    def key_for(account: str, s: Sample) -> str:
        if s.key_id:  # the log itself as the source: its own key, for its own account only
            return s.key_id if s.account == account else ""
        asked = by_prompt[account].get(json.dumps(s.prompt, sort_keys=True), []) if s.prompt else []
        same = by_text[account].get(s.text, "")
        return same or next((r.key_id for r in asked if r.text == s.text), asked[0].key_id if asked else "")

    exclude = prompt_tuples(prompts, cfg.context)
    scores, used, matched = [], [], set()
    for account in sorted(by_prompt):
        kids = [key_for(account, s) for s in samples]
        if not any(kids):
            continue
        matched |= {j for j, k in enumerate(kids) if k}
        parts = pooled_parts(seqs, kids, [account if k else "" for k in kids], [account], cfg.context, exclude,
                             cfg.dedup, keep, levels, exp)
        scores.append(score_pooled(parts, keys, cfg.params, f"account:{account}"))
        used.append(Candidate(f"account:{account}", {account}, sum(map(bool, kids))))
    adjust(scores)
    scores.sort(key=lambda s: (s.p, -s.rate, s.key_id))
    extra.update(keys="per request", matched=len(matched), unmatched=len(samples) - len(matched),
                 scored=sum(s.scored for s in scores), wall_s=round(time.perf_counter() - t0, 2))
    return _report(cfg, scores, used, extra)


def _schemes(cfg: ScoringConfig, samples: list[Sample], extra: dict[str, Any]) -> list[str]:
    """Each sample's watermark scheme: the one its source recorded, else ``cfg.scheme``; the recorded ones are
    counted into ``extra`` (``schemes_recorded``)."""
    recorded = Counter(s.scheme for s in samples if s.scheme)
    if recorded:
        extra["schemes_recorded"] = dict(sorted(recorded.items()))
    return [s.scheme or cfg.scheme for s in samples]


def _read(cfg: ScoringConfig, tok: Any, samples: list[Sample], seqs: list[list[int]], extra: dict[str, Any],
          temperatures: list[float] | None = None, progress: StepProgress | None = None,
          exp: list[bool] | None = None) -> tuple[list[list[bool]] | None, list[list[int]] | None]:
    """The teacher (``cfg.tokenizer``) reads each prompt (as served) and answer, when the gate, the weighted score or
    the EXP test needs it: which tokens the gate lets through (None without a gate; ``extra["gated_tokens"]`` counts
    them; an answer flagged in ``exp`` keeps :func:`~stillhouse.provenance.detect.exp_keep`'s tokens), and each
    token's weight level at its answer's sampling temperature (``temperatures``, one per answer, 1 when not given;
    greedy as :data:`GREEDY_TEMPERATURE`), None for the count."""
    exp = exp or [False] * len(seqs)
    if cfg.gate <= 0 and not cfg.weighted and not any(exp):
        return None, None
    from stillhouse.provenance.gate import answer_views
    from stillhouse.teacher.bundled import load_model
    from stillhouse.teacher.local import encode_chat

    model, _, _ = load_model(cfg.tokenizer)
    rows = [(encode_chat(tok, s.prompt) if s.prompt else [], ids) for s, ids in zip(samples, seqs)]
    temps = [max(t, GREEDY_TEMPERATURE) for t in (temperatures or [1.0] * len(seqs))]
    views = answer_views(model, rows, temps, pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
                         progress=progress)
    keep = None
    if cfg.gate > 0 or any(exp):
        keep = gate_masks(views, cfg.gate)
        keep = [exp_keep(ids, v.prob, cfg.context) if e else k for ids, v, k, e in zip(seqs, views, keep, exp)]
        extra["gated_tokens"] = sum(map(sum, keep))
    levels = None
    if cfg.weighted:
        levels = [weight_levels(v.prob, cfg.delta / t, cfg.gamma) for v, t in zip(views, temps)]
        extra["weight_temperatures"] = sorted(set(temps))
    return keep, levels


def _prompt_ids(tok: Any, s: Sample) -> list[int]:
    return list(tok("\n".join(str(m.get("content", "")) for m in s.prompt), add_special_tokens=False)["input_ids"])


def model_provenance(cfg: SuspectConfig, progress: StepProgress | None = None) -> dict[str, Any]:
    """``provenance model``: the radioactivity test, open-weight or closed (``progress`` hears of the suspect's
    answers and the teacher's pass over them)."""
    from stillhouse.provenance.radioactive import (
        check_same_tokenizer,
        closed_texts,
        own_answers,
        reading_inputs,
        reading_tuples,
    )

    t0 = time.perf_counter()
    secret = load_secret(cfg.secret_env)
    if cfg.test == "counterfactual":
        return _counterfactual(cfg, load_samples(cfg.source, cfg.limit, cfg.account), secret, progress, t0)
    candidates = candidates_for(cfg)
    if per_request(candidates) and not cfg.match_keys:
        raise WatermarkKeyError("the candidate keys are keys per request (the guard ran with --watermark-per-request), "
                                "so no one key covers an account's answers: use --test counterfactual, or the log as "
                                "SOURCE with --reading own --match-keys --group ACCOUNT")
    samples = load_samples(cfg.source, cfg.limit, cfg.account)
    tok = _tokenizer(cfg.tokenizer)
    mode = cfg.resolved_mode
    extra: dict[str, Any] = {"suspect": cfg.suspect, "mode": mode, "source": cfg.source}
    asked = [s for s in samples if s.prompt]
    if mode == "open":
        import torch

        from stillhouse.teacher.bundled import load_model

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        model, stok, revision = load_model(cfg.suspect)
        check_same_tokenizer(stok, tok)
        extra.update(revision=revision, reading=cfg.reading)
        if cfg.reading == "text":
            inputs = reading_inputs(tok, samples, cfg.reading_max_len)
            tuples, counts = reading_tuples(model, inputs, cfg.context, cfg.batch_size,
                                            tok.pad_token_id if tok.pad_token_id is not None else 0)
            extra.update(texts_read=len(inputs), **counts)
            return _scored(cfg, Selection(tuples), secret, candidates, extra, t0)
        prompts, seqs = own_answers(model, stok, samples, cfg.answer_tokens, progress=progress)
    else:
        from dataclasses import replace

        answers = asyncio.run(closed_texts(cfg.suspect, samples, cfg.answer_tokens, [(cfg.temperature, 0)],
                                           cfg.concurrency, cfg.request_timeout))[0]
        seqs = _ids(tok, [replace(s, text=a, token_ids=None) for s, a in zip(asked, answers)], 0)
        prompts = [_prompt_ids(tok, s) for s in asked]
    # the suspect's answers to the prompts asked: scored as answers (gate, weights, EXP), the prompts' tuples dropped
    extra.update(answers=len(seqs), tokens=sum(map(len, seqs)))
    exp = [sch == "exp" for sch in _schemes(cfg, asked, extra)]
    keep, levels = _read(cfg, tok, asked, seqs, extra, progress=progress, exp=exp)
    exclude = prompt_tuples(prompts, cfg.context)
    if cfg.match_keys:
        return _matched(cfg, asked, seqs, exclude, keep, levels, exp, secret, candidates, extra, t0)
    sel = select(seqs, range(len(seqs)), cfg.context, exclude, cfg.dedup, keep, levels, exp)
    return _scored(cfg, sel, secret, candidates, extra, t0)


def _scored(cfg: SuspectConfig, sel: Selection, secret: bytes, candidates: list[Candidate], extra: dict[str, Any],
            t0: float) -> dict[str, Any]:
    """Every candidate key on the selected tuples: the report."""
    scores = score_keys(sel.tuples, derive_all(secret, candidates), cfg.params, sel.levels, sel.exp)
    extra.update(scored=len(sel.tuples), wall_s=round(time.perf_counter() - t0, 2))
    return _report(cfg, scores, candidates, extra)


def _matched(cfg: SuspectConfig, asked: list[Sample], seqs: list[list[int]], exclude: set[Tuple],
             keep: list[list[bool]] | None, levels: list[list[int]] | None, exp: list[bool], secret: bytes,
             candidates: list[Candidate], extra: dict[str, Any], t0: float) -> dict[str, Any]:
    """--match-keys: each candidate key on the answers to its own prompts, each group pooled over its members'
    answers under their keys; Holm over keys and groups together (provenance/matched.py)."""
    from stillhouse.provenance.candidates import clusters_from_log
    from stillhouse.provenance.detect import adjust
    from stillhouse.provenance.matched import (
        Group,
        check_groups,
        matched_tuples,
        operator_groups,
        pooled_parts,
        score_pooled,
    )

    key_ids = [s.key_id for s in asked]
    accounts = [s.account for s in asked]
    groups = operator_groups(cfg.groups)
    check_groups(groups, accounts)
    if cfg.cluster_groups:
        asked_by = set(accounts)
        for cid, members in clusters_from_log(cfg.source).items():
            present = tuple(a for a in members if a in asked_by)
            if len(present) >= 2:
                groups.append(Group(f"cluster:{cid}", present, "cluster"))
    keys = derive_all(secret, [*candidates, *(Candidate(k) for k in sorted(set(key_ids)))])
    per_key = matched_tuples(seqs, key_ids, cfg.context, exclude, dedup=cfg.dedup, keep=keep, levels=levels, exp=exp)
    nothing = Selection([], None if levels is None else [])
    key_scores = [score_pooled({c.key_id: per_key.get(c.key_id, nothing)}, keys, cfg.params, c.key_id)
                  for c in candidates]
    parts = [pooled_parts(seqs, key_ids, accounts, g.accounts, cfg.context, exclude, dedup=cfg.dedup, keep=keep,
                          levels=levels, exp=exp) for g in groups]
    group_scores = [score_pooled(p, keys, cfg.params, g.name) for g, p in zip(groups, parts)]
    adjust([*key_scores, *group_scores])
    report = _report(cfg, sorted(key_scores, key=lambda s: (s.p, -s.rate, s.key_id)), candidates, extra)
    report["groups"] = sorted(({**s.to_json(), "name": g.name, "accounts": list(g.accounts), "given_by": g.given_by,
                                "keys": sorted(p)} for g, p, s in zip(groups, parts, group_scores)),
                              key=lambda r: (r["p"], r["name"]))
    hyps = [{**r, "kind": "key", "name": r["key_id"]} for r in report["scores"]]
    hyps += [{**r, "kind": "group"} for r in report["groups"]]
    hyps.sort(key=lambda r: (r["p"], r["name"]))
    named = [r for r in hyps if r["p_holm"] < cfg.alpha]
    n = len(hyps)
    report.update(
        match_keys=True, hypotheses=n, scored=sum(len(t.tuples) for t in per_key.values()),
        best=hyps[0] if hyps else None, named=bool(named), named_hypotheses=[r["name"] for r in named],
        named_accounts=sorted({a for r in named for a in r["accounts"]}),
        verdict=("; ".join(f"{r['name']} (accounts {', '.join(r['accounts']) or '-'}): Holm-adjusted p = "
                           f"{r['p_holm']:.3g}" for r in named) + f" (Holm over {n} hypotheses: "
                 f"{len(key_scores)} keys, {len(group_scores)} groups)" if named else
                 f"no key or group at family-wise level {cfg.alpha:g} (smallest Holm-adjusted p "
                 f"{hyps[0]['p_holm'] if hyps else 1.0:.3g} over {n} hypotheses: {len(key_scores)} keys, "
                 f"{len(group_scores)} groups)"),
        wall_s=round(time.perf_counter() - t0, 2))
    return report


def _counterfactual(cfg: SuspectConfig, samples: list[Sample], secret: bytes, progress: StepProgress | None,
                    t0: float) -> dict[str, Any]:
    """``--test counterfactual``: our answers ranked among the teacher's redraws under other keys, per account."""
    from dataclasses import replace

    from stillhouse.guard.detect.logwindow import is_store_url
    from stillhouse.provenance import counterfactual as cf
    from stillhouse.provenance.matched import operator_groups

    # requests with tools are left out (chosen by the request, never by our answer, so the rest stay exchangeable):
    # their prompts carry the tools, which the redraw does not replay
    with_prompt = [s for s in samples if s.prompt]
    asked = [s for s in with_prompt if not s.params.get("tools")]
    if not asked:
        raise cf.CounterfactualError(f"{cfg.source}: no answer with its prompt; the test draws other answers to the "
                                     "same prompts (give the guard's log, or JSONL rows with 'messages')")
    cf.check_keys(asked)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    # the recipe serve drew with: its gate whatever the suspect reads (the tuple tests' "no gate when reading")
    served = WatermarkParams(gamma=cfg.gamma, delta=cfg.delta, context=cfg.context, scheme=cfg.scheme,
                             entropy=DEFAULT_PARAMS.entropy if cfg.entropy is None else cfg.entropy)
    params = [replace(served, scheme=s.scheme or cfg.scheme) for s in asked]  # type: ignore[arg-type]
    recipes = [cf.sampling(s, cfg.default_max_tokens, 1.0) for s in asked]
    drawn = cf.draw(cfg.tokenizer, asked, cfg.counterfactuals, params, secret, recipes,
                    Path(cfg.cache) if cfg.cache else None, progress)
    candidates = [[s.text, *d] for s, d in zip(asked, drawn)]
    extra: dict[str, Any] = {"suspect": cfg.suspect, "mode": cfg.resolved_mode, "source": cfg.source,
                             "test": "counterfactual", "k": cfg.counterfactuals, "answers": len(asked),
                             "left_out_with_tools": len(with_prompt) - len(asked)}
    if cfg.reads_text:
        reference = "" if cfg.reference == "none" else cfg.reference or cfg.tokenizer
        scores = cf.likelihoods(cfg.suspect, asked, candidates, cfg.batch_size, progress, "suspect",
                                cfg.scored_prefix)
        if reference:
            base = cf.likelihoods(reference, asked, candidates, cfg.batch_size, progress, "reference",
                                  cfg.scored_prefix)
            scores = [[a - b for a, b in zip(x, y)] for x, y in zip(scores, base)]
        extra.update(score="likelihood", reference=reference or "none", prefix_tokens=cfg.scored_prefix)
    else:
        answers = _suspect_answers(cfg, asked, progress)
        scores = cf.overlaps(_tokenizer(cfg.tokenizer), answers, candidates, idf=cfg.overlap == "idf")
        extra.update(score="overlap", overlap=cfg.overlap, answer_tokens=cfg.answer_tokens,
                     sampled_answers=cfg.pooled_answers)
    ranks = [cf.rank(sc, s.key_id) for sc, s in zip(scores, asked)]
    groups = [(g.name, g.given_by, g.accounts) for g in operator_groups(cfg.groups)]
    if cfg.cluster_groups and is_store_url(cfg.source):
        from stillhouse.provenance.candidates import clusters_from_log

        present = {cf.subject(s) for s in asked}
        for cid, members in clusters_from_log(cfg.source).items():
            mine = tuple(a for a in members if a in present)
            if len(mine) >= 2:
                groups.append((f"cluster:{cid}", "cluster", mine))
    hyps = [h.to_json(p_holm) for h, p_holm in cf.hypotheses(asked, ranks, cfg.counterfactuals, groups)]
    named = [h for h in hyps if h["p_holm"] < cfg.alpha]
    n = len(hyps)
    verdict = ("; ".join(f"{h['name']} ({h['first']} of {h['answers']} answers ranked first): Holm-adjusted p = "
                         f"{h['p_holm']:.3g}" for h in named) + f" (Holm over {n} hypotheses, counterfactual test)"
               if named else f"no account or group at family-wise level {cfg.alpha:g} (smallest Holm-adjusted p "
               f"{hyps[0]['p_holm'] if hyps else 1.0:.3g} over {n} hypotheses, counterfactual test)"
               + _counterfactual_hint(cfg, hyps))
    return {**extra, "hypotheses": hyps, "best": hyps[0] if hyps else None, "named": bool(named),
            "named_hypotheses": [h["name"] for h in named],
            "named_accounts": sorted({a for h in named for a in h["accounts"]}), "verdict": verdict,
            "scores": [], "wall_s": round(time.perf_counter() - t0, 2)}


def _counterfactual_hint(cfg: SuspectConfig, hyps: list[dict[str, Any]]) -> str:
    """What would let a test that named nobody go further: its best hypothesis' answers cannot reach --alpha
    (``(K + 1)^-n`` at best), or a closed suspect asked few times per prompt (docs/results.md: at 6 answers,
    greedy + 4 gave 0.091 and 0.037, greedy + 64 with idf 8.4e-5 and 0.008)."""
    if not hyps:
        return ""
    n, k = hyps[0]["answers"], cfg.counterfactuals
    if n * math.log10(k + 1) < -math.log10(cfg.alpha):
        return (f"; {hyps[0]['name']}'s {n} answers reach p = {(k + 1) ** -n:.3g} at best, above {cfg.alpha:g}: "
                "draw more per answer (--counterfactuals) or give more answers")
    if cfg.resolved_mode == "closed" and cfg.pooled_answers < 64 and n <= 16:
        return (f"; with {n} answers, more of the suspect's own help: --sampled-answers 64 --overlap idf "
                f"(about {65 / (1 + cfg.pooled_answers):.0f}x the requests)")
    return ""


def _suspect_answers(cfg: SuspectConfig, asked: list[Sample], progress: StepProgress | None) -> list[str]:
    """The suspect's answers (greedy here, or over HTTP at --temperature, then --sampled-answers more at T 0.7,
    joined by a blank line) to the prompts asked, as text."""
    from stillhouse.provenance.radioactive import closed_texts, own_answers

    if cfg.resolved_mode == "closed":
        runs = [(cfg.temperature, 0)] + [(0.7, 1000 * j) for j in range(cfg.pooled_answers)]
        texts = asyncio.run(closed_texts(cfg.suspect, asked, cfg.answer_tokens, runs, cfg.concurrency,
                                         cfg.request_timeout))
        return ["\n\n".join(each) for each in zip(*texts)]
    from stillhouse.teacher.bundled import load_model

    model, stok, _ = load_model(cfg.suspect)
    _, ids = own_answers(model, stok, asked, cfg.answer_tokens, progress=progress)
    return [str(stok.decode(a, skip_special_tokens=True)) for a in ids]
