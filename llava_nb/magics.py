"""`%llava` and `%%llava`: argument parsing first, then one small handler per sub-command.

Handlers turn what the user typed into `Chat` / `Model` calls and display what comes back;
bad input of any kind prints one line (`llava_nb: ...`) and leaves chats and models unharmed.
"""

from __future__ import annotations

import argparse
import builtins
import keyword
import os
import re
import shlex
import string
import sys
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from typing import Any

from IPython.core.displaypub import DisplayPublisher
from IPython.core.magic import Magics, cell_magic, line_cell_magic, magics_class
from IPython.display import display
from traitlets import Enum, Float, Integer, TraitError, Unicode, observe, validate
from traitlets.config import Config

from llava_nb.chat import Answer
from llava_nb.errors import LlavaError

DEFAULT_CHAT = "default"
UPDATE_INTERVAL_S = 0.1  # how often the streaming answer is redrawn
MODEL_KEYS = ("model", "quantization", "device", "remote_model", "api_key")  # which Model

HELP = """\
%%llava [-m MODEL] [-i IMAGE ...] [-c CHAT] [--new] [--max-new-tokens N] [--temperature T]
        [--top-p P] [--seed S] [-o VAR] [--attention]
question text, with {python_variable} interpolation

    -i IMAGE   a path, an http(s) URL, or a notebook variable holding an image (PIL, array,
               tensor, bytes); one or more, -i may be repeated. Images stay in the chat for
               later turns.
    -c CHAT    a named conversation (default: "default"); --new starts it afresh.
    -o VAR     store the answer in the notebook variable VAR instead of returning it.
    --attention  record where the answer looked and show its heatmap; the map is
               ln.last_attention() (or VAR.attention with -o VAR).

%llava load [MODEL] [--4bit | --8bit | --no-quant] [--device DEV]   load now (else on first use)
%llava load http://host:8000/v1 [--remote-model NAME] [--api-key KEY]   use a server (vLLM,
            Ollama, llama.cpp, llava-nb serve) instead of local weights
%llava unload | status | models | chats | help
%llava history [CHAT] | reset [CHAT] | undo [CHAT]
%llava panel [CHAT]                 a chat window on CHAT; cells asking CHAT show up there too
%llava save FILE [CHAT] | open FILE [CHAT]
%llava adapter FOLDER|none [CHAT]   answer with a fine-tuned adapter (a finetune output_dir),
            or none: the base model
%llava config [KEY=VALUE ...]       model, quantization, device, max_new_tokens, temperature, top_p
            (and a server's remote_model, api_key)

%%llava_finetune [-o VAR]   fine-tune; the body is ln.finetune's arguments as YAML (key: value
            lines; $name is a notebook variable), e.g. data: train.json / max_steps: 200
"""


# ---------------------------------------------------------------- parsing


class _Parser(argparse.ArgumentParser):
    """argparse that raises a one-line LlavaError instead of printing usage and exiting."""

    def error(self, message: str):
        raise LlavaError(f"{self.prog}: {message}; see %llava help")


def _identifier(name: str) -> str:
    if not name.isidentifier() or keyword.iskeyword(name):  # `class` could not be read back
        raise argparse.ArgumentTypeError(f"{name!r} is not a Python variable name")
    if hasattr(builtins, name):  # -o print would hide print() in the notebook
        raise argparse.ArgumentTypeError(
            f"{name!r} is a Python builtin; name the variable otherwise (-o {name}_answer)"
        )
    return name


def _chat_name(name: str) -> str:
    if not name.strip():
        raise argparse.ArgumentTypeError("a chat needs a name")
    return name


def _question_parser() -> _Parser:
    p = _Parser(prog="%%llava", add_help=False)
    p.add_argument("-m", "--model")
    p.add_argument("-i", "--image", action="extend", nargs="+", default=[])
    p.add_argument("-c", "--chat", type=_chat_name, default=DEFAULT_CHAT)
    p.add_argument("--new", action="store_true")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("-o", "--output", type=_identifier)
    p.add_argument("--attention", action="store_true")
    return p


