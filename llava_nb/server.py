"""`llava-nb serve`: one LLaVA model behind an OpenAI-compatible HTTP API, and a chat page.

    llava-nb serve --model llava-hf/llava-1.5-7b-hf          # http://127.0.0.1:8000/v1

Endpoints:

- ``POST /v1/chat/completions``: OpenAI's chat-completions API. Messages mix ``text`` and
  ``image_url`` parts (data URIs; http(s) URLs and local files only when allowed), plain string
  content, ``system`` messages (folded into the first user text: LLaVA templates have no system
  role), several turns; ``stream: true`` answers with Server-Sent Events. ``max_tokens`` /
  ``max_completion_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``,
  ``stream_options.include_usage``. As in OpenAI's API, ``temperature`` defaults to 1 (send 0
  for greedy answers) and ``max_tokens`` to the rest of the context. The ``model`` field may be
  left out; a name other than the served one gets 404. What it cannot honour is refused with
  400 rather than ignored: ``n`` > 1, ``tools``, a ``response_format`` other than text,
  ``logprobs``, ``logit_bias``, ``presence_penalty`` / ``frequency_penalty``, ``modalities``
  other than text, ``audio`` (their empty or zero defaults, which SDKs may send, pass).
- ``GET /v1/models``, ``GET /v1/models/{id}``: the one model served.
- ``GET /health``: 200 once the model is loaded, 503 (with Retry-After) while it loads.
- ``GET /``: a small chat page (``llava_nb/web/index.html``).

Safe by default: it listens on loopback; remote image URLs and local paths are refused unless
``--allow-image-urls`` / ``--allowed-local-media-path DIR`` allow them, and allowed URLs that
resolve to loopback, private, link-local or reserved addresses are still refused; requests and
images have size limits (images read from URLs or files count toward the request's); each
image is checked from its header on arrival, and queued requests hold their images encoded,
only those being answered decoded; a client that disconnects stops its image fetches or its
generation.

Errors come in OpenAI's format, ``{"error": {"message", "type", "param", "code"}}``, so the
official clients raise their usual exceptions (400, 401, 404, 413, 415, 429, 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import http.client
import importlib.resources
import ipaddress
import json
import logging
import math
import re
import reprlib
import socket
import sys
import threading
import time
import traceback
import urllib.parse
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from llava_nb.errors import LlavaError
from llava_nb.images import (
    FETCH_DEADLINE_S,
    FETCH_TIMEOUT_S,
    MAX_IMAGE_BYTES,
    MAX_PIXELS,
    USER_AGENT,
    ImageError,
    data_uri_bytes,  # the halves of image_from_data_uri: base64 once, decode when answered
    decode_image,
    image_header,
)
from llava_nb.models import ContextFullError

logger = logging.getLogger("llava_nb.server")

MAX_IMAGES_PER_REQUEST = 16
# Images are decoded whole before the model shrinks them: 16 PNGs of 64 MP (a 4 MB request)
# took 8 GB. The images of one request share this budget. Only the requests being answered
# hold decoded images; queued ones hold them encoded (`_Image`).
MAX_PIXELS_PER_REQUEST = 2 * MAX_PIXELS
MAX_STOP_STRINGS = 16
MAX_REDIRECTS = 3
# Image URLs and files are read in their own few worker threads: fetching an image URL may
# take FETCH_DEADLINE_S, and 40 such requests in anyio's default pool (40 threads, which also
# starts every answer) stalled every request, admitted ones included.
IMAGE_READ_THREADS = 8
MAX_INT_DIGITS = 100  # a longer number in a request is a mistake (and slow to convert)
LOAD_RETRY_AFTER_S = 5
ROUTES = (
    "POST /v1/chat/completions, GET /v1/models, GET /v1/models/ID, GET /health and GET / "
    "(the chat page)"
)
NO_LIMIT = 1 << 30  # max_tokens when the request names none: the rest of the context
_T = TypeVar("_T")


# ---------------------------------------------------------------- errors


class ApiError(Exception):
    """An error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.type, self.param, self.code = type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _too_large(what: str, limit: int) -> ApiError:
    return ApiError(413, f"{what} is over {limit:,} bytes; send less", code="request_too_large")


def _server_error(error: BaseException) -> ApiError:
    if isinstance(error, ApiError):
        return error
    if isinstance(error, LlavaError):
        return ApiError(500, str(error), type="server_error", code="generation_failed")
    return ApiError(500, f"internal error ({type(error).__name__})", type="server_error")


# ---------------------------------------------------------------- FIFO admission


class _Busy(Exception):
    """The queue is full."""


class _Gate:
    """First come, first served: `slots` holders at once, at most `queue_limit` waiting."""

    def __init__(self, slots: int, queue_limit: int | None) -> None:
        self.slots, self.queue_limit = slots, queue_limit
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def reserve(self) -> asyncio.Future[None]:
        """A ticket that completes when a slot is its; raises `_Busy` when the queue is full."""
        ticket = asyncio.get_running_loop().create_future()
        if self.active < self.slots and not self._waiters:
            self.active += 1
            ticket.set_result(None)
        elif self.queue_limit is not None and len(self._waiters) >= self.queue_limit:
            raise _Busy
        else:
            self._waiters.append(ticket)
        return ticket

    def leave(self, ticket: asyncio.Future[None]) -> None:
        """Give back the slot a ticket holds, or stop waiting for one."""
        if ticket.done() and not ticket.cancelled():
            while self._waiters:  # hand the slot to the next in line
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    return
            self.active -= 1
        else:
            ticket.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(ticket)


# ---------------------------------------------------------------- client disconnects


class _ClientGone(Exception):
    """The client closed the connection."""


