"""ln.data: the formats it reads, what validate() reports, and the labels training sees."""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

import llava_nb as ln
from llava_nb.data import DataError


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name, color in (("red.png", "red"), ("blue.png", "blue")):
        Image.new("RGB", (40, 30), color).save(folder / name)
    (folder / "broken.jpg").write_bytes(b"not a picture")
    return folder


def llava_json(images):
    return [
        {
            "id": "ok",
            "image": "red.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat color is it?"},
                {"from": "gpt", "value": "Red."},
                {"from": "human", "value": "Are you sure?"},
                {"from": "gpt", "value": "Yes, it is red."},
            ],
        },
        {
            "id": "missing",
            "image": "nope.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat?"},
                {"from": "gpt", "value": "X."},
            ],
        },
        {
            "id": "broken",
            "image": "broken.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat?"},
                {"from": "gpt", "value": "X."},
            ],
        },
        {
            "id": "no-tag",
            "image": "blue.png",
            "conversations": [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "X."}],
        },
        {
            "id": "empty",
            "image": "blue.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat?"},
                {"from": "gpt", "value": "  "},
            ],
        },
        {
            "id": "order",
            "image": "blue.png",
            "conversations": [
                {"from": "gpt", "value": "Hi"},
                {"from": "human", "value": "<image>"},
            ],
        },
        {
            "id": "text-only",
            "conversations": [
                {"from": "human", "value": "Hi?"},
                {"from": "gpt", "value": "Hello."},
            ],
        },
    ]


def test_llava_json_loads_and_validate_lists_each_problem(images, tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(llava_json(images)))
    data = ln.data.load(path, image_folder=images)
    assert len(data) == 7
    first = data[0]
    assert [(t.question, t.answer) for t in first.turns] == [
        ("What color is it?", "Red."),
        ("Are you sure?", "Yes, it is red."),
    ]
    assert first.turns[0].images == [str(images / "red.png")] and first.turns[1].images == []
    report = data.validate()
    problems = {p.id: p.message for p in report.problems}
    assert set(problems) == {"missing", "broken", "no-tag", "empty", "order"}
    assert "not found" in problems["missing"] and "nope.png" in problems["missing"]
    assert "not a readable image" in problems["broken"]
    assert "<image>" in problems["no-tag"]
    assert "empty" in problems["empty"]
    assert "alternate" in problems["order"]
    assert report.usable == 2 and not report.ok
    assert report.summary() == "7 rows: 2 usable, 5 skipped"
    assert "| missing |" in report._repr_markdown_()


def test_chat_messages_rows_load_as_conversations(images):
    import io

    png = io.BytesIO()
    Image.new("RGB", (8, 8), "green").save(png, format="PNG")
    rows = [
        {  # Hugging Face / TRL: messages with image parts, the images in their own column
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hue?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
                {"role": "user", "content": "And now?"},
                {"role": "assistant", "content": "Still red."},
            ],
            "images": [str(images / "red.png")],
        },
        {  # a datasets Image feature
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hue?"}]},
                {"role": "assistant", "content": "Green."},
            ],
            "images": [{"bytes": png.getvalue(), "path": None}],
        },
        {  # a system message goes before the first question, as the server puts it
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hue?"}]},
                {"role": "assistant", "content": "Red."},
            ],
            "images": [str(images / "red.png")],
        },
        {"messages": [{"role": "user", "content": "Hi"}, "nonsense"], "images": []},
        {  # the images inside the messages' image parts
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": str(images / "red.png")}]},
                {"role": "assistant", "content": "Red."},
            ],
        },
        {"messages": "Hi", "images": []},
        {"image": {"bytes": b"not a picture", "path": None}, "question": "Hue?", "answer": "?"},
    ]
    data = ln.data.load(rows)
    assert [(t.question, t.answer) for t in data[0].turns] == [
        ("Hue?", "Red."),
        ("And now?", "Still red."),
    ]
    assert data[0].turns[0].images == [str(images / "red.png")]
    assert data[1].turns[0].images[0].getpixel((0, 0)) == (0, 128, 0)
    assert [(t.question, t.answer) for t in data[2].turns] == [("Be brief.\n\nHue?", "Red.")]
    assert data[2].turns[0].images == [str(images / "red.png")]
    assert [(t.answer, t.images) for t in data[4].turns] == [("Red.", [str(images / "red.png")])]
    report = data.validate()
    assert [p.row for p in report.problems] == [3, 5, 6]
    assert "malformed" in report.problems[0].message
    assert report.problems[1].message == "messages is a str; use a list of messages"
    assert "not a readable image" in report.problems[2].message