def _command_parser() -> _Parser:
    p = _Parser(prog="%llava", add_help=False)
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    load = sub.add_parser("load", add_help=False)
    load.add_argument("model", nargs="?")
    quant = load.add_mutually_exclusive_group()
    quant.add_argument("--4bit", dest="quantization", action="store_const", const="4bit")
    quant.add_argument("--8bit", dest="quantization", action="store_const", const="8bit")
    quant.add_argument("--no-quant", dest="quantization", action="store_const", const="none")
    load.add_argument("--device")
    load.add_argument("--remote-model", help="the model's name on a server (URL models)")
    load.add_argument("--api-key", help="the server's API key (default: $OPENAI_API_KEY)")
    for name in ("unload", "status", "models", "chats", "help"):
        sub.add_parser(name, add_help=False)
    for name in ("history", "reset", "undo", "panel"):
        sub.add_parser(name, add_help=False).add_argument("chat", nargs="?", default=DEFAULT_CHAT)
    for name in ("save", "open"):
        cmd = sub.add_parser(name, add_help=False)
        cmd.add_argument("file")
        cmd.add_argument("chat", nargs="?", default=DEFAULT_CHAT)
    sub.add_parser("config", add_help=False).add_argument("assignments", nargs="*")
    adapter = sub.add_parser("adapter", add_help=False)
    adapter.add_argument("path")
    adapter.add_argument("chat", nargs="?", default=DEFAULT_CHAT)
    return p


def parse_question(line: str) -> argparse.Namespace:
    return _question_parser().parse_args(_split(line))


def parse_command(line: str) -> argparse.Namespace:
    args = _split(line)
    if not args:
        raise LlavaError(
            "%llava needs a command (status, load, ...); questions go in %%llava cells"
        )
    return _command_parser().parse_args(args)


def interpolate(text: str, namespace: dict[str, Any]) -> tuple[str, list[str]]:
    """Fill `{expression}` fields (with `!r` and `:spec` as in f-strings, `{a[1:2]}` a slice)
    from the notebook namespace; a field that does not evaluate stays as typed. Returns the
    text and, for each field left that looks meant as code (no syntax error), why.

    Only the user's namespace is used (never the locals of IPython's own frames), and `$` is
    left alone, so "Is this worth $5?" stays as typed.
    """
    try:
        fields = list(string.Formatter().parse(text))
    except ValueError:  # an unpaired brace: not a template
        return text, []
    pieces, unfilled = [], []
    for literal, field, spec, conversion in fields:
        pieces.append(literal)
        if field is None:
            continue
        typed = f"{{{field}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}"
        try:
            pieces.append(_field(field, spec, conversion, namespace))
        except SyntaxError:  # prose in braces, as in JSON
            pieces.append(typed)
        except Exception as e:
            pieces.append(typed)
            unfilled.append(f"{typed} ({type(e).__name__}: {e})")
    return "".join(pieces), unfilled


def _field(expression: str, spec: str, conversion: str | None, namespace) -> str:
    if spec and not conversion:  # {a[1:2]}: the colon may be a slice's
        try:
            return str(eval(f"{expression}:{spec}", namespace))
        except SyntaxError:
            pass
    value = eval(expression, namespace)
    value = {"r": repr, "s": str, "a": ascii}[conversion](value) if conversion else value
    try:
        return format(value, spec)
    except (ValueError, TypeError):  # {"a": 1}: prose, not a format spec
        raise SyntaxError(f"not a format spec: {spec!r}") from None


def _busy_elsewhere(model) -> bool:
    """Whether another thread (a panel's) holds the model. A cell would wait for it on the
    kernel's only thread, where the panel's Stop is handled too: it could not be pressed."""
    lock = getattr(model, "_lock", None)
    if lock is None:
        return False
    if not lock.acquire(blocking=False):
        return True
    lock.release()
    return False


