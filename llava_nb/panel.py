"""`ChatPanel`: a chat window in the notebook (an anywidget), one more view of a `Chat`.

The conversation lives in the `Chat`; the panel only draws it (traitlets synced to the front end
in `js/`, bundled into `llava_nb/static/`) and turns what the user does into `Chat` calls.
Answers are generated in a worker thread, so the kernel and other widgets stay responsive, and
the panel follows the chat through `Chat.on_change`: a question asked in a `%%llava` cell on
the same chat streams into the panel too.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import weakref
from contextlib import closing
from pathlib import Path
from typing import Any

import anywidget
import traitlets as t
from PIL import Image

from llava_nb.errors import LlavaError, first_line

STATIC = Path(__file__).parent / "static"
THUMBNAIL_PX = 256  # longest side of the thumbnails the front end shows
MAX_UPLOAD_BYTES = 8 * 1024 * 1024  # a notebook's websocket drops messages over 10 MiB
KEPT_DROPS = 16  # how many drops' refusals are kept (their files may still be arriving)
UPDATE_INTERVAL_S = 0.05  # how often a growing answer is sent to the front end
LOADING_TICK_S = 0.5  # how often the status line counts seconds while the model loads


class PanelError(LlavaError):
    """The panel cannot do what was asked (busy, nothing to regenerate, front end missing)."""


_open_panels: weakref.WeakSet[ChatPanel] = weakref.WeakSet()
_open_panels_lock = threading.Lock()  # panels open on the main thread as workers read the set


def _panels() -> list[ChatPanel]:
    with _open_panels_lock:
        return list(_open_panels)


def _show_settings(chat: Any) -> None:
    """Show every open panel on `chat` its settings, which another panel changed."""
    for panel in _panels():
        if panel.chat is chat:
            panel._sync_settings()


def _after_cell(result: Any = None) -> None:
    """IPython's post_run_cell, for what tells no one when it changes: a chat's settings (a
    plain dict: `%llava config`, `chat.settings[...] = ...`) and its model replaced
    (`chat.model = ...`)."""
    for panel in _panels():
        try:
            panel._watch_model()
            panel._sync_settings()
        except Exception:  # a chat edited into what it cannot show: no traceback after each cell
            logging.getLogger(__name__).debug("llava_nb: panel not redrawn", exc_info=True)


def _follow_cells() -> None:
    """Redraw the panels' settings (and models, if replaced) after each cell of this session."""
    from IPython import get_ipython

    shell = get_ipython()
    if shell is not None and _after_cell not in shell.events.callbacks["post_run_cell"]:
        shell.events.register("post_run_cell", _after_cell)


@functools.cache
def _front_end() -> tuple[str, str]:
    """The bundled JavaScript and CSS, built from `js/` when the package is installed."""
    try:
        return (STATIC / "panel.js").read_text(), (STATIC / "panel.css").read_text()
    except FileNotFoundError:
        raise PanelError(
            f"the chat panel's front end is not built ({STATIC / 'panel.js'} is missing); "
            "reinstall llava_nb (pip install -e . runs the build; it needs Node.js and npm)"
        ) from None


def _thumbnail(image: Image.Image) -> str:
    from llava_nb.images import image_to_data_uri

    small = image.copy()
    small.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    return image_to_data_uri(small, "JPEG")


def _common_start(old: str, new: str) -> int:
    """How many leading characters `old` and `new` share (all of `old` as pieces append)."""
    if new.startswith(old):
        return len(old)
    differ = (i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b)
    return next(differ, min(len(old), len(new)))


def _readable(error: BaseException) -> str:
    """One line for the panel: a LlavaError says it all; anything else gets its type name."""
    if isinstance(error, LlavaError):
        return str(error)
    first = first_line(error, 300)
    return first if first == type(error).__name__ else f"{type(error).__name__}: {first}"


