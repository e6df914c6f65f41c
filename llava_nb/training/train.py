"""`finetune`: LoRA / QLoRA on a LLaVA checkpoint with transformers' `Trainer`, from a notebook.

The base is always loaded fresh for training (a 4-bit model that ran inference is repacked and
trains badly; a chat's loaded model is never touched). The output_dir holds a plain PEFT adapter
(projector, and vision tower when trained, as `modules_to_save`), Trainer checkpoints, and
`llava_nb_run.json` (settings, history, metrics, and how the last call ended: "running" while
it trains, "finished", "interrupted", or "failed" with the reason) that recognises the run when
it is resumed, and lets the next call say how the last one ended.
"""

from __future__ import annotations

import atexit
import contextlib
import difflib
import functools
import gc
import hashlib
import inspect
import json
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava_nb.data import Dataset, load
from llava_nb.errors import LlavaError, first_line

RUN_FILE = "llava_nb_run.json"
STAGES = ("align", "instruct")
METHODS = ("lora", "qlora")
TARGETS = {
    "language": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
}
DEFAULT_LR = {"align": 1e-3, "instruct": 2e-4}
COUNTS = ("r", "alpha", "max_steps", "batch_size", "grad_accum", "max_length", "save_every",
          "eval_every")  # fmt: skip
# settings a run records only when they differ from these defaults (runs recorded before the
# settings existed still resume); compared with the defaults filled in
OPTIONAL = {"projector_lr": None, "group_by_length": False, "start": None}
# recorded settings that are not finetune arguments as written: no "pass ..." hint for them
DERIVED = ("base", "base_shape", "data", "eval_data", "start")


class FinetuneError(LlavaError):
    """Fine-tuning could not start (bad settings, no trainable rows, a clash in output_dir) or
    stopped for a reason the user can fix (out of memory, a callback's error, a row that cannot
    be read now), saying where the training so far is kept."""


@dataclass
class FinetuneRun:
    """What a fine-tuning run produced. `adapter_path` is a plain PEFT adapter folder."""

    output_dir: str
    adapter_path: str
    status: str  # "finished" or "interrupted" (a failed call raises; its run file says "failed")
    step: int
    max_steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def interrupted(self) -> bool:
        return self.status == "interrupted"

    def __repr__(self) -> str:
        name = "eval_loss" if "eval_loss" in self.metrics else "train_loss"
        loss = self.metrics.get(name)
        shown = f", {name}={loss:.4f}" if isinstance(loss, float) else ""
        return (
            f"FinetuneRun({self.adapter_path!r}, {self.status}, "
            f"step={self.step}/{self.max_steps}{shown})"
        )


# ---------------------------------------------------------------- model and processor


def base_id(model: Any) -> str:
    """The checkpoint id or folder behind a `Model`, an id or a path."""
    from llava_nb.models import _source  # "demo" names a folder built on first use
    from llava_nb.remote import is_remote

    if hasattr(model, "remote_model") or is_remote(model):
        raise FinetuneError("fine-tuning needs local weights, not a server; pass a checkpoint")
    if isinstance(model, str | os.PathLike):  # "folder/" and "folder" are one base
        return _source(os.path.normpath(model))
    if hasattr(model, "model_id"):
        return _source(os.path.normpath(model.model_id))
    raise FinetuneError(
        f"model must be an ln.Model, a checkpoint id or a folder, not {type(model).__name__}"
    )


def load_processor_and_config(model: Any):
    """The processor and config of a `Model` (reusing a loaded one), id or folder."""
    from transformers import AutoProcessor

    from llava_nb.models import FAMILIES, _load_config

    processor = getattr(model, "processor", None)
    if processor is not None and getattr(model, "model", None) is not None:
        return processor, model.model.config
    model_id = base_id(model)
    config = _load_config(model_id)
    if config.model_type not in FAMILIES:
        raise FinetuneError(f"'{model_id}' is a {config.model_type!r} model, not LLaVA")
    return AutoProcessor.from_pretrained(model_id), config


def fingerprint(config) -> dict[str, Any]:
    """The shapes that decide whether an adapter fits a base model."""
    text, vision = config.text_config, config.vision_config
    return {
        "model_type": config.model_type,
        "text_hidden": text.hidden_size,
        "text_layers": text.num_hidden_layers,
        "vocab": text.vocab_size,
        "vision_hidden": vision.hidden_size,
    }


def _starting_point(model: Any) -> tuple[Any, Path | None]:
    """The base to train, and the stage "align" run to start from when `model` is one (its
    output_dir or FinetuneRun): the training then goes on from its projector (and vision tower,
    when it trained one) with no merge step in between, and its adapter, like any, loads on
    the plain base. A stage "instruct" adapter is no start: its LoRA would be left out."""
    if isinstance(model, FinetuneRun):
        model = model.adapter_path
    if not isinstance(model, str | os.PathLike) or not Path(model).expanduser().is_dir():
        return model, None
    folder = Path(model).expanduser().resolve()
    record = read_run(folder, FinetuneError, "pass its base model, or delete that run file")
    if record is None:
        return model, None  # a checkpoint folder
    if record["config"].get("stage") != "align":
        raise FinetuneError(
            f"'{model}' holds a stage {record['config'].get('stage')!r} adapter, which a new run "
            "cannot start from; merge it first (ln.merge_adapter(base, adapter, 'merged/')) and "
            "pass the merged folder"
        )
    if not (folder / "adapter_model.safetensors").is_file():
        raise FinetuneError(
            f"'{model}' holds no adapter yet; run ln.finetune with output_dir='{model}' to "
            "finish that alignment first"
        )
    return record["config"]["base"], folder


def _start_label(folder: Path) -> str:
    """The alignment adapter a run starts from, as its record names it: the folder and its
    weights' hash (the same folder trained again is another start)."""
    digest = hashlib.sha256()
    with open(folder / "adapter_model.safetensors", "rb") as weights:  # with a vision tower: GBs
        for block in iter(lambda: weights.read(1 << 20), b""):
            digest.update(block)
    return f"{folder} (sha256 {digest.hexdigest()[:16]})"