def _split(line: str) -> list[str]:
    """Words as a shell splits them, quotes included, but a backslash is a character (Windows
    paths: C:\\Users\\me\\cat.jpg), not an escape."""
    lexer = shlex.shlex(line, posix=True)
    lexer.whitespace_split, lexer.escape, lexer.commenters = True, "", ""
    try:
        return list(lexer)
    except ValueError as e:
        raise LlavaError(f"cannot parse options '{line}' ({e}); check the quotes") from None


def _not_asked() -> LlavaError:
    return LlavaError(
        "interrupted before the answer began; the question was not asked (run the cell again)"
    )


# ---------------------------------------------------------------- display objects


def _shown(text: str) -> dict[str, str]:
    """A raw Markdown display bundle for model text.

    Not `Markdown(text)`: that reads `text` as a file or fetches it as a URL when it looks like
    one (an answer "." or "http://..." would fail or go on the network).
    """
    return {"text/markdown": text, "text/plain": text}


class Markdown:
    """Markdown a notebook renders and a terminal front end (jupyter console) prints as it is:
    there IPython's own `Markdown` reads `<IPython.core.display.Markdown object>`. Never read as
    a file or URL, as that one is when its text looks like one."""

    def __init__(self, data: str) -> None:
        self.data = data

    def _repr_markdown_(self) -> str:
        return self.data

    def _repr_pretty_(self, printer, cycle: bool) -> None:
        printer.text(self.data)


def _table(rows: list[dict[str, Any]]) -> Markdown:
    if not rows:
        return Markdown("*(none)*")
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row[k]) for k in keys) + " |" for row in rows]
    return Markdown("\n".join(lines))


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e7 else f"{n / 1e6:.2f} MB"


# ---------------------------------------------------------------- handlers


