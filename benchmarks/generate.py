"""Local generation speed: llava_nb's `Model.generate` vs plain `transformers` `generate`.

    python benchmarks/generate.py                                   # CPU: a small shape, fp32
    python benchmarks/generate.py --shape llava-1.5-7b --quant none,4bit   # a GPU: 16-bit + NF4
    python benchmarks/generate.py --shape llava-1.5-7b --layers 2   # the 7B widths, 2 layers

Both read the same saved checkpoint (random weights: speed does not depend on their values) and
hold the same five-turn conversation (an image in turn 1, a new question each turn, greedy, the
answer length fixed with `min_new_tokens`). Plain transformers re-reads the whole conversation
every turn, as `generate` does; llava_nb keeps the conversation's key/value cache. llava_nb runs
each of its decoding paths (--paths): "default" (what users get: on CUDA the static cache with
the step replayed from a CUDA graph, elsewhere `generate` with the reused cache),
"eager-static" (the static cache, no graph: the CPU-testable half of the GPU path),
"compiled" (the static cache's step through torch.compile, then, on CUDA, its graph; compiling
happens in the warm-up answer, whose time is printed) and "generate" (`generate` with the reused
cache, forced). Printed per quantization: time to first token (TTFT) at turn 1 and turn 5,
decode tokens/s, one decoding step alone (run back to back: the rate with no work between
tokens), peak GPU memory, whether each path answered with plain transformers' tokens, and the
ratios to plain transformers.

Each contender (plain transformers, each llava_nb path) runs in fresh processes of its own
(--repeat of them, interleaved with the others'; each figure is their median), as a user runs one
or the other: nothing (allocator, compiled kernels, CPU thread pools) carries over
from one measurement to the next. On a CPU this matters: each thread that runs torch keeps an
OpenMP thread pool, and with more pool threads than cores libgomp stops letting idle ones spin,
so every parallel region waits for sleeping threads (on 2 cores, plain `generate` on a new
thread was 7% slower once the main thread had run it too).

Then the logit check: the prompt of turn 1, and 32 tokens fed to both the plain forward
(dynamic cache) and llava_nb's static step (the CUDA graph on a GPU), in the process of the
first llava_nb path and of "compiled", with that process's own decoder; the same tokens to both;
printed: the largest logit difference at any step, the logits' scale, and how many steps pick
the same argmax (random weights make argmax ties fragile: the difference is what counts).

With --profile, one step of each llava_nb path is profiled: its GPU kernels (on a CPU, its
operators) by kind (matmul, attention, other), their time and count per step, the slowest five;
against "one step alone", the kernels' own time tells how much of a step is gaps between them.

On a lent GPU machine: `benchmarks/gpu.sh` runs this with the other GPU checks in one call (its
header says which wheels to carry). Its figures on an H200 are in the README.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

QUESTIONS = [
    "What is in this picture?",
    "Describe the colors in detail.",
    "What is on the left side?",
    "Is there any text in the photo?",
    "Summarize everything in one sentence.",
]


def _shapes() -> dict[str, tuple[dict, dict]]:
    from llava_nb.testing import LLAVA_7B_TEXT, LLAVA_7B_VISION

    small_vision = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                        num_attention_heads=4, image_size=112, patch_size=14)  # fmt: skip
    small_text = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8,
                      max_position_embeddings=4096, vocab_size=32064)  # fmt: skip
    return {"small": (small_vision, small_text), "llava-1.5-7b": (LLAVA_7B_VISION, LLAVA_7B_TEXT)}


SHAPES = ("small", "llava-1.5-7b")


def build_checkpoint(path: str, shape: str, text_layers: int | None, dtype) -> str:
    """Save a random-weights LLaVA-1.5 in `shape`; weights drawn on the fastest device."""
    import torch

    from llava_nb.testing import llava_parts, tokenizer

    vision, text = _shapes()[shape]
    text = {**text, "num_hidden_layers": text_layers or text["num_hidden_layers"]}
    tok = tokenizer()
    model_class, config, processor = llava_parts("llava", tok, vision, text)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device("meta"):
        model = model_class(config)
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    del model
    return path


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gb() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 1e9


class _Clock:
    """A transformers streamer that notes when each new token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # the first put is the prompt
            self._prompt_seen = True
            return
        _sync()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_plain(path: str, quant: str, image, new_tokens: int) -> dict:
    """The baseline: the whole conversation through `generate` each turn."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

    from llava_nb.models import _pick_dtype, pick_device

    device = pick_device()
    dtype = _pick_dtype(device)
    if quant == "8bit" and device == "cuda":
        dtype = torch.float16  # as llava_nb: LLM.int8 computes in fp16
    options: dict = {"dtype": dtype}
    # the same modules as llava_nb keeps unquantized, so both see the same image features
    skip = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
    if quant == "4bit":
        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=skip,
        )
    elif quant == "8bit":
        options["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_skip_modules=skip
        )
    model = AutoModelForImageTextToText.from_pretrained(path, device_map=device, **options).eval()
    processor = AutoProcessor.from_pretrained(path)
    warm_up = processor.apply_chat_template(
        _first_turn(image),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    ).to(model.device, dtype)
    with torch.inference_mode():
        model.generate(**warm_up, max_new_tokens=4, do_sample=False)
    model.generation_config.min_new_tokens = new_tokens
    messages: list[dict] = []
    turns = []
    for i, question in enumerate(QUESTIONS):
        content = [{"type": "image", "image": image}] if i == 0 else []
        messages.append({"role": "user", "content": [*content, {"type": "text", "text": question}]})
        clock = _Clock()
        _sync()
        start = time.perf_counter()
        inputs = processor.apply_chat_template(
            messages,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        ).to(model.device, dtype)
        with torch.inference_mode():
            out = model.generate(
                **inputs, max_new_tokens=new_tokens, do_sample=False, streamer=clock
            )
        ids = out[0, inputs["input_ids"].shape[1] :].tolist()
        turns.append(_turn(start, clock.times, ids))
        answer = processor.decode(ids, skip_special_tokens=True)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    result = {"turns": turns, "peak_gb": _peak_gb()}
    del model
    return result


PATHS = {  # --paths name -> $LLAVA_NB_STATIC_DECODE for it (per device kind)
    "default": {"cuda": "auto", "cpu": "auto"},
    "eager-static": {"cuda": "eager", "cpu": "1"},
    "compiled": {"cuda": "compile", "cpu": "compile"},
    "generate": {"cuda": "0", "cpu": "0"},
}


def run_llava_nb(
    path: str, quant: str, image, new_tokens: int, mode: str, check: int, profile: bool = False
) -> dict:
    """llava_nb: `Model.generate`, the path every front end (Chat, cell, panel, server) takes;
    `mode`: the decoding path ($LLAVA_NB_STATIC_DECODE). With `check`, the logit check too;
    with `profile`, where one step's time goes."""
    import llava_nb as ln
    from llava_nb import decoding

    os.environ[decoding.ENV] = mode
    model = ln.Model(path, quantization=quant).load()
    started = time.perf_counter()
    model.generate(_first_turn(image), max_new_tokens=4).wait()  # warm up, as for plain
    warm_up_s = time.perf_counter() - started
    model._conversation.clear()
    model.model.generation_config.min_new_tokens = new_tokens
    messages: list[dict] = []
    turns = []
    for i, question in enumerate(QUESTIONS):
        content = [{"type": "image", "image": image}] if i == 0 else []
        messages.append({"role": "user", "content": [*content, {"type": "text", "text": question}]})
        _sync()
        start = time.perf_counter()
        generation = model.generate(messages, max_new_tokens=new_tokens)
        answer = generation.wait()
        times = [generation.first_token_at, generation.finished_at]
        turn = _turn(start, times, generation.token_ids)
        turn["decode_tps"] = (len(generation.token_ids) - 1) / (times[1] - times[0])
        turn["decoding"] = generation.decoding
        turns.append(turn)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    result = {"turns": turns, "peak_gb": _peak_gb(), "warm_up_s": warm_up_s}
    result["captures"] = model._decoder.captures if model._decoder is not None else 0
    result["step_ms"] = step_alone_ms(model._decoder) if model._decoder is not None else None
    if profile and model._decoder is not None:
        result["profile"] = step_profile(model._decoder)
    if check:
        model.model.generation_config.min_new_tokens = None
        result["check"] = logit_check(model, image, check)
    model.unload()
    os.environ.pop(decoding.ENV, None)
    return result