def _start_from(model, folder: Path) -> list[str]:
    """Put an alignment adapter's saved modules (the projector, the vision tower when it was
    trained) into the freshly loaded base; their names, to save them with the new adapter.
    Its LoRA is frozen at zero (stage "align"): nothing of it is left out."""
    from peft.utils import load_peft_weights

    state = load_peft_weights(str(folder), device="cpu")
    saved = {
        name.removeprefix("base_model.model."): weights
        for name, weights in state.items()
        if "lora_" not in name
    }
    unexpected = model.load_state_dict(saved, strict=False).unexpected_keys  # shapes: checked
    if unexpected:
        raise FinetuneError(
            f"'{folder}' does not fit its base ({unexpected[0]} is not in it); train the "
            "alignment again, or pass the base model"
        )
    return sorted({m for m in ("multi_modal_projector", "vision_tower") for n in saved if m in n})


def _device(preferred: str | None = None) -> str:
    """The `Model`'s device when it names one (one process); else this process's GPU, or CPU."""
    import torch

    if preferred and int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return preferred
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


@contextlib.contextmanager
def quiet_loading():
    """No per-shard progress bars from transformers (the run's own display is the progress), and
    no warnings about names transformers deprecated that peft still uses."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _load_for_training(model_id: str, method: str, device: str):
    import torch
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    from llava_nb.models import _import_bitsandbytes, _pick_dtype, keep_4bit_weights_as_loaded

    dtype = _pick_dtype(device) if device.startswith("cuda") else torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": {"": device}}
    if method == "qlora":
        _import_bitsandbytes()
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=["model.vision_tower", "model.multi_modal_projector", "lm_head"],
        )
    with quiet_loading():
        model = AutoModelForImageTextToText.from_pretrained(model_id, **kwargs)
    keep_4bit_weights_as_loaded(model)  # else the first evaluation repacks them, no backward
    return model


def _wrap(
    model, stage: str, method: str, r: int, alpha: int, dropout: float, target: str, vision,
    carried: list[str],
):  # fmt: skip
    """The PEFT model: LoRA on the language model only, projector (and vision tower) saved whole.

    Stage "align" trains the projector alone; its adapter still carries a frozen, zero LoRA so
    that plain PEFT loads it like any other. `carried`: modules a start adapter changed, saved
    with this one (so that it loads on the plain base), frozen unless this run trains them.
    """
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if method == "qlora":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=True,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
    names = TARGETS[target] if stage == "instruct" else ("q_proj",)
    pattern = rf".*\.language_model\..*\.({'|'.join(names)})"
    vision_saved = vision or "vision_tower" in carried
    saved = ["multi_modal_projector"] + (["vision_tower"] if vision_saved else [])
    config = LoraConfig(
        r=r if stage == "instruct" else 1,
        lora_alpha=alpha if stage == "instruct" else 1,
        lora_dropout=dropout if stage == "instruct" else 0.0,
        target_modules=pattern,
        modules_to_save=saved,
        task_type=None,
    )
    try:
        with warnings.catch_warnings():  # peft asks the model with a name deprecated in v5
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(model, config)
    except ValueError as e:
        raise FinetuneError(f"cannot put LoRA on this model's language model ({e})") from None
    for name, parameter in model.named_parameters():
        if (stage == "align" and "lora_" in name) or (not vision and "vision_tower" in name):
            parameter.requires_grad_(False)
    for parameter in model.parameters():  # trainable weights in fp32 (mixed precision on GPU)
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    return model


# ---------------------------------------------------------------- the run folder


def read_run(folder: Path, error: type[LlavaError], fix: str) -> dict[str, Any] | None:
    """The run file in `folder` (None: there is none); `error` saying `fix` if it is damaged."""
    file = folder / RUN_FILE
    if not file.is_file():
        return None
    try:
        record = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError):
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise error(f"'{file}' is damaged; {fix}")
    return record


def _read_run(output_dir: Path) -> dict[str, Any] | None:
    return read_run(output_dir, FinetuneError, "choose a new output_dir or delete that folder")


def _write_run(output_dir: Path, record: dict[str, Any]) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    temporary = output_dir / f".{RUN_FILE}.tmp"
    temporary.write_text(json.dumps(record, indent=1))
    os.replace(temporary, output_dir / RUN_FILE)


def unwritable(folder: Path) -> str | None:
    """Why `folder` cannot be made or written in (a file in the way, no permission, a read-only
    disk), found before any work; None if it can. A folder made to find out is removed."""
    blocked = next((p for p in (folder, *folder.parents) if p.is_file()), None)
    if blocked is not None:
        return f"'{blocked}' is a file"
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        return first_line(e)
    finally:
        for path in made:
            with contextlib.suppress(OSError):
                path.rmdir()
    return None


def _training_now(record: dict[str, Any]) -> int | None:
    """The id of another live process on this machine that recorded the run as "running"
    (two runs in one folder would write over each other's checkpoints); None otherwise."""
    pid = record.get("pid")
    if record.get("status") != "running" or pid == os.getpid():
        return None
    return pid if process_running(record) else None  # another machine's: cannot be asked


def this_process() -> dict[str, Any]:
    """This process as a file records it, for `process_running` to recognise later: its pid,
    the machine, and when it started (where /proc tells), which tells it from a later process
    given the same pid."""
    started = _process_start(os.getpid())
    return {"pid": os.getpid(), "host": socket.gethostname(),
            **({"started": started} if started is not None else {})}  # fmt: skip


def process_running(record: dict[str, Any]) -> bool | None:
    """Whether the process a record names (`this_process()`; "started" may be missing, as in
    files written before it was recorded) is still running; None where that cannot be told:
    another machine's process, or no pid."""
    pid, started = record.get("pid"), record.get("started")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    if record.get("host", socket.gethostname()) != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    except OSError:  # a pid beyond what this system gives out
        return False
    now = _process_start(pid)
    return not (isinstance(started, int) and now is not None and now != started)


def _process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot: field 22 of /proc/<pid>/stat), which
    tells it from a later process given the same pid; None where there is no /proc (not Linux)
    or no such process, and the pid alone is recorded."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        # the name (field 2) is in parentheses and may hold spaces: count from after it
        return int(stat.rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _check_output_dir(output_dir: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The earlier record of this same run (to resume), None for a fresh folder; else an error."""
    why = unwritable(output_dir)
    if why is not None:
        raise FinetuneError(
            f"output_dir '{output_dir}' cannot be written ({why}); choose another output_dir"
        )
    record = _read_run(output_dir)
    if record is None:
        if output_dir.exists() and any(output_dir.iterdir()):
            raise FinetuneError(
                f"output_dir '{output_dir}' is not empty and holds no llava_nb run; "
                "choose a new output_dir"
            )
        return None
    training = _training_now(record)
    if training is not None:
        raise FinetuneError(
            f"output_dir '{output_dir}' is in use: process {training} on this machine is "
            "training there now; wait for it to finish, or choose another output_dir"
        )
    previous = {**OPTIONAL, **record["config"]}
    for key in {**OPTIONAL, **config}:
        was, now = previous.get(key), config.get(key, OPTIONAL.get(key))
        if was != now:
            resume = "" if key in DERIVED else f"pass {key}={was!r} to resume it, "
            raise FinetuneError(
                f"output_dir '{output_dir}' holds a different run ({key} was {was!r}, now "
                f"{now!r}); {resume}choose a new output_dir, or delete that folder to start over"
            )
    return record


# ---------------------------------------------------------------- interrupts


def _load_stop_asked() -> bool:
    """An interrupt asked the model load this run is part of (the demo build) to stop."""
    from llava_nb.models import stop_asked

    return stop_asked()


class _RunControl:
    """What the run knows beside Trainer: whether a step has begun (a failure before the first
    one is the checkpoint's loading) and whether an interrupt asked it to stop. The first
    interrupt (kernel interrupt, Ctrl-C) means "save and stop after this step"; a second one
    stops at once, except while a checkpoint is being written (cut short, it could not be
    resumed from): training stops right after that anyway. Once training is over, any
    interrupt waits until the adapter and the run file are written (`writing`)."""

    def __init__(self) -> None:
        self.stepped = False
        self.in_step = False  # between a step's beginning and its end (the step it fails in)
        self.requested = False
        self.saving = False
        self.writing = False

    def callback(self):
        """The TrainerCallback that keeps this up to date and stops the run when asked."""
        from transformers import TrainerCallback

        run = self

        class RunControl(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                run.stepped = run.in_step = True

            def on_step_end(self, args, state, control, **kwargs):
                run.in_step = False
                if not run.requested and _load_stop_asked():  # training inside a model load
                    run.requested = True
                if run.requested:
                    control.should_save = True
                    control.should_training_stop = True

        return RunControl()

    @contextlib.contextmanager
    def installed(self, enabled: bool):
        if not enabled or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self.writing:
                print("llava_nb: writing the adapter; stopping as soon as it is written",
                      file=sys.stderr, flush=True)  # fmt: skip
                return
            if self.requested and self.saving:
                print("llava_nb: writing the checkpoint; stopping as soon as it is written",
                      file=sys.stderr, flush=True)  # fmt: skip
                return
            if self.requested:  # a second interrupt stops at once
                raise KeyboardInterrupt
            self.requested = True
            print(
                "llava_nb: interrupted; saving a checkpoint after this step "
                "(interrupt again to stop at once)",
                file=sys.stderr,
                flush=True,
            )

        signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------- finetune


def _check_settings(stage, method, target, numbers: dict[str, Any], flags: dict[str, Any]) -> None:
    if stage not in STAGES:
        raise FinetuneError(f"unknown stage {stage!r}; use 'align' (projector) or 'instruct'")
    if method not in METHODS:
        raise FinetuneError(f"unknown method {method!r}; use 'lora' or 'qlora'")
    if target not in TARGETS:
        raise FinetuneError(f"unknown target {target!r}; use {' or '.join(map(repr, TARGETS))}")
    for name, value in numbers.items():
        if value is None:
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if name in COUNTS:  # sizes and step counts: a float would fail deep in torch or peft
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise FinetuneError(f"{name} must be a whole number >= 1, got {value!r}")
        elif name in ("dropout", "warmup"):
            if not (number and 0 <= value < 1):
                raise FinetuneError(f"{name} must be a number in [0, 1), got {value!r}")
        elif not (number and value > 0 and math.isfinite(value)):  # lr, projector_lr, epochs
            raise FinetuneError(f"{name} must be a number > 0, got {value!r}")
    for name, value in flags.items():  # a YAML "no" or "false" string would read as true
        if not isinstance(value, bool):
            raise FinetuneError(f"{name} must be True or False, got {value!r}")


def _checked_callbacks(callbacks: Any) -> list:
    """A list of transformers `TrainerCallback`s (instances or classes, as Trainer takes)."""
    from transformers import TrainerCallback

    if callbacks is None:
        return []
    items = list(callbacks) if isinstance(callbacks, list | tuple) else [callbacks]
    for item in items:
        ok = isinstance(item, TrainerCallback) or (
            isinstance(item, type) and issubclass(item, TrainerCallback)
        )
        if not ok:
            raise FinetuneError(
                f"callbacks must be transformers TrainerCallback objects, got {item!r}; "
                "pass a list of them"
            )
    return items


def _checked_rows(
    datasets: dict[str, Dataset], processor, config: dict[str, Any], record: dict[str, Any] | None
) -> dict[str, Any]:
    """The rows of each dataset that cannot be trained on, by name, under the key that decides
    them. Checking reads every image and encodes every row (1-4 ms a row), so a resumed run
    takes them from its record while that key is the same: the same rows, base and max_length,
    and every image file of the same size and modification time."""
    key = _rows_key(datasets, config)
    checked = (record or {}).get("checked")
    if isinstance(checked, dict) and checked.get("key") == key:
        return checked
    limit = config["max_length"]
    return {"key": key, **{name: _bad_rows(d, processor, limit) for name, d in datasets.items()}}


def _bad_rows(data: Dataset, processor, limit: int) -> list[int]:
    """The rows `data.validate(model, max_length=limit)` lists."""
    from llava_nb.training.collate import check_lengths

    bad = {p.row for p in data.validate().problems}
    bad |= {row for row, _ in check_lengths(data, processor, limit, skip=bad)}
    return sorted(bad)


def _rows_key(datasets: dict[str, Dataset], config: dict[str, Any]) -> str:
    settings = [config[k] for k in ("base", "base_shape", "max_length", "data", "eval_data")]
    digest = hashlib.sha256(json.dumps([settings, sorted(datasets)]).encode())
    files = {str(i) for d in datasets.values() for s in d for i in s.images if isinstance(i, str)}
    for file in sorted(files):
        try:
            stat = os.stat(file)
            digest.update(f"{file}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:  # missing (or a URL): as it is now
            digest.update(f"{file}\0-\n".encode())
    return digest.hexdigest()[:16]


def _usable(data: Dataset, bad: list[int], limit: int, name: str, quiet: bool) -> list[int]:
    """The rows to train on: all but the `bad` ones (an error if none is left, a notice if some
    are skipped)."""
    rows = sorted(set(range(len(data))) - set(bad))
    listed = f"{name}.validate(model, max_length={limit})"  # the check that lists them
    if not rows:
        raise FinetuneError(
            f"{name} has no trainable rows ({len(data)} rows, all with problems); "
            f"see {listed} for the list"
        )
    if bad and not quiet:
        print(
            f"llava_nb: skipping {len(bad)} of {len(data)} rows of {name} (see {listed})",
            file=sys.stderr,
        )
    return rows


def unknown_setting(name: Any, known: list[str], what: str = "setting") -> str:
    """What to say of a setting `finetune` does not take: the likely one meant, or the list."""
    if name == "image_folder":
        return (
            f"unknown {what} {name!r}; it belongs to the data: pass "
            "data=ln.data.load('train.json', image_folder='images/')"
        )
    close = difflib.get_close_matches(str(name).lower(), known, n=1)
    if close:
        return f"unknown {what} {name!r} (did you mean {close[0]}?); see help(ln.finetune)"
    return f"unknown {what} {name!r}; the settings are {', '.join(known)}"


def _known_settings(function):
    """A keyword `function` does not take gets a one-line FinetuneError naming it, not
    Python's bare TypeError."""

    @functools.wraps(function)
    def checked(*args, **kwargs):
        known = list(inspect.signature(function).parameters)
        for name in kwargs:
            if name not in known:
                raise FinetuneError(unknown_setting(name, known))
        return function(*args, **kwargs)

    return checked


@_known_settings
def finetune(
    model: Any = None,
    data: Any = None,
    eval_data: Any = None,
    *,
    stage: str = "instruct",
    method: str = "lora",
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    target: str = "language",
    train_vision: bool = False,
    epochs: float = 1,
    max_steps: int | None = None,
    lr: float | None = None,
    projector_lr: float | None = None,
    batch_size: int = 4,
    grad_accum: int = 1,
    warmup: float = 0.03,
    group_by_length: bool = False,
    max_length: int | None = None,
    seed: int = 0,
    eval_every: int | None = None,
    save_every: int = 200,
    output_dir: str | os.PathLike = "adapters/run",
    progress: bool = True,
    callbacks: list | None = None,
) -> FinetuneRun:
    """Fine-tune a LLaVA checkpoint on image-text data; return the run (adapter in output_dir).

    stage "align": the projector only (LLaVA stage 1, image-caption pairs). stage "instruct":
    LoRA on the language model with the projector trainable (stage 2, conversations). `model`:
    an `ln.Model`, a checkpoint id or folder, or a stage "align" run (its output_dir or
    FinetuneRun), which training then goes on from, with no merge step in between.
    method "qlora": 4-bit NF4 base, gradient checkpointing. `train_vision=True` also trains the
    vision tower whole (a model whose vision encoder is not pretrained). `warmup` is the
    fraction of steps with a rising learning rate (cosine decay after). `projector_lr`: the
    projector's own learning rate (LLaVA's `mm_projector_lr`; default: `lr`), smaller when it
    starts out trained and LoRA needs large steps. `group_by_length`
    batches samples of similar length together (transformers' `LengthGroupedSampler`, batches
    in random order): less padding, so faster when lengths vary. Interrupting saves a
    checkpoint and the adapter; calling again with the same output_dir resumes exactly. Running
    out of memory, a callback's error, a row that cannot be read or a checkpoint that cannot be
    written (a full disk) during training raises a one-line `FinetuneError` naming the step and
    the checkpoint the training so far is kept in.
    `progress=False` shows nothing; `callbacks` are extra transformers `TrainerCallback`s.
    """
    from llava_nb.training.collate import context_length

    _check_settings(
        stage,
        method,
        target,
        {
            "r": r,
            "alpha": alpha,
            "dropout": dropout,
            "epochs": epochs,
            "max_steps": max_steps,
            "lr": lr,
            "projector_lr": projector_lr,
            "batch_size": batch_size,
            "grad_accum": grad_accum,
            "warmup": warmup,
            "max_length": max_length,
            "save_every": save_every,
            "eval_every": eval_every,
        },
        {"train_vision": train_vision, "group_by_length": group_by_length, "progress": progress},
    )
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise FinetuneError(f"seed must be a whole number from 0 to 2**32 - 1, got {seed!r}")
    if not isinstance(output_dir, str | os.PathLike) or not str(output_dir).strip():
        raise FinetuneError(f"output_dir must be a folder path, got {output_dir!r}")
    callbacks = _checked_callbacks(callbacks)
    if model is None:
        from llava_nb.models import default_model_id

        model = default_model_id()
    if data is None:
        raise FinetuneError("no training data; pass data=ln.data.load('train.json')")
    model, start = _starting_point(model)
    model_id = base_id(model)
    data = load(data)
    eval_data = load(eval_data) if eval_data is not None else None
    main = int(os.environ.get("RANK", 0)) == 0
    processor, model_config = load_processor_and_config(model)
    limit = max_length or context_length(model_config)

    lr = lr if lr is not None else DEFAULT_LR[stage]
    config = {
        "base": model_id,
        "base_shape": fingerprint(model_config),
        "stage": stage,
        "method": method,
        "r": r,
        "alpha": alpha,
        "dropout": dropout,
        "target": target,
        "train_vision": train_vision,
        "epochs": epochs,
        "max_steps": max_steps,
        "lr": lr,
        "batch_size": batch_size,
        "grad_accum": grad_accum,
        "warmup": warmup,
        "max_length": limit,
        "seed": seed,
        "data": data.fingerprint(),
        "eval_data": eval_data.fingerprint() if eval_data is not None else None,
    }
    # only when set: runs recorded before these settings existed still resume
    if projector_lr is not None:
        config["projector_lr"] = projector_lr
    if group_by_length:
        config["group_by_length"] = True
    if start is not None:
        config["start"] = _start_label(start)
    out = Path(output_dir).expanduser()
    # other processes of a multi-process run only read: the first one may be writing already
    record = _check_output_dir(out, config) if main else _read_run(out)
    if record is not None and record.get("status") == "finished":
        if main and progress:
            print(f"llava_nb: {out} already holds this finished run; delete it to train again")
        return _run_from(out, record)
    # after the finished run is found: encoding every row to check it takes a while on big data
    datasets = {"data": data, **({"eval_data": eval_data} if eval_data is not None else {})}
    checked = _checked_rows(datasets, processor, config, record)
    rows = _usable(data, checked["data"], limit, "data", quiet=not main)
    eval_rows = None
    if eval_data is not None:
        eval_rows = _usable(eval_data, checked["eval_data"], limit, "eval_data", not main)
    checkpoint = _resumable(out, record, say=main and progress) if record is not None else None
    if record is not None and main and progress:
        print(_resume_notice(out, record, checkpoint), file=sys.stderr)
    return _train(
        model_id, getattr(model, "device", None), processor, data, rows, eval_data, eval_rows,
        config, out, record, checkpoint, start=start, checked=checked,
        eval_every=eval_every, save_every=save_every, progress=progress,
        callbacks=callbacks,
    )  # fmt: skip


def _checkpoints(out: Path) -> list[tuple[int, Path, bool]]:
    """(step, folder, complete) of the Trainer checkpoints in `out`, newest first."""
    found = []
    for folder in out.glob("checkpoint-*"):
        step = folder.name.removeprefix("checkpoint-")
        if step.isdigit() and folder.is_dir():
            found.append((int(step), folder, _complete(folder, int(step))))
    return sorted(found, reverse=True)


def _complete(folder: Path, step: int) -> bool:
    """Whether a checkpoint was written whole. Trainer writes trainer_state.json last, so a save
    cut short lacks it, or (the process killed, or the disk full, while writing it) holds a
    part of it: whole, it is JSON that names the checkpoint's step."""
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("global_step") == step


def _resumable(out: Path, record: dict[str, Any], say: bool) -> Path | None:
    """The newest complete checkpoint to resume the recorded run from (None: start afresh).
    An incomplete one (its saving interrupted) is passed over, saying so; an adapter with no
    checkpoint behind it is never trained over."""
    checkpoints = _checkpoints(out)
    complete = next((folder for _, folder, ok in checkpoints if ok), None)
    for _, folder, _ in checkpoints:
        if folder == complete:
            break
        if say:
            then = f"resuming from {complete.name}" if complete else "no complete one is left"
            print(
                f"llava_nb: {folder.name} in {out} is incomplete (its saving was interrupted); "
                f"{then}",
                file=sys.stderr,
            )
    if complete is None and record.get("step") and (out / "adapter_model.safetensors").exists():
        raise FinetuneError(
            f"output_dir '{out}' holds an adapter trained to step {record['step']} and no "
            "checkpoint to resume from; choose a new output_dir, or delete that folder to start "
            "over"
        )
    return complete


def _whole_run_loss(earlier: list[dict[str, Any]], resumed: int, loss: float, end: int) -> float:
    """The mean training loss of a resumed run from its first step: the losses logged up to
    the checkpoint (each the mean since the log before) with this call's mean (Trainer's
    `train_loss` after a resume covers only the steps run since)."""
    total, covered, last = 0.0, 0, 0
    for entry in earlier:
        if "loss" in entry and last < entry["step"] <= resumed:
            total += entry["loss"] * (entry["step"] - last)
            covered, last = covered + entry["step"] - last, entry["step"]
    return (total + loss * (end - resumed)) / max(covered + end - resumed, 1)


def _run_from(out: Path, record: dict[str, Any]) -> FinetuneRun:
    return FinetuneRun(
        output_dir=str(out),
        adapter_path=str(out),
        status=record["status"],
        step=record["step"],
        max_steps=record["max_steps"],
        history=record.get("history", []),
        metrics=record.get("metrics", {}),
        config=record["config"],
    )


def _steps(n_rows: int, config: dict[str, Any], world: int) -> int:
    if config["max_steps"]:
        return int(config["max_steps"])
    batches = math.ceil(n_rows / (config["batch_size"] * world))
    return max(1, math.ceil(math.ceil(batches / config["grad_accum"]) * config["epochs"]))


class _ShuffledGroups:
    """transformers' `LengthGroupedSampler` with its batches then shuffled: it sorts each random
    "megabatch" (50 batches) longest first, so a run would drift from long to short samples
    every 50 steps and end on the shortest; here each batch still holds similar lengths, in
    random batch order (torch's global generator, seeded by the run's seed)."""

    def __init__(self, grouped) -> None:
        self.grouped = grouped

    def __len__(self) -> int:
        return len(self.grouped)

    def __iter__(self):
        import torch

        indices, size = list(self.grouped), self.grouped.batch_size
        batches = [indices[i : i + size] for i in range(0, len(indices), size)]
        return iter([i for k in torch.randperm(len(batches)).tolist() for i in batches[k]])


def _projector_groups(optimizer, model, lr: float) -> None:
    """Give the projector's parameters param groups of their own (same settings) at `lr`."""
    projector = {id(p) for name, p in model.named_parameters() if "multi_modal_projector" in name}
    for group in list(optimizer.param_groups):
        moved = [p for p in group["params"] if id(p) in projector]
        if len(moved) == len(group["params"]):
            group["lr"] = lr
        elif moved:
            group["params"] = [p for p in group["params"] if id(p) not in projector]
            settings = {key: value for key, value in group.items() if key != "params"}
            optimizer.add_param_group({**settings, "params": moved, "lr": lr})


def _labelled_logits_only(inputs: dict[str, Any]) -> dict[str, Any]:
    """The batch with `logits_to_keep` set to the positions whose next token is a label (and
    those labels as `shift_labels`), so the model's own loss runs the vocabulary-sized head
    only there: image and prompt tokens, most of a LLaVA sample, never reach it. Same loss,
    less time and memory."""
    import torch

    from llava_nb.training.collate import IGNORE

    labels = inputs["labels"]
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)
    keep = shifted != IGNORE
    return {**inputs, "logits_to_keep": keep, "shift_labels": shifted[keep]}


def _train(
    model_id, device, processor, data, rows, eval_data, eval_rows, config, out, record,
    checkpoint, *, start, checked, eval_every, save_every, progress, callbacks,
) -> FinetuneRun:  # fmt: skip
    import torch
    from transformers import PrinterCallback, Trainer, TrainingArguments, set_seed

    from llava_nb.training.collate import Collator, TrainingSet
    from llava_nb.training.progress import Progress, Recorder

    world = int(os.environ.get("WORLD_SIZE", 1))
    device = _device(device)
    cuda = device.startswith("cuda")
    set_seed(config["seed"])
    model = _load_for_training(model_id, config["method"], device)
    carried = _start_from(model, start) if start is not None else []
    model = _wrap(
        model,
        config["stage"],
        config["method"],
        config["r"],
        config["alpha"],
        config["dropout"],
        config["target"],
        config["train_vision"],
        carried,
    )
    total = _steps(len(rows), config, world)
    bf16 = cuda and torch.cuda.is_bf16_supported()
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=config["batch_size"],
        per_device_eval_batch_size=config["batch_size"],
        gradient_accumulation_steps=config["grad_accum"],
        num_train_epochs=config["epochs"],
        max_steps=config["max_steps"] or -1,
        learning_rate=config["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=config["warmup"],
        weight_decay=0.0,
        train_sampling_strategy="group_by_length" if config.get("group_by_length") else "random",
        logging_steps=max(1, total // 100),
        eval_strategy="steps" if eval_data is not None else "no",
        eval_steps=eval_every or max(1, total // 10),
        save_strategy="steps",
        save_steps=save_every,
        save_total_limit=2,
        seed=config["seed"],
        bf16=bf16,
        fp16=cuda and not bf16,
        use_cpu=not cuda,
        remove_unused_columns=False,
        label_names=["labels"],
        prediction_loss_only=True,  # evaluation keeps the loss, not every logit
        report_to="none",
        disable_tqdm=True,
        log_level="error",
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )
    resumed = int(checkpoint.name.removeprefix("checkpoint-")) if checkpoint else 0
    earlier = [h for h in (record or {}).get("history", []) if h["step"] <= resumed]
    recorder = Recorder(earlier)
    run_control = _RunControl()

    class LlavaTrainer(Trainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            return super().compute_loss(model, _labelled_logits_only(inputs), *args, **kwargs)

        def create_optimizer(self, *args, **kwargs):
            new = self.optimizer is None
            optimizer = super().create_optimizer(*args, **kwargs)
            if new and config.get("projector_lr") is not None:
                _projector_groups(optimizer, self.model, config["projector_lr"])
            return optimizer

        def _save_checkpoint(self, model, trial, *args, **kwargs):
            run_control.saving = True
            step = self.state.global_step
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{step}"
            try:
                return super()._save_checkpoint(model, trial, *args, **kwargs)
            except Exception as e:  # a full disk: OSError, or safetensors' own error
                if not _complete(folder, step):  # never resumed from; and its space is free
                    shutil.rmtree(folder, ignore_errors=True)
                raise _CheckpointFailed(folder.name, e) from e
            finally:
                run_control.saving = False

        def _get_train_sampler(self, train_dataset=None):
            sampler = super()._get_train_sampler(train_dataset)
            grouped = self.args.train_sampling_strategy == "group_by_length"
            return _ShuffledGroups(sampler) if grouped and sampler is not None else sampler

    class NamedRows(TrainingSet):
        """A row that cannot be read now (its image gone since it was checked) names itself."""

        def __init__(self, name: str, data: Dataset, rows: list[int]) -> None:
            super().__init__(processor, data, rows)
            self.name = name

        def __getitem__(self, index: int) -> dict[str, Any]:
            row = self.rows[index]  # past the end: IndexError, which ends an iteration
            try:
                return super().__getitem__(index)
            except Exception as e:
                raise _RowFailed(self.name, row, self.data[row].id, e) from e

    trainer = LlavaTrainer(
        model=model,
        args=args,
        train_dataset=NamedRows("data", data, rows),
        eval_dataset=NamedRows("eval_data", eval_data, eval_rows) if eval_data else None,
        data_collator=Collator(processor.tokenizer.pad_token_id),
        callbacks=[recorder, run_control.callback(), *callbacks],
    )
    trainer.remove_callback(PrinterCallback)
    theirs = [  # the user's callbacks, as Trainer holds them (it makes one of a class given)
        held
        for held in trainer.callback_handler.callbacks
        if any(held is c or (isinstance(c, type) and type(held) is c) for c in callbacks)
    ]
    if progress:
        trainer.add_callback(Progress(recorder))
    main = trainer.is_world_process_zero()
    if main:
        _write_run(out, {"config": config, "status": "running", "step": resumed,
                         "max_steps": total, "history": earlier, "metrics": {},
                         "checked": checked, **this_process()})  # fmt: skip
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    status = "finished"
    result = None
    start = time.perf_counter()
    with run_control.installed(world == 1):
        try:
            if eval_data is not None and checkpoint is None:
                trainer.evaluate()  # the curve starts at the base model's eval loss
            result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except KeyboardInterrupt:  # a second interrupt: keep the adapter so far, no checkpoint
            if checkpoint is not None and not run_control.stepped:  # the model is not the run's
                if main:
                    _write_run(out, record)  # as it was: the adapter and the record stay
                    if progress:
                        print(f"llava_nb: stopped while resuming; {out} is as it was",
                              file=sys.stderr)  # fmt: skip
                raise
            status = "interrupted"
        except Exception as e:
            step = trainer.state.global_step
            saved = next((folder.name for _, folder, ok in _checkpoints(out) if ok), None)
            failed = _failure(e, step, run_control.in_step, total, config, theirs, saved)
            unchanged = checkpoint is not None and not run_control.stepped
            if unchanged and failed is None:  # the failure is the checkpoint's loading
                if main:
                    _write_run(out, record)  # as it was: this call changed nothing
                raise FinetuneError(
                    f"'{checkpoint}' cannot be resumed ({first_line(e)}); delete that folder to "
                    "resume from an earlier checkpoint, or choose a new output_dir"
                ) from None
            if main:  # the next call says so, and resumes from the newest checkpoint
                ran = {**(record or {}), "config": config, "max_steps": total, "step": step,
                       "history": recorder.history, "checked": checked}  # fmt: skip
                _record_failure(out, record if unchanged else ran,
                                failed[0] if failed else first_line(e))  # fmt: skip
            if failed is None:  # not the user's to fix: the traceback says where it broke
                raise
            # a notebook keeps the last error, and with it these frames: let the model go now,
            # or a call with a smaller batch_size after running out of memory runs out again
            del trainer, model
            traceback.clear_frames(e.__traceback__)
            if cuda:
                gc.collect()
                torch.cuda.empty_cache()
            raise FinetuneError(failed[1]) from None
        run_control.writing = True  # an interrupt now waits for the adapter and the run file
        if run_control.requested:
            status = "interrupted"
        state = trainer.state
        metrics: dict[str, Any] = dict(result.metrics) if result is not None else {}
        if resumed and "train_loss" in metrics:
            metrics["train_loss"] = _whole_run_loss(
                earlier, resumed, metrics["train_loss"], state.global_step
            )
        before = (record or {}).get("metrics", {}).get("runtime_s", 0) if resumed else 0
        metrics["runtime_s"] = round(before + time.perf_counter() - start, 2)  # all calls
        evals = [h["eval_loss"] for h in recorder.history if "eval_loss" in h]
        if evals:
            metrics["eval_loss"] = evals[-1]
            metrics["first_eval_loss"] = evals[0]
        metrics["peak_memory_bytes"] = _peak_memory(cuda)
        if main:
            ended = {"config": config, "status": status, "step": state.global_step,
                     "max_steps": state.max_steps, "history": recorder.history,
                     "metrics": metrics, "checked": checked}  # fmt: skip
            try:
                _save_adapter(trainer, out)  # the plain PEFT adapter, at the top of output_dir
                _write_run(out, ended)
            except Exception as e:  # OSError, or safetensors' own error for a failed write
                _record_failure(out, ended, f"writing the adapter: {first_line(e)}")
                saved = next((folder.name for _, folder, ok in _checkpoints(out) if ok), None)
                kept = f"the training is kept in {saved}" if saved else "no checkpoint was saved"
                raise FinetuneError(
                    f"could not write the adapter in '{out}' ({first_line(e)}); {kept}: free "
                    "some space or make the folder writable, then run ln.finetune again with "
                    "the same output_dir to write it"
                ) from None
    if main and status == "interrupted" and progress:
        saved = next((step for step, _, ok in _checkpoints(out) if ok), 0)
        if saved == state.global_step:
            then = "run ln.finetune again with the same output_dir to resume"
        elif saved:
            then = f"run ln.finetune again with the same output_dir to resume from step {saved}"
        else:
            then = "no checkpoint was saved, so it cannot be resumed"
        print(
            f"llava_nb: stopped at step {state.global_step}/{state.max_steps}; adapter saved "
            f"in {out}; {then}",
            file=sys.stderr,
        )
    if world > 1:
        # Rank 0 saves while the others would exit: a rank that exits first can take the saving
        # one down with it. All wait for the adapter; the process group goes at exit.
        trainer.accelerator.wait_for_everyone()
        atexit.unregister(_destroy_process_group)  # once, however many runs
        atexit.register(_destroy_process_group)
    run = FinetuneRun(
        output_dir=str(out),
        adapter_path=str(out),
        status=status,
        step=state.global_step,
        max_steps=state.max_steps,
        history=recorder.history,
        metrics=metrics,
        config=config,
    )
    del trainer, model
    return run


class _RowFailed(Exception):
    """A row of the data could not be read during training."""

    def __init__(self, name: str, row: int, sample_id: str, error: Exception) -> None:
        super().__init__(f"row {row} of {name}: {first_line(error)}")
        self.name, self.row, self.sample_id, self.error = name, row, sample_id, error


class _CheckpointFailed(Exception):
    """A checkpoint could not be written during training (a full disk, most often)."""

    def __init__(self, name: str, error: Exception) -> None:
        super().__init__(f"{name}: {first_line(error)}")
        self.name, self.error = name, error


def _raised_by(error: BaseException, callbacks: list) -> tuple[Any, str] | None:
    """The user's callback (and its method) that `error` was raised in, if it was."""
    frames = error.__traceback__
    while frames is not None:
        owner = frames.tb_frame.f_locals.get("self")
        if any(owner is callback for callback in callbacks):
            return owner, frames.tb_frame.f_code.co_name
        frames = frames.tb_next
    return None


def _failure(
    error: Exception, done: int, in_step: bool, total: int, config: dict[str, Any],
    callbacks: list, saved: str | None,
) -> tuple[str, str] | None:  # fmt: skip
    """For a failure the user can fix (out of memory, their callback, a row that cannot be read
    now, a checkpoint that cannot be written): the reason to record and the one-line message,
    given the steps `done`, whether one had begun, and the newest complete checkpoint `saved`
    (None: there is none); None for any other failure."""
    step = done + in_step
    at = f"at step {step}" if step else "before the first step"
    of = f"{at} of {total}" if step else at
    kept = f"the training so far is kept in {saved}" if saved else "no checkpoint was saved yet"
    again = "run ln.finetune again with the same output_dir " + (
        "to resume from there" if saved else "to start over"
    )
    if isinstance(error, _RowFailed):  # batches are read before their step begins, some ahead
        at = f"after step {done}" if done else "before the first step"
        of = f"{at} of {total}" if done else at
        cause, name = error.error, error.name
        why = first_line(cause) if isinstance(cause, LlavaError) else _described(cause)
        return f"row {error.row} of {name} could not be read {at}: {why}", (
            f"row {error.row} of {name} ({error.sample_id!r}) could not be read {of} ({why}); "
            f"{kept}; make that row readable again ({name}.validate() lists such rows), then "
            f"{again}"
        )
    if isinstance(error, _CheckpointFailed):  # written after a step, so none has begun
        why = first_line(error.error)
        return f"writing {error.name} {at} failed: {why}", (
            f"could not write {error.name} {of} ({why}); {kept}; free some space on that disk "
            f"and {again}, or start over in an output_dir on a disk with room"
        )
    from llava_nb.models import _is_oom  # CUDA's, MPS's and the CPU's ways of saying it

    if _is_oom(error):
        smaller = (
            f"a smaller batch_size (now {config['batch_size']}; a larger grad_accum keeps the "
            f"batch size) or max_length (now {config['max_length']})"
        ) + (", or method='qlora'" if config["method"] == "lora" else "")
        then = (
            "run ln.finetune again with the same output_dir to resume, or start over in a new "
            f"output_dir with {smaller}"
            if saved
            else f"run ln.finetune again, or in a new output_dir with {smaller}"
        )
        reason = first_line(error)
        return f"out of memory {at}: {reason}", (
            f"ran out of memory {of} ({reason}); {kept}; free memory and {then}"
        )
    raised = _raised_by(error, callbacks)
    if raised is not None:
        where = f"your callback {type(raised[0]).__name__}.{raised[1]}"
        return f"{where} failed {at}: {_described(error)}", (
            f"{where} failed {of} ({_described(error)}); {kept}; fix the callback, then {again}"
        )
    return None


def _described(error: BaseException) -> str:
    """`Type: first line` of an exception (the type alone when it says nothing more)."""
    line = first_line(error)
    return line if line == type(error).__name__ else f"{type(error).__name__}: {line}"


def _record_failure(out: Path, record: dict[str, Any], reason: str) -> None:
    """Mark the run "failed", with the reason, so that the next call says why it resumes. If
    even the run file cannot be written (a read-only folder), it still says "running": the
    next call then says the last one ended without recording how."""
    with contextlib.suppress(OSError):
        _write_run(out, {**record, "status": "failed", "error": reason})


def _resume_notice(out: Path, record: dict[str, Any], checkpoint: Path | None) -> str:
    """What a call on an unfinished run says before it goes on: how the last call ended and
    what this one will do."""
    then = f"resuming from {checkpoint.name}" if checkpoint else "starting over (no checkpoint)"
    status = record.get("status")
    if status == "failed":
        return f"llava_nb: the last call on {out} failed ({record.get('error')}); {then}"
    if status == "running":
        return (
            f"llava_nb: the last call on {out} ended without recording how (its process was "
            f"stopped, or could not write there); {then}"
        )
    return f"llava_nb: {out} holds a run interrupted at step {record.get('step')}; {then}"


def _save_adapter(trainer, out: Path) -> None:
    """Write the adapter into a folder of its own, then move its files into place, each whole:
    a write cut short (a full disk, a killed process) leaves the previous adapter as it was."""
    temporary = out / ".adapter-writing"
    shutil.rmtree(temporary, ignore_errors=True)  # left by a write that was killed
    try:
        trainer.save_model(str(temporary))
        for file in sorted(temporary.iterdir()):
            if file.name not in ("training_args.bin", "README.md"):  # Trainer's and peft's extras
                os.replace(file, out / file.name)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _destroy_process_group() -> None:
    """Run from `atexit`, while Python is whole: left to interpreter shutdown, gloo's worker
    threads can abort the process (SIGABRT) as their tensors are freed. Not at the end of a run:
    a script may call `finetune` again, and accelerate's state expects the group."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _peak_memory(cuda: bool) -> int:
    import torch

    if cuda:
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
