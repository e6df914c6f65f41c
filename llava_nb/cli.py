"""`llava-nb`: chat with a LLaVA model in a terminal, or serve one over HTTP.

    llava-nb chat [--model M] [--image PATH] [--4bit|--8bit] [--max-new-tokens N] [--temperature T]
    llava-nb chat --model openai:http://host:8000/v1 [--api-key KEY] ...
    llava-nb serve [--model M] [--host H] [--port P] [--api-key KEY] ...

`chat` is another front end over the same `Chat` the notebook magics use. Answers stream to
stdout; everything else (prompts, banners, progress, errors, and what /help, /history and
/model show) goes to stderr, so `echo "What is this?" | llava-nb chat --image a.jpg > a.txt`
leaves just the answers in a.txt.

Importing this module is cheap: torch and transformers load with the model.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import re
import shlex
import sys
from collections.abc import Iterator
from contextlib import closing, contextmanager, redirect_stderr, redirect_stdout
from typing import Any, NoReturn, TextIO

from llava_nb import __version__
from llava_nb.errors import LlavaError

PROG = "llava-nb"
PROMPT = "you> "
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # all but newline and tab
INTERRUPTED = " [interrupted]"
THINKING = "thinking…"  # on a terminal while a reasoning model thinks before its answer
SERVE_EXTRA = f"{PROG} serve needs the serve extra: pip install 'llava_nb[serve]'"
SERVE_MODULES = ("fastapi", "uvicorn", "starlette")
EXAMPLES = {  # a value for each option, to show in its usage error
    "--model": "llava-hf/llava-1.5-7b-hf",
    "--device": "cpu",
    "--api-key": "KEY",
    "--remote-model": "NAME",
    "--image": "photo.jpg",
    "--max-new-tokens": "256",
    "--temperature": "0.7",
    "--top-p": "0.9",
    "--seed": "0",
    "--host": "0.0.0.0",
    "--port": "8000",
    "--max-concurrency": "4",
    "--allowed-local-media-path": "images/",
}
NOTEBOOK_FIXES = (  # shared messages name a notebook's fix; a terminal user needs these.
    # "{}" stands for a name the message gives (a model, a folder), kept in the terminal's fix
    ("%llava config model=...", "--model M"),
    (" (see %llava models)", ", e.g. llava-hf/llava-1.5-7b-hf"),
    ("use_adapter(None) (%llava adapter none) answers", "/adapter none answers"),
    ("chat.save()", "/save FILE"),
    ("pass api_key= (llava-nb chat: --api-key) or", "start llava-nb chat with --api-key KEY, or"),
    ("pass api_key= or", "start llava-nb chat with --api-key KEY, or"),
    ("pass remote_model=NAME", "name one with --remote-model NAME"),
    ("a path, an http(s) URL or a variable name", "a path or an http(s) URL"),
    ("try --4bit (quantization='4bit')", "try --4bit"),
    ("lower max_new_tokens, start a new chat,", "lower --max-new-tokens, /reset,"),
    ("or in a new chat", "or after /reset"),
    ("chat.model = ln.Model('{}')", "/model {}"),
    ("chat.use_adapter('{}')", "/adapter {}"),
    ("(chat.reset())", "(/reset)"),
    ("(chat.undo())", "(/undo)"),
)

CHAT_HELP = """\
/image PATH   attach an image (a path or an http(s) URL) to the next question;
              /image none drops the images attached so far