async def _while_connected(
    receive: Callable[[], Awaitable[dict]],
    work: Callable[[], Awaitable[_T]],
    on_gone: Callable[[], None],
) -> _T:
    """Run `work` until it ends or the client disconnects (then `on_gone()`, `_ClientGone`).

    The request body must have been read: after it, `receive()` only reports the disconnect.
    anyio keeps a cancelled task's frame in a reference cycle (through its CancelledError)
    until the garbage collector runs, so the job must not be reachable from one: a finished
    job is freed as its request ends.
    """
    outcome: dict[str, Any] = {}
    try:
        async with anyio.create_task_group() as group:

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                outcome["gone"] = True
                on_gone()
                group.cancel_scope.cancel()

            async def run() -> None:
                try:
                    outcome["result"] = await work()
                except Exception as e:
                    outcome["error"] = e
                except BaseException as e:  # cancelled: the job's frames, `self` in them
                    traceback.clear_frames(e.__traceback__)
                    raise
                finally:
                    group.cancel_scope.cancel()

            group.start_soon(watch)
            group.start_soon(run)
    finally:
        work = on_gone = None  # what the cancelled task's closures hold
    error = outcome.pop("error", None)
    if error is not None:
        try:
            raise error
        finally:  # the exception's traceback holds this frame: no cycle through `error`
            del error
    if "result" not in outcome:
        raise _ClientGone
    return outcome["result"]


# ---------------------------------------------------------------- stop strings


class _StopScanner:
    """Cut the answer at the first stop string; hold back text that may start one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.held = ""
        self.hit = False

    def feed(self, piece: str) -> str:
        """The text that is safe to emit now."""
        if not self.stops:
            return piece
        text = self.held + piece
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit, self.held = True, ""
            return text[: min(found)]
        keep = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), keep, -1):
                if text.endswith(stop[:k]):
                    keep = k
                    break
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


# ---------------------------------------------------------------- image sources

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _blocked(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for addresses a server must not fetch from: loopback, private, link-local, ..."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip.sixtofour is not None:
            ip = ip.sixtofour
        elif ip.teredo is not None:
            ip = ip.teredo[1]
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return (
        not ip.is_global
        or ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_reserved
        or ip.is_multicast
        or ip.is_unspecified
    )


def _public_addresses(host: str, port: int, param: str) -> list[str]:
    """Resolve `host`; refuse it when any of its addresses is internal."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise ApiError(
            400, f"cannot resolve image URL host {host!r} ({e}); check the URL", param=param
        ) from None
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    internal = [str(a) for a in addresses if _blocked(a)]
    if internal or not addresses:
        raise ApiError(
            400,
            f"image URL host {host!r} resolves to a loopback, private, link-local or reserved "
            f"address ({', '.join(internal) or 'none'}); this server does not fetch internal "
            "addresses: send the image as a data:image/...;base64 URI",
            param=param,
            code="image_url_refused",
        )
    return list(dict.fromkeys(str(a) for a in addresses))


def _split_url(url: str, param: str, base: str = "") -> urllib.parse.SplitResult:
    """`url` (joined to `base`, for a redirect) in parts; a malformed one is the client's 400."""
    try:
        return urllib.parse.urlsplit(urllib.parse.urljoin(base, url))
    except ValueError as e:  # "Invalid IPv6 URL", a bracketed host that is no IP address, ...
        where = f"image URL {base[:80]!r} redirects to" if base else "image URL"
        raise ApiError(
            400, f"{where} {url[:80]!r}, which is not a valid URL ({e})", param=param
        ) from None


class _HangUp:
    """Shuts down a request's image fetches from another thread (their sockets): at a fetch's
    deadline, since the socket timeout is per read and a host sending a byte now and then (in
    its headers or its body) would hold a worker thread for hours; and when the client leaves,
    whose fetch would hold one until that deadline."""

    def __init__(self) -> None:
        self.why = ""  # "late" or "gone", once hung up
        self._sockets: list[socket.socket] = []  # a response may outlive its connection
        self._lock = threading.Lock()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
        if self.why:  # hung up while it connected
            self(self.why)

    def __call__(self, why: str) -> None:
        with self._lock:
            self.why = self.why or why
            for sock in self._sockets:
                with contextlib.suppress(OSError):  # closed already
                    sock.shutdown(socket.SHUT_RDWR)


def _fetch_public_image(url: str, param: str, hang_up: _HangUp) -> bytes:
    """GET an http(s) image from a public address: pinned to the vetted IP, size-capped,
    within FETCH_DEADLINE_S in all; redirects to http(s) only. `hang_up("gone")` stops it
    from another thread (`_ClientGone`)."""
    deadline = time.monotonic() + FETCH_DEADLINE_S
    for _ in range(MAX_REDIRECTS + 1):
        parts = _split_url(url, param)
        https = parts.scheme.lower() == "https"
        try:
            host, port = parts.hostname, parts.port or (443 if https else 80)
        except ValueError:
            host = None
        if not host:
            raise ApiError(400, f"image URL {url[:80]!r} has no valid host", param=param)
        addresses = _public_addresses(host, port, param)
        kind = http.client.HTTPSConnection if https else http.client.HTTPConnection
        connection = kind(host, port, timeout=FETCH_TIMEOUT_S)

        def connect(_address, timeout=FETCH_TIMEOUT_S, source_address=None, _to=(addresses, port)):
            """Connect to the addresses just checked, not to a fresh lookup (DNS rebinding)."""
            error: OSError = OSError("no address")
            for address in _to[0]:
                try:
                    sock = socket.create_connection((address, _to[1]), timeout, source_address)
                except OSError as e:
                    error = e
                else:
                    hang_up.watch(sock)
                    return sock
            raise error

        connection._create_connection = connect
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        watchdog = threading.Timer(deadline - time.monotonic(), hang_up, ("late",))
        watchdog.start()
        try:
            connection.request("GET", target, headers={"User-Agent": USER_AGENT})
            if hang_up.why:  # while connecting: there was nothing to hang up yet
                raise TimeoutError
            response = connection.getresponse()
            location = response.getheader("Location")
            if response.status in (301, 302, 303, 307, 308) and location:
                target = _split_url(location, param, base=url)
                if target.scheme.lower() not in ("http", "https"):  # was fetched over http
                    raise ApiError(
                        400,
                        f"image URL {url[:80]!r} redirects to {location[:80]!r}, which is not "
                        "an http(s) URL; this server fetches http(s) images only: send the "
                        "image inline as a data:image/...;base64 URI",
                        param=param,
                        code="image_url_refused",
                    )
                url = target.geturl()
                continue
            if response.status != 200:
                raise ApiError(
                    400,
                    f"image URL {url[:80]!r} answered HTTP {response.status}; check the URL",
                    param=param,
                )
            data = response.read(MAX_IMAGE_BYTES + 1)
            if hang_up.why:  # what came before the hang-up
                raise TimeoutError
        except (OSError, http.client.HTTPException) as e:
            if hang_up.why == "gone":
                raise _ClientGone from None
            if hang_up.why:
                raise ApiError(
                    400,
                    f"image URL {url[:80]!r} took over {FETCH_DEADLINE_S} s to send; use a "
                    "faster host, or send the image inline as a data:image/...;base64 URI",
                    param=param,
                ) from None
            raise ApiError(
                400, f"cannot fetch image URL {url[:80]!r} ({e}); check the URL", param=param
            ) from None
        finally:
            watchdog.cancel()
            connection.close()
        if len(data) > MAX_IMAGE_BYTES:
            raise _too_large(f"the image at {url[:80]!r}", MAX_IMAGE_BYTES)
        return data
    raise ApiError(400, f"image URL {url[:80]!r} redirects too often", param=param)


