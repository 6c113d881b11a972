"""Keys and prompt fields are unchanged by the fast loader: existing run directories still resume.

The reference here is the code path before the loader was sped up (``json.dumps`` per call, the
messages JSON built by the generic encoder, the record key hashed over one f-string), copied below
as ``_old_*``. The new path must give the very same prompt hashes, ids, messages JSON, meta JSON and
record keys for every row, and a store written with the old keys must be skipped by a rerun.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict

import pytest

from stillhouse.distill.harvest import HarvestConfig, Harvester, run_harvest
from stillhouse.distill.prompts import PromptError, load_prompts, row_to_prompt
from stillhouse.distill.store import HarvestStore, completion_row, record_key, record_key_from_json
from stillhouse.teacher.fake import FakeTeacher

# -- the old code path (src/stillhouse/distill/{store,prompts}.py at commit d89787b) ---------------


def _old_canonical_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _old_prompt_hash(messages_json):
    return hashlib.sha256(messages_json.encode()).hexdigest()


def _old_record_key_from_json(messages_json, teacher, params_json, sample_index):
    blob = f'{{"m":{messages_json},"p":{params_json},"s":{int(sample_index)},"t":{_old_canonical_json(teacher)}}}'
    return hashlib.sha256(blob.encode()).hexdigest()


def _old_params(params):
    """The params dict of the old code path: SamplingParams had no ``extra`` field then (a run without
    further request fields leaves it out, so its keys are the old ones)."""
    d = asdict(params)
    assert d.pop("extra") == ""
    return d


def _old_fields(row):
    """(id, messages, meta, hash, messages_json, meta_json) as the old row_to_prompt made them (valid rows)."""
    if row.get("messages") is not None:
        messages = [{k: v for k, v in m.items() if v is not None} for m in row["messages"]]
    else:
        messages = [{"role": "user", "content": row["prompt"]}]
    mj = _old_canonical_json(messages)
    ph = _old_prompt_hash(mj)
    rid = row.get("id")
    rid = f"p-{ph[:12]}" if rid is None or rid == "" else str(rid)
    meta = {k: v for k, v in row.items() if k not in ("id", "messages", "prompt")}
    return rid, messages, meta, ph, mj, _old_canonical_json(meta) if meta else "{}"


# -- inputs that stress the encoding ---------------------------------------------------------------

_TEXTS = [
    "What is 2 + 2?", "", " ", "quotes \" and \\ backslash", "tab\tnew\nline\r", "\x00\x01\x1f control",
    "é ü ß 漢字 🙂", "\u2028\u2029 separators", "</script>", "'single'", "a" * 3000, "/slash/", "\x7f\ud7ff",
]


def _random_text(rng):
    pieces = rng.sample(_TEXTS, 3) + ["".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(8)))]
    return "".join(pieces).strip() or "x"


def _rows(n, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = i % 6
        text = _random_text(rng)
        if kind == 0:
            row = {"id": f"b{i}", "prompt": text}
        elif kind == 1:
            row = {"prompt": text}  # id from the prompt hash
        elif kind == 2:
            row = {"id": i, "messages": [{"role": "system", "content": _random_text(rng)},
                                         {"role": "user", "content": text}]}
        elif kind == 3:  # content parts and an extra key: the generic encoder's path
            row = {"id": f"m{i}", "messages": [{"role": "user", "name": "ann",
                                                "content": [{"type": "text", "text": text}]}]}
        elif kind == 4:  # Parquet-style None fields, and meta of every JSON type
            row = {"id": f"q{i}", "messages": [{"role": "user", "content": text, "name": None}],
                   "answer": text[::-1], "task": "t", "n": i, "x": 0.1 * i, "ok": True, "none": None,
                   "tests": {"b": [1, 2], "a": {"é": "漢"}}}
        else:
            row = {"id": "", "prompt": text, "meta": {"src": "z", "k": [text]}}
        rows.append(row)
    return rows


def test_prompt_fields_match_the_old_code_path():
    for row in _rows(600):
        p = row_to_prompt(row)
        assert (p.id, p.messages, p.meta, p.hash, p.messages_json, p.meta_json) == _old_fields(row), row


def test_lone_surrogates_stay_a_bad_row(tmp_path):
    """The old path failed encoding such a prompt (a reported, skipped row); so does the new one."""
    src = tmp_path / "s.jsonl"
    src.write_text('{"prompt": "ok"}\n{"prompt": "bad \\ud800 half"}\n')
    ps = load_prompts(src)
    assert [p.messages[0]["content"] for p in ps.prompts] == ["ok"]
    assert [p.where for p in ps.problems] == ["s.jsonl:2"]


def test_jsonl_odd_lines_keep_their_line_numbers(tmp_path):
    src = tmp_path / "o.jsonl"
    src.write_bytes(b'\xef\xbb\xbf{"prompt": "after a BOM"}\n\n   \n{"prompt": "caf\xe9 latin-1"}\n'
                    b'[1, 2]\n{"prompt": "fine"}\n{"prompt": "no newline at the end"}')
    ps = load_prompts(src)
    assert [p.messages[0]["content"] for p in ps.prompts] == ["after a BOM", "fine", "no newline at the end"]
    assert [p.where for p in ps.problems] == ["o.jsonl:4", "o.jsonl:5"]
    assert "not valid JSON" in ps.problems[0].reason and "not list" in ps.problems[1].reason
    with pytest.raises(PromptError, match="o.jsonl:4"):
        load_prompts(src, strict=True)


class _T:
    name = "m"
    revision = "r"


@pytest.mark.parametrize("samples", [1, 3])
def test_work_keys_match_the_old_code_path_and_the_reference(tmp_path, samples):
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _rows(300, seed=samples)))
    tid = "http://127.0.0.1:9/v1#m"
    cfg = HarvestConfig(prompts=str(src), teacher=tid, out=str(tmp_path / "run"), samples=samples,
                        temperature=0.7, seed=5, max_tokens=33, stop=("\n\n",), logprobs=True, top_logprobs=3)
    ps = load_prompts(src)
    with HarvestStore(cfg.out) as store:
        todo = Harvester(cfg, _T(), store, ps, tid).work()
    assert len(todo) == len(ps.prompts) * samples
    for prompt, i, key in todo:
        pd = json.loads(_old_canonical_json(_old_params(cfg.params(i))))
        assert key == _old_record_key_from_json(prompt.messages_json, tid, _old_canonical_json(pd), i)
        assert key == record_key(prompt.messages, tid, pd, i)
        assert key == record_key_from_json(prompt.messages_json, tid, _old_canonical_json(pd), i)


async def test_a_store_keyed_by_the_old_code_is_resumed_not_redone(tmp_path):
    """Rows written under the old keys (as an existing run directory holds them) count as done."""
    src = tmp_path / "p.jsonl"
    rows = _rows(60, seed=7)
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = HarvestConfig(prompts=str(src), teacher="fake", out=str(tmp_path / "run"), samples=2, seed=3,
                        concurrency=4)
    teacher = FakeTeacher()
    finished = rows[: len(rows) // 2]  # the old run got through half of the prompts
    with HarvestStore(cfg.out) as store:
        old_rows = []
        for row in finished:
            rid, messages, meta, ph, mj, meta_json = _old_fields(row)
            for i in range(cfg.samples):
                pd = json.loads(_old_canonical_json(_old_params(cfg.params(i))))
                key = _old_record_key_from_json(mj, "fake", _old_canonical_json(pd), i)
                res = await teacher.chat(messages, cfg.params(i))
                old_rows.append(completion_row(
                    key=key, prompt_id=rid, messages=messages, teacher="fake", model=teacher.name,
                    revision=teacher.revision, params=pd, sample_index=i, completion=res.completions[0],
                    latency_s=0.0, cost=0.0, attempts=1, meta=meta, messages_json=mj, prompt_hash_hex=ph,
                    meta_json=meta_json))
        store.put_rows(old_rows)
        store.set_meta("revision:fake", teacher.revision)
    rep = await run_harvest(cfg, teacher=teacher)
    assert rep.stats.skipped == len(finished) * cfg.samples
    assert rep.stats.requests == rep.stats.ok == (len(rows) - len(finished)) * cfg.samples
    with HarvestStore(cfg.out, readonly=True) as store:
        assert store.counts() == {"ok": len(rows) * cfg.samples}
        ids = {r.prompt_id for r in store.records()}
    assert ids == {_old_fields(r)[0] for r in rows}
