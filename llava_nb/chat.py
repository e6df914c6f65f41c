"""`Chat`: one conversation (its turns, images and settings) and the model that answers it."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from llava_nb.errors import LlavaError, first_line
from llava_nb.images import image_from_data_uri, image_to_data_uri, load_image
from llava_nb.models import Model, check_settings, get_model

FILE_FORMAT = "llava_nb.chat"
FILE_VERSION = 1
SETTINGS = ("max_new_tokens", "temperature", "top_p", "seed")


class ChatFileError(LlavaError):
    """A saved chat could not be read or written."""


@dataclass
class Turn:
    """A question (with the images it brought) and the answer it got."""

    question: str
    images: list[Image.Image] = field(default_factory=list)
    answer: str = ""
    interrupted: bool = False  # the answer was stopped before it ended


def same_turns(a: list[Turn], b: list[Turn]) -> bool:
    """Whether two conversations hold what a chat file keeps alike (images by their pixels):
    opening a file over a chat that equals it loses nothing."""

    def kept(turns: list[Turn]) -> list[tuple]:
        return [
            (t.question, t.answer, t.interrupted, [(i.size, i.tobytes()) for i in t.images])
            for t in turns
        ]

    return kept(a) == kept(b)


@dataclass
class Answering:
    """What a chat is answering now (`Chat.answering`), for a view that opens mid-answer."""

    turn: Turn  # the chat's own turn, as its on_change events pass it; its answer comes at "end"
    generation: Any  # the model's generation: `generation.stop()` ends it after the current token;
    # a server's streams its model's thinking to `generation.on_reasoning` (no pieces meanwhile)
    text: str = ""  # the answer so far: every piece handed out, the one being handed out included
    replacing: bool = False  # a regeneration: the chat's last turn stays until it ends whole


class Answer(str):
    """An answer: a plain `str` (notebooks render it as Markdown) that can carry `.attention`,
    the `AttentionMap` of where it looked (asked with attention=True; None otherwise)."""

    attention: Any = None

    def __new__(cls, text: str = "", attention: Any = None) -> Answer:
        answer = super().__new__(cls, text)
        answer.attention = attention
        return answer

    def _repr_markdown_(self) -> str:
        return str(self)

    def _repr_pretty_(self, printer, cycle: bool) -> None:  # a terminal shows the text, unquoted
        printer.text(str(self))


class Chat:
    """A multi-turn conversation about images.

    Images given in earlier turns stay in the context of later ones. The prompt is built by
    the checkpoint's own chat template (through its processor), never by hand.
    """

    def __init__(
        self,
        model: Model | str | None = None,
        *,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> None:
        self.settings: dict[str, Any] = check_settings(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
        )
        self.model = get_model(model)
        self._turns: list[Turn] = []
        self.adapter: str | None = None  # a fine-tuned adapter folder (use_adapter), or the base
        self._attention: Any = None  # the AttentionMap of the last answer asked with attention
        self._listeners: list[Callable[[str, Turn | None, str], None]] = []
        self._answering: weakref.ref | None = None  # the answer being read, while it is
        self._under_way: Answering | None = None  # what `answering` returns
        self._asking = threading.Lock()  # held while a question is set up (model load included)

    def __repr__(self) -> str:
        return f"Chat(model={self.model.model_id!r}, turns={len(self._turns)})"

    @property
    def history(self) -> list[Turn]:
        """The turns so far, oldest first: copies, so editing them leaves the chat as it is
        (change it with ask, undo, reset). The images are the chat's own, shared, not copied
        each call: edit one in place (`thumbnail`, `paste`) on a `.copy()`."""
        return [replace(turn, images=list(turn.images)) for turn in self._turns]

    @property
    def answering(self) -> Answering | None:
        """The question being answered now (its turn, generation and text so far), or None.

        Set when the answer's first piece is asked for and cleared before its "end" event, so a
        view made meanwhile (which missed "start") can show it and stop it."""
        return self._under_way

    def on_change(self, callback: Callable[[str, Turn | None, str], None]) -> Callable[[], None]:
        """Call `callback(event, turn, piece)` whenever the conversation changes, so several views
        (cells, a panel) can show one chat. Events: "start" (a question is being answered),
        "piece" (`piece` of its answer), "end" (it ended; recorded unless it failed), "undo",
        "reset". Called on the thread that changed the chat. Returns a function that unsubscribes.
        """
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None

    def on_thinking(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call `callback(piece)` with each piece of a reasoning model's thinking (on a server)
        as it streams, for every answer: no answer piece comes meanwhile, for a minute at
        times, and a view should show that the model is not hung. Returns a function that
        unsubscribes."""
        hooked: list[Callable[[], None]] = []

        def unhook() -> None:
            while hooked:
                hooked.pop()()

        def follow(event: str, turn: Turn | None, piece: str) -> None:
            generation = getattr(self.answering, "generation", None)
            if event == "start" and hasattr(generation, "on_reasoning"):
                hooked.append(generation.on_reasoning(callback))
            elif event == "end":
                unhook()

        unfollow = self.on_change(follow)
        follow("start", None, "")  # an answer under way: its thinking from now on

        def unsubscribe() -> None:
            unfollow()
            unhook()

        return unsubscribe

    def _notify(self, event: str, turn: Turn | None = None, piece: str = "") -> None:
        for callback in list(self._listeners):
            try:
                callback(event, turn, piece)
            except Exception:  # a broken view must not break the conversation
                logging.getLogger(__name__).exception("llava_nb: a chat listener failed")

    def messages(self, question: str | None = None, images: list[Image.Image] = ()) -> list[dict]:
        """The conversation in the processor's chat format, optionally with a new question."""
        asking = Turn(question, list(images)) if question is not None else None
        return _as_messages(self._turns, asking)

    def stream(
        self, question: str, image: Any = None, *, attention: bool = False, **settings: Any
    ) -> Iterator[str]:
        """Ask a question and yield the answer in pieces as they are generated.

        `image` is one image or a list (path, URL, bytes, PIL, array, tensor). Stopping early
        (KeyboardInterrupt, or leaving the loop) keeps the partial answer, marked interrupted.
        `attention=True` records where the answer looked: `ln.last_attention()` once it ends.
        """
        with self._idle("ask"):
            return self._start(question, image, attention, settings)

    def _start(
        self, question: str, image: Any, attention: bool, settings: dict[str, Any]
    ) -> Iterator[str]:
        if not isinstance(question, str):
            raise LlavaError(f"the question must be text (a str), not {type(question).__name__}")
        question = question.strip()
        if not question:
            raise LlavaError("the question is empty; write a question about the image")
        _check_names(settings)  # before images are fetched
        sources = image if isinstance(image, list | tuple) else [] if image is None else [image]
        images = [load_image(source) for source in sources]
        return self._answer(self._turns, Turn(question, images), attention, settings)

    def _answer(
        self,
        before: list[Turn],
        turn: Turn,
        attention: bool,
        settings: dict[str, Any],
        replacing: Turn | None = None,
    ) -> Iterator[str]:
        """Start answering `turn` after the turns `before`; the answer is recorded as it ends
        (in place of `replacing`, when that is given)."""
        if self.adapter is not None and not isinstance(self.model, Model):
            raise _no_adapters_here(self.model, self.adapter)  # it would answer without it
        self._attention = None
        generation = self.model.generate(
            _as_messages(before, turn),
            **{**self.settings, **settings},
            **({"attention": True} if attention else {}),  # remote models refuse it
        )
        if hasattr(generation, "adapter"):  # a local model: answer with this chat's adapter
            generation.adapter = self.adapter
        pieces = self._record(generation, turn, replacing)
        self._answering = weakref.ref(pieces)
        return pieces

    @contextlib.contextmanager
    def _idle(self, action: str) -> Iterator[None]:
        """One question at a time: the next one is built from the history the last one ends,
        and an undo or reset must not land under an answer being set up or written (a panel's,
        or another thread's). An answer handed out and dropped unread does not count."""
        busy = LlavaError(  # a stream kept in a variable ends (and records) only when closed
            f"this chat is still answering a question (in a panel, on another thread, or a "
            f"stream not read to its end); {action} once it is done, or stop it first (a "
            f"stream you keep: stream.close())"
        )
        if not self._asking.acquire(blocking=False):
            raise busy
        try:
            pieces = self._answering() if self._answering is not None else None
            if pieces is not None and pieces.gi_frame is not None:  # not finished, nor closed
                raise busy
            yield
        finally:
            self._asking.release()

    def _record(self, generation, turn: Turn, replacing: Turn | None = None) -> Iterator[str]:
        under_way = self._under_way = Answering(turn, generation, replacing=replacing is not None)
        self._notify("start", turn)
        pieces = iter(generation)
        try:
            for piece in pieces:
                under_way.text += piece  # before the event: a view joining then reads it all
                self._notify("piece", turn, piece)
                yield piece
        except (KeyboardInterrupt, GeneratorExit):
            getattr(pieces, "close", lambda: None)()  # stops the generation, keeps its text
            self._keep(turn, generation, replacing)  # the partial answer, marked interrupted
            raise
        else:
            self._keep(turn, generation, replacing)
        finally:
            getattr(pieces, "close", lambda: None)()  # an error: the model stops, too
            self._under_way = None  # before "end": a view made after it must not show it live
            self._notify("end", turn)

    def _keep(self, turn: Turn, generation, replacing: Turn | None) -> None:
        turn.answer, turn.interrupted = generation.text, generation.stopped
        if replacing is None:
            self._turns.append(turn)
        elif not turn.interrupted and self._turns and self._turns[-1] is replacing:
            self._turns[-1] = turn  # a regeneration cut short keeps the answer it was to replace
        else:
            return
        if getattr(generation, "records_attention", False):
            self._attention = generation.attention  # also ln.last_attention()

    def ask(
        self, question: str, image: Any = None, *, attention: bool = False, **settings: Any
    ) -> Answer:
        """Ask a question (optionally about new images) and return the whole answer.

        With `attention=True` the answer's `.attention` is its `AttentionMap`: one map over
        every image of the conversation; pick one with `image=` (-1: the latest).
        """
        with contextlib.closing(
            self.stream(question, image, attention=attention, **settings)
        ) as pieces:
            for _ in pieces:
                pass
        return Answer(self._turns[-1].answer, self._attention)

    def regenerate_stream(self, *, attention: bool = False, **settings: Any) -> Iterator[str]:
        """Answer the last question again (with its images), yielding the new answer in pieces.

        The old answer stays in the chat until the new one ends whole: an error, an interrupt,
        an unload or leaving the loop early keeps it (and drops the partial new one).
        """
        with self._idle("regenerate"):
            if not self._turns:
                raise LlavaError("there is no answer to regenerate yet; ask a question first")
            _check_names(settings)
            last = self._turns[-1]
            again = Turn(last.question, list(last.images))
            return self._answer(self._turns[:-1], again, attention, settings, replacing=last)

    def regenerate(self, *, attention: bool = False, **settings: Any) -> Answer:
        """Answer the last question again (settings as in `ask`); the new answer replaces the
        old one only once it is complete."""
        old = self._turns[-1] if self._turns else None
        with contextlib.closing(self.regenerate_stream(attention=attention, **settings)) as pieces:
            for _ in pieces:
                pass
        if self._turns[-1] is old:  # stopped from elsewhere (an unload): nothing raised here
            raise LlavaError("the new answer was stopped before it ended; the old one is kept")
        return Answer(self._turns[-1].answer, self._attention)

    def use_adapter(self, path: str | os.PathLike | None) -> None:
        """Answer with a fine-tuned adapter (an `ln.finetune` output_dir), or the base (None).

        The base stays loaded: adapters are swapped in place on the shared model, and each chat
        on it answers with its own choice.
        """
        if path is None:
            self.adapter = None
            return
        if not isinstance(self.model, Model):
            raise LlavaError(
                f"adapters need local weights; this chat's model is the server "
                f"{_server(self.model)}; ask on a local model "
                f"({_on_its_base(path)}), then chat.use_adapter('{path}')"
            )
        from llava_nb.models import _activate_adapter
        from llava_nb.training.adapters import check_adapter

        folder = str(check_adapter(path))
        self.model.load()
        with self.model._lock:
            _activate_adapter(self.model, folder)  # loaded now, so a bad adapter fails here
        self.adapter = folder

    def undo(self) -> Turn | None:
        """Remove the last turn (question and answer) and return it."""
        with self._idle("undo"):
            turn = self._turns.pop() if self._turns else None
        self._notify("undo", turn)
        return turn

    def reset(self) -> None:
        """Forget every turn; the model and settings stay."""
        with self._idle("reset"):
            self._turns.clear()
        self._notify("reset")

    def save(self, path: str | os.PathLike) -> str:
        """Write the chat, its images embedded, to a JSON file (atomically: never half-written).

        An existing chat file at `path` is replaced; any other existing file is left alone.
        """
        path = _chat_path(path)
        info = _stat(path)
        if info is not None and stat.S_ISDIR(info.st_mode):
            raise ChatFileError(
                f"cannot save chat to '{path}': it is a folder; name a file in it, "
                f"e.g. '{path / 'chat.json'}'"
            )
        if (info is not None or path.is_symlink()) and not _is_chat_file(path):
            raise ChatFileError(
                f"'{path}' exists and is not a llava_nb chat file; save the chat under another "
                "name, or delete that file first"
            )
        data = {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "model": self.model.model_id,
            "remote_model": getattr(self.model, "remote_model", None),  # never the API key
            "settings": self.settings,
            "adapter": self.adapter,
            "turns": [
                {
                    "question": t.question,
                    "images": [image_to_data_uri(image) for image in t.images],
                    "answer": t.answer,
                    "interrupted": t.interrupted,
                }
                for t in self._turns
            ],
        }
        temporary = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
            # mode 0o666 less the umask, as for any new file (tempfile's are private: 0o600)
            with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w") as f:
                json.dump(data, f)
            if path.exists():
                shutil.copymode(path, temporary)  # a replaced chat keeps its permissions
            os.replace(temporary, path)
        except BaseException as e:  # an interrupt too: no temporary file left behind
            if temporary and os.path.exists(temporary):
                os.remove(temporary)
            if not isinstance(e, OSError):
                raise
            message = f"cannot save chat to '{path}' ({e.strerror or e}); choose another path"
            raise ChatFileError(message) from None
        return str(path)

    @classmethod
    def load(cls, path: str | os.PathLike, model: Model | str | None = None) -> Chat:
        """Read a chat written by `save`; `model` overrides the model it was saved with.

        A chat saved with an adapter answers with it: on a server (which cannot load it) its
        questions are refused, naming the fixes, as when the adapter's folder is gone."""
        path = _chat_path(path)
        info = _stat(path)
        if info is None:
            raise ChatFileError(f"chat file '{path}' not found; check the path")
        if not stat.S_ISREG(info.st_mode):  # /dev/zero was read until memory ran out
            raise ChatFileError(
                f"'{path}' is not a file (a folder, device or pipe); pass a chat file"
            )
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ChatFileError(f"chat file '{path}' not found; check the path") from None
        except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested too deep
            raise ChatFileError(
                f"chat file '{path}' is not readable JSON ({first_line(e, 80)}); check the file"
            ) from None
        if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
            raise ChatFileError(f"'{path}' is not a llava_nb chat file; save one with chat.save()")
        version = data.get("version", FILE_VERSION)
        if type(version) is not int or version < 1:
            raise ChatFileError(
                f"'{path}' has version {version!r}, not a version number; save it again with "
                "chat.save()"
            )
        if version > FILE_VERSION:
            raise ChatFileError(
                f"'{path}' is a chat file of version {version!r}, newer than this llava_nb "
                f"reads ({FILE_VERSION}); upgrade llava_nb to open it"
            )
        try:
            _check_fields(data, _FILE_FIELDS, "")
            if not data["model"].strip():
                raise ChatFileError("field 'model' is empty")
            unknown = sorted(set(data["settings"]) - set(SETTINGS))
            if unknown:
                raise ChatFileError(
                    f"field 'settings' has {unknown[0]!r}, not one of {', '.join(SETTINGS)}"
                )
            turns = [_read_turn(t, n) for n, t in enumerate(data["turns"], 1)]
            model = model or get_model(data["model"], remote_model=data.get("remote_model"))
            chat = cls(model, **data["settings"])
            chat.adapter = data.get("adapter")  # applied when it next answers
            chat._turns = turns
        except (KeyError, TypeError, LlavaError) as e:
            raise ChatFileError(f"chat file '{path}' is damaged ({e}); check the file") from None
        return chat