class _Image:
    """An image of a request, kept encoded until the request is answered.

    Decoded, the images of one request may take 512 MB (MAX_PIXELS_PER_REQUEST at PIL's 4 bytes
    a pixel) and 64 requests may wait: queued ones hold only the bytes sent or read (a data
    URI's, decoded from base64 once, on arrival: 3/4 the size of its text).
    """

    def __init__(self, url: str, param: str) -> None:
        self.url: str | None = url  # until read (`_Service.read_images`)
        self.param = param
        self.inline = url[:5].lower() == "data:"
        self.encoded = b""
        self.label = ""  # names it in errors, as a load would

    def read(self, data: bytes, label: str) -> None:
        """Hold the image's bytes, and no longer its URL (a data URI's text)."""
        self.encoded, self.label, self.url = data, label, None

    def pixels(self) -> int:
        """Width x height, from the image's header (nothing decoded yet), after every check a
        load makes before decoding: an image it would refuse is refused now, not once queued."""
        with self._refusal():
            width, height = image_header(self.encoded, self.label)
        return width * height

    def decode(self) -> Image.Image:
        """The RGB pixels (in a worker thread: a big image takes a second)."""
        with self._refusal():
            return decode_image(self.encoded, self.label)

    @contextlib.contextmanager
    def _refusal(self) -> Iterator[None]:
        try:
            yield
        except ImageError as e:
            raise ApiError(400, str(e), param=self.param, code="invalid_image") from None