class ChatPanel(anywidget.AnyWidget):
    """A chat window on a `Chat`: streaming Markdown answers, image attachments, Stop.

    `ChatPanel(chat)` shows an existing chat (the `%%llava` cells' chats included);
    `ChatPanel(model=...)` starts a new one. Display it as the value of a cell.
    """

    _esm = t.Unicode().tag(sync=True)
    _css = t.Unicode().tag(sync=True)

    # The front end's state. Images travel as small JPEG thumbnails; the chat keeps the originals.
    turns = t.List(t.Dict()).tag(sync=True)  # question, images, answer, interrupted
    live_question = t.Dict().tag(sync=True)  # the turn being answered: question, images; {} if none
    # the answer so far: a new view (a reload too) gets all of it in the widget's state; changes
    # go out as what changed (`_send_live`), not whole: 1.2 MB/s at 60,000 characters
    live_answer = t.Unicode("").tag(sync=True)
    attachments = t.List(t.Unicode()).tag(sync=True)  # images waiting for the next question
    busy = t.Bool(False).tag(sync=True)
    # False while a running cell reads the answer: the kernel takes the panel's Stop only once
    # the cell ends (with the answer), so Stop is greyed out and says to interrupt the kernel
    stoppable = t.Bool(True).tag(sync=True)
    # a reasoning model on a server thinks before its answer, a minute at times: said, not hung
    thinking = t.Bool(False).tag(sync=True)
    status = t.Unicode("").tag(sync=True)
    error = t.Unicode("").tag(sync=True)
    draft = t.Unicode("").tag(sync=True)  # a question that failed, given back to the input box
    temperature = t.Float(0.0).tag(sync=True)
    max_new_tokens = t.Int(512).tag(sync=True)
    max_upload_bytes = t.Int(MAX_UPLOAD_BYTES).tag(sync=True)

    def __init__(self, chat: Any = None, *, model: Any = None) -> None:
        from llava_nb.chat import Chat

        self._stopping = threading.Event()
        self._sent = ""  # the live answer as the front ends have it
        self._sending = threading.Lock()  # the worker and the kernel's thread both send it
        self._unsubscribe = self._unfollow_thinking = lambda: None  # so close() always works
        self._unwatch_model: Any = lambda: None
        self._model: Any = None  # the model whose loads and unloads the status line follows
        if chat is None:
            chat = Chat(model)
        elif model is not None:
            raise PanelError("give ChatPanel a chat or a model, not both")
        elif not isinstance(chat, Chat):
            raise PanelError(
                f"ChatPanel takes a llava_nb.Chat, got {type(chat).__name__}; "
                "use ChatPanel(chat) or ChatPanel(model='...')"
            )
        js, css = _front_end()
        super().__init__(_esm=js, _css=css)
        self.chat = chat
        self._images: list[Image.Image] = []  # attached, not sent yet
        self._refused: dict[Any, list[str]] = {}  # drop (pick, paste) id -> its refusals
        self._thumbs: dict[int, tuple[Image.Image, str]] = {}  # id -> (image, thumbnail)
        self._live = None  # the chat's `answering` (whoever asked it), shown live
        self._lock = threading.RLock()  # the chat's events and this panel's worker both sync
        self._pieces: list[str] = []  # its answer so far
        self._shown = 0.0  # when the live answer was last sent
        self._worker: threading.Thread | None = None
        self._joining = False  # opened mid-answer: until its next piece
        self._loading_since: float | None = None  # time.monotonic() when its question's load began
        with self._lock:
            self._unsubscribe = chat.on_change(self._on_chat)
            self._unfollow_thinking = chat.on_thinking(self._on_thinking)
            answering = chat.answering
            if answering is not None:  # it missed the "start" event
                self._joining, self._pieces = True, [answering.text]  # redone at its next piece
                self._live = answering
                self.thinking = bool(getattr(answering.generation, "thinking", False))
        self.on_msg(self._on_message)
        self._watch_model()
        self._sync()
        with _open_panels_lock:
            _open_panels.add(self)
        _follow_cells()

    def __repr__(self) -> str:
        return f"ChatPanel({self.chat!r})"

    def close(self) -> None:
        """Stop following the chat (and stop an answer being written), then close the widget."""
        self._stopping.set()
        self._unsubscribe()
        self._unfollow_thinking()
        self._unwatch_model()
        with _open_panels_lock:
            _open_panels.discard(self)
        super().close()

    # ------------------------------------------------------------ chat -> front end

    def _on_chat(self, event: str, turn, piece: str) -> None:
        """Follows the chat, whoever drives it (this panel's worker, a cell, Python code)."""
        if event == "piece":
            self.thinking = False
            live = self._live
            if live is not None and turn is live.turn:  # (a second question at once: not shown)
                if self._joining:  # opened mid-answer: all it has said so far, this piece too
                    self._pieces, self._joining = [live.text], False
                    self.stoppable = threading.current_thread() is not threading.main_thread()
                else:
                    self._pieces.append(piece)
                if time.monotonic() - self._shown >= UPDATE_INTERVAL_S:
                    self.live_answer = "".join(self._pieces)
                    self._shown = time.monotonic()
            return
        with self._lock:
            if event == "start":  # the chat's `answering` is this turn's, set before the event
                self._live, self._pieces, self._shown = self.chat.answering, [], 0.0
                self.stoppable = threading.current_thread() is not threading.main_thread()
            else:  # end, undo, reset
                self._live, self._joining = None, False
            self.thinking = False
            self._sync()

    def _on_thinking(self, piece: str) -> None:
        """The chat's `on_thinking`: its model thinks before the answer (no piece comes)."""
        if self._live is not None and not self._pieces:
            self.thinking = True

    def _watch_model(self) -> None:
        """Follow the chat's model as it loads and unloads, on whatever thread does it (a cell,
        a timer, another chat's panel): the status line says so at once. The chat's model may
        have been replaced (`chat.model = ...`): the new one is followed instead."""
        model = self.chat.model
        if model is not self._model:
            self._unwatch_model()
            self._model = model
            self._unwatch_model = model.on_state_change(self._on_model_state)
        self.status = self._status_text()

    def _on_model_state(self, event: str) -> None:
        """The model's `on_state_change` (held weakly: it does not keep this panel alive)."""
        self.status = self._status_text()

    def _sync(self) -> None:
        """Send the chat as it is now: its turns, the turn it is answering (if any: this panel's
        question refused meanwhile must not hide another view's; a regeneration shows in place
        of the last turn, which the chat keeps until it ends whole), its settings, the model's
        status."""
        with self._lock:
            history, answering = self.chat.history, self._live
            live = answering.turn if answering is not None else None
            if live is None:
                self._pieces = []
            elif answering.replacing:
                history = history[:-1]
            with self.hold_sync():
                self.turns = [
                    {
                        "question": turn.question,
                        "images": self._thumbs_of(turn),
                        "answer": turn.answer,
                        "interrupted": turn.interrupted,
                    }
                    for turn in history
                ]
                self.live_question = (
                    {"question": live.question, "images": self._thumbs_of(live)}
                    if live is not None
                    else {}
                )
                self.live_answer = "".join(self._pieces)
                self._sync_settings()
                self.status = self._status_text()
            shown = history if live is None else [*history, live]
            kept = {id(image) for turn in shown for image in turn.images}
            kept |= {id(image) for image in self._images}
            self._thumbs = {key: value for key, value in self._thumbs.items() if key in kept}

    def _should_send_property(self, key: str, value: Any) -> bool:
        """ipywidgets' hook: the live answer's changes go out through `_send_live` instead."""
        return key != "live_answer" and super()._should_send_property(key, value)

    @t.observe("live_answer")
    def _live_answer_changed(self, change) -> None:
        self._send_live()

    def _send_live(self, whole: bool = False) -> None:
        """Send what changed in the live answer: the front end keeps its first `offset`
        characters (UTF-16 code units) and appends `text`. Mostly an appended piece; a decode
        that rewrote the end keeps the common start; `whole`: all of it, for a view that asked
        (offset 0)."""
        with self._sending:
            text, sent = self.live_answer, "" if whole else self._sent
            offset = _common_start(sent, text)
            if whole or offset < len(sent) or offset < len(text):
                # in UTF-16 code units, as JavaScript counts (an emoji is two)
                units = len(text[:offset].encode("utf-16-le")) // 2
                self.send({"type": "live", "offset": units, "text": text[offset:]})
            self._sent = text

    def _sync_settings(self) -> None:
        with self.hold_sync():
            self.temperature = float(self.chat.settings["temperature"])
            self.max_new_tokens = int(self.chat.settings["max_new_tokens"])

    def _thumbs_of(self, turn) -> list[str]:
        return [self._thumb(image) for image in turn.images]

    def _thumb(self, image: Image.Image) -> str:
        if id(image) not in self._thumbs:  # the image is kept with it, so its id stays unique
            self._thumbs[id(image)] = (image, _thumbnail(image))
        return self._thumbs[id(image)][1]

    def _status_text(self) -> str:
        status = self.chat.model.status()
        model = str(status["model"])
        remote = status.get("family") == "remote"  # a server: its URL, in full
        if not remote and (model.startswith(("/", ".", "~")) or model.count("/") > 1):
            model = Path(model).name  # a local folder: its name is enough
        if self._loading_since is not None:  # for this panel's question: it counts the seconds
            return f"{model} · loading… {time.monotonic() - self._loading_since:.0f} s"
        if status["state"] == "loading":  # for another view's question
            return f"{model} · loading…"
        if status["state"] == "unloaded" and remote:
            return f"{model} · not connected (connects with the next question)"
        if status["state"] == "unloaded":
            return f"{model} · not loaded (loads with the next question)"
        if remote:
            return " · ".join(filter(None, [model, status.get("remote_model"), status["state"]]))
        quantization = status.get("quantization")
        parts = [
            model,
            status.get("family"),
            status.get("device"),
            status.get("dtype"),
            f"{quantization} quantization" if quantization not in (None, "none") else None,
            f"{status['state']} in {status['load_seconds']:.1f} s"
            if "load_seconds" in status
            else status["state"],
        ]
        return " · ".join(str(part) for part in parts if part)

    # ------------------------------------------------------------ front end -> chat

    def _on_message(self, _widget, content: dict, buffers: list) -> None:
        kind = content.get("type")
        try:
            if kind == "send":
                self._ask(str(content.get("text", "")))
            elif kind == "attach":
                name, refused = str(content.get("name") or "image"), content.get("refused") or []
                self._attach(buffers, name, content.get("drop"), [str(line) for line in refused])
            elif kind == "detach":
                self._detach(int(content.get("index", -1)))
            elif kind == "stop":
                self._stop()
            elif kind == "regenerate":
                self._regenerate()
            elif kind == "undo":
                self._undo()
            elif kind == "clear":
                self._clear()
            elif kind == "resync":  # a view opened mid-answer, or one that missed a change
                self._send_live(whole=True)
        except LlavaError as e:
            self.error = str(e)

    @t.observe("temperature", "max_new_tokens")
    def _setting_changed(self, change) -> None:
        from llava_nb.chat import SETTINGS
        from llava_nb.models import check_settings

        settings = {name: self.chat.settings[name] for name in SETTINGS}
        if change["new"] == settings[change["name"]]:
            return  # the chat's own value, shown (or put back after a refusal)
        settings[change["name"]] = change["new"]
        try:
            check_settings(**settings)
        except LlavaError as e:
            self.error = str(e)
            setattr(self, change["name"], change["old"])
            return
        self.chat.settings[change["name"]] = change["new"]
        self.error = ""  # accepted: an earlier refusal no longer holds
        _show_settings(self.chat)  # other panels on this chat

    def _attach(self, buffers: list, name: str, drop: Any, refused: list[str]) -> None:
        """Attach one file of a drop, pick or paste; `drop`: the id the front end gave it.

        A drop's files arrive one message each, in the order their reads finish, so another
        drop's may come in between: each drop's refusals are kept under its id and joined on the
        error line. `refused`: the front end's own (files too big to send), with the first file.
        """
        from llava_nb.images import load_image

        key = object() if drop is None else str(drop)  # no id: a drop of its own
        if key in self._refused:
            lines = self._refused[key]
            before = len(lines)
        else:  # the drop's first file
            lines = self._refused[key] = list(refused)
            before = 0
            while len(self._refused) > KEPT_DROPS:  # the oldest drop is done with
                del self._refused[next(iter(self._refused))]
        try:
            if len(buffers) != 1:
                raise PanelError(f"expected one image file, got {len(buffers)}; attach again")
            if len(buffers[0]) > self.max_upload_bytes:  # the front end's limit, any sender's
                raise PanelError(
                    f"{len(buffers[0]):,} bytes, more than the {self.max_upload_bytes:,} a "
                    "notebook connection carries; shrink it first"
                )
            image = load_image(bytes(buffers[0]))  # the same checks and limits as elsewhere
        except LlavaError as e:
            lines.append(f"{name}: {e}")
        else:
            self._images.append(image)
            self.attachments = [self._thumb(image) for image in self._images]
        if len(lines) > before:  # a refusal of this file, or the front end's with the first
            self.error = "; ".join(lines)

    def _detach(self, index: int) -> None:
        if 0 <= index < len(self._images):
            del self._images[index]
            self.attachments = [self._thumb(image) for image in self._images]

    def _clear(self) -> None:
        """New chat: the chat forgets its turns. Attached images stay, as the typed question
        does: they are the next question's, often the one the new chat is for."""
        self._check_idle()
        self.error = ""
        self.chat.reset()

    def _undo(self) -> None:
        """Forget the last question and its answer, in the chat (so in every view of it)."""
        self._check_idle()
        if self.chat.undo() is None:
            raise PanelError("there is nothing to undo; the chat has no questions yet")
        self.error = ""

    def _ask(self, text: str) -> None:
        self._check_idle()
        question = text.strip()
        if not question:
            raise PanelError("the question is empty; type a question about the image")
        images, self._images = self._images, []
        self.attachments = []
        self._start(question, images)

    def _stop(self) -> None:
        """Stop this panel's question, or the one another view of the chat asked (shown here)."""
        if self.busy:
            self._stopping.set()
        elif (answering := self.chat.answering) is not None:
            answering.generation.stop()  # ends after the current token; the chat keeps it

    def _regenerate(self) -> None:
        self._check_idle()
        history = self.chat.history
        if not history:
            raise PanelError("there is no answer to regenerate yet; ask a question first")
        self._start(history[-1].question, history[-1].images, regenerate=True)

    def _check_idle(self) -> None:
        if self.busy:
            raise PanelError("an answer is still being written; wait for it, or press Stop")

    def _start(self, question: str, images: list[Image.Image], regenerate: bool = False) -> None:
        self._stopping.clear()
        with self.hold_sync():
            self.error = self.draft = ""
            self.busy = True
            if regenerate:  # the new answer shows in place of the last turn (kept till it ends)
                self.turns = self.turns[:-1]
            self.live_question = {
                "question": question,
                "images": [self._thumb(image) for image in images],
            }
            self.live_answer = ""
        self._worker = threading.Thread(
            target=self._answer,
            args=(question, images, regenerate),
            name="llava_nb-panel",
            daemon=True,
        )
        self._worker.start()

    def _answer(self, question: str, images: list[Image.Image], regenerate: bool) -> None:
        """The worker: ask the chat, read the answer until it ends or Stop is pressed.

        The pieces reach the front end through `_on_chat`, as for any other question. If the
        question fails before its turn is recorded, the attachments and the question are given
        back; a regeneration that fails or is stopped leaves the chat its old answer.
        """
        turns = len(self.chat.history)
        error = None
        try:
            if regenerate:
                pieces = self._stream(self.chat.regenerate_stream)
            else:
                pieces = self._stream(self.chat.stream, question, images)
            with closing(pieces):  # Stop pressed while the model loaded: never started
                for _ in () if self._stopping.is_set() else pieces:
                    if self._stopping.is_set():
                        break  # closing the stream stops the model after its current token
        except Exception as e:  # any failure, OOM included, becomes a message in the panel
            error = _readable(e)
        if not regenerate and len(self.chat.history) == turns:  # it failed, or never started
            self._images = images + self._images
            self.attachments = [self._thumb(image) for image in self._images]
            self.draft = question  # to send again (failed, or stopped while loading)
        with self.hold_sync():
            self._sync()
            self.error = error or ""
            self.busy = False

    def _stream(self, start, *args):
        """`start(*args)`: `chat.stream` or `chat.regenerate_stream`, which load the model first
        if needed: the status counts the seconds."""
        if self.chat.model.loaded:
            return start(*args)
        loaded = threading.Event()
        self._loading_since = time.monotonic()

        def tick() -> None:
            while not loaded.wait(LOADING_TICK_S):
                self.status = self._status_text()

        self.status = self._status_text()
        ticker = threading.Thread(target=tick, name="llava_nb-panel-status", daemon=True)
        ticker.start()
        try:
            return start(*args)
        finally:
            loaded.set()
            ticker.join()
            self._loading_since = None
            self.status = self._status_text()  # (other panels on the model: on_state_change)
