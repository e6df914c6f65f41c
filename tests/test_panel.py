"""ChatPanel: the widget's state and message handling, on tiny real models.

Messages go in through ipywidgets' own dispatch (`_handle_custom_msg`, what a front end's
`model.send(content, callbacks, buffers)` arrives as), images as binary buffers; the state a
front end would draw is read from the synced traits. The browser side is tests/test_panel_e2e.py.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import comm
import nbformat
import pytest
from comm.base_comm import BaseComm
from PIL import Image

import llava_nb as ln
from llava_nb.chat import same_turns
from llava_nb.panel import MAX_UPLOAD_BYTES, THUMBNAIL_PX, UPDATE_INTERVAL_S, ChatPanel
from tests.conftest import CHUNK, END, SSE, events, thinking_chunk
from tests.test_notebook import execute, kernel_env, no_traceback, results  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "02_chat_panel.ipynb"
WAIT_S = 60


@pytest.fixture(scope="module")
def endless_llava(tmp_path_factory) -> str:
    """A tiny checkpoint that never says end-of-sequence: it answers up to max_new_tokens."""
    from llava_nb.testing import make_tiny_llava

    path = Path(make_tiny_llava(tmp_path_factory.mktemp("tiny") / "endless", width=128))
    config = json.loads((path / "generation_config.json").read_text())
    config["suppress_tokens"] = [config["eos_token_id"]]
    (path / "generation_config.json").write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def photo_bytes() -> bytes:
    import matplotlib.cbook

    return Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).read_bytes()


def message(panel: ChatPanel, kind: str, buffers=(), **content) -> None:
    """What the front end sends: a custom message, images as binary buffers."""
    panel._handle_custom_msg({"type": kind, **content}, [memoryview(b) for b in buffers])


def finish(panel: ChatPanel, error: str = "") -> None:
    panel._worker.join(WAIT_S)
    assert not panel._worker.is_alive() and not panel.busy
    if error is not None:
        assert panel.error == error


def tokens(chat: ln.Chat, text: str) -> int:
    """How many tokens `text` is to the chat's (loaded) model."""
    return len(chat.model.processor.tokenizer(text, add_special_tokens=False)["input_ids"])


def thumbnail_size(uri: str) -> tuple[int, int]:
    from llava_nb.images import image_from_data_uri

    assert uri.startswith("data:image/jpeg;base64,")
    return image_from_data_uri(uri).size


class RecordingComm(BaseComm):
    """A widget's comm that keeps what the kernel sends its front ends (no kernel in tests)."""

    def __init__(self, **kwargs) -> None:
        self.sent: list[dict] = []  # each message's data: open, update, custom
        super().__init__(**kwargs)

    def publish_msg(self, msg_type: str, data=None, metadata=None, buffers=None, **keys) -> None:
        self.sent.append(data or {})

    def sent_bytes(self, start: int = 0) -> int:
        """The size of the messages from the `start`-th on, as JSON."""
        return sum(len(json.dumps(data)) for data in self.sent[start:])


@pytest.fixture
def recorded(monkeypatch):
    """Widgets made in the test get a RecordingComm: `panel.comm.sent`."""
    monkeypatch.setattr(comm, "create_comm", RecordingComm)


def front_end_live_answer(sent: list[dict]) -> list[str]:
    """The live answer a front end shows after each message, built as js/src/panel.js does:
    the state (at opening, or asked again) holds all of it; a "live" message says to keep the
    first `offset` characters and append `text`."""
    shown, text = [], None
    for data in sent:
        state = data.get("state", {})
        if "live_answer" in state:  # the comm's opening, or an update from request_state
            text = state["live_answer"]
        elif data.get("method") == "custom" and data["content"]["type"] == "live":
            live = data["content"]
            kept = text.encode("utf-16-le")[: 2 * live["offset"]]  # JavaScript's string units
            assert len(kept) == 2 * live["offset"]
            text = kept.decode("utf-16-le") + live["text"]  # (fails if it cuts an emoji in two)
        else:
            continue
        shown.append(text)
    return shown


def record(panel: ChatPanel, name: str) -> list:
    values: list = []
    panel.observe(lambda change: values.append(change["new"]), name)
    return values


# ---------------------------------------------------------------- asking from the panel