def _images(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The image parts of parsed messages."""
    return [part for m in messages for part in m["content"] if part["type"] == "image"]


# ---------------------------------------------------------------- one request


class _Job:
    """One chat completion: queued, generated in a worker thread, handed to the event loop."""

    def __init__(self, service: _Service, request: dict[str, Any]) -> None:
        self.service = service
        self.messages = request["messages"]
        self.settings = request["settings"]
        self.stops = request["stop"]
        self.include_usage = request["include_usage"]
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._ticket = service.admission.reserve()  # raises _Busy
        self._turn: asyncio.Future[None] | None = None
        self._events: asyncio.Queue = asyncio.Queue()
        self._released = False
        self._ended = False  # the generation ended (its last event arrived)
        self.generation: Any = None
        self.stop_hit = False  # the answer reached a stop string
        self.stop_tokens = 0  # ... with this many tokens (the worker may have made more since)
        self.stop_requested = False  # we asked the generation to stop (stop string, client gone)
        self.disconnected = False
        service.jobs.add(self)

    # -- lifecycle

    async def start(self) -> None:
        """Wait for a slot (FIFO), decode the images, wait for the model, start generating."""
        try:
            await self._ticket
            if _images(self.messages):
                await anyio.to_thread.run_sync(self._decode_images)
            if self.service.turn is not None:
                self._turn = self.service.turn.reserve()
                await self._turn
            self.generation = await anyio.to_thread.run_sync(self._generate)
        except BaseException:
            self._release()
            raise
        loop = asyncio.get_running_loop()
        threading.Thread(
            target=self._pump, args=(loop,), name="llava_nb-serve", daemon=True
        ).start()

    def _decode_images(self) -> None:
        """Only requests holding a slot hold decoded images (`max_concurrency` of them)."""
        for part in _images(self.messages):
            part["image"] = part["image"].decode()

    def _generate(self):
        try:
            return self.service.model.generate(self.messages, **self.settings)
        except ContextFullError as e:
            raise ApiError(400, str(e), param="messages", code="context_length_exceeded") from None
        except LlavaError as e:  # bad settings
            raise ApiError(400, str(e), param="messages") from None
        except Exception as e:
            if type(e).__module__.startswith("jinja2"):
                raise ApiError(
                    400,
                    f"the model's chat template refused the conversation ({e})",
                    param="messages",
                ) from None
            raise
        finally:  # the processor has read the images: their pixels go now, not when the
            self.messages.clear()  # job is collected (16 answers of 32 MP kept 2.4 GB)

    def _pump(self, loop: asyncio.AbstractEventLoop) -> None:
        """Worker thread: iterate the generation, post each piece to the event loop."""

        def post(*item: Any) -> None:
            try:
                loop.call_soon_threadsafe(self._events.put_nowait, item)
            except RuntimeError:  # the event loop is gone: the server stopped
                self.generation.stop()

        last: tuple[str, Any] = ("end", None)
        try:
            for piece in self.generation:  # each piece with the tokens it took, so far
                post("piece", (piece, len(self.generation.token_ids)))
        except BaseException as e:
            last = ("error", e)
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._last, last)

    def _last(self, event: tuple[str, Any]) -> None:
        """The generation ended: free the model for the next request, then finish the answer."""
        self._release()
        self._events.put_nowait(event)

    def _release(self) -> None:
        """Give back the turn and the slot (once), and keep a record of how it ended."""
        if self._released:
            return
        self._released = True
        self.messages.clear()  # decoded images too, if it ends before the model read them
        service = self.service
        if self._turn is not None:
            service.turn.leave(self._turn)
        service.admission.leave(self._ticket)
        service.jobs.discard(self)
        generation = self.generation
        finish = getattr(generation, "finish_reason", None)
        service.finished.append(
            {
                "id": self.id,
                "finish_reason": "stop" if self.stop_hit else finish,
                "prompt_tokens": getattr(generation, "prompt_tokens", 0),
                "completion_tokens": self._completion_tokens() if generation else 0,
                "stopped": self.stop_requested and bool(generation),
                "disconnected": self.disconnected,
            }
        )

    def abandon(self, *, disconnected: bool = False) -> None:
        """Stop generating (the client left, or the server stops)."""
        if disconnected and not self.disconnected:
            self.disconnected = True
            self.service.stats["disconnected"] += 1
        if self.generation is not None and not self._ended and not self._released:
            self.stop_requested = True
            self.generation.stop()

    # -- answers

    async def _run(self, emit: Callable[[str], Awaitable[None]]) -> tuple[str, str]:
        """Hand each piece of the answer (stop strings applied) to `emit`.

        Returns the whole answer and the finish reason."""
        scanner = _StopScanner(self.stops)
        parts: list[str] = []
        while True:
            kind, value = await self._events.get()
            if kind == "piece":
                if scanner.hit:
                    continue  # past a stop string: waiting for the worker to stop
                piece, tokens = value
                text = scanner.feed(piece)
                if scanner.hit:
                    self.stop_hit = self.stop_requested = True
                    self.stop_tokens = tokens
                    self.generation.stop()
                if text:
                    parts.append(text)
                    await emit(text)
            elif kind == "end":
                self._ended = True
                break
            else:
                self._ended = True
                raise value
        if scanner.hit:
            return "".join(parts), "stop"
        tail = scanner.flush()
        if tail:
            parts.append(tail)
            await emit(tail)
        finish = "length" if self.generation.finish_reason == "length" else "stop"
        text = "".join(parts)
        if not self.stops and self.generation.text.startswith(text):
            text = self.generation.text  # the same, decoded whole
        return text, finish

    def _completion_tokens(self) -> int:
        """Tokens of the answer, up to the one that completed a stop string if one did."""
        return self.stop_tokens if self.stop_hit else len(self.generation.token_ids)

    def usage(self) -> dict[str, int]:
        prompt = int(self.generation.prompt_tokens or 0)
        completion = self._completion_tokens()
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    async def complete(self) -> dict[str, Any]:
        """The whole answer as a chat.completion object."""
        await self.start()

        async def ignore(_text: str) -> None:
            pass

        try:
            text, finish = await self._run(ignore)
        except Exception as e:
            raise _server_error(e) from None
        self.service.stats["completed"] += 1
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.service.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": self.usage(),
            "system_fingerprint": None,
        }

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.service.name,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if self.include_usage:  # as OpenAI: null in each chunk but the last one
            chunk["usage"] = None
        return chunk

    async def stream(self, send: Callable[[str], Awaitable[None]]) -> None:
        """Send the answer as SSE data lines: role, content deltas, finish, [usage], [DONE]."""

        def dump(obj: Any) -> str:
            text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
            return text.translate(_LINE_BREAKS_ESCAPED)

        await send(dump(self.chunk({"role": "assistant", "content": ""})))

        async def emit(text: str) -> None:
            await send(dump(self.chunk({"content": text})))

        try:
            _, finish = await self._run(emit)
        except Exception as e:
            error = _server_error(e)
            if error.status >= 500:
                logger.error("generation failed: %s", e, exc_info=not isinstance(e, LlavaError))
            await send(dump(error.body()))
            await send("[DONE]")
            return
        await send(dump(self.chunk({}, finish)))
        if self.include_usage:
            usage = {**self.chunk({}), "choices": [], "usage": self.usage()}
            await send(dump(usage))
        await send("[DONE]")
        self.service.stats["completed"] += 1


# Line breaks to str.splitlines (so to httpx's iter_lines) that JSON leaves raw: in an SSE
# data line they would cut it in two for such clients. (JSON escapes those below U+0020.)
_LINE_BREAKS_ESCAPED = {c: f"\\u{c:04x}" for c in (0x85, 0x2028, 0x2029)}


class _EventStream(Response):
    """A text/event-stream response that stops the generation when the client disconnects."""

    def __init__(self, job: _Job) -> None:
        self.job = job
        self.status_code = 200
        self.background = None
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})

        async def send_data(data: str) -> None:
            body = f"data: {data}\n\n".encode()
            await send({"type": "http.response.body", "body": body, "more_body": True})

        job = self.job
        try:
            await _while_connected(
                receive, lambda: job.stream(send_data), lambda: job.abandon(disconnected=True)
            )
        except _ClientGone:
            return
        finally:
            job.abandon()  # a no-op once the answer is complete
        await send({"type": "http.response.body", "body": b"", "more_body": False})


# ---------------------------------------------------------------- the service


class _Service:
    """What the routes share: the model, its loading state, the queue, counters."""

    def __init__(
        self,
        model: Any,
        *,
        api_key: str | None,
        max_concurrency: int,
        max_queue: int,
        allow_image_urls: bool,
        allowed_local_media_path: str | None,
        max_request_bytes: int,
    ) -> None:
        from llava_nb.models import Model

        if not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise LlavaError(f"max_concurrency must be a positive integer, got {max_concurrency!r}")
        if not isinstance(max_queue, int) or max_queue < 0:
            raise LlavaError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        self.model = model
        self.name = str(model.model_id)
        self.api_key = api_key or None
        self.allow_image_urls = allow_image_urls
        self.media_root: Path | None = None
        if allowed_local_media_path is not None:
            root = Path(allowed_local_media_path).expanduser()
            if not root.is_dir():
                raise LlavaError(
                    f"--allowed-local-media-path {allowed_local_media_path!r} is not a folder; "
                    "name an existing folder"
                )
            self.media_root = root.resolve()
        self.max_request_bytes = max_request_bytes
        self.image_threads = anyio.CapacityLimiter(IMAGE_READ_THREADS)
        self.admission = _Gate(max_concurrency, max_queue)
        # A local Model generates one at a time (its lock); this FIFO turn keeps that order fair.
        self.turn = _Gate(1, None) if isinstance(model, Model) else None
        self.jobs: set[_Job] = set()
        self.finished: deque[dict[str, Any]] = deque(maxlen=256)
        self.stats: Counter[str] = Counter()
        self.created = int(time.time())
        self.load_error: BaseException | None = None
        self.on_load_error: Callable[[BaseException], None] = self._log_load_error
        self._loader: threading.Thread | None = None

    # -- loading

    def start_loading(self) -> None:
        """Load the weights in the background, so the first request does not pay for it."""
        if self.model.loaded or (self._loader is not None and self._loader.is_alive()):
            return

        def load() -> None:
            try:
                self.model.load()
            except BaseException as e:
                self.load_error = e
                self.on_load_error(e)

        self._loader = threading.Thread(target=load, name="llava_nb-load", daemon=True)
        self._loader.start()

    def _log_load_error(self, error: BaseException) -> None:
        logger.error("llava_nb: cannot load %s: %s", self.name, error)

    def state(self) -> str:
        if self.model.loaded:
            return "ok"
        if self.load_error is not None:
            return "error"
        if self._loader is None or not self._loader.is_alive():
            return "unloaded"  # unloaded by the notebook serving it: loads with the next request
        return "loading"

    def check_ready(self) -> None:
        state = self.state()
        if state == "ok":
            return
        if state == "error":
            raise ApiError(
                503,
                f"the model failed to load ({self.load_error}); see the server log",
                type="server_error",
                code="model_load_failed",
            )
        self.start_loading()
        raise ApiError(
            503,
            f"the model {self.name} is loading; retry in a few seconds",
            type="server_error",
            code="model_loading",
            headers={"Retry-After": str(LOAD_RETRY_AFTER_S)},
        )

    def shutdown(self) -> None:
        for job in list(self.jobs):
            job.abandon()

    # -- requests

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization")
        headers = {"WWW-Authenticate": "Bearer"}
        if not header:
            raise ApiError(
                401,
                "missing API key: this server needs 'Authorization: Bearer KEY' "
                "(the key it was started with, --api-key)",
                code="invalid_api_key",
                headers=headers,
            )
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        ):
            raise ApiError(
                401,
                "incorrect API key; use the key the server was started with (--api-key)",
                code="invalid_api_key",
                headers=headers,
            )

    def parse(self, body: bytes) -> dict[str, Any]:
        """Check a chat-completions request (in a worker thread). Its images are not read yet:
        `read_images` reads and checks them, `_Job` decodes them."""
        try:
            payload = json.loads(body.decode("utf-8-sig"), parse_int=_json_int)
        except UnicodeDecodeError:
            raise ApiError(
                400, "the request body is not valid UTF-8 JSON; send JSON encoded as UTF-8"
            ) from None
        except RecursionError:
            raise ApiError(
                400, "the request body nests JSON too deeply; send a flatter JSON object"
            ) from None
        except ValueError as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(payload, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = payload.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(
                400, f"model must be a string (the served model is {self.name!r})", param="model"
            )
        if model and model != self.name:
            raise ApiError(
                404,
                f"the model {_shown(model)} does not exist; this server serves {self.name!r}",
                param="model",
                code="model_not_found",
            )
        n = payload.get("n")
        if n not in (None, 1):
            raise ApiError(400, "n must be 1: one answer per request", param="n")
        _refuse_unsupported(payload)
        stream = payload.get("stream") or False
        if not isinstance(stream, bool):
            raise ApiError(400, "stream must be true or false", param="stream")
        options = payload.get("stream_options") or {}
        if not isinstance(options, dict):
            raise ApiError(400, "stream_options must be an object", param="stream_options")
        if options and not stream:
            raise ApiError(
                400, "stream_options is only allowed with stream: true", param="stream_options"
            )
        return {
            "stream": stream,
            "include_usage": bool(options.get("include_usage")),
            "settings": _settings(payload),
            "stop": _stops(payload.get("stop")),
            "messages": self._messages(payload.get("messages")),
        }

    def _messages(self, raw: Any) -> list[dict[str, Any]]:
        """OpenAI messages to the processor's chat format (images as `_Image`, not read yet)."""
        if not isinstance(raw, list) or not raw:
            raise ApiError(400, "messages must be a non-empty list", param="messages")
        system: list[str] = []
        out: list[dict[str, Any]] = []
        images = [0]  # how many so far
        for i, message in enumerate(raw):
            param = f"messages[{i}]"
            if not isinstance(message, dict):
                raise ApiError(400, f"{param} must be an object", param=param)
            role = message.get("role")
            content = message.get("content")
            if role in ("system", "developer"):
                text = _text_only(content, f"{param}.content")
                if text.strip():  # apps send "" for no system prompt: it must change nothing
                    system.append(text)
                continue
            if role == "assistant":
                text = _text_only(content, f"{param}.content", assistant=True)
                parts = [{"type": "text", "text": text}]
            elif role == "user":
                parts = self._user_parts(content, f"{param}.content", images)
            else:
                raise ApiError(
                    400,
                    f"{param}: role {_shown(role)} is not supported; use system, user or assistant",
                    param=f"{param}.role",
                )
            if out and out[-1]["role"] == role:  # LLaVA templates expect turns to alternate
                out[-1]["content"].extend(parts)
            else:
                out.append({"role": role, "content": parts})
        if not out or out[-1]["role"] != "user":
            raise ApiError(400, "the last message must be from the user", param="messages")
        if system:
            first = next(m for m in out if m["role"] == "user")["content"]
            prefix = "\n\n".join(system)
            texts = [p for p in first if p["type"] == "text"]
            if texts:
                texts[0]["text"] = f"{prefix}\n\n{texts[0]['text']}"
            else:
                first.append({"type": "text", "text": prefix})
        return out

    def _user_parts(self, content: Any, param: str, images: list[int]) -> list[dict[str, Any]]:
        if isinstance(content, str):
            return [{"type": "text", "text": _checked_text(content, param)}]
        if not isinstance(content, list) or not content:
            raise ApiError(
                400, f"{param} must be a string or a non-empty list of parts", param=param
            )
        parts = []
        for j, part in enumerate(content):
            where = f"{param}[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": _checked_text(part.get("text"), where)})
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str) or not url:
                    raise ApiError(
                        400, f"{where}.image_url.url must be a non-empty string", param=where
                    )
                images[0] += 1
                if images[0] > MAX_IMAGES_PER_REQUEST:
                    raise ApiError(
                        400,
                        f"more than {MAX_IMAGES_PER_REQUEST} images in one request; send fewer",
                        param=where,
                    )
                parts.append({"type": "image", "image": _Image(url, f"{where}.image_url")})
            else:
                raise ApiError(
                    400,
                    f"{where}: part type {_shown(kind)} is not supported; "
                    "use 'text' or 'image_url'",
                    param=where,
                )
        return parts

    def read_images(self, images: list[_Image], hang_up: _HangUp) -> None:
        """Read, fetch or base64-decode each image (in a worker thread) and check the request's
        budgets: its pixels, from the headers, and the bytes read or fetched, which count as
        sent. `hang_up("gone")` stops it (`_ClientGone`)."""
        pixels, read = 0, 0
        for image in images:
            if hang_up.why == "gone":
                raise _ClientGone
            image.read(*self._read(image.url, image.param, hang_up))
            if not image.inline:
                read += len(image.encoded)
                if read > self.max_request_bytes:
                    raise _too_large("the request with the images it names", self.max_request_bytes)
            pixels += image.pixels()
            if pixels > MAX_PIXELS_PER_REQUEST:
                raise ApiError(
                    400,
                    f"the images in one request are over {MAX_PIXELS_PER_REQUEST // 10**6} "
                    "megapixels together; downscale them or send fewer",
                    param=image.param,
                    code="image_too_large",
                )

    def _read(self, url: str, param: str, hang_up: _HangUp) -> tuple[bytes, str]:
        """The bytes of a data URI, an image URL or a file, and how errors name it."""
        if url[:5].lower() == "data:":
            if (len(url) - url.find(",")) * 3 // 4 > MAX_IMAGE_BYTES:
                raise _too_large("the image", MAX_IMAGE_BYTES)
            try:
                return data_uri_bytes(url)
            except ImageError as e:
                raise ApiError(400, str(e), param=param, code="invalid_image") from None
        if re.match(r"(?i)https?://", url):
            if not self.allow_image_urls:
                raise ApiError(
                    400,
                    "image URLs are refused: this server fetches none unless started with "
                    "--allow-image-urls; send the image inline as a data:image/...;base64 URI",
                    param=param,
                    code="image_url_refused",
                )
            return _fetch_public_image(url, param, hang_up), f"image URL {url[:80]!r}"
        if re.match(r"(?i)file:", url) or not re.match(r"[a-zA-Z][\w+.-]*:", url):
            return self._local_image(url, param), f"image file {url[:80]!r}"
        raise ApiError(
            400,
            f"image URL {url[:40]!r} has an unsupported scheme; use a data:image/...;base64 URI",
            param=param,
        )

    def _local_image(self, source: str, param: str) -> bytes:
        if self.media_root is None:
            raise ApiError(
                400,
                "local image paths are refused: this server reads no files unless started "
                "with --allowed-local-media-path DIR; send the image inline as a "
                "data:image/...;base64 URI",
                param=param,
                code="local_path_refused",
            )
        path = source
        if source[:5].lower() == "file:":
            parts = urllib.parse.urlsplit(source)
            if parts.netloc not in ("", "localhost"):
                raise ApiError(400, f"file URL {source[:80]!r} names another host", param=param)
            path = urllib.parse.unquote(parts.path)
        try:
            resolved = (self.media_root / path).resolve()  # symlinks resolved
        except (OSError, RuntimeError, ValueError) as e:
            raise ApiError(400, f"bad image path {source[:80]!r} ({e})", param=param) from None
        if not resolved.is_relative_to(self.media_root):
            raise ApiError(
                400,
                f"image path {source[:80]!r} is outside the folder this server may read "
                f"(--allowed-local-media-path {self.media_root})",
                param=param,
                code="local_path_refused",
            )
        try:
            if resolved.is_dir():
                raise ApiError(
                    400,
                    f"image path {source[:80]!r} is a folder; name an image file in it",
                    param=param,
                    code="invalid_image",
                )
            if not resolved.is_file():
                raise ApiError(
                    400, f"image file {source[:80]!r} not found", param=param, code="invalid_image"
                )
            if resolved.stat().st_size > MAX_IMAGE_BYTES:
                raise _too_large(f"image file {source[:80]!r}", MAX_IMAGE_BYTES)
            data = resolved.read_bytes()
        except OSError as e:  # a name too long, no permission, ...
            raise ApiError(
                400,
                f"cannot read image file {source[:80]!r} ({e.strerror or e}); check the path",
                param=param,
                code="invalid_image",
            ) from None
        return data