def _server(model: Any) -> str:
    return getattr(model, "base_url", None) or model.model_id


def _on_its_base(adapter: str | os.PathLike) -> str:
    """How to give a chat the local model an adapter was fine-tuned from, as its
    adapter_config.json names it (a placeholder where the folder is not here). Quoted in the
    literal, so front ends can render the fix their way (cli.NOTEBOOK_FIXES)."""
    try:
        config = json.loads((Path(adapter).expanduser() / "adapter_config.json").read_text())
        base = config.get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError, TypeError):
        base = None
    named = base.strip() if isinstance(base, str) and base.strip() else "BASE-MODEL"
    return f"chat.model = ln.Model('{named}')"


def _no_adapters_here(model: Any, adapter: str) -> LlavaError:
    """A chat that answers with an adapter, asked on a server: it cannot load the adapter, and
    its base model's answer would pass for the fine-tuned one."""
    from llava_nb.training.adapters import AdapterError

    without = "use_adapter(None) (%llava adapter none) answers with the server's model"
    if not os.path.isdir(os.path.expanduser(adapter)):  # gone: no local model can answer either
        return AdapterError(
            f"this chat answers with the adapter {adapter}, which is not here (nor could the "
            f"server {_server(model)} load it: adapters need local weights); {without}"
        )
    return AdapterError(
        f"this chat answers with the adapter {adapter}, which the server {_server(model)} "
        f"cannot load (adapters need local weights); answer with its base model "
        f"({_on_its_base(adapter)}), or {without}"
    )


