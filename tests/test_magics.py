"""The %llava / %%llava magics, driven through a real (bare) IPython shell and tiny real models.

The tiny checkpoints have random weights, so answers are gibberish: the tests check behaviour
(what is stored, shown, pinned, loaded) and that the magic's answer is exactly the Chat's.
"""

from __future__ import annotations

import _thread
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from signal import SIGINT

import numpy as np
import pytest
from IPython.utils.capture import capture_output

from llava_nb.magics import Answer, LlavaMagics
from llava_nb.models import REGISTRY
from tests.conftest import (
    CHUNK,
    END,
    SSE,
    events,
    holding_lock,
    interrupt_in_unload,
    loopback_server,
    thinking_chunk,
    thinking_server,
)

ROOT = Path(__file__).resolve().parents[1]
LONG_QUESTION = "Describe every little detail of the picture please. " * 200  # > 1024 tokens


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def shell(tmp_path_factory):
    from IPython.core.interactiveshell import InteractiveShell

    with pytest.MonkeyPatch.context() as patch:  # its profile and history go to a temp dir
        patch.setenv("IPYTHONDIR", str(tmp_path_factory.mktemp("ipython")))
        shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "llava_nb")
    return shell


def _env() -> dict[str, str]:
    """The environment for a fresh Python that imports this checkout's llava_nb."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=600
    )


def _reset(magics: LlavaMagics) -> None:
    magics.chats.clear()
    magics.pinned.clear()
    for name, trait in magics.traits(config=True).items():
        setattr(magics, name, trait.default())
    magics.current = None


@pytest.fixture
def magics(shell, tiny_llava, photo, monkeypatch) -> LlavaMagics:
    """The shell's LlavaMagics, fresh: no chats, default settings, the tiny model configured."""
    monkeypatch.delenv("LLAVA_NB_MODEL", raising=False)
    magics = shell.magics_manager.registry["LlavaMagics"]
    _reset(magics)
    magics.model = tiny_llava
    magics.max_new_tokens = 8  # short answers keep the tests fast
    shell.user_ns["photo"] = photo
    yield magics
    _reset(magics)


@pytest.fixture(scope="module")
def photo_path() -> str:
    import matplotlib.cbook

    return str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


@pytest.fixture(scope="module")
def endless_llava(tmp_path_factory) -> str:
    """A tiny checkpoint that never says end-of-sequence: it answers up to max_new_tokens."""
    from llava_nb.testing import make_tiny_llava

    path = Path(make_tiny_llava(tmp_path_factory.mktemp("tiny") / "endless", "llava"))
    config = json.loads((path / "generation_config.json").read_text())
    config["suppress_tokens"] = [config["eos_token_id"]]
    (path / "generation_config.json").write_text(json.dumps(config))
    return str(path)


def ask(shell, line: str, cell: str):
    with capture_output() as cap:
        result = shell.run_cell_magic("llava", line, cell)
    return result, cap


def cmd(shell, line: str):
    with capture_output() as cap:
        result = shell.run_line_magic("llava", line)
    return result, cap


def markdown(result) -> str:
    assert result is not None, "expected a Markdown value"
    return result._repr_markdown_()


def quiet(cap) -> bool:
    """No error line and no traceback (a first load may show transformers' progress bar)."""
    return "llava_nb:" not in cap.stderr and "Traceback" not in cap.stdout + cap.stderr


def one_error(cap, *fragments: str) -> str:
    """The output is exactly one `llava_nb: ...` line on stderr, no traceback, no display."""
    lines = cap.stderr.strip().splitlines()
    assert len(lines) == 1, cap.stderr
    assert lines[0].startswith("llava_nb: "), lines[0]
    assert "Traceback" not in cap.stdout + cap.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def same_pixels(a, b) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


def snapshot(magics: LlavaMagics) -> dict:
    return {
        name: [(t.question, t.answer, len(t.images), t.interrupted) for t in chat.history]
        for name, chat in magics.chats.items()
    }


def image_tokens_in_prompt(chat, question: str = "next?") -> int:
    """How many <image> placeholders the checkpoint's own template puts in the next prompt."""
    template = chat.model.processor.apply_chat_template(
        chat.messages(question), tokenize=False, add_generation_prompt=True
    )
    return template.count("<image>")


# ---------------------------------------------------------------- questions


def test_question_streams_into_one_display_and_returns_the_answer(shell, magics):
    result, cap = ask(shell, "-i photo", "What is in this picture?")
    chat = magics.chats["default"]
    assert isinstance(result, Answer)
    assert result == chat.history[-1].answer and result
    assert result._repr_markdown_() == str(result)
    assert quiet(cap)
    outputs = cap.outputs
    assert outputs[0].data["text/markdown"] == "…"  # a placeholder, then updates in place
    display_id = outputs[0].transient["display_id"]
    assert len(outputs) >= 2
    assert all(o.update and o.transient["display_id"] == display_id for o in outputs[1:])
    shown = [o.data["text/markdown"] for o in outputs[1:-1]]
    assert all(result.startswith(text) for text in shown)
    assert outputs[-1].data["text/markdown"] == ""  # the cell's value shows the answer


def test_run_cell_makes_the_answer_the_cells_markdown_value(shell, magics):
    with capture_output() as cap:
        outcome = shell.run_cell(
            "%%llava -i photo\nWhat is in this picture?\n", store_history=False
        )
    assert outcome.success
    assert outcome.result == magics.chats["default"].history[-1].answer
    assert isinstance(outcome.result, Answer)
    assert "Traceback" not in cap.stdout + cap.stderr


def test_image_from_variable_and_from_path(shell, magics, photo, photo_path):
    ask(shell, "-i photo", "What is this?")
    shell.user_ns["where"] = photo_path
    try:
        ask(shell, "-c by_path -i {where}", "And this?")  # {} in options: IPython expands it
    finally:
        shell.user_ns.pop("where")
    ask(shell, f"-c both -i photo {photo_path} -i photo", "Compare them.")
    (turn,) = magics.chats["default"].history
    assert len(turn.images) == 1 and same_pixels(turn.images[0], photo)
    (turn,) = magics.chats["by_path"].history
    assert len(turn.images) == 1 and same_pixels(turn.images[0], photo)
    (turn,) = magics.chats["both"].history
    assert len(turn.images) == 3
    assert image_tokens_in_prompt(magics.chats["both"]) == 3


def test_images_stay_in_the_chat_for_later_turns(shell, magics, photo):
    ask(shell, "-i photo", "What is in this picture?")
    answer, cap = ask(shell, "", "What is she wearing?")
    assert quiet(cap)
    chat = magics.chats["default"]
    first, second = chat.history
    assert len(first.images) == 1 and second.images == []
    messages = chat.messages()
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    image_parts = [part for part in messages[0]["content"] if part["type"] == "image"]
    assert len(image_parts) == 1 and same_pixels(image_parts[0]["image"], photo)
    assert messages[1]["content"][0]["text"] == first.answer
    assert messages[3]["content"][0]["text"] == answer == second.answer
    assert image_tokens_in_prompt(chat) == 1  # the third prompt still shows the photo


