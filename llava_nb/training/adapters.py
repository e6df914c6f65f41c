"""Adapters on a loaded model (hot swap), merging an adapter into a checkpoint, and comparing.

A loaded model keeps every adapter it was given (LoRA layers and saved modules injected with
PEFT, each under its own name); switching is a flag on each layer, so the base is never
reloaded. The few that PEFT cannot hold side by side (a LoRA inside a module another adapter
saves whole) make way for each other, and load again when next used. The model's class does
not change: everything that reads the model keeps working.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_nb.errors import LlavaError, first_line

# attribute on the loaded model: {key: adapter name}, for every adapter it has loaded; those
# in its peft_config are in it now
_REGISTRY = "_llava_nb_adapters"


class AdapterError(LlavaError):
    """An adapter folder is missing, not a PEFT adapter, or was built for another base model."""


def check_adapter(path: str | os.PathLike, *, merge: bool = False) -> Path:
    """The adapter folder, if it holds a PEFT adapter of a kind llava_nb can swap into a loaded
    model (with `merge`: merge into a checkpoint); else a clear error, before any model loads."""
    if not isinstance(path, str | os.PathLike) or not str(path).strip():
        raise AdapterError(f"an adapter is a folder path (a finetune output_dir), got {path!r}")
    folder = Path(path).expanduser()
    if folder.is_file():  # the weights or the run file, picked in a file browser
        beside = folder.parent / "adapter_config.json"
        fix = (
            f"its folder '{beside.parent.resolve()}'"
            if beside.is_file()
            else "a finetune output_dir"
        )
        raise AdapterError(f"'{path}' is a file, not an adapter folder; pass {fix}")
    if not folder.is_dir():
        raise AdapterError(f"adapter folder '{path}' not found; check the path (a finetune run)")
    if not (folder / "adapter_config.json").is_file():
        raise AdapterError(
            f"'{path}' holds no adapter (no adapter_config.json); point at a finetune output_dir"
        )
    _check_kind(folder.resolve(), merge)
    return folder.resolve()


KINDS = "LoRA (DoRA and rsLoRA too), LoHa, LoKr, IA3 and AdaLoRA"


def _check_kind(folder: Path, merge: bool) -> None:
    """Refuse the PEFT kinds that cannot work here, naming them: prompt learning adds tokens
    instead of changing weights, and VeRA-like kinds keep state shared across layers, which
    peft can only hold in a wrapped model (merging takes them)."""
    try:
        kind = json.loads((folder / "adapter_config.json").read_text()).get("peft_type")
    except (OSError, ValueError, AttributeError):
        return  # damaged: _read_adapter names the problem
    from peft.config import PromptLearningConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    config_class = PEFT_TYPE_TO_CONFIG_MAPPING.get(kind)
    if config_class is None:
        return  # a kind this peft does not know: _read_adapter says so
    if issubclass(config_class, PromptLearningConfig) or kind == "ADAPTION_PROMPT":
        raise AdapterError(
            f"'{folder}' is a {kind} adapter: it adds learned prompt tokens and has no weights "
            f"to swap into or merge with the model; train a LoRA adapter (ln.finetune), or use "
            f"one of the kinds llava_nb takes: {KINDS}"
        )
    if not merge and getattr(PEFT_TYPE_TO_TUNER_MAPPING.get(kind), "uses_shared_state", False):
        raise AdapterError(
            f"'{folder}' is a {kind} adapter, whose layers share state that peft cannot swap "
            f"into a loaded model; merge it (ln.merge_adapter) and load the merged folder, or "
            f"use one of the kinds llava_nb swaps in: {KINDS}"
        )


WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_DAMAGED = "; train it again, or point at another adapter"


def _read_adapter(folder: Path, base_config) -> tuple[Any, dict[str, Any]]:
    """The adapter's PEFT config and weights (read once, on the CPU), checked before any of it
    goes into a model: both files complete (PEFT would look a missing file up on the hub, and a
    cut-off one fails deep in safetensors), a kind that changes weights, built for this base."""
    import peft
    from peft import PeftConfig
    from peft.utils import load_peft_weights

    file = folder / "adapter_config.json"
    try:
        config = PeftConfig.from_pretrained(str(folder))
    except KeyError as e:  # peft's table of kinds has no such peft_type
        raise AdapterError(
            f"'{file}' names an adapter kind this peft {peft.__version__} does not know ({e}); "
            "upgrade peft, or point at another adapter"
        ) from None
    except (OSError, ValueError, TypeError) as e:
        raise AdapterError(f"'{file}' is damaged ({first_line(e)}){_DAMAGED}") from None
    config.inference_mode = True
    _check_base(folder, config, base_config)
    weights = next((folder / n for n in WEIGHTS if (folder / n).is_file()), None)
    if weights is None:
        raise AdapterError(f"'{folder}' holds no adapter weights ({WEIGHTS[0]}){_DAMAGED}")
    try:
        state = load_peft_weights(str(folder), device="cpu")
    except Exception as e:  # safetensors' own error type, torch's unpickling, or OSError
        raise AdapterError(f"'{weights}' is damaged ({first_line(e)}){_DAMAGED}") from None
    return config, state


def _check_base(folder: Path, adapter_config, config) -> None:
    """Refuse an adapter built for another LLaVA family: a NeXT adapter fits a 1.5 model's
    shapes, so loading alone would not tell, and the answers would be quietly off."""
    from llava_nb.training.train import fingerprint, read_run

    fix = "delete it to use the folder as a plain PEFT adapter"
    record = read_run(folder, AdapterError, fix)
    if record is None:  # a plain PEFT adapter from elsewhere: peft records the base's class
        _check_family(folder, adapter_config, config)
        return  # shapes are checked when loading
    shape = record["config"].get("base_shape")
    if shape and shape != fingerprint(config):
        base = record["config"].get("base")
        raise AdapterError(
            f"adapter '{folder}' was built for another base model ({base}); "
            "use it with that model, or train one for this model"
        )


def _check_family(folder: Path, adapter_config, config) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from llava_nb.models import FAMILIES

    trained_on = (adapter_config.auto_mapping or {}).get("base_model_class")
    families = {MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[f]: f for f in FAMILIES}
    family = families.get(trained_on)
    if family is not None and family != config.model_type:
        base = adapter_config.base_model_name_or_path or trained_on
        raise AdapterError(
            f"adapter '{folder}' was built for a {FAMILIES[family]} model ({base}), not this "
            f"{FAMILIES.get(config.model_type, config.model_type)} one; use it with that model"
        )


def _key(folder: Path) -> str:
    weights = [folder / n for n in WEIGHTS]
    stamp = max((w.stat().st_mtime_ns for w in weights if w.exists()), default=0)
    return f"{folder}@{stamp}"  # an adapter trained again in the same folder loads afresh


def _load_weights(model, state: dict[str, Any], name: str) -> None:
    """Put an adapter's weights into the layers PEFT made for it: all of them and nothing else.
    PEFT only warns when names miss: a LoRA layer would keep its random start, and a merged
    checkpoint would be the base unchanged under a new name."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    expected, saved = set(get_peft_model_state_dict(model, adapter_name=name)), set(state)
    if saved - expected:
        raise ValueError(f"unexpected weights such as {min(saved - expected)}")
    if expected - saved:
        raise ValueError(f"missing weights such as {min(expected - saved)}")
    set_peft_model_state_dict(model, state, adapter_name=name)


