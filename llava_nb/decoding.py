"""Faster local generation: the conversation so far is not read again.

A chat's next prompt starts with its previous prompt and answer, so the key/value cache that
answering it left behind already holds most of the new prompt. `ConversationCache` keeps that
cache (one per loaded model: the last conversation answered), finds how much of a new prompt it
covers, and hands `generate` the cache cut to that prefix plus only the images that are not in it.

What makes a prefix reusable: the same token ids and, for image tokens, the same pixels (an
image's fingerprint is a hash of its processed pixel values), computed by the same weights (an
adapter change clears the cache). Anything else, and the prompt is read from the point where it
differs, so the answer is the one a fresh prompt gives.

`StaticDecoder` is the fast path on a GPU: a key/value cache allocated once (gpt-fast style),
the prompt read by the model's own forward, then one token per call through a step whose every
input is a tensor updated in place, so the step can be captured once in a CUDA graph and
replayed. Sampling and stopping reuse `generate`'s own logits processors and stopping criteria,
so a seed gives the tokens `generate` gives.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

IMAGE_INPUTS = ("pixel_values", "image_sizes")  # per-image tensors, one row per image, in order


def image_fingerprints(inputs: dict[str, Any]) -> list[str]:
    """One hash per image of the prompt, from the processed pixels (CPU tensors) and size.

    LLaVA-NeXT pads every image's tiles with zeros to the most any image of the prompt has:
    the padding is left out, so an image keeps its hash when a bigger one joins the chat."""
    pixels, sizes = inputs.get("pixel_values"), inputs.get("image_sizes")
    if pixels is None:
        return []
    prints = []
    for i, row in enumerate(pixels):
        if row.dim() == 4:  # tiles (normalized pixels are never all exactly zero)
            real = row.flatten(1).any(dim=1).nonzero()
            row = row[: int(real.max()) + 1] if len(real) else row
        digest = hashlib.blake2b(row.numpy().tobytes(), digest_size=16)
        if sizes is not None:
            digest.update(sizes[i].numpy().tobytes())
        prints.append(digest.hexdigest())
    return prints


def _image_runs(
    ids: list[int], image_token_id: int, images: int, same_size: bool
) -> list[tuple[int, int]] | None:
    """(start, end) of each of the `images` images' runs of placeholder tokens, in order; None
    where that is unknown.

    A template may write one image's placeholders right after another's (llava-interleave's
    does): touching runs are split where each image's tokens end, known when every image takes
    as many tokens (`same_size`: LLaVA-1.5, one fixed-size crop per image)."""
    runs: list[tuple[int, int]] = []
    for i, token in enumerate(ids):
        if token != image_token_id:
            continue
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    if len(runs) == images:
        return runs
    total = sum(end - start for start, end in runs)
    if not same_size or not images or total % images:
        return None
    each = total // images
    if any((end - start) % each for start, end in runs):
        return None
    return [(at, at + each) for start, end in runs for at in range(start, end, each)]


@dataclass
class _Entry:
    ids: list[int]  # the tokens the cache holds, in order
    images: list[str]  # fingerprints of the images among them
    cache: Any  # a transformers DynamicCache
    weights: object  # what the weights were (adapter state) when it was computed


class ConversationCache:
    """The key/value cache of the last conversation a model answered, for the next turn.

    Not thread-safe by itself: the model's lock is held around `take` ... `keep`.
    """

    def __init__(self, image_token_id: int) -> None:
        self.image_token_id = image_token_id
        self._entry: _Entry | None = None
        self.reused_tokens = 0  # of the last prompt, for status and benchmarks

    def clear(self) -> None:
        self._entry = None

    def take(
        self, inputs: dict[str, Any], fingerprints: list[str], weights: object, static=False
    ) -> tuple[dict[str, Any], Any]:
        """Inputs for `generate` and the cache to continue from (None: start afresh).

        The cache is cut to the longest reusable prefix of the new prompt; image inputs keep
        only the images after that prefix. The entry is consumed: `keep` stores the next one.
        `static`: the caller decodes with a `StaticDecoder` (a static cache is reused only by
        it, a dynamic one only by `generate`). Cutting a static cache moves its write position;
        the entries beyond it are masked until overwritten.
        """
        entry, self._entry = self._entry, None
        self.reused_tokens = 0
        if entry is None or entry.weights != weights or _is_static(entry.cache) != static:
            return inputs, None
        ids = inputs["input_ids"][0].tolist()
        limit = min(len(entry.ids), len(ids) - 1)  # at least one token left to read
        prefix = 0
        while prefix < limit and entry.ids[prefix] == ids[prefix]:
            prefix += 1
        kept_images = 0
        pixels = inputs.get("pixel_values")
        same_size = pixels is not None and pixels.dim() == 4  # (images, 3, h, w): LLaVA-1.5
        runs = _image_runs(ids, self.image_token_id, len(fingerprints), same_size)
        if runs is None:  # where one image ends is unknown: the cached images go all together
            cached = len(entry.images)
            image = self.image_token_id
            last = max((i for i, token in enumerate(entry.ids) if token == image), default=-1)
            if last < prefix and entry.images == fingerprints[:cached]:
                kept_images = cached
            else:  # only the text before the images is kept
                prefix = min(prefix, ids.index(self.image_token_id))
            runs = []
        for start, end in runs:
            if start >= prefix:
                break
            same = (
                end <= prefix
                and kept_images < len(entry.images)
                and entry.images[kept_images] == fingerprints[kept_images]
            )
            if not same:  # a different picture, or one cut in half: read it again
                prefix = start
                break
            kept_images += 1
        if prefix == 0:
            return inputs, None
        cache = entry.cache
        held = cache_length(cache)
        if prefix < held:
            if not getattr(cache, "is_croppable", True):
                return inputs, None
            cache.crop(prefix - held)  # negative: drop that many from the end
        inputs = dict(inputs)
        for key in IMAGE_INPUTS:
            if key in inputs:
                inputs[key] = inputs[key][kept_images:]
                if len(inputs[key]) == 0:
                    del inputs[key]
        self.reused_tokens = prefix
        return inputs, cache

    def keep(self, cache: Any, sequence: list[int], fingerprints: list[str], weights: object):
        """Remember the cache a generation left: it holds the first `cache length` tokens of
        `sequence` (prompt + answer; the last answer token was never fed back)."""
        length = cache_length(cache)
        if length == 0 or length > len(sequence):
            return
        self._entry = _Entry(list(sequence[:length]), list(fingerprints), cache, weights)


def cache_length(cache: Any) -> int:
    """Tokens a transformers cache holds (a static cache keeps the count in a tensor)."""
    return int(cache.get_seq_length())


def _is_static(cache: Any) -> bool:
    return type(cache).__name__ == "StaticCache"


# ------------------------------------------------------------------ static cache + CUDA graph

ENV = "LLAVA_NB_STATIC_DECODE"  # auto (default) | 0: plain generate | 1: static | eager: no graph
# | compile: the step through torch.compile first (fused kernels; a slow first answer)
MODES = ("", "auto", "0", "1", "eager", "compile", "off", "on")  # "" (unset): auto
BLOCK = 1024  # the static cache grows in blocks of this many tokens (each step reads all of it)
CHECK_STEPS = 8  # steps compared, eager against graph, before a captured step is trusted
# How far a replayed step's logits may stray from the eager step's, as a fraction of the
# largest logit. Not zero: in bf16 the eager step itself is not deterministic. On an H200, with
# random LLaVA-1.5-7B weights, two eager runs of the same 8 steps differed by 2.6% (NF4: 2.8%),
# graph vs eager by 2.3% (NF4: 2.0%); in fp32 all three agreed bit for bit. The old bound, 2%,
# sent 4 of 5 bf16 captures back to eager decoding.
GRAPH_TOLERANCE = 0.1
_log = logging.getLogger("llava_nb")


def static_decoder(
    owner: Any, input_ids: Any, options: dict[str, Any], stopping_criteria: Any = None
) -> StaticDecoder | None:
    """The loaded `Model`'s static decoder, prepared for this generation (`generate`'s
    `input_ids`, options and extra stopping criteria) when it applies, else None (plain
    `generate`). By default it applies on CUDA only; `$LLAVA_NB_STATIC_DECODE` forces it off
    (0), on (1: CUDA graphs where CUDA runs), on without graphs (eager), or on with the step
    compiled by torch.compile before it is captured (compile)."""
    mode = os.environ.get(ENV, "").strip().lower()
    if mode not in MODES:  # a typo ("true", "compiled") was read as auto, without a word
        from llava_nb.models import GenerationError

        raise GenerationError(
            f"{ENV}={os.environ[ENV]!r} is not a mode; set it to {', '.join(MODES[1:])}, "
            "or unset it"
        )
    model = owner.model
    forced = ("1", "on", "eager", "compile")
    if mode in ("0", "off") or (mode not in forced and model.device.type != "cuda"):
        return None
    capture = None if mode == "eager" else _capture_for(model.device)
    compiled = mode == "compile"
    decoder = getattr(owner, "_decoder", None)
    try:
        if (
            decoder is None
            or decoder.model is not model
            or decoder.capture is not capture
            or decoder.wants_compiled != compiled
        ):
            decoder = owner._decoder = StaticDecoder(model, capture, compiled=compiled)
        if not decoder.applies(options):
            return None
        decoder.prepare(input_ids, options, stopping_criteria)
        return decoder
    except Exception as e:  # another transformers than the one this was built on
        if not _unsupported_noticed:
            _unsupported_noticed.append(True)
            _log.warning("llava_nb: no static-cache decoding here (%s); using generate", e)
        return None


_unsupported_noticed: list[bool] = []


def _capture_for(device) -> Callable | None:
    """How a step is captured for replay on this device (None: it runs eagerly)."""
    return capture_cuda_graph if device.type == "cuda" else None


def _without_cudnn_attention(device):
    """SDPA backends for a prompt read over the static cache. Each turn's prompt has a new
    length, and cuDNN's attention (which PyTorch picks on Hopper for a 4-D mask) builds a plan
    per shape: on an H200 the first 48-token read over a 705-token cache took 75 ms, the same
    read again 25 ms. The memory-efficient kernel takes any mask and needs no plan."""
    import contextlib

    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(backends)


def capture_cuda_graph(body: Callable[[], Any]) -> Callable[[], Any]:
    """Capture `body` (every input a tensor at a fixed address) in a CUDA graph; return a
    function that replays it and returns its output tensor (overwritten by each replay)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
        for _ in range(2):
            body()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        output = body()

    def replay():
        graph.replay()
        return output

    replay.graph = graph  # kept alive with the function
    return replay