/undo         forget the last question and its answer
/reset        forget the whole conversation (the model stays loaded)
/history      show the conversation so far
/save FILE    save the conversation, images included, to a JSON file
/open FILE    continue a conversation saved with /save (this session's model answers)
/model        show the model's status; /model NAME switches model, keeping the conversation
/adapter      show the fine-tuned adapter in use; /adapter FOLDER uses one, /adapter none the
              base model
/help         this list
/quit         quit (or Ctrl-D)
Ctrl-C stops an answer (the partial answer stays in the conversation). Start a question with //
to begin it with a slash."""


# ---------------------------------------------------------------- parsing


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line naming the problem and the fix
    (`--help` still shows everything)."""

    def error(self, message: str) -> NoReturn:
        _error(_usage_error(message))
        raise SystemExit(2)


def _usage_error(message: str) -> str:
    """argparse's message, said as the problem and its fix."""
    commands = f"{PROG} chat or {PROG} serve"
    if message.startswith("the following arguments are required: COMMAND"):
        return f"name a command: {commands} ({PROG} --help says more)"
    if message.startswith("ambiguous option"):
        return f"{message}; write the option in full"
    match = re.fullmatch(r"argument ([^:]+): (.*)", message, re.DOTALL)
    if not match:
        return message
    option, problem = match[1].split("/")[0], match[2]
    if option == "COMMAND":
        chosen = re.search(r"invalid choice: ('.*?') \(", problem)
        return f"unknown command {chosen[1] if chosen else problem}; use {commands}"
    other = re.fullmatch(r"not allowed with argument (\S+)", problem)
    if other:
        return f"{option} and {other[1]} cannot be used together; choose one"
    if problem.startswith("expected one argument"):
        problem = "needs a value"
    example = EXAMPLES.get(option)
    return f"{option} {problem}" + (f"; e.g. {option} {example}" if example else "")


def _model_name(text: str) -> str:
    if not text.strip():  # not the default: that may build the demo model, minutes of CPU
        raise argparse.ArgumentTypeError("is empty; name a hub id, a folder or a server URL")
    return text


def _whole_number(low: int, high: float = float("inf"), what: str = "") -> Any:
    """An argparse type: a whole number from `low` to `high`."""
    what = what or f"a whole number >= {low}"

    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {what}, not {text!r}")
        return value

    return whole_number


def _number(low: float, high: float, what: str, low_included: bool = True) -> Any:
    """An argparse type: a number from `low` (or above it) to `high`."""

    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (low <= value <= high) or (value == low and not low_included):
            raise argparse.ArgumentTypeError(f"must be {what}, not {text!r}")
        return value

    return number


_positive_int = _whole_number(1)
_port = _whole_number(1, 65535, "a port number (1-65535)")


def _add_model_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--model",
        "-m",
        metavar="M",
        type=_model_name,
        help=f"{what}; default: $LLAVA_NB_MODEL, else llava-hf/llava-1.5-7b-hf",
    )
    quant = p.add_mutually_exclusive_group()
    quant.add_argument(
        "--4bit",
        dest="quantization",
        action="store_const",
        const="4bit",
        help="load the language model in 4-bit NF4 (bitsandbytes)",
    )
    quant.add_argument(
        "--8bit",
        dest="quantization",
        action="store_const",
        const="8bit",
        help="load the language model in 8-bit (bitsandbytes)",
    )
    p.set_defaults(quantization="auto")
    p.add_argument("--device", metavar="DEV", help="cuda, cuda:N, mps or cpu (default: the best)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Ask LLaVA vision-language models about images.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    chat = sub.add_parser(
        "chat",
        help="chat about images in the terminal",
        description="Chat about images in the terminal. Answers stream as they are generated;\n"
        "Ctrl-C stops an answer, Ctrl-D quits.\n\n"
        "Only answers go to stdout; everything else (prompts, progress, errors, and what\n"
        "/help, /history and /model show) goes to stderr. With piped stdin each line is a\n"
        "question (or a /command), stdout holds the answers one per line, and Ctrl-C stops\n"
        "the run (exit status 130).",
        epilog="Commands in the chat:\n" + CHAT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    chat.set_defaults(subparser=chat)
    _add_model_options(
        chat, "hub id, local checkpoint folder, or server URL (openai:http://host:8000/v1)"
    )
    chat.add_argument(
        "--api-key",
        metavar="KEY",
        help="the key a server URL needs (default: $OPENAI_API_KEY)",
    )
    chat.add_argument(
        "--remote-model",
        metavar="NAME",
        help="the model to ask on a server URL (default: the first it lists)",
    )
    chat.add_argument(
        "--image",
        "-i",
        metavar="PATH",
        action="append",
        default=[],
        help="an image (path or http(s) URL) for the first question; may be repeated",
    )
    chat.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=512,
        metavar="N",
        help="longest answer (512)",
    )
    chat.add_argument(
        "--temperature",
        type=_number(0, sys.float_info.max, "a number >= 0 (0 = greedy)"),
        default=0.0,
        metavar="T",
        help="0 = greedy (default)",
    )
    chat.add_argument(
        "--top-p",
        type=_number(0, 1, "a number above 0 and at most 1", low_included=False),
        default=1.0,
        metavar="P",
        help="when T > 0 (1.0)",
    )
    chat.add_argument(
        "--seed",
        type=_whole_number(-(2**63), 2**64 - 1, "a whole number (64 bits)"),
        metavar="S",
        help="random seed, when T > 0",
    )

    serve = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over the OpenAI chat-completions API (needs the serve "
        "extra: pip install 'llava_nb[serve]').",
    )
    _add_model_options(serve, "hub id or local checkpoint folder")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8000, help="port to listen on (8000)")
    serve.add_argument("--api-key", metavar="KEY", help="require this key from clients")
    serve.add_argument(
        "--max-concurrency",
        type=_positive_int,
        default=4,
        metavar="N",
        help="requests answered at once (4)",
    )
    serve.add_argument(
        "--allow-image-urls",
        action="store_true",
        help="let requests name http(s) image URLs for the server to fetch",
    )
    serve.add_argument(
        "--allowed-local-media-path",
        metavar="DIR",
        help="let requests name local image files under DIR",
    )
    return parser


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)  # usage errors exit 2 here
    if unknown:
        parser.error(_unknown_argument(unknown[0], args.command))
    try:
        if args.command == "serve":
            return _serve(args)
        return _chat(args)
    except BrokenPipeError:  # `llava-nb chat ... | head -1`: the reader left
        _silence_stdout()
        return 1
    except KeyboardInterrupt:  # before the session started (a slow --image URL, say)
        print(file=sys.stderr)
        return 130


