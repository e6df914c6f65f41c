"""RemoteModel: the Model interface over an OpenAI-compatible server."""

import json
import math
import socket
import time

import pytest

import llava_nb as ln
from llava_nb.models import ContextFullError, GenerationError, ModelError, get_model
from llava_nb.remote import RemoteModel, is_remote
from tests.conftest import CHUNK, END, MODELS, SSE, completion, events, thinking_chunk


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_urls_are_remote_ids():
    assert is_remote("openai:http://gpu:8000/v1")
    assert is_remote("https://example.org/v1")
    assert not is_remote("llava-hf/llava-1.5-7b-hf")
    assert not is_remote("/models/llava")


def test_model_with_a_url_is_a_remote_model_and_loads_nothing():
    import subprocess
    import sys

    code = (
        "import sys, llava_nb as ln;"
        "m = ln.Model('openai:http://gpu:8000/v1/', remote_model='llava', api_key='k');"
        "print(type(m).__name__, m.model_id, m.remote_model, m.loaded, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [
        "RemoteModel",
        "openai:http://gpu:8000/v1",
        "llava",
        "False",
        "False",
    ]


def test_get_model_shares_remote_models():
    a = get_model("http://gpu:8000/v1", remote_model="x")
    assert a is get_model("http://gpu:8000/v1", remote_model="x")
    assert a is not get_model("http://gpu:8000/v1", remote_model="y")
    assert a.status()["family"] == "remote" and a.status()["state"] == "unloaded"


def test_an_unreachable_server_is_one_clear_error():
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    chat = ln.Chat(url)
    with pytest.raises(ModelError, match=f"cannot reach {url}; check the URL"):
        chat.ask("Hello?")
    assert chat.history == []


def test_bad_settings_are_refused_before_connecting():
    model = RemoteModel(f"http://127.0.0.1:{_closed_port()}/v1")
    with pytest.raises(GenerationError, match="temperature must be"):
        model.generate([], temperature=-1)
    assert not model.loaded


def test_only_urls_make_remote_models():
    with pytest.raises(ModelError, match="not a server URL"):
        RemoteModel("llava-hf/llava-1.5-7b-hf")


def test_a_remote_chat_through_llava_nb_serve_equals_the_local_chat(tiny_llava, photo):
    """Chat over RemoteModel -> `llava-nb serve` -> the tiny model: same answers as local."""
    pytest.importorskip("uvicorn")
    from llava_nb.models import Model
    from llava_nb.server import create_app, serving

    served = Model(tiny_llava).load()  # the server answers 503 while it loads
    with serving(create_app(served, api_key="secret")) as url:
        remote = ln.Chat(ln.Model(f"openai:{url}/v1", api_key="secret"), max_new_tokens=8)
        local = ln.Chat(tiny_llava, max_new_tokens=8)
        for question, image in [("What is this?", photo), ("And the color?", None)]:
            assert remote.ask(question, image=image) == local.ask(question, image=image)
        assert remote.model.remote_model == served.model_id
        for seed in (5, 6, 8):  # sampled: the same pixels, the same seed, the same answer
            kw = {"image": photo, "temperature": 0.9, "seed": seed, "max_new_tokens": 12}
            asked = [ln.Chat(m).ask("What is this?", **kw) for m in (remote.model, tiny_llava)]
            assert asked[0] == asked[1]
        pieces = remote.stream("Go on.", max_new_tokens=400)
        next(pieces)
        pieces.close()  # leaving early closes the stream; the partial answer is kept
        assert remote.history[-1].interrupted
        with pytest.raises(ModelError, match="refused the API key"):
            ln.Model(f"{url}/v1", api_key="wrong").load()


