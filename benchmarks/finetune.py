"""Fine-tuning speed and memory: `ln.finetune` vs a plain transformers `Trainer` + peft set-up.

Both train the same model on the same rows with the same settings (LoRA on the language model,
projector in modules_to_save, batch size, steps, learning rate, precision), each in its own
process so peak memory is its own. Prints samples/s, peak memory and the ratio llava_nb/plain
(goal: >= 1.0 for speed). On a busy CPU set OMP_NUM_THREADS=1 (both workers inherit it):
oversubscribed threads make timings swing by several times between runs.

    python benchmarks/finetune.py                         # tiny random LLaVA, CPU or GPU
    python benchmarks/finetune.py --shape llava-1.5-7b --method qlora --steps 20   # GPU

`--shape llava-1.5-7b` writes a LLaVA-1.5-7B-shaped checkpoint with random weights (fp16,
~14 GB) to --workdir first; prompts are padded to about --tokens tokens (576 of them image).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTION = "What color is it?"
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FILLER = "Please look at the picture carefully and describe the colour you see. "


def make_question(checkpoint: str, tokens: int) -> str:
    """A question of about `tokens` text tokens (the image's tokens come on top)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    question = QUESTION
    while len(tokenizer(question)["input_ids"]) < tokens:
        question = FILLER + question
    return question


def rows(args, checkpoint: str) -> list[dict]:
    from PIL import Image

    colors = [("red", (220, 20, 20)), ("green", (20, 200, 20)), ("blue", (20, 20, 220))]
    question = make_question(checkpoint, args.tokens)
    size = args.image_size
    return [
        {
            "image": Image.new("RGB", (size, size), colors[i % 3][1]),
            "question": question,
            "answer": f"It is {colors[i % 3][0]}.",
        }
        for i in range(args.rows)
    ]


# ---------------------------------------------------------------- checkpoints


def make_checkpoint(shape: str, workdir: Path) -> str:
    if shape == "tiny":
        from llava_nb.testing import make_tiny_llava

        return make_tiny_llava(workdir / "tiny-bench", width=256, layers=4)
    target = workdir / "llava-1.5-7b-random"
    if (target / "config.json").is_file():
        return str(target)
    import torch

    from llava_nb.testing import LLAVA_7B_TEXT, LLAVA_7B_VISION, llava_parts, tokenizer

    tok = tokenizer()  # a small real tokenizer; the embedding is 32064 wide, as in the 7B
    model_class, config, processor = llava_parts("llava", tok, LLAVA_7B_VISION, LLAVA_7B_TEXT)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = model_class(config).to(torch.float16)
    model.save_pretrained(target)
    del model
    torch.cuda.empty_cache()  # the workers need the GPU; this process keeps only its context
    processor.save_pretrained(target)
    return str(target)


# ---------------------------------------------------------------- the two workers


def peak_memory() -> int:
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def run_llava_nb(args, checkpoint: str) -> dict:
    import llava_nb as ln

    data = rows(args, checkpoint)
    start = time.perf_counter()
    run = ln.finetune(
        checkpoint,
        data,
        method=args.method,
        max_steps=args.steps,
        batch_size=args.batch_size,
        lr=1e-4,
        r=16,
        alpha=32,
        dropout=0.05,
        output_dir=Path(args.workdir) / f"out-llava_nb-{os.getpid()}",
        save_every=10**6,
        progress=False,
    )
    return {
        "train_runtime": run.metrics["train_runtime"],
        "wall": time.perf_counter() - start,
        "loss": run.metrics["train_loss"],
    }


def run_plain(args, checkpoint: str) -> dict:
    """What one writes by hand from the transformers and peft docs."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForImageTextToText,
        AutoProcessor,
        BitsAndBytesConfig,
        Trainer,
        TrainingArguments,
    )

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    processor = AutoProcessor.from_pretrained(checkpoint)
    kwargs = {"dtype": dtype, "device_map": {"": 0 if cuda else "cpu"}}
    if args.method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=["model.vision_tower", "model.multi_modal_projector", "lm_head"],
        )
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, **kwargs)
    if args.method == "qlora":
        model = prepare_model_for_kbit_training(
            model, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    model = get_peft_model(
        model,
        LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.05,
            target_modules=rf".*\.language_model\..*\.({'|'.join(LINEAR)})",
            modules_to_save=["multi_modal_projector"],
        ),
    )
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    examples = rows(args, checkpoint)

    def encode(row):
        user = {
            "role": "user",
            "content": [
                {"type": "image", "image": row["image"]},
                {"type": "text", "text": row["question"]},
            ],
        }
        answer = {"role": "assistant", "content": [{"type": "text", "text": row["answer"]}]}
        full = processor.apply_chat_template(
            [user, answer], tokenize=True, return_dict=True, return_tensors="pt"
        )
        prompt = processor.apply_chat_template(
            [user], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        labels = full["input_ids"].clone()
        labels[:, : prompt["input_ids"].shape[1]] = -100
        return {
            "input_ids": full["input_ids"][0],
            "labels": labels[0],
            "pixel_values": full["pixel_values"],
        }

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(examples)

        def __getitem__(self, i):
            return encode(examples[i])

    def collate(items):
        ids = torch.nn.utils.rnn.pad_sequence(
            [i["input_ids"] for i in items],
            batch_first=True,
            padding_value=processor.tokenizer.pad_token_id,
        )
        labels = torch.nn.utils.rnn.pad_sequence(
            [i["labels"] for i in items], batch_first=True, padding_value=-100
        )
        return {
            "input_ids": ids,
            "labels": labels,
            "attention_mask": (ids != processor.tokenizer.pad_token_id).long(),
            "pixel_values": torch.cat([i["pixel_values"] for i in items]),
        }

    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(Path(args.workdir) / f"out-plain-{os.getpid()}"),
            per_device_train_batch_size=args.batch_size,
            max_steps=args.steps,
            learning_rate=1e-4,
            lr_scheduler_type="cosine",
            warmup_steps=0.03,
            bf16=cuda,
            use_cpu=not cuda,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            logging_steps=max(1, args.steps // 100),
            remove_unused_columns=False,
            seed=0,
        ),
        train_dataset=Rows(),
        data_collator=collate,
    )
    start = time.perf_counter()
    result = trainer.train()
    return {
        "train_runtime": result.metrics["train_runtime"],
        "wall": time.perf_counter() - start,
        "loss": result.metrics["train_loss"],
    }


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["tiny", "llava-1.5-7b"], default="tiny")
    parser.add_argument("--method", choices=["lora", "qlora"], default="lora")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64, help="prompt text tokens (about)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs of each")
    parser.add_argument("--workers", default="plain,llava_nb", help="which to run, in order")
    parser.add_argument("--workdir")
    parser.add_argument("--worker", choices=["llava_nb", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        run = run_llava_nb if args.worker == "llava_nb" else run_plain
        result = run(args, args.checkpoint)
        result["peak_memory"] = peak_memory()
        print("RESULT " + json.dumps(result), flush=True)
        return

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="llava_nb-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = make_checkpoint(args.shape, workdir)
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(
        f"{args.shape}, {args.method}, {args.steps} steps x batch {args.batch_size}, "
        f"~{args.tokens} text tokens + image, on {device} ({os.cpu_count()} cores)"
    )
    workers = args.workers.split(",")
    results: dict[str, list[dict]] = {worker: [] for worker in workers}
    for _ in range(args.repeats):
        for worker in workers:
            command = [
                sys.executable, __file__, "--worker", worker, "--checkpoint", checkpoint,
                "--workdir", str(workdir), "--shape", args.shape, "--method", args.method,
                "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                "--rows", str(args.rows), "--tokens", str(args.tokens),
                "--image-size", str(args.image_size),
            ]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                sys.exit(f"{worker} failed:\n{done.stderr[-3000:]}")
            results[worker].append(json.loads(lines[-1][7:]))
            print(f"  {worker}: {results[worker][-1]}", flush=True)

    samples = args.steps * args.batch_size
    summary = {}
    for worker, runs in results.items():
        best = min(r["train_runtime"] for r in runs)
        summary[worker] = {
            "samples_per_s": samples / best,
            "peak_memory_gb": max(r["peak_memory"] for r in runs) / 1e9,
            "loss": runs[-1]["loss"],
        }
        print(
            f"{worker:>9}: {summary[worker]['samples_per_s']:7.2f} samples/s (best of "
            f"{len(runs)}), peak memory {summary[worker]['peak_memory_gb']:.2f} GB, "
            f"train loss {summary[worker]['loss']:.4f}"
        )
    if len(summary) < 2:
        return
    ratio = summary["llava_nb"]["samples_per_s"] / summary["plain"]["samples_per_s"]
    memory = summary["llava_nb"]["peak_memory_gb"] / summary["plain"]["peak_memory_gb"]
    print(f"ratio llava_nb/plain: speed {ratio:.2f}x, peak memory {memory:.2f}x")


if __name__ == "__main__":
    main()
