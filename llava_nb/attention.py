"""Where the answer looked: the language model's attention on the image patches.

Three parts, in the order the data flows:

- `_Recorder` captures, while one answer is generated, each layer's and head's attention from the
  position that chose each new token onto the image-token positions: the language model's
  attention function is wrapped for that one generation (the model's own attention still makes
  the answer) and recorders are attached to its attention modules, then detached.
- geometry (`_image_geometry`) says which pixels of the user's original image each image token
  covers, following the processor: LLaVA-1.5's resize + center crop, LLaVA-NeXT's base view and
  its high-resolution tiles (best resolution, resize + pad, unpadding, newline tokens).
- `AttentionMap` aggregates (tokens, layers, heads, mean or rollout), paints maps over the
  original image, plots them, explores them in a widget, and saves them.

torch and transformers are imported only to record; a saved map loads and plots without them.
"""

from __future__ import annotations

import functools
import html
import io
import json
import math
import os
import re
import secrets
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from llava_nb.errors import LlavaError

FILE_FORMAT = "llava_nb.attention"
FILE_VERSION = 1
# longest side, in pixels, of the image as drawn: in a plot, in a panel of a grid, in the widget
PLOT_SIZE, PANEL_SIZE, EXPLORE_SIZE = 1024, 256, 512
HEADS = ("mean", "max")
METHODS = ("mean", "rollout")


class AttentionError(LlavaError):
    """Attention cannot be captured, selected or read as asked."""


# ---------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _View:
    """One grid of image tokens and where its cells fall on the original image.

    `index[r, c]` is the token (within the image's block of tokens) of grid cell (r, c). An
    original pixel (y, x) lies in cell (floor((y + .5) * a[0] + b[0]), floor((x + .5) * a[1] +
    b[1])), the processor's resize, crop or pad folded into one affine map per axis.
    """

    name: str  # "base" (the whole image at the encoder's size) or "tiles" (LLaVA-NeXT high-res)
    index: np.ndarray
    a: tuple[float, float]
    b: tuple[float, float]

    def cells(self, size: tuple[int, int], shape: tuple[int, int]) -> list[np.ndarray]:
        """For an image of `size` drawn at `shape` pixels: the grid row of each pixel row and the
        grid column of each pixel column (-1: outside the grid)."""
        out = []
        for n, m, a, b, cells in zip(size, shape, self.a, self.b, self.index.shape, strict=True):
            cell = np.floor((np.arange(m) + 0.5) * (n / m) * a + b).astype(np.int64)
            cell[(cell < 0) | (cell >= cells)] = -1
            out.append(cell)
        return out

    def to_json(self) -> dict[str, Any]:
        # the shape too: a grid of no cells, (0, n), lists as [] and would read back flat
        index = {"index": self.index.tolist(), "shape": list(self.index.shape)}
        return {"name": self.name, **index, "a": self.a, "b": self.b}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _View:
        index = np.asarray(data["index"], dtype=np.int64)
        if index.size == 0:  # files saved before the shape was: no cells either way
            index = index.reshape(data.get("shape", (0, 0)))
        return cls(data["name"], index, tuple(data["a"]), tuple(data["b"]))


def _size(size) -> tuple[str, tuple[int, int] | int]:
    """The processor's `size`: ("shortest_edge", n) or ("fixed", (h, w))."""
    get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
    if get("shortest_edge") and not get("longest_edge"):
        return "shortest_edge", int(get("shortest_edge"))
    if get("height") and get("width"):
        return "fixed", (int(get("height")), int(get("width")))
    raise AttentionError(
        f"attention maps do not support this processor's image size setting ({size}); "
        "use a llava-hf LLaVA-1.5 or LLaVA-NeXT checkpoint"
    )


