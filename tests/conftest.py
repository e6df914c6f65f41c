"""Shared fixtures: tiny random checkpoints, built once per test session (offline)."""

import contextlib
import http.server
import json
import os
import sys
import threading
import time

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # CI has no hub; fail fast, never wait on retries
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@contextlib.contextmanager
def loopback_server(handler: type[http.server.BaseHTTPRequestHandler]):
    """A real HTTP server on 127.0.0.1 that runs `handler` on a thread per request; yields
    its base URL (http://127.0.0.1:PORT), and stops when the block ends."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> str:
    from llava_nb.testing import make_tiny_llava

    return make_tiny_llava(tmp_path_factory.mktemp("tiny") / "llava", "llava")


@pytest.fixture(scope="session")
def tiny_llava_next(tmp_path_factory) -> str:
    from llava_nb.testing import make_tiny_llava

    return make_tiny_llava(tmp_path_factory.mktemp("tiny") / "llava_next", "llava_next")


@pytest.fixture
def photo():
    """A real photo that ships with matplotlib (Grace Hopper), as a PIL image."""
    import matplotlib.cbook
    from PIL import Image

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        return Image.open(f).convert("RGB")


CHROMIUM = "/usr/bin/chromium"  # Debian's package; Playwright downloads no browser of its own
CHROMIUM_FLAGS = [  # this machine's network is closed: no background connections, no sandbox
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def browser():
    """Headless Debian Chromium driven by Playwright. Missing: a failure where end-to-end
    tests are required (LLAVA_NB_E2E=1, as in CI), a skip elsewhere."""
    if not os.path.exists(CHROMIUM):
        message = f"{CHROMIUM} not found: apt-get install chromium"
        if os.environ.get("LLAVA_NB_E2E") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS
        )
        yield chromium
        chromium.close()


# The reduced demo model (llava_nb.demo): about a third of the real build's images and steps
# (5.2 min on 2 CPU cores); tests/test_demo.py checks it answers above chance.
SMALL_DEMO = {"vision_steps": 200, "align_rows": 256, "align_steps": 32, "instruct_rows": 512,
              "instruct_steps": 64}  # fmt: skip


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> str:
    """A cache folder (for $LLAVA_NB_CACHE) holding a reduced demo build, made over a
    half-written folder (no marker, a truncated file) that the build must replace."""
    from llava_nb import demo

    cache = tmp_path_factory.mktemp("llava_nb-cache")
    folder = cache / f"demo-{demo.VERSION}"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llava"}')
    (folder / "model.safetensors").write_bytes(b"\0" * 100)
    assert not demo.is_built(folder)
    demo.build(folder, seed=0, progress=False, **SMALL_DEMO)
    return str(cache)


def completion(kind: str, choice: dict) -> str:
    """A chat-completions JSON body ("chat.completion" or "chat.completion.chunk")."""
    head = {"id": "c", "object": kind, "created": 0, "model": "m"}
    return json.dumps({**head, "choices": [{"index": 0, **choice}]})


def events(*data: str) -> tuple[int, str, bytes]:
    """A `web_server` route answering with these server-sent events."""
    return 200, "text/event-stream", "".join(f"data: {d}\n\n" for d in data).encode()


MODELS = (200, "application/json", json.dumps({"object": "list", "data": [{"id": "m"}]}).encode())


@pytest.fixture
def web_server():
    """`web_server(routes)`: a context manager running a real HTTP server on loopback that
    answers each path (GET or POST) as `routes` says, (status, content type, body) or a list of
    them to answer in turn, and any
    other path with a 404 page; it yields its URL, ending in /v1. /v1/models lists one model
    unless routes say otherwise. For servers that are not OpenAI's, or spoil its stream;
    the answers on `cut_short` paths end before the length they announced."""

    @contextlib.contextmanager
    def serve(routes: dict[str, tuple[int, str, bytes]], cut_short: tuple[str, ...] = ()):
        routes = {"/v1/models": MODELS, **routes}

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                self.rfile.read(int(self.headers.get("content-length") or 0))
                page = (404, "text/html", b"<html><body>Not Found</body></html>")
                answer = routes.get(self.path, page)
                if isinstance(answer, list):  # answers in turn, the last one from then on
                    answer = answer.pop(0) if len(answer) > 1 else answer[0]
                status, kind, body = answer
                self.send_response(status)
                self.send_header("content-type", kind)
                self.send_header("content-length", str(len(body) + 100 * (self.path in cut_short)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        with loopback_server(Handler) as url:
            yield url + "/v1"

    return serve


CHUNK = completion("chat.completion.chunk", {"delta": {"content": "Hi"}, "finish_reason": None})
END = completion("chat.completion.chunk", {"delta": {}, "finish_reason": "stop"})
SSE = {"content-type": "text/event-stream"}


def thinking_chunk(field: str, text: str) -> str:
    """A chunk of a reasoning model's thinking: vLLM and llama.cpp send it as
    `reasoning_content`, Ollama (and newer vLLM) as `reasoning`; Ollama's content is ""."""
    delta = {"content": ""} if field == "reasoning" else {}
    return completion(
        "chat.completion.chunk", {"delta": {**delta, field: text}, "finish_reason": None}
    )


