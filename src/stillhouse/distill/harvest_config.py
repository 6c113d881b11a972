"""A harvest run's settings (HarvestConfig), saved as RUN_DIR/config.json and replayed by ``--config``.

The one place each ``stillhouse harvest`` option is named, typed, documented and defaulted: the CLI's
options are derived from the fields (stillhouse.cli_config).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from stillhouse.config import ConfigError, config_to_dict, load_config, save_config
from stillhouse.distill.prompts import check_request
from stillhouse.distill.store import CONFIG_NAME, compact_json
from stillhouse.teacher.base import SamplingParams
from stillhouse.teacher.spec import parse_spec


@dataclass(frozen=True)
class HarvestConfig:
    """One harvest run. Saved as RUN_DIR/config.json; ``--config`` replays it."""

    prompts: str
    """A .jsonl/.parquet file, a datasets directory (DIR[#SPLIT]) or builtin:NAME[:N]."""
    teacher: str
    """A teacher spec: bundled, hf:DIR, gguf:FILE, http://HOST:PORT/v1[#MODEL], fake[:SEED]."""
    out: str
    """The run directory."""
    samples: int = 1
    """Completions per prompt (each its own request and record), for best-of-n later."""
    temperature: float = 0.0
    """Sampling temperature; 0 = greedy."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest token set whose probability reaches this (1 = all)."""
    max_tokens: int = 256
    """Completion token limit per request."""
    seed: int | None = None
    """Sample i is requested with seed+i, so samples differ and reruns reproduce."""
    stop: tuple[str, ...] = ()
    """Stop strings: a completion ends before the first of them."""
    logprobs: bool = False
    """Store the logprob of every completion token (for KD from the harvest)."""
    top_logprobs: int = 0
    """Store the k most likely tokens per position (0..20; needs logprobs, which ``--top-logprobs`` turns on)."""
    concurrency: int = 0
    """Requests in flight. 0 picks: 64 for HTTP teachers, 32 for local ones, 16 for fake."""
    timeout_s: float = 120.0
    """Per-request timeout."""
    max_attempts: int = 5
    """Attempts per record in one run, the first included."""
    backoff_s: float = 0.5
    """First retry delay; doubles each attempt, full jitter."""
    backoff_max_s: float = 30.0
    """Cap on the backoff delay between retries (a server's Retry-After is obeyed as sent, not capped)."""
    rpm: float = 0.0
    """Requests per minute (0 = no limit)."""
    tpm: float = 0.0
    """Tokens (prompt + completion) per minute (0 = no limit)."""
    max_requests: int = 0
    """Hard cap on requests for the run directory (0 = none)."""
    max_total_tokens: int = 0
    """Hard cap on prompt + completion tokens for the run directory (0 = none)."""
    max_cost: float = 0.0
    """Hard cap on cost (same currency as the prices; 0 = none)."""
    price_prompt_per_1m: float = 0.0
    """Price per million prompt tokens, for cost tracking."""
    price_completion_per_1m: float = 0.0
    """Price per million completion tokens, for cost tracking."""
    strict: bool = False
    """Fail before any teacher call when the prompt source has a bad row."""
    limit: int | None = None
    """Use only the first N usable prompts."""
    allow_revision_change: bool = False
    """Continue a run although the teacher's revision differs from the one stored."""
    flush_interval_s: float = 0.25
    """How often finished rows are committed to SQLite."""
    shard: str = ""
    """I/J: this process harvests prompts I, I+J, I+2J, ... of the source (counted from 0); J processes with
    I = 0..J-1 fill one run directory together, e.g. one one-thread process per core for a local
    teacher. Not part of the run's config.json: the run is the whole prompt set. Empty = every prompt."""
    local_batch: int = 64
    """A local teacher, greedy and without stop strings: prompts per fixed white-box batch
    (LocalTeacher.generate_batch: batches cut in prompt order, and the top-k logprobs cover the stop
    position too). 0 = continuous batching through the teacher's batcher, what sampling, stop strings
    and a watermarking teacher always use."""
    tools: str = ""
    """A JSON file holding an OpenAI tools list, sent with every prompt that brings no tools of its own
    (part of the record key: the file's tools, not its name). Empty = none."""
    tool_choice: str = ""
    """Sent as tool_choice: auto, none, required, or a JSON object naming a function. Empty = not sent."""
    reasoning_effort: str = ""
    """Sent as reasoning_effort (e.g. low, medium, high) for teachers that reason. Empty = not sent."""
    extra_body: str = ""
    """A JSON object of further request fields sent as they are, e.g. '{"chat_template_kwargs":
    {"enable_thinking": true}}' for vLLM or '{"reasoning": {"effort": "high"}}' for OpenRouter; part of
    the record key. A prompt row's own tools, tool_choice, response_format... win over these."""

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"{name}={getattr(self, name)!r}: {why}")

        if not self.prompts:
            raise bad("prompts", "give a .jsonl/.parquet file, a datasets directory or builtin:NAME[:N]")
        try:
            parse_spec(self.teacher)
        except ValueError as exc:
            raise ConfigError(f"teacher: {exc}") from exc
        if not self.out:
            raise bad("out", "give a run directory, e.g. runs/h1")
        if self.samples < 1:
            raise bad("samples", "must be >= 1")
        try:
            self.params(0, {})
        except ValueError as exc:
            raise ConfigError(f"sampling params: {exc}") from exc
        if self.concurrency < 0:
            raise bad("concurrency", "must be >= 0 (0 picks a default)")
        if self.timeout_s <= 0:
            raise bad("timeout_s", "must be > 0")
        if self.max_attempts < 1:
            raise bad("max_attempts", "must be >= 1")
        if self.backoff_s < 0 or self.backoff_max_s < self.backoff_s:
            raise bad("backoff_max_s", f"must be >= backoff_s={self.backoff_s} >= 0")
        for name in ("rpm", "tpm", "max_cost", "price_prompt_per_1m", "price_completion_per_1m"):
            v = getattr(self, name)
            if v < 0 or math.isnan(v):
                raise bad(name, "must be >= 0 (0 means none)")
        for name in ("max_requests", "max_total_tokens"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0 (0 means no cap)")
        if self.max_cost and not (self.price_prompt_per_1m or self.price_completion_per_1m):
            raise bad("max_cost", "a cost cap needs prices: set price_prompt_per_1m / price_completion_per_1m")
        if self.limit is not None and self.limit < 1:
            raise bad("limit", "must be >= 1 (or unset)")
        if self.flush_interval_s <= 0:
            raise bad("flush_interval_s", "must be > 0")
        if self.local_batch < 0:
            raise bad("local_batch", "must be >= 0 (0 = continuous batching)")
        if self.shard:
            i, sep, j = self.shard.partition("/")
            if not (sep and i.isdigit() and j.isdigit() and int(i) < int(j)):
                raise bad("shard", "write I/J with 0 <= I < J, e.g. 0/2 and 1/2 for two processes")
        extra = self.request_extra()  # reads the tools file: a bad one fails here, before any call
        try:
            self.params(0, extra)
        except ValueError as exc:
            raise ConfigError(f"extra_body: {exc}") from exc

    def request_extra(self) -> dict[str, Any]:
        """The further request fields every prompt is sent with (tools, tool_choice, reasoning_effort,
        extra_body), checked; raises ConfigError naming the bad setting."""
        extra: dict[str, Any] = {}
        if self.extra_body:
            try:
                body = json.loads(self.extra_body)
            except ValueError as exc:
                raise ConfigError(f"extra_body: not valid JSON ({exc}); give an object, e.g. "
                                  '\'{"chat_template_kwargs": {"enable_thinking": true}}\'') from None
            if not isinstance(body, dict):
                raise ConfigError("extra_body: give a JSON object of request fields")
            extra.update(body)
        if self.tools:
            try:
                tools = json.loads(Path(self.tools).read_text())
            except OSError as exc:
                raise ConfigError(f"tools={self.tools!r}: cannot read it ({exc.strerror or exc}); give a JSON file "
                                  "holding an OpenAI tools list") from None
            except ValueError as exc:
                raise ConfigError(f"tools={self.tools!r}: not valid JSON ({exc})") from None
            try:
                extra.update(check_request({"tools": tools}))
            except ValueError as exc:
                raise ConfigError(f"tools={self.tools!r}: {exc}") from None
        if self.tool_choice:
            choice: Any = self.tool_choice
            if choice.lstrip().startswith("{"):
                try:
                    choice = json.loads(choice)
                except ValueError as exc:
                    raise ConfigError(f"tool_choice: not valid JSON ({exc})") from None
            try:
                extra.update(check_request({"tool_choice": choice}))
            except ValueError as exc:
                raise ConfigError(f"tool_choice: {exc}") from None
        if self.reasoning_effort:
            extra["reasoning_effort"] = self.reasoning_effort
        return extra

    def params(self, sample_index: int, extra: dict[str, Any] | None = None) -> SamplingParams:
        """The sampling params of one sample (seed offset by the sample index), with the further request
        fields ``extra`` (default: :meth:`request_extra`)."""
        if extra is None:
            extra = self.request_extra() if (self.tools or self.tool_choice or self.reasoning_effort
                                             or self.extra_body) else {}
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens, n=1,
            seed=None if self.seed is None else self.seed + sample_index, stop=tuple(self.stop),
            logprobs=self.logprobs, top_logprobs=self.top_logprobs, extra=compact_json(extra) if extra else "",
        )

    def effective_concurrency(self) -> int:
        if self.concurrency:
            return self.concurrency
        kind = parse_spec(self.teacher).kind
        return 64 if kind == "http" else 16 if kind == "fake" else 32


def save_run_config(cfg: HarvestConfig) -> None:
    """Write RUN_DIR/config.json; an earlier, different config is kept as config.prev-N.json."""
    out = Path(cfg.out)
    path = out / CONFIG_NAME
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        new = {"__config__": type(cfg).__name__, **config_to_dict(replace(cfg, shard=""))}
        if old is not None and old != new:
            n = 1
            while (out / f"config.prev-{n}.json").exists():
                n += 1
            (out / f"config.prev-{n}.json").write_text(path.read_text())
    save_config(replace(cfg, shard=""), path)


def load_harvest_config(path: str) -> HarvestConfig:
    """Read a saved HarvestConfig (``--config``)."""
    return load_config(HarvestConfig, path)