def _clip_transform(processor, height: float, width: float) -> tuple[list[float], list[float]]:
    """Scale and shift per axis of the CLIP-style resize + center crop (processed = o * s + t)."""
    from transformers.image_transforms import get_resize_output_image_size

    ip = processor.image_processor
    scale, shift, size = [1.0, 1.0], [0.0, 0.0], [height, width]
    if getattr(ip, "do_resize", True):
        kind, value = _size(ip.size)
        if kind == "shortest_edge":
            dummy = np.broadcast_to(np.zeros((), np.uint8), (1, round(height), round(width)))
            new = get_resize_output_image_size(
                dummy, size=value, default_to_square=False, input_data_format="channels_first"
            )
        else:
            new = value
        scale = [new[0] / height, new[1] / width]
        size = [float(new[0]), float(new[1])]
    if getattr(ip, "do_center_crop", False):
        _, crop = _size(ip.crop_size)
        for axis in (0, 1):
            extra = size[axis] - crop[axis]
            # transformers' center_crop: floor offset; a too-small image is padded (ceil)
            shift[axis] = -(extra // 2) if extra >= 0 else math.ceil(-extra / 2)
    return scale, shift


def _base_view(config, processor, height: int, width: int, next_style: bool) -> _View:
    """The whole image at the vision encoder's size: LLaVA-1.5's only view, LLaVA-NeXT's base."""
    ip = processor.image_processor
    per = config.vision_config.image_size // config.vision_config.patch_size
    _, crop = _size(ip.crop_size) if getattr(ip, "do_center_crop", False) else _size(ip.size)
    pre_scale, pre_shift, h, w = [1.0, 1.0], [0.0, 0.0], float(height), float(width)
    if next_style:  # LLaVA-NeXT squashes the whole image to `size` first (aspect not kept)
        kind, value = _size(ip.size)
        target = (value, value) if kind == "shortest_edge" else value
        pre_scale = [target[0] / height, target[1] / width]
        h, w = float(target[0]), float(target[1])
    elif getattr(ip, "do_pad", False) and hasattr(ip, "pad_to_square"):  # LlavaImageProcessor
        side = max(height, width)
        pre_shift = [float((side - height) // 2), float((side - width) // 2)]
        h = w = float(side)
    scale, shift = _clip_transform(processor, h, w)
    a, b = [], []
    for axis in (0, 1):
        cell = crop[axis] / per
        a.append(pre_scale[axis] * scale[axis] / cell)
        b.append((pre_shift[axis] * scale[axis] + shift[axis]) / cell)
    return _View("base", np.arange(per * per).reshape(per, per), tuple(a), tuple(b))


def _tiles_view(config, processor, height: int, width: int, first: int) -> tuple[_View, int]:
    """LLaVA-NeXT's high-resolution view, laid out as the model packs it.

    The processor resizes the image (aspect kept) into the best of the grid pinpoints, pads it
    centered, and cuts tiles; the model joins the tiles' features into one grid, removes the
    padding (`unpad_image`) and ends every row with a newline token. Returns the view and the
    number of tokens it takes, newlines included.
    """
    import torch
    from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        unpad_image,
    )

    pinpoints = config.image_grid_pinpoints
    per = config.vision_config.image_size // config.vision_config.patch_size
    tiles_h, tiles_w = get_anyres_image_grid_shape(
        (height, width), pinpoints, config.vision_config.image_size
    )
    best_h, best_w = select_best_resolution((height, width), pinpoints)
    dummy = np.broadcast_to(np.zeros((), np.uint8), (1, height, width))
    new_h, new_w = get_patch_output_size(dummy, (best_h, best_w), "channels_first")
    grid_h, grid_w = tiles_h * per, tiles_w * per
    # the model's own unpadding, on an empty (no channels) canvas of cells: a centered slice
    rows, cols = unpad_image(torch.empty(0, grid_h, grid_w), (height, width)).shape[1:]
    # A very elongated image can keep no row (or no column) at all: its short side rounds to 0
    # cells, and the processor emits no tile tokens then, or only the rows' newline tokens.
    top, left = (grid_h - rows) // 2, (grid_w - cols) // 2
    index = first + np.arange(rows)[:, None] * (cols + 1) + np.arange(cols)[None, :]
    a, b = [], []
    for new, orig, best, grid, start in (
        (new_h, height, best_h, grid_h, top),
        (new_w, width, best_w, grid_w, left),
    ):
        cell = best / grid  # canvas pixels per cell
        paste = (best - new) // 2  # the processor pads centered, the odd pixel at the end
        a.append(new / orig / cell)
        b.append(paste / cell - start)
    return _View("tiles", index, tuple(a), tuple(b)), rows * (cols + 1)


def _image_geometry(config, processor, height: int, width: int) -> dict[str, Any]:
    """Views of one image and the number of image tokens it takes in the prompt."""
    next_style = config.model_type == "llava_next"
    base = _base_view(config, processor, height, width, next_style)
    extra = 1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else 0
    if extra and next_style:
        raise AttentionError("attention maps need vision_feature_select_strategy='default'")
    if extra:  # the CLS token comes first and has no place on the image
        base = _View("base", base.index + 1, base.a, base.b)
    views, tokens = [base], base.index.size + extra
    if next_style:
        tiles, count = _tiles_view(config, processor, height, width, tokens)
        views.append(tiles)
        tokens += count
    return {"size": (height, width), "tokens": tokens, "views": views}


# ---------------------------------------------------------------- capture


_BATCH = 32  # steps kept on the model's device between copies to the CPU
_WRAPPED = "llava_nb_recording"  # + "_" + the implementation it wraps (sdpa, eager, ...)


def _wrapped_implementation(previous: str) -> str:
    """Register, once per wrapped implementation, an attention function that runs the model's
    own one (its output untouched) and hands the last query row's weights to the recorder
    attached to the module; its masks are made as for the wrapped implementation."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = f"{_WRAPPED}_{previous}"
    if name in ALL_ATTENTION_FUNCTIONS:
        return name
    if previous == "eager":
        from transformers.models.llama.modeling_llama import eager_attention_forward as inner
    else:
        inner = ALL_ATTENTION_FUNCTIONS[previous]

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        output, weights = inner(module, query, key, value, attention_mask, *args, **kwargs)
        record = getattr(module, "_llava_nb_record", None)
        if record is not None:
            scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
            row = _last_row(query, key, attention_mask, scaling) if weights is None else None
            record(weights[0, :, -1] if weights is not None else row)
        return output, weights

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[previous])
    return name


def _last_row(query, key, mask, scaling: float):
    """Eager attention's weights for the last query only: softmax(q k^T * scale + mask) in
    float32, cast to the query's dtype, as `eager_attention_forward` computes them."""
    import torch

    _, heads, _, dim = query.shape
    kv_heads = key.shape[1]  # grouped-query attention: each key head serves heads / kv_heads
    q = query[0, :, -1].reshape(kv_heads, heads // kv_heads, dim)
    logits = torch.matmul(q, key[0].transpose(1, 2)).reshape(heads, -1) * scaling
    if mask is not None:  # None: causal, and the last query sees every key
        row = mask[0, :, -1, : key.shape[2]]
        logits = (
            logits.masked_fill(~row, float("-inf")) if row.dtype == torch.bool else logits + row
        )
    return torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)


class _Recorder:
    """Records one generation's attention on the image tokens (a context manager).

    On entry it wraps the language model's attention function (not the vision tower's) and
    attaches a recorder to every attention layer; on exit it detaches them and restores the
    implementation. The wrapper runs the model's own attention unchanged (SDPA stays SDPA: the
    answer is the same as without attention) and computes, per layer and step, only the last
    query position's row of eager attention's weights -- the position whose output chose the
    next token (the last prompt position at prefill). It keeps that row at the image positions,
    plus the position's weight on itself (for rollout). Nothing of size seq x seq is made.
    """

    def __init__(self, model, inputs, messages: list[dict[str, Any]]) -> None:
        import torch

        self._model = model
        self._processor, self._model_id = model.processor, model.model_id  # kept past unload()
        hf = model.model
        parts = [p for m in messages for p in m["content"] if p.get("type") == "image"]
        if not parts:
            raise AttentionError(
                "attention=True (--attention) maps the answer onto the conversation's images, "
                "and it has none; ask with an image"
            )
        if not all(isinstance(p.get("image"), Image.Image) for p in parts):
            raise AttentionError(
                "attention needs the images as PIL images ({'type': 'image', 'image': img}); "
                "load them with llava_nb.load_image"
            )
        self._images = [p["image"] for p in parts]
        self._geometry = [
            _image_geometry(hf.config, model.processor, image.height, image.width)
            for image in self._images
        ]
        ids = inputs["input_ids"][0]
        self._positions = (ids == hf.config.image_token_id).nonzero().flatten()
        expected = sum(g["tokens"] for g in self._geometry)
        if len(self._positions) != expected:
            raise AttentionError(
                f"the prompt has {len(self._positions)} image tokens where the processor's "
                f"layout gives {expected}; attention maps do not support this checkpoint"
            )
        self._layers = list(hf.model.language_model.layers)
        self._heads = hf.config.get_text_config().num_attention_heads
        self._first = len(ids) - 1  # the position whose row chose the first new token
        self._store = torch.float32 if hf.dtype == torch.float32 else torch.float16
        self._step: list[Any] = [None] * len(self._layers)
        self._pending: list[Any] = []  # steps still on the model's device, moved in batches
        self._steps: list[Any] = []  # per forward step: (layers, heads, image tokens + 1), CPU
        self._previous: str | None = None
        self._buffers: dict[str, Any] = {}  # a static decoder's, when it records into them

    def __enter__(self) -> _Recorder:
        hf = self._model.model
        self._previous = hf.config.text_config._attn_implementation
        hf.set_attn_implementation({"text_config": _wrapped_implementation(self._previous)})
        for i, layer in enumerate(self._layers):
            layer.self_attn._llava_nb_record = self._recorder(i)
        return self

    def __exit__(self, *exc) -> None:
        for layer in self._layers:
            vars(layer.self_attn).pop("_llava_nb_record", None)
        if self._previous is not None:
            self._model.model.set_attn_implementation({"text_config": self._previous})

    def _recorder(self, layer: int):
        import torch

        last = len(self._layers) - 1

        def record(row) -> None:  # (heads, keys) of the last query
            self._step[layer] = torch.cat((row[:, self._positions], row[:, -1:]), dim=1)
            if layer == last:
                self._pending.append(torch.stack(self._step))
                self._step = [None] * len(self._layers)
                if len(self._pending) >= _BATCH:
                    self._flush()

        return record

    # ---- inside a static decoder: every step's work is tensor operations on buffers at fixed
    # addresses, so a step captured in a CUDA graph records when replayed

    slots = _BATCH  # rows the device buffers hold between moves to the CPU

    @property
    def key(self) -> tuple[int, int, int]:
        """What decides the buffers' layout (and so a captured recording step)."""
        return len(self._layers), self._heads, len(self._positions)

    def make_buffers(self, device) -> dict[str, Any]:
        """Device buffers for `record_into`: the columns kept (the image tokens', then the
        query's own), the first row's position, the slot of this step, and `slots` rows of
        (layers, heads, image tokens + 1)."""
        import torch

        n = len(self._positions)
        return {
            "columns": torch.zeros(n + 1, dtype=torch.long, device=device),
            "first": torch.zeros((), dtype=torch.long, device=device),
            "slot": torch.zeros(1, dtype=torch.long, device=device),
            "rows": torch.zeros(
                (self.slots, len(self._layers), self._heads, n + 1),
                dtype=self._model.model.dtype,
                device=device,
            ),
        }

    def record_into(self, buffers: dict[str, Any], position) -> None:
        """Record each forward's last row into `buffers` (from `make_buffers`, perhaps made for
        an earlier recorder of this `key`) at slot (position - first) % slots, `position` being
        the decoder's tensor holding the query's position, read when the step runs; the query's
        own key sits at that column. The first layer sets the step's slot and own column for
        the others. `move_rows` takes the rows off the device."""
        import torch

        buffers["columns"][:-1].copy_(self._positions)
        buffers["first"].fill_(self._first)
        self._buffers = buffers
        columns, slot = buffers["columns"], buffers["slot"]
        for i, layer in enumerate(self._layers):

            def record(row, i=i) -> None:  # (heads, cache length) of the last query
                if i == 0:
                    columns[-1:].copy_(position.view(1))
                    slot.copy_(torch.remainder(position - buffers["first"], self.slots).view(1))
                rows = buffers["rows"].select(1, i)
                rows.index_copy_(0, slot, row.index_select(1, columns).unsqueeze(0).to(rows.dtype))

            layer.self_attn._llava_nb_record = record

    def move_rows(self, count: int) -> None:
        """Append the buffers' first `count` rows (the steps since the last move) to the
        answer's steps, in one copy to the CPU."""
        if count:
            rows = self._buffers["rows"][:count].to("cpu", self._store, copy=True)
            self._steps.extend(rows.unbind())

    def _flush(self) -> None:
        """Move the pending steps to the CPU in one copy: a copy per step would wait on the
        device every token."""
        import torch

        if self._pending:
            self._steps.extend(torch.stack(self._pending).to("cpu", self._store).unbind())
            self._pending = []

    def attention_map(self, token_ids: list[int]) -> AttentionMap:
        """The map of the tokens kept (an interrupted answer may have run one step further)."""
        import torch

        processor, n = self._processor, len(token_ids)
        self._flush()
        if len(self._steps) < n:
            raise AttentionError(
                f"captured {len(self._steps)} steps for {n} tokens; ask again with attention=True"
            )
        if n:
            captured = torch.stack(self._steps[:n]).numpy()  # float16 unless the model is fp32
        else:
            shape = (0, len(self._layers), 0, len(self._positions) + 1)
            captured = np.zeros(shape, np.float32)
        tokenizer = getattr(processor, "tokenizer", processor)
        texts = [tokenizer.decode(token_ids[:i], skip_special_tokens=True) for i in range(n + 1)]
        special = set(tokenizer.all_special_ids)
        attention = AttentionMap(
            weights=captured[..., :-1],
            self_weights=captured[..., -1],
            token_ids=list(token_ids),
            pieces=[texts[i + 1][len(texts[i]) :] for i in range(n)],
            labels=[
                tokenizer.convert_ids_to_tokens(t) if t in special else None for t in token_ids
            ],
            images=self._images,
            geometry=self._geometry,
            model_id=self._model_id,
        )
        _remember(attention)
        return attention


_last: list[AttentionMap] = []


def _remember(attention: AttentionMap) -> None:
    _last[:] = [attention]


def last_attention() -> AttentionMap:
    """The attention map of the most recent answer asked with `attention=True`."""
    if not _last:
        raise AttentionError(
            "no attention captured yet; ask with chat.ask(..., attention=True) or %%llava "
            "--attention"
        )
    return _last[0]


# ---------------------------------------------------------------- the map


class AttentionMap:
    """How much each generated token attended to each image patch, per layer and head.

    Recorded for each generated token from the step that chose it: the first token's row is the
    last prompt position at prefill, later ones the single new position of each step -- exactly
    what `generate(..., output_attentions=True)` returns under eager attention, restricted to the
    image-token columns. `weights` is (tokens, layers, heads, image tokens of all images):
    float32 for a float32 model, float16 otherwise (half the memory; bfloat16 weights convert
    exactly down to about 6e-5).

    Selections, shared by every method:

    - `tokens`: None (the whole answer, special tokens such as end-of-sequence left out), an index
      or slice or list of indices into `.tokens`, or text of the answer ("car": every token
      overlapping any occurrence; case-insensitive when the exact case is not there).
    - `layers`: None (all), an index, a slice (`slice(-8, None)`: the last eight) or a list.
    - `heads`: "mean", "max" (over heads) or one head's index.
    - `method`: "mean" (the raw attention, averaged over the layers) or "rollout" (attention
      rollout, Abnar & Zuidema 2020, through the selected layers bottom to top with the
      residual as 0.5 I + 0.5 A, restricted to what is kept: a step's position keeps
      (0.5 + 0.5 * its weight on itself) of the flow at each layer and sends 0.5 * its weights
      to the image tokens, which are taken as endpoints; flow through other text tokens is
      not recorded and is dropped).
    - `image`: which image of the prompt (every image of the conversation, in order; needed
      when there are several, -1 is the latest).

    Several selected tokens are averaged. `normalize=True` divides by the maximum, so maps are
    0..1; `normalize=False` keeps attention units (grid: weight per token; heatmap: weight per
    pixel, so a view's map sums to its tokens' total weight).
    """

    def __init__(
        self,
        *,
        weights: np.ndarray,
        self_weights: np.ndarray,
        token_ids: list[int],
        pieces: list[str],
        labels: list[str | None],
        images: list[Image.Image],
        geometry: list[dict[str, Any]],
        model_id: str = "",
    ) -> None:
        self.weights = weights
        self.self_weights = self_weights
        self.token_ids = token_ids
        self._pieces = pieces
        self._labels = labels
        self.images = images
        self._geometry = geometry
        self.model_id = model_id
        self._starts = np.cumsum([0] + [g["tokens"] for g in geometry]).tolist()
        self._cache: dict[Any, np.ndarray] = {}

    def _check_shapes(self) -> None:
        """The parts agree (a file edited or cut by hand would fail later, far from its cause)."""
        weights = self.weights
        tokens = len(self.token_ids)
        parts = (len(self._pieces), len(self._labels), self.self_weights.shape[:1])
        if weights.ndim != 4 or parts != (tokens, tokens, (tokens,)) or weights.shape[0] != tokens:
            raise ValueError("its weights, tokens and texts disagree in length")
        if self.self_weights.shape != weights.shape[:3]:
            raise ValueError("its weights and self-weights disagree in shape")
        if weights.shape[3] != self._starts[-1] or len(self.images) != len(self._geometry):
            raise ValueError("its weights and image geometry disagree")

    def __repr__(self) -> str:
        tokens, layers, heads, _ = self.weights.shape
        return (
            f"AttentionMap({tokens} tokens, {layers} layers, {heads} heads, "
            f"{len(self.images)} image(s), answer={self.text[:40]!r})"
        )

    @property
    def text(self) -> str:
        """The answer, as the chat keeps it."""
        return "".join(self._pieces)

    @property
    def tokens(self) -> list[str]:
        """Each generated token as text (special tokens by name, e.g. "</s>")."""
        return [label or piece for piece, label in zip(self._pieces, self._labels, strict=True)]

    @property
    def num_layers(self) -> int:
        return self.weights.shape[1]

    @property
    def num_heads(self) -> int:
        return self.weights.shape[2]

    # --- selection

    def find(self, text: str) -> list[int]:
        """Indices of the tokens overlapping every occurrence of `text` in the answer."""
        answer = self.text
        spans = [m.span() for m in re.finditer(re.escape(text), answer)] if text else []
        if not spans and text:
            spans = [m.span() for m in re.finditer(re.escape(text), answer, re.IGNORECASE)]
        ends = np.cumsum([len(p) for p in self._pieces])
        starts = ends - [len(p) for p in self._pieces]
        return sorted(
            {
                i
                for s, e in spans
                for i in range(len(self._pieces))
                if starts[i] < e and ends[i] > s and ends[i] > starts[i]
            }
        )

    def _tokens(self, tokens) -> list[int]:
        n = len(self.token_ids)
        if tokens is None:
            chosen = [i for i in range(n) if self._labels[i] is None] or list(range(n))
        elif isinstance(tokens, str):  # a special token by its name ("</s>") has no text
            chosen = self.find(tokens) or [i for i, x in enumerate(self._labels) if x == tokens]
            if not chosen:
                raise AttentionError(
                    f"{tokens!r} is not in the answer ({_short(self.text)!r}); pick a word of "
                    f"the answer or a token index 0..{n - 1}"
                )
        else:
            what = f"the answer has {n} tokens"
            chosen = _selected(tokens, n, "token", what, "an index, slice, list or text")
        if not chosen:
            raise AttentionError(f"no tokens selected (the answer has {n}); pick other tokens")
        return chosen

    def _layers(self, layers) -> list[int]:
        n = self.num_layers
        if layers is None:
            return list(range(n))
        what = f"this model has {n} layers (0..{n - 1} or -{n}..-1)"
        chosen = sorted(set(_selected(layers, n, "layer", what, "an index, slice or list")))
        if not chosen:
            raise AttentionError(f"no layers selected (the model has {n}); pick other layers")
        return chosen

    def _head(self, heads) -> str | int:
        """`heads` checked: "mean", "max" or a head index (from 0)."""
        if isinstance(heads, str) and heads in HEADS:
            return heads
        if isinstance(heads, int | np.integer) and not isinstance(heads, bool):
            n = self.num_heads
            return _index(heads, n, "head", f"the model has {n} heads")
        raise AttentionError(f"heads must be 'mean', 'max' or a head index, got {heads!r}")

    def _heads(self, values: np.ndarray, heads) -> np.ndarray:
        """Reduce axis -2 (heads) of (..., heads, x)."""
        heads = self._head(heads)
        if heads == "mean":
            return values.mean(axis=-2)
        if heads == "max":
            return values.max(axis=-2)
        return values[..., heads, :]

    def _image(self, image) -> int:
        n = len(self.images)
        if n == 0:
            raise AttentionError("this answer saw no image; ask about an image")
        if image is None:
            if n > 1:
                raise AttentionError(
                    f"this answer saw {n} images; pass image=0..{n - 1} (-1 is the latest)"
                )
            return 0
        return _index(image, n, "image", f"this answer saw {n} image(s)")

    def _vector(self, tokens=None, layers=None, heads="mean", method="mean", image=None):
        """The aggregated attention on each token of one image (its block of the prompt)."""
        if method not in METHODS:
            raise AttentionError(f"unknown method {method!r}; use 'mean' or 'rollout'")
        chosen, depth, k = self._tokens(tokens), self._layers(layers), self._image(image)
        heads = self._head(heads)
        key = (tuple(chosen), tuple(depth), heads, method, k)
        if key not in self._cache:
            start, end = self._starts[k], self._starts[k + 1]
            rows = self.weights[chosen][:, depth, :, start:end]  # (t, l, h, n)
            on_image = self._heads(rows.astype(np.float32), heads)  # (t, l, n)
            if method == "mean":
                result = on_image.mean(axis=1)
            else:
                kept_self = self.self_weights[chosen][:, depth, :, None].astype(np.float32)
                itself = self._heads(kept_self, heads)[..., 0]
                result = np.zeros_like(on_image[:, 0])
                kept = np.ones(len(chosen), np.float32)
                for layer in reversed(range(len(depth))):  # from the top layer down
                    result += 0.5 * kept[:, None] * on_image[:, layer]
                    kept = kept * (0.5 + 0.5 * itself[:, layer])
            self._cache[key] = result.mean(axis=0)
        return self._cache[key]

    # --- maps

    def _views(self, k: int) -> list[_View]:
        return self._geometry[k]["views"]

    def grid(
        self,
        tokens=None,
        layers=None,
        heads="mean",
        method="mean",
        *,
        image=None,
        view: str | None = None,
        normalize: bool = True,
    ) -> np.ndarray:
        """The map on one view's patch grid (24 x 24 for LLaVA-1.5).

        view: "base" or, for LLaVA-NeXT, "tiles" (the default there: the high-resolution grid
        after unpadding, newline tokens left out; "base" when unpadding kept no cell).
        """
        values = self._vector(tokens, layers, heads, method, image)
        views = {v.name: v for v in self._views(self._image(image))}
        tiles = views.get("tiles")  # none kept (a very elongated image): the base view
        name = view or ("tiles" if tiles is not None and tiles.index.size else "base")
        if name not in views:
            raise AttentionError(f"unknown view {name!r}; this model has {', '.join(views)}")
        return _normalized(values[views[name].index], normalize)

    def heatmap(
        self,
        tokens=None,
        layers=None,
        heads="mean",
        method="mean",
        *,
        image=None,
        view: str | None = None,
        normalize: bool = True,
    ) -> np.ndarray:
        """The map at the original image's pixel size (height, width), 0..1 when normalized.

        Each token's weight is spread evenly over the pixels its patch covers (weight / area),
        so regions the processor cropped away get 0. For LLaVA-NeXT the base view and the
        high-resolution tiles are added up in these per-pixel units (`view=None`), so a region
        counts what both views gave it; `view="base"` or `"tiles"` draws one.
        """
        k = self._image(image)
        return self._map(
            k, self._geometry[k]["size"], tokens, layers, heads, method, view, normalize
        )

    def _map(self, k: int, shape, tokens, layers, heads, method, view, normalize) -> np.ndarray:
        values = self._vector(tokens, layers, heads, method, k)
        return _normalized(self._paint(k, values, view, shape), normalize)

    def _shown(self, k: int, longest: int) -> tuple[Image.Image, tuple[int, int]]:
        """Image `k` and its (height, width) scaled down to `longest` pixels, for drawing: maps
        of a 12-megapixel photo at full size took minutes and gigabytes in a panel grid."""
        height, width = self._geometry[k]["size"]
        scale = min(1.0, longest / max(height, width))
        shape = (max(1, round(height * scale)), max(1, round(width * scale)))
        return self.images[k].convert("RGB").resize(shape[::-1]), shape

    def _paint(self, k: int, values: np.ndarray, view, shape: tuple[int, int]) -> np.ndarray:
        """Token weights of image `k` as weight per original pixel, drawn at `shape`."""
        names = [v.name for v in self._views(k)]
        if view is not None and view not in names:
            raise AttentionError(f"unknown view {view!r}; this model has {', '.join(names)}")
        total = np.zeros(shape, np.float32)
        for v in self._views(k):
            if view in (None, v.name):
                rows, cols = v.cells(self._geometry[k]["size"], shape)
                grid = values[v.index] * (v.a[0] * v.a[1])  # a cell covers 1 / (a0 a1) pixels
                inside = np.ix_(rows >= 0, cols >= 0)
                total[inside] += grid[np.ix_(rows[rows >= 0], cols[cols >= 0])]
        return total

    # --- plots

    def _title(self, tokens) -> str:
        chosen = self._tokens(tokens)
        if tokens is None:
            return f"whole answer ({len(chosen)} tokens)"
        return _short("".join(self.tokens[i] for i in chosen).strip() or "·", 60)

    def plot(
        self,
        tokens=None,
        layers=None,
        heads="mean",
        method="mean",
        *,
        image=None,
        view: str | None = None,
        cmap: str = "jet",
        alpha: float = 0.5,
    ):
        """A matplotlib Figure: the heatmap over the original image, with a colorbar.

        With several images and `image=None`, one panel per image, each scaled to its maximum.
        """
        _check_style(cmap, alpha)
        indices = [self._image(image)] if image is not None or len(self.images) < 2 else None
        indices = indices or list(range(len(self.images)))
        fig, axes = _figure(1, len(indices), 4.5)
        for ax, k in zip(axes[0], indices, strict=True):
            picture, shape = self._shown(k, PLOT_SIZE)
            heat = self._map(k, shape, tokens, layers, heads, method, view, True)
            shown = _overlay_axes(ax, picture, heat, cmap, alpha)
            if len(indices) > 1:
                ax.set_title(f"image {k}", fontsize=9)
        _colorbar(fig, shown, axes, 0.046)
        fig.suptitle(f"{self._title(tokens)} — {_describe(layers, heads, method)}", fontsize=10)
        return fig

    def plot_layers(
        self,
        tokens=None,
        heads="mean",
        *,
        layer=None,
        by: str = "layer",
        image=None,
        view: str | None = None,
        cmap: str = "jet",
        alpha: float = 0.5,
        columns: int = 8,
    ):
        """One small overlay per layer (`by="layer"`, heads reduced by `heads`) or per head of
        `layer` (`by="head"`, default: all layers averaged), on one color scale."""
        _check_style(cmap, alpha, columns=columns)
        if by == "layer":
            panels = [(f"layer {i}", dict(layers=i, heads=heads)) for i in self._layers(None)]
        elif by == "head":
            panels = [(f"head {h}", dict(layers=layer, heads=h)) for h in range(self.num_heads)]
        else:
            raise AttentionError(f"by must be 'layer' or 'head', got {by!r}")
        k = self._image(image)
        picture, shape = self._shown(k, PANEL_SIZE)
        maps = [
            self._map(k, shape, tokens, kw["layers"], kw["heads"], "mean", view, False)
            for _, kw in panels
        ]
        fig = _panel_grid(picture, panels, maps, columns, cmap, alpha)
        fig.suptitle(f"{self._title(tokens)} — per {by}", fontsize=10)
        return fig

    def plot_tokens(
        self,
        layers=None,
        heads="mean",
        method="mean",
        *,
        tokens=None,
        image=None,
        view: str | None = None,
        cmap: str = "jet",
        alpha: float = 0.5,
        columns: int = 8,
        limit: int = 48,
    ):
        """A strip for the whole answer: one small overlay per token (the first `limit`), on one
        color scale."""
        _check_style(cmap, alpha, columns=columns, limit=limit)
        k = self._image(image)
        chosen = self._tokens(tokens)[:limit]
        panels = [(repr(self.tokens[i]), i) for i in chosen]
        picture, shape = self._shown(k, PANEL_SIZE)
        maps = [self._map(k, shape, i, layers, heads, method, view, False) for _, i in panels]
        fig = _panel_grid(picture, panels, maps, columns, cmap, alpha)
        fig.suptitle(f"per token — {_describe(layers, heads, method)}", fontsize=10)
        return fig

    def explore(self, layers=None, heads="mean", method="mean", *, image=None, view=None):
        """A widget: click a word of the answer and the heatmap follows (no model needed)."""
        return _explorer_class()(
            self, layers=layers, heads=heads, method=method, image=image, view=view
        )

    # --- files

    def save(self, path: str | os.PathLike) -> str:
        """Write the map, its answer and its images to one .npz file (atomically). An existing
        attention file at `path` is replaced; any other file is left alone."""
        if not isinstance(path, str | os.PathLike) or not str(path).strip():
            raise AttentionError(f"save needs a file path, e.g. 'attention.npz'; got {path!r}")
        path = Path(path).expanduser()
        if path.is_dir():
            raise AttentionError(f"cannot save attention to '{path}': it is a folder; name a file")
        if path.exists() and not _is_attention_file(path):
            raise AttentionError(
                f"'{path}' exists and is not a llava_nb attention file; save under another name, "
                "or delete that file first"
            )
        meta = {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "model_id": self.model_id,
            "labels": self._labels,
            "pieces": self._pieces,
            "geometry": [{**g, "views": [v.to_json() for v in g["views"]]} for g in self._geometry],
        }
        arrays = {f"image_{i}": np.asarray(im.convert("RGB")) for i, im in enumerate(self.images)}
        # a name of its own: two saves to one path at once must not write into one file
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(temporary, "wb") as f:
                np.savez_compressed(
                    f,
                    meta=np.array(json.dumps(meta)),
                    weights=self.weights,
                    self_weights=self.self_weights,
                    token_ids=np.asarray(self.token_ids, np.int64),
                    **arrays,
                )
            os.replace(temporary, path)
        except BaseException as e:  # an interrupt too: no temporary file left behind
            temporary.unlink(missing_ok=True)
            if not isinstance(e, OSError):
                raise
            raise AttentionError(
                f"cannot save attention to '{path}' ({e.strerror or e}); choose another path"
            ) from None
        return str(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> AttentionMap:
        """Read a map written by `save`."""
        if not isinstance(path, str | os.PathLike) or not str(path).strip():
            raise AttentionError(f"load needs a file path, e.g. 'attention.npz'; got {path!r}")
        path = Path(path).expanduser()
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                if not isinstance(meta, dict) or meta.get("format") != FILE_FORMAT:
                    raise ValueError("not an attention file")
                version = meta.get("version")
                if not isinstance(version, int) or isinstance(version, bool):
                    raise ValueError(f"version {version!r} is not a number")
                if version > FILE_VERSION:
                    raise AttentionError(
                        f"'{path}' was saved by a newer llava_nb (file version {version}); "
                        "upgrade llava_nb to read it"
                    )
                geometry = [
                    {
                        "size": tuple(g["size"]),
                        "tokens": g["tokens"],
                        "views": [_View.from_json(v) for v in g["views"]],
                    }
                    for g in meta["geometry"]
                ]
                loaded = cls(
                    weights=data["weights"],
                    self_weights=data["self_weights"],
                    token_ids=data["token_ids"].tolist(),
                    pieces=meta["pieces"],
                    labels=meta["labels"],
                    images=[Image.fromarray(data[f"image_{i}"]) for i in range(len(geometry))],
                    geometry=geometry,
                    model_id=meta.get("model_id", ""),
                )
            loaded._check_shapes()
            return loaded
        except FileNotFoundError:
            raise AttentionError(f"attention file '{path}' not found; check the path") from None
        except IsADirectoryError:
            raise AttentionError(f"'{path}' is a folder; name an attention file") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError,
                zipfile.BadZipFile) as e:  # fmt: skip
            raise AttentionError(
                f"'{path}' is not a llava_nb attention file ({e}); save one with att.save()"
            ) from None


# ---------------------------------------------------------------- helpers


def _is_attention_file(path: Path) -> bool:
    try:
        with np.load(path, allow_pickle=False) as data:
            return json.loads(str(data["meta"])).get("format") == FILE_FORMAT
    except Exception:  # anything unreadable as one is not one
        return False


def _selected(selection, n: int, what: str, context: str, kinds: str) -> list[int]:
    """Indices 0..n-1 chosen by an index, a slice or a list of indices."""
    if isinstance(selection, slice):
        try:
            return list(range(n))[selection]
        except (TypeError, ValueError) as e:  # slice(0, 5, 0), slice("a", None)
            raise AttentionError(f"bad {what} slice {selection!r} ({e}); {context}") from None
    if isinstance(selection, int | np.integer):
        selection = [selection]
    if not isinstance(selection, list | tuple | range | np.ndarray):
        raise AttentionError(f"{what}s must be {kinds}, got {selection!r}")
    return [_index(i, n, what, context) for i in selection]


def _index(i, n: int, what: str, context: str) -> int:
    if not isinstance(i, int | np.integer) or isinstance(i, bool) or not -n <= i < n:
        raise AttentionError(f"{what} {i!r} is out of range; {context}")
    return int(i) % n


def _short(text: str, limit: int = 50) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _normalized(values: np.ndarray, normalize: bool) -> np.ndarray:
    values = np.asarray(values, np.float32)
    top = float(values.max()) if values.size else 0.0
    return values / top if normalize and top > 0 else values


def _describe(layers, heads, method) -> str:
    if layers is None:
        depth = "all layers"
    elif isinstance(layers, slice):
        depth = f"layers [{layers.start or ''}:{'' if layers.stop is None else layers.stop}]"
    else:
        depth = f"layer(s) {layers}"
    return f"{method}, {depth}, heads {heads}"


def _figure(rows: int, columns: int, inches: float):
    """A figure closed to pyplot at once: it shows where it is returned, not twice."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        rows, columns, figsize=(inches * columns, inches * rows), squeeze=False
    )
    plt.close(fig)
    return fig, axes


def _overlay_axes(ax, image: Image.Image, heat: np.ndarray, cmap: str, alpha: float, vmax=1.0):
    ax.imshow(image)
    shown = ax.imshow(heat, cmap=cmap, alpha=alpha, vmin=0.0, vmax=vmax, interpolation="nearest")
    ax.set_axis_off()
    return shown


def _panel_grid(image, panels, maps, columns: int, cmap: str, alpha: float):
    top = max((float(m.max()) for m in maps), default=0.0) or 1.0
    columns = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / columns)
    fig, axes = _figure(rows, columns, 2.0)
    shown = None
    for ax, (title, _), heat in zip(axes.ravel(), panels, maps, strict=False):
        shown = _overlay_axes(ax, image, heat / top, cmap, alpha)
        ax.set_title(_short(title, 20), fontsize=8)
    for ax in axes.ravel()[len(panels) :]:
        ax.set_axis_off()
    if shown is not None:
        _colorbar(fig, shown, axes, 0.02)
    return fig


def _check_style(cmap, alpha, **counts) -> None:
    """Plot settings checked up front: matplotlib's own errors run to several lines."""
    from matplotlib import colormaps

    if not isinstance(cmap, str) or cmap not in colormaps:
        raise AttentionError(f"unknown cmap {cmap!r}; use a matplotlib colormap name, e.g. 'jet'")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
        raise AttentionError(f"alpha must be a number from 0 to 1, got {alpha!r}")
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise AttentionError(f"{name} must be a whole number >= 1, got {value!r}")


def _colorbar(fig, shown, axes, fraction: float) -> None:
    bar = fig.colorbar(shown, ax=axes.ravel().tolist(), fraction=fraction, pad=0.02)
    bar.set_label("attention (max = 1)")
    bar.solids.set_alpha(1.0)  # the colors themselves, not as blended over the picture


def overlay(image: Image.Image, heat: np.ndarray, cmap: str = "jet", alpha: float = 0.5):
    """The heatmap blended over the image, as a PIL image (for widgets and files)."""
    from matplotlib import colormaps

    colors = colormaps[cmap](np.clip(heat, 0, 1))[..., :3]
    base = np.asarray(image.convert("RGB"), np.float32) / 255
    mixed = (1 - alpha) * base + alpha * colors
    return Image.fromarray((mixed * 255).round().astype(np.uint8))


# ---------------------------------------------------------------- the widget


@functools.cache
def _explorer_class():
    """Defined on first use, so importing llava_nb.attention does not import ipywidgets."""
    import ipywidgets as widgets

    class AttentionExplorer(widgets.VBox):
        """Token buttons above the image: a click redraws the heatmap from the recorded map."""

        def __init__(self, attention: AttentionMap, *, layers, heads, method, image, view):
            self.attention, self.view = attention, view
            self.k = attention._image(image)
            attention._vector(None, layers, heads, method, self.k)  # bad selections fail now
            n = attention.num_layers
            depth, heads = attention._layers(layers), attention._head(heads)
            if depth != list(range(depth[0], depth[-1] + 1)):
                raise AttentionError(
                    f"explore shows a range of layers, not {layers!r}; pass one layer or a slice "
                    "with step 1 (e.g. slice(-8, None)), or use plot_layers"
                )
            self.method = widgets.Dropdown(options=METHODS, value=method, description="method")
            self.heads = widgets.Dropdown(
                options=[*HEADS, *range(attention.num_heads)], value=heads, description="heads"
            )
            self.layers = widgets.IntRangeSlider(
                value=(depth[0], depth[-1]), min=0, max=n - 1, description="layers"
            )
            self.answer = widgets.Button(description="whole answer", button_style="info")
            self.buttons = [
                widgets.Button(
                    description=text.replace("\n", "⏎") or "·",
                    tooltip=f"token {i}",
                    layout=widgets.Layout(width="auto"),
                )
                for i, text in enumerate(attention.tokens)
            ]
            self.image = widgets.Image(format="png")
            self.caption = widgets.HTML()
            self.selected: int | None = None
            self.answer.on_click(lambda _: self.select(None))
            for i, button in enumerate(self.buttons):
                button.on_click(lambda _, i=i: self.select(i))
            for control in (self.method, self.heads, self.layers):
                control.observe(lambda _: self.select(self.selected), names="value")
            self.picture, self.shape = attention._shown(self.k, EXPLORE_SIZE)
            tokens = widgets.Box(
                [self.answer, *self.buttons], layout=widgets.Layout(flex_flow="row wrap")
            )
            controls = widgets.HBox([self.method, self.heads, self.layers])
            super().__init__([controls, tokens, self.caption, self.image])
            self.select(None)

        def select(self, token: int | None) -> None:
            """Show the map of one token (None: the whole answer)."""
            att, self.selected = self.attention, token
            low, high = self.layers.value
            layers = slice(low, high + 1)
            heads, method = self.heads.value, self.method.value
            heat = att._map(self.k, self.shape, token, layers, heads, method, self.view, True)
            buffer = io.BytesIO()
            overlay(self.picture, heat).save(buffer, format="PNG")
            self.image.value = buffer.getvalue()
            for i, button in enumerate(self.buttons):
                button.button_style = "warning" if i == token else ""
            label = att._title(token)
            self.caption.value = f"<b>{html.escape(label)}</b> — layers {low}..{high}"

    return AttentionExplorer
