"""Reasoning fields, tool calls and conversations: harvested, stored and exported byte for byte.

The fake OpenAI server answers on loopback with a chain of thought (in ``reasoning_content``, in
``reasoning``, or as a ``<think>`` block in the content) and with tool calls whose ``arguments`` have
unusual spacing; it keeps the bytes of every answer it sent. Each stored record, re-encoded, must be
found verbatim in the raw body the server sent for its request, and so must each exported message:
a changed, dropped, re-escaped or re-ordered byte anywhere fails these tests.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3

import pytest

from stillhouse.config import ConfigError
from stillhouse.distill.export import ExportConfig, export_run, format_assistant
from stillhouse.distill.harvest import HarvestConfig, HarvestError, run_harvest
from stillhouse.distill.store import HarvestStore, canonical_json, record_key
from stillhouse.teacher.fake import FakeTeacher
from stillhouse.testing.fakeserver import FakeServerConfig, parse_faults, start_in_thread

TOOLS = [{"type": "function", "function": {"name": "calc", "description": "Evaluate «arithmetic»",
                                            "parameters": {"type": "object", "properties": {
                                                "expr": {"type": "string"}, "precision": {"type": "integer"}}}}}]
ODD = ' «é» "quoted" back\\slash tab\t \u2028 🧮 </think>'


def prompt_rows() -> list[dict]:
    rows = []
    for i in range(12):
        rows.append({"id": f"a{i}", "prompt": f"What is {10 + i} + {20 + 3 * i}?{ODD if i % 3 == 0 else ''}"})
    for i in range(6):
        rows.append({"id": f"t{i}", "messages": [{"role": "user", "content": f"Compute {i} * 7{ODD}"}],
                     "tools": TOOLS, **({"tool_choice": "none"} if i == 5 else {})})
    for i in range(4):
        rows.append({"id": f"c{i}", "messages": [{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": f"What is {i} + 1?"}],
                     "turns": [f"And {i} + 2?{ODD}", {"role": "user", "content": f"And {i} * 3?"}, f"{i} - 9?"]})
    rows.append({"id": "tool-conv", "messages": [{"role": "user", "content": "Compute 6 * 7"}], "tools": TOOLS,
                 "turns": [[{"role": "tool", "content": "42"}], "Thanks. What is 1 + 1?"]})
    rows.append({"id": "seeded", "messages": [{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": "Hello! (a seed turn)"},
                                              {"role": "user", "content": "What is 5 + 5?"}]})
    return rows


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def answers_by_request(server) -> dict[tuple[str, int | None], list[bytes]]:
    """The raw answer bodies the server sent, by (canonical messages, seed) of their request."""
    out: dict[tuple[str, int | None], list[bytes]] = {}
    for req, bodies in list(server.bodies.items()):
        body = json.loads(req)
        out.setdefault((canonical_json(body["messages"]), body.get("seed")), []).extend(bodies)
    return out


def in_raw(obj, raws) -> bool:
    """``obj`` encoded as the server encodes JSON is a byte substring of one of the raw bodies."""
    b = json.dumps(obj).encode()
    return any(b in r for r in raws)


@pytest.mark.parametrize("form", ["reasoning_content", "reasoning", "think"])
def test_reasoning_and_tool_calls_round_trip_byte_exact(tmp_path, form):
    src = write_rows(tmp_path / "p.jsonl", prompt_rows())
    cfg_server = FakeServerConfig(latency_ms=0, reasoning=form, keep_bodies=True,
                                  faults=parse_faults("429=0.05,500=0.05,truncated=0.05"), retry_after_s=0.01)
    out = tmp_path / "run"
    with start_in_thread(cfg_server) as srv:
        cfg = HarvestConfig(prompts=str(src), teacher=srv.base_url, out=str(out), samples=2, temperature=0.5,
                            seed=3, concurrency=4, backoff_s=0.01, max_attempts=8)
        rep = asyncio.run(run_harvest(cfg))
        assert rep.complete, rep.summary()
        rerun = asyncio.run(run_harvest(cfg))  # everything is done: nothing is asked again
        assert rerun.stats.requests == 0 and rerun.stats.skipped == rep.stats.ok
        answers = answers_by_request(srv.server)
    with HarvestStore(out, readonly=True) as store:
        recs = list(store.records())
    # 12 + 6 single prompts, 4 conversations of 4 turns, one of 3, one seeded: all x 2 samples
    assert len(recs) == 2 * (12 + 6 + 4 * 4 + 3 + 1)
    kinds = {"reasoning": 0, "tool_calls": 0}
    for r in recs:
        raws = answers[(canonical_json(r.messages), r.params["seed"])]
        assert in_raw(r.assistant(), raws), (r.prompt_id, r.turn, r.assistant())
        kinds["reasoning"] += r.reasoning is not None
        kinds["tool_calls"] += r.tool_calls is not None
        if r.tool_calls:
            assert r.text == "" and r.message["content"] is None and r.finish_reason == "tool_calls"
            assert r.tools == TOOLS  # as sent: the row's key order kept
        if r.prompt_id.startswith("a") and int(r.prompt_id[1:]) % 3 == 0:
            # the question's odd bytes went through the reasoning unchanged (inline, a "</think>" in the
            # reasoning ends the block early when it is split: the content itself is kept whole)
            assert ODD in (r.text if form == "think" else r.reasoning)
    # t0-t4 (t5 has tool_choice none), and tool-conv's turns 0 and 2 (a user turn with tools offered)
    assert kinds["tool_calls"] == 2 * (5 + 2) and kinds["reasoning"] == len(recs) - kinds["tool_calls"]
    assert any(r.params["extra"] and json.loads(r.params["extra"]).get("tool_choice") == "none" for r in recs)

    # export: the mode that keeps the message as it came must give the server's very bytes
    mode, key = ("inline", "reasoning_content") if form == "think" else ("field", form)
    export_run(ExportConfig(run_dir=str(out), out=str(tmp_path / "e"), heldout=0.3, reasoning=mode, reasoning_key=key))
    rows = [json.loads(x) for s in ("train", "heldout") for x in (tmp_path / "e" / f"{s}.jsonl").read_text().split("\n")[:-1]]
    assert len(rows) == 2 * (12 + 6 + 4 + 1 + 1)  # one row per conversation
    every = b"".join(b for raws in answers.values() for b in raws)
    teacher_turns = 0
    for row in rows:
        for m in row["messages"]:
            if m["role"] == "assistant" and "weight" not in m:  # the teacher's own turns
                assert json.dumps(m).encode() in every, (row["id"], m)
                teacher_turns += 1
        if row["id"] == "seeded":
            assert row["messages"][1] == {"role": "assistant", "content": "Hello! (a seed turn)", "weight": 0}
    assert teacher_turns == len(recs)
    conv = next(r for r in rows if r["id"] == "c0")
    assert conv["turn"] == 3 and [m["role"] for m in conv["messages"]] == ["system", *["user", "assistant"] * 4]
    if form != "think":  # the other modes move the reasoning, and its bytes stay the same
        export_run(ExportConfig(run_dir=str(out), out=str(tmp_path / "i"), heldout=0, reasoning="inline",
                                reasoning_template="[{reasoning}]\n{answer}"))
        for x in (tmp_path / "i" / "train.jsonl").read_text().split("\n")[:-1]:
            last = json.loads(x)["messages"][-1]
            if last["content"]:
                thought, answer = last["content"][1:].split("]\n", 1)
                assert json.dumps(thought)[1:-1].encode() in every and json.dumps(answer).encode() in every
    else:  # split out of the content: the reasoning's bytes are the block's bytes
        export_run(ExportConfig(run_dir=str(out), out=str(tmp_path / "f"), heldout=0, reasoning="field"))
        for x in (tmp_path / "f" / "train.jsonl").read_text().split("\n")[:-1]:
            last = json.loads(x)["messages"][-1]
            if last.get("reasoning_content"):
                assert json.dumps(last["reasoning_content"])[1:-1].encode() in every
                assert "<think>" not in last["content"]


def test_parquet_and_hf_keep_reasoning_and_tool_calls(tmp_path):
    import datasets
    import pyarrow.parquet as pq

    src = write_rows(tmp_path / "p.jsonl", prompt_rows())
    out = tmp_path / "run"
    asyncio.run(run_harvest(HarvestConfig(prompts=str(src), teacher="fake", out=str(out)),
                            teacher=FakeTeacher(reasoning="reasoning_content")))
    export_run(ExportConfig(run_dir=str(out), out=str(tmp_path / "j"), heldout=0))
    want = [json.loads(x) for x in (tmp_path / "j" / "train.jsonl").read_text().split("\n")[:-1]]
    export_run(ExportConfig(run_dir=str(out), out=str(tmp_path / "p"), heldout=0, format="parquet"))
    export_run(ExportConfig(run_dir=str(out), out=str(tmp_path / "h"), heldout=0, format="hf"))
    for got in (pq.read_table(tmp_path / "p" / "train.parquet").to_pylist(),
                datasets.load_from_disk(str(tmp_path / "h"))["train"].to_list()):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert [{k: v for k, v in m.items() if v is not None} for m in g["messages"]] == \
                [{k: v for k, v in m.items() if v is not None} for m in w["messages"]]
            assert (json.loads(g["tools"]) if g["tools"] else None) == w.get("tools")


def test_everything_that_changes_the_answer_is_in_the_key(tmp_path):
    base = {"id": "x", "messages": [{"role": "user", "content": "Compute 2 + 3"}]}
    variants = [base, {**base, "tools": TOOLS}, {**base, "tools": TOOLS, "tool_choice": "none"},
                {**base, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "calc"}}},
                {**base, "response_format": {"type": "json_object"}}, {**base, "reasoning_effort": "high"},
                {**base, "tools": [{"type": "function", "function": {  # the same schema, keys in another order
                    "parameters": TOOLS[0]["function"]["parameters"], "name": "calc",
                    "description": TOOLS[0]["function"]["description"]}}]}]
    keys = set()
    for i, row in enumerate(variants):
        src = write_rows(tmp_path / f"p{i}.jsonl", [row])
        out = tmp_path / "run"  # one run directory: each variant is new work, never a skip
        rep = asyncio.run(run_harvest(HarvestConfig(prompts=str(src), teacher="fake", out=str(out))))
        assert rep.stats.ok == 1 and rep.stats.skipped == 0, i
    for cli in ({"reasoning_effort": "low"}, {"extra_body": '{"chat_template_kwargs": {"enable_thinking": true}}'},
                {"tools": str(write_tools(tmp_path))}, {"tools": str(write_tools(tmp_path)), "tool_choice": "none"}):
        src = write_rows(tmp_path / "base.jsonl", [base])
        rep = asyncio.run(run_harvest(HarvestConfig(prompts=str(src), teacher="fake", out=str(out), **cli)))
        assert rep.stats.ok == 1 and rep.stats.skipped == 0, cli
        again = asyncio.run(run_harvest(HarvestConfig(prompts=str(src), teacher="fake", out=str(out), **cli)))
        assert again.stats.skipped == 1 and again.stats.requests == 0, cli
    with HarvestStore(out, readonly=True) as store:
        for r in store.records():
            assert record_key(r.messages, r.teacher, r.params, r.sample_index) == r.key  # the reference form
            keys.add(r.key)
    assert len(keys) == len(variants) + 4
    src = write_rows(tmp_path / "both.jsonl", [base, {**base, "id": "y", "tools": TOOLS}])
    loaded = asyncio.run(run_harvest(HarvestConfig(prompts=str(src), teacher="fake", out=str(tmp_path / "b"))))
    assert loaded.stats.ok == 2 and loaded.duplicates == 0  # same messages, other tools: not merged


def write_tools(tmp_path):
    """A tools file with another tool than TOOLS (the same tools from a file or a row make the same request)."""
    p = tmp_path / "tools.json"
    p.write_text(json.dumps([{"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"q": {"type": "string"}}}}}]))
    return p


def test_bad_request_settings_fail_before_any_call(tmp_path):
    with pytest.raises(ConfigError, match="tools="):
        HarvestConfig(prompts="builtin:arithmetic:2", teacher="fake", out=str(tmp_path / "r"), tools="/nope.json")
    (tmp_path / "t.json").write_text('{"not": "a list"}')
    with pytest.raises(ConfigError, match="'tools' must be a list"):
        HarvestConfig(prompts="builtin:arithmetic:2", teacher="fake", out=str(tmp_path / "r"),
                      tools=str(tmp_path / "t.json"))
    with pytest.raises(ConfigError, match="extra_body"):
        HarvestConfig(prompts="builtin:arithmetic:2", teacher="fake", out=str(tmp_path / "r"), extra_body="[1]")
    with pytest.raises(ConfigError, match="temperature"):
        HarvestConfig(prompts="builtin:arithmetic:2", teacher="fake", out=str(tmp_path / "r"),
                      extra_body='{"temperature": 1}')
    with pytest.raises(ConfigError, match="tool_choice"):
        HarvestConfig(prompts="builtin:arithmetic:2", teacher="fake", out=str(tmp_path / "r"), tool_choice="always")
    bad = write_rows(tmp_path / "bad.jsonl", [{"prompt": "x", "tools": "calc"}, {"prompt": "y", "turns": []},
                                              {"messages": [{"role": "user", "content": "z"}], "turns": [
                                                  {"role": "assistant", "content": "no"}]}])
    from stillhouse.distill.prompts import PromptError, load_prompts

    with pytest.raises(PromptError) as err:
        load_prompts(bad, strict=True)
    assert "'tools' must be a list" in str(err.value) and "'turns' must be a non-empty list" in str(err.value)
    assert "'turns[0]' is the assistant's" in str(err.value)


def test_a_local_teacher_refuses_request_fields(tmp_path, tiny_teacher):
    with pytest.raises(HarvestError, match="serve it with `stillhouse serve`"):
        asyncio.run(run_harvest(HarvestConfig(prompts="builtin:arithmetic:2", teacher="hf:/tiny",
                                              out=str(tmp_path / "r"), reasoning_effort="high"), teacher=tiny_teacher))
    src = write_rows(tmp_path / "p.jsonl", [{"id": "t", "prompt": "2 + 3?", "tools": TOOLS},
                                            {"id": "c", "prompt": "2 + 3?", "turns": ["and 4 + 4?"]}])
    rep = asyncio.run(run_harvest(HarvestConfig(prompts=str(src), teacher="hf:/tiny", out=str(tmp_path / "s"),
                                                max_tokens=4), teacher=tiny_teacher))
    with HarvestStore(tmp_path / "s", readonly=True) as store:
        recs = {(r.prompt_id, r.turn): r for r in store.records(status=None)}
    assert recs[("t", 0)].status == "error" and "takes no request fields" in recs[("t", 0)].error
    assert recs[("c", 0)].status == recs[("c", 1)].status == "ok"  # a conversation is plain chat for it
    assert recs[("c", 1)].messages[1] == {"role": "assistant", "content": recs[("c", 0)].text}
    assert rep.stats.errors == 1


def test_a_version_1_store_is_read_and_upgraded(tmp_path):
    out = tmp_path / "run"
    cfg = HarvestConfig(prompts="builtin:arithmetic:20", teacher="fake", out=str(out))
    asyncio.run(run_harvest(cfg))
    con = sqlite3.connect(out / "harvest.sqlite")
    con.execute("ALTER TABLE records DROP COLUMN turn")
    con.execute("ALTER TABLE records DROP COLUMN message")
    con.execute("UPDATE meta SET v='1' WHERE k='schema_version'")
    con.commit()
    con.close()
    with HarvestStore(out, readonly=True) as store:  # read as it is
        old = [(r.key, r.text, r.turn, r.message) for r in store.records()]
    assert len(old) == 20 and all(t == 0 and m is None for _, _, t, m in old)
    rep = asyncio.run(run_harvest(cfg))  # opened for writing: upgraded, and every record still counts
    assert rep.stats.skipped == 20 and rep.stats.requests == 0
    with HarvestStore(out) as store:
        assert store.get_meta("schema_version") == "2"
        assert [(r.key, r.text, r.turn, r.message) for r in store.records()] == old


def test_format_assistant_modes():
    field = {"role": "assistant", "content": "A", "reasoning": "R", "tool_calls": [1]}
    assert format_assistant(field, "field", "reasoning") == field
    assert list(format_assistant(field, "field", "reasoning_content")) == ["role", "content", "reasoning_content",
                                                                            "tool_calls"]
    assert format_assistant(field, "strip") == {"role": "assistant", "content": "A", "tool_calls": [1]}
    assert format_assistant(field, "inline", template="<t>{reasoning}</t>{answer}")["content"] == "<t>R</t>A"
    inline = {"role": "assistant", "content": "<think>R</think>\n\nA"}
    assert format_assistant(inline, "inline") == inline
    assert format_assistant(inline, "field") == {"role": "assistant", "content": "A", "reasoning_content": "R"}
    assert format_assistant(inline, "strip") == {"role": "assistant", "content": "A"}
    plain = {"role": "assistant", "content": "just text"}
    assert all(format_assistant(plain, m) == plain for m in ("field", "inline", "strip"))