def step_alone_ms(decoder, repeats: int = 32) -> float:
    """One decoding step run back to back with nothing between (the replayed graph, or the
    eager step): against the decode rate, what the work between tokens costs."""
    import torch

    from llava_nb.decoding import cache_length

    position = min(cache_length(decoder.cache), decoder.capacity - 1)  # past the chat's tokens
    token = torch.zeros(1, dtype=torch.long, device=decoder._token.device)
    with torch.inference_mode():
        decoder.step(token, position)  # captured here if it was not yet
        _sync()
        start = time.perf_counter()
        for _ in range(repeats):
            decoder.step(token, position)
        _sync()
    return (time.perf_counter() - start) / repeats * 1e3


KINDS = {  # a kernel's (or on a CPU, an operator's) kind, from words in its name, in order
    "attention": ("attention", "fmha", "flash", "sdpa", "softmax"),
    "matmul": ("gemm", "gemv", "mm", "matmul", "linear", "cutlass", "xmma", "sm90", "dequant"),
}


def step_profile(decoder, repeats: int = 8) -> dict:
    """Where one decoding step's time goes, by kind of work: on a GPU its kernels (device
    time), on a CPU its operators (self time). With `step_ms`, it tells the kernels' own time
    from the gaps between them."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from llava_nb.decoding import cache_length

    position = min(cache_length(decoder.cache), decoder.capacity - 1)
    token = torch.zeros(1, dtype=torch.long, device=decoder._token.device)
    cuda = token.is_cuda
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.inference_mode():
        decoder.step(token, position)
        _sync()
        with profile(activities=activities) as recorded:
            for _ in range(repeats):
                decoder.step(token, position)
            _sync()
    rows = []
    for event in recorded.key_averages():
        on_device = event.device_type == DeviceType.CUDA
        micros = event.self_device_time_total if on_device else event.self_cpu_time_total
        if on_device == cuda and micros > 0:
            rows.append((micros / 1e3 / repeats, event.count / repeats, event.key))
    kinds = {kind: [0.0, 0.0] for kind in [*KINDS, "other"]}
    for ms, count, name in rows:
        lowered = name.lower()
        kind = next((k for k, words in KINDS.items() if any(w in lowered for w in words)), "other")
        kinds[kind][0] += ms
        kinds[kind][1] += count
    rows.sort(reverse=True)
    return {
        "on": "GPU kernels" if cuda else "CPU operators",
        "ms": sum(ms for ms, _, _ in rows),
        "count": sum(count for _, count, _ in rows),
        "kinds": kinds,
        "slowest": [(ms, count, name[:70]) for ms, count, name in rows[:5]],
    }


def logit_check(model, image, steps: int) -> dict:
    """Feed the same tokens to the plain forward (dynamic cache, one token a call, as
    `generate` does) and to llava_nb's static step (replayed from a CUDA graph where there
    is one; the model's own decoder where it has one, so a compiled step is not compiled
    again); compare the logits step by step."""
    import torch
    from transformers import DynamicCache

    from llava_nb.decoding import StaticDecoder, _capture_for

    hf = model.model
    inputs = model.processor.apply_chat_template(
        _first_turn(image, QUESTIONS[0]),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    ).to(hf.device, hf.dtype)
    ids = inputs["input_ids"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    length = ids.shape[1]
    decoder = model._decoder or StaticDecoder(hf, _capture_for(hf.device))
    with torch.inference_mode():
        cache = DynamicCache(config=hf.config.get_text_config())
        out = hf(**inputs, use_cache=True, logits_to_keep=1, **{decoder._cache_kw: cache})
        plain, tokens = [out.logits[:, -1].float()], [out.logits[:, -1].argmax(-1)]
        for _ in range(steps - 1):
            out = hf(input_ids=tokens[-1].view(1, 1), use_cache=True, **{decoder._cache_kw: cache})
            plain.append(out.logits[:, -1].float())
            tokens.append(plain[-1].argmax(-1))
        del cache
        decoder.reserve(None, length + steps)
        ours = [decoder.prefill(ids, 0, **extra).float()]
        for i in range(steps - 1):
            ours.append(decoder.step(tokens[i], length + i).float().clone())
        _sync()
        diffs = [float((a - b).abs().max()) for a, b in zip(plain, ours, strict=True)]
        same = sum(int(a.argmax() == b.argmax()) for a, b in zip(plain, ours, strict=True))
        scale = max(float(a.abs().max()) for a in plain)
    return {
        "steps": steps,
        "max_diff": max(diffs),
        "scale": scale,
        "same_argmax": same,
        "path": decoder.mode,
        "dtype": str(hf.dtype).removeprefix("torch."),
    }


def _first_turn(image, text: str = "Warm up.") -> list[dict]:
    content = [{"type": "image", "image": image}, {"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def _turn(start: float, times: list[float], ids: list[int]) -> dict:
    decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    return {"ttft_ms": (times[0] - start) * 1e3, "decode_tps": decode, "ids": ids}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--layers", type=int, help="language-model layers (default: the shape's)")
    parser.add_argument("--quant", default="none", help="comma list of none, 4bit, 8bit")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--checkpoint", help="use (or build into) this folder")
    parser.add_argument(
        "--paths", default="default,eager-static", help=f"llava_nb paths: {', '.join(PATHS)}"
    )
    parser.add_argument("--check-steps", type=int, default=32, help="logit check length (0: no)")
    parser.add_argument(
        "--repeat", type=int, default=3, help="processes per contender; medians are printed"
    )
    parser.add_argument(
        "--profile", action="store_true", help="also profile one step of each llava_nb path"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child: "plain" or one llava_nb path
    args = parser.parse_args(argv)
    paths = args.paths.split(",")
    if unknown := set(paths) - set(PATHS):
        parser.error(f"unknown --paths {', '.join(sorted(unknown))}; use {', '.join(PATHS)}")
    if unknown := set(args.quant.split(",")) - {"none", "4bit", "8bit"}:
        parser.error(f"unknown --quant {', '.join(sorted(unknown))}; use none, 4bit, 8bit")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.one:
        print(json.dumps(measure_one(args)), flush=True)
        return 0
    import torch

    from llava_nb.models import _pick_dtype, pick_device

    device = pick_device()
    dtype = _pick_dtype(device)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint or os.path.join(tmp, "random-llava")
        if not os.path.exists(os.path.join(path, "config.json")):
            started = time.perf_counter()
            build_checkpoint(path, args.shape, args.layers, dtype)
            print(f"built {args.shape} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the children need the memory
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
        print(
            f"# {args.shape} (text layers: {args.layers or 'all'}), {device} ({gpu}), {dtype}, "
            f"torch {torch.__version__}, transformers {_version('transformers')}, "
            f"{torch.get_num_threads()} threads, {args.new_tokens} new tokens a turn, "
            f"{len(QUESTIONS)} turns, each row the median of {args.repeat} fresh process(es)",
            flush=True,
        )
        print(
            "| quant | path | TTFT turn 1 ms | TTFT turn 5 ms | decode tok/s (median turn) |"
            " one step alone ms (its tok/s) | peak GB | same tokens as plain | decode vs plain |"
            " turn-5 TTFT vs plain |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
        for quant in args.quant.split(","):
            runs: dict[str, list[dict]] = {name: [] for name in ["plain", *paths]}
            plain = None
            for repeat in range(args.repeat):  # interleaved, so drifts hit every contender
                for i, name in enumerate(runs):
                    checked = repeat == 0 and (i == 1 or name == "compiled")
                    check = args.check_steps if checked else 0
                    profiled = args.profile and repeat == 0 and name != "plain"
                    result = _child(args, path, quant, name, check, profiled)
                    runs[name] += [result] if result is not None else []
                    if repeat == args.repeat - 1:  # now: a later contender may be cut off
                        plain = _report(quant, name, runs[name], plain)
    return 0


def _report(quant: str, name: str, results: list[dict], plain: dict | None) -> dict | None:
    """Print a contender's row, and the notes under it, once its last run is in; return the
    merged plain transformers results (the baseline of the rows after it)."""
    if name == "plain":
        if not results:
            print(f"# {quant}: plain transformers failed (its error is above): no ratios")
            return None
        plain = _merge(results)
        _row(quant, "transformers", plain, plain)
        return plain
    if not results or plain is None:
        print(f"| {quant} | llava_nb {name} | failed, or no baseline: the error is above |")
        return plain
    ours = _merge(results)
    decoding = ours["turns"][-1]["decoding"]
    if decoding.endswith("graph"):
        decoding += f", {ours['captures']} captures incl. warm-up"
    _row(quant, f"llava_nb {name} ({decoding})", ours, plain)
    if name == "compiled":
        warm_ups = ", ".join(f"{r['warm_up_s']:.1f}" for r in results)
        print(f"# {quant}, compiled: the warm-up answer (compiling) took {warm_ups} s")
    if "check" in ours:
        check = ours["check"]
        print(
            f"# logit check, {quant}, {check['dtype']}, {check['path']} step vs plain "
            f"forward, same {check['steps']} tokens fed: max |logit difference| "
            f"{check['max_diff']:.4g} (logits up to {check['scale']:.3g}; relative "
            f"{check['max_diff'] / check['scale']:.2g}), same argmax at "
            f"{check['same_argmax']}/{check['steps']} steps"
        )
    if "profile" in ours:
        _profile_lines(f"{quant}, {name}", ours["profile"], ours["step_ms"])
    sys.stdout.flush()
    return plain


def _child(
    args, path: str, quant: str, contender: str, check: int, profile: bool = False
) -> dict | None:
    """Measure one contender in a fresh Python process; its result is its last stdout line
    (None if it failed: the others still run)."""
    command = [sys.executable, os.path.abspath(__file__), "--one", contender, "--quant", quant,
               "--checkpoint", path, "--new-tokens", str(args.new_tokens),
               "--check-steps", str(check)] + ["--profile"] * profile  # fmt: skip
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        why = f"exit status {done.returncode}"
        print(f"# the {contender} run ({quant}) failed: {why}", file=sys.stderr, flush=True)
        return None
    return json.loads(done.stdout.splitlines()[-1])


def _merge(results: list[dict]) -> dict:
    """One contender's repeated runs as one: each turn's median times, the median step time,
    the first run's tokens, path and logit check, the highest peak memory."""
    merged = {**results[0], "turns": []}
    for turns in zip(*(result["turns"] for result in results), strict=True):
        merged["turns"].append(
            {
                **turns[0],
                "ttft_ms": statistics.median(turn["ttft_ms"] for turn in turns),
                "decode_tps": statistics.median(turn["decode_tps"] for turn in turns),
            }
        )
    steps = [result["step_ms"] for result in results if result.get("step_ms") is not None]
    merged["step_ms"] = statistics.median(steps) if steps else None
    peaks = [result["peak_gb"] for result in results if result["peak_gb"] is not None]
    merged["peak_gb"] = max(peaks) if peaks else None
    return merged


