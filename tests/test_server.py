"""`llava-nb serve`: the real uvicorn server on loopback, spoken to by the official openai client.

Each server runs in a background thread on a free port, with the tiny checkpoint: its answers
are gibberish, but deterministic under greedy decoding, so they must equal `Chat`'s exactly.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import gzip
import http.server
import io
import json
import os
import re
import sys
import time
import weakref
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
try:
    import httpx2 as httpx  # what this openai client is built on
except ImportError:  # pragma: no cover
    import httpx

from PIL import Image  # noqa: E402

from llava_nb.chat import Chat  # noqa: E402
from llava_nb.images import image_to_data_uri  # noqa: E402
from llava_nb.models import Model  # noqa: E402
from llava_nb.server import create_app, serving  # noqa: E402
from tests.conftest import loopback_server  # noqa: E402

KEY = "sk-test-key"
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]


def picture(color: str = "red", size: tuple[int, int] = (48, 40)) -> Image.Image:
    img = Image.new("RGB", size, color)
    img.paste(Image.new("RGB", (size[0] // 2, size[1] // 2), "gray"), (0, 0))
    return img


def user(text: str, *images: Image.Image) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": image_to_data_uri(i)}} for i in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def wait_for(condition, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@contextlib.contextmanager
def model_held(model: Model):
    """Hold the model's own lock: requests reach it, then wait (as behind a long answer)."""
    model._lock.acquire()
    try:
        yield
    finally:
        model._lock.release()


@pytest.fixture(scope="module")
def model(tiny_llava) -> Model:
    return Model(tiny_llava).load()


@pytest.fixture(scope="module")
def server(model):
    app = create_app(model, api_key=KEY, max_concurrency=2)
    with serving(app) as url:
        yield url, app.state.llava


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    (root / "allowed").mkdir()
    picture("green").save(root / "allowed" / "cat.png")
    picture("green").save(root / "secret.png")
    os.symlink(root / "secret.png", root / "allowed" / "link.png")
    return root


@pytest.fixture(scope="module")
def strict(model, media):
    """No key; a queue of one, a 1 MB request limit, URLs and files allowed, loopback Host."""
    app = create_app(
        model,
        max_concurrency=1,
        max_queue=1,
        max_request_bytes=1_000_000,
        allow_image_urls=True,
        allowed_local_media_path=str(media / "allowed"),
        loopback_hosts_only=True,
    )
    with serving(app) as url:
        yield url, app.state.llava


@pytest.fixture
def client(server, model):
    with openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60) as c:
        c.served = model.model_id  # the name `ask` sends
        yield c


@pytest.fixture
def strict_client(strict, model):
    with openai.OpenAI(base_url=strict[0] + "/v1", api_key="none", max_retries=0, timeout=60) as c:
        c.served = model.model_id
        yield c


def ask(client, messages, **options):
    """Greedy and short unless told otherwise."""
    options = {"temperature": 0, "max_tokens": 24, **options}
    return client.chat.completions.create(model=client.served, messages=messages, **options)


# ---------------------------------------------------------------- answers