def test_a_remote_chat_waits_while_the_server_loads_its_model(tiny_llava, monkeypatch, capsys):
    """The server answers 503 + Retry-After while loading; the client waits, then answers."""
    pytest.importorskip("uvicorn")
    import threading

    from llava_nb import server
    from llava_nb.models import Model

    monkeypatch.setattr(server, "LOAD_RETRY_AFTER_S", 1)
    served = Model(tiny_llava)  # not loaded: the server loads it in the background
    loading_may_finish = threading.Event()

    def hold_the_load() -> None:  # the model lock held: its load waits until we let go
        with served._lock:
            loading_may_finish.wait(120)

    holder = threading.Thread(target=hold_the_load)
    holder.start()
    app = server.create_app(served)
    try:
        with server.serving(app) as url:
            chat = ln.Chat(ln.Model(f"{url}/v1"), max_new_tokens=4)
            answers: list[str] = []
            asker = threading.Thread(target=lambda: answers.append(chat.ask("Hello?")))
            asker.start()
            deadline = time.monotonic() + 60
            while app.state.llava.stats["requests"] < 1:  # it was told to retry at least once
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert not served.loaded and asker.is_alive()
            loading_may_finish.set()
            asker.join(120)
            assert answers and answers[0] == chat.history[0].answer
            assert not chat.history[0].interrupted
    finally:
        loading_may_finish.set()
        holder.join()
    assert "is loading; retry in a few seconds); waiting up to 600 s" in capsys.readouterr().out


def test_a_server_loading_without_retry_after_is_waited_for(web_server, monkeypatch, capsys):
    """llama.cpp's server answers a bare 503 "Loading model" (no Retry-After) while it loads,
    to the model listing and to questions."""
    import llava_nb.remote as remote

    monkeypatch.setattr(remote, "RETRY_S", 0.05)
    loading = (503, "application/json", b'{"error": {"code": 503, "message": "Loading model"}}')
    routes = {
        "/v1/models": [loading, loading, MODELS],
        "/v1/chat/completions": [loading, events(CHUNK, END)],
    }
    with web_server(routes) as url:
        assert ln.Chat(url).ask("Hello?") == "Hi"
    waited = f"{url} is not ready (Loading model); waiting up to 600 s"
    assert capsys.readouterr().out.count(waited) == 2  # once connecting, once asking
    refused = r"answered \(HTTP 503\): Loading model; try again later"
    with web_server({"/v1/models": loading}) as url, pytest.raises(ModelError, match=refused):
        ln.Chat(ln.Model(url, load_timeout=0.2)).ask("Hello?")


def test_a_server_that_stays_unavailable_is_one_clear_error(tiny_llava, monkeypatch):
    pytest.importorskip("uvicorn")
    from llava_nb import server
    from llava_nb.models import Model

    monkeypatch.setattr(server, "LOAD_RETRY_AFTER_S", 1)
    served = Model(tiny_llava)
    served._lock.acquire()  # its load never finishes during this test
    try:
        with server.serving(server.create_app(served)) as url:
            remote = ln.Model(f"{url}/v1", load_timeout=1.5)
            chat = ln.Chat(remote, max_new_tokens=4)
            refused = r"refused the question \(HTTP 503\).*is loading"
            with pytest.raises(GenerationError, match=refused):
                chat.ask("Hello?")
            assert chat.history == []
    finally:
        served._lock.release()


def test_a_server_id_that_is_not_a_url_is_refused():
    for bad in ("openai:not-a-url", "openai:ftp://host/v1", "http://"):
        with pytest.raises(ModelError, match="is not a server URL; use openai:http://host:port/v1"):
            RemoteModel(bad)


def test_a_server_error_is_quoted_by_its_first_line_or_its_type():
    from llava_nb.remote import _message_error

    assert _message_error(RuntimeError("model is busy\nTraceback ...")) == "model is busy"
    assert _message_error(RuntimeError("")) == "RuntimeError"  # not an IndexError


@pytest.mark.parametrize(
    "error",
    [
        {"code": 400, "type": "exceed_context_size_error", "message": "request (536 tokens) "
         "exceeds the available context size (512 tokens), try increasing it"},  # llama.cpp
        {"code": "context_length_exceeded", "message": "the prompt is too long"},  # OpenAI
        {"code": 400, "message": "This model's maximum context length is 4096 tokens."},  # vLLM
    ],
)  # fmt: skip
def test_a_server_context_overflow_is_a_context_full_error(web_server, error):
    from llava_nb.models import SHORTER, ContextFullError

    body = json.dumps({"error": error}).encode()
    route = {"/v1/chat/completions": (400, "application/json", body)}
    refused = "refused the question .HTTP 400.: "
    with web_server(route) as url, pytest.raises(ContextFullError, match=refused) as err:
        ln.Chat(url).ask("Hello?")
    assert str(err.value).endswith(f"; {SHORTER}")


