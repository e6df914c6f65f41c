"""`RemoteModel`: the same interface as `Model`, answered by an OpenAI-compatible server.

vLLM, Ollama, llama.cpp's server and `llava-nb serve` all speak the chat-completions API, so a
notebook can stay light while the weights live on a GPU server. The official `openai` client
does the HTTP and the streaming (extra `llava_nb[remote]`).

Greedy answers (temperature under 1e-5) are sent temperature 0, which servers decode greedily
(llama.cpp's samples at any temperature above 0, however small). A sampled answer is sent
`temperature`, `top_p` and `seed` only, as OpenAI's API has nothing more; the rest of sampling
is the server's own: top-k, min-p, penalties (llama.cpp's server: top-k 40, min-p 0.05;
`llava-nb serve`: transformers' top-k 50, as a local `Model`). So a seeded sample differs from
a local one in kind, not only in its random numbers. Extra fields such as `top_k` are not sent:
strict servers refuse fields they do not know. Images go as PNG, pixel for pixel, up to 2
megapixels; larger ones (camera photos) as JPEG.
"""

from __future__ import annotations

import email.utils
import math
import os
import re
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

from PIL import Image

from llava_nb.errors import first_line
from llava_nb.images import image_to_data_uri
from llava_nb.models import (
    GREEDY_BELOW,
    SHORTER,
    ContextFullError,
    GenerationError,
    ModelError,
    StateListeners,
    check_settings,
)

PREFIX = "openai:"
LIST_TIMEOUT_S = 30.0  # listing models is instant on a live server: longer means none answers
MAX_TOKENS = 2**31 - 1  # servers keep max_tokens in 32 bits: llama.cpp wraps 2**40 around to 0
RETRY_S = 2.0  # between tries while a server answers 503 without saying how long to wait
NOT_A_SERVER = "check the URL: an OpenAI-compatible server's, which usually ends in /v1"
LOSSLESS_PIXELS = 2_000_000  # images up to this go as PNG, larger ones (photos) as JPEG
SAMPLING = "temperature, top_p, seed; top-k, min-p and penalties are the server's defaults"
CONTEXT_FIX = (  # not max_new_tokens: the conversation, not the answer, is what fills it
    "start afresh (chat.reset()) or drop the last turn (chat.undo()), or give the server a "
    "larger context (llama.cpp: --ctx-size)"
)


def is_remote(model_id: object) -> bool:
    """True for "openai:URL" and plain http(s) URLs: ids that name a server, not weights."""
    return isinstance(model_id, str) and model_id.startswith((PREFIX, "http://", "https://"))


def _message_error(error: Exception) -> str:
    body = getattr(error, "body", None)
    if isinstance(body, dict):  # OpenAI's {"error": {"message": ...}}, FastAPI's {"detail": ...}
        body = body.get("error", body.get("detail", body))
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])
    if isinstance(body, str) and body.strip():  # a proxy's page: its title, or its text
        title = re.search(r"<title[^>]*>(.*?)</title>", body, re.I | re.S)
        text = title.group(1) if title else re.sub(r"<[^>]*>", " ", body)
        if text.strip():
            return first_line(" ".join(text.split()), 120)
    return first_line(error)  # an openai error's str() is its message