@magics_class
class LlavaMagics(Magics):
    """The %llava magics; its settings are also `%config LlavaMagics.model = ...`."""

    model = Unicode(
        "", help="Default model id or folder ('' = $LLAVA_NB_MODEL, LLaVA-1.5-7B, or 'demo')"
    ).tag(config=True)
    quantization = Enum(["auto", "none", "4bit", "8bit"], "auto", help="Quantization").tag(
        config=True
    )
    device = Unicode("", help="Device ('' = cuda, mps or cpu, whichever is there)").tag(config=True)
    remote_model = Unicode("", help="Model name on the server, when model is a URL").tag(
        config=True
    )
    api_key = Unicode("", help="API key of the server, when model is a URL").tag(config=True)
    max_new_tokens = Integer(512, help="Longest answer, in tokens").tag(config=True)
    temperature = Float(0.0, help="0 = greedy (deterministic)").tag(config=True)
    top_p = Float(1.0, help="Nucleus sampling when temperature > 0").tag(config=True)

    def __init__(self, shell=None, **kwargs) -> None:
        # set before the traits: config given to the constructor fires the observers below
        self.chats: dict[str, Any] = {}
        self.pinned: set[str] = set()  # chats given their own model (-m, open); others follow
        self.current: Any = None  # the configured Model, made on first use
        self._retired: list[Any] = []  # models configured before; unloaded once unused
        self.panels: dict[str, Any] = {}  # chat name -> the ChatPanel `%llava panel` made
        self._holding = False  # settings are being changed together (see _one_change)
        super().__init__(shell=shell, **kwargs)

    @observe(*MODEL_KEYS)
    def _model_changed(self, change) -> None:
        if not self._holding:  # IPython's %config, or a plain `magics.model = ...`
            self._switch_model()

    def _switch_model(self) -> None:
        """The configured model changed: chats that follow it switch now, however it was set
        (%llava config or load, IPython's %config), so a panel on one answers with the new
        model as the next `%%llava` cell would."""
        self._retire(self.current)
        self.current = None
        self._follow_current()

    def _retire(self, model) -> None:
        """Mark `model` as maybe used no more: `_release_unused` frees it unless it is used."""
        if model is not None and all(m is not model for m in self._retired):
            self._retired.append(model)

    @contextmanager
    def _one_change(self) -> Iterator[None]:
        """Settings set in the block apply together or, on any error, not at all; chats that
        follow the configured model switch once, at the end (not once per key set)."""
        before = {name: getattr(self, name) for name in self.class_trait_names(config=True)}
        current, retired = self.current, list(self._retired)
        self._holding = True
        try:
            yield
            self._holding = False
            if any(getattr(self, key) != before[key] for key in MODEL_KEYS):
                self._switch_model()  # fails for a URL that names no server, say
        except BaseException:
            self._holding = True
            for name, value in before.items():
                if getattr(self, name) != value:
                    setattr(self, name, value)
            self.current, self._retired = current, retired
            self._follow_current()  # back, where the switch got that far
            raise
        finally:
            self._holding = False

    @validate("model")
    def _valid_model(self, proposal):
        """A folder that is not there is refused when set (by %config too), not at first use."""
        from llava_nb.remote import is_remote

        model = proposal["value"].strip()
        if model and not is_remote(model):
            from llava_nb.models import check_local_path

            try:
                check_local_path(model)  # a hub id is checked when it loads
            except LlavaError as e:
                raise TraitError(str(e)) from None
        return model

    @validate("max_new_tokens", "temperature", "top_p")
    def _valid_setting(self, proposal):
        from llava_nb.models import check_settings

        names = ("max_new_tokens", "temperature", "top_p")
        settings = {name: getattr(self, name) for name in names}
        settings[proposal["trait"].name] = proposal["value"]
        try:
            check_settings(**settings, seed=None)
        except LlavaError as e:
            raise TraitError(str(e)) from None
        return proposal["value"]

    @validate("device")
    def _valid_device(self, proposal):
        device = proposal["value"].strip()
        if device and not re.fullmatch(r"cpu|mps|cuda(:\d+)?", device):
            raise TraitError(f"unknown device {device!r}; use cuda, cuda:N, mps or cpu")
        return device

    @observe("max_new_tokens", "temperature", "top_p")
    def _setting_changed(self, change) -> None:
        for chat in self.chats.values():  # a new setting applies to the chats already open
            chat.settings[change["name"]] = change["new"]

    @line_cell_magic
    def llava(self, line: str, cell: str | None = None):
        try:
            if cell is None:
                return self._command(parse_command(line))
            return self._ask(parse_question(line), cell)
        except LlavaError as e:
            print(f"llava_nb: {e}", file=sys.stderr)

    @cell_magic
    def llava_finetune(self, line: str, cell: str):
        """%%llava_finetune [-o VAR]: fine-tune; the body is ln.finetune's arguments as YAML."""
        from llava_nb.training.cell import run_cell

        try:
            return run_cell(self, line, cell)
        except LlavaError as e:
            print(f"llava_nb: {e}", file=sys.stderr)

    # --- questions

    def _current_model(self):
        from llava_nb.models import get_model

        if self.current is None:
            self.current = get_model(self.model or None, **self._model_options())
        return self.current

    def _model_options(self) -> dict[str, Any]:
        return {
            "quantization": self.quantization,
            "device": self.device or None,
            "remote_model": self.remote_model or None,
            "api_key": self.api_key or None,
        }

    def _follow_current(self) -> None:
        """Give the chats that follow the configured model (not pinned ones) the model now
        configured, so a panel on one answers with it as a `%%llava` cell would. With no such
        chat, nothing is resolved yet (the default model's lookup waits for a question)."""
        following = [chat for name, chat in self.chats.items() if name not in self.pinned]
        if following:
            current = self._current_model()
            for chat in following:
                chat.model = current

    def _release_unused(self) -> None:
        """Unload models configured before, unless the current one or a pinned chat uses them."""
        used = [self.current, *(chat.model for n, chat in self.chats.items() if n in self.pinned)]
        for model in self._retired:
            if model.loaded and not any(model is m for m in used):
                _unload(model)
        self._retired = [m for m in self._retired if m.loaded]

    def _ask(self, args: argparse.Namespace, cell: str):
        from llava_nb.chat import Chat
        from llava_nb.images import load_image
        from llava_nb.models import get_model

        namespace = self.shell.user_ns if self.shell else {}
        question, unfilled = interpolate(cell.strip(), namespace)
        question = question.strip()
        if unfilled:
            print(f"llava_nb: left as typed: {'; '.join(unfilled)}", file=sys.stderr)
        if not question:
            raise LlavaError("the cell is empty; write a question below %%llava")
        for source in args.image:
            if source.startswith("<") and not os.path.exists(source):
                raise LlavaError(  # "-i {img}": IPython put the object's repr in the line
                    f"-i {source[:40]!r} is no image file; to pass a notebook variable, write "
                    "its name (-i img), not {img} or $img"
                )
        try:
            images = [load_image(source, namespace=namespace) for source in args.image]
        except KeyboardInterrupt:
            raise _not_asked() from None
        chat = self.chats.get(args.chat)
        if args.model:
            model = get_model(args.model, **self._model_options())
        elif chat is not None and args.chat in self.pinned and not args.new:
            model = chat.model
        else:
            model = self._current_model()
        if chat is None or args.new:  # kept only once the question is under way
            chat = Chat(
                model,
                max_new_tokens=self.max_new_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
            )
        settings = {
            key: value
            for key, value in {
                "max_new_tokens": args.max_new_tokens,
                "temperature": args.temperature,
                "top_p": args.top_p,
                "seed": args.seed,
            }.items()
            if value is not None
        }
        if _busy_elsewhere(model):
            raise LlavaError(
                "the model is busy with another question (a chat panel's?); ask once it is "
                "done, or press Stop there"
            )
        previous, chat.model = chat.model, model
        try:
            # bad input fails here
            pieces = chat.stream(question, images, attention=args.attention, **settings)
        except BaseException as e:
            chat.model = previous
            if isinstance(e, KeyboardInterrupt):  # while the model loaded, say
                raise _not_asked() from None
            raise
        replaced = self.chats.get(args.chat)
        self.chats[args.chat] = chat
        if replaced is not None:  # its model (-m) may be left to no chat: freed below if so
            self._retire(previous if replaced is chat else replaced.model)
        if args.model:
            self.pinned.add(args.chat)
        elif args.new:
            self.pinned.discard(args.chat)
        printed = _prints_displays(self.shell)
        if printed:
            answer, interrupted = _print_stream(chat, pieces)
        else:
            answer, interrupted = self._stream(
                chat, pieces, keep=bool(args.output or args.attention)
            )
        self._release_unused()
        if interrupted:
            if args.output:  # the partial answer, as the chat keeps it
                self.shell.user_ns[args.output] = Answer(answer)
            return None
        attention = chat._attention if args.attention else None
        if args.output:  # before the heatmap: a plot that fails must not lose the answer
            self.shell.user_ns[args.output] = Answer(answer, attention)
        if attention is not None:  # the answer stays shown above its heatmap; no cell value
            display(attention.plot())
        if printed or args.output or args.attention:
            return None  # a value would show the answer a second time
        return Answer(answer)

    def _stream(self, chat, pieces, keep: bool = False) -> tuple[str, bool]:
        """Show the answer as it grows (one display, redrawn at most every UPDATE_INTERVAL_S).

        Returns the answer as the chat recorded it, and whether it was interrupted. At the end
        the display is emptied: the cell's value shows the answer or, when `keep` (-o VAR: the
        cell has no value) or interrupted, a display of its own, as a front end that ignores
        updates (jupyter console) shows it too.
        """
        turns = len(chat.history)
        handle = display(_shown("…"), raw=True, display_id=True)
        text, shown, thought = "", 0.0, False

        def thinking(piece: str) -> None:  # a reasoning model on a server, before its answer
            nonlocal thought
            if not (text or thought):
                handle.update(_shown("*thinking…*"), raw=True)
                thought = True

        unfollow = chat.on_thinking(thinking)
        try:
            with closing(pieces):
                for piece in pieces:
                    text += piece
                    if time.monotonic() - shown > UPDATE_INTERVAL_S:
                        handle.update(_shown(text), raw=True)
                        shown = time.monotonic()
        except KeyboardInterrupt:
            if len(chat.history) > turns:
                text = chat.history[-1].answer  # the partial answer, kept in the chat
            handle.update(_shown(""), raw=True)
            display(_shown(text + " *(interrupted)*"), raw=True)
            return text, True
        except BaseException:
            handle.update(_shown(""), raw=True)  # the error line says what happened
            raise
        finally:
            unfollow()
        text = chat.history[-1].answer  # the whole decoded answer, as the chat keeps it
        handle.update(_shown(""), raw=True)
        if keep:
            display(_shown(text), raw=True)
        return text, False

    # --- commands

    def _command(self, args: argparse.Namespace):
        return getattr(self, f"_cmd_{args.command}")(args)

    def _cmd_help(self, args) -> None:
        print(HELP)

    def _cmd_load(self, args) -> None:
        from llava_nb.remote import is_remote

        before = {key: getattr(self, key) for key in MODEL_KEYS}
        try:
            with self._one_change():  # a bad id or option: settings and chats stay as they were
                for key in MODEL_KEYS:
                    setattr(self, key, getattr(args, key) or before[key])
                named = self.model or os.environ.get("LLAVA_NB_MODEL", "")
                if (args.remote_model or args.api_key) and not is_remote(named):
                    raise LlavaError(
                        "--remote-model and --api-key are for a server "
                        "(openai:http://host:port/v1); leave them out for local weights"
                    )
        except TraitError as e:
            raise LlavaError(str(e)) from None
        try:
            self._current_model().load()
        except BaseException as e:
            loaded = self.current if isinstance(e, KeyboardInterrupt) else None
            if loaded is not None and loaded.loaded:  # a load cannot stop halfway: it ended
                self._release_unused()  # as after any load: one model in memory at a time
                raise LlavaError(
                    f"interrupted; {loaded.model_id} loaded all the same (a load cannot stop "
                    "halfway), and is the model in use: %llava unload frees it"
                ) from None
            with self._one_change():  # it failed: the model before is the one in use again
                for key, value in before.items():
                    setattr(self, key, value)
            if isinstance(e, KeyboardInterrupt):
                raise LlavaError("interrupted; nothing was loaded") from None
            raise
        self._release_unused()  # one model in memory at a time

    def _cmd_unload(self, args) -> None:
        models = [self.current, *self._retired, *(chat.model for chat in self.chats.values())]
        loaded = {id(m): m for m in models if m is not None and m.loaded}
        if not loaded:
            print("llava_nb: no model is loaded")
            return
        for model in loaded.values():
            _unload(model)
            if not model.loaded:
                print(f"llava_nb: unloaded {model.model_id}")
        self._retired.clear()

    def _cmd_status(self, args) -> Markdown:
        current = self._current_model()
        status = current.status()
        status["memory"] = _gb(status["memory"])
        chats = ", ".join(f"{n} ({_turns(c)})" for n, c in self.chats.items())
        status["chats"] = chats or "none"
        others = {id(c.model): c.model for c in self.chats.values() if c.model is not current}
        loaded = [m for m in others.values() if m.loaded]  # -m MODEL pinned them to chats
        if loaded:
            shown = (f"{m.model_id} ({_gb(m.status()['memory'])})" for m in loaded)
            status["also loaded"] = ", ".join(shown)
        return Markdown("\n".join(f"- **{k}**: {v}" for k, v in status.items() if v is not None))

    def _cmd_models(self, args) -> Markdown:
        from llava_nb.models import FAMILIES, REGISTRY

        return _table(
            [
                {
                    "model": m.id,
                    "family": FAMILIES[m.family],
                    "size": m.size,
                    "language model": m.language_model,
                    "fp16 weights": f"{m.fp16_gb:.1f} GB",
                    "4-bit weights": f"~{m.fp16_gb / 3.4:.1f} GB",
                }
                for m in REGISTRY.values()
            ]
        )

    def _cmd_chats(self, args) -> Markdown:
        return _table(
            [
                {"chat": name, "model": chat.model.model_id, "turns": len(chat.history)}
                for name, chat in self.chats.items()
            ]
        )

    def _existing(self, name: str):
        if name not in self.chats:
            known = ", ".join(self.chats) or "none yet"
            raise LlavaError(f"no chat named '{name}' (chats: {known}); ask with -c {name} first")
        return self.chats[name]

    def _cmd_history(self, args) -> Markdown:
        lines = []
        for turn in self._existing(args.chat).history:
            pictures = f" *[{len(turn.images)} image(s)]*" if turn.images else ""
            stopped = " *(interrupted)*" if turn.interrupted else ""
            lines += [f"**You:**{pictures} {turn.question}", f"**LLaVA:** {turn.answer}{stopped}"]
        return Markdown("\n\n".join(lines) or "*(no turns yet)*")

    def _cmd_panel(self, args):
        from llava_nb.chat import Chat
        from llava_nb.panel import ChatPanel

        if args.chat not in self.chats:  # opened before any question: the chat starts here
            self.chats[args.chat] = Chat(
                self._current_model(),
                max_new_tokens=self.max_new_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
            )
        chat = self.chats[args.chat]
        panel = self.panels.get(args.chat)
        if panel is None or panel.comm is None or panel.chat is not chat:
            # one per chat: a cell run again shows it again, rather than leave one more panel
            # following the chat (widgets live until closed, and each is sent every answer)
            panel = self.panels[args.chat] = ChatPanel(chat)
        return panel

    def _cmd_reset(self, args) -> None:
        self._existing(args.chat).reset()
        print(f"llava_nb: chat '{args.chat}' reset")

    def _cmd_undo(self, args) -> None:
        turn = self._existing(args.chat).undo()
        print(f"llava_nb: removed '{turn.question[:60]}'" if turn else "llava_nb: nothing to undo")

    def _cmd_save(self, args) -> None:
        chat = self._existing(args.chat)
        path = chat.save(args.file)
        print(f"llava_nb: saved chat '{args.chat}' ({_turns(chat)}) to {path}")

    def _cmd_open(self, args) -> None:
        from llava_nb.chat import Chat, same_turns

        chat = Chat.load(args.file)
        held = self.chats[args.chat].history if args.chat in self.chats else []
        turns = len(held)
        if turns and not same_turns(held, chat.history):  # never replace a conversation
            # the user may not have saved (one equal to the file is saved: a rerun cell opens it)
            reset = "%llava reset" + ("" if args.chat == DEFAULT_CHAT else f" {args.chat}")
            raise LlavaError(
                f"chat '{args.chat}' already has {turns} turn(s); open the file as another "
                f"chat (%llava open {shlex.quote(args.file)} NAME), or clear this one first "
                f"({reset})"
            )
        if chat.model.model_id == self._current_model().model_id:
            chat.model = self.current  # with its settings (quantization, device): one copy
            self.pinned.discard(args.chat)
        else:
            self.pinned.add(args.chat)
        if args.chat in self.chats:
            self._retire(self.chats[args.chat].model)
        self.chats[args.chat] = chat
        self._release_unused()
        print(f"llava_nb: opened {args.file} as chat '{args.chat}' ({_turns(chat)})")

    def _cmd_adapter(self, args) -> None:
        """The way back, too, for a chat opened with an adapter that is no longer there: its
        every question failed, and only Python (chat.use_adapter(None)) could change it."""
        chat = self._existing(args.chat)
        chat.use_adapter(None if args.path.lower() == "none" else args.path)
        using = f"adapter {chat.adapter}" if chat.adapter else "the base model"
        print(f"llava_nb: chat '{args.chat}' answers with {using}")

    def _cmd_config(self, args):
        names = self.class_trait_names(config=True)
        if not args.assignments:
            shown = {
                n: "'***'" if n == "api_key" and self.api_key else repr(getattr(self, n))
                for n in names
            }
            return _table([{"key": n, "value": value} for n, value in shown.items()])
        device = self.device
        with self._one_change():  # all or nothing
            for assignment in args.assignments:
                key, sep, value = assignment.partition("=")
                key = key.replace("-", "_")
                if not sep or key not in names:
                    raise LlavaError(f"config takes KEY=VALUE with KEY one of {', '.join(names)}")
                try:
                    setattr(self, key, self.traits()[key].from_string(value))
                except Exception as e:
                    raise LlavaError(f"bad value for {key}: {value!r} ({e})") from None
            if self.device and self.device != device:  # there, not only well spelled
                from llava_nb.models import _check_device

                _check_device(self.device)
        return None