def test_a_key_refused_while_answering_names_the_fix_and_huge_lengths_are_capped(web_server):
    refused = (401, "application/json", b'{"error": {"message": "Invalid API Key"}}')
    with web_server({"/v1/chat/completions": refused}) as url:
        with pytest.raises(GenerationError, match=r"refused the API key \(Invalid API Key\); pass"):
            ln.Chat(url).ask("Hello?")
        hello = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
        answer = ln.Model(url).generate(hello, max_new_tokens=2**40)
        assert answer._request["max_tokens"] == 2**31 - 1  # llama.cpp wraps 2**40 around to 0


def test_a_key_without_permission_names_the_key_as_the_fix(web_server):
    """A 403 (a key the proxy knows, not allowed this model) said "check the URL"."""
    forbidden = (403, "application/json", b'{"error": {"message": "key lacks access"}}')
    refused = r"refused the API key \(key lacks access\); pass api_key= .*OPENAI_API_KEY$"
    for routes, error in (
        ({"/v1/models": forbidden}, ModelError),
        ({"/v1/chat/completions": forbidden}, GenerationError),
    ):
        with web_server(routes) as url, pytest.raises(error, match=refused):
            ln.Chat(url).ask("Hello?")


def test_a_model_may_be_named_by_an_alias_the_server_lists(web_server):
    listing = {"object": "list", "data": [{"id": "smol", "aliases": ["smol", "smollm"]}]}
    models = (200, "application/json", json.dumps(listing).encode())
    with web_server({"/v1/models": models, "/v1/chat/completions": events(CHUNK, END)}) as url:
        assert ln.Chat(ln.Model(url, remote_model="smollm")).ask("Hello?") == "Hi"  # llama.cpp
        with pytest.raises(ModelError, match="has no model 'other'; it serves: smol"):
            ln.Chat(ln.Model(url, remote_model="other")).ask("Hello?")


def test_a_proxy_error_page_is_quoted_by_its_title_or_text(web_server):
    page = b"<html><head><title>502 Bad Gateway</title></head><body><h1>502</h1></body></html>"
    for body, quoted in (
        (page, "502 Bad Gateway"),
        (b"<p>upstream\ntimed out</p>", "upstream timed out"),
    ):
        with web_server({"/v1/chat/completions": (502, "text/html", body)}) as url:
            with pytest.raises(GenerationError) as err:
                ln.Chat(url).ask("Hello?")
            assert str(err.value) == f"{url} refused the question (HTTP 502): {quoted}"


def test_a_url_that_is_not_a_model_server_is_one_clear_error(web_server):
    not_found = (404, "text/html", b"<h1>Not Found</h1>")
    page = (200, "text/html", b"<html><body>Welcome!</body></html>")
    listing = {"/v1/models": (200, "application/json", b'{"data": ["a"]}')}
    for routes, why in (
        ({"/v1/models": page}, "does not answer as a model server"),  # a web site
        ({"/v1/models": not_found}, r"answered \(HTTP 404\): Not Found"),
        (listing, "does not answer as a model server"),  # JSON of another shape
    ):
        with web_server(routes) as url:
            chat = ln.Chat(url)
            with pytest.raises(ModelError, match=f"{url} {why}.*; check the URL: .*ends in /v1"):
                chat.ask("Hello?")
            assert chat.history == []


ANSWER = completion(
    "chat.completion", {"message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}
)


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (events(CHUNK, '{"error": {"message": "out of memory"}}'), "failed while answering: out"),
        (events(CHUNK, "{not json"), "sent a reply that is not a chat-completions stream"),
        ((200, "application/json", ANSWER.encode()), "sent no streamed answer; check the URL"),
    ],
)
def test_a_stream_the_server_spoils_is_one_clear_error(web_server, answer, why):
    with web_server({"/v1/chat/completions": answer}) as url:
        chat = ln.Chat(url)
        with pytest.raises(GenerationError, match=f"{url} {why}"):
            chat.ask("Hello?")
        assert chat.history == []


def test_a_connection_lost_while_answering_is_one_clear_error(web_server):
    route = "/v1/chat/completions"
    with web_server({route: events(CHUNK)}, cut_short=(route,)) as url:
        chat = ln.Chat(url)
        with pytest.raises(GenerationError, match=f"{url} lost the connection while answering"):
            chat.ask("Hello?")
        assert chat.history == []