def test_interpolates_notebook_variables_only(shell, magics):
    shell.user_ns.update(animal="cat", count=3, line="USER LINE", cell="USER CELL")
    try:
        ask(shell, "", "Is there a {animal}? Are there {count + 1} of them? Is it worth $5?")
        ask(shell, "", "{line} / {cell}")  # the user's variables, not IPython's locals
        ask(shell, "", "Explain {undefined_name} and {a: 1}")  # left as typed
    finally:
        for name in ("animal", "count", "line", "cell"):
            shell.user_ns.pop(name)
    questions = [t.question for t in magics.chats["default"].history]
    assert questions == [
        "Is there a cat? Are there 4 of them? Is it worth $5?",
        "USER LINE / USER CELL",
        "Explain {undefined_name} and {a: 1}",
    ]
    shell.user_ns["pi"] = 3.14159
    try:
        _, cap = ask(shell, "", 'Is {pi:.2f} in {{pi}}, {pi!r}, {nope}? Answer as {"a": 1}.')
    finally:
        shell.user_ns.pop("pi")
    assert magics.chats["default"].history[-1].question == (
        'Is 3.14 in {pi}, 3.14159, {nope}? Answer as {"a": 1}.'  # each field on its own
    )
    one_error(cap, "left as typed: {nope} (NameError: name 'nope' is not defined)")


def test_named_chat_is_separate_from_default(shell, magics):
    ask(shell, "-i photo", "First question?")
    ask(shell, "-c other", "A question in another chat?")
    ask(shell, "-c other", "And a follow-up?")
    assert len(magics.chats["default"].history) == 1
    other = magics.chats["other"]
    assert [t.question for t in other.history] == [
        "A question in another chat?",
        "And a follow-up?",
    ]
    assert all(t.images == [] for t in other.history)
    assert image_tokens_in_prompt(other) == 0
    table = markdown(cmd(shell, "chats")[0])
    assert "| default |" in table and "| other |" in table


def test_new_starts_the_chat_afresh(shell, magics):
    ask(shell, "-i photo", "First?")
    old = magics.chats["default"]
    ask(shell, "--new", "Fresh start?")
    chat = magics.chats["default"]
    assert chat is not old
    assert [t.question for t in chat.history] == ["Fresh start?"]
    assert image_tokens_in_prompt(chat) == 0
    assert len(old.history) == 1


def test_output_variable(shell, magics):
    result, cap = ask(shell, "-i photo -o reply", "What is this?")
    try:
        assert result is None
        reply = shell.user_ns["reply"]
        assert reply == magics.chats["default"].history[-1].answer
        assert cap.outputs[-1].data["text/markdown"] == reply  # no cell value: the display keeps it
    finally:
        shell.user_ns.pop("reply", None)
    for name in ("2bad", "class"):  # `class = ...` is no variable either: it cannot be read
        result, cap = ask(shell, f"-o {name}", "What is this?")
        one_error(cap, "-o", f"'{name}' is not a Python variable name")
        assert name not in shell.user_ns and len(magics.chats["default"].history) == 1


def test_a_front_end_that_ignores_display_updates_still_shows_a_kept_answer(shell, magics):
    """jupyter console prints displays but not their updates: with -o VAR (no cell value) it
    showed the "…" placeholder and never the answer."""
    result, cap = ask(shell, "-o reply", "What is this?")
    printed = [o.data["text/markdown"] for o in cap.outputs if not o.update]
    assert result is None and printed == ["…", shell.user_ns.pop("reply")]


def test_a_reasoning_model_on_a_server_shows_thinking_until_its_answer(shell, magics, stand_in):
    """A reasoning model sends no answer while it thinks (a minute at times): the cell showed
    "…" all the while, as if hung."""
    thought = thinking_chunk("reasoning_content", "Let me see. ")
    with stand_in([(200, SSE, events(thought, CHUNK, END, "[DONE]")[2])]) as server:
        cmd(shell, f"load {server.url}")
        result, cap = ask(shell, "", "Hello?")
    assert result == "Hi" and quiet(cap)
    shown = [o.data["text/markdown"] for o in cap.outputs]
    assert shown == ["…", "*thinking…*", "Hi", ""], shown


def test_output_variable_never_hides_a_builtin(shell, magics):
    """`-o print` put the answer over print() in the notebook, silently."""
    for name in ("print", "len", "id", "input", "display"):
        result, cap = ask(shell, f"-o {name}", "What is this?")
        one_error(cap, "-o", f"'{name}' is a Python builtin", f"-o {name}_answer")
        assert result is None and name not in shell.user_ns and not magics.chats


def test_attention_without_an_image_is_refused_before_asking(shell, magics):
    ask(shell, "", "Hello?")  # loaded: no progress bar below
    turns = list(magics.chats["default"].history)
    _, cap = ask(shell, "--attention -o reply", "Hello?")  # no image: nothing to map onto
    one_error(cap, "maps the answer onto the conversation's images, and it has none")
    assert "reply" not in shell.user_ns and magics.chats["default"].history == turns


def test_an_api_error_in_a_cell_shows_one_line(shell, magics, capsys):
    result = shell.run_cell("import llava_nb as ln\nln.Chat(temperature=-1)")
    assert type(result.error_in_exec).__name__ == "GenerationError"
    out, err = capsys.readouterr()
    lines = (out + err).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("GenerationError: temperature must be"), lines
    result = shell.run_cell("1 / 0")  # anything else keeps its traceback
    assert "Traceback" in "".join(capsys.readouterr())


def test_options_keep_backslashes_and_hashes():
    from llava_nb.magics import parse_command, parse_question

    args = parse_question(r'-i C:\Users\me\cat#1.jpg "D:\my photos\dog.png" -c "a chat"')
    assert args.image == [r"C:\Users\me\cat#1.jpg", r"D:\my photos\dog.png"]
    assert args.chat == "a chat"
    assert parse_command(r"save C:\chats\a.json").file == r"C:\chats\a.json"


def test_generation_options(shell, magics):
    short, _ = ask(shell, "-c a --max-new-tokens 2", "Describe it.")
    long, _ = ask(shell, "-c b --max-new-tokens 12", "Describe it.")
    assert len(short) < len(long) and long.startswith(short.rstrip("\ufffd"))
    sampled = [
        ask(shell, f"-c s{i} --temperature 1.5 --top-p 0.9 --seed 7", "Describe it.")[0]
        for i in range(2)
    ]
    assert sampled[0] == sampled[1]  # a seed makes sampling repeatable
    _, cap = ask(shell, "--temperature -1", "Describe it.")
    one_error(cap, "temperature")
    _, cap = ask(shell, "--max-new-tokens many", "Describe it.")
    one_error(cap, "--max-new-tokens", "invalid int value")
    assert "default" not in magics.chats


