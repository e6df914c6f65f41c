"""`%%llava_finetune`: the arguments of `ln.finetune` as a YAML body.

    %%llava_finetune -o run
    data: train.json            # a path, or $variable for a dataset in the notebook
    image_folder: images/
    eval_data: $eval_set
    stage: instruct
    max_steps: 200
    output_dir: adapters/my-run

The model is the one `%llava` uses unless the body names one.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Hashable
from typing import Any

from llava_nb.errors import LlavaError

EXTRA_KEYS = ("image_folder",)
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # 1e-3, 2.5E4: what YAML 1.1 misses


def _parameters() -> list[str]:
    from llava_nb.training.train import finetune

    names = [n for n in inspect.signature(finetune).parameters if n != "callbacks"]
    return [*names, *EXTRA_KEYS]


def _no_repeated_keys(loader, node):
    """A YAML mapping as a dict, refusing a key written twice (plain YAML keeps the last)."""
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        line = key_node.start_mark.line + 1
        if not isinstance(key, Hashable):  # [a, b]: 1 or a nested mapping as a key
            raise LlavaError(f"%%llava_finetune: line {line} has no key name; use key: value lines")
        if key in seen:
            raise LlavaError(f"%%llava_finetune: {key!r} is set twice (line {line}); keep one")
        seen.add(key)
    return loader.construct_mapping(node)


def parse_body(cell: str) -> dict[str, Any]:
    """The body as a dict of finetune arguments; a one-line error for anything else."""
    import yaml

    from llava_nb.training.train import unknown_setting

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_repeated_keys)
    try:
        body = yaml.load(cell, Loader) if cell.strip() else {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise LlavaError(
            f"%%llava_finetune: the body is not valid YAML{line}; use key: value lines"
        ) from None
    if not isinstance(body, dict):
        raise LlavaError("%%llava_finetune: the body must be key: value lines (YAML)")
    for key in ("lr", "projector_lr", "dropout", "warmup", "epochs"):  # YAML 1.1 reads 1e-3
        if isinstance(body.get(key), str) and _FLOAT.fullmatch(body[key]):  # (no dot) as text
            body[key] = float(body[key])
    known = _parameters()
    for key in body:
        if key not in known:
            raise LlavaError(f"%%llava_finetune: {unknown_setting(key, known, 'key')}")
    if "data" not in body:
        raise LlavaError("%%llava_finetune: no data; add a line data: train.json")
    return body


def _resolve(value: Any, namespace: dict[str, Any]) -> Any:
    """`$name` is the notebook variable `name`; anything else is taken as written."""
    if isinstance(value, str) and value.startswith("$"):
        name = value[1:]
        if name not in namespace:
            raise LlavaError(f"%%llava_finetune: no notebook variable named {name!r}")
        return namespace[name]
    return value


def run_cell(magics, line: str, cell: str):
    from llava_nb.data import load
    from llava_nb.magics import _identifier, _Parser, _split
    from llava_nb.training.train import finetune

    parser = _Parser(prog="%%llava_finetune", add_help=False)
    parser.add_argument("-o", "--output", type=_identifier)
    args = parser.parse_args(_split(line))
    namespace = magics.shell.user_ns if magics.shell else {}
    body = {key: _resolve(value, namespace) for key, value in parse_body(cell).items()}
    image_folder = body.pop("image_folder", None)
    for key in ("data", "eval_data"):
        if body.get(key) is not None:
            body[key] = load(body[key], image_folder)
    if "model" not in body:  # the %llava model, only when the body names none
        body["model"] = magics._current_model()
    run = finetune(**body)
    if args.output:
        namespace[args.output] = run
        return None
    return run
