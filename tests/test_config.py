"""Config save/replay round trips and loud failures."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from stillhouse.config import ConfigError, load_config, save_config
from stillhouse.teacher.base import SamplingParams


@dataclass(frozen=True)
class Toy:
    name: str = "x"
    sizes: tuple[int, ...] = (1, 2)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name: must not be empty")


def test_round_trip_restores_tuples(tmp_path):
    save_config(Toy("a", (3, 4)), tmp_path / "c.json")
    back = load_config(Toy, tmp_path / "c.json")
    assert back == Toy("a", (3, 4))
    assert json.loads((tmp_path / "c.json").read_text())["__config__"] == "Toy"


def test_sampling_params_round_trip(tmp_path):
    p = SamplingParams(temperature=0.7, stop=("\n",), logprobs=True, top_logprobs=5, seed=3)
    save_config(p, tmp_path / "p.json")
    assert load_config(SamplingParams, tmp_path / "p.json") == p


def test_unknown_field_is_named(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"name": "a", "colour": "red"}))
    with pytest.raises(ConfigError, match="colour"):
        load_config(Toy, tmp_path / "c.json")


def test_validation_runs_on_load(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"name": ""}))
    with pytest.raises(ValueError, match="name"):
        load_config(Toy, tmp_path / "c.json")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Toy, tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(Toy, tmp_path / "bad.json")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": 3}, "top_logprobs needs logprobs"),
        ({"stop": "\n"}, "stop"),
    ],
)
def test_sampling_params_reject_bad_fields(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_to_openai_only_sends_what_was_asked():
    body = SamplingParams(max_tokens=8).to_openai()
    assert "logprobs" not in body and "seed" not in body and "stop" not in body
    body = SamplingParams(logprobs=True, top_logprobs=4, seed=1, stop=("x",)).to_openai()
    assert body["top_logprobs"] == 4 and body["seed"] == 1 and body["stop"] == ["x"]