def test_model_option_pins_a_chat(shell, magics, tiny_llava, tiny_llava_next):
    ask(shell, "", "Default model?")
    ask(shell, f"-c next -m {tiny_llava_next} -i photo", "NeXT model?")
    assert magics.chats["next"].model.model_id == tiny_llava_next
    assert magics.chats["default"].model.model_id == tiny_llava
    assert "next" in magics.pinned and "default" not in magics.pinned
    ask(shell, "-c next", "Still NeXT?")  # the pin holds without -m
    assert magics.chats["next"].model.model_id == tiny_llava_next
    cmd(shell, f"config model={tiny_llava_next}")
    ask(shell, "", "Default follows the config?")
    assert magics.chats["default"].model.model_id == tiny_llava_next
    cmd(shell, f"config model={tiny_llava}")
    ask(shell, "-c next", "Pinned chat ignores the config?")
    assert magics.chats["next"].model.model_id == tiny_llava_next
    assert len(magics.chats["next"].history) == 3
    table = markdown(cmd(shell, "chats")[0])
    assert f"| next | {tiny_llava_next} | 3 |" in table
    status = markdown(cmd(shell, "status")[0])
    assert (
        f"**model**: {tiny_llava}" in status and f"**also loaded**: {tiny_llava_next} (" in status
    )


def test_a_model_no_chat_uses_any_more_is_released(
    shell, magics, tiny_llava, tiny_llava_next, tmp_path
):
    """A chat pinned to a model (-m) that starts afresh (--new), moves to another model (-m), or
    is replaced by a chat file leaves its model to no one: it is released, not kept in memory
    where neither `%llava status` shows it nor `%llava unload` finds it."""
    ask(shell, f"-c p -m {tiny_llava_next}", "Pinned?")
    pinned = magics.chats["p"].model
    ask(shell, "-c p --new", "Fresh?")
    assert magics.chats["p"].model.model_id == tiny_llava and not pinned.loaded
    ask(shell, f"-c q -m {tiny_llava_next}", "Pinned again?")
    ask(shell, f"-c q -m {tiny_llava}", "Another model?")
    assert not pinned.loaded and magics.chats["q"].model.model_id == tiny_llava
    ask(shell, "-c saved", "Saved?")
    cmd(shell, f"save {tmp_path / 'saved.json'} saved")
    ask(shell, f"-c r -m {tiny_llava_next}", "Pinned once more?")
    cmd(shell, "undo r")  # empty: a chat file may be opened over it
    cmd(shell, "config quantization=none")  # the file says only the model's name
    _, cap = cmd(shell, f"open {tmp_path / 'saved.json'} r")
    assert quiet(cap) and not pinned.loaded
    assert magics.chats["r"].model is magics.current  # not a second copy, as a panel would load
    ask(shell, f"-c s -m {tiny_llava_next}", "Kept while used?")
    ask(shell, "-c s", "Still pinned?")
    assert magics.chats["s"].model.loaded  # a pinned chat's model stays while it is used


def test_config_model_switches_panels_and_cells_alike(shell, magics, tiny_llava, tiny_llava_next):
    """`%llava config model=B` after `%llava panel`: the panel's chat answers with B, as the
    next `%%llava` cell would; a chat pinned to a model (-m) keeps it."""
    ask(shell, f"-c pinned -m {tiny_llava}", "Pinned?")
    panel, _ = cmd(shell, "panel")
    try:
        _, cap = cmd(shell, f"config model={tiny_llava_next}")
        assert quiet(cap)
        assert panel.chat is magics.chats["default"]
        assert panel.chat.model is magics.current and magics.current.model_id == tiny_llava_next
        assert magics.chats["pinned"].model.model_id == tiny_llava
        panel._handle_custom_msg({"type": "send", "text": "From the panel?"}, [])
        panel._worker.join(60)
        assert panel.error == "" and magics.current.loaded
        assert "LLaVA-NeXT" in panel.status  # the model that answered
        _, cap = cmd(shell, "config model=/no/such/folder")  # refused: no chat changes model
        assert "llava_nb:" in cap.stderr and panel.chat.model.model_id == tiny_llava_next
        cmd(shell, f"load {tiny_llava}")  # a load switches them too
        assert panel.chat.model is magics.current and panel.chat.model.model_id == tiny_llava
    finally:
        panel.close()


# ---------------------------------------------------------------- settings


def test_config_shows_and_sets_settings(shell, magics, tiny_llava):
    table = markdown(cmd(shell, "config")[0])
    for key in ("model", "quantization", "device", "max_new_tokens", "temperature", "top_p"):
        assert f"| {key} |" in table
    assert repr(tiny_llava) in table
    ask(shell, "", "A question?")
    result, cap = cmd(shell, "config max_new_tokens=3 temperature=0.5 top-p=0.8")
    assert result is None and quiet(cap), cap.stdout + cap.stderr
    assert (magics.max_new_tokens, magics.temperature, magics.top_p) == (3, 0.5, 0.8)
    settings = magics.chats["default"].settings  # open chats follow the new settings
    assert (settings["max_new_tokens"], settings["temperature"], settings["top_p"]) == (3, 0.5, 0.8)
    cmd(shell, "config quantization=none device=cpu")
    assert (magics.quantization, magics.device) == ("none", "cpu")


@pytest.mark.parametrize(
    ("assignment", "fragment"),
    [
        ("bogus=1", "KEY one of"),
        ("max_new_tokens", "KEY=VALUE"),
        ("max_new_tokens=abc", "bad value for max_new_tokens"),
        ("max_new_tokens=0", "positive integer"),
        ("temperature=-1", "bad value for temperature"),
        ("top_p=1.5", "bad value for top_p"),
        ("quantization=16bit", "bad value for quantization"),
        ("device=tpu", "bad value for device: 'tpu' (unknown device 'tpu'; use cuda, cuda:N,"),
        ("temperature=0.3 quantization=16bit", "bad value for quantization"),  # all or nothing
        ("device=cuda:99", "llava_nb: device 'cuda:99' "),  # not on this machine: no 100 GPUs
        ("model=/no/such/folder", "model folder '/no/such/folder' does not exist; check the path"),
        ("model='my llava'", "'my llava' is neither a model folder nor a hub id like"),
    ],
)
def test_config_refuses_bad_keys_and_values(shell, magics, assignment, fragment):
    before = {name: getattr(magics, name) for name in magics.class_trait_names(config=True)}
    result, cap = cmd(shell, f"config {assignment}")
    assert result is None
    one_error(cap, fragment)
    assert {name: getattr(magics, name) for name in before} == before


def test_percent_config_sets_the_default_model(shell, magics, tiny_llava_next):
    ask(shell, "", "Old model?")
    with capture_output() as cap:
        shell.run_line_magic("config", f"LlavaMagics.model = {tiny_llava_next!r}")
        shell.run_line_magic("config", "LlavaMagics.max_new_tokens = 4")
    assert quiet(cap)
    assert magics.model == tiny_llava_next and magics.max_new_tokens == 4
    ask(shell, "", "New model?")
    assert magics.chats["default"].model.model_id == tiny_llava_next
    with capture_output():
        shell.run_line_magic("config", "LlavaMagics.max_new_tokens = 0")  # IPython logs it
    assert magics.max_new_tokens == 4