def test_image_parts_in_transformers_chat_format_name_their_image(images):
    """transformers' chat templates take an image part's picture under "image", "url" or
    "path"; rows written for them load with that image (relative to image_folder)."""
    rows = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", key: "red.png"},
                        {"type": "text", "text": "What?"},
                    ],
                },
                {"role": "assistant", "content": "Red."},
            ]
        }
        for key in ("image", "url", "path")
    ]
    data = ln.data.load(rows, image_folder=images)
    assert [s.images for s in data] == [[str(images / "red.png")]] * 3
    assert data.validate().ok


def test_validate_with_a_model_finds_rows_too_long(images, tiny_llava):
    rows = [
        {"image": str(images / "red.png"), "question": "Color?", "answer": "Red."},
        {"image": str(images / "red.png"), "question": "Color? " * 300, "answer": "Red."},
    ]
    report = ln.data.load(rows).validate(tiny_llava)
    assert [p.row for p in report.problems] == [1]
    assert report.problems[0].message.startswith("too long:")
    assert "limit 1024" in report.problems[0].message
    assert ln.data.load(rows).validate(tiny_llava, max_length=10).usable == 0
    for bad in (0, -5, 2.5, True, "100"):
        with pytest.raises(DataError, match=f"max_length must be a whole number >= 1, got {bad!r}"):
            ln.data.load(rows).validate(tiny_llava, max_length=bad)