def _unknown_argument(argument: str, command: str) -> str:
    if argument.startswith("-"):
        return f"unknown option {argument!r}; {PROG} {command} --help lists the options"
    if command == "chat":
        return (
            "questions are not arguments: type them at the prompt, or pipe them in "
            f"(echo QUESTION | {PROG} chat ...)"
        )
    return f"unexpected argument {argument!r}; {PROG} {command} --help lists the arguments"


def _silence_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so the exit-time flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _error(message: object, stream: TextIO | None = None) -> None:
    print(f"{PROG}: {_for_the_terminal(message)}", file=stream or sys.stderr, flush=True)


class _Progress(io.TextIOBase):
    """Where the model's progress lines go in the terminal chat (stderr, so stdout holds only
    answers), with the command's own prefix in place of the shared `llava_nb: `."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._line_start = True

    def write(self, text: str) -> int:
        if self._line_start and text.startswith("llava_nb: "):
            text = f"{PROG}: {text[len('llava_nb: ') :]}"
        text = text.replace("\nllava_nb: ", f"\n{PROG}: ")
        if text:
            self._line_start = text.endswith("\n")
        self.stream.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _for_the_terminal(message: object) -> str:
    """One line, one prefix, and the terminal's fix where a shared message names a
    notebook's."""
    text = " ".join(str(message).split()) or "unknown error"
    text = re.sub(r"^(llava[-_]nb: )+", "", text)
    for notebook, terminal in NOTEBOOK_FIXES:  # "{}": the name the message gives, kept
        pattern = re.escape(notebook).replace(re.escape("{}"), "(.+?)")
        text = re.sub(pattern, terminal.replace("{}", r"\g<1>"), text)
    return text


def _default_model() -> str:
    """The default model id; its notice (the offline demo instead) names --model."""
    from llava_nb.models import default_model_id

    notice = io.StringIO()
    with redirect_stderr(notice):
        model = default_model_id()
    if notice.getvalue().strip():
        _error(notice.getvalue())
    return model


# ---------------------------------------------------------------- serve


def _serve(args: argparse.Namespace) -> int:
    try:
        from llava_nb.server import run_server

        run_server(
            args.model or _default_model(),
            host=args.host,
            port=args.port,
            api_key=args.api_key,
            quantization=args.quantization,
            device=args.device,
            max_concurrency=args.max_concurrency,
            allow_image_urls=args.allow_image_urls,
            allowed_local_media_path=args.allowed_local_media_path,
        )
    except ImportError as e:
        if (e.name or "").partition(".")[0] in SERVE_MODULES:
            print(SERVE_EXTRA, file=sys.stderr, flush=True)
            return 1
        raise
    except LlavaError as e:
        _error(e)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