def test_models_health_and_page(server, client, model):
    assert [m.id for m in client.models.list()] == [model.model_id]
    assert client.models.retrieve(model.model_id).id == model.model_id
    health = httpx.get(server[0] + "/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["model"] == model.model_id
    page = httpx.get(server[0] + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "v1/chat/completions" in page.text


def test_answer_with_image_equals_chat(client, model):
    img = picture("red")
    expected = Chat(model, max_new_tokens=24).ask("What is in this picture?", img)
    reference = model.generate(
        Chat(model).messages("What is in this picture?", [img]), max_new_tokens=24
    )
    reference.wait()
    result = ask(client, [user("What is in this picture?", img)])
    choice = result.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected
    assert choice.finish_reason == reference.finish_reason
    assert result.model == model.model_id and result.object == "chat.completion"
    assert result.usage.prompt_tokens == reference.prompt_tokens
    assert result.usage.completion_tokens == len(reference.token_ids)
    assert result.usage.total_tokens == reference.prompt_tokens + len(reference.token_ids)


def test_stream_equals_plain_answer(client):
    messages = [user("Describe the image.", picture("blue"))]
    plain = ask(client, messages)
    chunks = list(ask(client, messages, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == plain.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_multi_turn_equals_chat(client, model):
    img = picture("yellow")
    chat = Chat(model, max_new_tokens=12)
    first = chat.ask("What color is it?", img)
    second = chat.ask("Where is the cat?")
    messages = [
        user("What color is it?", img),
        {"role": "assistant", "content": first},
        {"role": "user", "content": "Where is the cat?"},  # plain string content
    ]
    assert ask(client, messages, max_tokens=12).choices[0].message.content == second


def test_system_message_folds_into_first_user_text(client, model):
    img = picture("purple")
    expected = Chat(model, max_new_tokens=12).ask("Be brief.\n\nWhat is it?", img)
    messages = [{"role": "system", "content": "Be brief."}, user("What is it?", img)]
    assert ask(client, messages, max_tokens=12).choices[0].message.content == expected


def test_max_tokens_gives_length(client):
    messages = [user("Is there any text in the photo?", picture("white"))]
    result = ask(client, messages, max_tokens=5)
    assert result.choices[0].finish_reason == "length"
    assert result.usage.completion_tokens == 5
    newer = ask(client, messages, max_tokens=None, max_completion_tokens=3)
    assert newer.usage.completion_tokens == 3


def test_stop_strings_end_the_answer(client, model):
    question, image = "How many people are there?", picture("orange")
    messages = [user(question, image)]
    full = ask(client, messages, max_tokens=40).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = full[: full.find(stop)]
    plain = ask(client, messages, max_tokens=40, stop=["never appears", stop])
    assert plain.choices[0].message.content == expected
    assert plain.choices[0].finish_reason == "stop"
    # the tokens counted are those up to the one that completed the stop string
    reference = model.generate(Chat(model).messages(question, [image]), max_new_tokens=40)
    assert reference.wait() == full
    ids, decode = reference.token_ids, model.processor.decode
    upto = next(k for k in range(len(ids) + 1) if stop in decode(ids[:k], skip_special_tokens=True))
    assert plain.usage.completion_tokens == upto
    chunks = list(ask(client, messages, max_tokens=40, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_makes_sampling_repeatable(client):
    messages = [user("Explain the chart.", picture("black"))]
    first, second = (
        ask(client, messages, temperature=1.0, top_p=0.9, seed=7).choices[0].message.content
        for _ in range(2)
    )
    assert first == second


# ---------------------------------------------------------------- refusals


def test_api_key_is_required(server, model):
    url = server[0]
    with openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError) as error:
            wrong.chat.completions.create(model=model.model_id, messages=[user("hi")])
        assert error.value.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
    missing = httpx.post(url + "/v1/chat/completions", json={"messages": [user("hi")]})
    assert missing.status_code == 401
    error = missing.json()["error"]
    assert error["code"] == "invalid_api_key" and "Authorization: Bearer" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    for method, path in (("GET", "/v1/nope"), ("GET", "/v1/chat/completions")):
        assert httpx.request(method, url + path).status_code == 401  # the key first, as OpenAI
    assert httpx.get(url + "/health").status_code == 200  # health and the page stay open


def test_bad_image_is_400(client):
    broken = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAAAAAA"}}
    with pytest.raises(openai.BadRequestError) as error:
        ask(client, [{"role": "user", "content": [broken, {"type": "text", "text": "hi"}]}])
    assert error.value.status_code == 400
    assert "not a readable image" in error.value.message
    assert error.value.body["code"] == "invalid_image"
    not_image = {"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}
    with pytest.raises(openai.BadRequestError, match="not a base64 image URI"):
        ask(client, [{"role": "user", "content": [not_image]}])


def test_oversized_request_is_413(strict_client):
    big = Image.frombytes("RGB", (800, 800), os.urandom(800 * 800 * 3))  # ~1.9 MB as PNG
    with pytest.raises(openai.APIStatusError) as error:
        ask(strict_client, [user("What is it?", big)])
    assert error.value.status_code == 413
    assert "over 1,000,000 bytes" in error.value.message


def test_image_urls_refused_unless_allowed(client, strict_client, strict):
    remote = user("hi")
    remote["content"].insert(0, {"type": "image_url", "image_url": {"url": "https://x.org/a.png"}})
    with pytest.raises(openai.BadRequestError, match="--allow-image-urls") as error:
        ask(client, [remote])
    assert error.value.body["param"] == "messages[0].content[0].image_url"
    # allowed, but never from internal addresses: loopback (this server), metadata, private
    for url in (
        strict[0] + "/health",
        "http://localhost/a.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.1.2.3/a.png",
        "http://[::1]/a.png",
        "http://[::ffff:127.0.0.1]/a.png",
    ):
        refused = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}
        with pytest.raises(openai.BadRequestError, match="does not fetch internal addresses"):
            ask(strict_client, [refused])
    assert strict[1].stats["requests"] >= 6


def test_local_paths_only_inside_the_allowed_folder(client, strict_client, media):
    def with_image(url):
        part = {"type": "image_url", "image_url": {"url": url}}
        return [{"role": "user", "content": [part, {"type": "text", "text": "What is it?"}]}]

    inside = media / "allowed" / "cat.png"
    with pytest.raises(openai.BadRequestError, match="--allowed-local-media-path"):
        ask(client, with_image(str(inside)))
    expected = ask(strict_client, [user("What is it?", picture("green"))])
    for url in (str(inside), inside.as_uri(), "cat.png"):
        answer = ask(strict_client, with_image(url))
        assert answer.choices[0].message.content == expected.choices[0].message.content
    for url in (
        str(media / "secret.png"),
        (media / "secret.png").as_uri(),
        "../secret.png",
        "link.png",  # a symlink inside the folder to a file outside it
    ):
        with pytest.raises(openai.BadRequestError, match="outside the folder"):
            ask(strict_client, with_image(url))


def test_bad_requests_get_openai_errors(server, client, model):
    url = server[0]
    headers = {"Authorization": f"Bearer {KEY}"}
    not_found = httpx.get(url + "/nope", headers=headers)
    assert not_found.status_code == 404
    assert not_found.json()["error"]["code"] == "not_found"
    slash = httpx.post(url + "/v1/chat/completions/", json={}, headers=headers)
    assert slash.status_code == 404 and "no route POST /v1/chat/completions/" in slash.text
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=[user("hi")])
    bad = [
        ({"messages": []}, "messages"),
        ({"messages": [user("hi")], "temperature": 5}, "temperature"),
        ({"messages": [user("hi")], "top_p": 0}, "top_p"),
        ({"messages": [user("hi")], "max_tokens": 0}, "max_tokens"),
        ({"messages": [user("hi")], "n": 2}, "n"),
        ({"messages": [user("hi")], "stop": [""]}, "stop"),
        ({"messages": [user("hi")], "stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [user("hi"), {"role": "assistant", "content": "x"}]}, "messages"),
        (
            {"messages": [{"role": "user", "content": [{"type": "audio"}]}]},
            "messages[0].content[0]",
        ),
    ]
    for body, param in bad:
        response = httpx.post(url + "/v1/chat/completions", json=body, headers=headers)
        assert response.status_code == 400, body
        assert response.json()["error"]["param"] == param, body
    too_long = httpx.post(
        url + "/v1/chat/completions",
        json={"messages": [user("cat " * 1100)], "max_tokens": 4},
        headers=headers,
    )
    assert too_long.status_code == 400 and "context" in too_long.json()["error"]["message"]
    assert too_long.json()["error"]["code"] == "context_length_exceeded"
    wrong_method = httpx.get(url + "/v1/chat/completions", headers=headers)
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()
    not_json = httpx.post(url + "/v1/chat/completions", content=b"{", headers=headers)
    assert not_json.status_code == 415  # no text/plain: cross-site pages cannot post here
    broken = httpx.post(
        url + "/v1/chat/completions",
        content=b"{",
        headers={**headers, "Content-Type": "application/json"},
    )
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]


def test_loopback_server_refuses_other_host_names(strict):
    assert httpx.get(strict[0] + "/health").status_code == 200
    rebound = httpx.get(strict[0] + "/health", headers={"Host": "attacker.example"})
    assert rebound.status_code == 421


# ---------------------------------------------------------------- load, queue, disconnects


def test_503_while_the_model_loads(tiny_llava):
    fresh = Model(tiny_llava)
    fresh._lock.acquire()  # the background load waits on the model's lock
    held = True
    try:
        with (
            serving(create_app(fresh)) as url,
            openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as c,
        ):
            health = httpx.get(url + "/health")
            assert health.status_code == 503 and health.json()["status"] == "loading"
            assert health.headers["retry-after"]
            with pytest.raises(openai.InternalServerError) as error:
                c.chat.completions.create(model=fresh.model_id, messages=[user("hi")])
            assert error.value.status_code == 503 and "loading" in error.value.message
            assert error.value.response.headers["retry-after"]
            fresh._lock.release()
            held = False
            wait_for(lambda: httpx.get(url + "/health").status_code == 200, what="the load")
            answer = c.chat.completions.create(
                model=fresh.model_id, messages=[user("hi")], max_tokens=3
            )
            assert answer.usage.completion_tokens <= 3
            fresh.unload()  # by the notebook serving it: nothing loads until a request comes
            health = httpx.get(url + "/health")
            assert health.status_code == 503 and health.json()["status"] == "unloaded"
            with pytest.raises(openai.InternalServerError, match="loading"):
                c.chat.completions.create(model=fresh.model_id, messages=[user("hi")])
            wait_for(lambda: httpx.get(url + "/health").status_code == 200, what="the reload")
    finally:
        if held:
            fresh._lock.release()


def test_client_disconnect_stops_generation(server, client, model):
    url, service = server
    body = {
        "model": model.model_id,
        "messages": [user("What is in this picture?", picture("red"))],
        "max_tokens": 900,
        "temperature": 0,
        "stream": True,
    }
    before = service.stats["disconnected"]
    seen = len(service.finished)
    headers = {"Authorization": f"Bearer {KEY}"}
    with (
        httpx.Client(headers=headers, timeout=60) as http,
        http.stream("POST", url + "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        events = 0
        for line in response.iter_lines():
            events += line.startswith("data: ")
            if events == 4:
                break  # leaving closes the connection
    wait_for(lambda: service.stats["disconnected"] > before, what="the disconnect")
    wait_for(lambda: len(service.finished) > seen, what="the generation to end")
    record = list(service.finished)[-1]
    assert record["disconnected"] and record["stopped"]
    assert record["completion_tokens"] < 900
    start = time.monotonic()
    ask(client, [user("hi")], max_tokens=2)
    assert time.monotonic() - start < 10


def test_a_client_gone_halfway_through_its_question_is_no_error(server, client, caplog):
    import socket

    url, service = server
    host, port = url.removeprefix("http://").split(":")
    before = service.stats["requests"]
    with socket.create_connection((host, int(port))) as raw:  # promises 1000 bytes, sends 12
        raw.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\n"
            b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"messages":'
        )
        wait_for(lambda: service.stats["requests"] > before, what="the question to be read")
    time.sleep(1)  # the server has seen the disconnect
    assert ask(client, [user("hi")], max_tokens=2)
    assert not [r for r in caplog.records if "unexpected error" in r.getMessage()]


def test_full_queue_answers_429(strict, strict_client):
    url, service = strict
    model = service.model
    messages = [user("What is it?", picture("red"))]
    with ThreadPoolExecutor(2) as pool, model_held(model):
        first = pool.submit(ask, strict_client, messages)  # answering (waits for the model)
        wait_for(lambda: service.admission.active == 1, what="the first request")
        second = pool.submit(ask, strict_client, messages)  # queued
        wait_for(lambda: service.admission.waiting == 1, what="the second request")
        with pytest.raises(openai.RateLimitError) as error:
            ask(strict_client, messages)
        assert error.value.status_code == 429 and error.value.body["code"] == "queue_full"
        assert httpx.get(url + "/health").json()["queued"] == 1
    assert first.result().choices[0].message.content == second.result().choices[0].message.content
    assert service.admission.active == 0 and service.admission.waiting == 0


def test_a_client_that_gives_up_leaves_the_queue(strict, strict_client):
    service = strict[1]
    messages = [user("What is it?", picture("red"))]
    with ThreadPoolExecutor(1) as pool, model_held(service.model):
        first = pool.submit(ask, strict_client, messages)
        wait_for(lambda: service.admission.active == 1, what="the first request")
        with pytest.raises(httpx.ReadTimeout):  # then the client closes the connection
            httpx.post(strict[0] + "/v1/chat/completions", json={"messages": messages}, timeout=0.3)
        wait_for(lambda: service.admission.waiting == 0, what="the queue to empty")
        assert service.admission.active == 1
    assert first.result().choices[0].finish_reason in ("stop", "length")
    wait_for(lambda: service.admission.active == 0, what="the slot to free")


def test_requests_are_answered_in_arrival_order(server, client):
    service = server[1]
    model = service.model
    with ThreadPoolExecutor(5) as pool:
        with model_held(model):
            futures = []
            for i in range(5):
                futures.append(pool.submit(ask, client, [user(f"Question {i}?")], max_tokens=4))
                wait_for(lambda n=i + 1: len(service.jobs) == n, what=f"request {i}")
        ids = [f.result().id for f in futures]
    finished = [r["id"] for r in service.finished if r["id"] in ids]
    assert finished == ids


def test_concurrent_streams_are_not_mixed(client):
    prompts = [
        [user(f"What is in picture {i}? {text}", picture(color, (40 + 8 * i, 48)))]
        for i, (color, text) in enumerate(
            zip(
                COLORS,
                [
                    "Describe it.",
                    "Where is the cat?",
                    "What color is it?",
                    "Any text?",
                    "Why?",
                    "How many people are there?",
                    "Explain the chart.",
                    "Is it a dog?",
                ],
                strict=True,
            )
        )
    ]
    alone = [ask(client, m, max_tokens=32).choices[0].message.content for m in prompts]
    assert len(set(alone)) == len(alone), "prompts must give different answers to catch mixing"

    def streamed(messages):
        stream = ask(client, messages, max_tokens=32, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(streamed, prompts))
    assert together == alone


# ---------------------------------------------------------------- odd requests


def _post(url: str, content: bytes, http=httpx) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    return http.post(url + "/v1/chat/completions", content=content, headers=headers)


def _port(response: httpx.Response) -> int:
    """The client's side of the connection that carried `response`."""
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


def test_deeply_nested_json_is_400_and_the_connection_stays_open(server):
    url = server[0]
    with httpx.Client(timeout=60) as http:
        response = _post(url, b'{"messages":' + b"[" * 100_000 + b"]" * 100_000 + b"}", http)
        assert response.status_code == 400
        assert "nests JSON too deeply" in response.json()["error"]["message"]
        health = http.get(url + "/health")
        assert health.status_code == 200 and _port(health) == _port(response)  # kept open
        deep = b"[" * 400 + b"]" * 400  # parses, but must not be echoed back whole
        for field in (b"temperature", b"model", b"max_tokens"):
            body = b'{"messages": [{"role": "user", "content": "hi"}], "' + field + b'": '
            response = _post(url, body + deep + b"}", http)
            assert response.status_code == 400, field
            assert len(response.json()["error"]["message"]) < 200, field


def test_an_unexpected_error_is_500_and_keeps_the_connection(server, monkeypatch):
    url, service = server

    def broken(_body, **_options):
        raise RuntimeError("a bug")

    monkeypatch.setattr(service, "parse", broken)
    with httpx.Client(timeout=60) as http:
        response = _post(url, b'{"messages": []}', http)
        assert response.status_code == 500
        assert response.json()["error"] == {
            "message": "internal error (RuntimeError)",
            "type": "server_error",
            "param": None,
            "code": None,
        }
        health = http.get(url + "/health")
        assert health.status_code == 200 and _port(health) == _port(response)  # kept open


def test_odd_bodies_get_plain_messages(server):
    url = server[0]
    cases = [
        (b'{"messages": [], "seed": ' + b"7" * 5000 + b"}", "a number in the request is too long"),
        (b'{"messages": "\xff\xfe\x00"}', "not valid UTF-8 JSON"),
        (b'{"model": 5, "messages": []}', "model must be a string"),
    ]
    for body, expected in cases:
        response = _post(url, body)
        assert response.status_code == 400, body[:40]
        message = response.json()["error"]["message"]
        assert expected in message, message
        assert "sys.set_int_max_str_digits" not in message and "codec" not in message


def test_bad_local_image_paths_are_400(strict_client):
    def with_image(url):
        part = {"type": "image_url", "image_url": {"url": url}}
        return [{"role": "user", "content": [part, {"type": "text", "text": "What is it?"}]}]

    with pytest.raises(openai.BadRequestError) as error:
        ask(strict_client, with_image("a" * 300 + ".png"))
    assert (
        "cannot read image file" in error.value.message and "check the path" in error.value.message
    )
    assert error.value.body["code"] == "invalid_image"
    with pytest.raises(openai.BadRequestError, match="'.' is a folder; name an image file in it"):
        ask(strict_client, with_image("."))
    with pytest.raises(openai.BadRequestError, match="'missing.png' not found"):
        ask(strict_client, with_image("missing.png"))


def test_wrong_method_and_unknown_route_say_what_exists(server):
    url = server[0]
    headers = {"Authorization": f"Bearer {KEY}"}
    wrong = httpx.get(url + "/v1/chat/completions", headers=headers)
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert wrong.json()["error"]["message"] == (
        "GET /v1/chat/completions is not allowed; use POST for /v1/chat/completions"
    )
    missing = httpx.post(url + "/v1/completions", json={}, headers=headers)
    assert missing.status_code == 404
    message = missing.json()["error"]["message"]
    assert "under /v1" not in message and "POST /v1/chat/completions" in message
    assert "GET /v1/models" in message and "GET /health" in message
    for path in ("/health", "/", "/v1/models"):
        head = httpx.head(url + path, headers=headers)
        assert head.status_code == 200 and head.content == b"", path


def test_fields_the_server_cannot_honour_are_refused(client):
    tool = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    refused = [
        ({"tools": [tool]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "weather"}}}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
        ),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": -1}, "frequency_penalty"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ]
    for extra, field in refused:
        with pytest.raises(openai.BadRequestError) as error:
            ask(client, [user("hi")], max_tokens=2, extra_body=extra)
        assert error.value.body["param"] == field, extra
        assert f"{field} is not supported" in error.value.message, extra
    harmless = {
        "tools": [],
        "tool_choice": "none",
        "logprobs": False,
        "response_format": {"type": "text"},
        "logit_bias": {},
        "top_logprobs": None,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "modalities": ["text"],
    }
    assert ask(client, [user("hi")], max_tokens=2, extra_body=harmless).choices
    assert ask(client, [user("hi")], max_tokens=2, extra_body={"tool_choice": "auto"}).choices


# ---------------------------------------------------------------- a second sweep


def test_malformed_image_urls_are_400_not_500(strict_client):
    for url in ("http://[::1/a.png", "https://[x]/a.png"):
        part = {"type": "image_url", "image_url": {"url": url}}
        with pytest.raises(openai.BadRequestError) as error:
            ask(strict_client, [{"role": "user", "content": [part]}])
        assert "which is not a valid URL" in error.value.message, url
        assert error.value.body["param"] == "messages[0].content[0].image_url", url


def test_assistant_refusal_parts_are_replayed_as_text(client):
    """OpenAI's assistant messages may hold refusal parts; a client replaying one must work."""
    first = user("What is it?", picture("red"))
    follow_up = {"role": "user", "content": "Why not?"}
    refusal = {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot."}]}
    as_text = {"role": "assistant", "content": "I cannot."}
    replayed = ask(client, [first, refusal, follow_up], max_tokens=8)
    expected = ask(client, [first, as_text, follow_up], max_tokens=8)
    assert replayed.choices[0].message.content == expected.choices[0].message.content


def test_an_unknown_model_id_is_not_echoed_whole(server):
    response = httpx.get(
        server[0] + "/v1/models/" + "x" * 5000, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    assert len(response.json()["error"]["message"]) < 200


def test_images_over_the_request_pixel_budget_are_400(client):
    """Each image is decoded whole: 16 small PNGs of 8000x8000 took 8 GB, so a request's
    images share one budget of pixels."""
    big = user("What is it?")
    blank = image_to_data_uri(Image.new("RGB", (8000, 6000), "white"))  # 48 MP, ~150 kB
    for _ in range(3):
        big["content"].insert(0, {"type": "image_url", "image_url": {"url": blank}})
    with pytest.raises(openai.BadRequestError) as error:
        ask(client, [big], max_tokens=2)
    assert "megapixels" in error.value.message and "downscale" in error.value.message
    assert error.value.body["param"] == "messages[0].content[2].image_url"


def test_streamed_json_survives_clients_that_split_on_unicode_line_breaks(tiny_llava, tmp_path):
    """httpx's iter_lines (and httpx-sse before 0.4.2) split lines at U+0085, U+2028 and U+2029
    as str.splitlines does; raw in a data line (from an answer, or here the model's name), one
    would cut the JSON in two. The server sends them escaped."""
    odd = tmp_path / "tiny\u2028llava\x85\u2029"
    odd.symlink_to(tiny_llava, target_is_directory=True)
    model = Model(str(odd))
    body = {"messages": [user("hi")], "max_tokens": 3, "stream": True}
    with serving(create_app(model)) as url:
        wait_for(lambda: httpx.get(url + "/health").status_code == 200, what="the load")
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
            lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert {chunk["model"] for chunk in chunks} == {str(odd)}


def test_an_empty_system_message_changes_nothing(client):
    """Chat apps send {"role": "system", "content": ""} when no system prompt is set."""
    question = user("What is in the picture?", picture("blue"))
    expected = ask(client, [question], max_tokens=12)
    for empty in ("", "  \n", [], [{"type": "text", "text": ""}]):
        answer = ask(client, [{"role": "system", "content": empty}, question], max_tokens=12)
        assert answer.choices[0].message.content == expected.choices[0].message.content, empty
        assert answer.usage.prompt_tokens == expected.usage.prompt_tokens, empty


@contextlib.contextmanager
def image_host(log: list | None = None):
    """A real HTTP server on loopback: /trickle sends its body a byte every 0.1 s,
    /slow-headers its headers, /broken-redirect redirects to a malformed URL, /ftp-redirect
    to ftp://itself/a.png, /a.png is a picture and /noise.png one of 600 kB. `log` gets
    (path, time.monotonic()) for each request, and ("hung up", time) when a trickle ends."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if log is not None:
                log.append((self.path, time.monotonic()))
            port = self.server.server_address[1]
            redirects = {
                "/broken-redirect": "http://[::1/a.png",
                "/ftp-redirect": f"ftp://127.0.0.1:{port}/a.png",
            }
            if self.path in redirects:
                self.send_response(302)
                self.send_header("Location", redirects[self.path])
                self.end_headers()
                return
            if self.path in ("/a.png", "/noise.png"):
                png = io.BytesIO()
                noise = Image.frombytes("RGB", (450, 450), os.urandom(450 * 450 * 3))
                (noise if self.path == "/noise.png" else picture("green")).save(png, "PNG")
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png.getvalue())))
                self.end_headers()
                self.wfile.write(png.getvalue())
                return
            self.send_response(200)
            if self.path == "/slow-headers":
                self.flush_headers()
                self.wfile.write(b"X-Slow: ")
            else:
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", "100000")
                self.end_headers()
            try:  # until the server gives up and hangs up
                for _ in range(100_000):
                    self.wfile.write(b"a")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                if log is not None:
                    log.append(("hung up", time.monotonic()))

        def log_message(self, *args):
            pass

    with loopback_server(Handler) as url:
        yield url


def test_a_trickling_or_misredirecting_image_host_is_a_400(strict_client, monkeypatch):
    """A host sending a byte now and then held a worker thread for hours (40 such threads
    stall every request); a redirect to a malformed URL was a 500."""
    import llava_nb.server

    monkeypatch.setattr(llava_nb.server, "_blocked", lambda _ip: False)  # loopback as public
    monkeypatch.setattr(llava_nb.server, "FETCH_DEADLINE_S", 1)

    def with_image(url):
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]

    with image_host() as url:
        for path in ("/trickle", "/slow-headers"):
            start = time.monotonic()
            with pytest.raises(openai.BadRequestError, match="took over 1 s to send") as error:
                ask(strict_client, with_image(url + path))
            assert time.monotonic() - start < 10, path  # a 1 s deadline; hours before it
            assert error.value.body["param"] == "messages[0].content[0].image_url"
        with pytest.raises(
            openai.BadRequestError,
            match="broken-redirect. redirects to .* which is not a valid URL",
        ):
            ask(strict_client, with_image(url + "/broken-redirect"))


def test_slow_image_urls_leave_threads_for_other_requests(model, monkeypatch):
    """Fetching image URLs ran in anyio's default thread pool (40 threads), which also starts
    every answer: 40 requests naming trickling hosts stalled every request for up to 60 s.
    Here that pool has 4 threads and 6 requests trickle; a text question is answered anyway."""
    import anyio.to_thread

    import llava_nb.server

    monkeypatch.setattr(llava_nb.server, "_blocked", lambda _ip: False)  # loopback as public
    monkeypatch.setattr(llava_nb.server, "FETCH_DEADLINE_S", 12)
    fetching = []
    fetch = llava_nb.server._fetch_public_image

    def counted(*args):
        fetching.append(args)
        return fetch(*args)

    monkeypatch.setattr(llava_nb.server, "_fetch_public_image", counted)
    app = create_app(model, allow_image_urls=True)
    service = app.state.llava
    check_ready = service.check_ready

    def small_default_pool():  # runs on the server's event loop, where the pool lives
        anyio.to_thread.current_default_thread_limiter().total_tokens = 4
        check_ready()

    monkeypatch.setattr(service, "check_ready", small_default_pool)
    with (
        serving(app) as url,
        image_host() as images,
        httpx.Client(timeout=60) as http,
        ThreadPoolExecutor(6) as pool,
    ):
        slow = {
            "role": "user",
            "content": [{"type": "image_url", "image_url": images + "/trickle"}],
        }
        body = json.dumps({"messages": [slow]}).encode()
        trickling = [pool.submit(_post, url, body, http) for _ in range(6)]
        wait_for(lambda: len(fetching) >= 4, what="the slow fetches")
        time.sleep(0.5)  # the old pool's threads are all fetching now
        with openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60) as c:
            c.served = model.model_id
            answer = ask(c, [user("Say hi.")], max_tokens=4)
            ended = sum(f.done() for f in trickling)
        assert answer.choices[0].finish_reason in ("stop", "length")
        # answered while every fetch still trickles (each ends at its 12 s deadline): an order,
        # not a time (a bound of 6 s was at the mercy of a loaded machine)
        assert ended == 0, f"a text question waited behind slow image fetches ({ended} ended first)"
        assert [f.result().status_code for f in trickling] == [400] * 6


def test_a_client_gone_while_its_image_is_fetched_frees_the_image_thread(model, monkeypatch):
    """A client that left while its image URL was fetched held an image thread until the fetch
    ended (FETCH_DEADLINE_S, 60 s): now the fetch is hung up. With one image thread, the next
    request's image is fetched at once."""
    import socket

    import llava_nb.server

    monkeypatch.setattr(llava_nb.server, "_blocked", lambda _ip: False)  # loopback as public
    monkeypatch.setattr(llava_nb.server, "FETCH_DEADLINE_S", 30)
    monkeypatch.setattr(llava_nb.server, "IMAGE_READ_THREADS", 1)
    app = create_app(model, allow_image_urls=True)
    log: list[tuple[str, float]] = []

    def with_image(url: str) -> dict:
        part = {"type": "image_url", "image_url": {"url": url}}
        return {"messages": [{"role": "user", "content": [part]}], "max_tokens": 1}

    with serving(app) as url, image_host(log) as images:
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps(with_image(images + "/trickle")).encode()
        with socket.create_connection((host, int(port))) as raw:
            raw.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            wait_for(lambda: log, what="the slow fetch")  # under way: then the client leaves
        left = time.monotonic()
        answer = httpx.post(
            url + "/v1/chat/completions", json=with_image(images + "/a.png"), timeout=60
        )
        assert answer.status_code == 200, answer.text
    when = dict(log)
    late = when["/a.png"] - left  # held to the deadline: 30 s; 1 s here, 10 s for a loaded machine
    assert late < 10, f"the next request's image was fetched {late:.1f} s after the client left"
    assert when["hung up"] - left < 10


def test_include_usage_puts_a_null_usage_in_every_other_chunk(server, model):
    """OpenAI's API reference: with include_usage, "all other chunks will also include a usage
    field, but with a null value"; code reading chunk["usage"] relies on it."""
    body = {
        "model": model.model_id,
        "messages": [user("What is it?")],
        "max_tokens": 4,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    for include in (True, False):
        options = {"stream_options": {"include_usage": include}}
        with httpx.stream(
            "POST", server[0] + "/v1/chat/completions", json={**body, **options}, headers=headers
        ) as response:
            lines = [line.removeprefix("data: ") for line in response.iter_lines() if line]
        chunks = [json.loads(line) for line in lines[:-1]]
        if include:
            assert all(chunk["usage"] is None for chunk in chunks[:-1])
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
        else:
            assert not any("usage" in chunk for chunk in chunks)


def test_a_compressed_body_is_refused_by_name(server):
    headers = {
        "Authorization": f"Bearer {KEY}",
        "Content-Type": "application/json",
        "Content-Encoding": "gzip",
    }
    body = gzip.compress(json.dumps({"messages": [user("hi")]}).encode())
    response = httpx.post(server[0] + "/v1/chat/completions", content=body, headers=headers)
    assert response.status_code == 415
    assert "Content-Encoding 'gzip'" in response.json()["error"]["message"]
    assert "uncompressed" in response.json()["error"]["message"]


# ---------------------------------------------------------------- images while queued


def test_queued_requests_hold_their_images_encoded(model):
    """Queued requests held their decoded images: 64 of them with 128 MP each (a PNG of a few
    kB) could take 24 GB. Now only a request being answered holds decoded pixels."""
    app = create_app(model, max_queue=8)
    service = app.state.llava
    size = (4000, 2500)
    blank = image_to_data_uri(Image.new("RGB", size, "white"))
    big = user("What is it?")
    big["content"][:0] = [{"type": "image_url", "image_url": {"url": blank}}] * 2
    with (
        serving(app) as url,
        ThreadPoolExecutor(4) as pool,
        openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120) as c,
    ):
        c.served = model.model_id
        with model_held(model):
            first = pool.submit(ask, c, [user("Say hi.")], max_tokens=2)
            wait_for(lambda: service.admission.active == 1, what="the first request")
            queued = [pool.submit(ask, c, [big], max_tokens=1) for _ in range(3)]
            wait_for(lambda: service.admission.waiting == 3, what="the queued requests")
            decoded = [o for o in gc.get_objects() if type(o) is Image.Image and o.size == size]
        assert not decoded, f"3 queued requests hold {len(decoded)} decoded images"
        assert first.result().choices
        answers = [f.result().choices[0].message.content for f in queued]
    assert answers == [answers[0]] * 3


def test_a_data_uri_is_decoded_once_and_queued_as_bytes(model, monkeypatch):
    """A data URI was base64-decoded twice, on arrival (its header checked) and when answered,
    and a queued request held its text as well: now its bytes only, 3/4 the text's size."""
    from llava_nb.server import _Image, _images

    noise = Image.frombytes("RGB", (160, 120), os.urandom(160 * 120 * 3))
    png = io.BytesIO()
    noise.save(png, "PNG")
    uri = image_to_data_uri(noise)
    question = "What is in this picture?"
    expected = Chat(model, max_new_tokens=8).ask(question, noise)
    b64decode, decoded = base64.b64decode, []

    def counted(data, *args, **kwargs):
        decoded.append(len(data))
        return b64decode(data, *args, **kwargs)

    monkeypatch.setattr(base64, "b64decode", counted)
    app = create_app(model)
    service = app.state.llava
    with (
        serving(app) as url,
        ThreadPoolExecutor(3) as pool,
        openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60) as c,
    ):
        c.served = model.model_id
        with model_held(model):
            first = pool.submit(ask, c, [user("Say hi.")], max_tokens=2)
            wait_for(lambda: service.admission.active == 1, what="the first request")
            queued = [pool.submit(ask, c, [user(question, noise)], max_tokens=8) for _ in range(2)]
            wait_for(lambda: service.admission.waiting == 2, what="the queued requests")
            held = [
                part["image"]
                for job in service.jobs
                for part in _images(job.messages)
                if isinstance(part["image"], _Image)
            ]
            assert len(held) == 2 and all(image.encoded == png.getvalue() for image in held)
            sizes = [sum(sys.getsizeof(v) for v in vars(image).values()) for image in held]
            assert max(sizes) < 0.8 * len(uri), f"a queued image holds {max(sizes):,} bytes"
            del held
        assert first.result().choices
        answers = [f.result().choices[0].message.content for f in queued]
    assert answers == [expected] * 2
    assert sum(n >= len(uri) - 30 for n in decoded) == 2, decoded


def test_a_redirect_to_another_scheme_is_refused(strict_client, monkeypatch):
    """A redirect to ftp://host/a.png was fetched as http://host/a.png."""
    import llava_nb.server

    monkeypatch.setattr(llava_nb.server, "_blocked", lambda _ip: False)  # loopback as public

    def with_image(url):
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]

    with image_host() as url:
        assert ask(strict_client, with_image(url + "/a.png"), max_tokens=2).choices
        with pytest.raises(openai.BadRequestError) as error:
            ask(strict_client, with_image(url + "/ftp-redirect"), max_tokens=2)
    assert "redirects to 'ftp://127.0.0.1:" in error.value.message
    assert "which is not an http(s) URL" in error.value.message
    assert error.value.body["param"] == "messages[0].content[0].image_url"


def test_fetched_images_count_toward_the_request_size_limit(strict, strict_client, monkeypatch):
    """Each fetched image could be 50 MB, 16 of them a request: 800 MB held by each queued
    request of a server whose requests are limited to 1 MB."""
    import llava_nb.server

    monkeypatch.setattr(llava_nb.server, "_blocked", lambda _ip: False)  # loopback as public
    with image_host() as url:
        part = {"type": "image_url", "image_url": {"url": url + "/noise.png"}}
        assert ask(strict_client, [{"role": "user", "content": [part]}], max_tokens=1).choices
        with pytest.raises(openai.APIStatusError) as error:
            ask(strict_client, [{"role": "user", "content": [part, part]}], max_tokens=1)
    assert error.value.status_code == 413
    assert "the request with the images it names is over 1,000,000 bytes" in error.value.message


def test_an_image_that_breaks_off_is_a_400_when_its_turn_comes(client):
    """Its header is read when it arrives, its pixels when it is answered: a cut PNG is still
    the client's 400 (streamed or not), and frees its place."""
    png = io.BytesIO()
    picture("red", (400, 300)).save(png, "PNG", compress_level=0)
    cut = "data:image/png;base64," + base64.b64encode(png.getvalue()[:5000]).decode()
    part = {"type": "image_url", "image_url": {"url": cut}}
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as error:
            ask(client, [{"role": "user", "content": [part]}], max_tokens=1, stream=stream)
        assert "is not a readable image" in error.value.message
        assert error.value.body["param"] == "messages[0].content[0].image_url"
    assert ask(client, [user("hi")], max_tokens=1).choices


def test_answered_requests_let_go_of_their_images(client):
    """A finished request's decoded images lived until the garbage collector found its job (in
    a reference cycle): 16 answers with a 32 MP image each peaked 2.4 GB over the baseline.
    Counted as live image objects, with the collector off: the process's memory also depends
    on how the allocator keeps freed pages."""
    size = (4000, 2500)
    blank = image_to_data_uri(Image.new("RGB", size, "white"))
    big = user("What is it?")
    big["content"][:0] = [{"type": "image_url", "image_url": {"url": blank}}] * 2
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            assert ask(client, [big], max_tokens=1).choices
        kept = [o for o in gc.get_objects() if type(o) is Image.Image and o.size == size]
    finally:
        gc.enable()
    assert not kept, f"3 answered requests kept {len(kept)} decoded images"


@pytest.mark.parametrize("how", ["plain", "streamed", "left halfway"])
def test_a_finished_request_frees_its_job_without_the_garbage_collector(server, model, how):
    """A finished job (its answer, its request) stayed in a reference cycle, through the
    client-disconnect watch's closures and a cancelled task's traceback, until the garbage
    collector found it. With the collector off, it must be freed as the request ends."""
    url, service = server
    body = {"messages": [user("What is it?", picture("red"))], "max_tokens": 8}
    headers = {"Authorization": f"Bearer {KEY}"}

    def send() -> None:
        if how == "plain":
            httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=60)
            return
        with httpx.stream(
            "POST", url + "/v1/chat/completions", json={**body, "stream": True}, headers=headers
        ) as response:
            for i, _line in enumerate(response.iter_lines()):
                if how == "left halfway" and i == 2:
                    break  # leaving closes the connection

    gc.collect()
    gc.disable()
    try:
        with ThreadPoolExecutor(1) as pool:
            with model_held(model):
                sent = pool.submit(send)
                wait_for(lambda: service.jobs, what="the request")
                job = weakref.ref(next(iter(service.jobs)))
            sent.result()
            wait_for(lambda: job() is None, timeout=5, what="the finished job to be freed")
    finally:
        gc.enable()


def test_an_image_a_load_refuses_is_a_400_on_arrival_not_after_the_queue(strict, strict_client):
    """Only the pixel budget was checked on arrival: a 101:1 image, PostScript, a 100 MP
    header or a large QOI waited in the queue (behind a long answer: minutes) for its 400."""

    def uri(data: bytes) -> str:
        return "data:image/png;base64," + base64.b64encode(data).decode()

    def png(img: Image.Image, fmt: str = "PNG") -> bytes:
        out = io.BytesIO()
        img.save(out, fmt)
        return out.getvalue()

    bomb = bytearray(png(Image.new("L", (1, 1))))
    ihdr = (10_000).to_bytes(4, "big") * 2 + bomb[24:29]  # its header says 10000x10000
    bomb[16:33] = ihdr + zlib.crc32(b"IHDR" + ihdr).to_bytes(4, "big")
    refused = {
        "one side over 100 times the other": png(picture("red", (1010, 10))),
        r"is PostScript \(EPS\)": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9 9\n",
        "is 10000x10000, more than 64,000,000 pixels": bytes(bomb),
        "is a QOI image of 2001x2000": png(Image.new("RGB", (2001, 2000), "red"), "QOI"),
    }
    service = strict[1]
    with ThreadPoolExecutor(1) as pool, model_held(service.model):
        first = pool.submit(ask, strict_client, [user("Hi?")], max_tokens=2)
        wait_for(lambda: service.admission.active == 1, what="the first request")
        for why, data in refused.items():
            part = {"type": "image_url", "image_url": {"url": uri(data)}}
            body = {"messages": [{"role": "user", "content": [part]}], "max_tokens": 1}
            response = httpx.post(strict[0] + "/v1/chat/completions", json=body, timeout=5)
            assert response.status_code == 400, why
            error = response.json()["error"]
            assert re.search(why, error["message"]) and error["code"] == "invalid_image"
            assert error["param"] == "messages[0].content[0].image_url"
        assert service.admission.waiting == 0 and not first.done()
    assert first.result().choices
