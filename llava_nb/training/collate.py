"""Turn a `Sample` into model inputs with labels, and samples into padded batches.

The prompt comes from the checkpoint's chat template through the processor, exactly as
`Model.generate` builds it, so a tuned model sees at chat time what it saw in training.
Only the assistant's tokens are labels; prompt, image and padding tokens are -100.
"""

from __future__ import annotations

from typing import Any

from llava_nb.data import DataError, Dataset, Sample
from llava_nb.models import escape_image_token

IGNORE = -100


def _render(processor, messages: list[dict], generation_prompt: bool = False) -> str:
    return processor.apply_chat_template(
        messages, add_generation_prompt=generation_prompt, tokenize=False
    )


def assistant_spans(processor, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant's answers.

    An answer's span runs from the end of the prompt that asks for it (the conversation so far
    plus the generation prompt, as at inference) to the end of the conversation including it.
    """
    text = _render(processor, messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(processor, messages[:index], generation_prompt=True)
        upto = _render(processor, messages[: index + 1])
        if not (text.startswith(prompt) and text.startswith(upto) and len(prompt) <= len(upto)):
            raise DataError(
                "this checkpoint's chat template does not render a conversation as a prefix of "
                "its continuation, so answers cannot be located; use a llava-hf checkpoint"
            )
        spans.append((len(prompt), len(upto)))
    return text, spans


def _text(processor, sample: Sample):
    """The sample's images, rendered conversation, answer spans, whether the tokenizer adds
    special tokens, and the plain tokenization (one placeholder per image, with offsets)."""
    messages = escape_image_token(sample.messages(), processor)
    images = [part["image"] for m in messages for part in m["content"] if part["type"] == "image"]
    text, spans = assistant_spans(processor, messages)
    tokenizer = processor.tokenizer
    # the same rule as the processor's apply_chat_template: no second BOS if the template has one
    special = not (tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token))
    plain = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    return images, text, spans, special, plain


def encode(processor, sample: Sample) -> dict[str, Any]:
    """input_ids, labels, pixel_values (and image_sizes for LLaVA-NeXT) of one sample."""
    import torch

    images, text, spans, special, plain = _text(processor, sample)
    inputs = processor(
        text=text, images=images or None, add_special_tokens=special, return_tensors="pt"
    )
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    ids = inputs["input_ids"][0]
    # the processor expands each <image> into many image tokens; everything else is the same
    # tokens in the same order as the plain tokenization, whose offsets locate the answers
    kept = [
        (i, o)
        for i, o in zip(plain["input_ids"], plain["offset_mapping"], strict=True)
        if i != image_id
    ]
    text_positions = (ids != image_id).nonzero().flatten()
    if [i for i, _ in kept] != ids[text_positions].tolist():
        raise DataError("the processor tokenized the conversation unexpectedly; report this")
    labels = torch.full_like(ids, IGNORE)
    for position, (_, (start, _end)) in zip(text_positions.tolist(), kept, strict=True):
        if any(a <= start < b for a, b in spans):
            labels[position] = ids[position]
    out = {"input_ids": ids, "labels": labels}
    if "pixel_values" in inputs:
        out["pixel_values"] = inputs["pixel_values"]
        if "image_sizes" in inputs:
            out["image_sizes"] = inputs["image_sizes"]
    return out


class TrainingSet:
    """A map-style dataset for `Trainer`: encodes one sample per item, when asked."""

    def __init__(self, processor, data: Dataset, rows: list[int]) -> None:
        self.processor, self.data, self.rows = processor, data, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return encode(self.processor, self.data[self.rows[index]])


class Collator:
    """Pad to the longest sample of the batch (right side); stack images."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad = pad_token_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        length = max(len(item["input_ids"]) for item in items)
        batch = {
            "input_ids": torch.full((len(items), length), self.pad, dtype=torch.long),
            "labels": torch.full((len(items), length), IGNORE, dtype=torch.long),
            "attention_mask": torch.zeros((len(items), length), dtype=torch.long),
        }
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            batch["input_ids"][row, :n] = item["input_ids"]
            batch["labels"][row, :n] = item["labels"]
            batch["attention_mask"][row, :n] = 1
        pixels = [item["pixel_values"] for item in items if "pixel_values" in item]
        if pixels:
            if pixels[0].dim() == 5:  # LLaVA-NeXT: (images, patches, C, H, W); pad the patches
                patches = max(p.shape[1] for p in pixels)
                pixels = [
                    torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, patches - p.shape[1]))
                    for p in pixels
                ]
            batch["pixel_values"] = torch.cat(pixels)
            sizes = [item["image_sizes"] for item in items if "image_sizes" in item]
            if sizes:
                batch["image_sizes"] = torch.cat(sizes)
        return batch


def context_length(model_config) -> int:
    return int(model_config.text_config.max_position_embeddings)


class ImageTokens:
    """How many tokens the processor expands an image of a given size into (LLaVA: always the
    same; LLaVA-NeXT: by size), found by running the processor once per size on a blank
    image: exact for any processor, and a dataset has few sizes."""

    def __init__(self, processor) -> None:
        self.processor = processor
        self.image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        self.counts: dict[tuple[int, int], int] = {}

    def __call__(self, size: tuple[int, int]) -> int:
        if size not in self.counts:
            from PIL import Image

            inputs = self.processor(
                text=self.processor.image_token,
                images=[Image.new("RGB", size)],
                add_special_tokens=False,
                return_tensors="pt",
            )
            self.counts[size] = int((inputs["input_ids"][0] == self.image_id).sum())
        return self.counts[size]


def measure(processor, sample: Sample, image_tokens: ImageTokens) -> tuple[int, int]:
    """(tokens, answer tokens) of the encoded sample without processing its pixels, which
    took most of the time: checking 665k LLaVA rows ran the image processor on each."""
    images, _, spans, _, plain = _text(processor, sample)
    ids, image_id = plain["input_ids"], image_tokens.image_id
    if ids.count(image_id) != len(images):
        raise DataError("the processor tokenized the conversation unexpectedly; report this")
    answers = sum(
        1
        for i, (start, _end) in zip(ids, plain["offset_mapping"], strict=True)
        if i != image_id and any(a <= start < b for a, b in spans)
    )
    return len(ids) - len(images) + sum(image_tokens(image.size) for image in images), answers


def check_lengths(data: Dataset, processor, limit: int, skip=()):
    """(row, problem) for rows that fail to encode or are longer than `limit` tokens."""
    image_tokens = ImageTokens(processor)
    for index, sample in enumerate(data):
        if index in skip:
            continue
        try:
            n, answers = measure(processor, sample, image_tokens)
        except DataError as e:
            yield index, str(e)
            continue
        except Exception as e:  # an image that cannot be read
            yield index, f"cannot be encoded ({type(e).__name__}: {e})"
            continue
        if n > limit:
            yield index, f"too long: {n} tokens after tokenization, limit {limit}"
        elif not answers:
            yield index, "no answer tokens left to train on"