@contextlib.contextmanager
def thinking_server(answer: str = "Hi there"):
    """A reasoning model's server on loopback: it streams a first piece of thinking, then
    nothing until the test sets the event it yields with its URL (ending in /v1), then more
    thinking and `answer`. HTTP/1.0: each stream ends when its connection closes."""
    thought = threading.Event()
    chunks = [
        thinking_chunk("reasoning_content", " A greeting."),
        completion("chat.completion.chunk", {"delta": {"content": answer}}),
        END,
        "[DONE]",
    ]

    class Thinker(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(MODELS[2])

        def do_POST(self):
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            first = thinking_chunk("reasoning_content", "Let me see.")
            self.wfile.write(f"data: {first}\n\n".encode())
            self.wfile.flush()
            thought.wait(120)  # longer than tests wait for "thinking…"
            self.wfile.write("".join(f"data: {data}\n\n" for data in chunks).encode())

        def log_message(self, *args):
            pass

    try:
        with loopback_server(Thinker) as url:
            yield url + "/v1", thought
    finally:
        thought.set()


@pytest.fixture
def stand_in():
    """`stand_in(answers)`: an OpenAI-compatible stand-in on loopback (http.server) that
    answers its chat completions in turn with `answers`, (status, headers, body) each (the last
    from then on), and records their JSON bodies in `.requests`; /old/v1/... redirects to
    /v1/... with the status `.redirect`, and a GET of /v1/chat/completions gets 405, as from
    vLLM; each answer waits `.delay` seconds first. It yields the stand-in; `.url` ends in
    /v1."""
    import contextlib
    import http.server
    from types import SimpleNamespace

    @contextlib.contextmanager
    def serve(answers: list[tuple[int, dict[str, str], bytes]]):
        state = SimpleNamespace(requests=[], redirect=301, delay=0.0)

        class Handler(http.server.BaseHTTPRequestHandler):
            def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for name, value in {"content-length": str(len(body)), **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path.startswith("/old/"):
                    self._send(state.redirect, {"location": self.path.removeprefix("/old")}, b"")
                elif self.path == "/v1/models":
                    self._send(200, {"content-type": "application/json"}, MODELS[2])
                else:
                    self._send(405, {"content-type": "application/json"},
                               b'{"detail": "Method Not Allowed"}')  # fmt: skip

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.path.startswith("/old/"):
                    self.do_GET()
                    return
                state.requests.append(json.loads(body))
                time.sleep(state.delay)
                self._send(*(answers.pop(0) if len(answers) > 1 else answers[0]))

            def log_message(self, *args):
                pass

        with loopback_server(Handler) as url:
            state.url = url + "/v1"
            yield state

    return serve


def interrupt_in_unload(release: threading.Event) -> None:
    """Send a real SIGINT once the main thread waits in `Model.unload` (for the model's lock,
    held by another thread) with its interrupts recorded, then `release` that thread."""
    import signal

    from llava_nb.models import Model

    def waiting_in_unload() -> bool:
        frame = sys._current_frames().get(threading.main_thread().ident)
        handler = getattr(signal.getsignal(signal.SIGINT), "__qualname__", "")
        in_unload = frame is not None and frame.f_code is Model.unload.__code__
        return in_unload and handler.startswith("_interrupts_recorded.")

    try:
        deadline = time.monotonic() + 60
        while not waiting_in_unload():
            assert time.monotonic() < deadline, "the main thread never waited in unload"
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)  # most often taken in the lock's wait; later, it is still recorded
    finally:
        release.set()


def holding_lock(model, release: threading.Event) -> threading.Thread:
    """A thread holding `model`'s lock until `release`, as a panel's answer finishing does."""
    held = threading.Event()

    def answer_finishing() -> None:
        with model._lock:
            held.set()
            release.wait(120)

    holder = threading.Thread(target=answer_finishing)
    holder.start()
    held.wait(60)
    return holder
