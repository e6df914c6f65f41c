"""Known checkpoints and `Model`: a LLaVA checkpoint that loads on first use.

Nothing here imports torch or transformers at module level: `Model(...)` is only a description
until `load()` (or the first question) runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import inspect
import logging
import math
import numbers
import os
import queue
import signal
import sys
import threading
import time
import urllib.request
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_nb.decoding import image_fingerprints, static_decoder
from llava_nb.errors import LlavaError, first_line

DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"
DEMO_MODEL = "demo"  # the offline demo model (llava_nb.demo), built on first use
FAMILIES = {"llava": "LLaVA-1.5", "llava_next": "LLaVA-NeXT"}
QUANTIZATIONS = ("auto", "none", "4bit", "8bit")
_generator_made = threading.Lock()  # guards making and dropping a model's generation thread
# One load at a time in the process: two first loads at once each import transformers, and the
# second read names from the half-imported package (ImportError).
_one_load = threading.Lock()
# Set when the interpreter starts to exit, before it joins threads (ours among them): an answer
# the main thread left half-read then stops, instead of holding the exit until it is whole.
_exiting = threading.Event()
if hasattr(threading, "_register_atexit"):  # CPython's hook, as concurrent.futures' own
    threading._register_atexit(_exiting.set)  # registered after it, so it runs before it


class ModelError(LlavaError):
    """A checkpoint could not be found, is not LLaVA, or failed to load."""


class GenerationError(LlavaError):
    """A question could not be answered (prompt too long, out of memory, bad settings)."""


class ContextFullError(GenerationError):
    """The conversation leaves no room for an answer in the model's context."""


@dataclass(frozen=True)
class KnownModel:
    id: str
    family: str  # a key of FAMILIES
    size: str
    language_model: str
    fp16_gb: float  # weights in fp16; 4-bit needs about a third, plus activations


REGISTRY: dict[str, KnownModel] = {
    m.id: m
    for m in (
        KnownModel("llava-hf/llava-1.5-7b-hf", "llava", "7B", "Vicuna-7B", 14.1),
        KnownModel("llava-hf/llava-1.5-13b-hf", "llava", "13B", "Vicuna-13B", 26.7),
        KnownModel("llava-hf/llava-v1.6-mistral-7b-hf", "llava_next", "7B", "Mistral-7B", 15.1),
        KnownModel("llava-hf/llava-v1.6-vicuna-7b-hf", "llava_next", "7B", "Vicuna-7B", 14.1),
        KnownModel("llava-hf/llava-v1.6-vicuna-13b-hf", "llava_next", "13B", "Vicuna-13B", 26.7),
        KnownModel("llava-hf/llava-v1.6-34b-hf", "llava_next", "34B", "Yi-34B", 69.5),
        KnownModel(DEMO_MODEL, "llava", "0.15B", "SmolLM2-135M-Instruct", 0.3),
    )
}


def default_model_id() -> str:
    """The model a chat uses when none is named: `$LLAVA_NB_MODEL`, else LLaVA-1.5-7B, else
    (when that is neither cached nor downloadable here) the offline demo model."""
    configured = os.environ.get("LLAVA_NB_MODEL")
    if configured:
        return configured
    if _default_available():
        return DEFAULT_MODEL
    if not _fallback_noticed:
        _fallback_noticed.append(True)
        print(
            f"llava_nb: {DEFAULT_MODEL} is not cached and the hub cannot be reached; using the "
            "offline demo model (set LLAVA_NB_MODEL or %llava config model=... for another)",
            file=sys.stderr,
            flush=True,
        )
    return DEMO_MODEL


_fallback_noticed: list[bool] = []  # the fallback notice is shown once per process


@functools.cache
def _default_available() -> bool:
    """Asked once per process: a probe of the hub takes up to a few seconds."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(DEFAULT_MODEL, "config.json"), str) or (
        _hub_reachable()
    )


def _source(model_id: str) -> str:
    """The folder or hub id to read the weights from: the demo model is built on first use."""
    if model_id == DEMO_MODEL:
        from llava_nb.demo import build

        return build()
    return model_id


def pick_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _check_device(device: str) -> None:
    """Refuse a device torch cannot use here, before any weights are read."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ModelError(f"unknown device {device!r}; use cuda, cuda:N, mps or cpu") from None
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
    }
    if kind not in available:
        raise ModelError(f"device {device!r} is not supported; use cuda, cuda:N, mps or cpu")
    if not available[kind]:
        raise ModelError(
            f"device {device!r} is not available to this torch build; "
            "use --device cpu, or install torch with support for it"
        )
    index = torch.device(device).index
    if kind == "cuda" and index is not None and index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ModelError(f"device {device!r} does not exist ({count} CUDA device(s)); use cuda:0")


def _pick_dtype(device: str):
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if device == "mps" else torch.float32


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick request, so an unknown id fails in seconds rather than after the hub's retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        urllib.request.urlopen(
            urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout
        )
    except urllib.error.HTTPError:
        return True  # it answered
    except OSError:
        return False
    return True