def test_ask_with_an_image_streams_off_the_main_thread(tiny_llava, photo_bytes):
    chat = ln.Chat(ln.Model(tiny_llava), max_new_tokens=12)  # not the shared one: unloaded
    panel = ChatPanel(chat)
    assert panel.turns == [] and not panel.busy
    assert "not loaded (loads with the next question)" in panel.status and "llava" in panel.status

    message(panel, "attach", [photo_bytes], name="hopper.jpg")
    assert panel.error == "" and len(panel.attachments) == 1
    assert max(thumbnail_size(panel.attachments[0])) == THUMBNAIL_PX  # small, for display

    statuses, threads = record(panel, "status"), []
    panel.observe(lambda _: threads.append(threading.current_thread()), "live_answer")
    message(panel, "send", text="  Who is this?  ")
    assert panel.busy  # the message handler returned at once: the worker answers
    assert panel.live_question["question"] == "Who is this?"
    assert len(panel.live_question["images"]) == 1 and panel.attachments == []
    finish(panel)

    (turn,) = chat.history
    assert turn.question == "Who is this?" and len(turn.images) == 1 and turn.answer
    assert turn.images[0].size == (512, 600)  # the chat keeps the original, not the thumbnail
    assert panel.turns == [
        {
            "question": "Who is this?",
            "images": [panel.turns[0]["images"][0]],
            "answer": turn.answer,
            "interrupted": False,
        }
    ]
    assert thumbnail_size(panel.turns[0]["images"][0])[1] == THUMBNAIL_PX
    assert panel.live_question == {} and panel.live_answer == ""
    assert threads and all(t is not threading.main_thread() for t in threads)
    assert any("loading" in s for s in statuses)  # the status line showed the lazy load
    assert re.search(r"· loaded in \d+\.\d s$", panel.status) and "· cpu · float32" in panel.status
    assert panel.error == ""


def test_stop_ends_the_answer_and_keeps_it_marked_stopped(endless_llava):
    chat = ln.Chat(endless_llava, max_new_tokens=8)
    chat.model.load()
    panel = ChatPanel(chat)
    panel.max_new_tokens = 1000  # as the front end's input sets it
    assert chat.settings["max_new_tokens"] == 1000
    answers = record(panel, "live_answer")
    message(panel, "send", text="Tell me everything.")
    deadline = time.monotonic() + WAIT_S
    while len([a for a in answers if a]) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    growing = [a for a in answers if a]
    assert len(growing) >= 3 and all(b.startswith(a) for a, b in itertools.pairwise(growing))
    # the chat takes no other question meanwhile: not from a cell, nor from a second panel
    other = ChatPanel(chat)
    with pytest.raises(ln.LlavaError, match="still answering a question .*or stop it first"):
        chat.ask("From a cell?")
    message(other, "clear")
    assert "still answering" in other.error
    message(other, "send", text="Me too?")
    finish(other, error=None)
    assert "still answering" in other.error and other.draft == "Me too?"  # given back
    other.close()

    assert panel.stoppable  # the panel's own worker reads it: Stop works
    message(panel, "stop")
    finish(panel)

    (turn,) = chat.history
    assert turn.interrupted and turn.answer.startswith(growing[-1])
    # ended at once, far short of its 1000 tokens (told by length, not by a clock: on a loaded
    # machine the stop and the tokens slow down alike; left to run, it retokenizes to ~1500)
    assert tokens(chat, turn.answer) < 500
    assert len(panel.turns) == 1 and panel.turns[0]["interrupted"]
    assert panel.turns[0]["answer"] == turn.answer
    assert panel.error == ""

    panel.max_new_tokens = 4  # the panel keeps working after a stop
    message(panel, "send", text="Short, please.")
    finish(panel)
    assert [t.interrupted for t in chat.history] == [True, False]


