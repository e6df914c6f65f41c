"""llava_nb: ask LLaVA vision-language models about images from a notebook.

    %load_ext llava_nb
    %%llava -i photo.jpg
    What is in this picture?

Importing this package is cheap: torch and transformers load with the first model.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

from llava_nb.errors import LlavaError

__version__ = "0.1.0"
__all__ = [
    "AttentionMap",
    "Chat",
    "ChatPanel",
    "LlavaError",
    "Model",
    "RemoteModel",
    "Turn",
    "compare",
    "data",
    "demo",
    "finetune",
    "last_attention",
    "load_image",
    "load_ipython_extension",
    "merge_adapter",
    "testing",
]

_LAZY = {
    "AttentionMap": "llava_nb.attention",
    "last_attention": "llava_nb.attention",
    "Chat": "llava_nb.chat",
    "Turn": "llava_nb.chat",
    "ChatPanel": "llava_nb.panel",
    "Model": "llava_nb.models",
    "RemoteModel": "llava_nb.remote",
    "load_image": "llava_nb.images",
    "finetune": "llava_nb.training.train",
    "merge_adapter": "llava_nb.training.adapters",
    "compare": "llava_nb.training.adapters",
}


def _quiet_optional_kernels(record: logging.LogRecord) -> bool:
    """bitsandbytes warns when imported (by us or by peft), on some CPUs, that an optional kernel
    from the Hugging Face hub (the `kernels` package) is missing; it runs without it."""
    return "from kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_quiet_optional_kernels)

if TYPE_CHECKING:
    from llava_nb import data, demo, testing
    from llava_nb.attention import AttentionMap, last_attention
    from llava_nb.chat import Chat, Turn
    from llava_nb.images import load_image
    from llava_nb.models import Model
    from llava_nb.panel import ChatPanel
    from llava_nb.remote import RemoteModel
    from llava_nb.training.adapters import compare, merge_adapter
    from llava_nb.training.train import finetune


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in ("data", "demo", "testing"):
        return importlib.import_module(f"llava_nb.{name}")
    raise AttributeError(f"module 'llava_nb' has no attribute {name!r}")


def load_ipython_extension(ipython) -> None:
    """`%load_ext llava_nb`: register the %llava / %%llava magics."""
    from llava_nb.magics import register

    register(ipython)
