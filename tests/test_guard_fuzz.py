"""schemathesis against the guard's own OpenAPI schema: no generated input gets a 5xx.

Positive (schema-valid) and negative (schema-violating) cases for every operation go over
real HTTP to a guard in front of the fake upstream. /v1 operations carry a live API key and
/admin operations the admin token, so the fuzzer reaches past auth into body parsing,
policy and the upstream call (the auth tests in test_guard.py cover bad credentials).
The default run is short; ``-m slow`` runs a longer one (STILLHOUSE_FUZZ_EXAMPLES overrides).
"""

from __future__ import annotations

import os
from collections import Counter

import pytest

from stillhouse.testing.fakeserver import FakeServerConfig
from stillhouse.testing.fakeserver import start_in_thread as start_fake
from test_guard import ADMIN, make_config, start_guard


def _fuzz(tmp_path, examples: int) -> tuple[Counter[int], Counter[str]]:
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    from stillhouse.guard.openapi import openapi_schema

    schema = schemathesis.openapi.from_dict(openapi_schema())
    strategies = []
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategies.append(op.as_strategy(generation_mode=mode))
    statuses: Counter[int] = Counter()
    paths: Counter[str] = Counter()
    failures: list[str] = []
    with start_fake(FakeServerConfig(latency_ms=0)) as fake:
        g = start_guard(make_config(tmp_path, f"http://127.0.0.1:{fake.port}", max_body_bytes=20_000,
                                    upstream_timeout_s=5.0))
        try:
            key = g.account_with_key("fuzzer", limits={"requests_per_min": 0, "tokens_per_min": 0})

            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=st.one_of(strategies))
            def run(case) -> None:
                token = ADMIN if case.path.startswith("/admin") else key
                resp = case.call(base_url=g.url, headers={"Authorization": f"Bearer {token}"}, timeout=15)
                statuses[resp.status_code] += 1
                paths[case.path] += 1
                if resp.status_code >= 500:
                    failures.append(f"{case.method} {case.path} body={case.body!r:.300} → "
                                    f"{resp.status_code} {resp.text[:300]}")
                    raise AssertionError(failures[-1])

            run()
            health = g.admin("GET", "/admin/stats")[1]
            assert health["log"]["store_ok"] and health["log"]["spooled"] == 0
        finally:
            g.stop()
    assert not failures, failures
    return statuses, paths


def test_fuzz_short(tmp_path):
    statuses, paths = _fuzz(tmp_path, int(os.environ.get("STILLHOUSE_FUZZ_EXAMPLES", "120")))
    assert sum(statuses.values()) >= 80
    assert paths["/health"] > 0 and paths["/v1/chat/completions"] > 0   # every kind of route is exercised
    assert statuses[200] + statuses[201] > 0 and statuses[400] > 0   # it reached both sides of validation


@pytest.mark.slow
def test_fuzz_long(tmp_path):
    statuses, _ = _fuzz(tmp_path, int(os.environ.get("STILLHOUSE_FUZZ_EXAMPLES", "2000")))
    assert sum(statuses.values()) >= 1500
