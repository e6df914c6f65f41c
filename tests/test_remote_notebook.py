"""The remote path end to end: `%%llava` in a real kernel, talking to a `llava-nb serve`
process started by the test (the real CLI, the real HTTP server, the official openai client)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from nbformat.v4 import new_code_cell, new_notebook

import llava_nb as ln

from .test_notebook import execute, kernel_env, no_traceback, photo_path, streams

__all__ = ["kernel_env", "photo_path"]  # fixtures shared with test_notebook

pytest.importorskip("uvicorn")
pytest.importorskip("openai")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(tiny_llava, kernel_env):
    """`llava-nb serve` on the tiny checkpoint, in its own process; yields its /v1 URL."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "llava_nb.cli", "serve", "--model", tiny_llava, "--port", str(port)],
        env=kernel_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:  # up once it answers (the model may still be loading: 503 is fine)
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "llava-nb serve did not start"
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            time.sleep(0.2)
    try:
        yield f"{url}/v1"
    finally:
        process.terminate()
        process.wait(30)


def test_llava_cells_against_llava_nb_serve(served, tiny_llava, photo_path, kernel_env, tmp_path):
    sources = [
        "%load_ext llava_nb",
        f"%llava load {served}",
        f"PHOTO = {photo_path!r}",
        "%%llava -i {PHOTO} --max-new-tokens 8\nWhat is in this picture?",
        "%%llava --max-new-tokens 8\nAnd what is she wearing?",
        "%llava status",
        "import json\n"
        "_chat = get_ipython().magics_manager.registry['LlavaMagics'].chats['default']\n"
        "print(json.dumps([[t.question, t.answer, len(t.images)] for t in _chat.history]))",
    ]
    nb = new_notebook(
        cells=[new_code_cell(source) for source in sources],
        metadata={"kernelspec": {"name": "python3", "language": "python", "display_name": "P"}},
    )
    env = {**kernel_env, "no_proxy": "127.0.0.1"}
    execute(nb, env, tmp_path)
    for cell in nb.cells:
        no_traceback(cell)
    assert f"llava_nb: connected to {served} ({tiny_llava})" in streams(nb.cells[1], "stdout")
    turns = json.loads(streams(nb.cells[6], "stdout"))
    assert [(q, n) for q, _, n in turns] == [
        ("What is in this picture?", 1),
        ("And what is she wearing?", 0),
    ]
    # the server's answers are the local model's answers to the same conversation
    local = ln.Chat(tiny_llava, max_new_tokens=8)
    assert turns[0][1] == local.ask("What is in this picture?", image=photo_path)
    assert turns[1][1] == local.ask("And what is she wearing?")
    for index, (_, answer, _) in zip((3, 4), turns, strict=True):
        (result,) = [o for o in nb.cells[index].outputs if o.output_type == "execute_result"]
        assert result.data["text/markdown"] == answer
    (status,) = [o for o in nb.cells[5].outputs if o.output_type == "execute_result"]
    assert "**family**: remote" in status.data["text/markdown"]