def test_a_growing_answer_goes_out_as_its_new_pieces(endless_llava, recorded):
    """While an answer streams, the front ends get what was added, not all of it each time
    (60,000 characters sent whole every 50 ms were 1.2 MB/s); they stay in step through a
    rewritten end, a view that asks for all of it, and the answer's end."""
    panel = ChatPanel(ln.Chat(endless_llava, max_new_tokens=1000))
    panel.live_question = {"question": "A very long answer?", "images": []}
    opened = len(panel.comm.sent)
    text, updates = "", 0
    while len(text) < 60_000:  # as the worker grows it, one update every 50 ms
        text += "Some **bold** words and `code` in a sentence, " * 5 + "\n\n"
        panel.live_answer = text
        updates += 1
    per_second = panel.comm.sent_bytes(opened) / (updates * UPDATE_INTERVAL_S)
    print(f"{len(text):,} characters: {per_second / 1000:,.1f} kB/s sent while it streamed")
    assert per_second < 10_000  # 253 characters added per update: 6 kB/s, not 600 kB/s
    assert front_end_live_answer(panel.comm.sent)[-1] == text
    assert panel.get_state()["live_answer"] == text  # a view opened now starts from all of it

    start = len(panel.comm.sent)
    panel.live_answer = text[:-10] + "rewritten 🙂"  # the decode changed its last characters
    panel.live_answer += " more"  # after an emoji: two units in JavaScript, one in Python
    message(panel, "resync")  # a view that missed a change asks for all of it
    shown = front_end_live_answer(panel.comm.sent)
    assert shown[-3:] == [text[:-10] + "rewritten 🙂", panel.live_answer, panel.live_answer]
    assert panel.comm.sent_bytes(start) - len(json.dumps(panel.live_answer)) < 300  # whole: once

    del panel.comm.sent[opened:]  # a real answer, Stop, Undo: its first message is whole
    message(panel, "send", text="Tell me everything.")
    deadline = time.monotonic() + WAIT_S
    while len(panel.live_answer) < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    message(panel, "stop")
    finish(panel)
    shown = front_end_live_answer(panel.comm.sent)
    assert shown[-1] == "" and panel.chat.history[0].answer.startswith(max(shown, key=len))
    message(panel, "undo")
    assert front_end_live_answer(panel.comm.sent)[-1] == ""


def test_regenerate_and_new_chat(tiny_llava, photo):
    chat = ln.Chat(tiny_llava, max_new_tokens=6)
    chat.ask("What is this?", photo)
    panel = ChatPanel(chat)
    shown = record(panel, "turns")
    (first,) = chat.history
    chat.settings.update(temperature=1.0, seed=3)  # sampled: a new answer, not the greedy one
    message(panel, "regenerate")
    finish(panel)
    (again,) = chat.history
    assert again.question == first.question
    assert again.images[0].tobytes() == first.images[0].tobytes()
    assert again.answer != first.answer and not again.interrupted
    assert panel.turns[0]["answer"] == again.answer
    # while it streamed, the live turn stood in for the old one, never beside it
    assert all(len(turns) <= 1 for turns in shown) and [] in shown

    message(panel, "clear")
    assert chat.history == [] and panel.turns == []
    message(panel, "regenerate")
    assert "no answer to regenerate" in panel.error and not panel.busy


def test_new_chat_keeps_the_images_attached_for_the_next_question(tiny_llava, photo_bytes):
    """New chat forgets the turns, not the images attached to the question not yet sent (as
    the typed question stays in its box): often the new chat is for them."""
    panel = ChatPanel(ln.Chat(tiny_llava, max_new_tokens=4))
    message(panel, "send", text="Hello?")
    finish(panel)
    message(panel, "attach", [photo_bytes], name="hopper.jpg")
    message(panel, "clear")
    assert panel.chat.history == [] and panel.turns == []
    assert len(panel.attachments) == 1 and panel.error == ""
    message(panel, "send", text="Who is this?")
    finish(panel)
    (turn,) = panel.chat.history
    assert turn.question == "Who is this?" and len(turn.images) == 1


def test_a_regeneration_stopped_or_failed_keeps_the_previous_answer(endless_llava):
    """Regenerate, then Stop (or a failure): the answer it was to replace stays, in the chat
    and in every panel on it, not the cut-short new one."""
    chat = ln.Chat(endless_llava, max_new_tokens=6)
    chat.ask("What is this?")
    (before,) = chat.history
    panel, other = ChatPanel(chat), ChatPanel(chat)
    chat.settings["max_new_tokens"] = 1000
    message(panel, "regenerate")
    deadline = time.monotonic() + WAIT_S
    while not (panel.live_answer and other.live_answer) and time.monotonic() < deadline:
        time.sleep(0.01)
    for view in (panel, other):  # the new answer shows in place of the old one, kept meanwhile
        assert view.turns == [] and view.live_question["question"] == "What is this?"
    assert same_turns(chat.history, [before])
    late = ChatPanel(chat)  # opened mid-regeneration: the same
    assert late.turns == [] and late.live_question == panel.live_question
    message(panel, "stop")
    finish(panel)
    (kept,) = chat.history
    assert (kept.answer, kept.interrupted) == (before.answer, False)
    for view in (panel, other, late):
        assert [(t["answer"], t["interrupted"]) for t in view.turns] == [(before.answer, False)]
        assert view.live_question == {}

    chat.settings["max_new_tokens"] = 0  # refused when asked: the regeneration fails
    message(panel, "regenerate")
    finish(panel, error=None)
    assert panel.error.startswith("max_new_tokens must be")
    assert [t.answer for t in chat.history] == [before.answer]
    assert [t["answer"] for t in other.turns] == [before.answer]


