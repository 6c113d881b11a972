"""The arena's prompt pools: GSM8K when ../shared has it, generated additions when it doesn't."""

from __future__ import annotations

import pytest

from stillhouse.arena import prompts


@pytest.fixture(autouse=True)
def fresh_cache():
    prompts.prompt_pool.cache_clear()
    yield
    prompts.prompt_pool.cache_clear()


def test_without_gsm8k_the_pools_fall_back_to_disjoint_generated_additions(monkeypatch, tmp_path):
    monkeypatch.setenv("STILLHOUSE_SHARED", str(tmp_path))
    with pytest.warns(UserWarning, match="GSM8K train not found"):
        benign = prompts.prompt_pool("benign")
    with pytest.warns(UserWarning, match="GSM8K test not found"):
        campaign = prompts.prompt_pool("campaign")
    assert len(benign.math) > 100 and len(campaign.math) > 100
    assert all(p.startswith("What is ") for p in benign.math + campaign.math)
    assert not set(benign.math) & set(campaign.math)
    assert benign.code and campaign.code and not set(benign.code) & set(campaign.code)


def test_bad_side_is_named():
    with pytest.raises(ValueError, match="side='both'"):
        prompts.prompt_pool("both")
