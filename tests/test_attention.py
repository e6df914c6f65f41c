"""Attention over image patches: capture, geometry, aggregation, plots, widget, files, front ends.

The tiny checkpoints have random weights, so the maps show nothing meaningful; the tests check
that the numbers are exactly transformers' own, that each patch lands on the pixels the
processor made it from, and what a user sees.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image, ImageDraw

import llava_nb as ln
from llava_nb.attention import AttentionError, AttentionMap, _image_geometry, overlay

matplotlib.use("Agg")

SIZES = [(30, 100), (170, 40), (64, 64), (333, 500), (37, 211), (90, 23)]  # (height, width)
# banners and poles: LLaVA-NeXT's unpadding keeps few tile rows (columns) of them, or none
ELONGATED = [(100, 1000), (1, 200), (50, 2000), (30, 200), (100, 1), (2000, 50), (200, 30)]


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def models(tiny_llava, tiny_llava_next) -> dict[str, ln.Model]:
    return {
        "llava": ln.Model(tiny_llava, quantization="none").load(),
        "llava_next": ln.Model(tiny_llava_next, quantization="none").load(),
    }


def ask_about(images, question="What color is the shape?") -> list[dict]:
    content = [{"type": "image", "image": image} for image in images]
    return [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]


def shape_image(height: int, width: int, box, color="red") -> Image.Image:
    image = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(image).rectangle(box, fill=color)
    return image


def one_hot_map(model: ln.Model, images) -> AttentionMap:
    """A map of one token whose layer-0 weights are filled in by the test."""
    config, processor = model.model.config, model.processor
    geometry = [_image_geometry(config, processor, im.height, im.width) for im in images]
    n = sum(g["tokens"] for g in geometry)
    return AttentionMap(
        weights=np.zeros((1, 1, 1, n), np.float32),
        self_weights=np.zeros((1, 1, 1), np.float32),
        token_ids=[5],
        pieces=["red"],
        labels=[None],
        images=list(images),
        geometry=geometry,
    )


# ---------------------------------------------------------------- capture


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_capture_is_exactly_what_transformers_returns_under_eager(models, kind):
    """Every step, prefill included: the row of the position that chose the token, at the image
    positions; two images of odd aspect ratios in one prompt."""
    from transformers import AutoModelForImageTextToText

    model = models[kind]
    images = [shape_image(30, 100, (5, 5, 40, 20)), shape_image(170, 40, (0, 0, 20, 60), "blue")]
    messages = ask_about(images)
    plain = model.generate(messages, max_new_tokens=6).wait()
    generation = model.generate(messages, max_new_tokens=6, attention=True)
    assert generation.wait() == plain  # the model's own attention still makes the answer
    att = generation.attention

    reference = AutoModelForImageTextToText.from_pretrained(
        model.model_id, attn_implementation="eager"
    ).eval()
    inputs = model.processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    out = reference.generate(
        **inputs,
        max_new_tokens=6,
        do_sample=False,
        output_attentions=True,
        return_dict_in_generate=True,
    )
    prompt = inputs["input_ids"].shape[1]
    assert out.sequences[0, prompt:].tolist() == att.token_ids == generation.token_ids
    image = (inputs["input_ids"][0] == reference.config.image_token_id).nonzero().flatten()
    expected = np.stack(
        [np.stack([layer[0, :, -1, image].numpy() for layer in step]) for step in out.attentions]
    )
    itself = np.stack(
        [np.stack([layer[0, :, -1, -1].numpy() for layer in step]) for step in out.attentions]
    )
    assert out.attentions[0][0].shape[2] == prompt  # step 0 is the prefill: its last row
    assert att.weights.shape == expected.shape == (6, 2, 4, len(image))
    # computed from SDPA's hidden states (the reference's are eager): float32 rounding only
    np.testing.assert_allclose(att.weights, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(att.self_weights, itself, rtol=0, atol=1e-6)
    assert "".join(att._pieces) == att.text == generation.text

    # afterwards the model is as it was: SDPA, nothing attached, the same answer
    assert model.model.config.text_config._attn_implementation == "sdpa"
    for layer in model.model.model.language_model.layers:
        assert not hasattr(layer.self_attn, "_llava_nb_record")
    assert model.generate(messages, max_new_tokens=6).wait() == plain


def test_an_eager_model_and_a_stopped_answer(models, tiny_llava):
    image = shape_image(40, 90, (10, 10, 30, 30))
    messages = ask_about([image])
    sdpa = models["llava"].generate(messages, max_new_tokens=5, attention=True)
    sdpa.wait()
    eager = ln.Model(tiny_llava, quantization="none").load()
    eager.model.set_attn_implementation("eager")
    generation = eager.generate(messages, max_new_tokens=5, attention=True)
    generation.wait()
    np.testing.assert_allclose(generation.attention.weights, sdpa.attention.weights, atol=1e-6)
    assert eager.model.config.text_config._attn_implementation == "eager"

    stopped = eager.generate(messages, max_new_tokens=50, attention=True)
    for _ in stopped:
        stopped.stop()
    assert stopped.stopped and stopped.attention.weights.shape[0] == len(stopped.token_ids)
    assert stopped.attention.text == stopped.text
    eager.unload()


def test_memory_holds_only_the_image_columns(models):
    model = models["llava_next"]
    image = shape_image(64, 64, (0, 0, 10, 10))
    generation = model.generate(ask_about([image]), max_new_tokens=5, attention=True)
    generation.wait()
    att = generation.attention
    tokens, layers, heads, n = att.weights.shape
    assert (layers, heads) == (2, 4) and tokens == len(generation.token_ids)
    assert n == att._geometry[0]["tokens"] < generation.prompt_tokens
    assert att.weights.nbytes == tokens * layers * heads * n * 4  # never prompt x prompt


def test_half_precision_models_keep_float16(tiny_llava, photo):
    """A bfloat16 model's rows are kept as float16 (half the memory of float32)."""
    import torch

    model = ln.Model(tiny_llava, quantization="none").load()
    model.model.to(torch.bfloat16)
    generation = model.generate(ask_about([photo]), max_new_tokens=4, attention=True)
    generation.wait()
    att = generation.attention
    assert att.weights.dtype == np.float16 and att.self_weights.dtype == np.float16
    total = att.weights.astype(np.float32).sum(-1) + att.self_weights.astype(np.float32)
    assert (total <= 1.02).all() and (total > 0).all()
    assert att.heatmap(method="rollout").dtype == np.float32
    model.unload()


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_models_record_attention(tiny_llava, photo, quantization):
    model = ln.Model(tiny_llava, quantization=quantization)
    answer = ln.Chat(model, max_new_tokens=4).ask("What is it?", photo, attention=True)
    att = answer.attention
    assert att.weights.shape[:3] == (len(att.token_ids), 2, 4)
    assert np.isfinite(att.weights).all() and (att.weights >= 0).all()
    assert (att.weights.sum(axis=-1) <= 1.001).all()
    assert att.heatmap().shape == (photo.height, photo.width)
    assert model.model.config.text_config._attn_implementation == "sdpa"
    model.unload()