def test_a_host_that_never_answers_is_given_up_on(monkeypatch):
    from llava_nb import remote

    monkeypatch.setattr(remote, "LIST_TIMEOUT_S", 1.0)
    with socket.socket() as silent:  # accepts connections (the kernel does) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        started = time.monotonic()
        with pytest.raises(ModelError, match=f"{url} did not answer within 1 s; check the URL"):
            ln.Chat(url).ask("Hello?")
        assert time.monotonic() - started < 10


ANSWERED = (200, SSE, events(CHUNK, END, "[DONE]")[2])


def test_greedy_is_sent_as_temperature_zero_and_sampling_as_asked(stand_in):
    """Under 1e-5 a local model decodes greedily; llama.cpp's server samples at any
    temperature above 0. No top_k is sent: OpenAI's API has none, and strict servers refuse
    fields they do not know."""
    with stand_in([ANSWERED]) as server:
        chat = ln.Chat(server.url)
        assert chat.ask("Hello?", temperature=1e-6) == "Hi"
        assert chat.ask("Again?", temperature=0.7, top_p=0.9, seed=3) == "Hi"
    greedy, sampled = server.requests
    assert greedy["temperature"] == 0
    assert {k: sampled[k] for k in ("temperature", "top_p", "seed")} == {
        "temperature": 0.7,
        "top_p": 0.9,
        "seed": 3,
    }
    assert "top_k" not in sampled
    assert "top-k" in chat.model.status()["sampling"]


def test_a_stream_that_stops_without_finishing_is_one_clear_error(stand_in):
    """llama.cpp's server reports an error met while streaming as an `error: {...}` line,
    which SSE clients skip: the stream just ends, and the answer was kept as if complete."""
    error = json.dumps({"code": 500, "message": "context shift is disabled"})
    cut = f"data: {CHUNK}\n\nerror: {error}\n\n".encode()
    with stand_in([(200, SSE, cut)]) as server:
        chat = ln.Chat(server.url)
        with pytest.raises(GenerationError, match=f"{server.url} stopped answering midway"):
            chat.ask("Hello?")
        assert chat.history == []


def test_a_rate_limit_with_retry_after_is_waited_for(stand_in, capsys, monkeypatch):
    import llava_nb.remote as remote

    limited = (429, {"content-type": "application/json", "retry-after": "1"},
               b'{"error": {"message": "Rate limit reached"}}')  # fmt: skip
    with stand_in([limited, ANSWERED]) as server:
        started = time.monotonic()
        assert ln.Chat(server.url).ask("Hello?") == "Hi"
        assert 1 <= time.monotonic() - started < 30
    assert "is not ready (Rate limit reached); waiting up to 600 s" in capsys.readouterr().out
    monkeypatch.setattr(remote, "RETRY_S", 0.5)
    nan = (503, {**limited[1], "retry-after": "nan"}, limited[2])  # was retried without a pause
    with stand_in([nan, ANSWERED]) as server:
        started = time.monotonic()
        assert ln.Chat(server.url).ask("Hello?") == "Hi"
        assert time.monotonic() - started >= 0.5
    much_later = (429, {**limited[1], "retry-after": "3600"}, limited[2])
    with stand_in([much_later]) as server, pytest.raises(GenerationError, match="HTTP 429"):
        started = time.monotonic()
        ln.Chat(server.url).ask("Hello?")  # an hour is past load_timeout: refused at once
    assert time.monotonic() - started < 20  # not after a first wait of up to 30 s


def test_a_retry_after_given_as_an_http_date_is_waited_for(stand_in, capsys):
    """RFC 9110 allows a date as well as seconds; a 429 with a date failed at once."""
    import email.utils

    def limited(**headers: str) -> tuple[int, dict[str, str], bytes]:
        body = b'{"error": {"message": "Rate limit reached"}}'
        return 429, {"content-type": "application/json", **headers}, body

    # an HTTP date has whole seconds: a whole second 1 to 2 s from now, so the wait is known
    # however long the server and client took to start; the answer must come after it
    when = math.floor(time.time()) + 2
    retry_at = email.utils.formatdate(when, usegmt=True)
    with stand_in([limited(**{"retry-after": retry_at}), ANSWERED]) as server:
        assert ln.Chat(server.url).ask("Hello?") == "Hi"
        answered = time.time()
    assert when - 0.05 <= answered < when + 30  # 50 ms: the wait itself runs on another clock
    assert "is not ready (Rate limit reached); waiting up to 600 s" in capsys.readouterr().out
    for not_a_date in ("soon", "Wed, 99 Foo 2026 25:61:00 GMT"):  # as if none: 429 at once
        refused = pytest.raises(GenerationError, match="HTTP 429")
        with stand_in([limited(**{"retry-after": not_a_date})]) as server, refused:
            ln.Chat(server.url).ask("Hello?")


