"""Teacher spec strings: every accepted form, the errors for the rest, and make_teacher."""

from __future__ import annotations

import os

import pytest

from stillhouse.teacher.fake import FakeTeacher
from stillhouse.teacher.spec import TeacherSpec, make_teacher, parse_spec


@pytest.mark.parametrize("text,kind,target,model", [
    ("bundled", "bundled", "", None),
    ("  bundled ", "bundled", "", None),
    ("fake", "fake", "", None),
    ("fake:7", "fake", "7", None),
    ("http://127.0.0.1:8000/v1", "http", "http://127.0.0.1:8000/v1", None),
    ("http://127.0.0.1:8000/v1/", "http", "http://127.0.0.1:8000/v1", None),
    ("https://api.example.com/v1#gpt-x", "http", "https://api.example.com/v1", "gpt-x"),
    ("hf:/models/smol", "hf", "/models/smol", None),
    ("gguf:/models/m.gguf", "gguf", "/models/m.gguf", None),
])
def test_accepted_forms(text, kind, target, model):
    ts = parse_spec(text)
    assert (ts.kind, ts.target, ts.model) == (kind, target, model)
    assert parse_spec(str(ts)) == ts  # str() writes a spec that parses back to the same thing


def test_relative_paths_become_absolute():
    ts = parse_spec("hf:models/x")
    assert ts.target == os.path.abspath("models/x")
    assert parse_spec("gguf:~/m.gguf").target == os.path.expanduser("~/m.gguf")


@pytest.mark.parametrize("text,fragment", [
    ("", "unknown teacher spec"),
    ("gpt-4", "unknown teacher spec"),
    ("fake:abc", "integer"),
    ("http://127.0.0.1:8000", "ending in /v1"),
    ("hf:", "give a path"),
    ("gguf:", "give a path"),
])
def test_rejected_forms_say_what_is_accepted(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_spec(text)


def test_is_local():
    assert [parse_spec(s).is_local for s in ("bundled", "hf:/x", "gguf:/x.gguf", "fake", "http://h:1/v1")] == [
        True, True, True, False, False]


def test_make_teacher_fake_and_missing_local_files(tmp_path):
    teacher = make_teacher("fake:5")
    assert isinstance(teacher, FakeTeacher) and teacher.revision == "fake-5"
    from stillhouse.teacher.bundled import ModelNotFound

    with pytest.raises(ModelNotFound, match="does not exist"):
        make_teacher(f"gguf:{tmp_path}/none.gguf")
    with pytest.raises(ModelNotFound, match="config.json"):
        make_teacher(f"hf:{tmp_path}")


def test_spec_objects_are_accepted_too():
    assert isinstance(make_teacher(TeacherSpec("fake", "2")), FakeTeacher)