def test_csv_jsonl_list_and_caption_folder(images, tmp_path):
    with open(tmp_path / "rows.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "question", "answer"])
        writer.writerow(["images/red.png", "Color?", "Red."])
        writer.writerow(["images/red.png", "Lines?", "Line one\nline two, and\u2028more."])
    data = ln.data.load(tmp_path / "rows.csv")  # relative to the file's folder
    assert data[0].turns[0].images == [str(tmp_path / "images" / "red.png")]
    assert data.validate().ok and len(data) == 2  # a quoted line break is the answer's
    assert data[1].turns[0].answer == "Line one\nline two, and\u2028more."

    rows = [
        {"image": "blue.png", "caption": "A blue square."},
        {"image": "red.png", "caption": "A\u2028B"},
    ]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    data = ln.data.load(tmp_path / "rows.jsonl", image_folder=images)
    turn = data[0].turns[0]
    assert (turn.question, turn.answer) == (ln.data.CAPTION_PROMPT, "A blue square.")
    assert data[1].turns[0].answer == "A\u2028B"  # a line break in a JSON string is text

    picture = Image.new("RGB", (8, 8), "green")
    data = ln.data.load([{"image": picture, "question": "Q?", "answer": "A."}])
    assert data[0].messages()[0]["content"][0]["image"].size == (8, 8)
    top, bottom = Image.new("RGB", (224, 224), "green"), Image.new("RGB", (224, 224), "green")
    bottom.paste("red", (0, 200, 224, 224))  # differs only far below the first rows
    fingerprints = {
        ln.data.load([{"image": p, "question": "Q?", "answer": "A."}]).fingerprint()
        for p in (top, bottom)
    }
    assert len(fingerprints) == 2  # in-memory images are told apart by every pixel

    with pytest.raises(DataError, match="images but no captions file"):
        ln.data.load(images)
    with open(images / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([["file_name", "text"], ["red.png", "Red."], ["blue.png", "Blue."]])
    data = ln.data.load(images)
    assert [s.turns[0].answer for s in data] == ["Red.", "Blue."]
    assert data.validate().ok


def test_bad_sources_give_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="nope.json' not found; check the path"):
        ln.data.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot be read"):
        ln.data.load(tmp_path / "bad.json")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(DataError, match="unknown format"):
        ln.data.load(tmp_path / "x.txt")
    with pytest.raises(DataError, match="no rows"):
        ln.data.load([])
    with pytest.raises(DataError, match="image folder"):
        ln.data.load([{"image": "a.png", "answer": "x"}], image_folder=tmp_path / "none")
    with pytest.raises(DataError, match="cannot read training data from a int"):
        ln.data.load(3)
    report = ln.data.load([{"question": "Q?", "answer": "A."}, "text"]).validate()
    assert [p.message for p in report.problems] == [
        "no image; give an 'image' column",
        "row is a str, not a dict",
    ]


def test_a_bad_jsonl_line_is_named_by_its_line_in_the_file(tmp_path):
    good = json.dumps({"image": "a.png", "answer": "a"})
    (tmp_path / "bad.jsonl").write_text(f'{good}\n\n{good}\n{{"image": "a.png" "answer": "a"}}\n')
    with pytest.raises(DataError, match="line 4 is not valid JSON .* at column 19"):
        ln.data.load(tmp_path / "bad.jsonl")


def test_numbers_are_text_and_other_values_are_named(images):
    red = str(images / "red.png")
    data = ln.data.load(
        [
            {"image": red, "question": "How many?", "answer": 3},
            {"image": red, "question": 2.5, "answer": "Half."},
            {"image": red, "answer": ["a", "b"]},
            {"image": red, "answer": True},
            {"image": red, "question": {"q": 1}, "answer": "x"},
            {"image": red, "answer": float("nan")},  # an empty cell of a DataFrame
            {"image": red, "question": float("nan"), "answer": 2.0},  # a column with a gap
            {
                "image": red,
                "conversations": [{"from": "human", "value": 7}, {"from": "gpt", "value": 8}],
            },
        ]
    )
    assert [(t.question, t.answer) for t in data[0].turns + data[1].turns] == [
        ("How many?", "3"),
        ("2.5", "Half."),
    ]
    assert [p.message for p in data.validate().problems] == [
        "answer is a list, not text",
        "answer is a bool, not text",
        "question is a dict, not text",
        "answer is empty",
        'has an image but no "<image>" in its first question',
    ]
    assert [(t.question, t.answer) for t in data[6].turns] == [(ln.data.CAPTION_PROMPT, "2")]
    assert data[7].problem and "not text" not in data[7].problem


def test_a_row_with_no_usable_column_names_the_columns_found(tmp_path):
    (tmp_path / "rows.csv").write_text("image;question;answer\na.png;Q?;A.\n")
    report = ln.data.load(tmp_path / "rows.csv").validate()
    assert "(found columns: 'image;question;answer')" in report.problems[0].message


def test_a_json_object_holding_one_list_of_rows_is_read_as_those_rows(tmp_path):
    rows = [{"image": "a.png", "answer": "A."}, {"image": "b.png", "answer": "B."}]
    for wrapped in ({"train": rows}, {"data": rows}):
        (tmp_path / "rows.json").write_text(json.dumps(wrapped))
        assert [s.turns[0].answer for s in ln.data.load(tmp_path / "rows.json")] == ["A.", "B."]
    (tmp_path / "row.json").write_text(json.dumps(rows[0]))  # one object: one row
    assert len(ln.data.load(tmp_path / "row.json")) == 1
    turns = [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]
    (tmp_path / "row.json").write_text(json.dumps({"conversations": turns}))  # a row, of turns
    assert [t.answer for t in ln.data.load(tmp_path / "row.json")[0].turns] == ["Hello."]
    (tmp_path / "two.json").write_text(json.dumps({"train": rows, "test": rows}))
    report = ln.data.load(tmp_path / "two.json").validate()
    assert "found columns: 'train', 'test'" in report.problems[0].message


def test_a_captions_json_mapping_image_names_to_captions(images):
    """A folder's captions.json written as {"file.jpg": "caption"} was read as one row whose
    columns were the file names ("no answer"); other shapes get one line naming the forms."""
    captions = {"red.png": "A red square.", "blue.png": "A blue square.", "broken.jpg": 3}
    (images / "captions.json").write_text(json.dumps(captions))
    data = ln.data.load(images)
    assert [(s.id, s.turns[0].question, s.turns[0].answer) for s in data] == [
        ("red.png", ln.data.CAPTION_PROMPT, "A red square."),
        ("blue.png", ln.data.CAPTION_PROMPT, "A blue square."),
        ("broken.jpg", ln.data.CAPTION_PROMPT, "3"),
    ]
    assert data[1].images == [str(images / "blue.png")]
    assert [p.row for p in data.validate().problems] == [2]  # broken.jpg is no picture

    (images / "captions.json").write_text(json.dumps({"red.png": "Red.", "license": "CC0"}))
    with pytest.raises(DataError, match=r"^data file '.*captions\.json' maps image names to "
                       r"captions, but its key 'license' is not an image file name; use "
                       r'\{"file\.jpg": "caption", \.\.\.\} or a list of rows$'):  # fmt: skip
        ln.data.load(images)
    (images / "captions.json").write_text(json.dumps("A red square."))
    with pytest.raises(DataError, match=r"^data file '.*' holds a str, not rows; use a list of "
                       r"rows \(LLaVA JSON\) or, for captions, \{"):  # fmt: skip
        ln.data.load(images)
    (images / "captions.json").unlink()
    with pytest.raises(DataError, match=r"captions\.jsonl or captions\.json \(\{\"file\.jpg\""):
        ln.data.load(images)


def test_split_is_seeded_and_keeps_both_sides(images):
    rows = [{"image": str(images / "red.png"), "answer": f"Red {i}."} for i in range(10)]
    data = ln.data.load(rows)
    train, held = data.split(0.2, seed=1)
    assert (len(train), len(held)) == (8, 2)
    assert isinstance(data[:4], ln.data.Dataset) and [s.id for s in data[:4]] == [
        s.id for s in list(data)[:4]
    ]
    assert [s.id for s in data.split(0.2, seed=1)[1]] == [s.id for s in held]
    assert data.fingerprint() != train.fingerprint()
    with pytest.raises(DataError, match="cannot split"):
        data.split(1.5)
    for bad in ("0.1", None, True):
        with pytest.raises(DataError, match=r"eval_fraction must be a number.*split\(0.1\)"):
            data.split(bad)


# ---------------------------------------------------------------- labels


def _labelled(processor, sample):
    from llava_nb.training.collate import IGNORE, encode

    encoded = encode(processor, sample)
    ids, labels = encoded["input_ids"], encoded["labels"]
    trained = processor.tokenizer.decode(ids[labels != IGNORE])
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return encoded, trained, image_id


@pytest.mark.parametrize("fixture", ["tiny_llava", "tiny_llava_next"])
def test_only_the_answers_are_labels(fixture, images, request):
    from transformers import AutoProcessor

    from llava_nb.chat import Chat, Turn
    from llava_nb.training.collate import IGNORE, Collator

    checkpoint = request.getfixturevalue(fixture)
    processor = AutoProcessor.from_pretrained(checkpoint)
    data = ln.data.load(
        [
            {
                "image": ["red.png", "blue.png"],
                "conversations": [
                    {"from": "human", "value": "<image>\n<image>\nWhich is red?"},
                    {"from": "gpt", "value": "The first one."},
                    {"from": "human", "value": "And the other?"},
                    {"from": "gpt", "value": "Blue."},
                ],
            },
            {"image": "red.png", "question": "Color?", "answer": "Red."},
        ],
        image_folder=images,
    )
    encoded, trained, image_id = _labelled(processor, data[0])
    ids, labels = encoded["input_ids"], encoded["labels"]
    eos = processor.tokenizer.eos_token
    # every answer with its end-of-turn token, nothing else: no prompt, no image token
    assert trained.replace(" ", "") == f"Thefirstone.{eos}Blue.{eos}"
    assert (ids == image_id).sum() > 2 and (labels[ids == image_id] == IGNORE).all()

    # the prompt is the one a Chat builds at inference time for the same conversation
    chat = Chat(checkpoint)
    red, blue = (Image.open(images / n).convert("RGB") for n in ("red.png", "blue.png"))
    chat._turns = [Turn("Which is red?", [red, blue], "The first one.")]
    prompt = processor.apply_chat_template(
        chat.messages("And the other?"), add_generation_prompt=True, tokenize=True
    )
    prompt = prompt["input_ids"] if isinstance(prompt, dict) else prompt
    prompt = list(prompt[0]) if isinstance(prompt[0], list) else list(prompt)
    assert ids[: len(prompt)].tolist() == prompt
    # ... and what follows the prompt, to the end, is the last answer, all of it trained
    rest = processor.tokenizer.decode(ids[len(prompt) :]).replace(" ", "")
    assert rest == f"Blue.{eos}" and (labels[len(prompt) :] != IGNORE).all()

    # padding is masked too, and batches of different lengths stack
    second = _labelled(processor, data[1])[0]
    batch = Collator(processor.tokenizer.pad_token_id)([encoded, second])
    short = len(second["input_ids"])
    assert batch["input_ids"].shape == (2, len(ids))
    assert (batch["labels"][1, short:] == IGNORE).all()
    assert (batch["attention_mask"][1, short:] == 0).all()
    assert batch["pixel_values"].shape[0] == 3  # two images, then one


def test_an_answer_that_writes_the_image_placeholder_is_trained_as_text(tiny_llava, images):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_llava)
    rows = [{"image": "red.png", "question": "Which tag?", "answer": "Use <image> here."}]
    data = ln.data.load(rows, image_folder=images)
    encoded, trained, image_id = _labelled(processor, data[0])
    alone = processor(text="<image>", images=[Image.open(images / "red.png")], return_tensors="pt")
    assert (encoded["input_ids"] == image_id).sum() == (alone["input_ids"] == image_id).sum()
    eos = processor.tokenizer.eos_token
    assert trained.replace(" ", "") == f"Use<\u200bimage>here.{eos}"