def test_undo_forgets_the_last_turn_in_every_view(endless_llava):
    """Undo in one panel: the chat forgets its last question and answer, and so does every
    panel on it; nothing to undo, or an answer being written, says so and changes nothing."""
    chat = ln.Chat(endless_llava, max_new_tokens=4)
    chat.ask("One?")
    chat.ask("Two?")
    first, second = ChatPanel(chat), ChatPanel(chat)
    message(first, "undo")
    assert [t.question for t in chat.history] == ["One?"] and first.error == ""
    for view in (first, second):
        assert [t["question"] for t in view.turns] == ["One?"]

    chat.settings["max_new_tokens"] = 1000
    message(second, "send", text="Tell me everything.")
    deadline = time.monotonic() + WAIT_S
    while not first.live_answer and time.monotonic() < deadline:
        time.sleep(0.01)
    message(second, "undo")
    assert second.error.startswith("an answer is still being written")
    message(first, "undo")  # the other panel's answer
    assert first.error.startswith("this chat is still answering a question")
    message(second, "stop")
    finish(second)
    assert [t.question for t in chat.history] == ["One?", "Tell me everything."]

    for _ in range(2):
        message(second, "undo")
    assert chat.history == [] and first.turns == second.turns == []
    message(first, "undo")
    assert first.error == "there is nothing to undo; the chat has no questions yet"


def test_settings_from_the_front_end_go_to_the_chat(tiny_llava):
    chat = ln.Chat(tiny_llava, temperature=0.0, max_new_tokens=9)
    panel = ChatPanel(chat)
    assert (panel.temperature, panel.max_new_tokens) == (0.0, 9)
    panel.temperature = 0.7
    assert chat.settings["temperature"] == 0.7
    panel.temperature = -1.0
    assert panel.error.startswith("temperature must be a number >= 0")
    assert panel.temperature == 0.7 and chat.settings["temperature"] == 0.7
    chat.settings["max_new_tokens"] = 20  # changed elsewhere (%llava config): shown on change
    chat.reset()
    assert panel.max_new_tokens == 20

    panel.max_new_tokens = -3
    assert panel.error.startswith("max_new_tokens must be") and panel.max_new_tokens == 20
    panel.max_new_tokens = 30  # accepted: the refusal leaves the error line
    assert panel.error == "" and chat.settings["max_new_tokens"] == 30


# ---------------------------------------------------------------- one chat, several views


def test_settings_changed_elsewhere_show_in_every_panel(tiny_llava, monkeypatch, tmp_path):
    """A setting changed in one panel, or in a cell (`%llava config`, chat.settings), shows in
    every panel on the chat: not the old value, which the next question would not use."""
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    monkeypatch.setenv("IPYTHONDIR", str(tmp_path))
    shell = InteractiveShell.instance()
    shell.user_ns["chat"] = chat = ln.Chat(tiny_llava, max_new_tokens=9)
    first, second = ChatPanel(chat), ChatPanel(chat)
    first.max_new_tokens = 900
    assert second.max_new_tokens == 900 == chat.settings["max_new_tokens"]
    with capture_output():
        shell.run_cell("chat.settings['temperature'] = 0.5")
    assert first.temperature == second.temperature == 0.5
    first.close()
    second.close()


def test_questions_asked_elsewhere_stream_into_the_panel(endless_llava, photo):
    chat = ln.Chat(endless_llava, max_new_tokens=30)
    panel = ChatPanel(chat)
    seen = []
    for piece in chat.stream("From a cell?", photo):  # as a %%llava cell asks it
        seen.append((piece, panel.live_question.get("question"), panel.live_answer))
        # the kernel, busy with the cell, would take the panel's Stop only once it ends
        assert not panel.stoppable
    assert all(question == "From a cell?" for _, question, _ in seen)
    shown = "".join(piece for piece, _, _ in seen)
    assert seen[0][2] == seen[0][0]  # the first piece is shown at once, later ones throttled
    assert all(shown.startswith(live) for _, _, live in seen)
    assert [t["question"] for t in panel.turns] == ["From a cell?"]
    assert panel.turns[0]["answer"] == chat.history[0].answer and panel.live_question == {}

    chat.undo()
    assert panel.turns == []


def _two_panels_answering(checkpoint: str):
    """A chat with two panels, the first's question being answered, seen in the second."""
    chat = ln.Chat(checkpoint, max_new_tokens=1000)
    chat.model.load()
    first, second = ChatPanel(chat), ChatPanel(chat)
    message(first, "send", text="Tell me everything.")
    deadline = time.monotonic() + WAIT_S
    while not second.live_answer and time.monotonic() < deadline:
        time.sleep(0.01)
    return chat, first, second


