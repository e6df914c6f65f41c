"""Training data for `ln.finetune`: read the formats people have, and say what is wrong with them.

    data = ln.data.load("train.json", image_folder="images/")
    data.validate()          # a report: rows that cannot be trained on, and why (not fatal)

Formats: LLaVA JSON (the `conversations` format of LLaVA's custom-data docs) or JSONL, rows of
chat `messages` with image parts and an `images` column (Hugging Face / TRL), a CSV of
image,question,answer (or image,caption), a pandas DataFrame or a list of dicts in either shape,
or a folder of images with a captions file (captions.csv/.jsonl/.json or metadata.jsonl/.csv; a
.json one may also map names to captions: {"cat.jpg": "A cat.", ...}).
Loading never fails on a bad row: the row is kept with its problem, and `validate()` lists it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from llava_nb.errors import LlavaError

IMAGE_TAG = "<image>"
CAPTION_PROMPT = "Describe the image briefly."
CAPTION_FILES = ("captions", "metadata")
DATA_SUFFIXES = (".json", ".jsonl", ".csv")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_IMAGE_KEYS = ("image", "images", "image_path", "file_name", "filename", "path")
_ANSWER_KEYS = ("answer", "caption", "text", "response")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class DataError(LlavaError):
    """Training data could not be read, or has no row that can be trained on."""


@dataclass
class SampleTurn:
    """One question (with the images it brings) and the answer to train on."""

    question: str
    images: list[Any] = field(default_factory=list)  # paths (resolved) or PIL images
    answer: str = ""


@dataclass
class Sample:
    """One training row: a conversation. `problem` is set when the row cannot be used."""

    id: str
    turns: list[SampleTurn]
    problem: str | None = None

    @property
    def images(self) -> list[Any]:
        return [image for turn in self.turns for image in turn.images]

    def messages(self) -> list[dict]:
        """The conversation in the processor's chat format, images loaded, exactly like
        `Chat.messages()` builds it at inference time."""
        from llava_nb.images import load_image

        messages: list[dict] = []
        for turn in self.turns:
            content = [{"type": "image", "image": load_image(image)} for image in turn.images]
            content.append({"type": "text", "text": turn.question})
            messages.append({"role": "user", "content": content})
            messages.append(
                {"role": "assistant", "content": [{"type": "text", "text": turn.answer}]}
            )
        return messages


@dataclass
class Problem:
    row: int
    id: str
    message: str


@dataclass
class ValidationReport:
    """What `Dataset.validate()` found: rows that will be skipped, and why."""

    rows: int
    problems: list[Problem]
    checked_length: bool = False

    @property
    def usable(self) -> int:
        return self.rows - len({p.row for p in self.problems})

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.ok:
            return f"{self.rows} rows, all usable"
        return f"{self.rows} rows: {self.usable} usable, {self.rows - self.usable} skipped"

    def __str__(self) -> str:
        lines = [self.summary()]
        lines += [f"  row {p.row} ({p.id}): {p.message}" for p in self.problems[:50]]
        if len(self.problems) > 50:
            lines.append(f"  ... and {len(self.problems) - 50} more")
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_markdown_(self) -> str:
        lines = [f"**{self.summary()}**"]
        if self.problems:
            lines += ["", "| row | id | problem |", "|---|---|---|"]
            lines += [
                f"| {p.row} | {p.id} | {p.message.replace('|', '/')} |" for p in self.problems[:50]
            ]
            if len(self.problems) > 50:
                lines.append(f"\n*... and {len(self.problems) - 50} more*")
        return "\n".join(lines)


class Dataset:
    """Conversations about images, ready for `ln.finetune`. Index it for `Sample`s."""

    def __init__(self, samples: list[Sample], source: str = "data") -> None:
        self.samples = samples
        self.source = source

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int | slice) -> Sample | Dataset:
        if isinstance(index, slice):  # data[:100]: still a Dataset, to validate or train on
            return Dataset(self.samples[index], self.source)
        return self.samples[index]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __repr__(self) -> str:
        turns = sum(len(s.turns) for s in self.samples)
        return f"Dataset({self.source!r}, rows={len(self)}, turns={turns})"

    def split(self, eval_fraction: float = 0.1, seed: int = 0) -> tuple[Dataset, Dataset]:
        """A (train, eval) split, shuffled with `seed` (at least one row in each)."""
        if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, int | float):
            raise DataError(
                f"eval_fraction must be a number, not {type(eval_fraction).__name__} "
                f"{eval_fraction!r}; pass e.g. split(0.1)"
            )
        if not 0 < eval_fraction < 1 or len(self) < 2:
            raise DataError(
                f"cannot split {len(self)} rows with eval_fraction={eval_fraction}; "
                "use a fraction between 0 and 1 and at least 2 rows"
            )
        order = list(range(len(self)))
        random.Random(seed).shuffle(order)
        n_eval = min(max(1, round(eval_fraction * len(self))), len(self) - 1)
        pick = lambda indices: [self.samples[i] for i in sorted(indices)]  # noqa: E731
        return (
            Dataset(pick(order[n_eval:]), f"{self.source} (train)"),
            Dataset(pick(order[:n_eval]), f"{self.source} (eval)"),
        )

    def fingerprint(self) -> str:
        """A hash of the rows (text and image references), to recognise a run's data on resume."""
        digest = hashlib.sha256()
        for sample in self.samples:
            for turn in sample.turns:
                digest.update(f"{sample.id}\0{turn.question}\0{turn.answer}\0".encode())
                for image in turn.images:
                    if isinstance(image, Image.Image):  # every pixel: training reads them all
                        digest.update(f"{image.mode}{image.size}".encode())
                        digest.update(image.tobytes())
                    else:
                        digest.update(str(image).encode())
        return digest.hexdigest()[:16]

    def validate(self, model: Any = None, max_length: int | None = None) -> ValidationReport:
        """Find rows that cannot be trained on: missing or unreadable images, no "<image>" where
        an image was given, empty or malformed turns, and (with a model: `Model`, id or folder)
        rows longer than `max_length` tokens (default: the model's context) after tokenization.
        """
        whole = isinstance(max_length, int) and not isinstance(max_length, bool)
        if max_length is not None and not (whole and max_length >= 1):
            raise DataError(f"max_length must be a whole number >= 1, got {max_length!r}")
        problems: list[Problem] = []
        readable: dict[str, str | None] = {}
        for index, sample in enumerate(self.samples):
            message = sample.problem or _image_problem(sample, readable)
            if message:
                problems.append(Problem(index, sample.id, message))
        report = ValidationReport(len(self), problems)
        if model is not None:
            from llava_nb.training.collate import check_lengths, context_length
            from llava_nb.training.train import load_processor_and_config

            processor, config = load_processor_and_config(model)
            limit = max_length or context_length(config)
            bad = {p.row for p in problems}
            for index, message in check_lengths(self, processor, limit, skip=bad):
                problems.append(Problem(index, self.samples[index].id, message))
            problems.sort(key=lambda p: p.row)
            report.checked_length = True
        return report