# Fields of OpenAI's API this server cannot honour, what each may be without asking for
# anything (SDKs send some by default), and why the rest is refused.
_UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "tools": ((None, []), "this server's model does not call tools"),
    "functions": ((None, []), "this server's model does not call functions"),
    "tool_choice": ((None, "none", "auto"), "this server's model does not call tools"),
    "function_call": ((None, "none", "auto"), "this server's model does not call functions"),
    "response_format": ((None, {"type": "text"}), "answers are plain text"),
    "logprobs": ((None, False), "this server does not return log probabilities"),
    "top_logprobs": ((None, 0), "this server does not return log probabilities"),
    "logit_bias": ((None, {}), "this server does not bias tokens"),
    "presence_penalty": ((None, 0), "this server does not penalize repeated tokens"),
    "frequency_penalty": ((None, 0), "this server does not penalize repeated tokens"),
    "modalities": ((None, ["text"]), "answers are text only"),
    "audio": ((None,), "answers are text only"),
}


def _refuse_unsupported(payload: dict[str, Any]) -> None:
    """A request that asks for what the server cannot do gets 400, not a silent 200."""
    for name, (harmless, why) in _UNSUPPORTED.items():
        value = payload.get(name)
        if value not in harmless:
            raise ApiError(
                400,
                f"{name} is not supported ({why}); leave it out",
                param=name,
                code="unsupported_parameter",
            )