def measure_one(args) -> dict:
    """In a child process: one contender's five-turn chat (and its logit check)."""
    import matplotlib.cbook
    from PIL import Image

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        image = Image.open(f).convert("RGB")
    if args.one == "plain":
        return run_plain(args.checkpoint, args.quant, image, args.new_tokens)
    from llava_nb.models import pick_device

    mode = PATHS[args.one]["cuda" if pick_device() == "cuda" else "cpu"]
    return run_llava_nb(
        args.checkpoint, args.quant, image, args.new_tokens, mode, args.check_steps, args.profile
    )


def _row(quant: str, name: str, result: dict, plain: dict) -> None:
    turns, base = result["turns"], plain["turns"]
    same = sum(a["ids"] == b["ids"] for a, b in zip(base, turns, strict=True))
    tps = statistics.median(t["decode_tps"] for t in turns)  # a turn may include a capture
    step_ms = result.get("step_ms")
    step = f"{step_ms:.2f} ({1e3 / step_ms:.0f}/s)" if step_ms is not None else "-"
    base_tps = statistics.median(t["decode_tps"] for t in base)
    peak = f"{result['peak_gb']:.2f}" if result["peak_gb"] is not None else "-"
    print(
        f"| {quant} | {name} | {turns[0]['ttft_ms']:.1f} | {turns[-1]['ttft_ms']:.1f} | "
        f"{tps:.1f} | {step} | {peak} | {same}/{len(turns)} turns | {tps / base_tps:.2f}x | "
        f"{base[-1]['ttft_ms'] / turns[-1]['ttft_ms']:.2f}x faster |",
        flush=True,
    )


def _profile_lines(what: str, profile: dict, step_ms: float | None) -> None:
    """The step profile, as comment lines under the table."""
    kinds = ", ".join(
        f"{kind} {ms:.3f} ms in {count:.0f}" for kind, (ms, count) in profile["kinds"].items()
    )
    alone = f" (the step alone: {step_ms:.3f} ms)" if step_ms is not None else ""
    print(
        f"# step profile, {what}: {profile['count']:.0f} {profile['on']} a step, "
        f"{profile['ms']:.3f} ms of their time{alone}: {kinds}"
    )
    for ms, count, name in profile["slowest"]:
        print(f"#   {ms:.3f} ms in {count:.0f}: {name}")


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    raise SystemExit(main())