def _inject(model, folder: Path, name: str) -> str | None:
    """Put `folder`'s adapter into the model under `name`; None, or why it does not fit (the
    model then stays as it was)."""
    from peft import inject_adapter_in_model

    config, state = _read_adapter(folder, model.config)
    _check_quantized(folder, config, model)
    state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
    try:
        with warnings.catch_warnings():  # several adapters on one model is the design here
            warnings.filterwarnings("ignore", "Already found a `peft_config`", UserWarning)
            inject_adapter_in_model(config, model, adapter_name=name)
        _load_weights(model, state, name)
    except (ValueError, RuntimeError, KeyError) as e:
        _remove(model, name)
        return first_line(e)
    model.eval()
    return None


def _check_quantized(folder: Path, config, model) -> None:
    """Refuse a kind peft has no 4-bit/8-bit layers for (LoHa, LoKr): it would be built from
    the packed weights' shapes and fail, or answer wrongly."""
    import importlib.util

    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    bits = next((b for b in (4, 8) if getattr(model, f"is_loaded_in_{b}bit", False)), None)
    tuner = PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type]
    if bits and importlib.util.find_spec(f"{tuner.__module__.rpartition('.')[0]}.bnb") is None:
        kind = getattr(config.peft_type, "value", config.peft_type)
        raise AdapterError(
            f"'{folder}' is a {kind} adapter, which peft cannot put on {bits}-bit weights; load "
            "the model with quantization='none', or merge the adapter (ln.merge_adapter) and "
            "load the merged folder"
        )