# ---------------------------------------------------------------- chat


def _chat(args: argparse.Namespace) -> int:
    from llava_nb.chat import Chat
    from llava_nb.images import load_image
    from llava_nb.models import get_model
    from llava_nb.remote import is_remote

    chat_parser = args.subparser  # its error(): usage errors exit 2
    settings = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
    }
    images = []
    for source in args.image:  # a bad image on the command line is a usage error
        try:
            images.append(load_image(source))
        except LlavaError as e:
            chat_parser.error(str(e))
    try:
        model = get_model(
            args.model or _default_model(),
            quantization=args.quantization,
            device=args.device,
            remote_model=args.remote_model,
            api_key=args.api_key,
        )
        chat = Chat(model, **settings)
    except LlavaError as e:
        chat_parser.error(str(e))
    if is_remote(model.model_id):
        local_only = [f"--{args.quantization}"] if args.quantization != "auto" else []
        local_only += ["--device"] if args.device else []
        if local_only:
            flags = " and ".join(local_only)
            verb = "is" if len(local_only) == 1 else "are"
            chat_parser.error(
                f"{flags} {verb} for local weights; with a server URL the server loads the "
                f"model: leave out {flags}"
            )
    else:
        for flag, value in (("--api-key", args.api_key), ("--remote-model", args.remote_model)):
            if value:
                chat_parser.error(
                    f"{flag} is for a server URL (openai:http://host:port/v1); leave it out"
                )
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):  # no line or answer dies on a stray byte
            stream.reconfigure(errors="replace")
    stdin = sys.stdin or io.StringIO()  # no stdin at all (a detached process): no questions
    session = ChatSession(
        chat,
        images=images,
        quantization=args.quantization,
        device=args.device,
        api_key=args.api_key,
        interactive=stdin.isatty(),
        stdin=stdin,
    )
    return session.run()


