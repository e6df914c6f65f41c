"""Errors llava_nb raises on bad input. Every message names the problem and the fix."""


class LlavaError(Exception):
    """Base of every error llava_nb raises on bad input; front ends print its message."""