class RemoteModel:
    """A model served over the OpenAI chat-completions API.

    `model_id` is "openai:http://host:8000/v1" (or the bare URL); `remote_model` is the name the
    server knows the model by (default: the first it lists); `api_key` defaults to
    `$OPENAI_API_KEY`, and to a placeholder for servers that want none.
    """

    def __init__(
        self,
        model_id: str,
        *,
        remote_model: str | None = None,
        api_key: str | None = None,
        timeout: float = 600.0,
        load_timeout: float = 600.0,
    ) -> None:
        if not is_remote(model_id):
            raise ModelError(f"'{model_id}' is not a server URL; use openai:http://host:port/v1")
        self.base_url = model_id.removeprefix(PREFIX).rstrip("/")
        parts = urllib.parse.urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ModelError(
                f"'{self.base_url}' is not a server URL; use openai:http://host:port/v1"
            )
        self.model_id = PREFIX + self.base_url
        self.remote_model = remote_model
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or "not-needed"
        self.timeout = timeout
        self.load_timeout = load_timeout  # how long to wait on a server still loading its model
        self.client: Any = None
        self._lock = threading.Lock()
        self._listeners = StateListeners()

    def __repr__(self) -> str:
        return f"RemoteModel({self.model_id!r}, remote_model={self.remote_model!r})"

    @property
    def loaded(self) -> bool:
        return self.client is not None

    def status(self) -> dict[str, Any]:
        return {
            "state": "connected" if self.loaded else "unloaded",
            "model": self.model_id,
            "family": "remote",
            "device": self.base_url,
            "dtype": None,
            "quantization": None,
            "memory": 0,
            "remote_model": self.remote_model,
            "sampling": SAMPLING,
        }

    def on_state_change(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """As `Model.on_state_change`: "loaded" once connected, "unloaded" once closed."""
        return self._listeners.add(callback)

    def load(self) -> RemoteModel:
        """Connect: check that the server answers and serves `remote_model`; prints one line."""
        with self._lock:
            if self.client is None:
                self.client = self._connect()
                print(f"llava_nb: connected to {self.base_url} ({self.remote_model})", flush=True)
                self._listeners.tell("loaded")
        return self

    def _connect(self):
        try:
            import openai
        except ImportError:
            raise ModelError(
                "remote models need the openai client: pip install 'llava_nb[remote]'"
            ) from None
        client = openai.OpenAI(
            base_url=self.base_url, api_key=self.api_key, timeout=self.timeout, max_retries=0
        )
        try:
            listing = self.while_loading(lambda: client.models.list(timeout=LIST_TIMEOUT_S))
            served = [str(m.id) for m in listing]
            aliases = [getattr(m, "aliases", None) for m in listing]
            known = served + [str(a) for names in aliases if isinstance(names, list) for a in names]
        except (openai.AuthenticationError, openai.PermissionDeniedError) as e:  # 401, 403
            raise ModelError(
                f"{self.base_url} refused the API key ({_message_error(e)}); pass api_key= "
                "(llava-nb chat: --api-key) or set OPENAI_API_KEY"
            ) from None
        except openai.APITimeoutError:
            raise ModelError(
                f"{self.base_url} did not answer within {LIST_TIMEOUT_S:.0f} s; check the URL "
                "and that the server is running"
            ) from None
        except openai.APIConnectionError:
            raise ModelError(
                f"cannot reach {self.base_url}; check the URL and that the server is running"
            ) from None
        except openai.APIError as e:
            status = getattr(e, "status_code", None)
            why = f"answered{f' (HTTP {status})' if status else ''}: {_message_error(e)}"
            fix = "try again later" if status == 503 else NOT_A_SERVER  # still loading, after all
            raise ModelError(f"{self.base_url} {why}; {fix}") from None
        except (ValueError, TypeError, AttributeError):  # a web page, or JSON of another shape
            why = "does not answer as a model server"
            raise ModelError(f"{self.base_url} {why}; {NOT_A_SERVER}") from None
        if self.remote_model is None and served:
            self.remote_model = served[0]
        if self.remote_model is None:
            raise ModelError(f"{self.base_url} lists no models; pass remote_model=NAME")
        if served and self.remote_model not in known:  # llama.cpp lists --alias names too
            raise ModelError(
                f"{self.base_url} has no model '{self.remote_model}'; it serves: "
                f"{', '.join(served)}"
            )
        return client

    def while_loading(self, call: Callable[[], Any], stop: threading.Event | None = None) -> Any:
        """`call()`, again while the server answers 503 (its model still loading: llama.cpp's
        server, or ours) or 429 with a Retry-After, waiting as that asks, up to `load_timeout`
        (a wait past it: the error at once); None if `stop` is set meanwhile."""
        import openai

        deadline = time.monotonic() + self.load_timeout
        told = False
        while True:
            try:
                return call()
            except openai.APIStatusError as e:
                delay = _retry_after(e)
                if delay is None or time.monotonic() + delay > deadline:
                    raise
                if not told:
                    why = f"{self.base_url} is not ready ({_message_error(e)})"
                    print(f"llava_nb: {why}; waiting up to {self.load_timeout:.0f} s", flush=True)
                    told = True
                if (stop or threading.Event()).wait(min(delay, 30.0)):  # asks again within 30 s
                    return None

    def unload(self) -> None:
        """Close the connection (the server keeps its weights)."""
        with self._lock:
            if self.client is None:
                return
            self.client.close()
            self.client = None
            self._listeners.tell("unloaded")

    def generate(
        self,
        messages: list[dict[str, Any]],
        *,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        attention: bool = False,
    ) -> RemoteGeneration:
        """Start answering; iterate the result for text pieces (as with `Model.generate`)."""
        if attention:
            raise GenerationError(
                f"attention maps need local weights; {self.model_id} is a server. Load the "
                "model locally (ln.Model('llava-hf/...')) to ask with attention=True"
            )
        settings = check_settings(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
        )
        self.load()
        greedy = settings["temperature"] < GREEDY_BELOW  # as a local model decodes
        request = {
            "model": self.remote_model,
            "messages": [_openai_message(m) for m in messages],
            "max_tokens": min(settings["max_new_tokens"], MAX_TOKENS),
            "temperature": 0.0 if greedy else settings["temperature"],  # llama.cpp samples
            "top_p": settings["top_p"],
            "stream": True,
            "stream_options": {"include_usage": True},  # token counts: why an answer stopped
        }
        if settings["seed"] is not None:
            request["seed"] = settings["seed"]
        return RemoteGeneration(self, request)


_ENCODED: dict[int, tuple[weakref.ref, str]] = {}  # id(image) -> (the image, its data URI)


def _image_url(image: Image.Image) -> str:
    """Lossless PNG, so the server sees what a local model would (JPEG changed seeded
    answers); JPEG above LOSSLESS_PIXELS: PNG is ten times larger for a photo, sent again
    with every question, and the model shrinks such an image far more than JPEG blurs it.
    Encoded once per image while it lives: every question sends the whole chat's images
    again, and PNG takes 0.5 s for 2 MP."""
    key = id(image)
    kept = _ENCODED.get(key)
    if kept is not None and kept[0]() is image:
        return kept[1]
    lossless = image.width * image.height <= LOSSLESS_PIXELS
    url = image_to_data_uri(image, "PNG" if lossless else "JPEG")
    _ENCODED[key] = (weakref.ref(image, lambda _, key=key: _ENCODED.pop(key, None)), url)
    return url


def _openai_message(message: dict[str, Any]) -> dict[str, Any]:
    """A processor-format chat message (PIL images inline) in OpenAI's format (data URIs)."""
    parts = []
    for part in message["content"]:
        if part["type"] == "image":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(part["image"])}})
        else:
            parts.append({"type": "text", "text": part["text"]})
    if message["role"] == "assistant":
        return {"role": "assistant", "content": "".join(p.get("text", "") for p in parts)}
    return {"role": message["role"], "content": parts}