def _json_int(text: str) -> int:
    """json's parse_int, refusing numbers too long to mean anything (int() would say worse)."""
    if len(text) > MAX_INT_DIGITS:
        raise ApiError(
            400,
            f"a number in the request is too long (over {MAX_INT_DIGITS} digits); send a "
            "shorter one",
        )
    return int(text)


def _shown(value: Any) -> str:
    """A short repr of a client's value for an error message (bounded size and depth)."""
    return reprlib.repr(value)


def _checked_text(text: Any, param: str) -> str:
    if not isinstance(text, str):
        raise ApiError(400, f"{param} text must be a string", param=param)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"{param} is not valid Unicode (lone surrogate)", param=param) from None
    return text


def _text_only(content: Any, param: str, *, assistant: bool = False) -> str:
    """A system or assistant message's text (a string, or a list of text parts).

    An assistant's content may also be null, or hold refusal parts (OpenAI's API allows both,
    and a client replays its answers as they came)."""
    if content is None and assistant:
        return ""
    if isinstance(content, str):
        return _checked_text(content, param)
    if isinstance(content, list):
        kinds = ("text", "refusal") if assistant else ("text",)  # each part's text is part[kind]
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in kinds:
                allowed = " and ".join(map(repr, kinds))
                raise ApiError(
                    400,
                    f"{param}[{j}]: only {allowed} parts are allowed here",
                    param=f"{param}[{j}]",
                )
            texts.append(_checked_text(part.get(kind), f"{param}[{j}]"))
        return "\n".join(texts)
    raise ApiError(400, f"{param} must be a string or a list of text parts", param=param)