def _check_names(settings: dict[str, Any]) -> None:
    """Refuse a setting that is not one (their values are checked by the model, before it loads)."""
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        raise LlavaError(f"unknown setting {sorted(unknown)[0]!r}; use {', '.join(SETTINGS)}")


def _as_messages(turns: list[Turn], asking: Turn | None = None) -> list[dict]:
    """`turns` (and the question `asking`, awaiting its answer) as chat-template messages."""
    messages: list[dict] = []
    for turn in [*turns, asking] if asking is not None else turns:
        content = [{"type": "image", "image": image} for image in turn.images]
        content.append({"type": "text", "text": turn.question})
        messages.append({"role": "user", "content": content})
        if turn is not asking:
            messages.append(
                {"role": "assistant", "content": [{"type": "text", "text": turn.answer}]}
            )
    return messages


# What each field of a chat file holds: (JSON types allowed, required). Checked on load, so a
# hand-edited file fails there, in one line, never later in the middle of an answer.
_FILE_FIELDS = {
    "model": ((str,), True),
    "remote_model": ((str, type(None)), False),
    "settings": ((dict,), True),
    "adapter": ((str, type(None)), False),
    "turns": ((list,), True),
}
_TURN_FIELDS = {
    "question": ((str,), True),
    "images": ((list,), True),
    "answer": ((str,), True),
    "interrupted": ((bool,), False),
}
_JSON_NAMES = {
    str: "text",
    type(None): "null",
    dict: "an object",
    list: "a list",
    bool: "true/false",
}


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    return _JSON_NAMES.get(type(value), type(value).__name__)