def test_spreadsheet_column_names_are_read_as_the_formats_name_them(images, tmp_path):
    """A CSV exported with "Image,Caption", or written "image, caption" (a space after the
    comma), had no answer column: every row was skipped."""
    (tmp_path / "upper.csv").write_text("Image,Caption\nred.png,A red square.\n")
    (tmp_path / "spaced.csv").write_text("image, question, answer\nred.png, Color?, Red.\n")
    for name, turn in (("upper.csv", (ln.data.CAPTION_PROMPT, "A red square.")),
                       ("spaced.csv", ("Color?", "Red."))):  # fmt: skip
        data = ln.data.load(tmp_path / name, image_folder=images)
        assert data.validate().ok, data.validate()
        assert (data[0].turns[0].question, data[0].turns[0].answer) == turn
        assert data[0].turns[0].images == [str(images / "red.png")]
    both = ln.data.load([{"Caption": "other", "caption": "exact", "image": "red.png"}], images)
    assert both[0].turns[0].answer == "exact"


def test_a_sharegpt_system_turn_goes_before_the_first_question(images):
    """ShareGPT-style conversations may open with {"from": "system"}: the row was skipped
    ("turns alternate"); it is read as a system message is in chat messages."""
    row = {
        "image": "red.png",
        "conversations": [
            {"from": "system", "value": "Answer in one word."},
            {"from": "human", "value": "<image>\nWhat color is it?"},
            {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "Sure?"},
            {"from": "gpt", "value": "Yes."},
        ],
    }
    data = ln.data.load([row], image_folder=images)
    assert data.validate().ok, data.validate()
    first = data[0].turns[0]
    assert first.question == "Answer in one word.\n\nWhat color is it?" and first.answer == "Red."
    assert first.images == [str(images / "red.png")] and len(data[0].turns) == 2
    as_messages = ln.data.load(
        [
            {
                "images": ["red.png"],
                "messages": [
                    {"role": "system", "content": "Answer in one word."},
                    {"role": "user", "content": "<image>What color is it?"},
                    {"role": "assistant", "content": "Red."},
                ],
            }
        ],
        image_folder=images,
    )
    assert as_messages[0].turns[0].question == first.question
    bad = [
        {"image": "red.png", "conversations": [{"from": "system", "value": "Hi."}]},
        {"conversations": [{"from": "system", "value": "Hi."}, {"from": "gpt", "value": "X."}]},
    ]
    assert [p.message for p in ln.data.load(bad, image_folder=images).validate().problems] == [
        "conversations has a system turn and no question",
        "turn 1 is from 'gpt'; turns alternate human, gpt",
    ]