@pytest.mark.parametrize("status", [301, 302, 303])
def test_a_redirect_that_drops_the_question_names_the_url_to_use(stand_in, status):
    """An http -> https or moved-server redirect turns the question's POST into a GET (as
    browsers do); the server then answers 405, which named neither the cause nor the fix."""
    with stand_in([ANSWERED]) as server:
        server.redirect = status
        old = server.url.replace("/v1", "/old/v1")
        chat = ln.Chat(old)
        fix = f"{old} redirects to {server.url}; use that URL"
        with pytest.raises(GenerationError, match=f"^{fix}"):
            chat.ask("Hello?")
        assert chat.history == [] and server.requests == []
        server.redirect = 308  # keeps the method: the question arrives
        assert ln.Chat(old).ask("Hello?") == "Hi"


def test_images_reach_the_server_as_the_local_model_sees_them(stand_in, photo):
    """Images were sent as JPEG: the server saw other pixels, and a seeded answer about an
    image differed from the local one. Camera-sized ones still go as JPEG (PNG: ten times
    the bytes, sent again with every question; the model shrinks them far more anyway)."""
    import numpy as np

    from llava_nb.images import image_from_data_uri

    camera = photo.resize((2000, 1500))
    with stand_in([ANSWERED]) as server:
        chat = ln.Chat(server.url)
        chat.ask("What is this?", image=photo)
        chat.ask("And this?", image=camera)
    sent = [
        part["image_url"]["url"]
        for message in server.requests[-1]["messages"]
        for part in message["content"]
        if isinstance(message["content"], list) and part["type"] == "image_url"
    ]
    assert sent[0].startswith("data:image/png;")
    assert np.array_equal(np.asarray(image_from_data_uri(sent[0])), np.asarray(photo))
    assert sent[1].startswith("data:image/jpeg;") and len(sent[1]) < 1_000_000


def test_each_image_is_encoded_once_for_all_the_questions_that_send_it(
    stand_in, photo, monkeypatch
):
    """Every question sends the whole chat's images again: PNG took 0.5 s for each 2 MP
    image, each question."""
    from llava_nb import remote

    encoded = []
    encode = remote.image_to_data_uri
    monkeypatch.setattr(remote, "image_to_data_uri", lambda *a: encoded.append(a[0]) or encode(*a))
    with stand_in([ANSWERED]) as server:
        chat = ln.Chat(server.url)
        chat.ask("What is this?", image=photo)
        chat.ask("And now?")
        chat.ask("And this?", image=photo)
    assert len(encoded) == 2  # the same photo attached twice: two images of the chat
    first, last = (request["messages"][0]["content"][0] for request in server.requests[-3::2])
    assert first == last


def test_a_fastapi_error_body_is_quoted_by_its_detail(web_server):
    """FastAPI answers {"detail": "..."} (vLLM's unknown routes, say), which was quoted as the
    openai client words it: "Error code: 404"."""
    not_found = (404, "application/json", b'{"detail": "Not Found"}')
    refused = r"refused the question \(HTTP 404\): Not Found$"
    with (
        web_server({"/v1/chat/completions": not_found}) as url,
        pytest.raises(GenerationError, match=refused),
    ):
        ln.Chat(url).ask("Hello?")


def test_a_server_silent_past_the_timeout_is_named_so(stand_in):
    """It said "lost the connection": the server was up, only slow (a long prompt on a busy
    GPU); the fix is a longer timeout."""
    with stand_in([ANSWERED]) as server:
        server.delay = 10  # far past the timeout, however slowly the client runs
        chat = ln.Chat(ln.Model(server.url, timeout=0.5))
        silent = f"{server.url} sent nothing for 0.5 s while answering; if it is busy, pass a"
        with pytest.raises(GenerationError, match=silent):
            chat.ask("Hello?")
        assert chat.history == []


