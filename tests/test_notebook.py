"""The magics in a real notebook: real kernels (this interpreter's ipykernel), run by nbclient.

Covers streaming display messages as a front end sees them, stderr for bad input, a real
kernel interrupt in the middle of an answer, and the quickstart example notebook.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager, KernelManager
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "01_quickstart.ipynb"
TIMEOUT = 120  # per cell; the whole notebooks take seconds


# ---------------------------------------------------------------- kernels


def kernel_manager(cls=KernelManager):
    """The native python3 kernel of *this* interpreter (its venv's ipykernel).

    With no kernelspec folders, jupyter_client falls back to ipykernel's own spec, whose command
    is `sys.executable -m ipykernel_launcher`: a python3 kernelspec installed for the user or
    the system (perhaps for another Python) cannot be picked up instead.
    """
    return cls(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory) -> dict[str, str]:
    """The kernel's environment: this checkout importable, offline, no default model."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["HF_HUB_OFFLINE"] = "1"
    env["IPYTHONDIR"] = str(tmp_path_factory.mktemp("ipython"))  # no profile written to ~
    env.pop("LLAVA_NB_MODEL", None)
    return env


@pytest.fixture(scope="module")
def photo_path() -> str:
    import matplotlib.cbook

    return str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


class RecordingClient(NotebookClient):
    """An nbclient that also keeps every iopub message, per cell (nbclient folds display
    updates into the first output; the messages show the streaming as a front end sees it)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.messages: dict[int, list[tuple[str, dict]]] = defaultdict(list)

    def process_message(self, msg, cell, cell_index):
        self.messages[cell_index].append((msg["msg_type"], msg["content"]))
        return super().process_message(msg, cell, cell_index)


def execute(nb, env: dict[str, str], cwd: Path) -> RecordingClient:
    client = RecordingClient(
        nb,
        km=kernel_manager(AsyncKernelManager),
        timeout=TIMEOUT,
        startup_timeout=TIMEOUT,
        allow_errors=False,  # any error output fails the test
        resources={"metadata": {"path": str(cwd)}},
    )
    client.execute(env=env)
    return client


# ---------------------------------------------------------------- output helpers


def markdown_of(output) -> str | None:
    return output.get("data", {}).get("text/markdown")


def streams(cell, name: str) -> str:
    return "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == name)


def results(cell) -> list:
    return [o for o in cell.outputs if o.output_type == "execute_result"]


def no_traceback(cell) -> None:
    for output in cell.outputs:
        assert output.output_type != "error", output
        text = output.get("text", "") + json.dumps(output.get("data", {}))
        assert "Traceback" not in text and "KeyboardInterrupt" not in text, text


def streamed_displays(messages) -> list[tuple[str, str, str]]:
    """(msg_type, display_id, markdown) of the answer's display messages, in order."""
    return [
        (kind, content["transient"]["display_id"], content["data"]["text/markdown"])
        for kind, content in messages
        if kind in ("display_data", "update_display_data")
        and "text/markdown" in content.get("data", {})
        and "display_id" in content.get("transient", {})
    ]


# ---------------------------------------------------------------- a notebook of magics


def test_notebook_with_magics(tiny_llava, photo_path, kernel_env, tmp_path):
    chat_file = tmp_path / "saved" / "chat.json"
    sources = [
        "%load_ext llava_nb",
        f"%llava config model='{tiny_llava}' max_new_tokens=12",
        f"PHOTO = {photo_path!r}",
        "%%llava -i {PHOTO}\nWhat is in this picture?",
        "%%llava\nWhat is she wearing?",
        "%%llava -c other\nA question for another chat?",
        "%llava status",
        f"%llava save {chat_file}\n%llava open {chat_file} copy",
        "%llava history copy",
        "%%llava -i missing.jpg\nWhat is in this one?",
        "%llava history",
        "import json, sys\n"
        "_chats = get_ipython().magics_manager.registry['LlavaMagics'].chats\n"
        "_turns = {name: [[t.question, t.answer, len(t.images), t.interrupted]"
        " for t in chat.history] for name, chat in _chats.items()}\n"
        "print(json.dumps({'prefix': sys.prefix, 'chats': _turns}))",
    ]
    nb = new_notebook(
        cells=[new_markdown_cell("# llava_nb in a real kernel")]
        + [new_code_cell(source) for source in sources],
        metadata={"kernelspec": {"name": "python3", "language": "python", "display_name": "P"}},
    )
    client = execute(nb, kernel_env, tmp_path)
    cells = nb.cells  # cells[i + 1] runs sources[i]
    for cell in cells[1:]:
        no_traceback(cell)
    state = json.loads(streams(cells[12], "stdout"))
    assert state["prefix"] == sys.prefix  # the kernel runs this interpreter (this venv)
    chats = state["chats"]
    default, other, copy = chats["default"], chats["other"], chats["copy"]

    # two turns about the photo: the image stays with the first, the answers are the chat's
    assert [(q, n) for q, _, n, _ in default] == [
        ("What is in this picture?", 1),
        ("What is she wearing?", 0),
    ]
    for index, (_, answer, _, _) in zip((4, 5), default, strict=True):
        cell = cells[index]
        (result,) = results(cell)
        assert result.data["text/markdown"] == answer and answer
        assert "llava_nb:" not in streams(cell, "stderr")
        # the answer streamed into one display, updated in place, emptied at the end
        shown = streamed_displays(client.messages[index])
        assert shown[0][0] == "display_data" and shown[0][2] == "…"
        assert {display_id for _, display_id, _ in shown} == {shown[0][1]}
        assert all(kind == "update_display_data" for kind, _, _ in shown[1:])
        assert [text for _, _, text in shown[1:-1]] and shown[-1][2] == ""
        assert all(answer.startswith(text) for _, _, text in shown[1:-1])
        assert [markdown_of(o) for o in cell.outputs if o.output_type == "display_data"][-1] == ""
    assert "llava_nb: loading" in streams(cells[4], "stdout")  # loads on the first question

    # a named chat of its own
    assert [q for q, *_ in other] == ["A question for another chat?"]
    assert results(cells[6])[0].data["text/markdown"] == other[0][1]

    status = results(cells[7])[0].data["text/markdown"]
    assert "**state**: loaded" in status and f"**model**: {tiny_llava}" in status
    assert "**memory**: " in status and "**memory**: 0.00 MB" not in status
    assert "**chats**: default (2 turns), other (1 turn)" in status

    assert streams(cells[8], "stdout").splitlines() == [
        f"llava_nb: saved chat 'default' (2 turns) to {chat_file}",
        f"llava_nb: opened {chat_file} as chat 'copy' (2 turns)",
    ]
    assert copy == default
    history = results(cells[9])[0].data["text/markdown"]
    assert history.count("**You:**") == 2 and "*[1 image(s)]* What is in this picture?" in history

    # bad input: one line on stderr, nothing else, and the chat unchanged
    bad = cells[10]
    assert [o.output_type for o in bad.outputs] == ["stream"]
    lines = streams(bad, "stderr").splitlines()
    assert len(lines) == 1 and lines[0].startswith("llava_nb: image file 'missing.jpg' not found")
    assert results(cells[11])[0].data["text/markdown"] == history  # as saved before the error


# ---------------------------------------------------------------- interrupting the kernel


@pytest.fixture(scope="module")
def slow_llava(tmp_path_factory) -> str:
    """A wider tiny checkpoint that never says end-of-sequence: 1000 tokens take a while."""
    from llava_nb.testing import make_tiny_llava

    path = Path(make_tiny_llava(tmp_path_factory.mktemp("tiny") / "slow", width=256, layers=4))
    config = json.loads((path / "generation_config.json").read_text())
    config["suppress_tokens"] = [config["eos_token_id"]]
    (path / "generation_config.json").write_text(json.dumps(config))
    return str(path)


def tokens(checkpoint: str, text: str) -> int:
    """How many tokens `text` is to the checkpoint's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def run(kc, code: str, on_message=None, timeout: float = TIMEOUT):
    """Execute `code`; return the reply content and the iopub messages it caused."""
    msg_id = kc.execute(code)
    messages = []
    deadline = time.monotonic() + timeout
    while True:
        msg = kc.get_iopub_msg(timeout=max(deadline - time.monotonic(), 0.1))
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        messages.append((kind, content))
        if on_message is not None:
            on_message(kind, content)
        if kind == "status" and content["execution_state"] == "idle":
            break
    reply = kc.get_shell_msg(timeout=timeout)
    assert reply["parent_header"]["msg_id"] == msg_id
    return reply["content"], messages


def outputs_text(messages, kind: str) -> list[str]:
    if kind == "stream":
        return [c["text"] for k, c in messages if k == "stream"]
    return [
        c["data"].get("text/markdown", c["data"]["text/plain"]) for k, c in messages if k == kind
    ]


def assert_clean(reply, messages) -> None:
    assert reply["status"] == "ok", reply
    assert not [c for k, c in messages if k == "error"]
    assert not any("Traceback" in text for text in outputs_text(messages, "stream"))


def test_kernel_interrupt_keeps_the_partial_answer(slow_llava, photo_path, kernel_env, tmp_path):
    km = kernel_manager()
    km.start_kernel(
        env=kernel_env, cwd=str(tmp_path), extra_arguments=["--HistoryManager.hist_file=:memory:"]
    )
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=TIMEOUT)
        for code in ("%load_ext llava_nb", f"%llava config model='{slow_llava}' max_new_tokens=8"):
            assert_clean(*run(kc, code))

        # interrupted while the first question loads the model: it loads, the cell stops
        def interrupt_once_loading(kind, content) -> None:
            if kind == "stream" and "llava_nb: loading" in content["text"]:
                km.interrupt_kernel()

        first = f"%%llava -i {photo_path}\nWhat is in this picture?"
        reply, messages = run(kc, first, interrupt_once_loading)
        assert_clean(reply, messages)
        assert not [k for k, _ in messages if k in ("execute_result", "update_display_data")]
        errors = "".join(c["text"] for k, c in messages if k == "stream" and c["name"] == "stderr")
        assert errors.splitlines() == [
            "llava_nb: stopping once loading ends (it cannot stop halfway)",
            "llava_nb: interrupted before the answer began; the question was not asked (run the "
            "cell again)",
        ]
        assert_clean(*run(kc, first))  # the model is loaded; the question is asked now

        interrupted = []

        def interrupt_once_streaming(kind, content) -> None:
            text = content.get("data", {}).get("text/markdown")
            if kind == "update_display_data" and text and not interrupted:
                interrupted.append(text)
                km.interrupt_kernel()

        reply, messages = run(
            kc, "%%llava --max-new-tokens 1000\nTell me everything.", interrupt_once_streaming
        )
        assert_clean(reply, messages)
        assert not [k for k, _ in messages if k == "execute_result"]  # no value: it was cut
        assert streamed_displays(messages)[-1][2] == ""  # the growing display emptied, and
        (final,) = [  # the partial answer shown in a display of its own (jupyter console too)
            content["data"]["text/markdown"]
            for kind, content in messages
            if kind == "display_data" and "display_id" not in content.get("transient", {})
        ]
        assert final.endswith(" *(interrupted)*") and final != " *(interrupted)*", final
        # stopped at once, far short of its 1000 tokens: told by length, not by a clock (on a
        # loaded machine the interrupt and the tokens slow down alike)
        assert tokens(slow_llava, final.removesuffix(" *(interrupted)*")) < 500
        assert not [t for t in outputs_text(messages, "stream") if "llava_nb:" in t]

        # the turn is in the history, marked interrupted; the chat goes on
        reply, messages = run(kc, "%llava history")
        assert_clean(reply, messages)
        (history,) = outputs_text(messages, "execute_result")
        assert history.endswith(final)
        assert history.count("**You:**") == 2 and "**You:** Tell me everything." in history

        reply, messages = run(kc, "%%llava\nAre you still there?")
        assert_clean(reply, messages)
        (answer,) = outputs_text(messages, "execute_result")
        reply, messages = run(
            kc,
            "import json\n"
            "_chat = get_ipython().magics_manager.registry['LlavaMagics'].chats['default']\n"
            "print(json.dumps([[t.question, t.answer, t.interrupted] for t in _chat.history]))",
        )
        turns = json.loads("".join(outputs_text(messages, "stream")))
        assert [(q, stopped) for q, _, stopped in turns] == [
            ("What is in this picture?", False),
            ("Tell me everything.", True),
            ("Are you still there?", False),
        ]
        assert final == turns[1][1] + " *(interrupted)*"
        assert answer == turns[2][1]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


# ---------------------------------------------------------------- the quickstart example


def test_quickstart_notebook_runs_offline(kernel_env, demo_cache, tmp_path):
    committed = nbformat.read(QUICKSTART, as_version=4)
    nbformat.validate(committed)
    code_cells = [cell for cell in committed.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code_cells)
    assert any("%load_ext llava_nb" in cell.source for cell in code_cells)

    nb = nbformat.read(QUICKSTART, as_version=4)
    # the demo model: the reduced build of tests/conftest.py, found in the cache as a user's is
    client = execute(nb, {**kernel_env, "LLAVA_NB_CACHE": demo_cache}, tmp_path)
    assert list(tmp_path.iterdir()) == []  # the checkpoint and the saved chat go to a temp dir
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    for cell in code_cells:
        no_traceback(cell)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or not cell.source.startswith("%%llava"):
            continue
        stderr = streams(cell, "stderr")
        if "no-such-photo.jpg" in cell.source:  # the example of bad input
            assert stderr.startswith("llava_nb: image file 'no-such-photo.jpg' not found")
            assert len(stderr.splitlines()) == 1
            continue
        assert "llava_nb:" not in stderr
        shown = streamed_displays(client.messages[index])
        assert shown and shown[0][2] == "…"
        if " -o " in cell.source.splitlines()[0]:
            # no value: the growing display is emptied and the answer kept in one of its own
            kept = [o for o in cell.outputs if o.output_type == "display_data"]
            assert not results(cell) and shown[-1][2] == ""
            assert kept and kept[-1].data["text/markdown"]
        else:
            (result,) = results(cell)
            assert result.data["text/markdown"]
    assert "llava_nb: unloaded" in streams(code_cells[-1], "stdout")