def _check_fields(data: dict, fields: dict, where: str) -> None:
    for name, (types, required) in fields.items():
        if name not in data:
            if required:
                raise ChatFileError(f"{where}field '{name}' is missing")
            continue
        value = data[name]
        if not isinstance(value, types):
            wanted = " or ".join(_JSON_NAMES[t] for t in types)
            raise ChatFileError(f"{where}field '{name}' must be {wanted}, not {_json_kind(value)}")


def _read_turn(data: Any, number: int) -> Turn:
    """One saved turn, its fields' types checked; errors name the turn (1 = the first)."""
    where = f"turn {number}, "
    if not isinstance(data, dict):
        raise ChatFileError(f"turn {number} must be an object, not {_json_kind(data)}")
    _check_fields(data, _TURN_FIELDS, where)
    images = []
    for i, uri in enumerate(data["images"]):
        if not isinstance(uri, str):
            raise ChatFileError(
                f"{where}field 'images' item {i + 1} must be a data:image URI, "
                f"not {_json_kind(uri)}"
            )
        try:
            images.append(image_from_data_uri(uri))
        except LlavaError as e:
            raise ChatFileError(f"{where}field 'images' item {i + 1}: {e}") from None
    return Turn(data["question"], images, data["answer"], data.get("interrupted", False))