def _number(payload: dict, name: str, default: float, low: float, high: float) -> float:
    value = payload.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ApiError(400, f"{name} must be a number, got {_shown(value)}", param=name)
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be in [{low}, {high}], got {value!r}", param=name)
    return value


def _settings(payload: dict[str, Any]) -> dict[str, Any]:
    """max_tokens, temperature, top_p and seed as `Model.generate` takes them."""
    name = "max_completion_tokens" if payload.get("max_completion_tokens") is not None else None
    name = name or "max_tokens"
    max_tokens = payload.get(name)
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise ApiError(
            400, f"{name} must be a positive integer, got {_shown(max_tokens)}", param=name
        )
    temperature = _number(payload, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(payload, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise ApiError(400, "top_p must be above 0", param="top_p")
    seed = payload.get("seed")
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64
    ):
        raise ApiError(400, f"seed must be a 64-bit integer, got {_shown(seed)}", param="seed")
    return {
        "max_new_tokens": min(max_tokens or NO_LIMIT, NO_LIMIT),
        "temperature": float(temperature),
        "top_p": float(top_p),
        "seed": seed,
    }


def _stops(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stops, list)
        or not all(isinstance(s, str) and s for s in stops)
        or len(stops) > MAX_STOP_STRINGS
    ):
        raise ApiError(
            400,
            f"stop must be a non-empty string or a list of up to {MAX_STOP_STRINGS} of them",
            param="stop",
        )
    return stops


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ApiError(400, "bad Content-Length header")
        if int(length) > limit:
            raise _too_large("the request", limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large("the request", limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _is_loopback_name(host: str) -> bool:
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _LoopbackHostsOnly:
    """Refuse requests whose Host header is not a loopback name (DNS rebinding guard)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            name = host.rpartition(":")[0] if re.search(r":\d+$", host) else host
            if not _is_loopback_name(name):
                error = ApiError(
                    421,
                    f"this server listens on loopback only and does not answer for host "
                    f"{host[:60]!r}; use http://127.0.0.1 or http://localhost",
                    code="misdirected_request",
                )
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Unexpected:
    """Answer an unexpected error with a 500 in OpenAI's format and keep the connection open.

    (Starlette's own last-resort handler answers, then re-raises, and uvicorn closes the
    connection.) Errors after the response started are left to the server.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        started = False

        async def watch(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as e:
            if started or scope["type"] != "http":
                raise
            logger.exception("llava_nb: unexpected error in %s %s", scope["method"], scope["path"])
            await _server_error(e).response()(scope, receive, send)


# ---------------------------------------------------------------- the app


def create_app(
    model,
    *,
    api_key: str | None = None,
    max_concurrency: int = 1,
    max_queue: int = 64,
    allow_image_urls: bool = False,
    allowed_local_media_path: str | None = None,
    max_request_bytes: int = 64 * 1024 * 1024,
    loopback_hosts_only: bool = False,
) -> FastAPI:
    """The FastAPI app serving `model` (a `llava_nb.models.Model`, loaded in the background).

    Requests are answered first come, first served: `max_concurrency` at once, up to
    `max_queue` more waiting, and 429 beyond that. A local `Model` still generates one answer
    at a time (its lock; the answers wait their turn in order), so `max_concurrency` > 1 only
    lets more requests hold a slot, it does not make generation parallel.

    `api_key`: clients must send "Authorization: Bearer KEY" to /v1/* (the page at / and
    /health stay open). `allow_image_urls`: fetch http(s) image URLs, never from internal
    addresses. `allowed_local_media_path`: read image files (file:// URLs or plain paths)
    inside this folder, symlinks resolved. `max_request_bytes`: larger bodies get 413, and so
    do requests whose image URLs and files come to more.
    `loopback_hosts_only`: answer only Host headers naming loopback (what `run_server` sets
    when it listens on loopback, against DNS rebinding).

    `app.state.llava` holds the queue, counters (`stats`) and the last requests (`finished`).
    """
    service = _Service(
        model,
        api_key=api_key,
        max_concurrency=max_concurrency,
        max_queue=max_queue,
        allow_image_urls=allow_image_urls,
        allowed_local_media_path=allowed_local_media_path,
        max_request_bytes=max_request_bytes,
    )
    page = importlib.resources.files("llava_nb").joinpath("web/index.html").read_text("utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        service.start_loading()
        yield
        service.shutdown()

    app = FastAPI(
        title="llava_nb",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        redirect_slashes=False,  # a 307 on POST is followed by few clients: say what is wrong
    )
    app.state.llava = service

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        where = f"{request.method} {request.url.path}"
        code = None
        if request.url.path.startswith("/v1"):  # the API's paths are for key holders only
            try:
                service.check_key(request)
            except ApiError as refused:
                return refused.response()
        if error.status_code == 404:
            message, code = f"no route {where}; this server has {ROUTES}", "not_found"
        elif error.status_code == 405:
            allowed = (error.headers or {}).get("Allow", "")
            message = f"{where} is not allowed; use {allowed} for {request.url.path}"
        else:
            message = str(error.detail)
        return ApiError(error.status_code, message, code=code, headers=error.headers).response()

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(
            page,
            headers={
                "Content-Security-Policy": (
                    "default-src 'self'; img-src 'self' data: blob:; "
                    "style-src 'unsafe-inline'; script-src 'unsafe-inline'"
                ),
                "X-Content-Type-Options": "nosniff",
                "Cache-Control": "no-cache",
            },
        )

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> JSONResponse:
        state = service.state()
        status = service.model.status()
        body = {
            "status": state,
            "model": service.name,
            "device": status.get("device"),
            "dtype": status.get("dtype"),
            "quantization": status.get("quantization"),
            "active": service.admission.active,
            "queued": service.admission.waiting,
            "requests": service.stats["requests"],
        }
        if state == "error":
            body["error"] = str(service.load_error)
        headers = {"Retry-After": str(LOAD_RETRY_AFTER_S)} if state == "loading" else None
        return JSONResponse(body, status_code=200 if state == "ok" else 503, headers=headers)

    def model_card() -> dict[str, Any]:
        return {
            "id": service.name,
            "object": "model",
            "created": service.created,
            "owned_by": "llava_nb",
        }

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models(request: Request) -> dict[str, Any]:
        service.check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.api_route("/v1/models/{model_id:path}", methods=["GET", "HEAD"])
    async def model_info(model_id: str, request: Request) -> dict[str, Any]:
        service.check_key(request)
        if model_id != service.name:
            raise ApiError(
                404,
                f"the model {_shown(model_id)} does not exist; this server serves {service.name!r}",
                param="model",
                code="model_not_found",
            )
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        service.check_key(request)
        service.stats["requests"] += 1
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            raise ApiError(
                415,
                "send the request as JSON, with the header 'Content-Type: application/json'",
                code="unsupported_media_type",
            )
        encoding = request.headers.get("content-encoding", "").strip().lower() or "identity"
        if encoding != "identity":
            raise ApiError(
                415,
                f"Content-Encoding {encoding[:20]!r} is not supported; send the body uncompressed",
                code="unsupported_media_type",
            )
        try:
            body = await _read_body(request, service.max_request_bytes)
        except ClientDisconnect:  # gone before it finished sending the question
            return Response(status_code=499)
        service.check_ready()
        parsed = await anyio.to_thread.run_sync(service.parse, body)
        del body  # a queued request holds its parsed form only
        images = [part["image"] for part in _images(parsed["messages"])]
        if images:  # URLs and files in the image threads, which requests wait for
            reads = not all(image.inline for image in images)
            limiter = service.image_threads if reads else None
            hang_up = _HangUp()  # a client gone frees its image thread at once

            async def read() -> None:
                await anyio.to_thread.run_sync(
                    service.read_images, images, hang_up, limiter=limiter
                )

            try:
                await _while_connected(request.receive, read, lambda: hang_up("gone"))
            except _ClientGone:
                return Response(status_code=499)
            del images
        try:
            job = _Job(service, parsed)
        except _Busy:
            service.stats["rejected"] += 1
            raise ApiError(
                429,
                f"the server is busy ({service.admission.active} answering, "
                f"{service.admission.waiting} waiting); retry shortly",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            ) from None

        def gone() -> None:
            job.abandon(disconnected=True)

        try:
            if parsed["stream"]:
                await _while_connected(request.receive, job.start, gone)
                return _EventStream(job)
            result = await _while_connected(request.receive, job.complete, gone)
        except _ClientGone:
            return Response(status_code=499)  # nobody is listening
        except ApiError as e:
            if e.status >= 500:
                service.stats["failed"] += 1
            raise
        return JSONResponse(result)

    app.add_middleware(_Unexpected)
    if loopback_hosts_only:
        app.add_middleware(_LoopbackHostsOnly)
    return app


# ---------------------------------------------------------------- running it


def _listen(host: str, port: int) -> socket.socket:
    """Bind now, so a busy port is a one-line error rather than a traceback."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise LlavaError(f"cannot listen on {host}:{port} ({e}); check --host") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        why = e.strerror or e
        raise LlavaError(f"cannot listen on {host}:{port} ({why}); choose another --port") from None
    sock.set_inheritable(True)
    return sock


@contextlib.contextmanager
def serving(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` in a background thread while the block runs; yield its base URL.

    For a notebook that shares its model over HTTP, and for tests and benchmarks; port 0 picks
    a free port. The server stops (and its thread ends) when the block exits.
    """
    import uvicorn

    sock = _listen(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="llava_nb-serve", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise LlavaError(f"the server on {host}:{port} did not start; see the log above")
        time.sleep(0.01)
    shown = f"[{host}]" if ":" in host else host
    try:
        yield f"http://{shown}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def run_server(
    model: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    quantization: str = "auto",
    device: str | None = None,
    max_concurrency: int = 1,
    allow_image_urls: bool = False,
    allowed_local_media_path: str | None = None,
) -> None:
    """Serve `model` on host:port until interrupted (Ctrl-C). Loads the weights in the
    background; /health says when they are ready. A model that cannot load stops the server
    (`LlavaError`): it could never answer."""
    import uvicorn

    from llava_nb.models import Model, default_model_id
    from llava_nb.remote import is_remote

    model_id = str(model or default_model_id())
    if is_remote(model_id):
        raise LlavaError(
            f"'{model_id}' is a server URL; llava-nb serve serves a hub id or a local checkpoint"
        )
    loopback = _is_loopback_name(host)
    app = create_app(
        Model(model_id, quantization=quantization, device=device),
        api_key=api_key,
        max_concurrency=max_concurrency,
        allow_image_urls=allow_image_urls,
        allowed_local_media_path=allowed_local_media_path,
        loopback_hosts_only=loopback,
    )
    sock = _listen(host, port)
    shown = f"[{host}]" if ":" in host else host
    print(
        f"llava_nb: serving {model_id} at http://{shown}:{port}/v1 "
        f"(chat page: http://{shown}:{port}/)",
        flush=True,
    )
    if not loopback and not api_key:
        print(
            f"llava_nb: warning: listening on {host} without --api-key: anyone who can reach "
            "this machine can use the model",
            file=sys.stderr,
            flush=True,
        )
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5))
    service = app.state.llava

    def stop(_error: BaseException) -> None:  # a server that can never answer should not run
        server.should_exit = True

    service.on_load_error = stop
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if service.load_error is not None:
        raise LlavaError(f"cannot load {model_id}: {service.load_error}")