class ChatSession:
    """The read-answer loop of `llava-nb chat` over one `Chat`.

    Interactive (stdin is a terminal): a `you> ` prompt with readline editing, a banner, and the
    model loaded up front. Piped: one question or /command per line, no prompts or banners, and
    Ctrl-C ends the run. Either way stdout holds only the answers; everything else, what
    commands show included, goes to stderr.
    """

    def __init__(
        self,
        chat: Any,
        *,
        images: list | None = None,
        quantization: str = "auto",
        device: str | None = None,
        api_key: str | None = None,
        interactive: bool = False,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
    ) -> None:
        self.chat = chat
        self.pending = list(images or [])  # images for the next question
        self.quantization = quantization
        self.device = device
        self.api_key = api_key  # for /model with a server URL
        self.interactive = interactive
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.failed = False  # a question or command failed (piped mode then exits 1)
        self._readline: Any = None
        self._quit = False
        # ends each answer: a blank line before the next prompt, one answer a line in a file
        self._end = "\n\n" if interactive and self.stdout.isatty() else "\n"

    # --- output

    def _out(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()

    def _show(self, text: str) -> None:
        """What a command shows (not an answer): on stderr, so stdout holds only answers."""
        self.stdout.flush()
        self.stderr.write(text)
        self.stderr.flush()

    def _shown(self, text: str, stream: TextIO | None = None) -> str:
        """Model text for a terminal: control characters (escape sequences that move the
        cursor, clear the screen or retitle the window, from a remote server as much as from
        the model) shown as U+FFFD. Piped output stays exact."""
        return CONTROL.sub("\ufffd", text) if (stream or self.stdout).isatty() else text

    def _info(self, text: str) -> None:
        text = CONTROL.sub("\ufffd", text) if self.stderr.isatty() else text  # a file's names
        print(f"{PROG}: {text}", file=self.stderr, flush=True)

    def _fail(self, error: object) -> None:
        self.failed = True
        self.stdout.flush()
        _error(error, self.stderr)

    # --- the loop

    def run(self) -> int:
        if self.interactive:
            self._setup_readline()
            model = self.chat.model.model_id
            self._info(f"chat with {model}; /help lists commands, Ctrl-C stops an answer")
            self._load(self.chat.model)
        armed = False  # the last prompt ended in Ctrl-C on an empty line; one more quits
        while not self._quit:
            try:
                line = self._read()
            except KeyboardInterrupt:
                if not self.interactive:
                    return 130
                editing = self._readline is not None and self._line_editing()
                empty = editing and not self._readline.get_line_buffer().strip()
                self._prompt_stream().write("\n")
                if empty and armed:
                    return 0
                armed = empty
                if empty:
                    self._info("press Ctrl-C again or Ctrl-D to quit")
                continue
            if line is None:  # EOF: Ctrl-D, or the end of piped input
                break
            armed = False
            try:
                self.handle(line)
            except KeyboardInterrupt:  # during a command, or between the steps of an answer
                if not self.interactive:
                    return 130
                if _is_command(line):
                    self._info(f"{line.split()[0]} stopped")
                else:
                    self._out(INTERRUPTED + self._end)
            except BrokenPipeError:
                raise
            except Exception as e:  # a bug, not bad input: say so, and keep the conversation
                self._fail(f"unexpected error ({type(e).__name__}: {e}); please report it")
        return 1 if self.failed and not self.interactive else 0

    def _setup_readline(self) -> None:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:  # not on every platform; input() still works
            return
        self._readline = sys.modules["readline"]

    def _prompt_stream(self) -> TextIO:
        return self.stdout if self.stdout.isatty() else self.stderr

    def _line_editing(self) -> bool:
        """Lines are read with readline (which knows what a Ctrl-C interrupted)."""
        return self.stdin is sys.stdin and self._prompt_stream() is sys.stdout

    def _read(self) -> str | None:
        """The next line without its newline, or None at the end of input."""
        if self.interactive:
            stream = self._prompt_stream()
            if self._line_editing():
                try:
                    return input(PROMPT)  # readline editing needs the prompt passed here
                except EOFError:
                    stream.write("\n")  # the shell prompt starts on its own line
                    return None
            stream.write(PROMPT)
            stream.flush()
        line = self.stdin.readline()
        if not line:
            if self.interactive:
                self._prompt_stream().write("\n")
            return None
        return line.rstrip("\r\n")

    def handle(self, line: str) -> None:
        """One line: a /command or a question."""
        text = line.strip()
        if not text:
            return
        if _is_command(text):
            name, _, rest = text.partition(" ")
            command = getattr(self, f"_cmd_{name[1:]}", None)
            if command is None or not name[1:].isidentifier():
                self._fail(_unknown_command(name))
                return
            try:
                command(rest.strip())
            except LlavaError as e:
                self._fail(e)
            return
        self.ask(text[1:] if text.startswith("//") else text)

    # --- questions

    def ask(self, question: str) -> None:
        """Stream the answer to stdout; Ctrl-C stops it and keeps the partial turn."""
        chat = self.chat
        turns = len(chat.history)
        try:
            with redirect_stdout(_Progress(self.stderr)):  # the model's loading lines are progress
                pieces = chat.stream(question, list(self.pending))
        except LlavaError as e:
            self._fail(f"{e}{self._pending_hint()}")
            return
        except KeyboardInterrupt:
            self._out(INTERRUPTED + self._end)
            if not self.interactive:
                raise  # piped: Ctrl-C ends the run
            return
        printed = ""
        try:
            with closing(pieces), thinking_shown(self.chat, self.stderr) as thinking:
                for piece in pieces:
                    thinking.erase()
                    self._out(self._shown(piece))
                    printed += piece
        except KeyboardInterrupt:
            # the tokens made as the interrupt came are kept too: shown, the text is what is kept
            answer = chat.history[-1].answer if len(chat.history) > turns else printed
            rest = unshown(answer, printed)
            self._out(self._shown(rest) + INTERRUPTED + self._end)
            if not self.interactive:
                raise  # piped: Ctrl-C ends the run
        except LlavaError as e:
            if printed:
                self._out("\n")
            self._fail(f"{e}{self._pending_hint() if len(chat.history) == turns else ''}")
        else:
            answer = chat.history[-1].answer if len(chat.history) > turns else printed
            rest = unshown(answer, printed)
            self._out(self._shown(rest) + self._end)
        finally:
            if len(chat.history) > turns:  # the question was asked: its images are in the chat
                self.pending.clear()

    def _pending_hint(self) -> str:
        """After a failed question: the attached images stay for the next one, unless dropped
        (a server that takes no images refuses every question while they are attached)."""
        if not self.pending:
            return ""
        return f" ({_count(len(self.pending), 'image')} still attached: /image none drops them)"

    def _load(self, model: Any) -> bool:
        """Load `model` now (progress on stderr); say why not when it fails."""
        try:
            with redirect_stdout(_Progress(self.stderr)):
                model.load()
        except LlavaError as e:
            self._fail(e)
            return False
        except KeyboardInterrupt:
            if getattr(model, "loaded", False):  # a load cannot stop halfway: it finished
                self._info(f"{model.model_id} finished loading (a load cannot stop halfway)")
                return True
            self._info("loading stopped; the model loads with the next question")
            return False
        return True

    # --- commands

    def _no_arguments(self, name: str, rest: str) -> None:
        if rest:
            raise LlavaError(f"/{name} takes no arguments; /help lists the commands")

    def _one_argument(self, name: str, rest: str, what: str) -> str:
        """The argument: quoted ('my photo.jpg'), escaped, or the rest of the line as it is."""
        if not rest:
            raise LlavaError(f"/{name} needs {what}: /{name} {what}")
        try:
            words = shlex.split(rest)
        except ValueError:
            words = []
        return words[0] if len(words) == 1 else rest

    def _cmd_help(self, rest: str) -> None:
        self._show(CHAT_HELP + "\n")

    def _cmd_quit(self, rest: str) -> None:
        self._no_arguments("quit", rest)
        self._quit = True

    _cmd_exit = _cmd_quit

    def _cmd_image(self, rest: str) -> None:
        from llava_nb.images import load_image

        source = self._one_argument("image", rest, "PATH")
        if source.lower() == "none":
            dropped, self.pending = len(self.pending), []
            self._info(f"dropped {_count(dropped, 'attached image')}")
            return
        self.pending.append(load_image(source))
        count = len(self.pending)
        self._info(
            f"image {source} attached to the next question"
            + (f" ({count} images)" if count > 1 else "")
        )

    def _cmd_undo(self, rest: str) -> None:
        self._no_arguments("undo", rest)
        turn = self.chat.undo()
        if turn is None:
            self._info("nothing to undo")
        else:
            question = turn.question if len(turn.question) <= 60 else turn.question[:57] + "..."
            self._info(f"removed {question!r} and its answer")

    def _cmd_reset(self, rest: str) -> None:
        self._no_arguments("reset", rest)
        self.chat.reset()
        kept = f"; {_count(len(self.pending), 'image')} kept for the next question"
        kept = kept if self.pending else ""
        self._info(f"conversation reset{kept}")

    def _cmd_history(self, rest: str) -> None:
        self._no_arguments("history", rest)
        turns = self.chat.history
        if not turns:
            self._show("(no turns yet)\n")
        for turn in turns:
            images = f" [{_count(len(turn.images), 'image')}]" if turn.images else ""
            stopped = INTERRUPTED if turn.interrupted else ""
            question = self._shown(turn.question, self.stderr)  # a chat file's, too
            answer = self._shown(turn.answer, self.stderr)
            self._show(f"you:{images} {question}\nllava: {answer}{stopped}\n")

    def _cmd_save(self, rest: str) -> None:
        path = self.chat.save(self._one_argument("save", rest, "FILE"))
        self._info(f"saved the conversation ({_count(len(self.chat.history), 'turn')}) to {path}")

    def _cmd_open(self, rest: str) -> None:
        from llava_nb.chat import Chat, same_turns

        path = self._one_argument("open", rest, "FILE")
        opened = Chat.load(path, model=self.chat.model)  # this session's model answers
        held = self.chat.history
        if held and not same_turns(held, opened.history):  # never lose an unsaved conversation
            raise LlavaError(
                f"this conversation has {_count(len(held), 'turn')}; /save it or /reset first, "
                f"then /open {rest}"
            )
        saved_with = _saved_model(path)
        opened.settings = dict(self.chat.settings)  # and this session's settings
        self.chat = opened
        notes = []
        if saved_with and saved_with != self.chat.model.model_id:
            notes.append(f"it was saved with {saved_with} (/model {saved_with} switches to it)")
        if opened.adapter and not os.path.isdir(opened.adapter):
            notes.append(
                f"its adapter {opened.adapter} is not here (/adapter none: the base model)"
            )
        note = "".join(f"; {n}" for n in notes)
        self._info(f"opened {path} ({_count(len(opened.history), 'turn')}){note}")

    def _cmd_adapter(self, rest: str) -> None:
        if not rest:
            self._info(f"adapter: {self.chat.adapter or 'none (the base model)'}")
            return
        folder = self._one_argument("adapter", rest, "FOLDER")
        with redirect_stdout(_Progress(self.stderr)):  # the model's loading lines are progress
            self.chat.use_adapter(None if folder.lower() == "none" else folder)
        self._info(f"answering with {self.chat.adapter or 'the base model'}")

    def _cmd_model(self, rest: str) -> None:
        if rest:
            self._switch_model(self._one_argument("model", rest, "NAME"))
            return
        status = dict(self.chat.model.status())
        if isinstance(status.get("memory"), int):
            status["memory"] = _size(status["memory"])
        status["turns"] = len(self.chat.history)
        if self.pending:
            status["images for the next question"] = len(self.pending)
        status.update(
            (key, value) for key, value in self.chat.settings.items() if value is not None
        )
        width = max(len(key) for key in status)
        lines = [f"{key:<{width}}  {value}" for key, value in status.items() if value is not None]
        self._show("\n".join(lines) + "\n")

    def _switch_model(self, name: str) -> None:
        from llava_nb.models import get_model

        old = self.chat.model
        new = get_model(
            name, quantization=self.quantization, device=self.device, api_key=self.api_key
        )
        if new is old:
            self._info(f"already using {old.model_id}")
            return
        if not self._load(new):  # a bad name leaves the model as it was
            self._info(f"still using {old.model_id}")
            return
        self.chat.model = new
        if old.loaded:
            old.unload()  # one model in memory at a time
        turns = _count(len(self.chat.history), "turn")
        self._info(f"now using {new.model_id}; the conversation ({turns}) continues")


class _ThinkingLine:
    """`THINKING` on a terminal while a reasoning model thinks: a server streams no answer
    meanwhile, for a minute at times, which looked hung. Shown once per answer, erased in
    place (carriage return) so the answer starts where it stood."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.shown = self.over = False

    def show(self, reasoning: str = "") -> None:
        if self.shown or self.over:
            return
        self.stream.write(THINKING)
        self.stream.flush()
        self.shown = True

    def erase(self) -> None:
        if self.shown:
            self.stream.write("\r" + " " * len(THINKING) + "\r")
            self.stream.flush()
        self.shown, self.over = False, True


def unshown(answer: str, printed: str) -> str:
    """What the chat kept of `answer` beyond the `printed` pieces (tokens made as the stream
    ended or was interrupted); nothing when the kept text does not continue what was shown."""
    return answer[len(printed) :] if answer.startswith(printed) else ""


@contextmanager
def thinking_shown(chat: Any, stream: TextIO) -> Iterator[_ThinkingLine]:
    """A `_ThinkingLine` on `stream` that `chat`'s reasoning model shows, on a terminal only
    (terminal chat, IPython in a terminal); the caller erases it when the answer starts, the
    exit in any case."""
    line = _ThinkingLine(stream)
    unfollow = chat.on_thinking(line.show) if stream.isatty() else lambda: None
    try:
        yield line
    finally:
        unfollow()
        line.erase()


def _unknown_command(name: str) -> str:
    """The fix for a line that starts with a slash but no command: a file's path (dragged
    into the terminal), or a question that starts with a slash."""
    if os.path.isfile(os.path.expanduser(name)):
        return f"unknown command {name!r}; /image {name} attaches that file"
    slash = (
        "" if name[1:].isidentifier() else " (start a question with // to begin it with a slash)"
    )
    return f"unknown command {name!r}; /help lists the commands{slash}"


def _is_command(line: str) -> bool:
    text = line.strip()
    return text.startswith("/") and not text.startswith("//")


def _saved_model(path: str) -> str | None:
    import json
    from pathlib import Path

    try:
        return json.loads(Path(path).expanduser().read_text()).get("model")
    except (OSError, ValueError, AttributeError):
        return None


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e7 else f"{n / 1e6:.2f} MB"


if __name__ == "__main__":
    raise SystemExit(main())