def _take_out_all(model) -> None:
    """Unwrap every adapter layer: the model as it was loaded. PEFT cannot put a LoRA layer
    into a module another adapter saves whole (modules_to_save), nor the reverse."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    kinds = (BaseTunerLayer, AuxiliaryTrainingWrapper)
    wrappers = [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]
    for name, module in sorted(wrappers, key=lambda item: -item[0].count(".")):  # innermost first
        if isinstance(module, ModulesToSaveWrapper):
            plain = module.original_module
        elif isinstance(module, AuxiliaryTrainingWrapper):
            plain = module.unload_and_optionally_merge_module(False, False, None)
        else:
            plain = module.get_base_layer()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, plain)
    if hasattr(model, "peft_config"):
        del model.peft_config


def _remove(model, name: str) -> None:
    """Take a half-injected adapter out again: the model stays as it was, and the next
    adapter does not find this one's layers and config."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            with warnings.catch_warnings():  # "... was active which is now deleted": it was not
                warnings.filterwarnings("ignore", ".*which is now deleted", UserWarning)
                module.delete_adapter(name)
        elif isinstance(module, AuxiliaryTrainingWrapper) and name in module._adapters:
            module.delete_adapter(name, new_active_adapters=[])
    configs = getattr(model, "peft_config", None)
    if configs is not None:
        configs.pop(name, None)
        if not configs:  # as before the first adapter
            del model.peft_config


def activate(model, path: str | os.PathLike | None) -> None:
    """Make `path`'s adapter the active one on a loaded model (None: the base), loading it the
    first time. Call it holding the `Model`'s lock."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    adapters: dict[str, str] = getattr(model, _REGISTRY, None) or {}
    name = None
    if path is not None:
        try:
            folder = check_adapter(path)
        except AdapterError as e:  # a chat's adapter, deleted since: the chat can go on without
            if isinstance(path, str | os.PathLike) and os.path.exists(path):
                raise  # there, but not an adapter folder: the message says what to pass
            raise AdapterError(
                f"{e}; use_adapter(None) (%llava adapter none) answers with the base model"
            ) from None
        key = _key(folder)
        name = adapters.get(key, f"llava_nb_{len(adapters)}")
        if name not in getattr(model, "peft_config", {}):  # new, or taken out to make way
            with torch.inference_mode(False):
                misfit = _inject(model, folder, name)
                if misfit is not None and getattr(model, "peft_config", None):
                    _take_out_all(model)  # it may fit beside none (they load again when used)
                    misfit = _inject(model, folder, name)
            if misfit is not None:
                raise AdapterError(
                    f"adapter '{folder}' does not fit this model ({misfit}); it was built for "
                    "another base model"
                )
            adapters[key] = name  # never dropped: a new key means new weights (caches go)
            setattr(model, _REGISTRY, adapters)
        name = adapters[key]
    if not adapters:
        return
    for module in model.modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            has = name is not None and name in module._adapters
            module.enable_adapters(has)
            if has:
                module.set_adapter(name, inference_mode=True)
        elif isinstance(module, BaseTunerLayer):
            module.enable_adapters(name is not None)
            if name is not None:
                module.set_adapter(name, inference_mode=True)


# ---------------------------------------------------------------- merge


def merge_adapter(model: Any, adapter: str | os.PathLike, output_dir: str | os.PathLike) -> str:
    """Write base + adapter as one full checkpoint (loads with `ln.Model(output_dir)` or plain
    transformers). The base is loaded unquantized for this: merging into 4-bit weights loses
    precision. Returns the folder."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from llava_nb.models import _pick_dtype, pick_device
    from llava_nb.training.train import (
        base_id,
        load_processor_and_config,
        quiet_loading,
        unwritable,
    )

    folder = check_adapter(adapter, merge=True)
    if not isinstance(output_dir, str | os.PathLike) or not str(output_dir).strip():
        raise AdapterError(f"output_dir must be a folder path, got {output_dir!r}")
    out = Path(output_dir).expanduser()
    why = unwritable(out)
    if why is not None:
        raise AdapterError(
            f"output folder '{output_dir}' cannot be written ({why}); choose another folder"
        )
    if out.exists() and any(out.iterdir()):
        raise AdapterError(f"output folder '{output_dir}' is not empty; choose a new folder")
    model_id = base_id(model)
    processor, config = load_processor_and_config(model_id)
    adapter_config, state = _read_adapter(folder, config)
    device = pick_device()
    with quiet_loading():
        base = AutoModelForImageTextToText.from_pretrained(
            model_id, dtype=_pick_dtype(device), device_map={"": device}
        )
        try:
            tuned = PeftModel(base, adapter_config)
            _load_weights(tuned, state, "default")
        except (ValueError, RuntimeError, KeyError) as e:
            raise AdapterError(
                f"adapter '{adapter}' does not fit '{model_id}' ({first_line(e)}); it was built "
                "for another base model"
            ) from None
        merged = tuned.merge_and_unload()
        out.mkdir(parents=True, exist_ok=True)
        merged.save_pretrained(out)
        processor.save_pretrained(out)
    return str(out)


