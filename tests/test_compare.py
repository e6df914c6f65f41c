"""ln.compare: the shapes of `questions` it takes, and a clear error, before any model loads,
for the rest."""

from __future__ import annotations

import pytest
from PIL import Image

import llava_nb as ln
from llava_nb.training.adapters import AdapterError, _compare_items

RED = Image.new("RGB", (8, 8), "red")


@pytest.mark.parametrize(
    ("questions", "message"),
    [
        ("Hi?", r"questions is a str \(for one question, wrap it in a list\)"),
        ({"Hi?": RED}, "questions is a dict; pass a list of questions"),
        (None, "questions is a NoneType; pass a list of questions"),
        ([], "nothing to compare"),
        ([("What?",)], r"questions\[0\] is \('What\?',\); give a question string or a"),
        ([("What?", RED, "extra")], r"questions\[0\] is \('What\?'"),
        (["Fine?", (3, RED)], r"questions\[1\] is \(3, "),
        ([""], r"questions\[0\] is ''"),
    ],
)
def test_bad_questions_are_refused_before_anything_loads(questions, message):
    # neither the model nor the adapter exists: the questions are checked first
    with pytest.raises(AdapterError, match=message):
        ln.compare("no/such-model", "/no/such/adapter", questions)


def test_questions_alone_or_with_images():
    items = _compare_items(["Hi?", ("Color?", RED), ["Both?", [RED, RED]], ("Text?", None)])
    assert [(q, len(images), expected) for q, images, expected in items] == [
        ("Hi?", 0, None),
        ("Color?", 1, None),
        ("Both?", 2, None),
        ("Text?", 0, None),
    ]
    assert items[1][1][0].size == (8, 8)


def test_a_dataset_gives_its_first_turns_and_answers():
    data = ln.data.load([{"image": RED, "question": "Q?", "answer": 3}, {"answer": "no image"}])
    assert [(q, expected) for q, _, expected in _compare_items(data)] == [("Q?", "3")]
    with pytest.raises(AdapterError, match="the dataset has no usable row"):
        _compare_items(ln.data.load([{"answer": "no image"}]))
