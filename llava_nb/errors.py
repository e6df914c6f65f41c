"""Errors llava_nb raises on bad input. Every message names the problem and the fix."""


class LlavaError(Exception):
    """Base of every error llava_nb raises on bad input; front ends print its message."""

    def _render_traceback_(self) -> list[str]:
        """What IPython shows when a cell raises it (`chat.ask(image="missing.jpg")`, ...): the
        one line that names the problem and the fix, not a traceback through llava_nb."""
        return [f"{type(self).__name__}: {self}"]


def first_line(error: BaseException | str, limit: int = 200) -> str:
    """The first line of a library's error message (or its type), to quote in one of ours; with
    the next line when the first only introduces it ("Error(s) in loading state_dict for X:")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    text = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    return text if len(text) <= limit else text[: limit - 1] + "…"  # cut: say so