def check_local_path(model_id: str) -> Path:
    """`model_id` as a path; refused when it is a file, a folder path that does not exist, or
    neither a folder nor spelled as a hub id (org/name). Cheap: no torch, no network."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    local = Path(model_id).expanduser()
    try:
        kind = "file" if local.is_file() else "folder" if local.is_dir() else None
    except OSError as e:  # a name too long for the file system
        shown = model_id if len(model_id) <= 80 else model_id[:80] + "…"
        raise ModelError(f"'{shown}' is not a usable path ({e.strerror}); check the name") from None
    if kind == "file":
        raise ModelError(f"'{model_id}' is a file; pass the checkpoint's folder or a hub id")
    if kind == "folder":
        return local
    if model_id.startswith((".", "/", "~")) or model_id.count("/") > 1:
        raise ModelError(f"model folder '{model_id}' does not exist; check the path")
    try:
        validate_repo_id(model_id)
    except HFValidationError:
        raise ModelError(
            f"'{model_id}' is neither a model folder nor a hub id like 'llava-hf/llava-1.5-7b-hf'; "
            "check the name"
        ) from None
    return local


def _load_config(model_id: str):
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import StrictDataclassError  # a config's own checks failed
    from transformers import AutoConfig

    local = check_local_path(model_id)
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelError(f"folder '{model_id}' has no config.json; point at a saved checkpoint")
        try:
            return AutoConfig.from_pretrained(local)
        except (OSError, ValueError, StrictDataclassError) as e:
            raise ModelError(
                f"the config.json in '{model_id}' cannot be read ({first_line(e)}); "
                "save the checkpoint again"
            ) from None
    cached = try_to_load_from_cache(model_id, "config.json")
    if not isinstance(cached, str) and not _hub_reachable():
        raise ModelError(
            f"model '{model_id}' is not in the local Hugging Face cache and the hub cannot be "
            "reached; download it where there is network, or pass a local checkpoint folder "
            "(HF_HUB_OFFLINE=1 uses only the cache)"
        )
    try:
        return AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError, StrictDataclassError) as e:
        raise ModelError(
            f"model '{model_id}' not found ({first_line(e)}); check the id or pass a local folder"
        ) from None


def _fp16_bytes(config) -> int:
    """Bytes of the weights in fp16, counted on the meta device (no memory, no download)."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    return 2 * sum(p.numel() for p in model.parameters())


def _import_bitsandbytes() -> None:
    """Import bitsandbytes here, not inside `from_pretrained`: frames captured while it is
    first imported would otherwise keep the first quantized model alive after `unload()`."""
    try:
        import bitsandbytes  # noqa: F401
        import transformers.integrations.bitsandbytes  # noqa: F401
    except ImportError as e:
        message = f"4-bit / 8-bit loading needs bitsandbytes ({e}); pip install bitsandbytes"
        raise ModelError(message) from None
    int8_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if _quiet_int8_casts not in int8_logger.filters:
        int8_logger.addFilter(_quiet_int8_casts)


def _quiet_int8_casts(record: logging.LogRecord) -> bool:
    """bitsandbytes logs its (expected) cast to fp16 for every int8 layer on every token."""
    return "inputs will be cast" not in record.getMessage()


def _trim_process_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise), so RSS drops too."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # AttributeError: not glibc
            ctypes.CDLL(None).malloc_trim(0)


_OOM_MESSAGES = ("out of memory", "not enough memory", "cannot allocate memory", "can't allocate")


def _is_oom(error: BaseException) -> bool:
    """CUDA, MPS and CPU allocators each say it their own way."""
    message = str(error).lower()
    return isinstance(error, MemoryError) or any(m in message for m in _OOM_MESSAGES)


class StateListeners:
    """Who to tell when a model loads or unloads (`on_state_change`). A bound method is held
    weakly: a view that is dropped (a closed panel) is not kept alive by the model it showed;
    any other callable until it is unsubscribed. A listener's error is logged, never raised
    into the load or unload that told it."""

    def __init__(self) -> None:
        self._refs: list[Callable[[], Callable[[str], None] | None]] = []
        self._lock = threading.Lock()

    def add(self, callback: Callable[[str], None]) -> Callable[[], None]:
        ref = weakref.WeakMethod(callback) if inspect.ismethod(callback) else lambda: callback
        with self._lock:
            self._refs = [r for r in self._refs if r() is not None] + [ref]

        def unsubscribe() -> None:
            with self._lock:
                self._refs = [r for r in self._refs if r is not ref]

        return unsubscribe

    def tell(self, event: str) -> None:
        for ref in self._refs:  # a list replaced, never changed in place: safe to walk
            callback = ref()
            if callback is None:
                continue
            try:
                callback(event)
            except Exception:  # a broken view must not break a load or an unload
                logging.getLogger(__name__).exception("llava_nb: a model listener failed")