def test_a_chat_with_an_adapter_is_not_answered_by_a_server_without_it(stand_in, tmp_path):
    """A chat saved with a fine-tuned adapter, opened on a server model, was answered by the
    server's base model without a word: a server cannot load our adapter. As for an adapter
    folder gone since: the chat opens, its question is refused (nothing sent), naming the
    adapter and the fixes; use_adapter(None) goes on with the server's model."""
    from llava_nb.chat import Chat
    from llava_nb.errors import LlavaError

    adapter = tmp_path / "tuned"
    adapter.mkdir()
    base = "llava-hf/llava-1.5-7b-hf"
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
    saved = tmp_path / "chat.json"
    saved.write_text(json.dumps({
        "format": "llava_nb.chat", "version": 1, "model": base, "settings": {},
        "adapter": str(adapter), "turns": [{"question": "Q", "images": [], "answer": "A"}],
    }))  # fmt: skip
    with stand_in([ANSWERED]) as server:
        chat = Chat.load(saved, model=server.url)
        refused = (
            f"^this chat answers with the adapter {adapter}, which the server {server.url} "
            f"cannot load .adapters need local weights.; answer with its base model "
            rf"\(chat.model = ln.Model\('{base}'\)\), or use_adapter\(None\) \(%llava adapter "
            "none\\) answers with the server's model$"
        )
        for ask in (lambda: chat.ask("Hello?"), chat.regenerate, lambda: next(chat.stream("H"))):
            with pytest.raises(LlavaError, match=refused):
                ask()
        assert server.requests == [] and [(t.question, t.answer) for t in chat.history] == [
            ("Q", "A")
        ]
        chat.use_adapter(None)
        assert chat.ask("Hello?") == "Hi" and len(chat.history) == 2
        not_here = f"^adapters need local weights; this chat's model is the server {server.url}"
        with pytest.raises(LlavaError, match=not_here + r".*; ask on a local model .*\n?$") as e:
            chat.use_adapter(adapter)
        assert "\n" not in str(e.value) and chat.adapter is None
        saved.write_text(saved.read_text().replace(str(adapter), str(tmp_path / "gone")))
        gone = (
            f"^this chat answers with the adapter {tmp_path / 'gone'}, which is not here "
            f"\\(nor could the server {server.url} load it: adapters need local weights\\); "
            r"use_adapter\(None\) \(%llava adapter none\) answers with the server's model$"
        )
        with pytest.raises(LlavaError, match=gone):
            Chat.load(saved, model=server.url).ask("Hello?")


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_a_reasoning_model_that_only_thought_is_one_clear_error(stand_in, field):
    """A reasoning model out of tokens while thinking sends only its reasoning: the answer
    was '' without a word (recorded as if the model had said nothing)."""

    def answer(finish: str | None, *chunks: str) -> tuple[int, dict[str, str], bytes]:
        end = completion("chat.completion.chunk", {"delta": {}, "finish_reason": finish})
        return 200, SSE, events(*chunks, *([end] if finish else []), "[DONE]")[2]

    thinking = [thinking_chunk(field, "Let me see. "), thinking_chunk(field, "The user greets me.")]
    with stand_in([answer("length", *thinking)]) as server:
        chat = ln.Chat(server.url, max_new_tokens=40)
        spent = (
            f"^{server.url} spent all 40 tokens \\(max_new_tokens\\) on its model's reasoning, "
            "before any answer; raise max_new_tokens, e.g. max_new_tokens=160$"
        )
        with pytest.raises(GenerationError, match=spent):
            chat.ask("Hello?")
        assert chat.history == []
    stopped = (
        "ended the answer with reasoning only, no text \\(finish_reason 'stop'\\); ask "
        "again, or check the server's reasoning parser$"
    )
    for finish, error in (("stop", stopped), (None, "stopped answering midway")):
        with stand_in([answer(finish, *thinking)]) as server:
            chat = ln.Chat(server.url)
            with pytest.raises(GenerationError, match=f"^{server.url} {error}"):
                chat.ask("Hello?")
            assert chat.history == []
    with stand_in([answer("stop", *thinking, CHUNK)]) as server:
        chat = ln.Chat(server.url)
        assert chat.ask("Hello?") == "Hi"  # thinking, then the answer: only the answer is kept
    assert [(t.question, t.answer) for t in chat.history] == [("Hello?", "Hi")]