def test_a_question_refused_in_a_second_panel_keeps_the_answer_in_view(endless_llava):
    """Two panels on one chat: Enter in B while A's answer streams is refused in B, and B
    still shows A's question and its answer as it grows (not an empty chat until it ends)."""
    chat, first, second = _two_panels_answering(endless_llava)
    deadline = time.monotonic() + WAIT_S
    message(second, "send", text="Me too?")
    finish(second, error=None)
    assert "still answering" in second.error and second.draft == "Me too?"
    assert second.live_question == first.live_question
    assert second.live_question["question"] == "Tell me everything."
    shown = second.live_answer
    assert shown
    while second.live_answer == shown and time.monotonic() < deadline:
        time.sleep(0.01)
    assert second.live_answer.startswith(shown) and len(second.live_answer) > len(shown)

    message(first, "stop")
    finish(first)
    assert second.live_question == {} and second.live_answer == ""
    assert [t["question"] for t in second.turns] == ["Tell me everything."]
    assert second.turns[0]["answer"] == chat.history[0].answer


def test_a_panel_opened_mid_answer_shows_the_live_turn(endless_llava, photo):
    """A panel made while its chat answers (another panel's question, or a cell's on another
    thread) shows the question at once and the answer as it grows, all of it so far."""
    chat = ln.Chat(endless_llava, max_new_tokens=1000)
    chat.model.load()
    first = ChatPanel(chat)
    message(first, "attach", [_png(photo)], name="photo.png")
    message(first, "send", text="Tell me everything.")
    deadline = time.monotonic() + WAIT_S
    while len(first.live_answer) < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    late = ChatPanel(chat)
    assert late.live_question == first.live_question
    assert late.live_question["question"] == "Tell me everything."
    while len(late.live_answer) <= len(first.live_answer) - 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    shown = late.live_answer
    assert len(shown) >= 20  # from the answer's start, not from when the panel opened
    message(first, "stop")
    finish(first)
    assert chat.history[0].answer.startswith(shown)
    assert late.live_question == {} and late.turns == first.turns

    pieces = chat.stream("And then?")  # read in a cell, a few pieces at a time
    read = [next(pieces) for _ in range(5)]
    paused = ChatPanel(chat)  # opened between two pieces: what was said so far, at once
    assert paused.live_question["question"] == "And then?"
    assert paused.live_answer == "".join(read)
    read.append(next(pieces))
    assert not paused.stoppable  # read on the main thread, as by a cell
    pieces.close()
    assert chat.history[-1].answer == "".join(read) and paused.live_question == {}


def test_stop_in_a_second_panel_stops_the_answer(endless_llava):
    """Two panels on one chat: the one that did not ask can stop the answer it shows."""
    chat, first, second = _two_panels_answering(endless_llava)
    message(second, "stop")
    finish(first)
    (turn,) = chat.history
    assert turn.interrupted and second.turns[0]["interrupted"] and second.error == ""
    assert tokens(chat, turn.answer) < 500  # far short of its 1000 tokens: stopped at once
    message(second, "stop")  # nothing to stop: nothing happens
    assert second.error == "" and not second.busy


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _on_a_thread(work) -> None:
    """`work()` on a thread of its own (a timer, a server's worker), not the kernel's."""
    worker = threading.Thread(target=work)
    worker.start()
    worker.join(WAIT_S)


def test_the_status_line_follows_loads_and_unloads_made_anywhere(tiny_llava):
    """The model loaded or unloaded on another thread (no cell runs), or loaded by another
    chat's panel: every panel on it says so at once, and the next question loads it again."""
    model = ln.Model(tiny_llava)
    panel = ChatPanel(ln.Chat(model, max_new_tokens=4))
    statuses = record(panel, "status")
    assert "not loaded" in panel.status
    _on_a_thread(model.load)
    assert any(s.endswith("· loading…") for s in statuses)
    assert re.search(r"· loaded in \d+\.\d s$", panel.status)
    _on_a_thread(model.unload)
    assert "not loaded (loads with the next question)" in panel.status

    other = ChatPanel(ln.Chat(model, max_new_tokens=4))  # another chat on the same model
    message(other, "send", text="Loaded again?")
    finish(other)
    assert "· loaded in" in panel.status and "· loaded in" in other.status
    panel.close()  # a closed panel no longer follows it
    _on_a_thread(model.unload)
    assert "· loaded in" in panel.status and "not loaded" in other.status
    other.close()