# ---------------------------------------------------------------- geometry


def processed_cells(pixels: np.ndarray, processor, per: int) -> np.ndarray:
    """Mean brightness (0..1) of each patch cell of one processed image (3, H, W)."""
    ip = processor.image_processor
    std, mean = np.asarray(ip.image_std), np.asarray(ip.image_mean)
    rgb = pixels * std[:, None, None] + mean[:, None, None]
    gray = rgb.mean(axis=0)
    h, w = gray.shape
    return gray.reshape(h // per, per, w // per, per).mean(axis=(1, 3))


def token_cells(model: ln.Model, height: int, width: int) -> tuple[dict[int, tuple], np.ndarray]:
    """Ground truth from the model itself: where each image token's features come from.

    The processor's tiles become one canvas of cells; `pack_image_features` (the model's own
    packing: unpadding, newline tokens) is run on features that carry their canvas cell number.
    Returns {token: ("base", row, col) or ("tiles", row, col)} and the canvas shape in cells.
    """
    import torch

    config = model.model.config
    per = config.vision_config.image_size // config.vision_config.patch_size
    truth = {t: ("base", t // per, t % per) for t in range(per * per)}
    if config.model_type != "llava_next":
        return truth, None
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    th, tw = get_anyres_image_grid_shape(
        (height, width), config.image_grid_pinpoints, config.vision_config.image_size
    )
    canvas = torch.arange(th * per * tw * per, dtype=torch.float32).view(th, per, tw, per)
    tiles = canvas.permute(0, 2, 1, 3).reshape(th * tw, per * per)
    features = torch.cat([torch.full((1, per * per), -2.0), tiles])[..., None]
    packed, _ = model.model.model.pack_image_features(
        [features], torch.tensor([[height, width]]), "default", torch.tensor([-1.0])
    )
    for t, value in enumerate(packed[0][per * per :, 0].tolist()):
        if value >= 0:
            truth[per * per + t] = ("tiles", *divmod(int(value), tw * per))
    return truth, (th * per, tw * per)


@pytest.mark.parametrize(
    "kind, size",
    [(kind, size) for kind in ("llava", "llava_next") for size in SIZES]
    + [("llava_next", size) for size in ELONGATED if min(size) >= 30],  # a pixel per cell
    ids=lambda v: v if isinstance(v, str) else f"{v[0]}x{v[1]}",
)
def test_each_patch_lands_on_the_pixels_it_was_made_from(models, kind, size):
    """Paint the pixels our geometry gives a token white, run the real processor: the token's
    own cell (as the model packs it) must be the brightest cell and mostly white."""
    model = models[kind]
    height, width = size
    blank = Image.new("RGB", (width, height))
    att = one_hot_map(model, [blank])
    geometry = att._geometry[0]
    prompt = model.processor(text="<image>", images=blank, return_tensors="pt")
    count = int((prompt["input_ids"] == model.model.config.image_token_id).sum())
    assert geometry["tokens"] == count  # the same number of tokens as the processor inserts
    truth, canvas = token_cells(model, height, width)
    per = model.model.config.vision_config.patch_size
    checked = 0
    for token, (view, row, col) in truth.items():
        att.weights[:] = 0
        att.weights[0, 0, 0, token] = 1
        att._cache.clear()
        heat = att.heatmap(view=view)
        if heat.max() == 0:  # a cell of the crop/pad margin no pixel maps to
            continue
        white = np.where(heat > 0, 255, 0).astype(np.uint8)
        image = Image.fromarray(white).convert("RGB")
        pixels = model.processor.image_processor(image, return_tensors="np")["pixel_values"][0]
        if kind == "llava":
            cells = processed_cells(pixels, model.processor, per)
        elif view == "base":
            cells = processed_cells(pixels[0], model.processor, per)
        else:
            grid = model.model.config.vision_config.image_size
            th, tw = canvas[0] * per // grid, canvas[1] * per // grid
            joined = pixels[1 : 1 + th * tw].reshape(th, tw, 3, grid, grid)
            joined = joined.transpose(2, 0, 3, 1, 4).reshape(3, th * grid, tw * grid)
            cells = processed_cells(joined, model.processor, per)
        brightest = np.unravel_index(cells.argmax(), cells.shape)
        assert brightest == (row, col), (token, view, cells.round(2))
        assert cells[row, col] > 0.5
        checked += 1
    assert checked >= 0.8 * len(truth)


def test_cropped_margins_get_no_attention(models):
    """LLaVA-1.5 center-crops: a wide image's left and right ends are never seen."""
    model = models["llava"]
    att = one_hot_map(model, [Image.new("RGB", (128, 32))])
    att.weights[:] = 1
    heat = att.heatmap()
    assert heat.shape == (32, 128)
    assert (heat[:, :48] == 0).all() and (heat[:, 80:] == 0).all()
    assert (heat[:, 48:80] == 1).all()


def test_llava_next_adds_both_views_per_pixel(models):
    model = models["llava_next"]
    att = one_hot_map(model, [Image.new("RGB", (64, 64))])
    n = att._geometry[0]["tokens"]
    att.weights[0, 0, 0] = 1.0 / n
    base = att.heatmap(view="base", normalize=False)
    tiles = att.heatmap(view="tiles", normalize=False)
    both = att.heatmap(normalize=False)
    np.testing.assert_allclose(both, base + tiles, rtol=1e-6)
    # weight per pixel: a view's map sums to its tokens' weight (newline tokens left out)
    assert base.sum() == pytest.approx(16 / n, rel=1e-5)
    assert tiles.sum() == pytest.approx(64 / n, rel=1e-5)
    assert att.grid().shape == (8, 8) and att.grid(view="base").shape == (4, 4)


@pytest.mark.parametrize("size", ELONGATED, ids=[f"{h}x{w}" for h, w in ELONGATED])
def test_attention_on_elongated_images(models, size, tmp_path):
    """A very wide or tall image: the map has one weight per image token of the prompt, even
    where unpadding keeps no tile cell (only the base view's tokens, or only newline tokens)."""
    model = models["llava_next"]
    height, width = size
    image = shape_image(height, width, (0, 0, width // 2, height // 2))
    messages = ask_about([image])
    generation = model.generate(messages, max_new_tokens=2, attention=True)
    generation.wait()
    att = generation.attention
    inputs = model.processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    count = int((inputs["input_ids"] == model.model.config.image_token_id).sum())
    assert att._geometry[0]["tokens"] == count == att.weights.shape[-1] >= 16
    heat = att.heatmap()
    assert heat.shape == (height, width) and heat.max() == pytest.approx(1.0)
    assert np.isfinite(heat).all() and heat.min() >= 0
    tiles = att._geometry[0]["views"][1]
    assert att.heatmap(view="tiles", normalize=False).shape == (height, width)
    assert att.grid().shape == (tiles.index.shape if tiles.index.size else (4, 4))
    att.plot().savefig(io.BytesIO(), format="png")
    # saved and loaded, a view that kept no cell is still a grid of no cells (a (0, n) grid
    # was read back flat, and drawing it failed)
    again = AttentionMap.load(att.save(tmp_path / "att.npz"))
    np.testing.assert_array_equal(again.heatmap(), heat)
    assert again._geometry[0]["views"][1].index.shape == tiles.index.shape


# ---------------------------------------------------------------- aggregation


@pytest.fixture
def recorded(models, photo) -> AttentionMap:
    chat = ln.Chat(models["llava"], max_new_tokens=8)
    return chat.ask("What is in the picture?", photo, attention=True).attention


def test_selections(recorded):
    att = recorded
    weights = att.weights  # (tokens, layers, heads, 16)
    words = [i for i, t in enumerate(att.tokens) if t.strip()]
    first = words[0]
    expected = weights[first, 1, 2].reshape(4, 4)
    np.testing.assert_allclose(
        att.grid(first, layers=-1, heads=2, normalize=False), expected, rtol=1e-6
    )
    answer = [i for i in range(len(att.tokens)) if att._labels[i] is None]  # no "</s>"
    mean = weights.mean(axis=2)[answer]
    np.testing.assert_allclose(
        att.grid(normalize=False), mean.mean(axis=1).mean(axis=0).reshape(4, 4), rtol=1e-5
    )
    top = weights[first].max(axis=1)[0]
    np.testing.assert_allclose(att.grid(first, 0, "max", normalize=False).ravel(), top, rtol=1e-6)
    text = att.tokens[first].strip()
    assert first in att.find(text)
    np.testing.assert_allclose(
        att.grid(text, normalize=False),
        weights[att.find(text)].mean(axis=2).mean(axis=1).mean(axis=0).reshape(4, 4),
        rtol=1e-5,
    )
    same = att.grid(slice(-8, None), layers=slice(0, 2))
    assert same.max() == pytest.approx(1.0) and same.min() >= 0


def synthetic(weights, self_weights, pieces, labels=None) -> AttentionMap:
    """A map of the given (tokens, layers, heads, 2) weights on one 2 x 1 image, no views."""
    return AttentionMap(
        weights=np.asarray(weights, np.float32),
        self_weights=np.asarray(self_weights, np.float32),
        token_ids=list(range(len(pieces))),
        pieces=pieces,
        labels=labels or [None] * len(pieces),
        images=[Image.new("RGB", (2, 1))],
        geometry=[{"size": (1, 2), "tokens": 2, "views": []}],
    )


def test_rollout_by_hand():
    """Two layers, one head, two image tokens: flow keeps 0.5 + 0.5 * self at each layer."""
    att = synthetic([[[[0.2, 0.1]], [[0.4, 0.3]]]], [[[0.5], [0.2]]], ["a"])
    top = 0.5 * np.array([0.4, 0.3])  # layer 1
    kept = 0.5 + 0.5 * 0.2
    bottom = kept * 0.5 * np.array([0.2, 0.1])  # then layer 0
    np.testing.assert_allclose(att._vector(method="rollout"), top + bottom, rtol=1e-6)
    np.testing.assert_allclose(att._vector(layers=1, method="rollout"), top, rtol=1e-6)
    np.testing.assert_allclose(att._vector(), [0.3, 0.2], rtol=1e-6)


def test_bad_selections_are_one_line_errors(recorded):
    att = recorded
    cases = {
        "'zebra-unicorn' is not in the answer": dict(tokens="zebra-unicorn"),
        "layer 7 is out of range; this model has 2 layers": dict(layers=7),
        "head 9 is out of range": dict(heads=9),
        "heads must be 'mean', 'max'": dict(heads="median"),
        "token 99 is out of range": dict(tokens=99),
        "unknown method 'grad'": dict(method="grad"),
        "image 3 is out of range": dict(image=3),
        "unknown view 'tiles'": dict(view="tiles"),
        "heads must be 'mean', 'max' or a head index, got [0, 1]": dict(heads=[0, 1]),
        "tokens must be an index, slice, list or text, got 1.0": dict(tokens=1.0),
        "layers must be an index, slice or list, got 1.0": dict(layers=1.0),
        "bad token slice slice(0, 5, 0) (slice step cannot be zero)": dict(tokens=slice(0, 5, 0)),
    }
    for message, kwargs in cases.items():
        with pytest.raises(AttentionError) as error:
            att.heatmap(**kwargs)
        assert message in str(error.value) and "\n" not in str(error.value)
    plots = {
        "unknown cmap 'Jet'; use a matplotlib colormap name": ("plot", dict(cmap="Jet")),
        "alpha must be a number from 0 to 1, got 2": ("plot_layers", dict(alpha=2)),
        "limit must be a whole number >= 1, got 0": ("plot_tokens", dict(limit=0)),
        "columns must be a whole number >= 1, got '2'": ("plot_layers", dict(columns="2")),
    }
    for message, (name, kwargs) in plots.items():
        with pytest.raises(AttentionError, match=re.escape(message)):
            getattr(att, name)(**kwargs)


def test_text_selects_words_and_special_tokens_by_name():
    pieces = ["They", " are", " all", " red", ""]
    att = synthetic(np.ones((5, 1, 1, 2)), np.ones((5, 1, 1)), pieces, [None] * 4 + ["</s>"])
    assert att._tokens("all") == [2]  # a word like any other, not "every token"
    assert att._tokens("</s>") == [4] and att._tokens(None) == [0, 1, 2, 3]


def test_plots_of_a_big_photo_are_drawn_at_display_size(models):
    big = shape_image(3000, 4000, (1000, 1000, 2000, 2000))
    chat = ln.Chat(models["llava"], max_new_tokens=2)
    att = chat.ask("What color is the shape?", big, attention=True).attention
    assert att.heatmap().shape == (3000, 4000)  # the map itself stays at the photo's size
    drawn = {
        "plot": (att.plot(), (768, 1024)),
        "plot_layers": (att.plot_layers(), (192, 256)),
        "plot_tokens": (att.plot_tokens(), (192, 256)),
    }
    for name, (fig, shape) in drawn.items():
        shapes = {ax.images[-1].get_array().shape[:2] for ax in fig.axes if ax.images}
        assert shapes == {shape}, name


# ---------------------------------------------------------------- plots, widget, files


def test_plots_render(recorded, photo):
    from matplotlib.figure import Figure

    att = recorded
    first = next(i for i, t in enumerate(att.tokens) if t.strip())
    fig = att.plot(first, layers=slice(-1, None), cmap="viridis", alpha=0.4)
    assert isinstance(fig, Figure)
    main = fig.axes[0]
    assert main.images[0].get_array().shape[:2] == (photo.height, photo.width)
    assert att.tokens[first].strip() in fig._suptitle.get_text()
    assert any(ax.get_label() == "<colorbar>" for ax in fig.axes)
    fig.savefig(io.BytesIO(), format="png")
    layers = att.plot_layers()
    assert sum(1 for ax in layers.axes if ax.images and ax.get_title()) == 2
    heads = att.plot_layers(by="head", layer=-1)
    assert [ax.get_title() for ax in heads.axes if ax.images][:4] == [f"head {h}" for h in range(4)]
    strip = att.plot_tokens(limit=5)
    assert len([ax for ax in strip.axes if ax.images]) == min(5, len(att.tokens))
    strip.savefig(io.BytesIO(), format="png")


def test_explore_follows_clicks_without_the_model(recorded):
    att = recorded
    widget = att.explore()
    assert len(widget.buttons) == len(att.tokens)
    assert widget.buttons[0].description == (att.tokens[0] or "·").replace("\n", "⏎")
    whole = widget.image.value
    assert whole[:8] == b"\x89PNG\r\n\x1a\n"
    target = max(range(len(att.tokens)), key=lambda i: float(np.ptp(att.heatmap(i))))
    widget.buttons[target].click()
    assert widget.selected == target and widget.buttons[target].button_style == "warning"
    shown = Image.open(io.BytesIO(widget.image.value))
    heat = att._paint(0, att._vector(target), None, widget.shape)  # at the widget's size
    expected = overlay(widget.picture, heat / heat.max())
    assert np.array_equal(np.asarray(shown), np.asarray(expected))
    assert widget.image.value != whole
    clicked = widget.image.value
    widget.method.value = "rollout"  # a control redraws the same token
    assert widget.selected == target and widget.image.value != clicked
    widget.method.value = "mean"
    widget.answer.click()
    assert widget.selected is None and widget.image.value == whole


def test_explore_shows_exactly_the_selection_or_refuses_it():
    att = synthetic(np.random.rand(2, 4, 3, 2), np.random.rand(2, 4, 3), ["a", "b"])
    assert att.explore(heads=-1).heads.value == 2  # as heatmap(heads=-1): the last head
    assert att.explore(layers=slice(None, None, -1)).layers.value == (0, 3)  # any order
    for layers in ([0, 3], slice(0, None, 2)):
        with pytest.raises(AttentionError, match="explore shows a range of layers"):
            att.explore(layers=layers)


def test_save_and_load(recorded, tmp_path):
    att = recorded
    path = att.save(tmp_path / "maps" / "att.npz")
    again = AttentionMap.load(path)
    assert again.tokens == att.tokens and again.text == att.text
    np.testing.assert_array_equal(again.weights, att.weights)
    np.testing.assert_array_equal(again.heatmap(method="rollout"), att.heatmap(method="rollout"))
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(att.images[0]))
    (tmp_path / "bad.npz").write_bytes(b"not a file")
    with pytest.raises(AttentionError, match="is not a llava_nb attention file"):
        AttentionMap.load(tmp_path / "bad.npz")
    with pytest.raises(AttentionError, match="not found"):
        AttentionMap.load(tmp_path / "missing.npz")
    att.save(path)  # an attention file is replaced


def test_an_interrupted_save_leaves_no_temporary_file(recorded, tmp_path, monkeypatch):
    def interrupted(file, **arrays):  # Stop pressed while the file is written
        file.write(b"PK")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez_compressed", interrupted)
    with pytest.raises(KeyboardInterrupt):
        recorded.save(tmp_path / "att.npz")
    assert list(tmp_path.iterdir()) == []


def test_save_never_replaces_another_file_and_load_refuses_broken_ones(recorded, tmp_path):
    att = recorded
    chat = tmp_path / "chat.json"
    chat.write_text('{"format": "llava_nb.chat"}')
    for bad, message in (
        (chat, "exists and is not a llava_nb attention file; save under another name"),
        (tmp_path, "it is a folder; name a file"),
        (None, "save needs a file path"),
        ("", "save needs a file path"),
    ):
        with pytest.raises(AttentionError, match=message):
            att.save(bad)
    assert chat.read_text() == '{"format": "llava_nb.chat"}'
    whole = Path(att.save(tmp_path / "att.npz")).read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "empty.npz").write_bytes(b"")
    np.savez(tmp_path / "list.npz", meta=np.array("[1, 2]"))

    def edited(name: str, **changes) -> Path:
        with np.load(tmp_path / "att.npz") as data:
            arrays = dict(data)
        meta = json.loads(str(arrays["meta"]))
        arrays.update(changes.pop("arrays", {}))
        arrays["meta"] = np.array(json.dumps({**meta, **changes}))
        np.savez(tmp_path / name, **arrays)
        return tmp_path / name

    newer = edited("newer.npz", version=99)
    fewer = edited("fewer.npz", pieces=["x"])
    narrow = edited("narrow.npz", arrays={"weights": att.weights[..., :3]})
    for path in ("cut.npz", "empty.npz", "list.npz", fewer, narrow):
        with pytest.raises(AttentionError, match="is not a llava_nb attention file"):
            AttentionMap.load(tmp_path / path)
    with pytest.raises(AttentionError, match="saved by a newer llava_nb .file version 99.; upgr"):
        AttentionMap.load(newer)
    with pytest.raises(AttentionError, match="load needs a file path"):
        AttentionMap.load(None)


# ---------------------------------------------------------------- front ends


def test_chat_ask_returns_the_answer_with_its_map(models, photo):
    chat = ln.Chat(models["llava_next"], max_new_tokens=6)
    plain = ln.Chat(models["llava_next"], max_new_tokens=6).ask("Describe.", photo)
    answer = chat.ask("Describe.", photo, attention=True)
    assert answer == plain and isinstance(answer, str) and answer._repr_markdown_() == plain
    assert ln.last_attention() is answer.attention
    assert answer.attention.text == answer == chat.history[-1].answer
    assert plain.attention is None

    # two images in the next turn: one map over all three images of the conversation
    wide, tall = shape_image(30, 120, (0, 0, 20, 20)), shape_image(150, 40, (0, 0, 20, 20))
    again = chat.ask("And these?", [wide, tall], attention=True)
    att = again.attention
    assert len(att.images) == 3 and att.images[1] is chat.history[-1].images[0]
    with pytest.raises(AttentionError, match=r"saw 3 images; pass image=0..2"):
        att.heatmap()
    assert att.heatmap(image=1).shape == (30, 120)
    assert att.heatmap(image=-1).shape == (150, 40)
    assert len(att.plot().axes) >= 3

    pieces = list(chat.stream("More?", attention=True))
    assert ln.last_attention().text == "".join(pieces) == chat.history[-1].answer


def test_remote_models_refuse_attention():
    chat = ln.Chat("openai:http://127.0.0.1:9/v1")
    with pytest.raises(ln.LlavaError) as error:
        chat.ask("Where is the cat?", attention=True)
    assert "attention maps need local weights" in str(error.value)
    assert "\n" not in str(error.value) and chat.history == []


def test_magic_attention_shows_the_heatmap(tiny_llava, photo, tmp_path, monkeypatch):
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    monkeypatch.setenv("IPYTHONDIR", str(tmp_path))
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "llava_nb")
    shell.run_line_magic("llava", f"config model='{tiny_llava}' max_new_tokens=5")
    shell.user_ns["photo"] = photo
    with capture_output() as captured:
        result = shell.run_cell_magic("llava", "-i photo -c attention-test --attention", "Where?")
    assert result is None  # the answer stays shown above its heatmap
    att = ln.last_attention()
    chat = shell.magics_manager.registry["LlavaMagics"].chats["attention-test"]
    assert att.text == chat.history[-1].answer
    kinds = [sorted(output.data) for output in captured.outputs]
    assert ["text/markdown", "text/plain"] in kinds and ["text/plain"] in kinds  # the figure
    assert "Figure" in captured.outputs[-1].data["text/plain"]
    shell.run_cell_magic("llava", "-c attention-test --attention -o ANSWER", "Again?")
    assert shell.user_ns["ANSWER"].attention is ln.last_attention()
    assert shell.user_ns["ANSWER"] == chat.history[-1].answer
    shell.magics_manager.registry["LlavaMagics"].chats.pop("attention-test")


# ---------------------------------------------------------------- the example notebook


def test_example_notebook_runs_offline(tmp_path):
    """examples/03_attention.ipynb in a real kernel: plots are images, the explorer a widget."""
    import os
    from pathlib import Path

    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient

    root = Path(__file__).resolve().parents[1]
    path = root / "examples" / "03_attention.ipynb"
    committed = nbformat.read(path, as_version=4)
    code = [cell for cell in committed.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code)

    env = dict(os.environ, HF_HUB_OFFLINE="1", IPYTHONDIR=str(tmp_path / "ipython"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    env.pop("LLAVA_NB_MODEL", None)
    work = tmp_path / "cwd"
    work.mkdir()
    manager = AsyncKernelManager(
        kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[])
    )
    client = NotebookClient(
        committed,
        km=manager,
        timeout=120,
        allow_errors=False,
        resources={"metadata": {"path": str(work)}},
    )
    client.execute(env=env)
    assert list(work.iterdir()) == []  # everything went to a temporary folder, removed at the end
    kinds = {}
    for cell in code:
        for output in cell.outputs:
            assert output.output_type != "error", output
            kinds.setdefault(cell.source.splitlines()[0], set()).update(output.get("data", {}))
    for source in ("att.plot()", "att.plot_layers()", "att.plot_tokens(limit=8)"):
        assert "image/png" in kinds[source], source
    assert "application/vnd.jupyter.widget-view+json" in kinds["att.explore()"]
    magic = next(c for c in code if c.source.startswith("%%llava"))
    shown = [o for o in magic.outputs if o.output_type == "display_data"]
    assert "text/markdown" in shown[0].data and "image/png" in shown[-1].data
    assert not [o for o in magic.outputs if o.output_type == "execute_result"]
    bad = next(c for c in code if "zebra" in c.source)
    assert bad.outputs[0].text.startswith("'zebra' is not in the answer")
