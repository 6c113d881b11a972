"""Provenance in the arena: a campaign harvests through the guard with watermarking on, a student is
trained on what leaked, and the radioactivity test names the campaign's accounts from the student alone.

1. serve the real teacher with ``--watermark`` on loopback (``stillhouse.serve``);
2. a real guard (``watermark=True``, keys per account) in front of it, on loopback HTTP; the campaign's
   accounts ask GSM8K test questions (the arena's campaign pool), ``decoys`` benign accounts ask a few
   GSM8K train questions each, so the log holds their key ids too (the candidates: 16 or more keys);
3. the leaked set (the campaign's answered requests) trains a student with ``stillhouse.distill.train`` (SFT);
4. ``provenance model`` (open-weight) tests every key id in the guard's log, Holm-corrected, and reports whose
   accounts the significant keys are. With ``match_keys`` each key is tested only on the answers to the
   questions it answered, and the campaign's accounts are one pooled group (given by the arena, which knows
   the campaign: the guard here runs no detector to link them), beside ``decoy_groups`` decoy groups of the
   same size as the group test's false-alarm check; Holm over keys and groups together
   (:mod:`stillhouse.provenance.matched`). With ``own_answers`` the student answers, greedily, every question the
   log holds (campaign and benign alike; the supervised setting of Sander et al.: the provider knows what it
   was asked), and its answers are scored; otherwise it reads ``reading`` benign-pool questions nobody asked.

Run::

    stillhouse provenance arena --out RUN   # (or from Python: run_provenance(cfg, out))

The watermark secret is ``$STILLHOUSE_WATERMARK_SECRET`` when set; otherwise one is made for the run and
written to ``OUT/watermark.secret`` (mode 0600) so the log can be tested again (``provenance.json`` holds the
command): a simulated provider's key file, so a run directory is not for sharing. Cost on 2 CPU cores at the
defaults: about half an hour, nearly all of it the teacher's answers and the student's.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from stillhouse.watermark.green import DEFAULT_PARAMS

SERVED_NAME = "arena-teacher"


@dataclass(frozen=True)
class ProvenanceArenaConfig:
    """The provenance stage of the arena."""

    teacher: str = "bundled"
    """Local teacher spec, served watermarked to the campaign (and the student's init)."""
    student: str = "self"
    """Student init for ``stillhouse.distill.train`` (self: a copy of the teacher, the recipe measured in
    docs/results.md; pruned:10 and the other cuts learn too little from a few hundred rows to be named)."""
    campaign_accounts: int = 2
    """Accounts of the campaign (each gets its own key)."""
    requests_per_account: int = 120
    """Questions each campaign account asks."""
    decoys: int = 14
    """Benign accounts that each ask ``decoy_requests`` questions (their keys are candidates too)."""
    decoy_requests: int = 2
    """Questions per benign account."""
    max_tokens: int = 128
    """max_tokens of every request."""
    temperature: float = 0.7
    """Sampling temperature of every request."""
    gamma: float = DEFAULT_PARAMS.gamma
    """Watermark green share."""
    delta: float = DEFAULT_PARAMS.delta
    """Watermark logit bias (serve's default: the setting chosen on development data to keep the teacher's
    accuracy, :class:`~stillhouse.watermark.green.WatermarkParams`)."""
    context: int = DEFAULT_PARAMS.context
    """Watermark context window."""
    entropy: float = DEFAULT_PARAMS.entropy
    """Watermark entropy gate in nats (serve's --watermark-entropy; 0 = none). The test scores the gated tokens
    of the student's answers, so it needs ``own_answers``."""
    scheme: Literal["kgw", "exp"] = DEFAULT_PARAMS.scheme  # type: ignore[assignment]
    """Watermark scheme (serve's --watermark-scheme): exp draws the campaign's sampled answers by EXP, and the test
    scores the student's answers with the EXP test (``provenance model --scheme exp``; needs ``own_answers``)."""
    score: Literal["weighted", "count"] = "weighted"
    """How the student's answers are scored (``provenance model --score``): weighted by the evidence each token can
    carry (the default), or count (the binomial test; the arena runs in docs/results.md). With --no-own-answers the
    student's predictions are scored, always counted."""
    epochs: int = 2
    """SFT epochs of the student."""
    lr: float = 1e-4
    """SFT learning rate."""
    batch_size: int = 8
    """SFT batch size."""
    alpha: float = 1e-3
    """Family-wise level at which a key is named."""
    own_answers: bool = True
    """The test: the student answers every question in the guard's log (``provenance model --reading own``).
    False: it reads ``reading`` questions nobody asked (``--reading text``; it named nobody in
    docs/results.md)."""
    answer_tokens: int = 128
    """max_tokens of each of the student's answers with ``own_answers``."""
    match_keys: bool = True
    """With ``own_answers``: each key is tested only on the student's answers to the questions that key answered
    (``provenance model --match-keys``), and the campaign's accounts are one pooled group; ``decoy_groups`` groups
    of as many decoys are tested beside it as the group test's own false-alarm check."""
    decoy_groups: int = 2
    """With ``match_keys``: groups of ``campaign_accounts`` decoy accounts each, tested like the campaign's group."""
    reading: int = 400
    """Texts the student reads for the test (without ``own_answers``): questions from the benign pool, none of them asked. Not the leaked
    answers: their own tuples must be dropped (a clean model predicting them would look radioactive), and what
    is left of them is biased against the key, which costs the test its power."""
    test: Literal["tuples", "counterfactual"] = "tuples"
    """tuples: the green-list tests over the log's key ids (above). counterfactual: the guard gives every request a
    key of its own (--watermark-per-request), and the student reads every answer in the log beside ``counterfactuals``
    answers the teacher draws again for each under other keys (``provenance model --test counterfactual``: accounts,
    the campaign's group and the decoy groups are the hypotheses)."""
    counterfactuals: int = 9
    """With test=counterfactual: answers redrawn per logged answer."""
    prefix_tokens: int | None = None
    """With test=counterfactual: each answer's tokens the likelihood score reads (None = provenance model's default,
    the first 64; 0 = every token)."""
    concurrency: int = 16
    """Requests in flight through the guard (the teacher batches them)."""
    threads: int = 1
    """torch CPU threads."""
    seed: int = 0
    """Which questions are asked."""

    def __post_init__(self) -> None:
        for name in ("campaign_accounts", "requests_per_account", "decoy_requests", "max_tokens", "epochs",
                     "batch_size", "concurrency", "threads", "answer_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.decoys < 0 or self.decoy_groups < 0:
            raise ValueError(f"decoys={self.decoys}, decoy_groups={self.decoy_groups}: must be >= 0")
        if self.score not in ("weighted", "count"):
            raise ValueError(f"score={self.score!r}: use weighted (the default) or count")
        if self.test not in ("tuples", "counterfactual"):
            raise ValueError(f"test={self.test!r}: use tuples or counterfactual")
        if self.test == "counterfactual" and self.counterfactuals < 1:
            raise ValueError(f"counterfactuals={self.counterfactuals}: must be >= 1")
        if self.prefix_tokens is not None and (self.test != "counterfactual" or self.prefix_tokens < 0):
            raise ValueError(f"prefix_tokens={self.prefix_tokens}: the counterfactual test's likelihood score reads "
                             "each answer's first N tokens (N >= 0, 0 = every token); give --test counterfactual or "
                             "drop --prefix-tokens")
        if self.match_keys and not self.own_answers:
            raise ValueError("match_keys needs own_answers: the matched test scores the student's answers to the "
                             "questions in the guard's log (for the reading test give --no-own-answers "
                             "--no-match-keys --entropy 0)")
        if self.match_keys and self.decoy_groups * self.campaign_accounts > self.decoys:
            raise ValueError(f"decoy_groups={self.decoy_groups}: {self.decoy_groups} groups of "
                             f"{self.campaign_accounts} need that many decoys, there are {self.decoys}; "
                             "lower decoy_groups or raise decoys")
        from stillhouse.watermark.green import WatermarkParams

        WatermarkParams(self.gamma, self.delta, self.context, self.entropy, self.scheme)
        if self.scheme == "exp" and not self.own_answers:
            raise ValueError("scheme=exp needs own_answers: the EXP test scores the student's answers (reading "
                             "questions is counted; give --scheme kgw with --no-own-answers)")
        if self.entropy and not self.own_answers:
            raise ValueError(f"entropy={self.entropy:g} needs own_answers: the gate scores answer text, and reading "
                             "questions scores every prediction (with --no-own-answers give --entropy 0)")


async def _harvest(guard_url: str, keys: dict[str, str], plan: list[tuple[str, str]], cfg: ProvenanceArenaConfig
                   ) -> list[tuple[str, str, int, str]]:
    """Send ``(account, question)`` requests through the guard; (account, question, status, answer)."""
    import aiohttp

    sem = asyncio.Semaphore(cfg.concurrency)

    async def one(session: aiohttp.ClientSession, i: int, account: str, q: str) -> tuple[str, str, int, str]:
        body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": q}], "max_tokens": cfg.max_tokens,
                "temperature": cfg.temperature, "seed": cfg.seed * 100_000 + i}
        async with sem, session.post(f"{guard_url}/chat/completions", json=body,
                                     headers={"Authorization": f"Bearer {keys[account]}"}) as r:
            data = await r.json(content_type=None)
            text = data["choices"][0]["message"]["content"] if r.status == 200 else ""
            return account, q, r.status, text

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=7200)) as session:
        return list(await asyncio.gather(*(one(session, i, a, q) for i, (a, q) in enumerate(plan))))


