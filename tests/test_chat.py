"""Chat: turns and images across turns, exact greedy answers, interrupts, save/load."""

import json
import os
import signal
import threading
from pathlib import Path

import pytest
from PIL import Image

from llava_nb.chat import Chat, ChatFileError, Turn, same_turns
from llava_nb.errors import LlavaError
from llava_nb.images import ImageError
from llava_nb.models import Model


def plain_greedy_answer(model, processor, messages, max_new_tokens: int) -> str:
    """What plain transformers `generate` answers greedily to `messages` (chat format)."""
    import torch

    inputs = processor.apply_chat_template(
        messages,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    return processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def user_message(question: str, images) -> dict:
    content = [{"type": "image", "image": image} for image in images]
    return {"role": "user", "content": [*content, {"type": "text", "text": question}]}


def _plain_transformers_answers(path, turns, max_new_tokens):
    """What plain transformers answers, turn by turn, with the same processor chat format."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    messages, answers = [], []
    for question, images in turns:
        messages.append(user_message(question, images))
        answer = plain_greedy_answer(model, processor, messages, max_new_tokens)
        answers.append(answer)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return answers


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_greedy_answers_equal_plain_transformers(kind, request, photo):
    path = request.getfixturevalue(f"tiny_{kind}")
    square = Image.new("RGB", (64, 64), (20, 200, 30))
    turns = [
        ("What is in this picture?", [photo]),
        ("And what color is it?", []),
        ("Compare it with this one.", [square]),
    ]
    chat = Chat(path, max_new_tokens=24)
    ours = [chat.ask(question, image=images or None) for question, images in turns]
    assert ours == _plain_transformers_answers(path, turns, 24)
    assert all(isinstance(answer, str) and answer for answer in ours)


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_image_placeholder_typed_as_text_is_text(kind, request, photo):
    """ "<image>" typed in a question is text; the processor would take it for an image."""
    path = request.getfixturevalue(f"tiny_{kind}")
    chat = Chat(path, max_new_tokens=8)
    question = "What does the HTML <image> tag do?"
    ours = [chat.ask(question), chat.ask(question, image=photo)]
    escaped = question.replace("<image>", "<\u200bimage>")
    assert ours == _plain_transformers_answers(path, [(escaped, []), (escaped, [photo])], 8)
    assert [turn.question for turn in chat.history] == [question, question]


def test_images_stay_in_context_for_later_turns(tiny_llava, photo):
    chat = Chat(tiny_llava, max_new_tokens=4)
    chat.ask("What is this?", image=photo)
    chat.ask("Tell me more.")
    messages = chat.messages("And now?")
    first_user = messages[0]["content"]
    assert [part["type"] for part in first_user] == ["image", "text"]
    assert (
        messages[1]["role"] == "assistant"
        and messages[1]["content"][0]["text"] == chat.history[0].answer
    )
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert len(chat.history) == 2 and chat.history[0].images[0].size == photo.size


def test_stream_yields_the_answer_and_records_the_turn(tiny_llava_next, photo):
    chat = Chat(tiny_llava_next, max_new_tokens=16)
    pieces = list(chat.stream("Describe the image.", image=photo))
    assert len(pieces) > 1
    assert "".join(pieces) == chat.history[-1].answer
    assert chat.history[-1] == Turn("Describe the image.", chat.history[-1].images, "".join(pieces))


def test_leaving_the_stream_early_keeps_a_partial_interrupted_answer(tiny_llava):
    chat = Chat(tiny_llava, max_new_tokens=200)
    pieces = chat.stream("Why?")
    next(pieces)
    pieces.close()
    turn = chat.history[-1]
    assert turn.interrupted and turn.answer
    chat.ask("Go on.", max_new_tokens=3)  # the chat stays usable
    assert len(chat.history) == 2 and not chat.history[-1].interrupted


def test_leaving_the_stream_at_its_last_piece_keeps_the_answer_as_shown(tiny_llava):
    """An answer whose last token ends mid-character shows U+FFFD in its last piece, which
    comes when the answer is complete: stopping there keeps that answer, not interrupted."""
    model, question = Model(tiny_llava), "What is in this picture?"
    answers = {n: Chat(model, max_new_tokens=n).ask(question) for n in range(1, 25)}
    n, full = next((n, a) for n, a in answers.items() if a.endswith("\ufffd"))
    chat, shown = Chat(model, max_new_tokens=n), ""
    for piece in chat.stream(question):
        shown += piece
        if shown == full:
            break
    assert (chat.history[-1].answer, chat.history[-1].interrupted) == (full, False)


def test_keyboard_interrupt_stops_generation_and_keeps_the_chat(tmp_path):
    from llava_nb.testing import make_tiny_llava

    path = make_tiny_llava(tmp_path / "slow", width=256, layers=4)  # slow enough to interrupt
    chat = Chat(path, max_new_tokens=1000)
    chat.ask("Warm up.", max_new_tokens=1)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        chat.ask("Tell me a long story.")
    timer.cancel()
    turn = chat.history[-1]
    assert turn.question == "Tell me a long story." and turn.interrupted
    assert 0 < len(chat.model.processor.tokenizer(turn.answer).input_ids) < 1000
    assert chat.ask("Short answer?", max_new_tokens=2) == chat.history[-1].answer


def test_two_threads_asking_one_chat_get_one_answer_and_one_refusal(tiny_llava):
    model = Model(tiny_llava)
    chat = Chat(model, max_new_tokens=4)
    ready = threading.Barrier(2)
    outcomes = []

    def ask(question: str) -> None:
        ready.wait()
        try:
            outcomes.append(chat.ask(question))  # the first also loads the model
        except LlavaError as e:
            outcomes.append(e)

    threads = [threading.Thread(target=ask, args=(q,)) for q in ("First?", "Second?")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    refused = [o for o in outcomes if isinstance(o, LlavaError)]
    assert len(outcomes) == 2 and len(refused) == 1 and len(chat.history) == 1
    assert "this chat is still answering a question" in str(refused[0])


def test_settings_per_chat_and_per_question(tiny_llava):
    chat = Chat(tiny_llava, max_new_tokens=3, temperature=0.7, seed=1)
    assert chat.settings == {"max_new_tokens": 3, "temperature": 0.7, "top_p": 1.0, "seed": 1}
    again = Chat(tiny_llava, max_new_tokens=3, temperature=0.7, seed=1)
    assert chat.ask("Hi?") == again.ask("Hi?")  # seeded sampling repeats
    assert chat.ask("Hi?", temperature=0.0) == Chat(tiny_llava, max_new_tokens=3).ask("Hi?")
    with pytest.raises(LlavaError, match="unknown setting 'top_k'"):
        chat.ask("Hi?", top_k=3)


def test_bad_input_leaves_the_chat_unchanged(tiny_llava, tmp_path):
    chat = Chat(tiny_llava, max_new_tokens=3)
    chat.ask("Hello?")
    before = chat.history
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    for question, image, error in [
        ("", None, "the question is empty"),
        (123, None, r"the question must be text \(a str\), not int"),
        ("What?", str(tmp_path / "missing.png"), "not found"),
        ("What?", str(broken), "not a readable image"),
        ("why " * 1200, None, "no room for an answer in the model's context"),
    ]:
        with pytest.raises(LlavaError, match=error):
            chat.ask(question, image=image)
    with pytest.raises(ImageError):
        chat.ask("What?", image=42)
    assert chat.history == before


def test_undo_and_reset(tiny_llava):
    chat = Chat(tiny_llava, max_new_tokens=2)
    assert chat.undo() is None
    chat.ask("One?")
    chat.ask("Two?")
    assert chat.undo().question == "Two?"
    assert [t.question for t in chat.history] == ["One?"]
    chat.reset()
    assert chat.history == []
    assert chat.model.loaded  # reset keeps the model


def test_save_and_load_round_trip_with_images(tiny_llava, photo, tmp_path):
    chat = Chat(tiny_llava, max_new_tokens=5, temperature=0.5, top_p=0.9, seed=3)
    chat.ask("What is this?", image=photo)
    chat.ask("More?")
    path = chat.save(tmp_path / "sub" / "chat.json")
    data = json.loads(Path(path).read_text())
    assert data["format"] == "llava_nb.chat"
    assert data["turns"][0]["images"][0].startswith("data:image/png")
    loaded = Chat.load(path)
    assert loaded.model is chat.model  # the same shared model, loaded once
    assert loaded.settings == chat.settings
    assert [(t.question, t.answer, t.interrupted) for t in loaded.history] == [
        (t.question, t.answer, t.interrupted) for t in chat.history
    ]
    assert loaded.history[0].images[0].tobytes() == photo.tobytes()
    other = Model(tiny_llava)
    assert Chat.load(path, model=other).model is other
    # the next answer continues the same conversation
    assert loaded.ask("Again?", temperature=0.0) == chat.ask("Again?", temperature=0.0)

    umask = os.umask(0o022)  # a new file gets 0o666 less the umask; a replaced one keeps its mode
    try:
        assert os.stat(chat.save(tmp_path / "new.json")).st_mode & 0o777 == 0o644
        os.chmod(path, 0o640)
        assert os.stat(chat.save(path)).st_mode & 0o777 == 0o640
    finally:
        os.umask(umask)
    assert [p.name for p in Path(path).parent.iterdir()] == ["chat.json"]  # no temporary left


def test_one_question_at_a_time(tiny_llava):
    chat = Chat(tiny_llava, max_new_tokens=4)
    chat.ask("First?")
    pieces = chat.stream("Second?")  # handed out, not read to its end yet
    for action, name in ((lambda: chat.ask("Third?"), "ask"), (chat.undo, "undo"),
                         (chat.reset, "reset")):  # fmt: skip
        with pytest.raises(LlavaError, match=f"still answering a question .*; {name} once it"):
            action()
    assert len(chat.history) == 1
    assert "".join(pieces) == chat.history[-1].answer  # read: the chat takes questions again
    # a stream left part-read in a variable: the message says which stream and how to end it
    # (stopping its generation is not enough: the stream records the turn when it ends)
    kept = chat.stream("Kept?")
    shown = next(kept)
    chat.answering.generation.stop()
    with pytest.raises(LlavaError, match=r"a stream not read to its end.*stream\.close\(\)"):
        chat.ask("Blocked?")
    kept.close()
    assert chat.history[-1].question == "Kept?" and chat.history[-1].answer == shown
    chat.undo()
    chat.stream("Dropped unread?")  # never read, nor kept: it holds nothing up
    chat.ask("Third?")
    assert [t.question for t in chat.history] == ["First?", "Second?", "Third?"]


def test_loading_bad_chat_files(tmp_path):
    with pytest.raises(ChatFileError, match="not found"):
        Chat.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ChatFileError, match="not readable JSON"):
        Chat.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"hello": 1}')
    with pytest.raises(ChatFileError, match="not a llava_nb chat file"):
        Chat.load(tmp_path / "other.json")
    (tmp_path / "damaged.json").write_text('{"format": "llava_nb.chat", "model": "m"}')
    with pytest.raises(ChatFileError, match="damaged"):
        Chat.load(tmp_path / "damaged.json")
    with pytest.raises(ChatFileError, match="is not a file .a folder, device or pipe"):
        Chat.load("/dev/zero")  # was read until memory ran out
    with pytest.raises(ChatFileError, match="File name too long"):
        Chat.load(tmp_path / ("a" * 300))
    with pytest.raises(ChatFileError, match="NUL"):
        Chat.load("a\0b.json")


def test_saving_to_names_the_system_refuses_gets_one_line(tiny_llava, tmp_path):
    chat = Chat(tiny_llava)
    with pytest.raises(ChatFileError, match="NUL"):
        chat.save(tmp_path / "a\0b.json")
    with pytest.raises(ChatFileError, match="File name too long") as error:
        chat.save(tmp_path / ("a" * 5000))
    assert len(str(error.value)) < 200
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_save_leaves_no_temporary_file(tiny_llava, tmp_path):
    chat = Chat(tiny_llava)
    real_dump = json.dump

    def interrupted(data, f):  # Stop pressed while the file is written
        raise KeyboardInterrupt

    json.dump = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            chat.save(tmp_path / "chat.json")
    finally:
        json.dump = real_dump
    assert list(tmp_path.iterdir()) == []


def _chat_file(model, **turn) -> dict:
    return {
        "format": "llava_nb.chat",
        "version": 1,
        "model": model,
        "settings": {"max_new_tokens": 3, "temperature": 0.0, "top_p": 1.0, "seed": None},
        "turns": [
            {"question": "Fine?", "images": [], "answer": "Yes.", "interrupted": False},
            {"question": "q", "images": [], "answer": "a", **turn},
        ],
    }


@pytest.mark.parametrize(
    "turn, fragment",
    [
        (
            {"images": [5]},
            "turn 2, field 'images' item 1 must be a data:image URI, not the number 5",
        ),
        ({"images": ["abc"]}, "turn 2, field 'images' item 1: data URI 'abc'"),
        ({"images": "abc"}, "turn 2, field 'images' must be a list, not text"),
        ({"question": 5}, "turn 2, field 'question' must be text, not the number 5"),
        ({"answer": None}, "turn 2, field 'answer' must be text, not null"),
        ({"interrupted": "no"}, "turn 2, field 'interrupted' must be true/false, not text"),
        ({"question": None, "answer": None}, "turn 2, field 'question' must be text, not null"),
    ],
)
def test_loading_a_damaged_turn_names_the_turn_and_field(tiny_llava, tmp_path, turn, fragment):
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(_chat_file(tiny_llava, **turn)))
    with pytest.raises(ChatFileError) as error:
        Chat.load(path)
    message = str(error.value)
    assert message.startswith(f"chat file '{path}' is damaged (") and fragment in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"turns": None}, "field 'turns' must be a list, not null"),
        ({"turns": [5]}, "turn 1 must be an object, not the number 5"),
        ({"turns": [{"images": [], "answer": "a"}]}, "turn 1, field 'question' is missing"),
        ({"settings": None}, "field 'settings' must be an object, not null"),
        ({"model": 5}, "field 'model' must be text, not the number 5"),
        ({"adapter": 5}, "field 'adapter' must be text or null, not the number 5"),
        ({"model": " "}, "field 'model' is empty"),  # not the default model, built or fetched
        ({"settings": {"bogus": 1}}, "field 'settings' has 'bogus', not one of max_new_tokens"),
    ],
)
def test_loading_a_damaged_chat_file_names_the_field(tiny_llava, tmp_path, change, fragment):
    path = tmp_path / "edited.json"
    path.write_text(json.dumps({**_chat_file(tiny_llava), **change}))
    with pytest.raises(ChatFileError, match="damaged") as error:
        Chat.load(path)
    assert fragment in str(error.value)


def test_a_chat_file_from_a_newer_llava_nb_or_of_no_version_is_refused(tiny_llava, tmp_path):
    path = tmp_path / "newer.json"
    path.write_text(json.dumps({**_chat_file(tiny_llava), "version": 99}))
    with pytest.raises(ChatFileError, match="of version 99, newer than .*upgrade llava_nb"):
        Chat.load(path)
    for version in (True, 0, "1", 1.0):
        path.write_text(json.dumps({**_chat_file(tiny_llava), "version": version}))
        with pytest.raises(ChatFileError, match=f"has version {version!r}, not a version number"):
            Chat.load(path)
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ChatFileError, match="is not readable JSON"):
        Chat.load(path)


def test_a_loaded_hand_edited_chat_goes_on(tiny_llava, tmp_path):
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(_chat_file(tiny_llava)))  # turn 2 has no "interrupted": optional
    chat = Chat.load(path)
    assert [(t.question, t.answer, t.interrupted) for t in chat.history] == [
        ("Fine?", "Yes.", False),
        ("q", "a", False),
    ]
    assert chat.ask("Next?") == chat.history[-1].answer


def test_saving_never_replaces_a_file_that_is_not_a_chat(tiny_llava, tmp_path):
    chat = Chat(tiny_llava, max_new_tokens=2)
    chat.ask("Hi?")
    others = {
        "train.json": '[{"image": "a.jpg", "question": "q", "answer": "a"}]',
        "config.json": '{"format": "something else"}',
        "notes.txt": "my notes",
        "photo.png": b"\x89PNG\r\n\x1a\n...",
    }
    for name, content in others.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(ChatFileError) as error:
            chat.save(path)
        assert str(error.value) == (
            f"'{path}' exists and is not a llava_nb chat file; save the chat under another "
            "name, or delete that file first"
        )
        assert path.read_bytes() == (content if isinstance(content, bytes) else content.encode())
    target = tmp_path / "chat.json"
    chat.save(target)
    chat.ask("More?")
    chat.save(target)  # saving again replaces the chat file
    assert len(Chat.load(target).history) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*others, "chat.json"])


def test_saving_to_an_empty_path_or_a_folder(tiny_llava, tmp_path):
    chat = Chat(tiny_llava, max_new_tokens=2)
    for path in ("", "  "):
        with pytest.raises(ChatFileError, match="^the chat file name is empty; give one"):
            chat.save(path)
        with pytest.raises(ChatFileError, match="^the chat file name is empty; give one"):
            Chat.load(path)
    with pytest.raises(ChatFileError, match="it is a folder; name a file in it"):
        chat.save(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_saving_never_leaves_a_half_written_file(tiny_llava, tmp_path):
    chat = Chat(tiny_llava, max_new_tokens=2)
    chat.ask("Hi?")
    target = tmp_path / "chat.json"
    chat.save(target)
    good = target.read_text()
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ChatFileError, match="cannot save chat"):
        chat.save(tmp_path / "a-file" / "chat.json")  # its folder cannot exist
    chat.ask("More?")
    real_dump = json.dump

    def dump_then_fail(data, f):  # the disk fills up halfway through the write
        f.write("{")
        raise OSError(28, "No space left on device")

    json.dump = dump_then_fail
    try:
        with pytest.raises(ChatFileError, match="No space left"):
            chat.save(target)
    finally:
        json.dump = real_dump
    assert target.read_text() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "chat.json"]


def test_a_stream_never_read_records_nothing_and_blocks_nothing(tiny_llava):
    chat = Chat(tiny_llava, max_new_tokens=900)
    pieces = chat.stream("Why?")
    pieces.close()
    del pieces
    assert chat.history == []
    assert chat.ask("Short?", max_new_tokens=2) == chat.history[-1].answer


def test_history_hands_out_copies_that_cannot_change_the_chat(tiny_llava, photo):
    chat = Chat(tiny_llava, max_new_tokens=3)
    chat.ask("What is in this picture?", image=photo)
    prompt = chat.messages("Next?")
    handed = chat.history
    handed[0].answer = "edited"
    handed[0].question = "edited?"
    handed[0].interrupted = True
    handed[0].images.clear()
    handed.append(Turn("Added?"))
    (turn,) = chat.history
    assert (turn.question, turn.interrupted, len(turn.images)) == (
        "What is in this picture?",
        False,
        1,
    )
    assert turn.answer != "edited" and chat.messages("Next?") == prompt
    # the images are shared, not copied on each call (panels cache thumbnails by image)
    assert chat.history[0].images[0] is chat.history[0].images[0]


def test_regenerate_answers_the_last_question_again_in_its_place(tiny_llava, photo):
    chat = Chat(tiny_llava, max_new_tokens=6)
    chat.ask("What is in this picture?", image=photo)
    chat.ask("And now?")
    first, _ = chat.history
    sampled = chat.regenerate(temperature=1.0, seed=3)
    again = Chat(tiny_llava, max_new_tokens=6)
    again.ask("What is in this picture?", image=photo)
    assert sampled == again.ask("And now?", temperature=1.0, seed=3)  # asked from turn 1 only
    assert [t.question for t in chat.history] == ["What is in this picture?", "And now?"]
    assert chat.history[0] == first and chat.history[1].answer == sampled
    assert chat.history[0].images[0] is first.images[0]
    with pytest.raises(LlavaError, match="no answer to regenerate"):
        Chat(chat.model).regenerate()


@pytest.mark.parametrize("cut", ["close", "interrupt", "unload", "error"])
def test_a_regeneration_cut_short_keeps_the_old_answer(tiny_llava, photo, cut):
    chat = Chat(tiny_llava, max_new_tokens=200)
    chat.ask("What is in this picture?", image=photo, max_new_tokens=5)
    before = chat.history
    events = []
    chat.on_change(lambda event, turn, piece: events.append(event))
    pieces = chat.regenerate_stream(temperature=1.0, seed=1)
    next(pieces)
    if cut == "close":
        pieces.close()
    elif cut == "interrupt":
        with pytest.raises(KeyboardInterrupt):
            pieces.throw(KeyboardInterrupt)
    elif cut == "unload":
        chat.model.unload()
        list(pieces)
    else:
        with pytest.raises(RuntimeError):
            pieces.throw(RuntimeError("out of memory"))
    assert same_turns(chat.history, before) and not chat.history[-1].interrupted
    assert events[0] == "start" and events[-1] == "end"
    assert chat.regenerate(max_new_tokens=2) == chat.history[-1].answer  # the chat goes on


def test_regenerate_stopped_by_an_unload_says_so_and_keeps_the_old_answer(tiny_llava):
    chat = Chat(tiny_llava, max_new_tokens=200)
    chat.ask("Why?", max_new_tokens=4)
    before = chat.history
    chat.on_change(lambda event, turn, piece: event == "piece" and chat.model.unload())
    with pytest.raises(LlavaError, match="the new answer was stopped before it ended"):
        chat.regenerate(temperature=1.0, seed=2)
    assert same_turns(chat.history, before)


def test_answering_tells_the_turn_and_its_text_while_it_streams(tiny_llava, photo):
    """A view made mid-answer (a panel) reads it from `Chat.answering`, not from internals."""
    chat = Chat(tiny_llava, max_new_tokens=200)
    assert chat.answering is None
    seen = []  # (event, the answering's turn, its text) as each event arrives
    chat.on_change(
        lambda event, turn, piece: seen.append(
            (event, chat.answering and chat.answering.turn is turn, chat.answering)
        )
    )
    pieces = chat.stream("What is in this picture?", photo)
    assert chat.answering is None  # handed out, not begun: nothing is answered yet
    read = [next(pieces) for _ in range(3)]
    answering = chat.answering
    assert answering.turn.question == "What is in this picture?" and not answering.replacing
    assert answering.turn.images[0].tobytes() == photo.convert("RGB").tobytes()
    assert answering.text == "".join(read)
    answering.generation.stop()  # what a panel's Stop does
    read += list(pieces)
    assert chat.answering is None
    assert [(event, own) for event, own, _ in seen] == [
        ("start", True),
        *[("piece", True)] * len(read),
        ("end", None),  # cleared before "end": a view made after it shows no live turn
    ]
    (turn,) = chat.history
    assert turn.interrupted and turn.answer.startswith("".join(read[:3]))

    seen.clear()
    pieces = chat.regenerate_stream(max_new_tokens=3)
    next(pieces)
    assert chat.answering.replacing and chat.answering.turn.question == turn.question
    pieces.close()
    assert chat.answering is None and same_turns(chat.history, [turn])


def test_a_4bit_model_answers_alike_after_its_weights_are_read(tiny_llava, photo):
    """On 2 CPU cores here, a 4-bit chat's base answers changed once an adapter had been
    loaded (and switched off again): each state_dict() moved down_proj further from its
    dequantized weights (max error 0.0026, then 0.18, then 0.23)."""
    model = Model(tiny_llava, quantization="4bit")
    chat = Chat(model, max_new_tokens=24)
    before = chat.ask("What is in the picture?", photo)
    model.model.state_dict()
    model._conversation.clear()  # the whole prompt read again, with the weights as they are
    assert chat.regenerate() == before