def test_percent_config_switches_open_chats_as_llava_config_does(
    shell, magics, tiny_llava, tiny_llava_next, tmp_path, caplog
):
    """IPython's own `%config LlavaMagics.model = ...` switches the chats that follow the
    configured model at once, as `%llava config model=...` does (a panel on one answers with
    it, `%llava chats` shows it); pinned chats keep theirs; a missing folder is refused by both."""
    from llava_nb import models

    ask(shell, f"-c pinned -m {tiny_llava}", "Pinned?")
    ask(shell, "", "Old model?")
    with capture_output() as cap:
        shell.run_line_magic("config", f"LlavaMagics.model = {tiny_llava_next!r}")
    assert quiet(cap)
    assert magics.current.model_id == tiny_llava_next
    assert magics.chats["default"].model is magics.current
    assert magics.chats["pinned"].model.model_id == tiny_llava
    assert f"| default | {tiny_llava_next} | 1 |" in markdown(cmd(shell, "chats")[0])
    with capture_output():
        shell.run_line_magic("config", "LlavaMagics.model = '/no/such/folder'")  # IPython logs
    assert "model folder '/no/such/folder' does not exist; check the path" in caplog.text
    assert magics.model == tiny_llava_next and magics.chats["default"].model is magics.current
    # several model keys at once: the chats switch once, to the model they all name
    linked = tmp_path / "linked"
    linked.symlink_to(tiny_llava)
    _, cap = cmd(shell, f"config model={linked} quantization=none device=cpu")
    assert quiet(cap)
    assert [key for key in models._shared if key[0] == str(linked)] == [
        (str(linked), "none", "cpu")
    ]
    assert magics.chats["default"].model is models._shared[(str(linked), "none", "cpu")]


def test_env_variable_gives_the_default_model(shell, magics, tiny_llava_next, monkeypatch):
    magics.model = ""
    monkeypatch.setenv("LLAVA_NB_MODEL", tiny_llava_next)
    result, cap = ask(shell, "-i photo", "Which model?")
    assert quiet(cap) and result
    assert magics.chats["default"].model.model_id == tiny_llava_next
    assert f"**model**: {tiny_llava_next}" in markdown(cmd(shell, "status")[0])


# ---------------------------------------------------------------- model commands


def test_load_unload_status(shell, magics, tiny_llava):
    cmd(shell, "load")
    cmd(shell, "unload")
    status = markdown(cmd(shell, "status")[0])
    assert "**state**: unloaded" in status and "**memory**: 0.00 MB" in status
    assert "**chats**: none" in status
    result, cap = cmd(shell, "load")
    assert result is None and cap.stderr.count("llava_nb:") == 0
    assert f"llava_nb: loading {tiny_llava} on cpu" in cap.stdout
    assert "llava_nb: loaded in" in cap.stdout
    assert magics.current.loaded
    ask(shell, "", "Question?")
    status = markdown(cmd(shell, "status")[0])
    assert "**state**: loaded" in status and f"**model**: {tiny_llava}" in status
    assert "**device**: cpu" in status and "**dtype**: float32" in status
    memory = status.split("**memory**: ")[1].split()[0]
    assert float(memory) > 0
    assert "**chats**: default (1 turn)" in status
    model = magics.current
    _, cap = cmd(shell, "unload")
    assert cap.stdout.strip() == f"llava_nb: unloaded {tiny_llava}"
    assert not model.loaded and "**state**: unloaded" in markdown(cmd(shell, "status")[0])
    _, cap = cmd(shell, "unload")
    assert cap.stdout.strip() == "llava_nb: no model is loaded"
    result, cap = ask(shell, "", "Loads again on first use?")
    assert result and model.loaded and len(magics.chats["default"].history) == 2


def test_load_with_options_switches_models(shell, magics, tiny_llava, tiny_llava_next):
    cmd(shell, "load")
    old = magics.current
    _, cap = cmd(shell, "load --no-quant --device cpu")
    assert quiet(cap) and (magics.quantization, magics.device) == ("none", "cpu")
    assert magics.current.loaded and magics.current is not old
    assert not old.loaded  # one model in memory at a time
    assert "**quantization**: none" in markdown(cmd(shell, "status")[0])
    cmd(shell, f"load {tiny_llava_next}")
    assert magics.model == tiny_llava_next and magics.current.loaded
    assert "**family**: LLaVA-NeXT" in markdown(cmd(shell, "status")[0])
    _, cap = cmd(shell, "load --4bit --8bit")
    one_error(cap, "not allowed with argument")


def test_reload_ext_keeps_the_chats_settings_and_model(shell, magics):
    ask(shell, "-i photo", "First?")
    cmd(shell, "config max_new_tokens=6")
    model = magics.current
    shell.run_line_magic("reload_ext", "llava_nb")
    reloaded = shell.magics_manager.registry["LlavaMagics"]
    assert reloaded is not magics and reloaded.chats is magics.chats
    assert reloaded.max_new_tokens == 6 and reloaded.current is model and model.loaded
    assert [c for c in shell.configurables if isinstance(c, LlavaMagics)] == [reloaded]
    ask(shell, "", "Second?")
    assert [t.question for t in reloaded.chats["default"].history] == ["First?", "Second?"]
    _, cap = cmd(shell, "unload")  # the weights loaded before the reload can be freed
    assert "llava_nb: unloaded" in cap.stdout and not model.loaded


def test_a_cell_does_not_wait_on_a_model_busy_elsewhere(shell, magics):
    ask(shell, "", "First?")
    release = threading.Event()
    worker = holding_lock(magics.current, release)  # as a panel's answer does
    try:
        start = time.monotonic()
        _, cap = ask(shell, "", "Second?")
        one_error(cap, "the model is busy with another question (a chat panel's?)")
        # not after waiting for the lock (120 s), nor a timeout on it: at once
        assert time.monotonic() - start < 20 and len(magics.chats["default"].history) == 1
    finally:
        release.set()
        worker.join()
    result, cap = ask(shell, "", "Second?")
    assert quiet(cap) and result == magics.chats["default"].history[-1].answer
    assert len(magics.chats["default"].history) == 2


def test_unknown_model_fails_fast_and_harms_nothing(shell, magics, tiny_llava):
    ask(shell, "-i photo", "First?")
    before = snapshot(magics)
    model = magics.current
    start = time.monotonic()
    _, cap = ask(shell, "-m llava-hf/no-such-model", "Second?")
    one_error(cap, "llava-hf/no-such-model")
    _, cap = cmd(shell, "load llava-hf/no-such-model")
    one_error(cap, "llava-hf/no-such-model")
    _, cap = ask(shell, "-c fresh -m /no/such/folder", "Third?")
    one_error(cap, "/no/such/folder")
    _, cap = cmd(shell, "load /no/such/folder --device tpu")  # the model named first
    one_error(cap, "model folder '/no/such/folder' does not exist")
    _, cap = cmd(shell, f"load {tiny_llava} --device tpu")
    one_error(cap, "unknown device 'tpu'; use cuda, cuda:N, mps or cpu")
    _, cap = cmd(shell, f"load {tiny_llava} --remote-model m")
    one_error(cap, "--remote-model and --api-key are for a server")
    assert time.monotonic() - start < 20  # offline: no waiting on the hub's retries
    assert snapshot(magics) == before and "fresh" not in magics.chats
    assert magics.pinned == set()
    assert magics.model == tiny_llava and magics.current is model and model.loaded
    result, cap = ask(shell, "", "Still works?")
    assert quiet(cap) and result == magics.chats["default"].history[-1].answer
    assert magics.chats["default"].model is model