# ---------------------------------------------------------------- compare


@dataclass
class Comparison:
    """Base and tuned answers to the same questions; renders as a side-by-side table."""

    rows: list[dict[str, Any]]

    def __repr__(self) -> str:
        lines = []
        for row in self.rows:
            lines += [
                f"Q: {row['question']}",
                f"  base:  {row['base']}",
                f"  tuned: {row['tuned']}",
            ]
            if row.get("expected"):
                lines.append(f"  expected: {row['expected']}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        import html

        from llava_nb.images import image_to_data_uri

        expected = any(row.get("expected") for row in self.rows)
        head = "<th>image</th><th>question</th><th>base</th><th>tuned</th>"
        head += "<th>expected</th>" if expected else ""
        body = []
        for row in self.rows:
            thumbs = "".join(
                f'<img src="{image_to_data_uri(_thumbnail(image))}" style="max-height:80px">'
                for image in row["images"]
            )
            cells = [thumbs, row["question"], row["base"], row["tuned"]]
            cells += [row.get("expected") or ""] if expected else []
            body.append(
                "<tr>"
                + "".join(
                    f"<td>{c if i == 0 else html.escape(str(c))}</td>" for i, c in enumerate(cells)
                )
                + "</tr>"
            )
        return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _thumbnail(image):
    image = image.copy()
    image.thumbnail((160, 160))
    return image


_QUESTION_FORMS = 'a list of questions ("What is this?") or (question, image) pairs, or a dataset'


def _compare_items(questions: Any) -> list[tuple[str, list, str | None]]:
    """(question, images, expected) for each question; a clear error for any other shape,
    since a string or a dict would otherwise be iterated into nonsense questions."""
    from llava_nb.data import Dataset
    from llava_nb.images import load_image

    if isinstance(questions, Dataset):
        turns = [s.turns[0] for s in questions if not s.problem and s.turns]
        items = [(t.question, [load_image(i) for i in t.images], t.answer) for t in turns]
        if not items:
            raise AdapterError("nothing to compare: the dataset has no usable row; see validate()")
        return items
    if not isinstance(questions, list | tuple):
        hint = " (for one question, wrap it in a list)" if isinstance(questions, str) else ""
        raise AdapterError(
            f"questions is a {type(questions).__name__}{hint}; pass {_QUESTION_FORMS}"
        )
    if not questions:
        raise AdapterError(f"nothing to compare; pass {_QUESTION_FORMS}")
    items = []
    for position, entry in enumerate(questions):
        question, image = entry, None
        if isinstance(entry, list | tuple) and len(entry) == 2:
            question, image = entry
        if not isinstance(question, str) or not question.strip():
            raise AdapterError(
                f"questions[{position}] is {entry!r:.60}; give a question string or a "
                "(question, image) pair"
            )
        images = image if isinstance(image, list | tuple) else [] if image is None else [image]
        items.append((question, [load_image(i) for i in images], None))
    return items


def compare(
    model: Any,
    adapter: str | os.PathLike,
    questions: Any,
    *,
    max_new_tokens: int = 64,
) -> Comparison:
    """Ask the base model and the tuned one the same questions (greedy), side by side.

    `questions`: a list of question strings or (question, image) pairs, or an `ln.data` dataset
    (the first turn of each row, with its answer shown as expected). `model`: the `ln.Model`,
    id or folder.
    """
    from llava_nb.models import get_model

    items = _compare_items(questions)  # before loading anything: a mistake here is quick to see
    check_adapter(adapter)
    model = get_model(model)
    if not hasattr(model, "load"):
        raise AdapterError("compare needs a local model; adapters do not apply to a server")
    rows = []
    for question, images, expected in items:
        content = [{"type": "image", "image": image} for image in images]
        messages = [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]
        answers = {}
        for label, which in (("base", None), ("tuned", str(adapter))):
            generation = model.generate(messages, max_new_tokens=max_new_tokens, adapter=which)
            answers[label] = generation.wait().strip()
        rows.append({"question": question, "images": images, **answers, "expected": expected})
    return Comparison(rows)