def _image_problem(sample: Sample, readable: dict[str, str | None]) -> str | None:
    for image in sample.images:
        if isinstance(image, Image.Image):
            continue
        key = str(image)
        if key not in readable:
            readable[key] = _check_image_file(key)
        if readable[key]:
            return readable[key]
    return None


def _check_image_file(path: str) -> str | None:
    if path.startswith(("http://", "https://")):
        return None  # fetched when used; not checked here (no network during validation)
    if not os.path.isfile(path):
        return f"image '{path}' not found"
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as e:
        return f"image '{path}' is not a readable image ({type(e).__name__})"
    return None


# ---------------------------------------------------------------- loading


def load(
    source: Any,
    image_folder: str | os.PathLike | None = None,
    *,
    prompt: str = CAPTION_PROMPT,
) -> Dataset:
    """Read training data from a file, a folder, a DataFrame or a list of dicts.

    Image paths are relative to `image_folder` (default: the data file's folder). Rows that give
    only an image and a caption (stage "align" data) are asked `prompt`.
    """
    if isinstance(source, Dataset):
        return source
    base: Path | None = Path(image_folder).expanduser() if image_folder is not None else None
    if base is not None and not base.is_dir():
        raise DataError(f"image folder '{image_folder}' does not exist; check the path")
    if hasattr(source, "to_dict") and hasattr(source, "columns"):  # a pandas DataFrame
        records, name = source.to_dict(orient="records"), "DataFrame"
    elif isinstance(source, list | tuple):
        records, name = list(source), "list"
    elif isinstance(source, str | os.PathLike):
        path = Path(source).expanduser()
        if path.is_dir():
            path = _captions_file(path)
        records, name = _read_file(path), str(source)
        base = base or path.parent
    else:
        raise DataError(
            f"cannot read training data from a {type(source).__name__}; pass a file, a folder, "
            "a DataFrame or a list of dicts"
        )
    if not records:
        raise DataError(f"{name} has no rows; check the file")
    samples = [_sample(record, index, base, prompt) for index, record in enumerate(records)]
    return Dataset(samples, name)