def _turns(chat) -> str:
    n = len(chat.history)
    return f"{n} turn" if n == 1 else f"{n} turns"


def _prints_displays(shell) -> bool:
    """Whether displays are printed as text (IPython in a terminal): there a display cannot be
    updated in place, and each update of a streamed answer printed it again on a new line."""
    publisher = getattr(shell, "display_pub", None)
    return publisher is not None and type(publisher).publish is DisplayPublisher.publish


def _print_stream(chat, pieces) -> tuple[str, bool]:
    """Print the answer as it grows, on one text, as a terminal chat does (with its
    "thinking…" while a server's reasoning model thinks). Returns the answer as the chat
    recorded it, and whether it was interrupted."""
    from llava_nb.cli import thinking_shown, unshown

    turns, printed = len(chat.history), ""
    try:
        with closing(pieces), thinking_shown(chat, sys.stdout) as thinking:
            for piece in pieces:
                thinking.erase()
                sys.stdout.write(piece)
                sys.stdout.flush()
                printed += piece
    except KeyboardInterrupt:
        answer = chat.history[-1].answer if len(chat.history) > turns else ""
        # the tokens made as the interrupt came are kept too: shown, the text is what is kept
        rest = unshown(answer, printed)
        print(rest + " (interrupted)", flush=True)
        return answer, True
    except BaseException:
        if printed:  # the error line goes on a line of its own
            print(flush=True)
        raise
    print(flush=True)
    return chat.history[-1].answer, False