def test_models_table(shell, magics):
    table = markdown(cmd(shell, "models")[0])
    lines = table.splitlines()
    assert lines[0].startswith("| model | family | size |")
    assert len(lines) == 2 + len(REGISTRY)
    for model_id in REGISTRY:
        assert f"| {model_id} |" in table
    assert "LLaVA-NeXT" in table and "4-bit weights" in table


def test_help(shell, magics):
    result, cap = cmd(shell, "help")
    assert result is None
    for word in ("%%llava", "--max-new-tokens", "%llava load", "history", "save FILE", "config"):
        assert word in cap.stdout


# ---------------------------------------------------------------- history commands


def test_history_undo_reset(shell, magics):
    ask(shell, "-i photo", "What is this?")
    ask(shell, "", "Tell me more.")
    chat = magics.chats["default"]
    history = markdown(cmd(shell, "history")[0])
    assert history.count("**You:**") == 2 and history.count("**LLaVA:**") == 2
    assert "**You:** *[1 image(s)]* What is this?" in history
    assert f"**LLaVA:** {chat.history[1].answer}" in history
    _, cap = cmd(shell, "undo")
    assert cap.stdout.strip() == "llava_nb: removed 'Tell me more.'"
    assert [t.question for t in chat.history] == ["What is this?"]
    assert image_tokens_in_prompt(chat) == 1
    _, cap = cmd(shell, "reset")
    assert cap.stdout.strip() == "llava_nb: chat 'default' reset" and chat.history == []
    assert markdown(cmd(shell, "history")[0]) == "*(no turns yet)*"
    _, cap = cmd(shell, "undo")
    assert cap.stdout.strip() == "llava_nb: nothing to undo"
    ask(shell, "-c other", "Other?")
    assert "Other?" in markdown(cmd(shell, "history other")[0])
    cmd(shell, "undo other")
    assert magics.chats["other"].history == []
    for command in ("history nope", "undo nope", "reset nope", "save x.json nope"):
        _, cap = cmd(shell, command)
        one_error(cap, "no chat named 'nope'")


def test_save_and_open_round_trip(shell, magics, tmp_path, photo, tiny_llava_next):
    ask(shell, "-i photo", "What is this?")
    ask(shell, "", "Tell me more.")
    path = tmp_path / "chats" / "default.json"
    _, cap = cmd(shell, f"save {path}")
    assert cap.stdout.strip() == f"llava_nb: saved chat 'default' (2 turns) to {path}"
    assert json.loads(path.read_text())["format"] == "llava_nb.chat"
    _, cap = cmd(shell, f"open {path} restored")
    assert cap.stdout.strip() == f"llava_nb: opened {path} as chat 'restored' (2 turns)"
    original, restored = magics.chats["default"], magics.chats["restored"]
    assert restored is not original and "restored" not in magics.pinned
    assert [(t.question, t.answer, t.interrupted) for t in restored.history] == [
        (t.question, t.answer, t.interrupted) for t in original.history
    ]
    assert same_pixels(restored.history[0].images[0], photo)
    result, _ = ask(shell, "-c restored", "And now?")  # the restored chat goes on
    assert result == restored.history[-1].answer and len(restored.history) == 3
    assert image_tokens_in_prompt(restored) == 1
    assert len(original.history) == 2

    ask(shell, f"-c next -m {tiny_llava_next}", "NeXT?")
    cmd(shell, f"save {tmp_path / 'next.json'} next")
    cmd(shell, f"open {tmp_path / 'next.json'} again")
    assert "again" in magics.pinned  # saved with another model: it keeps that model
    ask(shell, "-c again", "Still NeXT?")
    assert magics.chats["again"].model.model_id == tiny_llava_next


def test_save_and_open_errors(shell, magics, tmp_path):
    ask(shell, "", "Question?")
    before = snapshot(magics)
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    cases = [
        (f"save {tmp_path / 'file' / 'chat.json'}", "cannot save chat"),
        (f"open {tmp_path / 'missing.json'}", "not found"),
        (f"open {tmp_path / 'bad.json'}", "not readable JSON"),
        (f"open {tmp_path / 'other.json'}", "not a llava_nb chat file"),
        ("open", "the following arguments are required: file"),
    ]
    for line, fragment in cases:
        result, cap = cmd(shell, line)
        assert result is None
        one_error(cap, fragment)
    assert snapshot(magics) == before


def test_open_never_replaces_a_chat_with_turns(shell, magics, tmp_path):
    ask(shell, "-c saved", "Saved?")
    path = tmp_path / "saved.json"
    cmd(shell, f"save {path} saved")
    ask(shell, "", "First?")
    ask(shell, "", "Second?")
    ask(shell, "-c work", "Work?")
    before = snapshot(magics)
    for line, fragments in [
        (f"open {path}", ("chat 'default' already has 2 turn(s)", f"%llava open {path} NAME")),
        (f"open {path} default", ("chat 'default' already has 2 turn(s)", "(%llava reset)")),
        (f"open {path} work", ("chat 'work' already has 1 turn(s)", "(%llava reset work)")),
    ]:
        result, cap = cmd(shell, line)
        assert result is None
        one_error(cap, *fragments)
    assert snapshot(magics) == before
    _, cap = cmd(shell, f"open {path} copy")  # a new chat
    assert cap.stdout.strip() == f"llava_nb: opened {path} as chat 'copy' (1 turn)"
    cmd(shell, "undo work")
    _, cap = cmd(shell, f"open {path} work")  # an empty chat
    assert quiet(cap) and [t.question for t in magics.chats["work"].history] == ["Saved?"]
    cmd(shell, "reset")
    _, cap = cmd(shell, f"open {path}")
    assert quiet(cap) and [t.question for t in magics.chats["default"].history] == ["Saved?"]
    _, cap = cmd(shell, f"open {path} saved")  # the very conversation in the file: a rerun cell
    assert cap.stdout.strip() == f"llava_nb: opened {path} as chat 'saved' (1 turn)"