class Model:
    """A LLaVA or LLaVA-NeXT checkpoint (hub id or local folder), loaded on first use.

    quantization: "auto" (4-bit NF4 on CUDA when the fp16 weights would not fit in free GPU
    memory, none elsewhere), "none", "4bit" or "8bit" (bitsandbytes; the vision tower, the
    projector and lm_head stay unquantized, as in QLoRA practice for LLaVA).

    A server URL ("openai:http://host:8000/v1") gives a `RemoteModel` instead, which takes
    `remote_model=` and `api_key=`.
    """

    def __new__(cls, model_id: str | None = None, **kwargs: Any):
        from llava_nb.remote import RemoteModel, is_remote

        if cls is Model and is_remote(model_id):
            return RemoteModel(model_id, **kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        model_id: str | None = None,
        *,
        quantization: str = "auto",
        device: str | None = None,
    ) -> None:
        if quantization not in QUANTIZATIONS:
            raise ModelError(
                f"unknown quantization {quantization!r}; use one of {', '.join(QUANTIZATIONS)}"
            )
        self.model_id = str(model_id or default_model_id())
        self.quantization = quantization
        self.device = device
        self.model: Any = None
        self.processor: Any = None
        self._loaded_quantization: str | None = None
        self._state = "unloaded"
        self._load_seconds: float | None = None
        self._lock = threading.RLock()  # one load or generation at a time
        self._conversation: Any = None  # decoding.ConversationCache: the last chat's KV cache
        self._decoder: Any = None  # decoding.StaticDecoder: static KV cache, CUDA graph
        self._weights_version = 0  # bumped whenever the weights change (adapters): stale caches
        self._generator: ThreadPoolExecutor | None = None  # the thread answers run on
        self._answers: weakref.WeakSet[Generation] = weakref.WeakSet()  # started, not ended
        self._listeners = StateListeners()  # on_state_change

    def _generation_thread(self) -> ThreadPoolExecutor:
        """The one thread this model's answers run on, kept until it is unloaded. A thread per
        answer paid for a fresh start each time (its own OpenMP team among them): on 2 CPU
        cores a small model's first token came 9-19% later than plain `generate`'s, 0-3% on
        a thread kept (benchmarks/generate.py)."""
        with _generator_made:  # not the model's lock: a running answer holds that
            if self._generator is None:
                self._generator = ThreadPoolExecutor(1, thread_name_prefix="llava_nb-generate")
            return self._generator

    def __repr__(self) -> str:
        return (
            f"Model({self.model_id!r}, quantization={self.quantization!r}, state={self._state!r})"
        )

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def status(self) -> dict[str, Any]:
        """State, model, family, device, dtype, quantization, and weight memory in bytes."""
        info = REGISTRY.get(self.model_id)
        status: dict[str, Any] = {
            "state": self._state,
            "model": self.model_id,
            "family": FAMILIES.get(info.family) if info else None,
            "device": self.device,
            "dtype": None,
            "quantization": self._loaded_quantization or self.quantization,
            "memory": 0,
        }
        if self.model is not None:
            status.update(
                family=FAMILIES.get(self.model.config.model_type, self.model.config.model_type),
                device=str(self.model.device),
                dtype=str(self.model.dtype).removeprefix("torch."),
                memory=int(self.model.get_memory_footprint()),
                load_seconds=round(self._load_seconds or 0.0, 2),
            )
        if str(self.device).startswith("cuda"):  # what the process holds on the GPU, all models
            import torch

            status["gpu_memory_allocated"] = torch.cuda.memory_allocated(self.device)
        return status

    def on_state_change(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call `callback(event)` when the model starts loading ("loading"), has loaded
        ("loaded"), failed to load ("failed": unloaded again) or was unloaded ("unloaded"), on
        the thread that did it, so views (a panel's status line) follow loads and unloads made
        anywhere. Returns the function that unsubscribes it (see `StateListeners`)."""
        return self._listeners.add(callback)

    def load(self) -> Model:
        """Load weights and processor now (a no-op when loaded); prints one progress line."""
        with self._lock:
            if self.model is None:
                self._state = "loading"
                self._listeners.tell("loading")
                try:
                    _on_a_thread_of_its_own(self._load)
                except KeyboardInterrupt:
                    with _interrupts_recorded():  # a second Stop: this one is raised anyway
                        if self.model is None:  # it came before the load began: nothing loaded
                            self._release()
                        else:  # it came during a load that then succeeded: keep it
                            self._state = "loaded"
                        self._listeners.tell(self._state)
                    raise
                except BaseException:
                    with _interrupts_recorded():  # a Stop now would leave half the release
                        self._release()  # undone, while the error stops the cell anyway
                        self._listeners.tell("failed")
                    raise
                self._state = "loaded"
                self._listeners.tell("loaded")
        return self

    def _load(self) -> None:
        with _one_load:
            self._load_now()

    def _load_now(self) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

        start = time.perf_counter()
        source = _source(self.model_id)
        config = _load_config(source)
        if config.model_type not in FAMILIES:
            raise ModelError(
                f"'{self.model_id}' is a {config.model_type!r} model, not LLaVA or LLaVA-NeXT; "
                "choose a llava-hf checkpoint (see %llava models)"
            )
        device = self.device or pick_device()
        _check_device(device)
        dtype = _pick_dtype(device)
        quant = self._choose_quantization(config, device)
        if quant == "8bit" and device.startswith("cuda"):
            dtype = torch.float16  # LLM.int8 computes in fp16
        kwargs: dict[str, Any] = {"dtype": dtype, "device_map": {"": device}}
        if quant in ("4bit", "8bit"):
            _import_bitsandbytes()
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=quant == "4bit",
                load_in_8bit=quant == "8bit",
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=dtype,
                llm_int8_skip_modules=[
                    "model.vision_tower",
                    "model.multi_modal_projector",
                    "lm_head",
                ],
            )
        label = f"{quant}, " if quant != "none" else ""
        dtype_name = str(dtype).removeprefix("torch.")
        print(f"llava_nb: loading {self.model_id} on {device} ({label}{dtype_name})…", flush=True)
        from safetensors import SafetensorError

        try:
            self.processor = AutoProcessor.from_pretrained(source)
            self.model = AutoModelForImageTextToText.from_pretrained(source, **kwargs).eval()
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
            if not _is_oom(e):
                raise
            hint = "try --4bit (quantization='4bit')" if quant != "4bit" else "try a smaller model"
            raise ModelError(f"out of memory loading {self.model_id} on {device}; {hint}") from None
        except ImportError as e:
            raise ModelError(f"loading {self.model_id} needs a package: {e}") from None
        except (OSError, ValueError, SafetensorError) as e:  # a file missing, cut short, garbled
            raise ModelError(
                f"{self.model_id} cannot be loaded ({first_line(e)}); it needs a complete "
                "checkpoint: config, weights, processor and tokenizer files"
            ) from None
        if quant == "4bit" and device == "cpu":
            keep_4bit_weights_as_loaded(self.model)
        self.device, self._loaded_quantization = device, quant
        self._load_seconds = time.perf_counter() - start
        from llava_nb.decoding import ConversationCache

        self._conversation = ConversationCache(self.model.config.image_token_id)
        gb = self.model.get_memory_footprint() / 1e9
        print(f"llava_nb: loaded in {self._load_seconds:.1f} s ({gb:.2f} GB)", flush=True)

    def _choose_quantization(self, config, device: str) -> str:
        if self.quantization != "auto":
            return self.quantization
        if not device.startswith("cuda"):
            return "none"
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return "4bit" if 1.2 * _fp16_bytes(config) > free else "none"

    def unload(self) -> None:
        """Drop the weights and give their memory back (GPU memory included). An answer being
        written stops after its current token and keeps what it wrote, marked interrupted.

        A release cut short would leave a model marked loaded with no weights, or cached GPU
        memory: an interrupt (Ctrl-C, a kernel's Stop) meanwhile waits for it to end, then is
        raised once, so the caller still stops where the user asked it to."""
        with _interrupts_deferred():
            for answer in list(self._answers):
                answer.stop()
            with self._lock:
                was = self._state
                self._release()
            if was != "unloaded":
                self._listeners.tell("unloaded")

    def _release(self) -> None:
        with _generator_made:  # its thread ends once the answers queued on it have run
            if self._generator is not None:
                self._generator.shutdown(wait=False)
                self._generator = None
        self.model = self.processor = self._conversation = self._decoder = None
        self._loaded_quantization = None
        self._state = "unloaded"
        gc.collect()
        _trim_process_heap()
        if "torch" in sys.modules:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def generate(
        self,
        messages: list[dict[str, Any]],
        *,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        attention: bool = False,
        adapter: str | None = None,
    ) -> Generation:
        """Start answering a conversation in the processor's chat-message format.

        Returns a `Generation`: iterate it for text pieces; `.text` is the answer. With
        `attention=True` it also records where the answer looked (`Generation.attention`).
        `adapter`: a fine-tuned adapter folder to answer with (None: the base weights).
        """
        settings = check_settings(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
        )
        self.load()
        context = self.model.config.text_config.max_position_embeddings
        _check_text_fits(messages, self.processor.tokenizer, context)
        inputs = self.processor.apply_chat_template(
            escape_image_token(messages, self.processor),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
        fingerprints = image_fingerprints(inputs)
        inputs = inputs.to(self.model.device, self.model.dtype)
        prompt_tokens = inputs["input_ids"].shape[1]
        if prompt_tokens >= context:
            raise ContextFullError(
                f"the conversation is {prompt_tokens} tokens, which leaves no room for an "
                f"answer in the model's context of {context}; {SHORTER}"
            )
        options = {
            "max_new_tokens": min(settings["max_new_tokens"], context - prompt_tokens),
            "do_sample": False,
        }
        if settings["temperature"] >= GREEDY_BELOW:
            options.update(
                do_sample=True, temperature=settings["temperature"], top_p=settings["top_p"]
            )
        recorder = None
        if attention:
            from llava_nb.attention import _Recorder

            recorder = _Recorder(self, inputs, messages)
        generation = Generation(self, inputs, options, settings["seed"], recorder)
        generation.adapter = adapter
        generation._fingerprints = fingerprints
        return generation


SHORTER = "ask a shorter question, with fewer images, or in a new chat"


_LONGEST_TOKEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _longest_token(tokenizer) -> int:
    """The most characters one token stands for: no token's text is longer than its vocabulary
    entry (a byte-level entry has a character per byte, a byte fallback like <0x0A> six)."""
    if tokenizer not in _LONGEST_TOKEN:
        _LONGEST_TOKEN[tokenizer] = max(map(len, tokenizer.get_vocab()), default=1)
    return _LONGEST_TOKEN[tokenizer]


def _check_text_fits(messages: list[dict[str, Any]], tokenizer, context: int) -> None:
    """Refuse at once a conversation whose text alone cannot fit the context: tokenizing
    megabytes takes a minute, holding up every question waiting for the model."""
    chars = 0
    for message in messages:
        content = message.get("content")
        parts = content if isinstance(content, list) else [{"text": content}]
        texts = [p.get("text") for p in parts if isinstance(p, dict)]
        chars += sum(len(text) for text in texts if isinstance(text, str))
    if chars > context * _longest_token(tokenizer):
        raise ContextFullError(
            f"the conversation's text is {chars:,} characters, more than the model's context "
            f"of {context} tokens can hold; {SHORTER}"
        )


def escape_image_token(messages: list[dict[str, Any]], processor) -> list[dict[str, Any]]:
    """The messages with the processor's image placeholder ("<image>") broken by a zero-width
    space wherever a text holds it: typed in a question or written in an answer it is text, but
    the processor would count it as an image and refuse the prompt."""
    token = getattr(processor, "image_token", None)
    if not token:
        return messages
    escaped = token[0] + "\u200b" + token[1:]

    def escape(content: Any) -> Any:
        if isinstance(content, str):
            return content.replace(token, escaped)
        if isinstance(content, list):
            return [
                {**p, "text": escape(p["text"])} if isinstance(p, dict) and "text" in p else p
                for p in content
            ]
        return content

    return [{**m, "content": escape(m.get("content"))} for m in messages]


# Temperatures under this answer greedily, as in vLLM: logits divided by a smaller one can
# overflow to inf (1e-300 is 0 in float32), and sampling then fails.
GREEDY_BELOW = 1e-5


def check_settings(
    *, max_new_tokens: int, temperature: float, top_p: float, seed: int | None
) -> dict[str, Any]:
    """Refuse bad generation settings before any work starts; return them as plain Python
    numbers (NumPy's are welcome, and a chat saves its settings as JSON)."""
    if not _is_whole(max_new_tokens) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not _is_real(temperature) or not 0 <= temperature < math.inf:
        raise GenerationError(
            f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}"
        )
    if not _is_real(top_p) or not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1], got {top_p!r}")
    if seed is not None and (not _is_whole(seed) or not -(2**63) <= seed < 2**64):
        raise GenerationError(f"seed must be a 64-bit integer or None, got {seed!r}")
    return {
        "max_new_tokens": int(max_new_tokens),
        "temperature": float(temperature),
        "top_p": float(top_p),
        "seed": None if seed is None else int(seed),
    }


def _is_whole(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class Generation:
    """One answer being generated on the model's generation thread; iterate it for text pieces.

    The model runs off the calling thread, so an interrupt (KeyboardInterrupt, `stop()`, or
    leaving the loop early) ends it after the current token and keeps the partial answer.
    """

    def __init__(
        self, model: Model, inputs, options: dict[str, Any], seed: int | None, recorder=None
    ) -> None:
        self._model = model
        self._processor = model.processor  # kept: the answer decodes to its end after unload()
        eos = model.model.generation_config.eos_token_id
        self._ends = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self._recorder = recorder  # attention capture (llava_nb.attention), or None
        self._attention = None
        self.adapter: str | None = None  # switched to in the worker, holding the model's lock
        self._fingerprints: list[str] = []  # of the prompt's images, for KV-cache reuse
        self.reused_tokens = 0  # prompt tokens whose keys/values came from the previous turn
        self.decoding: str | None = None  # "generate", "eager-static" or "graph"
        self.started_at: float | None = None  # time.perf_counter() when the worker started
        self.first_token_at: float | None = None  # ... when the first new token arrived
        self.finished_at: float | None = None  # ... when the answer ended
        self.prompt_tokens = inputs["input_ids"].shape[1]
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self.max_new_tokens: int = options["max_new_tokens"]
        self.token_ids: list[int] = []
        self.text = ""
        self.stopped = False  # ended by stop(), an interrupt, or leaving the loop early
        self.done = False
        # run by the first iteration (a generation nobody reads costs nothing); then its Future
        self._job: tuple | None = (inputs, options, seed)
        self._running: Any = None

    @property
    def finish_reason(self) -> str | None:
        """Why it ended, as OpenAI names it: "stop" (end of answer), "length", or "interrupted"."""
        if not self.done:
            return None
        if self.stopped:
            return "interrupted"
        ended = bool(self.token_ids) and self.token_ids[-1] in self._ends
        return "length" if len(self.token_ids) >= self.max_new_tokens and not ended else "stop"

    def stop(self) -> None:
        """Ask the worker to stop after the current token."""
        self._stop.set()

    def _run(
        self, inputs, options: dict[str, Any], seed: int | None, reader: threading.Thread
    ) -> None:
        """The generation itself, on the model's thread; `reader`: the thread reading it."""
        import torch
        from transformers import StoppingCriteriaList

        try:
            with contextlib.ExitStack() as held:
                held.enter_context(self._model._lock)
                if self._model.model is None:  # unloaded since it was asked
                    raise GenerationError(
                        f"{self._model.model_id} was unloaded before this answer began; ask again"
                    )
                held.enter_context(torch.inference_mode())
                held.enter_context(self._recorder or contextlib.nullcontext())
                _activate_adapter(self._model, self.adapter)
                if seed is not None:
                    held.enter_context(_rng_kept(self._model.model.device))
                    torch.manual_seed(seed)
                conversation = self._model._conversation
                weights = (self.adapter, self._model._weights_version)
                streamer = _QueueStreamer(self._queue)
                stopping = StoppingCriteriaList([_StopOnEvent(self._stop, reader)])
                # the static-cache decoder (CUDA graphs) where it applies, else plain generate
                decoder = static_decoder(self._model, inputs["input_ids"], options, stopping)
                cache = None
                if conversation is not None and self._recorder is None:
                    inputs, cache = conversation.take(
                        inputs, self._fingerprints, weights, static=decoder is not None
                    )
                    self.reused_tokens = conversation.reused_tokens
                elif conversation is not None:  # attention capture reads the whole prompt, and
                    conversation.clear()  # its cache replaces the last one (static: in place)
                if decoder is None and conversation is not None:
                    options = {**options, **_cache_option(self._model.model, cache)}
                if decoder is not None:
                    out = decoder.generate(
                        inputs, cache, weights=weights, streamer=streamer, recorder=self._recorder
                    )
                    cache, self.decoding = decoder.cache, decoder.mode
                else:
                    out = self._model.model.generate(
                        **inputs, **options, streamer=streamer, stopping_criteria=stopping
                    )
                    cache = next((v for k, v in options.items() if k in _CACHE_KWARGS), None)
                    self.decoding = "generate"
                if conversation is not None:
                    conversation.keep(cache, out[0].tolist(), self._fingerprints, weights)
            self._queue.put(("end", out[0, self.prompt_tokens :].tolist()))
        except BaseException as e:  # handed to the consumer thread, raised there
            self._queue.put(("error", e))

    def _decode(self, ids: list[int]) -> str:
        return self._processor.decode(ids, skip_special_tokens=True)

    def __iter__(self) -> Iterator[str]:
        if self.done:
            return
        pieces = _Pieces(self._decode)
        self.started_at = time.perf_counter()
        job, self._job = self._job, None
        reader = threading.current_thread()
        self._model._answers.add(self)
        self._running = self._model._generation_thread().submit(self._run, *job, reader)
        try:
            while True:
                kind, value = self._queue.get()
                if kind == "token":
                    if not self.token_ids:
                        self.first_token_at = time.perf_counter()
                    self.token_ids.append(value)
                    piece = pieces.add(self.token_ids)
                elif kind == "end":  # done before the last piece: a reader may stop there
                    self.token_ids = value
                    piece = pieces.add(value, final=True)
                    self.text = pieces.text
                    _wait_through_interrupts(self._running)  # the model's lock is free again
                    self.stopped = self._stop.is_set()
                    self.done = True
                else:
                    self.done = True
                    raise _generation_error(value)
                if piece:
                    yield piece
                if kind == "end":
                    return
        finally:
            self.finished_at = time.perf_counter()
            self._model._answers.discard(self)
            if not self.done:  # interrupted, stopped or abandoned: keep what we have
                self._stop.set()
                _wait_through_interrupts(self._running)  # a second Stop must not lose it
                self.stopped = True
                # as shown: a character cut in half by the stop is not kept as U+FFFD
                pieces.add(self.token_ids)
                self.text = pieces.text
                self.done = True

    def wait(self) -> str:
        """Consume the whole generation; return the answer."""
        for _ in self:
            pass
        return self.text

    @property
    def records_attention(self) -> bool:
        """Whether this answer records attention (generate with attention=True)."""
        return self._recorder is not None

    @property
    def attention(self):
        """The `AttentionMap` of the answer (generate with attention=True), once it is done."""
        if self._recorder is None:
            raise GenerationError("this answer was generated without attention=True; ask again")
        if not self.done:
            raise GenerationError("the answer is not finished; read it (or wait()) first")
        if self._attention is None:
            self._attention = self._recorder.attention_map(self.token_ids)
        return self._attention


def _rng_kept(device) -> contextlib.AbstractContextManager:
    """torch's global random state as it was, once the block ends: a seeded answer must not
    reseed the notebook's own random numbers. `torch.manual_seed` seeds the CPU's generator
    and every device's of the model's kind, so all of them are put back."""
    import torch

    kind = torch.device(device).type
    if kind not in ("cuda", "mps"):
        return torch.random.fork_rng(devices=[])
    count = torch.cuda.device_count() if kind == "cuda" else 1
    return torch.random.fork_rng(devices=range(count), device_type=kind)


class _Pieces:
    """An answer's text as its tokens arrive, in pieces that only ever add to it.

    Decoding all the tokens again can change text already shown: in a byte-fallback run
    (Llama's tokenizer) one invalid byte turns every byte of the run into U+FFFD, a whole
    character shown before it included. Then the tokens up to that text are settled, and the
    rest is decoded on its own (after one token, for its leading space), so nothing shown is
    taken back and nothing after it is lost. `text` is what was shown: the whole decode when
    nothing was rewritten, as `generate` then `decode` gives."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self.text = ""  # every piece so far
        self._start = 0  # tokens before it are settled: their text is in `text` for good
        self._shown = ""  # the text of tokens from `_start` on, as far as shown
        self._shown_upto = 0  # tokens whose text is all shown

    def _since(self, ids: list[int], start: int) -> str:
        if start == 0:
            return self._decode(ids)
        before = self._decode(ids[start - 1 : start])
        text = self._decode(ids[start - 1 :])
        return text[len(before) :] if text.startswith(before) else self._decode(ids[start:])

    def add(self, ids: list[int], final: bool = False) -> str:
        """The piece that `ids` (all tokens so far) adds; a character whose bytes are still
        coming is held back unless `final`."""
        text = self._since(ids, self._start)
        if not text.startswith(self._shown):  # text shown was rewritten: keep it, go on after
            self._start, self._shown = self._shown_upto, ""
            text = self._since(ids, self._start)
        if not final:
            text = text.rstrip("\ufffd")
        piece = text[len(self._shown) :]
        if piece:
            self._shown, self._shown_upto = text, len(ids)
            self.text += piece
        return piece


_CACHE_KWARGS = ("cache", "past_key_values")  # generate()'s name for it: 5.24+, before


def _cache_option(model, cache) -> dict[str, Any]:
    """`generate` keyword for a KV cache to continue from (a fresh one when `cache` is None),
    under the name this transformers version takes."""
    if cache is None:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config.text_config)
    parameters = inspect.signature(model.prepare_inputs_for_generation).parameters
    return {"cache" if "cache" in parameters else "past_key_values": cache}


def _activate_adapter(owner: Model, adapter: str | None) -> None:
    """Switch the loaded weights to a chat's adapter (None: the base) before it generates.

    Loading an adapter not seen before bumps the weights version: no cache outlives the weights
    it was computed with (an adapter trained again in the same folder loads afresh)."""
    loaded = len(getattr(owner.model, "_llava_nb_adapters", None) or ())
    if adapter is None and not loaded:
        return  # no adapter was ever loaded: nothing to switch, nothing to import
    from llava_nb.training.adapters import activate

    activate(owner.model, adapter)
    if len(getattr(owner.model, "_llava_nb_adapters", None) or ()) != loaded:
        owner._weights_version += 1


class _QueueStreamer:
    """The streamer protocol of `generate()`: the prompt first, then each new token."""

    def __init__(self, sink: queue.Queue) -> None:
        self.sink, self.seen_prompt = sink, False

    def put(self, value) -> None:
        if self.seen_prompt:
            self.sink.put(("token", int(value.reshape(-1)[0])))
        self.seen_prompt = True

    def end(self) -> None:
        pass


class _StopOnEvent:
    """A stopping criterion that ends generation once the event is set, or once nobody will
    read the rest: the reading thread has ended, or the interpreter is exiting and the reader is
    the main thread (an answer left half-read, its generator kept suspended) or a daemon thread
    (a panel's: the exit does not wait for it)."""

    def __init__(self, event: threading.Event, reader: threading.Thread) -> None:
        self.event, self.reader = event, reader

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        reader = self.reader
        gone = not reader.is_alive() or (
            _exiting.is_set() and (reader.daemon or reader is threading.main_thread())
        )
        stop = self.event.is_set() or gone
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


_STOP_ASKED: set[int] = set()  # idents of load threads an interrupt asked to stop


def stop_asked() -> bool:
    """Whether an interrupt asked the load running on this thread to stop. An interrupt
    reaches only the main thread, which waits for the load; a long one (the demo build: minutes
    of training) checks this between its steps and ends there."""
    return threading.get_ident() in _STOP_ASKED


def keep_4bit_weights_as_loaded(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit layer for its CPU kernel the
    first time it runs without gradients, and reading the weights back (`state_dict()`: peft
    does when it loads an adapter; training's backward) unpacks them lossily: base answers
    drifted after an adapter was loaded, and QLoRA trained on wrong gradients. Turned off."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _on_a_thread_of_its_own(work: Callable[[], Any]) -> Any:
    """`work()` (a load), run on a new thread that ends with it.

    An interrupt only reaches the main thread, so it cannot land halfway through importing
    torch or transformers (a half-imported torch cannot be imported again until the kernel
    restarts); it waits for the work to end, then is raised (the work's own error first).
    And no OpenMP thread pool outlives the load: bitsandbytes quantizes on the CPU in parallel
    regions, and a pool left on the calling thread sits beside the one each answer's thread
    makes. With more pool threads than cores, libgomp stops letting idle threads spin, and
    every parallel region of an answer waits for sleeping threads (on 2 cores, 4-bit decoding
    ran at 0.67x of plain `generate`)."""
    outcome: dict[str, Any] = {}
    finished = threading.Event()

    def run() -> None:
        try:
            outcome["value"] = work()
        except BaseException as e:  # raised on the caller's thread below
            outcome["error"] = e
        finally:
            finished.set()

    worker = threading.Thread(target=run, name="llava_nb-load", daemon=True)
    # Interrupts are recorded from start() until the thread has ended: one landing anywhere in
    # between (even just after start(), before the wait) would escape while the thread loads
    # on. One that came before raises here, with no thread started.
    with _interrupts_recorded() as caught:
        worker.start()
        while not finished.wait(0.05):  # a recorded interrupt does not end a wait: look again
            if caught and worker.ident not in _STOP_ASKED:
                print("llava_nb: stopping once loading ends (it cannot stop halfway)",
                      file=sys.stderr, flush=True)  # fmt: skip
                _STOP_ASKED.add(worker.ident)
        worker.join()  # its pool gone before any answer starts
    _STOP_ASKED.discard(worker.ident)
    if "error" in outcome:
        raise outcome.pop("error")
    if caught:
        outcome.clear()  # not kept alive by this frame in the interrupt's traceback
        raise caught[-1]
    return outcome.pop("value")  # the thread's closure keeps no reference to it


@contextlib.contextmanager
def _interrupts_recorded() -> Iterator[list[KeyboardInterrupt]]:
    """Within the block, SIGINT is put in the yielded list instead of raised. Blocking the
    signal is not enough: a kernel's other threads (heartbeat, iopub) take Jupyter's interrupt,
    and Python raises it on the main thread whatever that thread's mask says."""
    caught: list[KeyboardInterrupt] = []
    previous = None
    if threading.current_thread() is threading.main_thread():  # else none is raised here
        previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):  # ignored, default, or set outside Python: left as it is
        yield caught
        return
    signal.signal(signal.SIGINT, lambda *_: caught.append(KeyboardInterrupt()))
    try:
        yield caught
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Run the block whole: SIGINT meanwhile raises KeyboardInterrupt once it has ended (an
    error of the block's own comes first). Off the main thread no interrupt is raised at all."""
    with _interrupts_recorded() as caught:
        yield
    if caught:
        raise caught[0]


def _wait_through_interrupts(running) -> None:
    """Wait for the worker (stopping within a token); a KeyboardInterrupt meanwhile (Stop
    pressed again) is ignored: the answer is already ending, and is kept once it has."""
    while True:
        try:
            wait([running])
            return
        except KeyboardInterrupt:
            continue


def _generation_error(error: BaseException) -> BaseException:
    if isinstance(error, LlavaError):
        return error
    if _is_oom(error):
        return GenerationError(
            "out of memory while generating; lower max_new_tokens, start a new chat, "
            "or load the model with --4bit"
        )
    return error


_shared: dict[tuple, Any] = {}


def get_model(
    model: Any = None,
    *,
    quantization: str = "auto",
    device: str | None = None,
    remote_model: str | None = None,
    api_key: str | None = None,
):
    """The one shared `Model` (or `RemoteModel`) for an id: chats naming it share its weights.

    A model object (anything with `generate`) is returned as it is.
    """
    from llava_nb.remote import RemoteModel, is_remote

    if hasattr(model, "generate"):
        return model
    model_id = str(model or default_model_id())
    if is_remote(model_id):
        key: tuple = (model_id, remote_model, api_key)
        if key not in _shared:
            _shared[key] = RemoteModel(model_id, remote_model=remote_model, api_key=api_key)
    else:
        key = (model_id, quantization, device)
        if key not in _shared:
            _shared[key] = Model(model_id, quantization=quantization, device=device)
    return _shared[key]