SECRET_FILE = "watermark.secret"


def run_provenance(cfg: ProvenanceArenaConfig, out_dir: str | Path, loaded: tuple[Any, Any, str] | None = None
                   ) -> dict[str, Any]:
    """The whole stage (module docstring); returns its metrics (also ``provenance.json`` in ``out_dir``).

    The watermark secret is ``$STILLHOUSE_WATERMARK_SECRET`` when set (nothing written); otherwise one is made for
    this run, written to ``OUT/watermark.secret`` (mode 0600, never into the log, the report or a response) so that
    the guard's log can be tested again later, and set in this process's environment for the run only."""
    from stillhouse.watermark.keys import SECRET_ENV

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / SECRET_FILE).unlink(missing_ok=True)
    made = not os.environ.get(SECRET_ENV)
    if made:
        secret = secrets.token_urlsafe(32)
        fd = os.open(out / SECRET_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        os.environ[SECRET_ENV] = secret
    try:
        return _run(cfg, out, loaded, secret_file=str((out / SECRET_FILE).resolve()) if made else "")
    finally:
        if made:
            os.environ.pop(SECRET_ENV, None)


def _retest(cfg: ProvenanceArenaConfig, out: Path, db_url: str, student: Path, groups: tuple[str, ...],
            secret_file: str) -> str:
    """The command line that runs this run's test again on its guard log (with other options, or another suspect)."""
    env = f"STILLHOUSE_WATERMARK_SECRET=$(cat {secret_file}) " if secret_file else ""
    tail = f"--gamma {cfg.gamma:g} --context {cfg.context} --tokenizer {cfg.teacher}"
    if cfg.test == "counterfactual":
        return (f"{env}stillhouse provenance model {db_url} --suspect hf:{student} --mode open --test counterfactual "
                f"--counterfactuals {cfg.counterfactuals} --entropy {cfg.entropy:g} --delta {cfg.delta:g} "
                f"--scheme {cfg.scheme} --cache {out.resolve() / 'counterfactuals.jsonl'} {tail}"
                + "".join(f" --group {g}" for g in groups))
    test = (f"--mode open --reading own --answer-tokens {cfg.answer_tokens} --entropy {cfg.entropy:g} "
            f"--score {cfg.score} --delta {cfg.delta:g} --scheme {cfg.scheme}" if cfg.own_answers
            else "--mode open --reading text")
    source = db_url if cfg.own_answers else str(out.resolve() / "reading.jsonl")
    extra = " --match-keys" + "".join(f" --group {g}" for g in groups) if cfg.match_keys else ""
    return f"{env}stillhouse provenance model {source} --log {db_url} --suspect hf:{student} {test} {tail}{extra}"


def _run(cfg: ProvenanceArenaConfig, out: Path, loaded: tuple[Any, Any, str] | None, secret_file: str
         ) -> dict[str, Any]:
    import torch

    from stillhouse.arena.prompts import prompt_pool
    from stillhouse.config import save_config
    from stillhouse.distill.train import TrainConfig, train
    from stillhouse.guard.app import create_app as guard_app
    from stillhouse.guard.config import GuardConfig, sha256_hex
    from stillhouse.guard.events import AccountInfo
    from stillhouse.guard.store import open_store
    from stillhouse.http.server import ServerThread, start_in_thread
    from stillhouse.provenance.run import SuspectConfig, model_provenance
    from stillhouse.serve.app import ServeConfig, create_app
    from stillhouse.teacher.batcher import BatchConfig
    from stillhouse.teacher.local import LocalTeacher

    # A rerun starts the stage over: a new harvest (under this run's secret) and a student trained on it alone, not
    # the last run's student resumed from its checkpoint.
    for name in ("guard.db", "guard.db-wal", "guard.db-shm", "leaked.jsonl", "reading.jsonl", "provenance.json",
                 "counterfactuals.jsonl"):
        (out / name).unlink(missing_ok=True)
    for name in ("student", "spool"):
        shutil.rmtree(out / name, ignore_errors=True)
    save_config(cfg, out / "provenance_config.json")
    torch.set_num_threads(cfg.threads)
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    if loaded is None:
        from stillhouse.distill.modelio import load_causal_lm

        loaded = load_causal_lm(cfg.teacher)
    model, tok, rev = loaded

    rng = random.Random(cfg.seed)
    campaign = [f"camp-{i}" for i in range(cfg.campaign_accounts)]
    decoys = [f"user-{i}" for i in range(cfg.decoys)]
    questions = rng.sample(list(prompt_pool("campaign").math), cfg.campaign_accounts * cfg.requests_per_account)
    pool = list(prompt_pool("benign").math)
    benign_q = rng.sample(pool, min(len(pool), cfg.decoys * cfg.decoy_requests + cfg.reading))
    reading = benign_q[cfg.decoys * cfg.decoy_requests:]
    plan = [(campaign[i % len(campaign)], q) for i, q in enumerate(questions)]
    plan += [(decoys[i % len(decoys)], q) for i, q in enumerate(benign_q[:cfg.decoys * cfg.decoy_requests])]
    rng.shuffle(plan)

    teacher = LocalTeacher(model, tok, name=SERVED_NAME, revision=rev, batch=BatchConfig(max_batch=32))
    serve_cfg = ServeConfig(served_name=SERVED_NAME, max_batch=32, threads=cfg.threads, watermark=True,
                            watermark_gamma=cfg.gamma, watermark_delta=cfg.delta, watermark_context=cfg.context,
                            watermark_entropy=cfg.entropy, watermark_scheme=cfg.scheme)
    db_url = f"sqlite:///{(out / 'guard.db').resolve()}"
    with ServerThread(create_app(teacher, serve_cfg)) as server:
        gcfg = GuardConfig(upstream_url=server.base_url.removesuffix("/v1"),
                           admin_token_sha256=sha256_hex(secrets.token_hex(16)), db_url=db_url,
                           spool_dir=str(out / "spool"), key_refresh_s=0.0, requests_per_min=0, tokens_per_min=0,
                           max_concurrent_streams=0, upstream_timeout_s=3600.0, watermark=True,
                           watermark_per_request=cfg.test == "counterfactual")
        store = open_store(db_url)
        for account in campaign + decoys:
            store.put_account(AccountInfo(account, org="campaign" if account in campaign else "benign"))
        app = guard_app(gcfg, store)
        guard = start_in_thread(app)
        try:
            now = time.time()
            keys = {a: app.keys.issue(a, now).key for a in campaign + decoys}  # before any request
            t = time.perf_counter()
            answers = asyncio.run(_harvest(guard.url + "/v1", keys, plan, cfg))
            timings["harvest_s"] = time.perf_counter() - t
        finally:
            guard.stop()
    teacher.close()
    leaked = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "account": acct}
              for acct, q, status, a in answers if status == 200 and acct in campaign and a]
    (out / "leaked.jsonl").write_text("".join(json.dumps(r) + "\n" for r in leaked))

    t = time.perf_counter()
    tcfg = TrainConfig(data=str(out / "leaked.jsonl"), out=str(out / "student"), teacher=cfg.teacher,
                       student=cfg.student, loss="sft", epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                       threads=cfg.threads, device="cpu", seed=cfg.seed)
    final = train(tcfg, teacher=loaded, progress=False).final_dir
    timings["train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    groups: tuple[str, ...] = ()
    if cfg.match_keys or cfg.test == "counterfactual":
        # the arena knows the campaign; its guard runs no detector, so nothing links the accounts
        n = cfg.campaign_accounts
        groups = (",".join(campaign), *(",".join(decoys[i * n:(i + 1) * n]) for i in range(cfg.decoy_groups)))
    found: dict[str, Any]
    if cfg.test == "counterfactual":  # every answer in the log against its redraws; accounts and groups
        report = model_provenance(SuspectConfig(source=db_url, suspect=f"hf:{final}", mode="open", reading="text",
                                                tokenizer=cfg.teacher, gamma=cfg.gamma, context=cfg.context,
                                                entropy=cfg.entropy, delta=cfg.delta, scheme=cfg.scheme,
                                                alpha=cfg.alpha, groups=groups, threads=cfg.threads,
                                                test="counterfactual", counterfactuals=cfg.counterfactuals,
                                                prefix_tokens=cfg.prefix_tokens, cache=str(out / "counterfactuals.jsonl")))
        named_accounts = report["named_accounts"]
        found = {"keys_in_log": report["answers"], "test": "counterfactual",
                 "named_hypotheses": report["named_hypotheses"], "hypotheses": report["hypotheses"],
                 "groups": [h for h in report["hypotheses"] if h["kind"] != "account"], "scores": []}
    else:
        if cfg.own_answers:  # the source is the guard's log: every watermarked question it answered
            source = db_url
        else:
            source = str(out / "reading.jsonl")
            (out / "reading.jsonl").write_text("".join(json.dumps({"text": q}) + "\n" for q in reading))
        report = model_provenance(SuspectConfig(source=source, log=db_url, suspect=f"hf:{final}",
                                                mode="open", reading="own" if cfg.own_answers else "text",
                                                answer_tokens=cfg.answer_tokens, tokenizer=cfg.teacher,
                                                gamma=cfg.gamma, context=cfg.context, entropy=cfg.entropy,
                                                delta=cfg.delta, score=cfg.score if cfg.own_answers else "count",
                                                scheme=cfg.scheme,
                                                alpha=cfg.alpha, match_keys=cfg.match_keys, groups=groups,
                                                threads=cfg.threads))
        named_keys = [s for s in report["scores"] if s["p_holm"] < cfg.alpha]
        named_groups = [g for g in report.get("groups", []) if g["p_holm"] < cfg.alpha]
        named_accounts = sorted({a for s in (*named_keys, *named_groups) for a in s["accounts"]})
        found = {"keys_in_log": report["keys_tried"], "named_keys": [s["key_id"] for s in named_keys],
                 "named_groups": [g["name"] for g in named_groups], "groups": report.get("groups", []),
                 "group_given_by": ("the arena (it knows the campaign's accounts; its guard runs no detector, so no "
                                    "cluster links them)") if cfg.match_keys else "",
                 "scored": report["scored"], "scores": report["scores"]}
    timings["test_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_all
    metrics = {
        "config": json.loads((out / "provenance_config.json").read_text()), "teacher_revision": rev,
        "requests": len(plan), "answered": sum(1 for a in answers if a[2] == 200), "leaked_rows": len(leaked),
        **found, "named_accounts": named_accounts, "campaign_accounts": campaign,
        "secret": (f"made for this run, in {secret_file} (mode 0600)" if secret_file
                   else "$STILLHOUSE_WATERMARK_SECRET (not written)"),
        "retest": _retest(cfg, out, db_url, Path(final).resolve(), groups, secret_file),
        "goal_met": bool(named_accounts) and set(named_accounts) <= set(campaign),
        "best": report["best"], "timings_s": timings,
    }
    (out / "provenance.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