def test_save_never_replaces_a_file_that_is_not_a_chat(shell, magics, tmp_path):
    ask(shell, "", "Question?")
    dataset = tmp_path / "train.json"
    dataset.write_text('[{"image": "a.jpg", "question": "q", "answer": "a"}]')
    _, cap = cmd(shell, f"save {dataset}")
    one_error(cap, f"'{dataset}' exists and is not a llava_nb chat file", "another name")
    assert dataset.read_text() == '[{"image": "a.jpg", "question": "q", "answer": "a"}]'
    _, cap = cmd(shell, f"save {tmp_path / 'chat.json'}")
    ask(shell, "", "More?")
    _, cap = cmd(shell, f"save {tmp_path / 'chat.json'}")  # saving again is normal
    assert cap.stdout.strip().endswith(f"(2 turns) to {tmp_path / 'chat.json'}")
    for line in ("save ''", 'save ""', "open ''"):
        _, cap = cmd(shell, line)
        one_error(cap, "the chat file name is empty")


def test_open_a_damaged_chat_file_names_turn_and_field(shell, magics, tmp_path):
    ask(shell, "-c mine", "Mine?")
    before = snapshot(magics)
    base = {
        "format": "llava_nb.chat",
        "version": 1,
        "model": magics.model,
        "settings": {"max_new_tokens": 3, "temperature": 0.0, "top_p": 1.0, "seed": None},
    }
    for turn, fragment in [
        ({"question": "q", "images": [5], "answer": "a"}, "turn 1, field 'images' item 1"),
        ({"question": 5, "images": [], "answer": None}, "turn 1, field 'question' must be text"),
    ]:
        path = tmp_path / "edited.json"
        path.write_text(json.dumps({**base, "turns": [turn]}))
        for line in (f"open {path} mine", f"open {path} fresh"):
            _, cap = cmd(shell, line)
            one_error(cap, f"chat file '{path}' is damaged", fragment)
    assert snapshot(magics) == before


def test_adapter_command_sets_and_clears_a_chats_adapter(shell, magics, tmp_path):
    """A chat opened from a file whose adapter folder is gone failed every question, and only
    Python could clear it; `%llava adapter none` answers with the base model again."""
    ask(shell, "-c tuned", "Saved?")
    path = tmp_path / "tuned.json"
    cmd(shell, f"save {path} tuned")
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "adapter": str(tmp_path / "gone")}))
    cmd(shell, f"open {path} restored")
    _, cap = ask(shell, "-c restored", "Still there?")
    one_error(cap, f"adapter folder '{tmp_path / 'gone'}' not found")
    _, cap = cmd(shell, f"adapter {tmp_path / 'nowhere'} restored")
    one_error(cap, "not found")
    assert magics.chats["restored"].adapter == str(tmp_path / "gone")  # unchanged
    _, cap = cmd(shell, "adapter none restored")
    assert cap.stdout.strip() == "llava_nb: chat 'restored' answers with the base model"
    result, cap = ask(shell, "-c restored", "Still there?")
    assert quiet(cap) and result == magics.chats["restored"].history[-1].answer
    assert len(magics.chats["restored"].history) == 2
    _, cap = cmd(shell, "adapter none nope")
    one_error(cap, "no chat named 'nope'")


# ---------------------------------------------------------------- bad input


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("line", "cell", "fragment"),
    [
        ("-i missing.jpg", "What is this?", "not found"),
        ("-i {corrupt}", "What is this?", "not a readable image"),
        ("-i http://127.0.0.1:{port}/photo.jpg", "What is this?", "cannot fetch"),
        ("-i not_an_image_variable", "What is this?", "cannot load an image"),
        ("", "\n", "the cell is empty"),
        ("-i photo", "   \n  ", "the cell is empty"),
        ("", LONG_QUESTION, "more than the model's context of 1024 tokens can hold"),
        ("-i photo", LONG_QUESTION, "more than the model's context of 1024 tokens can hold"),
        ("--new", LONG_QUESTION, "context"),  # --new only once the question is accepted
        ("--bogus", "What is this?", "unrecognized arguments: --bogus"),
        ("-x 1", "What is this?", "unrecognized arguments: -x"),
        ("-i", "What is this?", "expected at least one argument"),
        ('-i "photo', "What is this?", "check the quotes"),
        ("-c ''", "What is this?", "a chat needs a name"),
        ("-i {photo}", "What is this?", "write its name (-i img), not {img} or $img"),
    ],
)
def test_bad_input_prints_one_line_and_harms_nothing(shell, magics, tmp_path, line, cell, fragment):
    ask(shell, "-i photo", "First question?")
    before = snapshot(magics)
    chat = magics.chats["default"]
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG" * 10)
    shell.user_ns.update(corrupt=str(corrupt), port=_closed_port(), not_an_image_variable=42)
    try:
        result, cap = ask(shell, line, cell)
    finally:
        for name in ("corrupt", "port", "not_an_image_variable"):
            shell.user_ns.pop(name)
    assert result is None
    message = one_error(cap, fragment)
    assert len(message) < 400
    assert snapshot(magics) == before and magics.chats["default"] is chat
    assert all(o.data.get("text/markdown") == "" for o in cap.outputs[1:])
    result, cap = ask(shell, "", "Does it still work?")
    assert quiet(cap) and result == chat.history[-1].answer
    assert image_tokens_in_prompt(chat) == 1


def test_cell_with_no_body_gives_one_line(shell, magics):
    """A bare `%%llava` cell never reaches the magic: IPython itself says so, in one line."""
    ask(shell, "", "First?")
    before = snapshot(magics)
    with capture_output() as cap:
        outcome = shell.run_cell("%%llava -i photo", store_history=False)
    assert not outcome.success
    lines = cap.stderr.strip().splitlines()
    assert len(lines) == 1 and "the cell body is empty" in lines[0], cap.stderr
    assert "Traceback" not in cap.stdout + cap.stderr
    assert snapshot(magics) == before


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("", "%llava needs a command"),
        ("What is this?", "invalid choice: 'What'"),
        ("frobnicate", "invalid choice: 'frobnicate'"),
        ("status --verbose", "unrecognized arguments: --verbose"),
        ("history a b", "unrecognized arguments: b"),
        ("save", "required: file"),
    ],
)
def test_bad_commands_print_one_line(shell, magics, line, fragment):
    ask(shell, "", "First?")
    before = snapshot(magics)
    result, cap = cmd(shell, line)
    assert result is None
    one_error(cap, fragment)
    assert snapshot(magics) == before


def test_errors_go_to_stderr(shell, magics, capsys):
    shell.run_cell_magic("llava", "-i nowhere.png", "What is this?")
    shell.run_line_magic("llava", "frobnicate")
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 2 and all(line.startswith("llava_nb: ") for line in lines)


# ---------------------------------------------------------------- interrupting


def _interrupt_when(condition) -> threading.Thread:
    """Raise KeyboardInterrupt in the main thread (as Ctrl-C / a kernel interrupt does) once
    `condition()` holds; the thread's `.sent_at` is then the `time.monotonic()` it did."""

    def watch() -> None:
        deadline = time.monotonic() + 60
        while not condition():
            if time.monotonic() > deadline:
                return
            time.sleep(0.002)
        watcher.sent_at = time.monotonic()
        _thread.interrupt_main()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.sent_at = None
    watcher.start()
    return watcher


