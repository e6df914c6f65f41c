"""`llava-nb`: the terminal chat in a real pseudo-terminal and on piped stdin, and `serve`.

Everything runs the installed console script (or `python -m llava_nb.cli`) in a subprocess;
greedy answers are compared with what `Chat` gives for the same conversation.
"""

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from llava_nb.chat import Chat
from tests.conftest import completion, events, loopback_server, thinking_chunk, thinking_server

pexpect = pytest.importorskip("pexpect")

SCRIPT = Path(sys.executable).with_name("llava-nb")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "llava_nb.cli"]
PROMPT = "you> "
TOKENS = 8  # max new tokens: short answers keep the file fast


def _env() -> dict[str, str]:
    env = dict(os.environ, TERM="dumb", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    env["PYTHONIOENCODING"] = "utf-8"
    env.pop("LLAVA_NB_MODEL", None)
    return env


@pytest.fixture(scope="module")
def grace() -> str:
    """A real photo that ships with matplotlib, as a file path."""
    import matplotlib.cbook

    return str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


@pytest.fixture(scope="module")
def square(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("images") / "square.png"
    Image.new("RGB", (48, 48), (20, 200, 30)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def slow_llava(tmp_path_factory) -> str:
    """Wider and deeper than `tiny_llava`, so a long answer lasts long enough to interrupt."""
    from llava_nb.testing import make_tiny_llava

    return make_tiny_llava(tmp_path_factory.mktemp("slow") / "llava", width=256, layers=4)


def _spawn(*args: str, cwd=None):
    """`llava-nb chat ARGS` in a pseudo-terminal, once its first prompt is up."""
    child = pexpect.spawn(
        COMMAND[0],
        [*COMMAND[1:], "chat", *args],
        cwd=cwd,
        env=_env(),
        encoding="utf-8",
        codec_errors="replace",
        timeout=120,
        dimensions=(50, 1000),  # wide: readline never wraps what we type
    )
    child.expect_exact(PROMPT)
    return child


def _say(child, line: str) -> str:
    """Type a line; return what came back before the next prompt, echo removed, "\\n" ends."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    out = child.before.replace("\r\n", "\n")  # the terminal turns each \n into \r\n
    assert out.startswith(line + "\n"), out
    return out[len(line) + 1 :]


def shown(answer: str) -> str:
    """An answer as the terminal chat shows it: control characters as U+FFFD (the tiny
    models' random answers hold some)."""
    from llava_nb.cli import CONTROL

    return CONTROL.sub("\ufffd", answer)


def _quit_with_ctrl_d(child) -> None:
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert (child.exitstatus, child.signalstatus) == (0, None)


def _said(stderr: str) -> list[str]:
    """The chat's own messages on stderr, without the model's progress lines."""
    progress = ("llava-nb: loading ", "llava-nb: loaded ", "llava-nb: connected to ")
    return [
        line
        for line in stderr.splitlines()
        if line.startswith("llava-nb: ") and not line.startswith(progress)
    ]


def _run(*args: str, stdin: str = "", env: dict | None = None) -> subprocess.CompletedProcess:
    """`llava-nb ARGS` with piped stdin; stdout and stderr kept apart, as bytes decoded."""
    result = subprocess.run(
        [*COMMAND, *args],
        input=stdin.encode(),
        capture_output=True,
        env=_env() | (env or {}),
        timeout=300,
    )
    result.stdout = result.stdout.decode("utf-8")  # bytes: no newline translation
    result.stderr = result.stderr.decode("utf-8", "replace")
    return result


def test_a_terminal_chat_streams_the_same_answers_as_chat(tiny_llava, grace, square, tmp_path):
    reference = Chat(tiny_llava, max_new_tokens=TOKENS)
    child = _spawn("--model", tiny_llava, "--image", grace, "--max-new-tokens", str(TOKENS))

    # two turns: --image goes with the first question, /image PATH with the next one
    expected = reference.ask("What is in this picture?", image=grace)
    assert _say(child, "What is in this picture?") == shown(expected) + "\n\n"
    out = _say(child, f"/image {square}")
    assert out.startswith("llava-nb: image ") and "attached to the next question" in out
    expected = reference.ask("Compare it with this one.", image=square)
    assert _say(child, "Compare it with this one.") == shown(expected) + "\n\n"

    status = _say(child, "/model")
    assert f"model           {tiny_llava}\n" in status
    assert "state           loaded\n" in status and "turns           2\n" in status
    help_text = _say(child, "/help")
    assert all(f"/{name}" in help_text for name in ("image", "undo", "reset", "save", "open"))

    # bad input is one line on stderr, and the conversation goes on
    assert _say(child, "/frobnicate now") == (
        "llava-nb: unknown command '/frobnicate'; /help lists the commands\n"
    )
    out = _say(child, f"/image {tmp_path / 'missing.jpg'}")
    assert out.startswith("llava-nb: image file ") and "not found" in out
    assert out.count("\n") == 1
    assert (
        _say(child, "/undo now") == "llava-nb: /undo takes no arguments; /help lists the commands\n"
    )

    # /undo forgets the last turn; the next answer is what Chat gives after undo
    assert _say(child, "/undo") == "llava-nb: removed 'Compare it with this one.' and its answer\n"
    reference.undo()
    expected = reference.ask("What color is it?")
    assert _say(child, "What color is it?") == shown(expected) + "\n\n"

    # Ctrl-C at the prompt clears the line; the session goes on
    child.send("half a question")
    child.expect_exact("half a question")
    child.sendintr()
    child.expect_exact(PROMPT)
    assert child.before.replace("\r\n", "\n") == "\n"

    saved = tmp_path / "chat.json"
    assert (
        _say(child, f"/save {saved}") == f"llava-nb: saved the conversation (2 turns) to {saved}\n"
    )
    assert json.loads(saved.read_text())["turns"][1]["answer"] == expected

    # /reset forgets everything; the next question starts a new conversation
    assert _say(child, "/reset") == "llava-nb: conversation reset\n"
    assert _say(child, "/history") == "(no turns yet)\n"
    reference.reset()
    expected = reference.ask("What is in this picture?")
    assert _say(child, "What is in this picture?") == shown(expected) + "\n\n"
    _quit_with_ctrl_d(child)

    # /open in a fresh session continues the saved conversation
    child = _spawn("--model", tiny_llava, "--max-new-tokens", str(TOKENS))
    assert _say(child, f"/open {saved}") == f"llava-nb: opened {saved} (2 turns)\n"
    history = _say(child, "/history")
    assert history.startswith("you: [1 image] What is in this picture?\nllava: ")
    continued = Chat.load(saved, model=reference.model)
    expected = continued.ask("And the background?")
    assert _say(child, "And the background?") == shown(expected) + "\n\n"
    _quit_with_ctrl_d(child)


def test_ctrl_c_stops_an_answer_not_the_program(slow_llava, tmp_path):
    child = _spawn("--model", slow_llava, "--max-new-tokens", "1000")
    child.sendline("Tell me a long story.")
    child.expect_exact("Tell me a long story.\r\n")
    child.read_nonblocking(1, timeout=120)  # the answer has started
    child.sendintr()
    child.expect_exact(" [interrupted]\r\n\r\n" + PROMPT)

    history = _say(child, "/history")  # the partial answer stays, marked interrupted
    assert history.startswith("you: Tell me a long story.\nllava: ")
    assert history.endswith(" [interrupted]\n")

    # the next question works, with the partial turn in its context
    saved = tmp_path / "interrupted.json"
    _say(child, f"/save {saved}")
    assert json.loads(saved.read_text())["turns"][0]["interrupted"] is True
    expected = Chat.load(saved).ask("And then?")
    child.timeout = 300  # up to 1000 tokens on a busy 2-core machine
    assert _say(child, "And then?") == shown(expected) + "\n\n"

    # a second Ctrl-C at an empty prompt quits, with status 0
    child.sendintr()
    child.expect_exact("llava-nb: press Ctrl-C again or Ctrl-D to quit\r\n" + PROMPT)
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert (child.exitstatus, child.signalstatus) == (0, None)


def test_answers_redirected_from_a_terminal_chat(tiny_llava, tmp_path):
    """`llava-nb chat > answers.txt` at a terminal: the prompt and what commands show stay on
    the terminal, and Ctrl-C on a half-typed line (no line editing here to tell whether it was
    empty) clears it without counting toward quitting."""
    answers = tmp_path / "answers.txt"
    command = " ".join([*COMMAND, "chat", "--model", tiny_llava, "--max-new-tokens", str(TOKENS)])
    child = pexpect.spawn(
        "bash", ["-c", f"{command} > {answers}"], env=_env(), encoding="utf-8", timeout=120
    )
    child.expect_exact(PROMPT)
    expected = Chat(tiny_llava, max_new_tokens=TOKENS).ask("What is this?")
    child.sendline("What is this?")
    child.expect_exact(PROMPT)
    child.sendline("/history")
    child.expect_exact(PROMPT)
    assert "you: What is this?\r\nllava: " in child.before
    for half in ("half a question", "another half"):
        child.send(half)
        child.expect_exact(half)
        child.sendintr()
        child.expect_exact(PROMPT)
        assert "quit" not in child.before
    _quit_with_ctrl_d(child)
    assert answers.read_text() == expected + "\n"  # one answer a line, as when piped


def test_ctrl_c_stops_a_slow_command(tiny_llava):
    """Ctrl-C during a command (an image URL that never arrives) says that command stopped;
    no answer marker is written, and the session goes on."""
    import http.server
    import threading

    fetching, done = threading.Event(), threading.Event()

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            fetching.set()
            done.wait(120)

    with loopback_server(Slow) as base:
        try:
            child = _spawn("--model", tiny_llava, "--max-new-tokens", str(TOKENS))
            url = f"{base}/photo.jpg"
            child.sendline(f"/image {url}")
            child.expect_exact(f"/image {url}\r\n")
            assert fetching.wait(60)  # the fetch has started: Ctrl-C lands in the command
            child.sendintr()
            child.expect_exact(PROMPT)
            assert child.before.replace("\r\n", "\n").endswith("llava-nb: /image stopped\n")
            assert _say(child, "/history") == "(no turns yet)\n"
            _quit_with_ctrl_d(child)
        finally:
            done.set()


def test_piped_stdin_prints_just_the_answers(tiny_llava, grace):
    reference = Chat(tiny_llava, max_new_tokens=TOKENS)
    expected = [reference.ask("What is this?", image=grace), reference.ask("Is it a person?")]
    args = ["chat", "--model", tiny_llava, "--image", grace, "--max-new-tokens", str(TOKENS)]

    result = _run(*args, stdin="What is this?\nIs it a person?\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected[0] + "\n" + expected[1] + "\n"
    assert "you>" not in result.stderr and "loading" in result.stderr  # progress on stderr

    # a failed line is one line on stderr; the rest still runs, and the exit status says so
    result = _run(*args, stdin="/image missing.jpg\nWhat is this?\n/undo\n")
    assert result.returncode == 1
    assert result.stdout == expected[0] + "\n"
    lines = _said(result.stderr)
    assert len(lines) == 2 and "missing.jpg" in lines[0] and "removed" in lines[1]


def test_control_characters_reach_a_terminal_as_placeholders(web_server, tmp_path):
    answer = "Hi \x1b]0;pwned\x07\x1b[2Jthere"  # retitle the window, clear the screen
    chunk = completion("chat.completion.chunk", {"delta": {"content": answer}})
    end = completion("chat.completion.chunk", {"delta": {}, "finish_reason": "stop"})
    with web_server({"/v1/chat/completions": events(chunk, end)}) as url:
        child = _spawn("--model", f"openai:{url}")
        assert _say(child, "Hello?") == "Hi \ufffd]0;pwned\ufffd\ufffd[2Jthere\n\n"
        _say(child, "/reset")
        crafted = tmp_path / "crafted.json"  # a chat file's questions and names, too
        Chat(f"openai:{url}").save(crafted)
        data = json.loads(crafted.read_text())
        data["model"] = "evil\x1b]0;pwned\x07"
        data["turns"] = [{"question": "a\x1b[2Jb", "images": [], "answer": "c"}]
        crafted.write_text(json.dumps(data))
        assert "evil\ufffd]0;pwned\ufffd" in _say(child, f"/open {crafted}")
        assert _say(child, "/history") == "you: a\ufffd[2Jb\nllava: c\n"
        _quit_with_ctrl_d(child)
        result = _run("chat", "--model", f"openai:{url}", stdin="Hello?\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == answer + "\n"  # piped: exactly what the model said


def test_open_keeps_an_unsaved_conversation_and_names_a_missing_adapter(tiny_llava, tmp_path):
    saved, other = tmp_path / "saved.json", tmp_path / "other.json"
    Chat(tiny_llava, max_new_tokens=2).save(other)
    lost = json.loads(other.read_text()) | {"adapter": str(tmp_path / "gone")}
    (tmp_path / "lost.json").write_text(json.dumps(lost))
    script = [
        "Hello?", f"/save {saved}", f"/open {saved}",  # the very conversation: nothing lost
        "More?", f"/open {other}",  # refused: "More?" is not saved
        "/reset", f"/open {tmp_path / 'lost.json'}", "Hello?", "/adapter none", "Hello?",
    ]  # fmt: skip
    result = _run("chat", "--model", tiny_llava, "--max-new-tokens", "2", stdin="\n".join(script))
    lines = _said(result.stderr)
    assert lines[1] == f"llava-nb: opened {saved} (1 turn)"
    assert lines[2] == (
        f"llava-nb: this conversation has 2 turns; /save it or /reset first, then /open {other}"
    )
    assert lines[4] == (
        f"llava-nb: opened {tmp_path / 'lost.json'} (0 turns); its adapter {tmp_path / 'gone'} "
        "is not here (/adapter none: the base model)"
    )
    assert "adapter folder" in lines[5] and "not found" in lines[5]
    assert lines[6:] == ["llava-nb: answering with the base model"]
    assert result.returncode == 1 and len(result.stdout.splitlines()) == 3  # 3 answers


def test_images_a_server_refuses_can_be_dropped(web_server, square):
    refused = (500, "application/json", b'{"error": {"message": "image input is not supported"}}')
    chunk = completion(
        "chat.completion.chunk", {"delta": {"content": "Hi"}, "finish_reason": "stop"}
    )
    with web_server({"/v1/chat/completions": [refused, refused, events(chunk)]}) as url:
        script = "What is this?\nAnd now?\n/image none\nAnd now?\n"
        result = _run("chat", "--model", url, "--image", square, stdin=script)
    lines = _said(result.stderr)
    attached = " (1 image still attached: /image none drops them)"
    assert lines[0].endswith("image input is not supported" + attached)
    assert lines[1].endswith(attached) and lines[2] == "llava-nb: dropped 1 attached image"
    assert result.stdout == "Hi\n"


def test_python_dash_m_runs_the_command():
    result = subprocess.run(
        [sys.executable, "-m", "llava_nb", "--help"], capture_output=True, text=True, env=_env()
    )
    assert result.returncode == 0 and "usage: llava-nb" in result.stdout


def test_help_and_usage_errors(tiny_llava):
    result = _run("--help")
    assert result.returncode == 0 and "chat" in result.stdout and "serve" in result.stdout
    result = _run("serve", "--help")
    assert result.returncode == 0
    for option in ("--host", "--port", "--api-key", "--max-concurrency", "--allow-image-urls"):
        assert option in result.stdout
    chat_help = _run("chat", "--help").stdout
    assert chat_help.startswith("usage: llava-nb chat")
    for option in ("--model", "--image", "--max-new-tokens", "--temperature", "--top-p", "--seed"):
        assert option in chat_help
    assert "/image PATH" in chat_help and "stdout" in chat_help  # the commands, the output rule

    # a bad argument is one line that names the problem and the fix, not argparse's usage block
    for args, line in (
        ([], "name a command: llava-nb chat or llava-nb serve (llava-nb --help says more)"),
        (["bogus"], "unknown command 'bogus'; use llava-nb chat or llava-nb serve"),
        (["chat", "--bogus"], "unknown option '--bogus'; llava-nb chat --help lists the options"),
        (["chat", "What is this?"], "questions are not arguments: type them at the prompt, "
         "or pipe them in (echo QUESTION | llava-nb chat ...)"),
        (["chat", "--4bit", "--8bit"], "--8bit and --4bit cannot be used together; choose one"),
        (["chat", "--max-new-tokens", "0"],
         "--max-new-tokens must be a whole number >= 1, not '0'; e.g. --max-new-tokens 256"),
        (["chat", "--max-new-tokens", "abc"],
         "--max-new-tokens must be a whole number >= 1, not 'abc'; e.g. --max-new-tokens 256"),
        (["chat", "--temperature", "-1"],
         "--temperature must be a number >= 0 (0 = greedy), not '-1'; e.g. --temperature 0.7"),
        (["chat", "--temperature", "inf"],
         "--temperature must be a number >= 0 (0 = greedy), not 'inf'; e.g. --temperature 0.7"),
        (["chat", "--m", "x"], "ambiguous option: --m could match --model, --max-new-tokens; "
         "write the option in full"),
        (["chat", "--top-p", "2"], "--top-p must be a number above 0 and at most 1, not '2'; "
         "e.g. --top-p 0.9"),
        (["chat", "--seed", "x"],
         "--seed must be a whole number (64 bits), not 'x'; e.g. --seed 0"),
        (["chat", "--model"], "--model needs a value; e.g. --model llava-hf/llava-1.5-7b-hf"),
        (["chat", "--model", ""], "--model is empty; name a hub id, a folder or a server URL; "
         "e.g. --model llava-hf/llava-1.5-7b-hf"),
        (["serve", "--port", "http"], "--port must be a port number (1-65535), not 'http'; "
         "e.g. --port 8000"),
    ):  # fmt: skip
        result = _run(*args)
        assert result.returncode == 2, args
        assert (result.stdout, result.stderr) == ("", f"llava-nb: {line}\n"), args
    result = _run("chat", "--model", tiny_llava, "--image", "missing.jpg")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("llava-nb: image file 'missing.jpg' not found; check the path")


def test_importing_the_cli_leaves_torch_unloaded():
    code = "import sys, llava_nb.cli; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[]\n"


@pytest.mark.skipif(
    importlib.util.find_spec("llava_nb.server") is None, reason="llava_nb.server not written yet"
)
def test_serve_without_the_serve_extra_says_how_to_install_it(tiny_llava):
    code = (
        "import sys\n"
        "sys.modules.update(fastapi=None, uvicorn=None)  # as if the extra were not installed\n"
        "from llava_nb.cli import main\n"
        f"raise SystemExit(main(['serve', '--model', {tiny_llava!r}, '--port', '8765']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300
    )
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == (
        "llava-nb serve needs the serve extra: pip install 'llava_nb[serve]'"
    )


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_serve_exits_when_the_model_cannot_load(tiny_llava, tmp_path):
    pytest.importorskip("uvicorn")
    missing = str(tmp_path / "nonexistent")
    for args, why in (
        (["--model", missing], missing),
        (["--model", tiny_llava, "--device", "banana"], "unknown device 'banana'"),
    ):
        result = _run("serve", *args, "--port", _free_port())
        assert result.returncode == 1, result.stderr
        last = result.stderr.splitlines()[-1]
        assert last.startswith("llava-nb: cannot load ") and why in last, result.stderr
        assert not any(line.startswith("cannot load") for line in result.stderr.splitlines())


def test_chat_with_a_server_url_takes_an_api_key(tiny_llava):
    pytest.importorskip("uvicorn")
    from llava_nb.models import Model
    from llava_nb.server import create_app, serving

    expected = Chat(tiny_llava, max_new_tokens=TOKENS).ask("What is this?")
    with serving(create_app(Model(tiny_llava).load(), api_key="sekret")) as url:
        args = ["chat", "--model", f"openai:{url}/v1", "--max-new-tokens", str(TOKENS)]
        refused = _run(*args, stdin="What is this?\n")
        assert refused.returncode == 1
        assert refused.stderr.endswith(
            "refused the API key (incorrect API key; use the key the server was started with "
            "(--api-key)); start llava-nb chat with --api-key KEY, or set OPENAI_API_KEY\n"
        )
        result = _run(*args, "--api-key", "sekret", stdin="What is this?\n")
        assert result.returncode == 0, result.stderr
        assert result.stdout == expected + "\n"
        for local_only, flag in (
            (["--4bit"], "--4bit is for local weights"),
            (["--device", "cpu"], "--device is for local weights"),
        ):
            result = _run(*args, *local_only, stdin="What is this?\n")
            assert result.returncode == 2 and flag in result.stderr, result.stderr
            assert result.stdout == ""
    result = _run("chat", "--model", tiny_llava, "--api-key", "k")
    assert result.returncode == 2 and "--api-key is for a server URL" in result.stderr
    result = _run("chat", "--model", "openai:not-a-url")
    assert result.returncode == 2 and "'not-a-url' is not a server URL" in result.stderr


def test_a_line_starting_with_a_path_says_how_to_attach_or_ask(square):
    """A path dragged into the terminal, or a question that starts with a slash."""
    script = f"{square} What is this?\n/usr/share/nothing.txt?\n/frobnicate\n"
    result = _run("chat", "--model", "unused/model", stdin=script)
    assert result.stderr.splitlines() == [
        f"llava-nb: unknown command '{square}'; /image {square} attaches that file",
        "llava-nb: unknown command '/usr/share/nothing.txt?'; /help lists the commands "
        "(start a question with // to begin it with a slash)",
        "llava-nb: unknown command '/frobnicate'; /help lists the commands",
    ]


def test_piped_stdout_holds_only_the_answers(tiny_llava, tmp_path):
    """Command output (/help, /history, /model) and status lines go to stderr, so
    `... | llava-nb chat > answers.txt` keeps one answer per line in the file."""
    expected = Chat(tiny_llava, max_new_tokens=TOKENS).ask("What is this?")
    script = "/help\nWhat is this?\n/history\n/model\n/adapter\n/frobnicate\n"
    result = _run("chat", "--model", tiny_llava, "--max-new-tokens", str(TOKENS), stdin=script)
    assert result.stdout == expected + "\n"
    assert "/image PATH" in result.stderr and "you: What is this?\nllava: " in result.stderr
    assert f"model           {tiny_llava}\n" in result.stderr
    # the model's progress lines carry the command's prefix, like its other lines
    assert f"llava-nb: loading {tiny_llava}" in result.stderr
    assert "llava_nb: " not in result.stderr


def test_errors_name_the_terminal_fix_not_a_notebook_one(tiny_llava, tmp_path):
    """Shared messages that name a notebook's fix (`%llava ...`, `chat.save()`,
    `use_adapter(None)`) reach the terminal with the chat's own command instead."""
    not_a_chat = tmp_path / "settings.json"
    not_a_chat.write_text('{"theme": "dark"}')
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text('{"model_type": "bert"}')
    lost = tmp_path / "lost.json"
    Chat(tiny_llava).save(lost)
    lost.write_text(json.dumps(json.loads(lost.read_text()) | {"adapter": str(tmp_path / "gone")}))
    script = [
        '/image ""', f"/open {not_a_chat}", f"/model {bert}", f"/open {lost}", "Hello?",
        "/adapter none", "word " * 3000,
    ]  # fmt: skip
    args = ["chat", "--model", tiny_llava, "--max-new-tokens", "2"]
    result = _run(*args, stdin="\n".join(script))
    lines = _said(result.stderr)
    assert lines[0] == "llava-nb: the image name is empty; pass a path or an http(s) URL"
    assert lines[1] == (
        f"llava-nb: '{not_a_chat}' is not a llava_nb chat file; save one with /save FILE"
    )
    assert lines[2] == (
        f"llava-nb: '{bert}' is a 'bert' model, not LLaVA or LLaVA-NeXT; choose a llava-hf "
        "checkpoint, e.g. llava-hf/llava-1.5-7b-hf"
    )
    assert lines[5].endswith("; /adapter none answers with the base model"), lines
    assert lines[7].endswith("; ask a shorter question, with fewer images, or after /reset")
    assert not any(hint in result.stderr for hint in ("%llava", "chat.save", "use_adapter"))

    # no --model, and the default not cached: the notice about the demo model names --model
    result = _run("chat", stdin="", env={"HF_HOME": str(tmp_path / "hf")})
    assert result.stderr == (
        "llava-nb: llava-hf/llava-1.5-7b-hf is not cached and the hub cannot be reached; using "
        "the offline demo model (set LLAVA_NB_MODEL or --model M for another)\n"
    )


def test_a_chat_with_an_adapter_on_a_server_names_the_terminal_fixes(web_server, tmp_path):
    """The refusal of an adapter chat on a server named Python's fix for the terminal too
    ("chat.model = ln.Model('BASE')"): the terminal's own commands take its place, the names
    (base model, adapter folder) kept."""
    adapter, base = tmp_path / "tuned", "llava-hf/llava-1.5-7b-hf"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
    saved = tmp_path / "chat.json"
    with web_server({}) as url:
        Chat(url).save(saved)
        saved.write_text(json.dumps(json.loads(saved.read_text()) | {"adapter": str(adapter)}))
        script = f"/open {saved}\nHello?\n/adapter none\n/adapter {adapter}\n"
        result = _run("chat", "--model", url, stdin=script)
    lines = _said(result.stderr)
    assert lines[1] == (
        f"llava-nb: this chat answers with the adapter {adapter}, which the server {url} cannot "
        f"load (adapters need local weights); answer with its base model (/model {base}), or "
        "/adapter none answers with the server's model"
    )
    assert lines[3] == (
        f"llava-nb: adapters need local weights; this chat's model is the server {url}; ask on "
        f"a local model (/model {base}), then /adapter {adapter}"
    )
    assert not any(hint in result.stderr for hint in ("ln.Model", "chat.model", "use_adapter"))


def test_a_reasoning_model_shows_thinking_until_its_answer_starts():
    """A reasoning model streams no answer while it thinks (a minute at times): the chat
    looked hung. A terminal shows "thinking…" meanwhile, erased in place once the answer
    starts; the thinking itself is not shown, and a file of answers gets none of it."""
    with thinking_server() as (url, thought):
        child = _spawn("--model", url)
        try:
            child.sendline("Hello?")
            child.expect_exact("thinking…", timeout=60)  # before any answer came
        finally:
            thought.set()
        child.expect_exact(PROMPT)
        erased = "\r" + " " * len("thinking…") + "\r"
        assert child.before.replace("\r\n", "\n") == erased + "Hi there\n\n"
        _quit_with_ctrl_d(child)
        result = _run("chat", "--model", url, stdin="Hello?\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Hi there\n" and "thinking" not in result.stderr


def test_a_reasoning_model_out_of_context_names_the_terminal_fix(web_server):
    """llama.cpp says "length" when its context is full too: the fix is /reset or /undo, or
    a larger context on the server, never a larger --max-new-tokens."""
    usage = {"completion_tokens": 12, "prompt_tokens": 4084, "total_tokens": 4096}
    end = completion("chat.completion.chunk", {"delta": {}, "finish_reason": "length"})
    end = json.dumps(json.loads(end) | {"usage": usage})
    with web_server(
        {"/v1/chat/completions": events(thinking_chunk("reasoning_content", "Hmm."), end, "[DONE]")}
    ) as url:
        result = _run("chat", "--model", url, "--max-new-tokens", "1000", stdin="Hello?\n")
    assert result.returncode == 1 and result.stdout == ""
    assert _said(result.stderr) == [
        f"llava-nb: {url} ran out of context (the conversation: 4084 tokens, its reasoning: 12) "
        "while its model was reasoning, before any answer; start afresh (/reset) or drop the "
        "last turn (/undo), or give the server a larger context (llama.cpp: --ctx-size)"
    ]


def test_ctrl_c_stops_piped_questions(slow_llava, tmp_path):
    """Piped, Ctrl-C ends the run (exit 130) rather than going on with the next question."""
    import signal

    questions = tmp_path / "questions.txt"
    questions.write_text("Tell me a long story.\nAnd another one.\n")
    with questions.open() as stdin:
        process = subprocess.Popen(
            [*COMMAND, "chat", "--model", slow_llava, "--max-new-tokens", "1000"],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_env(),
        )
    first = process.stdout.read(1)  # the answer has started
    process.send_signal(signal.SIGINT)
    try:
        rest, errors = process.communicate(timeout=120)
    finally:
        process.kill()  # a no-op once it has exited
    assert process.returncode == 130, errors
    assert (first + rest).endswith(b" [interrupted]\n"), first + rest


def test_a_server_with_several_models_is_asked_for_one(web_server):
    chunk = completion(
        "chat.completion.chunk", {"delta": {"content": "Hi"}, "finish_reason": "stop"}
    )
    listing = (200, "application/json", b'{"object": "list", "data": []}')
    with web_server({"/v1/models": listing, "/v1/chat/completions": events(chunk)}) as url:
        result = _run("chat", "--model", url, stdin="Hello?\n")
        assert result.returncode == 1
        assert (
            result.stderr == f"llava-nb: {url} lists no models; name one with --remote-model NAME\n"
        )
        result = _run("chat", "--model", url, "--remote-model", "m", stdin="Hello?\n")
        assert result.returncode == 0, result.stderr
        assert result.stdout == "Hi\n"
    result = _run("chat", "--model", "some/model", "--remote-model", "m")
    assert result.returncode == 2
    assert result.stderr == (
        "llava-nb: --remote-model is for a server URL (openai:http://host:port/v1); leave it out\n"
    )


def test_every_notebook_fix_the_terminal_rewrites_is_still_in_a_shared_message():
    """The terminal rewrites shared messages by their wording: a reworded message would reach
    the terminal with a notebook's fix, so each rewritten phrase must still be in the package."""
    from llava_nb.cli import NOTEBOOK_FIXES

    def texts(tree: ast.AST):  # string literals as Python joins them ("a" f"b{x}" is one)
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):
                yield "{}".join(
                    str(part.value) for part in node.values if isinstance(part, ast.Constant)
                )
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                yield node.value

    package = Path(__file__).parents[1] / "llava_nb"
    messages = [
        text
        for path in package.rglob("*.py")
        if path.name != "cli.py"
        for text in texts(ast.parse(path.read_text()))
    ]
    stale = [notebook for notebook, _ in NOTEBOOK_FIXES if not any(notebook in m for m in messages)]
    assert not stale, f"NOTEBOOK_FIXES rewrites phrases no message has any more: {stale}"
