"""ln.compare: the shapes of `questions` it takes, and a clear error, before any model loads,
for the rest."""

from __future__ import annotations

import pytest
from PIL import Image

import llava_nb as ln
from llava_nb.training.adapters import AdapterError, _compare_items

from .test_chat import plain_greedy_answer, user_message

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


@pytest.mark.parametrize("decoding", ["0", "1"])  # plain generate; the static-cache decoder
def test_compare_answers_as_plain_transformers_and_plain_peft(
    tiny_llava, photo, tmp_path, monkeypatch, decoding
):
    """Base and tuned answers alternate on one model (its conversation cache, its adapter
    switch): each must be what a fresh plain model, or the plain PEFT model, answers greedily."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from llava_nb import decoding as decoder

    def base():
        return AutoModelForImageTextToText.from_pretrained(tiny_llava).eval()

    # init_lora_weights=False: B is random, not zero, so the tuned answers differ
    lora = LoraConfig(
        r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)", init_lora_weights=False
    )
    get_peft_model(base(), lora).save_pretrained(tmp_path / "adapter")
    questions = [("What is in the picture?", photo), "And in words?", ("This one?", RED)]
    monkeypatch.setenv(decoder.ENV, decoding)
    table = ln.compare(ln.Model(tiny_llava), tmp_path / "adapter", questions, max_new_tokens=8)

    processor = AutoProcessor.from_pretrained(tiny_llava)
    tuned = PeftModel.from_pretrained(base(), tmp_path / "adapter").eval()
    expected = []
    for item in questions:
        question, images = (item, []) if isinstance(item, str) else (item[0], [item[1]])
        row = {}
        for label, model in (("base", base()), ("tuned", tuned)):
            messages = [user_message(question, images)]
            row[label] = plain_greedy_answer(model, processor, messages, 8).strip()
        expected.append(row)
    assert [{k: row[k] for k in ("base", "tuned")} for row in table.rows] == expected
    assert any(row["base"] != row["tuned"] for row in expected)  # the adapter really acts