@pytest.mark.parametrize("fixture", ["tiny_llava", "tiny_llava_next"])
def test_checking_lengths_counts_what_training_encodes(fixture, request):
    """The length check counts tokens without running the image processor; its counts are
    those of the encoded samples, for images of any size and shape, several per row."""
    from transformers import AutoProcessor

    from llava_nb.training.collate import IGNORE, ImageTokens, encode, measure

    processor = AutoProcessor.from_pretrained(request.getfixturevalue(fixture))
    picture = lambda w, h: Image.new("RGB", (w, h), (w % 256, h % 256, 90))  # noqa: E731
    rows = [
        {"image": picture(w, h), "question": "Color?", "answer": "Red, it is."}
        for w, h in ((40, 30), (30, 40), (200, 50), (50, 200), (640, 480), (33, 97), (1, 1))
    ]
    rows += [
        {
            "images": [picture(64, 32), picture(20, 90)],
            "conversations": [
                {"from": "human", "value": "<image>\n<image>\nSame?"},
                {"from": "gpt", "value": "No: one writes <image>."},
                {"from": "human", "value": "Why?"},
                {"from": "gpt", "value": "Shapes."},
            ],
        },
        {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hi."}]},
    ]
    data = ln.data.load(rows)
    image_tokens = ImageTokens(processor)
    for sample in data:
        encoded = encode(processor, sample)
        expected = (len(encoded["input_ids"]), int((encoded["labels"] != IGNORE).sum()))
        assert measure(processor, sample, image_tokens) == expected, sample.id


def test_checking_rows_does_not_process_their_pixels(tiny_llava, monkeypatch):
    """Checking a row ran the image processor on its images: 16 ms a row for 1024-pixel
    photos on the tiny model, hours for LLaVA's 665k rows before training began. Now it runs
    once per image size (on a blank image, to count its tokens), whatever the number of rows.
    Counted, not timed: a ratio of two timings failed on a loaded machine."""
    from llava_nb.training.train import _bad_rows, load_processor_and_config

    processor, _ = load_processor_and_config(tiny_llava)
    runs: list[int] = []
    preprocess = processor.image_processor.preprocess

    def counted(images, *args, **kwargs):
        runs.append(len(images) if isinstance(images, list) else 1)
        return preprocess(images, *args, **kwargs)

    monkeypatch.setattr(processor.image_processor, "preprocess", counted)
    pictures = [Image.new("RGB", (size, size), "red") for size in (1024, 512)]
    rows = [{"image": pictures[i % 2], "question": "Q?", "answer": "A."} for i in range(40)]
    assert _bad_rows(ln.data.load(rows), processor, 1024) == []
    assert sum(runs) <= len(pictures), runs  # a blank image per size at most, not 40 rows