def test_a_panel_follows_the_model_its_chat_is_given(tiny_llava, monkeypatch, tmp_path):
    """`chat.model = ...` in a cell: the panel shows the new model, and follows its unloads."""
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    monkeypatch.setenv("IPYTHONDIR", str(tmp_path))
    shell = InteractiveShell.instance()
    shell.user_ns["chat"] = chat = ln.Chat(ln.Model(tiny_llava), max_new_tokens=4)
    panel = ChatPanel(chat)
    new = ln.Model(tiny_llava).load()
    shell.user_ns["new"] = new
    with capture_output():
        shell.run_cell("chat.model = new")
    assert "· loaded in" in panel.status
    _on_a_thread(new.unload)
    assert "not loaded" in panel.status
    panel.close()


def test_model_state_events_and_their_listeners(tiny_llava, tmp_path):
    """`Model.on_state_change`: loading, loaded, failed, unloaded; a bound method is held
    weakly (a dropped view is not kept alive), unsubscribing ends the calls."""
    import gc
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llava, broken)
    (broken / "model.safetensors").write_bytes(b"truncated")

    class View:
        def __init__(self) -> None:
            self.events: list[str] = []

        def changed(self, event: str) -> None:
            self.events.append(event)

    model, view, events = ln.Model(str(broken)), View(), []
    model.on_state_change(view.changed)
    unsubscribe = model.on_state_change(events.append)
    with pytest.raises(ln.LlavaError, match="cannot be loaded"):
        model.load()
    model.unload()  # not loaded: nothing changes, nothing is said
    model.model_id = tiny_llava  # fixed
    _on_a_thread(model.load)
    model.unload()
    assert view.events == events == ["loading", "failed", "loading", "loaded", "unloaded"]
    unsubscribe()
    dropped = __import__("weakref").ref(view)
    del view
    gc.collect()
    assert dropped() is None  # the model did not keep it
    model.load()
    assert events == ["loading", "failed", "loading", "loaded", "unloaded"]
    model.unload()


def test_two_panels_on_two_chats_do_not_mix(tiny_llava):
    one, two = ln.Chat(tiny_llava, max_new_tokens=4), ln.Chat(tiny_llava, max_new_tokens=4)
    first, second = ChatPanel(one), ChatPanel(two)
    message(first, "send", text="Question one?")
    finish(first)
    message(second, "send", text="Question two?")
    finish(second)
    assert [t["question"] for t in first.turns] == ["Question one?"]
    assert [t["question"] for t in second.turns] == ["Question two?"]
    first.close()  # a closed panel stops following its chat
    one.ask("Unseen?")
    assert [t["question"] for t in first.turns] == ["Question one?"]


def test_magic_opens_a_panel_on_the_cells_chat(tiny_llava, monkeypatch, tmp_path):
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    monkeypatch.setenv("IPYTHONDIR", str(tmp_path))
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "llava_nb")
    magics = shell.magics_manager.registry["LlavaMagics"]
    magics.model, magics.max_new_tokens = tiny_llava, 5
    with capture_output():
        panel = shell.run_line_magic("llava", "panel")  # before any question: the chat starts
        shell.run_cell_magic("llava", "", "Asked in a cell?")
        other = shell.run_line_magic("llava", "panel other")
    assert isinstance(panel, ChatPanel) and panel.chat is magics.chats["default"]
    assert [t["question"] for t in panel.turns] == ["Asked in a cell?"]
    listeners = len(panel.chat._listeners)
    with capture_output():
        again = shell.run_line_magic("llava", "panel")  # the cell run again
    assert again is panel and len(panel.chat._listeners) == listeners  # shown again, not copied
    again.close()
    with capture_output():
        panel = shell.run_line_magic("llava", "panel")  # a closed one is replaced
    assert panel is not again and len(panel.chat._listeners) == listeners
    assert other.chat is magics.chats["other"] and other.turns == []
    assert other._repr_mimebundle_()[0]["application/vnd.jupyter.widget-view+json"]

    message(panel, "send", text="And from the panel?")
    finish(panel)
    assert [t.question for t in magics.chats["default"].history] == [
        "Asked in a cell?",
        "And from the panel?",
    ]
    with capture_output() as cap:
        shell.run_line_magic("llava", f"save {tmp_path / 'chat.json'}")
    assert "(2 turns)" in cap.stdout


# ---------------------------------------------------------------- bad input and failures


