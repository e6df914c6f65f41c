"""Load test for `llava-nb serve`: concurrent streamed requests, checked, then timed.

    python benchmarks/serve_load.py                        # tiny random checkpoint, in-process
    python benchmarks/serve_load.py --model llava-hf/llava-1.5-7b-hf --max-tokens 64
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --api-key KEY

Each prompt (a different picture and question) is first answered alone, greedy; then all of
them are sent at once, streamed. Every concurrent answer must equal its answer alone: none
lost, none mixed up. Prints latency p50/p99, time to first token and throughput. Bounded:
--requests requests, and --timeout seconds at most; exits 1 when an answer is wrong.

    python benchmarks/serve_load.py --requests 16 --image-megapixels 32 --max-tokens 4

sends big pictures instead (blank PNGs, a few kB each, 96 MB each once decoded) and prints
the peak RSS of this process: with the in-process server, what the queued requests hold.

Without --url the server runs in this process (uvicorn in a thread, 127.0.0.1, a free port),
so the client's work shares the CPU with the model's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import sys
import tempfile
import time

QUESTIONS = [
    "What is in this picture?",
    "Describe the image.",
    "What color is it?",
    "Where is the cat?",
    "How many people are there?",
    "Is there any text in the photo?",
    "Explain the chart.",
    "What is on the left?",
]
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "teal"]


def prompt(i: int, megapixels: float = 0) -> list[dict]:
    """The i-th request's messages: its own picture (of `megapixels`, if given) and question."""
    from PIL import Image

    from llava_nb.images import image_to_data_uri

    color = COLORS[i % len(COLORS)]
    size = (40 + 4 * i, 48)
    if megapixels:
        side = int((megapixels * 1e6) ** 0.5)
        size = (side + i, side)
    img = Image.new("RGB", size, color)
    img.paste(Image.new("RGB", (8 + i, 8), "gray"), (i % 30, i % 40))
    text = f"{QUESTIONS[i % len(QUESTIONS)]} (picture {i})"
    url = image_to_data_uri(img)
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": text},
            ],
        }
    ]


@contextlib.contextmanager
def local_server(model_id: str | None, max_queue: int):
    """Serve `model_id` (default: a tiny random checkpoint) on 127.0.0.1; yield the base URL."""
    from llava_nb.models import Model
    from llava_nb.server import create_app, serving

    with tempfile.TemporaryDirectory() as tmp:
        if model_id is None:
            from llava_nb.testing import make_tiny_llava

            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
            model_id = make_tiny_llava(os.path.join(tmp, "tiny-llava"), "llava")
        model = Model(model_id).load()
        with serving(create_app(model, max_queue=max_queue)) as url:
            yield url


def peak_rss_mb() -> float:
    """The most memory this process has held so far (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


async def run(url: str, api_key: str, requests: int, max_tokens: int, megapixels: float) -> int:
    import openai

    client = openai.AsyncOpenAI(
        base_url=url.rstrip("/") + "/v1", api_key=api_key, max_retries=0, timeout=600
    )
    async with client:
        model = (await client.models.list()).data[0].id
        prompts = [prompt(i, megapixels) for i in range(requests)]
        settings = {"model": model, "max_tokens": max_tokens, "temperature": 0}

        alone, alone_tokens = [], 0
        start = time.perf_counter()
        for messages in prompts:  # one at a time: the reference answers
            result = await client.chat.completions.create(messages=messages, **settings)
            alone.append(result.choices[0].message.content)
            alone_tokens += result.usage.completion_tokens
        alone_seconds = time.perf_counter() - start

        async def streamed(messages: list[dict]) -> dict:
            sent = time.perf_counter()
            first = None
            pieces, usage = [], None
            stream = await client.chat.completions.create(
                messages=messages, stream=True, stream_options={"include_usage": True}, **settings
            )
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    if choice.delta.content:
                        first = first or time.perf_counter()
                        pieces.append(choice.delta.content)
            end = time.perf_counter()
            return {
                "text": "".join(pieces),
                "latency": end - sent,
                "ttft": (first or end) - sent,
                "tokens": usage.completion_tokens if usage else 0,
            }

        rss_alone = peak_rss_mb()
        start = time.perf_counter()
        results = await asyncio.gather(*(streamed(m) for m in prompts), return_exceptions=True)
        wall = time.perf_counter() - start

    failed = [r for r in results if isinstance(r, BaseException)]
    done = [r for r in results if not isinstance(r, BaseException)]
    wrong = [
        i
        for i, r in enumerate(results)
        if not isinstance(r, BaseException) and r["text"] != alone[i]
    ]
    tokens = sum(r["tokens"] for r in done)
    latency = [r["latency"] for r in done]
    ttft = [r["ttft"] for r in done]

    print(f"\n{requests} concurrent streamed requests, max_tokens {max_tokens}, model {model}")
    print(f"{'':24}{'p50':>9}{'p99':>9}{'max':>9}")
    if done:
        for name, values in (("latency (s)", latency), ("time to first token (s)", ttft)):
            row = [percentile(values, 50), percentile(values, 99), max(values)]
            print(f"{name:24}" + "".join(f"{v:9.3f}" for v in row))
    print(
        f"{'throughput':24}{tokens / wall:9.1f} tokens/s  ({tokens} tokens in {wall:.2f} s; "
        f"one at a time: {alone_tokens / alone_seconds:.1f} tokens/s)"
    )
    print(
        f"{'checked':24}{len(done) - len(wrong)}/{requests} answers equal their answer alone "
        f"({len(set(alone))} distinct)"
        + (f"; {len(failed)} failed: {failed[0]!r}" if failed else "")
        + (f"; mixed up: {wrong}" if wrong else "")
    )
    print(
        f"{'peak RSS (this process)':24}{rss_alone:9.0f} MB after the answers one at a time, "
        f"{peak_rss_mb():.0f} MB after the concurrent ones"
    )
    return 1 if failed or wrong else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="hub id or checkpoint folder (default: tiny random)")
    parser.add_argument("--url", help="use this running server instead, e.g. http://127.0.0.1:8000")
    parser.add_argument("--api-key", default="none", help="the server's key, with --url")
    parser.add_argument("--requests", type=int, default=32, help="concurrent requests (32)")
    parser.add_argument("--max-tokens", type=int, default=64, help="per answer (64)")
    parser.add_argument(
        "--image-megapixels", type=float, default=0, help="big blank pictures of this size"
    )
    parser.add_argument("--timeout", type=float, default=600, help="give up after (600 s)")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.max_tokens < 1:
        parser.error("--requests and --max-tokens must be positive")

    async def bounded(url: str) -> int:
        try:
            return await asyncio.wait_for(
                run(url, args.api_key, args.requests, args.max_tokens, args.image_megapixels),
                args.timeout,
            )
        except asyncio.TimeoutError:
            print(f"serve_load: gave up after {args.timeout:.0f} s", file=sys.stderr)
            return 1

    if args.url:
        return asyncio.run(bounded(args.url))
    with local_server(args.model, max_queue=args.requests) as url:
        return asyncio.run(bounded(url))


if __name__ == "__main__":
    sys.exit(main())