MIDWAY = "stopped answering midway without saying why (its log may say); ask again"


class RemoteGeneration:
    """One streamed answer from the server; the same surface as `models.Generation`.

    Leaving the loop early, `stop()` or KeyboardInterrupt closes the stream, which tells the
    server to stop generating; the partial answer is kept. A reasoning model's thinking
    (vLLM's and llama.cpp's `reasoning_content`, Ollama's `reasoning`) is not the answer: it
    is kept apart, in `.reasoning`, and streams to `on_reasoning` callbacks, so a front end can
    show that the model is thinking (no answer piece comes meanwhile, for a minute at times).
    """

    def __init__(self, model: RemoteModel, request: dict[str, Any]) -> None:
        self._model = model
        self._request = request
        self._stop = threading.Event()
        self.max_new_tokens: int = request["max_tokens"]
        self.prompt_tokens: int | None = None  # as the server counts them (its `usage`)
        self.completion_tokens: int | None = None
        self.text = ""
        self.reasoning = ""  # a reasoning model's thinking, which servers send apart
        self._reasoning_listeners = StateListeners()
        self.stopped = False
        self.done = False
        self.finish_reason: str | None = None

    def stop(self) -> None:
        self._stop.set()

    @property
    def thinking(self) -> bool:
        """Whether the model is thinking before its answer: reasoning came, no answer text yet."""
        return bool(self.reasoning) and not self.text and not self.done

    def on_reasoning(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call `callback(piece)` with each piece of the model's thinking as it streams, on the
        thread reading the answer (a front end hooks it on the chat's "start" event). Returns
        a function that unsubscribes."""
        return self._reasoning_listeners.add(callback)

    def __iter__(self) -> Iterator[str]:
        import openai

        if self.done:
            return
        stream = None
        try:
            stream = self._open()
            if stream is None:
                return  # stopped while the server was still loading
            for chunk in stream:
                if self._stop.is_set():
                    return  # the finally below keeps the partial answer
                self._count(getattr(chunk, "usage", None))
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                piece = choice.delta.content if choice.delta else None
                if thought := _thought(choice.delta):
                    self.reasoning += thought
                    self._reasoning_listeners.tell(thought)
                if piece:
                    self.text += str(piece)
                    yield str(piece)
                self.finish_reason = choice.finish_reason or self.finish_reason
            self.done = True
            if not self.text and self.reasoning and self.finish_reason is not None:
                raise self._only_thought()  # not an answer of ''
            if not (self.text or self.reasoning) and self.finish_reason is None:  # none answered
                raise self._failed(f"sent no streamed answer; {NOT_A_SERVER}")
            if self.finish_reason is None:  # llama.cpp sends an error as an `error:` line,
                raise self._failed(MIDWAY)  # which SSE clients skip: the stream just ends
        except openai.APITimeoutError:  # up, but silent: a long prompt on a busy GPU, say
            why = f"sent nothing for {self._model.timeout:g} s while answering; if it is busy, "
            raise self._failed(why + "pass a longer timeout= to ln.Model") from None
        except openai.APIConnectionError:
            raise self._failed("lost the connection while answering; check that it runs") from None
        except (openai.AuthenticationError, openai.PermissionDeniedError) as e:  # 401, 403
            why = f"refused the API key ({_message_error(e)}); pass api_key= or set OPENAI_API_KEY"
            raise self._failed(why) from None
        except openai.APIStatusError as e:
            if moved := _redirected(e.response):  # a 301-303 turned the POST into a GET
                raise self._failed(f"redirects to {moved}; use that URL") from None
            why = f"refused the question (HTTP {e.status_code}): {_message_error(e)}"
            if _context_full(e):  # the same error as a local model's, and its fix
                fix = "" if SHORTER in why else f"; {SHORTER}"
                raise self._failed(why + fix, ContextFullError) from None
            raise self._failed(why) from None
        except openai.APIError as e:  # an error event in the middle of the stream
            raise self._failed(f"failed while answering: {_message_error(e)}") from None
        except (ValueError, TypeError, AttributeError):  # an event that is not a chunk
            why = f"sent a reply that is not a chat-completions stream; {NOT_A_SERVER}"
            raise self._failed(why) from None
        finally:
            if stream is not None:
                stream.close()  # the server sees the disconnect and stops generating
            if not self.done:  # stopped, interrupted or abandoned: keep the partial answer
                self.stopped, self.done, self.finish_reason = True, True, "interrupted"

    def _count(self, usage: Any) -> None:
        """Keep the server's token counts: vLLM sends them in a last chunk of their own
        (include_usage), llama.cpp in its last chunk or one of their own."""
        prompt = getattr(usage, "prompt_tokens", None)
        completion = getattr(usage, "completion_tokens", None)
        if isinstance(prompt, int) and isinstance(completion, int):
            self.prompt_tokens, self.completion_tokens = prompt, completion

    def _out_of_context(self) -> bool:
        """Whether a "length" ending was the server's context filling up, not max_new_tokens:
        llama.cpp says "length" for both; it stopped short of max_tokens, or we set none."""
        if self.max_new_tokens >= MAX_TOKENS:
            return True
        return self.completion_tokens is not None and self.completion_tokens < self.max_new_tokens

    def _only_thought(self) -> GenerationError:
        """The error for an answer that ended with reasoning but no text, with the fix."""
        if self.finish_reason != "length":  # a reasoning parser that took it all, say
            return self._failed(
                f"ended the answer with reasoning only, no text (finish_reason "
                f"{self.finish_reason!r}); ask again, or check the server's reasoning parser"
            )
        if self._out_of_context():
            counts = (
                f" (the conversation: {self.prompt_tokens} tokens, its reasoning: "
                f"{self.completion_tokens})"
                if self.completion_tokens is not None
                else ""
            )
            why = f"ran out of context{counts} while its model was reasoning, before any answer"
            return self._failed(f"{why}; {CONTEXT_FIX}", ContextFullError)
        more = min(self.max_new_tokens * 4, MAX_TOKENS)
        return self._failed(
            f"spent all {self.max_new_tokens} tokens (max_new_tokens) on its model's reasoning, "
            f"before any answer; raise max_new_tokens, e.g. max_new_tokens={more}"
        )

    def _failed(self, why: str, kind: type[GenerationError] = GenerationError) -> GenerationError:
        """The error for an answer the server spoiled; what came before it is kept."""
        self.done = True
        return kind(f"{self._model.base_url} {why}")

    def _open(self):
        """Send the request (waiting while the server loads its model); None if stopped."""
        create = self._model.client.chat.completions.create
        return self._model.while_loading(lambda: create(**self._request), self._stop)

    def wait(self) -> str:
        for _ in self:
            pass
        return self.text


def _thought(delta: Any) -> str:
    """The reasoning in a chunk's delta: `reasoning_content` (vLLM, llama.cpp) or `reasoning`
    (Ollama, newer vLLM); extra fields, which the openai client keeps as attributes."""
    for name in ("reasoning_content", "reasoning"):
        value = getattr(delta, name, None)
        if isinstance(value, str) and value:
            return value
    return ""


def _context_full(error: Exception) -> bool:
    """A 400 for a prompt over the model's context: OpenAI's code (ours too), llama.cpp's type,
    or vLLM's message."""
    if getattr(error, "status_code", None) != 400:
        return False
    body = getattr(error, "body", None)
    body = body.get("error", body) if isinstance(body, dict) else {}
    kinds = (body.get("code"), body.get("type")) if isinstance(body, dict) else ()
    known = any(kind in ("context_length_exceeded", "exceed_context_size_error") for kind in kinds)
    return known or "maximum context length" in _message_error(error)


def _retry_after(error: Exception) -> float | None:
    """Seconds to wait after a 503 or 429: as its Retry-After header asks, else (503 only)
    RETRY_S (llama.cpp's "Loading model" sends none); None for other errors, which are not
    worth waiting on."""
    response = getattr(error, "response", None)
    status = getattr(error, "status_code", None)
    if status not in (429, 503) or response is None:
        return None
    value = response.headers.get("retry-after", "nan")
    try:
        seconds = float(value)
    except ValueError:  # RFC 9110 allows an HTTP date too: "Wed, 21 Oct 2026 07:28:00 GMT"
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):  # neither: as if it were not there
            seconds = math.nan
        else:  # HTTP dates are GMT, "-0000" (no zone) too
            when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
            seconds = (when - datetime.now(timezone.utc)).total_seconds()
    if math.isnan(seconds):  # "nan" too: a wait of NaN returns at once, over and over
        return RETRY_S if status == 503 else None
    return max(seconds, 0.1)


def _redirected(response: Any) -> str | None:
    """The base URL a 301, 302 or 303 sent a question to: httpx, as browsers, follows them
    with a GET, which the server refuses (405), so only the user can fix it."""
    history = getattr(response, "history", None) or []
    if not any(r.status_code in (301, 302, 303) for r in history):
        return None
    return str(response.url).removesuffix("/chat/completions")