def test_bad_images_and_questions_show_one_line_and_change_nothing(tiny_llava, photo_bytes):
    chat = ln.Chat(tiny_llava, max_new_tokens=4)
    panel = ChatPanel(chat)
    message(panel, "attach", [photo_bytes], name="hopper.jpg")

    message(panel, "attach", [b"<html>not an image</html>"], name="page.html")
    assert panel.error == (
        "page.html: image bytes (25 bytes) is not a readable image (unknown image format); "
        "pass a complete PNG/JPEG/WebP/GIF file"
    )
    bomb = io.BytesIO()
    Image.new("L", (9000, 9000)).save(bomb, "PNG")  # 81 Mpx in ~80 kB
    message(panel, "attach", [bomb.getvalue()], name="huge.png")
    assert panel.error.startswith("huge.png: image bytes") and "64,000,000 pixels" in panel.error
    assert len(panel.attachments) == 1  # the good one is still attached

    message(panel, "send", text="   ")
    assert panel.error.startswith("the question is empty") and not panel.busy
    message(panel, "detach", index=0)
    assert panel.attachments == []
    message(panel, "attach", [photo_bytes], name="hopper.jpg")
    assert len(panel.attachments) == 1
    assert panel.max_upload_bytes == MAX_UPLOAD_BYTES  # the front end refuses bigger files
    panel.max_upload_bytes = len(photo_bytes) - 1  # ... and so does the kernel, from any sender
    message(panel, "attach", [photo_bytes], name="hopper.jpg")
    assert panel.error.startswith(f"hopper.jpg: {len(photo_bytes):,} bytes, more than the ")
    assert len(panel.attachments) == 1 and chat.history == []


def test_stop_while_the_model_loads_gives_the_question_back(tiny_llava, photo_bytes):
    panel = ChatPanel(model=tiny_llava)  # a model of its own: loads with the question
    message(panel, "attach", [photo_bytes], name="hopper.jpg")
    message(panel, "send", text="Never mind?")
    message(panel, "stop")
    finish(panel)
    assert panel.chat.history == [] and panel.draft == "Never mind?"
    assert len(panel.attachments) == 1


def test_several_refused_files_are_all_named(tiny_llava, photo_bytes):
    panel = ChatPanel(model=tiny_llava)
    message(panel, "attach", [b"text"], name="notes.txt", drop="v-1", refused=[])
    panel.error = ""  # dismissed (or changed) between the drop's files: they still join
    # another drop's file read faster than the first drop's second: it comes in between
    message(panel, "attach", [photo_bytes], name="pasted.jpg", drop="v-2", refused=[])
    message(panel, "attach", [b""], name="empty.png", drop="v-1", refused=[])
    assert panel.error.startswith("notes.txt: image bytes (4 bytes) is not a readable image")
    assert "; empty.png: " in panel.error and len(panel.attachments) == 1

    # the browser refuses files too big to send: its line comes with the drop's first file
    too_big = "huge.jpg is 9.0 MB, more than the 8.0 MB a notebook connection carries"
    message(panel, "attach", [photo_bytes], name="ok.jpg", drop="v-3", refused=[too_big])
    assert panel.error == too_big and len(panel.attachments) == 2
    panel.error = ""
    message(panel, "attach", [photo_bytes], name="ok2.jpg", drop="v-3", refused=[])
    assert panel.error == ""  # a good file: the line stays as the user left it
    message(panel, "attach", [b"again"], name="later.txt", drop="v-3", refused=[])
    assert panel.error.startswith(f"{too_big}; later.txt: ") and "notes.txt" not in panel.error

    message(panel, "attach", [b"x"], name="other.txt", drop="w-1", refused=[too_big])
    assert panel.error.startswith(f"{too_big}; other.txt: ")  # a new drop: its own line
    assert "later.txt" not in panel.error and "notes.txt" not in panel.error


def test_a_model_that_fails_to_load_shows_why_and_keeps_the_attachments(
    tiny_llava, photo_bytes, tmp_path
):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llava, broken)
    (broken / "model.safetensors").write_bytes(b"truncated")  # a damaged download
    panel = ChatPanel(model=str(broken))
    message(panel, "attach", [photo_bytes], name="hopper.jpg")
    message(panel, "send", text="Anyone there?")
    finish(panel, error=None)
    assert panel.error and "\n" not in panel.error and "Traceback" not in panel.error
    assert panel.chat.history == [] and panel.turns == [] and panel.live_question == {}
    assert len(panel.attachments) == 1 and panel.draft == "Anyone there?"  # given back

    panel.chat.model = ln.Model(tiny_llava)  # fixed: the same panel goes on
    message(panel, "send", text="Anyone there?")
    finish(panel)
    assert panel.error == "" and [t["question"] for t in panel.turns] == ["Anyone there?"]
    assert panel.draft == "" and panel.attachments == []