def test_interrupt_keeps_the_partial_answer(shell, magics, endless_llava):
    magics.model = endless_llava
    ask(shell, "-i photo", "First question?")
    chat = magics.chats["default"]
    with capture_output() as cap:
        streamed = lambda: any(o.update and o.data["text/markdown"] for o in cap.outputs)  # noqa: E731
        watcher = _interrupt_when(streamed)
        try:
            result = shell.run_cell_magic(
                "llava", "--max-new-tokens 1000 -o partial", "Go on and on."
            )
            ended = time.monotonic()
            watcher.join()
            time.sleep(0.05)  # a late interrupt would land here, not in pytest
        except KeyboardInterrupt:
            pytest.fail("the interrupt escaped the magic")
    assert result is None and quiet(cap), cap.stdout + cap.stderr
    assert "Traceback" not in cap.stdout
    turn = chat.history[-1]
    assert turn.question == "Go on and on." and turn.interrupted
    final = cap.outputs[-1].data["text/markdown"]
    assert final == turn.answer + " *(interrupted)*"
    assert not cap.outputs[-1].update  # a display of its own: jupyter console prints it too
    assert shell.user_ns.pop("partial") == turn.answer  # -o VAR gets the partial answer
    assert watcher.sent_at is not None and ended - watcher.sent_at < 5  # within a token
    history = markdown(cmd(shell, "history")[0])
    assert history.endswith(f"**LLaVA:** {turn.answer} *(interrupted)*")
    # the chat goes on: the partial answer is part of the conversation
    result, cap = ask(shell, "", "Now answer briefly.")
    assert quiet(cap) and result == chat.history[-1].answer
    assert len(chat.history) == 3 and not chat.history[-1].interrupted
    assert chat.messages()[3]["content"][0]["text"] == turn.answer


# ---------------------------------------------------------------- import cost


def test_import_and_load_ext_do_not_import_torch():
    code = """
import sys
import llava_nb
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()
shell.run_line_magic("load_ext", "llava_nb")
for line in ("help", "models", "config", "config max_new_tokens=16", "chats", "status"):
    shell.run_line_magic("llava", line)
print("HEAVY:", sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert "HEAVY: []" in done.stdout, done.stdout + done.stderr


def test_a_refused_configured_value_leaves_the_magics_loaded():
    """A value ipython_config.py (or a %config before %load_ext) gives that the magics refuse
    is one line at %load_ext, and the magics load with their defaults: not a traceback, and no
    %llava to fix it with."""
    code = """
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()
shell.config.LlavaMagics.device = "tpu"
shell.run_line_magic("load_ext", "llava_nb")
shell.run_line_magic("llava", "config max_new_tokens=16")
magics = shell.magics_manager.registry["LlavaMagics"]
print("SETTINGS:", repr(magics.device), magics.max_new_tokens)
"""
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert "SETTINGS: '' 16" in done.stdout, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("llava_nb: the configured LlavaMagics settings were refused")
    assert "unknown device 'tpu'" in lines[0]


@pytest.fixture
def stalled_url():
    """An image URL whose server answers only once the test is done (an interrupt comes first)."""
    import http.server

    release = threading.Event()
    asked = threading.Event()

    class Stalled(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.set()
            release.wait(120)
            self.send_error(404)

        def log_message(self, *args) -> None:
            pass

    with loopback_server(Stalled) as url:
        try:
            yield url + "/photo.jpg", asked
        finally:
            release.set()


def test_an_interrupt_before_the_answer_begins_prints_one_line(shell, magics, stalled_url):
    url, asked = stalled_url
    ask(shell, "-i photo", "First?")
    before = snapshot(magics)
    sent_at: list[float] = []

    def interrupt_once_asked() -> None:  # a real SIGINT, as a kernel interrupt sends
        if asked.wait(60):
            sent_at.append(time.monotonic())
            os.kill(os.getpid(), SIGINT)

    watcher = threading.Thread(target=interrupt_once_asked)
    watcher.start()
    try:
        result, cap = ask(shell, f"-i {url}", "And this one?")
        assert sent_at and time.monotonic() - sent_at[0] < 5  # it broke the socket's wait
        watcher.join()
        time.sleep(0.05)  # a late interrupt would land here, not in pytest
    except KeyboardInterrupt:
        pytest.fail("the interrupt escaped the magic as a traceback")
    assert result is None
    one_error(cap, "interrupted before the answer began", "not asked")
    assert snapshot(magics) == before


def _load_with_an_interrupt(shell, model_id: str, interrupter):
    """`%llava load MODEL_ID` while `interrupter`, on a thread of its own, sends a real SIGINT:
    what the magic printed; an interrupt escaping the magic fails the test."""
    watcher = threading.Thread(target=interrupter)
    watcher.start()
    try:
        _, cap = cmd(shell, f"load {model_id}")
        watcher.join()
        time.sleep(0.05)
    except KeyboardInterrupt:
        pytest.fail("the interrupt escaped the magic as a traceback")
    return cap


def test_an_interrupted_load_keeps_the_model_it_loaded_and_no_other(shell, magics, tmp_path):
    """A load cannot stop halfway: interrupted, it ends, and that model is the one in use (as
    the README says), not loaded behind the magics' back with the old settings back."""
    from llava_nb.models import get_model
    from llava_nb.testing import make_tiny_llava

    cmd(shell, "load")
    in_use = magics.current
    other = get_model(make_tiny_llava(tmp_path / "other", "llava", width=256, layers=4))

    def waiting_for_the_load() -> bool:
        """The main thread waits for the load thread to finish (the interrupt lands in the
        load's wait, the case this test is about; one in Thread.start has its own test in
        test_models)."""
        frame = sys._current_frames().get(threading.main_thread().ident)
        while frame is not None and frame.f_back is not None:
            if (frame.f_code.co_name, frame.f_back.f_code.co_name) == (
                "wait",
                "_on_a_thread_of_its_own",
            ):
                return True
            frame = frame.f_back
        return False

    def interrupt_while_loading() -> None:  # a real SIGINT, once the load says it began
        deadline = time.monotonic() + 60
        while "llava_nb: loading" not in getattr(sys.stdout, "getvalue", str)() or (
            not waiting_for_the_load()
        ):
            if time.monotonic() > deadline:
                return
            time.sleep(0.001)
        os.kill(os.getpid(), SIGINT)

    cap = _load_with_an_interrupt(shell, other.model_id, interrupt_while_loading)
    assert "Traceback" not in cap.stdout + cap.stderr
    last = cap.stderr.strip().splitlines()[-1]
    assert last.startswith(f"llava_nb: interrupted; {other.model_id} loaded all the same")
    assert magics.current is other and other.loaded and magics.model == other.model_id
    assert not in_use.loaded  # one model in memory at a time
    _, cap = ask(shell, "", "Still there?")
    assert quiet(cap) and magics.chats["default"].model is other


