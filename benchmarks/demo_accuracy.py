"""The demo model on held-out shapes: accuracy per question type, speed, free-form answers.

    python benchmarks/demo_accuracy.py [--path FOLDER] [--n 200] [--seed 12345]

Accuracy: `--n` questions of each type on images drawn with a seed the build never used, each
asked in a fresh `ln.Chat` (greedy); an answer is right when its first word is the canonical
answer. Speed: the same prompts answered by llava_nb's `Model.generate` and by plain
transformers `generate` on the same checkpoint, in this one run; the ratio is llava_nb's
tokens per second over plain transformers'. Free-form: three open questions, answers printed.
"""

from __future__ import annotations

import argparse
import time

import llava_nb as ln
from llava_nb import demo

BARS = {"color": 0.95, "shape": 0.90, "count": 0.80, "position": 0.80}
FREE_FORM = [
    ("Describe the image.", True),
    ("What is the capital of France? Answer in one sentence.", False),
    ("Write two sentences about why people like the ocean.", False),
]


def first_word(text: str) -> str:
    words = text.strip().lower().split()
    return words[0].strip(".,!?;:'\"") if words else ""


def accuracy(model, rows, n: int) -> dict[str, tuple[int, int]]:
    scores = {}
    for kind in BARS:
        asked = [(r["image"], q, a) for r in rows for t, q, a in r["qa"] if t == kind][:n]
        right = 0
        for image, question, answer in asked:
            chat = ln.Chat(model, max_new_tokens=8)
            right += first_word(chat.ask(question, image=image)) == answer
        scores[kind] = (right, len(asked))
    return scores


def speed(path: str, model, rows, max_new_tokens: int) -> tuple[float, float]:
    """Tokens per second, llava_nb and plain transformers, on the same greedy prompts."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    plain = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    questions = ["Describe the image.", "What color is the shape?", "How many shapes are there?"]
    prompts = [
        [{"role": "user", "content": [{"type": "image", "image": r["image"]},
                                      {"type": "text", "text": questions[i % 3]}]}]
        for i, r in enumerate(rows)
    ]  # fmt: skip

    def run_ours(messages) -> int:
        generation = model.generate(messages, max_new_tokens=max_new_tokens)
        generation.wait()
        return len(generation.token_ids)

    def run_plain(messages) -> int:
        inputs = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="pt",
        )  # fmt: skip
        with torch.inference_mode():
            out = plain.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return out.shape[1] - inputs["input_ids"].shape[1]

    results = {}
    for name, fn in (("llava_nb", run_ours), ("transformers", run_plain)):
        fn(prompts[0])  # warm up
        start, tokens = time.perf_counter(), 0
        for messages in prompts:
            tokens += fn(messages)
        results[name] = tokens / (time.perf_counter() - start)
    return results["llava_nb"], results["transformers"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", help="a built demo folder (default: build or reuse the cache)")
    parser.add_argument("--n", type=int, default=200, help="questions per type")
    parser.add_argument("--seed", type=int, default=12345, help="held-out data seed")
    parser.add_argument("--speed-prompts", type=int, default=12)
    args = parser.parse_args()

    start = time.perf_counter()
    path = args.path or demo.build()
    print(f"demo model: {path} (ready in {time.perf_counter() - start:.1f} s)")
    model = ln.Model(path).load()
    rows = demo.shapes_dataset(args.n, seed=args.seed)

    start = time.perf_counter()
    scores = accuracy(model, rows, args.n)
    print(f"\naccuracy on held-out shapes (seed {args.seed}, {time.perf_counter() - start:.0f} s)")
    print("| question | right | asked | accuracy | bar |")
    print("|---|---|---|---|---|")
    for kind, (right, asked) in scores.items():
        mark = "ok" if right / asked >= BARS[kind] else "BELOW"
        print(f"| {kind} | {right} | {asked} | {right / asked:.1%} | >= {BARS[kind]:.0%} {mark} |")

    ours, plain = speed(path, model, rows[: args.speed_prompts], max_new_tokens=48)
    print(f"\ngeneration speed, greedy, {args.speed_prompts} prompts, max 48 new tokens (CPU)")
    print(f"llava_nb Model.generate:      {ours:.1f} tokens/s")
    print(f"transformers generate:        {plain:.1f} tokens/s")
    print(f"ratio (llava_nb / plain):     {ours / plain:.2f}")

    print("\nfree-form answers")
    for question, with_image in FREE_FORM:
        chat = ln.Chat(model, max_new_tokens=80)
        image = rows[0]["image"] if with_image else None
        answer = chat.ask(question, image=image)
        shown = f"[image: {rows[0]['caption']}] " if with_image else ""
        print(f"Q: {shown}{question}\nA: {answer}\n")


if __name__ == "__main__":
    main()