def test_out_of_memory_shows_in_the_panel(tmp_path):
    """A real out-of-memory while the model loads (address space capped), in a subprocess."""
    from llava_nb.testing import make_tiny_llava

    path = make_tiny_llava(tmp_path / "big", width=512, layers=4)
    code = f"""
import resource
import transformers.models.llava.modeling_llava
from llava_nb.panel import ChatPanel
panel = ChatPanel(model={path!r})
vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 40_000_000, vm + 40_000_000))
panel._handle_custom_msg({{"type": "send", "text": "Hello?"}}, [])
panel._worker.join()
print(panel.error)
panel._handle_custom_msg({{"type": "send", "text": "Hello?"}}, [])
panel._worker.join()
print(panel.error, panel.busy)
"""
    # one malloc arena: each thread's own (64 MB of address space) would make the cap's margin,
    # and so which allocation fails, a matter of timing ("can't start new thread" under load)
    env = {**os.environ, "MALLOC_ARENA_MAX": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    lines = [line for line in out.stdout.splitlines() if not line.startswith("llava_nb:")]
    expected = f"out of memory loading {path} on cpu; try --4bit (quantization='4bit')"
    assert lines == [expected, f"{expected} False"], out.stdout + out.stderr


def test_a_panel_on_a_server_names_it_and_says_when_it_is_connected(tiny_llava):
    """A chat on a server (`llava-nb serve` here): the status line names its URL (not its last
    path part, as for a local folder), and says connected or not."""
    pytest.importorskip("uvicorn")
    from llava_nb.server import create_app, serving

    with serving(create_app(ln.Model(tiny_llava).load())) as url:
        panel = ChatPanel(model=f"openai:{url}/v1")
        assert panel.status == (
            f"openai:{url}/v1 · not connected (connects with the next question)"
        )
        panel.max_new_tokens = 4
        message(panel, "send", text="Hello?")
        finish(panel)
        assert panel.status == f"openai:{url}/v1 · {panel.chat.model.remote_model} · connected"
        assert panel.turns[0]["answer"] == panel.chat.history[0].answer
        other = ChatPanel(ln.Chat(panel.chat.model))  # another chat on the same connection
        panel.chat.model.unload()  # from anywhere: both status lines say so at once
        closed = f"openai:{url}/v1 · not connected (connects with the next question)"
        assert panel.status == other.status == closed
        other.close()
        panel.close()


def test_panel_refuses_what_is_not_a_chat(tiny_llava):
    with pytest.raises(ln.LlavaError, match="ChatPanel takes a llava_nb.Chat, got str"):
        ChatPanel("chat")
    with pytest.raises(ln.LlavaError, match="a chat or a model, not both"):
        ChatPanel(ln.Chat(tiny_llava), model=tiny_llava)


# ---------------------------------------------------------------- the example notebook


def test_panel_notebook_runs_headless(kernel_env, tmp_path):  # noqa: F811
    committed = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in committed.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code)
    execute(committed, kernel_env, tmp_path)
    cells = [cell for cell in committed.cells if cell.cell_type == "code"]
    for cell in cells:
        no_traceback(cell)
    panels = [
        cell
        for cell in cells
        if any("application/vnd.jupyter.widget-view+json" in r.data for r in results(cell))
    ]
    assert [cell.source for cell in panels] == ["%llava panel", code[-2].source]
    history = results(cells[-1])[0].data["text/markdown"]
    assert "**You:** *[1 image(s)]* Who is in this picture?" in history


def test_a_reasoning_model_on_a_server_shows_thinking_until_its_answer(stand_in):
    """A reasoning model sends no answer while it thinks (a minute at times): the panel showed
    "…" all the while, as if hung. Now `thinking` says so, until the answer's first piece."""
    thought = thinking_chunk("reasoning_content", "Let me see. ")
    with stand_in([(200, SSE, events(thought, thought, CHUNK, END, "[DONE]")[2])]) as server:
        chat = ln.Chat(server.url)
        panel, seen = ChatPanel(chat), []
        panel.observe(lambda change: seen.append(("thinking", change["new"])), "thinking")
        panel.observe(lambda change: seen.append(("answer", change["new"])), "live_answer")
        assert chat.ask("Hello?") == "Hi"
        panel.close()
    assert seen[:3] == [("thinking", True), ("thinking", False), ("answer", "Hi")], seen
    assert not panel.thinking