def test_values_read_as_text_where_markdown_is_not_shown(shell, magics):
    """A terminal front end (jupyter console, IPython) prints text/plain: it must be the text,
    not `<IPython.core.display.Markdown object>`, nor a quoted repr of a multi-line answer."""
    answer, _ = ask(shell, "-i photo", "What is in this picture?")
    values = [answer] + [cmd(shell, line)[0] for line in ("status", "history", "chats", "models")]
    for value in values:
        data, _ = shell.display_formatter.format(value)
        assert data["text/plain"] == data["text/markdown"], data
    assert "**You:**" in shell.display_formatter.format(values[2])[0]["text/plain"]


def test_an_interrupted_unload_releases_all_the_same_and_prints_one_line(shell, magics):
    """`%llava unload` interrupted (a real SIGINT) while it waits for an answer to finish:
    the model is released whole, and the interrupt is one line, not a traceback."""
    cmd(shell, "load")
    model, release = magics.current, threading.Event()
    holder = holding_lock(model, release)
    interrupter = threading.Thread(target=interrupt_in_unload, args=(release,))
    interrupter.start()
    try:
        _, cap = cmd(shell, "unload")
        interrupter.join()
        time.sleep(0.05)  # a late interrupt would land here, not in pytest
    except KeyboardInterrupt:
        pytest.fail("the interrupt escaped the magic as a traceback")
    finally:
        release.set()
        holder.join()
    one_error(cap, f"interrupted while releasing {model.model_id}; released all the same")
    assert cap.stdout.strip() == f"llava_nb: unloaded {model.model_id}"
    assert not model.loaded and model.status()["state"] == "unloaded"


def test_an_interrupt_while_the_old_model_is_released_prints_one_line(shell, magics, tmp_path):
    """`%llava load other` releases the model used before, after the answer a panel's thread is
    finishing on it; an interrupt landing there (a real SIGINT) leaves one line, the new model
    in use and the old one wholly released."""
    from llava_nb.models import get_model
    from llava_nb.testing import make_tiny_llava

    cmd(shell, "load")
    old = magics.current
    other = get_model(make_tiny_llava(tmp_path / "other", "llava"))
    other.load()  # loaded already: the command goes straight to releasing the old model
    release = threading.Event()
    holder = holding_lock(old, release)
    try:
        cap = _load_with_an_interrupt(shell, other.model_id, lambda: interrupt_in_unload(release))
    finally:
        release.set()
        holder.join()
    assert "Traceback" not in cap.stdout + cap.stderr
    one_error(cap, f"interrupted while releasing {old.model_id}; released all the same")
    assert magics.current is other and other.loaded and magics.model == other.model_id
    assert not old.loaded and old.status()["state"] == "unloaded"
    assert magics._retired == []
    _, cap = ask(shell, "", "Still there?")
    assert quiet(cap) and magics.chats["default"].model is other


# ---------------------------------------------------------------- terminal IPython


class _TerminalIPython:
    """IPython in a terminal (a real pty; displays are printed there, never updated), typed
    into as a user does."""

    def __init__(self, tmp_path: Path) -> None:
        import pexpect

        env = {
            **_env(),
            "IPYTHONDIR": str(tmp_path / "ipython"),
            "HF_HUB_OFFLINE": "1",
            "TERM": "xterm",
        }
        self.child = pexpect.spawn(
            sys.executable,
            ["-m", "IPython", "--no-banner", "--colors=NoColor", "--HistoryManager.enabled=False"],
            env=env,
            encoding="utf-8",
            timeout=120,
            dimensions=(40, 200),
        )
        self.prompts = iter(range(1, 100))
        self.child.expect(rf"In \[{next(self.prompts)}\]")

    def type(self, *lines: str) -> None:
        """Type a cell (Esc-Enter runs it) and wait until it runs."""
        for line in lines[:-1]:
            self.child.send(line + "\r")
        self.child.send(lines[-1] + "\x1b\r")
        self.child.expect("\x1b\\[\\?2004l")  # bracketed paste off: the cell runs

    def printed(self, begun: str = "") -> str:
        """What the running cell printed (after `begun`, already read), colours stripped."""
        self.child.expect(rf"In \[{next(self.prompts)}\]")
        printed = begun + self.child.before
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", printed).replace("\r\n", "\n")

    def run(self, *lines: str, interrupt: bool = False) -> str:
        """Type a cell; what it printed. With `interrupt`, Ctrl-C once the answer has begun to
        stream."""
        self.type(*lines)
        begun = ""
        if interrupt:
            self.child.expect(".")  # a first piece of the answer
            begun = self.child.after
            self.child.sendintr()
        return self.printed(begun)

    def close(self) -> None:
        import pexpect

        try:
            self.child.sendline("exit")
            self.child.expect(pexpect.EOF, timeout=30)
        except pexpect.ExceptionPexpect:
            pass  # a test that failed mid-cell: its own error says why
        finally:
            self.child.close(force=True)


def test_terminal_ipython_prints_the_streamed_answer_once(endless_llava, tmp_path):
    """In IPython in a terminal the answer streams on one growing text, printed once: not a
    new line per partial answer, nor a placeholder, nor the answer again as the cell's
    value."""
    ipython = _TerminalIPython(tmp_path)
    run = ipython.run
    try:
        run("%load_ext llava_nb")
        run(f"%llava config model={endless_llava!r} max_new_tokens=12")
        run("%llava load")
        printed = run("%%llava", "What is in this picture?")
        answer = json.loads(
            run(
                "import json; print(json.dumps(get_ipython().magics_manager.registry"
                "['LlavaMagics'].chats['default'].history[-1].answer))"
            ).strip()
        )
        stopped = run("%%llava --max-new-tokens 5000", "Go on and on.", interrupt=True)
        last = json.loads(
            run(
                "print(json.dumps(get_ipython().magics_manager.registry['LlavaMagics']"
                ".chats['default'].history[-1].__dict__, default=str))"
            ).strip()
        )
    finally:
        ipython.close()
    assert answer and printed.strip("\n") == answer.strip("\n"), printed
    assert "Out[" not in printed and "…" not in printed
    # Ctrl-C: the partial answer stays on its line, marked; the chat keeps it
    assert last["question"] == "Go on and on." and last["interrupted"]
    assert stopped.rstrip("\n").endswith(" (interrupted)") and "Traceback" not in stopped
    shown = stopped.replace("^C", "")  # the terminal's echo of Ctrl-C, wherever it came
    assert last["answer"] and shown.rstrip("\n").endswith(last["answer"] + " (interrupted)")


def test_terminal_ipython_shows_thinking_until_the_answer_starts(tmp_path):
    """A server's reasoning model streams no answer while it thinks: a terminal IPython cell
    shows "thinking…" meanwhile, as the terminal chat does, erased in place once the answer
    starts."""
    with thinking_server() as (url, thought):
        ipython = _TerminalIPython(tmp_path)
        try:
            ipython.run("%load_ext llava_nb")
            ipython.run(f"%llava load {url}")
            ipython.type("%%llava", "Hello?")
            ipython.child.expect_exact("thinking…", timeout=60)  # before any answer came
            thought.set()
            printed = ipython.printed()
        finally:
            ipython.close()
    erased = "\r" + " " * len("thinking…") + "\r"
    assert printed.startswith(erased + "Hi there\n"), repr(printed)