def _unload(model) -> None:
    """`model.unload()`, an interrupt meanwhile told in one line, not raised: `Model.unload`
    ends its release before raising it, so there is nothing left for it to stop."""
    try:
        model.unload()
    except KeyboardInterrupt:
        if model.loaded:  # it came before the release began
            message = f"interrupted before {model.model_id} was released; %llava unload frees it"
        else:
            message = (
                f"interrupted while releasing {model.model_id}; released all the same "
                "(a release cannot stop halfway)"
            )
        print(f"llava_nb: {message}", file=sys.stderr)


def register(shell) -> None:
    """Register the magics; on `%reload_ext llava_nb`, the new ones carry on the old ones'
    chats, settings and loaded model (else the chats were lost and the weights stranded)."""
    old = next((c for c in shell.configurables if isinstance(c, LlavaMagics)), None)
    if old is None:
        try:
            magics = LlavaMagics(shell=shell)  # %config and ipython_config.py settings apply
        except TraitError as e:  # else %load_ext failed, and there was no %llava to fix it
            print(
                f"llava_nb: the configured LlavaMagics settings were refused ({e}); using the "
                "defaults: fix ipython_config.py, or set them with %llava config",
                file=sys.stderr,
            )
            magics = LlavaMagics(shell=shell, config=Config())
    else:  # the old one's settings: the shell's config may hold values it refused
        magics = LlavaMagics(shell=shell, config=Config())
        for name in magics.class_trait_names(config=True):
            setattr(magics, name, getattr(old, name))
        magics.chats, magics.pinned, magics.panels = old.chats, old.pinned, old.panels
        magics.current, magics._retired = old.current, old._retired
        shell.configurables.remove(old)
    shell.register_magics(magics)
    if magics not in shell.configurables:
        shell.configurables.append(magics)
