"""llava_nb: ask LLaVA vision-language models about images from a notebook.

    %load_ext llava_nb
    %%llava -i photo.jpg
    What is in this picture?

Importing this package is cheap: torch and transformers load with the first model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from llava_nb.errors import LlavaError

__version__ = "0.1.0"
__all__ = [
    "Chat",
    "LlavaError",
    "Model",
    "RemoteModel",
    "Turn",
    "load_image",
    "load_ipython_extension",
    "testing",
]

_LAZY = {
    "Chat": "llava_nb.chat",
    "Turn": "llava_nb.chat",
    "Model": "llava_nb.models",
    "RemoteModel": "llava_nb.remote",
    "load_image": "llava_nb.images",
}

if TYPE_CHECKING:
    from llava_nb import testing
    from llava_nb.chat import Chat, Turn
    from llava_nb.images import load_image
    from llava_nb.models import Model
    from llava_nb.remote import RemoteModel


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "testing":
        return importlib.import_module("llava_nb.testing")
    raise AttributeError(f"module 'llava_nb' has no attribute {name!r}")


def load_ipython_extension(ipython) -> None:
    """`%load_ext llava_nb`: register the %llava / %%llava magics."""
    from llava_nb.magics import register

    register(ipython)