def _chat_path(path: Any) -> Path:
    """A chat file's path, `~` expanded; an empty or non-path value fails in one line."""
    if not isinstance(path, str | os.PathLike):
        raise ChatFileError(f"a chat file path must be text, not {type(path).__name__}")
    if not str(path).strip():
        raise ChatFileError("the chat file name is empty; give one, e.g. 'chat.json'")
    if "\0" in str(path):
        raise ChatFileError("the chat file name contains a NUL character; give a plain file name")
    return Path(path).expanduser()


def _stat(path: Path) -> os.stat_result | None:
    """The file's status (None: there is none), or one line for a name the system refuses."""
    try:
        return path.stat()
    except (FileNotFoundError, NotADirectoryError):  # the latter: a file on the way
        return None
    except OSError as e:  # a name too long for the file system, no permission
        shown = str(path) if len(str(path)) <= 80 else str(path)[:80] + "…"
        raise ChatFileError(
            f"cannot use '{shown}' as a chat file ({e.strerror}); choose another name"
        ) from None


_SAVED_HEAD = re.compile(rb'\s*\{\s*"format"\s*:\s*"' + re.escape(FILE_FORMAT.encode()) + rb'"')


def _is_chat_file(path: Path) -> bool:
    """Whether `path` is a file `Chat.save` wrote (its "format" marker): saving may replace it."""
    if not path.is_file():
        return False
    try:
        with path.open("rb") as f:
            head = f.read(256)
            if _SAVED_HEAD.match(head):  # as `save` writes it: its images need not be read
                return True
            if head.lstrip()[:1] != b"{":  # not a JSON object: no need to read it all
                return False
            f.seek(0)
            data = json.load(f)
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("format") == FILE_FORMAT