_GENERATE_PARTS = (  # generate's own steps that `StaticDecoder.prepare` reuses
    "_prepare_generation_config",
    "_prepare_special_tokens",
    "_prepare_generated_length",
    "_get_logits_processor",
    "_get_stopping_criteria",
)


class StaticDecoder:
    """Decoding over a pre-allocated key/value cache, one loaded model's (GPU memory bounded by
    the model's context; freed with the model).

    `prefill` reads prompt tokens with the model's normal forward (images included); `step`
    feeds one token at a position through static tensors — the token, the position, the mask
    and every cache layer's write index are written in place from them — so a step captured
    once replays right at any position. A captured step is trusted only after it matched the
    eager step over `CHECK_STEPS` tokens; otherwise (or if capture fails, as bitsandbytes 8-bit
    kernels can) this model decodes eagerly, after one warning.

    `compiled`: the step runs through `torch.compile` (inductor fuses its many small kernels;
    compiling takes a while: in the first answer, and once more, with the cache's length
    symbolic, when the cache first grows) and is captured as compiled. Should compiling fail,
    the step runs as written, after one warning. A step that records attention is never
    compiled.
    """

    def __init__(
        self, model: Any, capture: Callable | None = None, *, compiled: bool = False
    ) -> None:
        import inspect

        import torch

        self.model = model
        self.capture = capture
        self.graphs_ok: bool | None = None  # None: not checked yet; False: fell back to eager
        self.wants_compiled = compiled  # as asked; `compiled`: still so (no failure)
        self.compiled = compiled
        self._compiled_step: Callable | None = None
        self.captures = 0  # steps captured (once per cache size and weights)
        self.cache: Any = None  # a transformers StaticCache
        self.capacity = 0
        # captured steps for this cache and weights: None's records nothing, an attention
        # recorder's key's records into that recorder layout's buffers (one layout kept)
        self._replays: dict[Any, Callable] = {}
        self._recording: tuple[Any, Any] | None = None  # (recorder key, its device buffers)
        self._key: Any = None  # the replay the current generation steps with
        self._weights: object = None
        self._plan: tuple | None = None  # set by prepare(), used by the next generate()
        self._text_config = model.config.get_text_config()
        self._cache_kw = (
            "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        )
        device = model.device
        self._token = torch.zeros((1, 1), dtype=torch.long, device=device)
        self._position = torch.zeros((), dtype=torch.long, device=device)
        self._columns: Any = None  # arange(capacity)
        self._host: Any = None  # pinned host memory a token and its stop flag are copied to
        self._copied: Any = None  # CUDA event: that copy is done
        self._dtype = model.get_input_embeddings().weight.dtype
        self._supported = self._check_supported()

    @property
    def mode(self) -> str:
        """How steps run: "graph" (captured once, replayed) or "eager-static", after
        "compiled " when they go through torch.compile."""
        replayed = self.capture is not None and self.graphs_ok is not False
        mode = "graph" if replayed else "eager-static"
        return f"compiled {mode}" if self._compiling else mode

    def _check_supported(self) -> bool:
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer

        probe = StaticCache(config=self._text_config, max_cache_len=8)  # allocates nothing
        return all(
            type(layer) is StaticLayer and hasattr(layer, "cumulative_length")
            for layer in probe.layers
        )  # sliding-window layers keep their length in Python: not replayable

    def applies(self, options: dict[str, Any]) -> bool:
        """Greedy or sampling, with an attention this step supports; else plain generate."""
        attention = getattr(self._text_config, "_attn_implementation", None) or ""
        attention = attention.removeprefix("llava_nb_recording_")  # attention capture's wrapper
        if not self._supported or attention not in ("sdpa", "eager"):  # others: no 4-D mask
            return False
        missing = [name for name in _GENERATE_PARTS if not hasattr(self.model, name)]
        if missing:
            raise RuntimeError(f"this transformers has no {', '.join(missing)}")
        try:
            config, _ = self.model._prepare_generation_config(None, **options)
            mode = config.get_generation_mode()
        except Exception:  # generate itself reports a bad configuration
            return False
        return getattr(mode, "value", mode) in ("greedy_search", "sample") and (
            config.use_cache is not False
        )

    # ---- the cache

    def reserve(self, cache: Any, needed: int) -> None:
        """Make `self.cache` hold `cache`'s tokens (None: none) with room for `needed`."""
        from transformers import StaticCache

        held = cache_length(cache) if cache is not None else 0
        if self.cache is None or self.capacity < needed:
            context = self._text_config.max_position_embeddings
            capacity = min(max(context, needed), -(-needed // BLOCK) * BLOCK)
            fresh = StaticCache(config=self._text_config, max_cache_len=capacity)
            self._replays.clear()  # a captured step points at the old cache's memory
            self.cache, self.capacity, self._columns = fresh, capacity, None
        if cache is not None and cache is not self.cache and held:
            for new, old in zip(self.cache.layers, cache.layers, strict=True):
                if not new.is_initialized:
                    new.lazy_initialization(old.keys, old.values)
                new.keys[:, :, :held].copy_(old.keys[:, :, :held])
                new.values[:, :, :held].copy_(old.values[:, :, :held])
        self._set_length(held)

    def _set_length(self, length: int) -> None:
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.cumulative_length.fill_(length)
            elif length:
                raise RuntimeError("static cache written before it was allocated")

    # ---- forward passes

    def prefill(self, input_ids, start: int, **inputs: Any):
        """Read `input_ids[:, start:]` (the first `start` are in the cache); image inputs as
        the processor made them. Returns the last position's logits."""
        import torch

        self._set_length(start)
        length = input_ids.shape[1]
        device = input_ids.device
        self._position.fill_(length - 1)  # the last query's, for an attention recorder
        positions = torch.arange(start, length, device=device).unsqueeze(0)
        columns = torch.arange(self.capacity, device=device)
        visible = columns.unsqueeze(0) <= positions.view(-1, 1)  # causal, stale entries hidden
        with _without_cudnn_attention(device):
            out = self.model(
                input_ids=input_ids[:, start:],
                position_ids=positions,
                attention_mask=self._additive(visible).view(1, 1, length - start, self.capacity),
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_kw: self.cache},
                **inputs,
            )
        return out.logits[:, -1]

    def _additive(self, visible):
        import torch

        blocked = torch.finfo(self._dtype).min
        return torch.zeros(visible.shape, dtype=self._dtype, device=visible.device).masked_fill_(
            ~visible, blocked
        )

    def _step_body(self):
        """One token through the model, reading only the static tensors (graph-capturable)."""
        for layer in self.cache.layers:  # the write index of every layer, from the position
            layer.cumulative_length.copy_(self._position)
        mask = self._additive(self._columns <= self._position).view(1, 1, 1, self.capacity)
        out = self.model(
            input_ids=self._token,
            position_ids=self._position.view(1, 1),
            attention_mask=mask,
            use_cache=True,
            **{self._cache_kw: self.cache},
        )
        return out.logits[:, -1]

    def _load(self, token, position: int) -> None:
        self._token.copy_(token.view(1, 1))
        self._position.fill_(position)

    def step(self, token, position: int):
        """Logits after feeding `token` (a 1-element tensor) at `position` (tokens before it
        are in the cache; later entries are ignored). The result is overwritten by the next
        step: copy what you keep."""
        import torch

        if self._columns is None:
            self._columns = torch.arange(self.capacity, device=self._token.device)
        replay = self._replays.get(self._key)
        if replay is None and self.capture is not None and self.graphs_ok is not False:
            replay = self._capture_checked(token, position)
            if replay is not None:
                self._replays[self._key] = replay
        self._load(token, position)
        if replay is not None:
            return replay()
        if not self._compiling:
            return self._step_body()
        try:
            return self._compiled()()
        except Exception as e:
            self._not_compiled(e)  # the step as written rewrites the same cache entries
            return self._step_body()

    @property
    def _compiling(self) -> bool:
        """Whether the step goes through torch.compile: when asked, not recording attention."""
        return self.compiled and self._key is None

    def _compiled(self) -> Callable:
        if self._compiled_step is None:
            import torch

            self._compiled_step = torch.compile(self._step_body)
        return self._compiled_step

    def _not_compiled(self, error: BaseException) -> None:
        self.compiled, self._compiled_step = False, None
        while (inner := getattr(error, "inner_exception", error.__cause__)) is not None:
            error = inner  # a compiler's error wraps the one that says why
        why = f"{type(error).__name__}: {error}".splitlines()[0]
        _log.warning(
            "llava_nb: the decoding step could not be compiled (%s); running it as written", why
        )

    def _capture_checked(self, token, position: int) -> Callable | None:
        """Capture the step, then compare it with the eager step from the same state over a
        few tokens; None (eager from now on, one warning) if capture fails or they differ.
        The steps write cache entries at and after `position`, which decoding overwrites, and
        an attention recorder's rows, which are put back as they were."""
        rows = self._recording[1]["rows"] if self._key is not None else None
        kept = rows.clone() if rows is not None else None
        try:
            return self._capture_and_compare(token, position)
        finally:
            if kept is not None:
                rows.copy_(kept)

    def _capture_and_compare(self, token, position: int) -> Callable | None:
        steps = max(1, min(CHECK_STEPS, self.capacity - position))
        expected, fed = [], []
        current = token.view(1)
        for i in range(steps):
            self._load(current, position + i)
            logits = self._step_body().float()
            expected.append(logits.clone())
            fed.append(current)
            current = logits.argmax(-1)

        def capture_and_measure() -> tuple[Callable, float, float]:
            replay = self._capture_step(token, position)
            worst, scale = 0.0, 1.0
            for i in range(steps):
                self._load(fed[i], position + i)
                difference = float((replay().float() - expected[i]).abs().max())
                worst = max(worst, difference if difference == difference else math.inf)  # NaN
                scale = max(scale, float(expected[i].abs().max()))
            return replay, worst, scale

        try:
            replay, worst, scale = capture_and_measure()
            if self._compiling and worst > GRAPH_TOLERANCE * scale:
                self._not_compiled(
                    RuntimeError(f"it disagreed with the eager step: {worst:.3g} of {scale:.3g}")
                )
                replay, worst, scale = capture_and_measure()  # the step as written
        except Exception as e:  # any capture failure: decode eagerly instead
            self._give_up(f"the decoding step could not be captured ({type(e).__name__}: {e})")
            return None
        if worst > GRAPH_TOLERANCE * scale:
            self._give_up(
                f"the captured step disagreed with the eager step (max logit difference "
                f"{worst:.3g} of {scale:.3g})"
            )
            return None
        self.graphs_ok = True
        return replay

    def _capture_step(self, token, position: int) -> Callable:
        """Capture the step at `position`: compiled first when asked, as written should that
        fail."""
        self._load(token, position)
        self.captures += 1
        if self._compiling:
            try:
                return self.capture(self._compiled())
            except Exception as e:
                self._not_compiled(e)
                self._load(token, position)
        return self.capture(self._step_body)

    def _give_up(self, why: str) -> None:
        self.graphs_ok = False
        self.compiled, self._compiled_step = False, None
        self._replays.clear()
        _log.warning("llava_nb: %s; decoding without CUDA graphs for this model", why)
        import torch

        if self.model.device.type == "cuda":
            torch.cuda.synchronize()

    # ---- generation

    def generate(
        self,
        inputs: dict[str, Any],
        cache: Any,
        *,
        weights: object = None,
        streamer: Any = None,
        recorder: Any = None,
    ):
        """What `model.generate(**inputs, **options, streamer=..., stopping_criteria=...)`
        returns (prompt + answer ids) for the options given to `prepare`, continuing from
        `cache` (None: afresh; from `ConversationCache.take(..., static=True)`: image inputs
        already cut to those after it). The cache it leaves is `self.cache`. `recorder`: an
        attention recorder (`llava_nb.attention`, already entered) that records every step,
        captured steps included; it needs the whole prompt read (`cache` None)."""
        import torch

        if self._plan is None:
            raise RuntimeError("StaticDecoder.generate needs prepare() first")
        (config, processors, criteria), self._plan = self._plan, None
        input_ids = inputs["input_ids"]
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        if weights != self._weights:  # an adapter switch changes the step's code path
            self._replays.clear()
            self._weights = weights
        self.reserve(cache, config.max_length - 1)
        self._key = self._record_with(recorder) if recorder is not None else None
        start = cache_length(self.cache)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        rows = 1  # recorded rows not yet moved off the device (the prefill's, at slot 0)
        try:
            logits = self.prefill(input_ids, start, **extra)
            sequence = input_ids
            while True:  # as generate's sampling loop, one sequence
                scores = processors(sequence, logits.to(copy=True, dtype=torch.float32))
                if config.do_sample:
                    probs = torch.nn.functional.softmax(scores, dim=-1)
                    token = torch.multinomial(probs, num_samples=1).squeeze(1)
                else:
                    token = torch.argmax(scores, dim=-1)
                sequence = torch.cat([sequence, token[:, None]], dim=-1)
                done = criteria(sequence, None)
                reported = self._report(token, done)
                # The next step is queued before the host learns whether this token ends the
                # answer: the device need not idle while the host reads it, streams it and
                # queues the step after. If it does end it, that step was spare: it only fed
                # the last token into the cache.
                fed = sequence.shape[1] < config.max_length  # else the length ends it
                if fed:
                    if recorder is not None and rows == recorder.slots:
                        recorder.move_rows(rows)  # before the next step overwrites slot 0
                        rows = 0
                    logits = self.step(token, sequence.shape[1] - 1)
                    rows += 1
                token_id, stop = reported()
                if streamer is not None:
                    streamer.put(torch.tensor([token_id]))
                if stop or not fed:
                    break  # a spare step's attention row: left out of the map, as a stop's
        finally:
            if recorder is not None:
                recorder.move_rows(rows)
        if streamer is not None:
            streamer.end()
        return sequence

    def _report(self, token, done) -> Callable[[], tuple[int, bool]]:
        """Start copying a token and its stop flag to the host without waiting for the work
        queued after it; returns what waits for the copy and reads them."""
        import torch

        values = torch.stack([token[0], done[0].long()])
        if not values.is_cuda:
            return lambda: (int(values[0]), bool(values[1]))
        if self._host is None:
            self._host = torch.empty(2, dtype=torch.long, pin_memory=True)
            self._copied = torch.cuda.Event()
        self._host.copy_(values, non_blocking=True)
        self._copied.record()

        def read() -> tuple[int, bool]:
            self._copied.synchronize()
            return int(self._host[0]), bool(self._host[1])

        return read

    def _record_with(self, recorder: Any) -> Any:
        """Point `recorder` at device buffers that outlive it, so that a step captured while
        recording replays into them for the next recorder of the same layout; return the
        replay key. One layout is kept: another one drops its buffers and captured step."""
        key = recorder.key
        if self._recording is None or self._recording[0] != key:
            if self._recording is not None:
                self._replays.pop(self._recording[0], None)
            self._recording = key, recorder.make_buffers(self._token.device)
        recorder.record_into(self._recording[1], self._position)
        return key

    def prepare(self, input_ids, options: dict[str, Any], stopping_criteria=None) -> None:
        """Set up the next `generate`: `generate`'s own generation config, logits processors
        and stopping criteria for these options (the model's generation_config included), so
        the tokens are its. Done before any state changes, so a failure changes nothing."""
        from transformers import StoppingCriteriaList

        model = self.model
        defaults = model.generation_config
        config, _ = model._prepare_generation_config(None, **options)
        model._prepare_special_tokens(config, True, device=input_ids.device)
        config = model._prepare_generated_length(
            generation_config=config,
            has_default_max_length=options.get("max_length") is None
            and defaults.max_length is None,
            has_default_min_length=options.get("min_length") is None
            and defaults.min_length is None,
            model_input_name="input_ids",
            input_ids_length=input_ids.shape[1],
            inputs_tensor=input_ids,
        )
        processors = model._get_logits_processor(
            generation_config=config,
            input_ids_seq_length=input_ids.shape[1],
            encoder_input_ids=input_ids,
            device=input_ids.device,
            model_kwargs={"attention_mask": None},
        )
        criteria = model._get_stopping_criteria(
            generation_config=config,
            stopping_criteria=stopping_criteria or StoppingCriteriaList(),
        )
        self._plan = config, processors, criteria
