"""Cost of `attention=True`, and a pointing game on synthetic pictures.

    python benchmarks/attention.py                          # tiny random LLaVA-1.5 and NeXT, CPU
    python benchmarks/attention.py --shape 7b --family llava --family llava_next   # on a GPU
    python benchmarks/attention.py --model llava-hf/llava-1.5-7b-hf --pointing 50
    python benchmarks/attention.py --model demo --pointing 200           # the offline demo model

Cost: the same checkpoint, the same prompt (a photo and a question) and the same number of new
tokens (end-of-sequence suppressed), in one run: llava_nb without attention, llava_nb with
attention=True (building the AttentionMap included), and plain transformers
`generate(output_attentions=True)` under eager attention, which keeps every step's full
attention. Median wall time of --repeat runs after a warm-up; peak memory above what the loaded
model holds (CUDA: the allocator's peak; CPU: resident memory sampled every millisecond) and the
bytes of attention each one keeps. Runs are interleaved (one of each, --repeat times). Prints
the time ratio; the goal is <= 1.5x.

Pointing game: pictures of one colored shape (known box) on a plain background, of several
aspect ratios; "What color is the shape?" with attention=True. A hit is when the centroid of
the heatmap's maximum (whole answer, all layers) falls inside the shape's box. Chance is the
mean fraction of the picture the box covers. Random-weight checkpoints (--shape) sit near
chance by construction: only a trained model (--model) says anything about localisation.
With the demo model (--model demo, or its folder) the pictures are its own kind instead (one to
three shapes, `ln.demo.shapes_dataset`) and the question names one of them.

--shape 7b builds a random checkpoint with LLaVA-1.5-7B's / LLaVA-NeXT-7B's shapes (CLIP
ViT-L/14 at 336 px, a 32-layer 4096-wide language model) in a temporary folder: realistic cost,
meaningless answers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 60, 220),
    "yellow": (240, 210, 20),
}
SIZES = [(336, 336), (240, 480), (480, 240), (300, 700), (600, 200), (500, 375)]  # (h, w)


# ---------------------------------------------------------------- checkpoints


def build(family: str, shape: str, folder: Path, layers: int | None) -> str:
    """A random checkpoint whose answers never end early (end-of-sequence suppressed)."""
    from llava_nb.testing import make_tiny_llava

    path = folder / f"{family}-{shape}"
    if shape == "tiny":
        make_tiny_llava(path, family, width=64, layers=layers or 2)
    else:
        _build_7b(family, path, layers or 32)
    config = json.loads((path / "generation_config.json").read_text())
    config["suppress_tokens"] = [config["eos_token_id"]]
    (path / "generation_config.json").write_text(json.dumps(config))
    return str(path)


def _build_7b(family: str, path: Path, layers: int) -> None:
    import torch

    from llava_nb.testing import LLAVA_7B_TEXT, LLAVA_7B_VISION, llava_parts, tokenizer

    tok = tokenizer()
    text = {**LLAVA_7B_TEXT, "num_hidden_layers": layers, "vocab_size": len(tok)}
    cls, config, processor = llava_parts(family, tok, LLAVA_7B_VISION, text)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if device == "cuda" else torch.float32)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(default)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- measuring


class Peak:
    """Peak memory above the start, while the block runs."""

    def __init__(self, device: str) -> None:
        self.device, self.bytes = device, 0

    def __enter__(self) -> Peak:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start, self.top, self.running = _rss(), _rss(), True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.top = max(self.top, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.start
        else:
            self.running = False
            self.thread.join()
            self.bytes = max(self.top, _rss()) - self.start


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def photo():
    import matplotlib.cbook
    from PIL import Image

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        return Image.open(f).convert("RGB")


def cost(path: str, new_tokens: int, repeat: int) -> dict:
    import gc

    import numpy as np
    import torch

    import llava_nb as ln

    model = ln.Model(path).load()
    device = str(model.model.device)
    picture = photo()
    runs = iter(range(10**6))

    def ask() -> list[dict]:
        """The same question about the photo, its center pixel changed per run: same prompt
        length, but no run continues the previous one's KV cache."""
        image = picture.copy()
        image.putpixel((image.width // 2, image.height // 2), (next(runs) % 256, 0, 0))
        question = {"type": "text", "text": "What is in this picture? Describe it."}
        return [{"role": "user", "content": [{"type": "image", "image": image}, question]}]

    hf = model.model
    inputs = model.processor.apply_chat_template(
        ask(), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    ).to(hf.device, hf.dtype)
    answers = {}

    def plain():
        generation = model.generate(ask(), max_new_tokens=new_tokens)
        answers["plain"] = generation.wait()
        return generation, 0

    def attention():
        generation = model.generate(ask(), max_new_tokens=new_tokens, attention=True)
        answers["attention"] = generation.wait()
        att = generation.attention
        return generation, att.weights.nbytes + att.self_weights.nbytes

    def transformers_eager():
        previous = hf.config.text_config._attn_implementation
        hf.set_attn_implementation({"text_config": "eager"})
        try:
            with torch.inference_mode():
                out = hf.generate(
                    **inputs,
                    max_new_tokens=new_tokens,
                    do_sample=False,
                    output_attentions=True,
                    return_dict_in_generate=True,
                )
        finally:
            hf.set_attn_implementation({"text_config": previous})
        kept = sum(a.numel() * a.element_size() for step in out.attentions for a in step)
        return out, kept

    variants = {
        "llava_nb": plain,
        "llava_nb attention=True": attention,
        "transformers output_attentions": transformers_eager,
    }
    samples: dict[str, dict] = {
        name: {"times": [], "peaks": [], "kept": 0, "path": "generate"} for name in variants
    }
    failed: dict[str, str] = {}
    for i in range(repeat + 1):  # interleaved, so a change of load hits every variant alike
        for name, run in variants.items():
            if name in failed:
                continue
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            try:
                with Peak(device) as peak:
                    start = time.perf_counter()
                    result, kept = run()
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    elapsed = time.perf_counter() - start
            except (torch.OutOfMemoryError, MemoryError) as e:
                failed[name] = f"out of memory ({str(e).splitlines()[0][:60]})"
                continue
            path = getattr(result, "decoding", "generate")  # llava_nb's Generation says
            del result
            if i:  # the first round warms up
                samples[name]["times"].append(elapsed)
                samples[name]["peaks"].append(peak.bytes)
                samples[name]["kept"] = kept
                samples[name]["path"] = path
    rows = {
        name: {"error": failed[name]}
        if name in failed
        else {
            "seconds": statistics.median(sample["times"]),
            "peak_bytes": int(np.median(sample["peaks"])),
            "kept_bytes": sample["kept"],
            "path": sample["path"],
        }
        for name, sample in samples.items()
    }
    prompt = int(inputs["input_ids"].shape[1])
    image_tokens = int((inputs["input_ids"] == hf.config.image_token_id).sum())
    info = {
        "device": device,
        "dtype": str(hf.dtype).removeprefix("torch."),
        "layers": hf.config.text_config.num_hidden_layers,
        "heads": hf.config.text_config.num_attention_heads,
        "prompt_tokens": prompt,
        "image_tokens": image_tokens,
        "new_tokens": new_tokens,
        "same_answer": answers.get("plain") == answers.get("attention"),
    }
    model.unload()
    return {"info": info, "rows": rows}


def pointing(path: str, count: int, seed: int = 0) -> dict:
    from PIL import Image, ImageDraw

    import llava_nb as ln

    rng = random.Random(seed)
    model = ln.Model(path)
    chat = ln.Chat(model, max_new_tokens=8)
    hits = {"mean": 0, "rollout": 0}
    chance = []
    answers = []
    for i in range(count):
        h, w = SIZES[i % len(SIZES)]
        color = list(COLORS)[i % len(COLORS)]
        bw, bh = rng.randint(w // 6, w // 3), rng.randint(h // 6, h // 3)
        x0, y0 = rng.randint(0, w - bw), rng.randint(0, h - bh)
        image = Image.new("RGB", (w, h), (235, 235, 235))
        draw = ImageDraw.Draw(image)
        draw.rectangle((x0, y0, x0 + bw - 1, y0 + bh - 1), fill=COLORS[color])
        chat.reset()
        answer = chat.ask("What color is the shape?", image, attention=True)
        answers.append(str(answer))
        for method in hits:
            hits[method] += _hit(
                answer.attention.heatmap(method=method), (x0, y0, x0 + bw, y0 + bh)
            )
        chance.append(bw * bh / (w * h))
    model.unload()
    said_color = sum(any(c in a.lower() for c in COLORS) for a in answers)
    return {
        "images": count,
        "hit_rate": {m: n / count for m, n in hits.items()},
        "chance": statistics.mean(chance),
        "answers_naming_a_color": said_color,
        "example_answer": answers[0],
    }


def _hit(heat, box) -> bool:
    """Whether the centre of the heatmap's maximum lies inside `box` (x0, y0, x1, y1)."""
    import numpy as np

    ys, xs = np.nonzero(heat >= heat.max() - 1e-6)
    x0, y0, x1, y1 = box
    return bool(x0 <= xs.mean() < x1 and y0 <= ys.mean() < y1)


def pointing_shapes(path: str, count: int, seed: int = 4321) -> dict:
    """The pointing game on the demo model's own pictures (`ln.demo.shapes_dataset`, a seed its
    build never used): ask the color of one of the one to three shapes; a hit when the
    heatmap's maximum lies in that shape's box."""
    import llava_nb as ln
    from llava_nb import demo

    rng = random.Random(seed)
    model = ln.Model(path)
    chat = ln.Chat(model, max_new_tokens=4)
    hits, chance, right = {"mean": 0, "rollout": 0}, [], 0
    for row in demo.shapes_dataset(count, seed):
        target = rng.choice(row["objects"])
        question = (
            "What color is the shape?"
            if len(row["objects"]) == 1
            else f"What color is the {target['shape']}?"
        )
        chat.reset()
        answer = chat.ask(question, row["image"], attention=True)
        right += str(answer).strip().lower().startswith(target["color"])
        for method in hits:
            hits[method] += _hit(answer.attention.heatmap(method=method), target["box"])
        x0, y0, x1, y1 = target["box"]
        chance.append((x1 - x0) * (y1 - y0) / (row["image"].width * row["image"].height))
    model.unload()
    return {
        "images": count,
        "hit_rate": {m: n / count for m, n in hits.items()},
        "chance": statistics.mean(chance),
        "right_answers": right,
    }


# ---------------------------------------------------------------- report


def _mb(n: int) -> str:
    return f"{n / 2**20:9.1f} MB"


def report(name: str, result: dict) -> None:
    info, rows = result["info"], result["rows"]
    print(
        f"\n== {name}: {info['device']} {info['dtype']}, {info['layers']} layers x "
        f"{info['heads']} heads, prompt {info['prompt_tokens']} tokens "
        f"({info['image_tokens']} image), {info['new_tokens']} new tokens; same greedy answer "
        f"with attention=True: {'yes' if info['same_answer'] else 'NO'}"
    )
    print(f"{'':34} {'time':>9} {'peak memory':>12} {'attention kept':>15}  decoding")
    for label, row in rows.items():
        if "error" in row:
            print(f"{label:34} {row['error']}")
            continue
        print(
            f"{label:34} {row['seconds']:8.3f}s {_mb(row['peak_bytes']):>12} "
            f"{_mb(row['kept_bytes']):>15}  {row['path']}"
        )
    base, att = rows.get("llava_nb", {}), rows.get("llava_nb attention=True", {})
    if "seconds" in base and "seconds" in att:
        ratio = att["seconds"] / base["seconds"]
        verdict = "meets" if ratio <= 1.5 else "MISSES"
        print(f"time ratio attention=True / plain: {ratio:.2f}x ({verdict} the 1.5x goal)")


def _is_demo(path: str) -> bool:
    from llava_nb import demo

    return path == demo.DEMO_ID or demo.is_built(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a checkpoint id or folder (default: random ones)")
    parser.add_argument("--shape", choices=["tiny", "7b"], default="tiny")
    parser.add_argument("--family", action="append", choices=["llava", "llava_next"])
    parser.add_argument("--layers", type=int, help="language-model layers of a random checkpoint")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pointing", type=int, default=24, help="synthetic pictures (0: skip)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    with tempfile.TemporaryDirectory(prefix="llava_nb-attention-bench-") as folder:
        if args.model:
            checkpoints = {args.model: args.model}
        else:
            families = args.family or ["llava", "llava_next"]
            checkpoints = {
                f"random {f} ({args.shape})": build(f, args.shape, Path(folder), args.layers)
                for f in families
            }
        for name, path in checkpoints.items():
            report(name, cost(path, args.new_tokens, args.repeat))
            sys.stdout.flush()
            if args.pointing:
                on_demo = _is_demo(path)
                result = (pointing_shapes if on_demo else pointing)(path, args.pointing)
                rates = ", ".join(f"{m} {r:.0%}" for m, r in result["hit_rate"].items())
                detail = (
                    f"right colors: {result['right_answers']}"
                    if on_demo
                    else f"answers naming a color: {result['answers_naming_a_color']} "
                    f"(e.g. {result['example_answer']!r})"
                )
                where = " on the demo's shapes" if on_demo else ""
                print(
                    f"pointing game{where}, {result['images']} pictures: hit rate {rates}; chance "
                    f"{result['chance']:.0%}; {detail}"
                )
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