LLAMA_CPP_USAGE = {"completion_tokens": 12, "prompt_tokens": 4084, "total_tokens": 4096}


@pytest.mark.parametrize(
    "own_chunk", [False, True], ids=["in-the-last-chunk", "a-chunk-of-its-own"]
)
def test_a_reasoning_model_out_of_context_names_the_context_not_max_new_tokens(stand_in, own_chunk):
    """llama.cpp ends with finish_reason "length" when max_tokens is spent and when its context
    is full: this one stopped at 12 of 1000 tokens, its context of 4096 full, and the fix was
    not to raise max_new_tokens. It sends its token counts in the last chunk (or, asked for
    them with include_usage, in one of their own, as vLLM)."""
    end = {"delta": {}, "finish_reason": "length"}
    finish = json.loads(completion("chat.completion.chunk", end))
    usage = {**finish, "choices": [], "usage": LLAMA_CPP_USAGE}
    if not own_chunk:
        finish |= {"usage": LLAMA_CPP_USAGE, "timings": {"prompt_n": 4084, "predicted_n": 12}}
    chunks = [thinking_chunk("reasoning_content", "Let me see."), json.dumps(finish)]
    body = events(*chunks, *([json.dumps(usage)] if own_chunk else []), "[DONE]")[2]
    with stand_in([(200, SSE, body)]) as server:
        spent = f"^{server.url} spent all 12 tokens \\(max_new_tokens\\) on its model's reasoning"
        with pytest.raises(GenerationError, match=spent):  # 12 of 12: max_tokens, after all
            ln.Chat(server.url, max_new_tokens=12).ask("Hello?")
        chat = ln.Chat(server.url, max_new_tokens=1000)
        full = (
            f"^{server.url} ran out of context \\(the conversation: 4084 tokens, its reasoning: "
            "12\\) while its model was reasoning, before any answer; start afresh "
            r"\(chat.reset\(\)\) or drop the last turn \(chat.undo\(\)\), or give the server a "
            "larger context \\(llama.cpp: --ctx-size\\)$"
        )
        with pytest.raises(ContextFullError, match=full):
            chat.ask("Hello?")
        assert chat.history == []
    assert server.requests[0]["stream_options"] == {"include_usage": True}


def test_a_reasoning_model_s_thinking_streams_to_its_listeners_before_the_answer(stand_in):
    """A reasoning model streams no answer while it thinks (a minute at times), so a view
    showed nothing, as if hung: the thinking now reaches `on_reasoning` as it streams (hooked
    on the chat's "start"), and `thinking` says so until the answer starts."""
    thinking = [
        thinking_chunk("reasoning_content", "Let me see. "),
        thinking_chunk("reasoning", "Hello."),
    ]
    with stand_in([(200, SSE, events(*thinking, CHUNK, END, "[DONE]")[2])]) as server:
        chat, seen = ln.Chat(server.url), []

        def follow(event: str, turn, piece: str) -> None:
            generation = chat.answering.generation if chat.answering else None
            if event == "start":
                generation.on_reasoning(lambda text: seen.append((text, generation.thinking)))
            elif event == "piece":
                seen.append((f"answer: {piece}", generation.thinking))

        chat.on_change(follow)
        assert chat.ask("Hello?") == "Hi"
    assert seen == [("Let me see. ", True), ("Hello.", True), ("answer: Hi", False)]
    assert chat.history[-1].answer == "Hi"


def test_chat_on_thinking_follows_every_answer_until_unsubscribed(stand_in):
    """`Chat.on_thinking` is what views hook (cells, the terminal, a panel): it reaches each
    answer's generation as it starts, and after unsubscribing, nothing more."""
    thinking = [
        thinking_chunk("reasoning_content", "Let me see. "),
        thinking_chunk("reasoning", "Hi?"),
    ]
    body = events(*thinking, CHUNK, END, "[DONE]")[2]
    with stand_in([(200, SSE, body)]) as server:
        chat, seen = ln.Chat(server.url), []
        unsubscribe = chat.on_thinking(seen.append)
        assert chat.ask("Hello?") == "Hi" and chat.ask("Again?") == "Hi"
        assert seen == ["Let me see. ", "Hi?"] * 2
        unsubscribe()
        assert chat.ask("Once more?") == "Hi" and len(seen) == 4