def _captions_file(folder: Path) -> Path:
    for stem in CAPTION_FILES:
        for suffix in DATA_SUFFIXES:
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
    has_images = any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())
    found = "images but no captions file" if has_images else "no images and no captions file"
    raise DataError(
        f"folder '{folder}' has {found}; add captions.csv (columns image,caption), "
        'captions.jsonl or captions.json ({"file.jpg": "caption", ...}) next to the images'
    )


def _read_file(path: Path) -> list[Any]:
    if not path.is_file():
        raise DataError(f"data file '{path}' not found; check the path")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
        if suffix == ".json":
            records = _unwrap(json.loads(text), path)
        elif suffix == ".jsonl":
            records = _jsonl(text, path)
        elif suffix in (".csv", ".tsv"):
            delimiter = "\t" if suffix == ".tsv" else ","
            records = list(csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter))
        else:
            raise DataError(f"data file '{path}' has an unknown format; use .json, .jsonl or .csv")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise DataError(f"data file '{path}' cannot be read ({e}); check the file") from None
    if not isinstance(records, list):
        raise DataError(
            f"data file '{path}' holds a {type(records).__name__}, not rows; use a list of rows "
            f'(LLaVA JSON) or, for captions, {{"file.jpg": "caption", ...}}'
        )
    return records


def _is_image_name(key: Any) -> bool:
    return isinstance(key, str) and key.lower().endswith(IMAGE_SUFFIXES)


def _unwrap(records: Any, path: Path) -> Any:
    """A top-level object is one row, unless it wraps the rows: {"data": [...]} or a single key
    holding a list (e.g. {"train": [...]}), which is what people export; or it maps image file
    names to captions ({"cat.jpg": "A cat.", ...}: a folder's captions.json, often)."""
    if not isinstance(records, dict):
        return records
    named = [_is_image_name(key) for key in records]
    if named and all(named):
        return [{"id": key, "image": key, "caption": value} for key, value in records.items()]
    if any(named):
        other = next(key for key in records if not _is_image_name(key))
        raise DataError(
            f"data file '{path}' maps image names to captions, but its key {other!r} is not an "
            f'image file name; use {{"file.jpg": "caption", ...}} or a list of rows'
        )
    if isinstance(records.get("data"), list):
        return records["data"]
    rows = next(iter(records.values())) if len(records) == 1 else None
    if "conversations" in records or "messages" in records:  # itself a row, of turns
        rows = None
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        return rows
    return [records]


def _jsonl(text: str, path: Path) -> list[Any]:
    """Each line on its own, so that an error names the file's line, not column 1 of "line 1"."""
    records = []
    for number, line in enumerate(text.split("\n"), start=1):  # not at U+2028, as splitlines
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(
                f"data file '{path}' line {number} is not valid JSON ({e.msg} at column "
                f"{e.colno}); fix that line"
            ) from None
    return records


def _sample(record: Any, index: int, base: Path | None, prompt: str) -> Sample:
    if not isinstance(record, dict):
        return Sample(str(index), [], f"row is a {type(record).__name__}, not a dict")
    record = _columns(record)
    ident = str(record.get("id", index))
    try:
        if "messages" in record and "conversations" not in record:
            inline = _inline_images(record["messages"])  # {"type": "image", "image": img}
            if inline and not any(record.get(k) not in (None, "") for k in _IMAGE_KEYS):
                record = {**record, "images": inline}
            record = {**record, "conversations": _as_conversations(record["messages"])}
        if "conversations" in record:
            return Sample(ident, _conversation(record, base, prompt))
        return Sample(ident, [_flat(record, base, prompt)])
    except _RowError as e:
        return Sample(ident, [], str(e))


class _RowError(Exception):
    pass


def _columns(record: dict) -> dict:
    """The row with its column names as the formats spell them: a spreadsheet's "Image" or
    " caption" (a space after the comma) is "image" or "caption"; an exact name wins."""
    named: dict = {}
    for key, value in record.items():
        name = key.strip().lower() if isinstance(key, str) else key
        if name not in named or name == key:
            named[name] = value
    return named


def _resolve(image: Any, base: Path | None) -> Any:
    if isinstance(image, dict) and image.get("bytes"):  # a datasets Image: {"bytes", "path"}
        try:
            return Image.open(io.BytesIO(image["bytes"]))
        except OSError:
            raise _RowError("the image's bytes are not a readable image") from None
    if isinstance(image, dict):
        image = image.get("path")
    if isinstance(image, Image.Image):
        return image
    if not isinstance(image, str | os.PathLike) or not str(image).strip():
        raise _RowError(f"image {image!r} is not a path")
    image = str(image).strip()
    if image.startswith(("http://", "https://")):
        return image
    path = Path(image).expanduser()
    return str(path if path.is_absolute() or base is None else base / path)


def _images_of(record: dict, base: Path | None) -> list[Any]:
    key = next((k for k in _IMAGE_KEYS if record.get(k) not in (None, "")), None)
    if key is None:
        return []
    value = record[key]
    values = value if isinstance(value, list | tuple) else [value]
    return [_resolve(v, base) for v in values]


def _string(value: Any, what: str) -> str:
    """Text as given; numbers become text (counting questions have answers like 3)."""
    if isinstance(value, float) and value != value:  # NaN: an empty cell of a DataFrame
        return ""
    if isinstance(value, float) and value.is_integer():  # a DataFrame's ints, once a cell is empty
        return str(int(value))
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if value is None or isinstance(value, str):
        return value or ""
    raise _RowError(f"{what} is a {type(value).__name__}, not text")


def _text(value: Any, what: str) -> str:
    text = _string(value, what).strip()
    if not text:
        raise _RowError(f"{what} is empty")
    return text


def _flat(record: dict, base: Path | None, prompt: str) -> SampleTurn:
    images = _images_of(record, base)
    answer_key = next((k for k in _ANSWER_KEYS if k in record), None)
    if answer_key is None:
        found = ", ".join(repr(str(k)) for k in list(record)[:10]) or "none"
        raise _RowError(
            f"no answer; give one of the columns {', '.join(_ANSWER_KEYS)} (found columns: {found})"
        )
    answer = _text(record[answer_key], answer_key)
    key = next((k for k in ("question", "prompt") if _string(record.get(k), k).strip()), None)
    question = _text(record[key], key) if key else prompt
    question = question.replace(IMAGE_TAG, "").strip() or prompt
    if not images:
        raise _RowError("no image; give an 'image' column")
    return SampleTurn(question, images, answer)


def _inline_images(messages: Any) -> list[Any]:
    """The images that chat messages carry in their image parts, in order, under any key that
    transformers' chat templates read ("image", "url", "path")."""
    parts = [
        part
        for message in (messages if isinstance(messages, list) else [])
        if isinstance(message, dict) and isinstance(message.get("content"), list)
        for part in message["content"]
        if isinstance(part, dict) and part.get("type") == "image"
    ]
    found = (next((p[k] for k in ("image", "url", "path") if p.get(k)), None) for p in parts)
    return [image for image in found if image is not None]


def _as_conversations(messages: Any) -> Any:
    """Chat messages ({"role", "content"}, content text or parts, {"type": "image"} parts
    standing for the row's images in order) as LLaVA's conversations, an <image> tag per image.
    System messages go before the first question, as `llava-nb serve` puts them: LLaVA's chat
    templates have no system turn."""
    if not isinstance(messages, list):
        raise _RowError(f"messages is a {type(messages).__name__}; use a list of messages")
    turns, system = [], []
    for message in messages:
        if not isinstance(message, dict) or "content" not in message:
            raise _RowError("a message is malformed; use {'role': ..., 'content': ...}")
        content = message["content"]
        if isinstance(content, list):
            content = "\n".join(
                IMAGE_TAG if part.get("type") == "image" else str(part.get("text") or "")
                for part in content
                if isinstance(part, dict) and part.get("type") in ("image", "text")
            )
        if message.get("role") in ("system", "developer"):
            system.append(_text(content, "system message"))
        else:
            turns.append({"from": message.get("role"), "value": content})
    if system and turns and isinstance(turns[0]["value"], str):
        first = turns[0]["value"]  # its tags only count the images: their place is the template's
        question = "\n\n".join([*system, first.replace(IMAGE_TAG, "").strip()])
        turns[0]["value"] = IMAGE_TAG * first.count(IMAGE_TAG) + question
    return turns


def _conversation(record: dict, base: Path | None, prompt: str) -> list[SampleTurn]:
    images = _images_of(record, base)
    conversation = record["conversations"]
    if not isinstance(conversation, list) or not conversation:
        raise _RowError("conversations is empty")
    system = []  # ShareGPT-style system turns: before the first question, as for messages
    while isinstance(conversation[0], dict) and str(conversation[0].get("from")).lower() in (
        "system",
        "developer",
    ):
        system.append(_text(conversation[0].get("value"), f"system turn {len(system)}"))
        conversation = conversation[1:]
        if not conversation:
            raise _RowError("conversations has a system turn and no question")
    turns: list[SampleTurn] = []
    tags = 0
    for position, message in enumerate(conversation, start=len(system)):
        if not isinstance(message, dict) or "value" not in message:
            raise _RowError(f"turn {position} is malformed; use {{'from': ..., 'value': ...}}")
        role = _ROLES.get(str(message.get("from", "")).lower())
        expected = "user" if (position - len(system)) % 2 == 0 else "assistant"
        if role != expected:
            raise _RowError(
                f"turn {position} is from {message.get('from')!r}; turns alternate human, gpt"
            )
        value = message["value"]
        if role == "user":
            what = f"question in turn {position}"
            value = _string(value, what)
            count = value.count(IMAGE_TAG)
            tags += count
            if count and not value.replace(IMAGE_TAG, "").strip():  # images alone: as a flat row
                value = prompt
            question = _text(value.replace(IMAGE_TAG, ""), what)
            turns.append(SampleTurn(question, images[tags - count : tags]))
        else:
            turns[-1].answer = _text(value, f"answer in turn {position}")
    if len(conversation) % 2:
        raise _RowError("the last turn is a question with no answer")
    turns[0].question = "\n\n".join([*system, turns[0].question])
    if images and tags == 0:
        raise _RowError(f'has an image but no "{IMAGE_TAG}" in its first question')
    if tags != len(images):
        raise _RowError(f'has {tags} "{IMAGE_TAG}" tag(s) but {len(images)} image(s)')
    return turns
