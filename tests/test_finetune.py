"""ln.finetune on the tiny checkpoint: a run whose eval loss falls, adapters that plain PEFT
loads, hot swap in a chat, merge, compare, exact resume after an interrupt, QLoRA, stage
"align", two processes through accelerate, and the %%llava_finetune cell.

The tiny model has random weights; it learns "It is <color>." for squares of one colour.
"""

from __future__ import annotations

import ast
import contextlib
import gc
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import TrainerCallback

import llava_nb as ln
from llava_nb.training.adapters import AdapterError
from llava_nb.training.train import FinetuneError

ROOT = Path(__file__).resolve().parents[1]
COLORS = ("red", "green", "blue")
QUESTION = "What color is it?"


def squares(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        color = COLORS[i % 3]
        shade = 20 * (i % 4)  # a few slightly different pictures of each colour
        rgb = {"red": (230 - shade, 20, 20), "green": (20, 200 - shade, 20)}
        picture = Image.new("RGB", (40, 40), rgb.get(color, (20, 20, 230 - shade)))
        rows.append({"image": picture, "question": QUESTION, "answer": f"It is {color}."})
    return rows


def square(color: str) -> Image.Image:
    return Image.new(
        "RGB", (40, 40), {"red": (230, 0, 0), "green": (0, 200, 0)}.get(color, (0, 0, 230))
    )


SETTINGS = dict(batch_size=4, lr=5e-3, r=8, alpha=16, progress=False)


@pytest.fixture(scope="module")
def run(tiny_llava, tmp_path_factory):
    """One instruct run, shared by the tests that use its adapter."""
    out = tmp_path_factory.mktemp("runs") / "colors"
    return ln.finetune(
        tiny_llava, squares(12), squares(6, offset=12), max_steps=24, eval_every=6,
        output_dir=out, **SETTINGS,
    )  # fmt: skip


def inputs(processor, color: str):
    """A question about a square, in the format `Chat.messages()` gives the processor."""
    content = [{"type": "image", "image": square(color)}, {"type": "text", "text": QUESTION}]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


# ---------------------------------------------------------------- the run


def test_eval_loss_falls_and_the_run_is_recorded(run, capsys):
    assert run.status == "finished" and run.step == run.max_steps == 24
    assert run.metrics["eval_loss"] < run.metrics["first_eval_loss"] - 0.5
    evals = [h for h in run.history if "eval_loss" in h]
    assert evals[0]["step"] == 0 and len(evals) >= 5
    assert any("loss" in h and "learning_rate" in h for h in run.history)
    out = Path(run.adapter_path)
    assert {"adapter_config.json", "adapter_model.safetensors", "llava_nb_run.json"} <= {
        p.name for p in out.iterdir()
    }
    record = json.loads((out / "llava_nb_run.json").read_text())
    assert record["status"] == "finished" and record["config"]["stage"] == "instruct"

    # the same call again finds the finished run instead of training again
    again = ln.finetune(
        run.config["base"], squares(12), squares(6, offset=12), max_steps=24, eval_every=6,
        output_dir=out,
        **{**SETTINGS, "progress": True},
    )  # fmt: skip
    assert again.history == run.history and again.metrics == run.metrics
    assert "already holds this finished run" in capsys.readouterr().out


def test_a_finished_run_is_found_without_its_images(tiny_llava, tmp_path, capsys):
    """Running the notebook again after the images were cleaned up: the finished run is
    returned as recorded (it was refused: every row checked again, none with an image)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i, row in enumerate(squares(4)):
        row["image"].save(folder / f"{i}.png")
    rows = [{**row, "image": f"{i}.png"} for i, row in enumerate(squares(4))]
    settings = dict(max_steps=2, output_dir=tmp_path / "run", **{**SETTINGS, "batch_size": 2})
    first = ln.finetune(tiny_llava, ln.data.load(rows, folder), **settings)
    for image in folder.iterdir():
        image.unlink()
    again = ln.finetune(tiny_llava, ln.data.load(rows, folder), **{**settings, "progress": True})
    assert "already holds this finished run" in capsys.readouterr().out
    assert again.history == first.history and again.status == "finished"


def test_adapter_is_plain_peft_scoped_to_the_language_model(run, tiny_llava):
    from peft import PeftModel
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    weights = load_file(Path(run.adapter_path) / "adapter_model.safetensors")
    lora = [k for k in weights if "lora_" in k]
    assert lora and all(".language_model." in k for k in lora)
    assert any("multi_modal_projector" in k for k in weights)
    assert not any("vision_tower" in k for k in weights)

    base = LlavaForConditionalGeneration.from_pretrained(tiny_llava)
    batch = inputs(AutoProcessor.from_pretrained(tiny_llava), "red")
    before = logits(base, batch)
    tuned = PeftModel.from_pretrained(base, run.adapter_path).eval()
    after = logits(tuned, batch)
    assert not torch.allclose(before, after, atol=1e-3)
    # the projector travelled with the adapter: switching LoRA off keeps the trained projector
    with tuned.disable_adapter():
        assert torch.allclose(logits(tuned, batch), before, atol=1e-5)


def test_use_adapter_hot_swaps_and_the_chat_remembers(run, tiny_llava, tmp_path):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    model = ln.Model(tiny_llava)
    base_chat, tuned_chat = ln.Chat(model, max_new_tokens=6), ln.Chat(model, max_new_tokens=6)
    tuned_chat.use_adapter(run.adapter_path)
    weights = model.model
    answers = {}
    for color in COLORS:
        answers[color] = tuned_chat.ask(QUESTION, square(color))
        tuned_chat.reset()
    base_answer = base_chat.ask(QUESTION, square("red"))
    assert model.model is weights  # swapped in place, never reloaded
    assert answers["red"] != base_answer
    assert answers["red"].strip().startswith("It is"), answers
    assert len(set(answers.values())) > 1  # it tells the colours apart

    # numerically the same as plain PEFT on a fresh base
    reference = PeftModel.from_pretrained(
        LlavaForConditionalGeneration.from_pretrained(tiny_llava), run.adapter_path
    ).eval()
    batch = inputs(model.processor, "green")
    from llava_nb.training.adapters import activate

    with model._lock:
        activate(model.model, run.adapter_path)
        swapped = logits(model.model, batch)
        activate(model.model, None)
        plain = logits(model.model, batch)
    assert torch.allclose(swapped, logits(reference, batch), atol=1e-5)
    assert torch.allclose(
        plain, logits(LlavaForConditionalGeneration.from_pretrained(tiny_llava), batch), atol=1e-5
    )

    # back to the base, and save/load keeps the choice
    tuned_chat.use_adapter(None)
    assert tuned_chat.ask(QUESTION, square("red")) == base_answer
    tuned_chat.reset()
    tuned_chat.use_adapter(run.adapter_path)
    saved = ln.Chat.load(tuned_chat.save(tmp_path / "chat.json"), model=model)
    assert saved.adapter == str(Path(run.adapter_path).resolve())
    assert saved.ask(QUESTION, square("red")) == answers["red"]

    with pytest.raises(AdapterError, match="not found"):
        tuned_chat.use_adapter(tmp_path / "nope")
    with pytest.raises(AdapterError, match="no adapter"):
        tuned_chat.use_adapter(tmp_path)
    assert tuned_chat.adapter == saved.adapter  # a failed swap keeps the adapter in use


def test_an_adapter_for_other_layer_names_is_refused_not_merged(run, tiny_llava, tmp_path):
    """As a LoRA of a plain LLaMA (model.layers.N, not model.language_model.layers.N): peft
    only warns, and the merged checkpoint would be the base unchanged."""
    import shutil

    from safetensors.torch import save_file

    other = tmp_path / "other"
    shutil.copytree(run.adapter_path, other)
    (other / "llava_nb_run.json").unlink()
    weights = load_file(other / "adapter_model.safetensors")
    save_file(
        {k.replace("language_model.", ""): v for k, v in weights.items()},
        other / "adapter_model.safetensors",
    )
    with pytest.raises(AdapterError, match="does not fit .*unexpected weights such as base_model"):
        ln.merge_adapter(tiny_llava, other, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    with pytest.raises(AdapterError, match="does not fit this model .*unexpected weights"):
        ln.Chat(ln.Model(tiny_llava)).use_adapter(other)


def test_an_adapter_that_does_not_fit_leaves_the_model_as_it_was(run, tiny_llava, tmp_path):
    import shutil
    import warnings

    from safetensors.torch import save_file

    plain = tmp_path / "plain"  # a plain PEFT adapter (no run file) of another width
    shutil.copytree(run.adapter_path, plain)
    (plain / "llava_nb_run.json").unlink()
    weights = load_file(plain / "adapter_model.safetensors")
    name = next(k for k in weights if "lora_A" in k)
    weights[name] = torch.zeros(weights[name].shape[0], weights[name].shape[1] * 2)
    save_file(weights, plain / "adapter_model.safetensors")

    chat = ln.Chat(ln.Model(tiny_llava), max_new_tokens=8)
    with pytest.raises(AdapterError, match="does not fit this model .*size mismatch for"):
        chat.use_adapter(plain)
        chat.ask(QUESTION, square("red"))
    model = chat.model.model
    assert not hasattr(model, "peft_config")
    assert not any("lora_" in n or "modules_to_save" in n for n, _ in model.named_parameters())
    chat.reset()
    chat.use_adapter(run.adapter_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # peft's "Already found a peft_config attribute"
        answer = chat.ask(QUESTION, square("red"))
    clean = ln.Chat(ln.Model(tiny_llava), max_new_tokens=8)
    clean.use_adapter(run.adapter_path)
    assert answer == clean.ask(QUESTION, square("red"))


def test_a_damaged_adapter_folder_gets_one_line(run, tiny_llava, tmp_path):
    import shutil

    def damaged(name: str, file: str, text: str | None) -> Path:
        folder = tmp_path / name
        shutil.copytree(run.adapter_path, folder)
        if text is None:
            (folder / file).unlink()
        else:
            (folder / file).write_text(text)
        return folder

    cases = [
        (damaged("config", "adapter_config.json", "{not json"), "adapter_config.json' is damaged"),
        (damaged("none", "adapter_model.safetensors", None), "holds no adapter weights"),
        (damaged("cut", "adapter_model.safetensors", "x" * 20), "safetensors' is damaged"),
        (damaged("run", "llava_nb_run.json", "{"), "json' is damaged; delete it to use the"),
        (damaged("list", "llava_nb_run.json", "[]"), "json' is damaged; delete it to use the"),
    ]
    chat = ln.Chat(ln.Model(tiny_llava), max_new_tokens=4)
    for folder, message in cases:
        with pytest.raises(AdapterError, match=message):
            chat.use_adapter(folder)
        assert chat.adapter is None
    with pytest.raises(AdapterError, match="an adapter is a folder path .* got 5"):
        chat.use_adapter(5)
    assert not hasattr(chat.model.model, "peft_config")  # nothing half-loaded
    with pytest.raises(AdapterError, match="safetensors' is damaged"):
        ln.merge_adapter(tiny_llava, cases[2][0], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()

    gone = tmp_path / "gone"  # a good copy, deleted once the chat uses it
    shutil.copytree(run.adapter_path, gone)
    chat.use_adapter(gone)
    chat.ask(QUESTION, square("red"))
    shutil.rmtree(gone)
    with pytest.raises(AdapterError, match=r"not found; .*\(%llava adapter none\) answers with"):
        chat.ask(QUESTION)
    assert len(chat.history) == 1
    chat.use_adapter(None)
    assert chat.ask(QUESTION)


def test_a_file_given_for_the_adapter_folder_names_the_folder(run, tiny_llava, tmp_path):
    folder = Path(run.adapter_path).resolve()
    model = ln.Model(tiny_llava)
    chat = ln.Chat(model, max_new_tokens=2)
    for name in ("adapter_model.safetensors", "llava_nb_run.json", "adapter_config.json"):
        file = folder / name
        message = rf"'{file}' is a file, not an adapter folder; pass its folder '{folder}'"
        with pytest.raises(AdapterError, match=message):
            chat.use_adapter(file)
        with pytest.raises(AdapterError, match=message):
            ln.merge_adapter(tiny_llava, file, tmp_path / "merged")
        with pytest.raises(AdapterError, match=message):
            ln.compare(model, file, [QUESTION])
    messages = [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
    generation = model.generate(messages, max_new_tokens=2, adapter=str(folder / name))
    with pytest.raises(AdapterError, match=f"{message}$"):
        generation.wait()
    notes = tmp_path / "notes.txt"  # a file with no adapter beside it
    notes.write_text("mine")
    with pytest.raises(AdapterError, match="notes.txt' is a file, not an adapter folder; pass a"):
        chat.use_adapter(notes)
    assert chat.adapter is None and not (tmp_path / "merged").exists()


def test_an_adapter_of_an_unsupported_kind_is_refused_with_the_reason(tiny_llava, tmp_path):
    from peft import PromptTuningConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    prompt = tmp_path / "prompt"
    config = PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    get_peft_model(
        LlavaForConditionalGeneration.from_pretrained(tiny_llava), config
    ).save_pretrained(prompt)
    message = "is a PROMPT_TUNING adapter: .*no weights .*; train a LoRA adapter"
    chat = ln.Chat(ln.Model(tiny_llava), max_new_tokens=2)
    with pytest.raises(AdapterError, match=message) as error:
        chat.use_adapter(prompt)
    assert "\n" not in str(error.value)
    assert chat.adapter is None and not hasattr(chat.model.model, "peft_config")
    with pytest.raises(AdapterError, match=message):
        ln.merge_adapter(tiny_llava, prompt, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    (prompt / "adapter_config.json").write_text('{"peft_type": "NO_SUCH_KIND"}')
    with pytest.raises(
        AdapterError,
        match=r"config.json. names an adapter kind this peft .* does not know \(.NO_SUCH_KIND.\)",
    ):
        chat.use_adapter(prompt)


@contextlib.contextmanager
def opens_of(file: Path):
    """The times `file` is opened inside the block, as the kernel reports them (inotify's
    IN_OPEN): whoever reads it, Python or a library's native code. Closes are watched too:
    inotify merges identical events in a row, so open, open would count once."""
    import ctypes
    import struct

    libc = ctypes.CDLL(None, use_errno=True)
    watch = libc.inotify_init1(os.O_NONBLOCK)
    if watch < 0 or libc.inotify_add_watch(watch, str(file).encode(), 0x38) < 0:  # opens, closes
        pytest.skip("no inotify here")
    opened: list[int] = []
    try:
        yield opened
        events = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(watch, 4096):
                events += chunk
        offset = 0
        while offset < len(events):
            _, mask, _, length = struct.unpack_from("iIII", events, offset)
            opened += [mask] if mask & 0x20 else []
            offset += 16 + length
    finally:
        os.close(watch)


def test_an_adapter_missing_weights_is_refused_and_read_once(run, tiny_llava, tmp_path):
    """Loaded on a chat's model or merged, one check: every weight the adapter's layers need,
    and nothing else (peft fills a missing LoRA weight with its random start, and only warns).
    The check reads the weights that are merged: the file is opened once."""
    import shutil

    from safetensors.torch import save_file

    partial = tmp_path / "partial"
    shutil.copytree(run.adapter_path, partial)
    weights = load_file(partial / "adapter_model.safetensors")
    gone = min(k for k in weights if "lora_A" in k)
    del weights[gone]
    save_file(weights, partial / "adapter_model.safetensors")
    message = f"does not fit .*missing weights such as {gone}"
    with pytest.raises(AdapterError, match=message.replace("base_model.model.", "")):
        ln.Chat(ln.Model(tiny_llava)).use_adapter(partial)
    with pytest.raises(AdapterError, match=message):
        ln.merge_adapter(tiny_llava, partial, tmp_path / "merged")

    with opens_of(Path(run.adapter_path) / "adapter_model.safetensors") as opened:
        ln.merge_adapter(tiny_llava, run.adapter_path, tmp_path / "merged")
    assert len(opened) == 1


def test_a_second_adapter_swaps_in_without_peft_warnings(run, tiny_llava, tmp_path):
    """Several adapters on one model is the design: peft's "multiple adapters" warning is noise."""
    import shutil
    import warnings

    second = tmp_path / "second"
    shutil.copytree(run.adapter_path, second)
    chat = ln.Chat(ln.Model(tiny_llava), max_new_tokens=4)
    chat.use_adapter(run.adapter_path)
    first = chat.ask(QUESTION, square("red"))
    chat.reset()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", module="peft")
        chat.use_adapter(second)
    assert chat.ask(QUESTION, square("red")) == first


def test_an_adapter_for_another_base_is_refused(run, tiny_llava_next):
    chat = ln.Chat(tiny_llava_next)
    with pytest.raises(AdapterError, match="built for another base model"):
        chat.use_adapter(run.adapter_path)
    assert chat.adapter is None


def test_merge_and_compare(run, tiny_llava, tmp_path):
    from peft import PeftModel
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    merged = ln.merge_adapter(tiny_llava, run.adapter_path, tmp_path / "merged")
    batch = inputs(AutoProcessor.from_pretrained(merged), "blue")
    reference = PeftModel.from_pretrained(
        LlavaForConditionalGeneration.from_pretrained(tiny_llava), run.adapter_path
    ).eval()
    full = LlavaForConditionalGeneration.from_pretrained(merged).eval()
    assert torch.allclose(logits(full, batch), logits(reference, batch), atol=1e-4)
    with pytest.raises(AdapterError, match="not empty"):
        ln.merge_adapter(tiny_llava, run.adapter_path, tmp_path / "merged")
    with pytest.raises(AdapterError, match=r"config.json' is a file\); choose another folder"):
        ln.merge_adapter(tiny_llava, run.adapter_path, tmp_path / "merged" / "config.json" / "x")
    with pytest.raises(AdapterError, match=r"'/proc/llava_nb' cannot be written \(.*\); choose"):
        ln.merge_adapter(tiny_llava, run.adapter_path, "/proc/llava_nb")  # not even as root
    with pytest.raises(AdapterError, match="output_dir must be a folder path, got None"):
        ln.merge_adapter(tiny_llava, run.adapter_path, None)

    comparison = ln.compare(tiny_llava, run.adapter_path, [(QUESTION, square("red"))])
    (row,) = comparison.rows
    assert row["base"] != row["tuned"] and row["tuned"].strip().startswith("It is")
    tuned = ln.Chat(merged, max_new_tokens=64).ask(QUESTION, square("red"))
    assert tuned.strip() == row["tuned"]
    html = comparison._repr_html_()
    assert "<table>" in html and "data:image/png;base64" in html and QUESTION in html


# ---------------------------------------------------------------- resume


def test_interrupt_then_resume_matches_an_uninterrupted_run(
    tiny_llava, tmp_path, capsys, monkeypatch
):
    from transformers import TrainerCallback

    settings = dict(max_steps=6, output_dir=None, dropout=0.1, **{**SETTINGS, "batch_size": 2})
    data = squares(7)
    whole = ln.finetune(tiny_llava, data, **{**settings, "output_dir": tmp_path / "whole"})

    class InterruptAfterStep2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                signal.raise_signal(signal.SIGINT)  # what a kernel interrupt does

    save = torch.save

    def interrupted_again(obj, f, *args, **kwargs):  # Stop pressed again while it saves
        if str(f).endswith("optimizer.pt"):
            signal.raise_signal(signal.SIGINT)
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", interrupted_again)
    parts = {**settings, "output_dir": tmp_path / "parts", "progress": True}
    first = ln.finetune(tiny_llava, data, callbacks=[interrupt_after_step2()], **parts)
    monkeypatch.undo()
    assert first.status == "interrupted" and first.step == 3
    err = capsys.readouterr().err
    assert "writing the checkpoint; stopping as soon as it is written" in err
    assert "stopped at step 3/6; adapter saved in" in err
    assert "again with the same output_dir to resume" in err
    assert (tmp_path / "parts" / "checkpoint-3").is_dir()
    assert (tmp_path / "parts" / "adapter_model.safetensors").is_file()

    import shutil

    run_file = tmp_path / "parts" / "llava_nb_run.json"
    recorded = run_file.read_text()
    for changed, message in (
        ({"projector_lr": 0.1}, r"projector_lr was None, now 0.1\); pass projector_lr=None to"),
        ({"group_by_length": True}, "group_by_length was False, now True"),
        ({"lr": 1e-3}, r"lr was 0.005, now 0.001\); pass lr=0.005 to resume it"),
    ):
        with pytest.raises(FinetuneError, match=message):
            ln.finetune(tiny_llava, data, **{**parts, **changed})
    assert run_file.read_text() == recorded  # a refused call leaves the run as it was

    damaged = tmp_path / "damaged"  # a checkpoint cut short in the middle of a file
    shutil.copytree(tmp_path / "parts", damaged)
    (damaged / "checkpoint-3" / "optimizer.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(FinetuneError, match="checkpoint-3' cannot be resumed .*delete that folder"):
        ln.finetune(tiny_llava, data, **{**parts, "output_dir": damaged})
    assert (damaged / "llava_nb_run.json").read_text() == recorded
    shutil.rmtree(damaged / "checkpoint-3")  # no checkpoint left: the adapter is not trained over
    with pytest.raises(FinetuneError, match="adapter trained to step 3 and no checkpoint"):
        ln.finetune(tiny_llava, data, **{**parts, "output_dir": damaged})

    incomplete = tmp_path / "parts" / "checkpoint-5"  # a save that a second interrupt cut short
    shutil.copytree(tmp_path / "parts" / "checkpoint-3", incomplete)
    (incomplete / "trainer_state.json").unlink()
    second = ln.finetune(f"{tiny_llava}/", data, **parts)  # the same base, written another way
    assert "checkpoint-5 in" in capsys.readouterr().err
    assert second.status == "finished" and second.step == 6
    assert [h["step"] for h in second.history] == [h["step"] for h in whole.history]
    # the loss of the whole run, not of the steps after the resume only
    assert second.metrics["train_loss"] == pytest.approx(whole.metrics["train_loss"], rel=1e-4)
    assert second.metrics["runtime_s"] > first.metrics["runtime_s"]
    a = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    b = load_file(tmp_path / "parts" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FinetuneError, match="not empty and holds no llava_nb run"):
        ln.finetune(tiny_llava, data, **{**parts, "output_dir": tmp_path / "other"})
    for file in (tmp_path / "other" / "notes.txt", tmp_path / "other" / "notes.txt" / "run"):
        with pytest.raises(FinetuneError, match=r"notes.txt' is a file\); choose another output_"):
            ln.finetune(tiny_llava, data, **{**parts, "output_dir": file})
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_training_inside_a_model_load_stops_when_the_load_is_interrupted(tiny_llava, tmp_path):
    """The demo build trains on a model load's thread, where no interrupt lands: the main
    thread, waiting for the load, takes it and asks the run to stop after its step."""
    import threading
    import time

    from transformers import TrainerCallback

    from llava_nb.models import _on_a_thread_of_its_own, stop_asked

    main = threading.main_thread().ident

    class InterruptAfterStep2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                signal.pthread_kill(main, signal.SIGINT)  # as Jupyter's stop button
                deadline = time.monotonic() + 60  # the waiting main thread takes it: seen here
                while not stop_asked() and time.monotonic() < deadline:
                    time.sleep(0.01)

    runs = []

    def load():
        settings = dict(max_steps=40, output_dir=tmp_path / "run", **SETTINGS)
        runs.append(
            ln.finetune(tiny_llava, squares(8), callbacks=[InterruptAfterStep2()], **settings)
        )

    with pytest.raises(KeyboardInterrupt):
        _on_a_thread_of_its_own(load)
    assert runs[0].status == "interrupted" and runs[0].step == 3


def test_a_double_interrupt_before_a_resume_steps_keeps_the_adapter(tiny_llava, tmp_path, capsys):
    """Stop pressed twice as a resumed run begins, before its first step: this call changed
    nothing, so the adapter and the record stay as they were, and the run still resumes."""

    class InterruptedTwiceAtTheStart(TrainerCallback):  # the checkpoint loaded, no step run
        def on_train_begin(self, args, state, control, **kwargs):
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)

    class StopAtOnceAfterStep3(TrainerCallback):  # as a second interrupt does
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    settings = dict(max_steps=4, save_every=2, output_dir=tmp_path / "run", **SETTINGS)
    first = ln.finetune(tiny_llava, squares(8), callbacks=[StopAtOnceAfterStep3()], **settings)
    assert first.status == "interrupted" and first.step == 3
    adapter = (tmp_path / "run" / "adapter_model.safetensors").read_bytes()
    record = (tmp_path / "run" / "llava_nb_run.json").read_text()

    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        ln.finetune(
            tiny_llava, squares(8), callbacks=[InterruptedTwiceAtTheStart()],
            **{**settings, "progress": True},
        )  # fmt: skip
    err = capsys.readouterr().err
    assert "interrupted at step 3; resuming from checkpoint-2" in err  # none saved at 3
    assert "stopped while resuming; " in err
    assert (tmp_path / "run" / "adapter_model.safetensors").read_bytes() == adapter
    assert (tmp_path / "run" / "llava_nb_run.json").read_text() == record
    assert ln.finetune(tiny_llava, squares(8), **settings).status == "finished"


def interrupt_after_step2():
    """A callback that interrupts as the kernel does after step 2: the run stops after step 3."""
    from transformers import TrainerCallback

    class InterruptAfterStep2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                signal.raise_signal(signal.SIGINT)

    return InterruptAfterStep2()


def stopped_at_step3(tiny_llava, tmp_path) -> tuple[dict, Path]:
    """A 4-step run in tmp_path/run interrupted after step 3 (checkpoint-2 saved, the adapter
    written at step 3): its settings, to call again, and its adapter file."""
    settings = dict(max_steps=4, save_every=2, output_dir=tmp_path / "run", **SETTINGS)
    settings["batch_size"] = 2
    first = ln.finetune(tiny_llava, squares(8), callbacks=[interrupt_after_step2()], **settings)
    assert first.status == "interrupted" and first.step == 3
    return settings, tmp_path / "run" / "adapter_model.safetensors"


class InterruptAfter(TrainerCallback):
    """Interrupts as the kernel does after step `step`: the run stops after the next one."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            signal.raise_signal(signal.SIGINT)


def test_a_resume_checks_the_rows_again_only_when_they_changed(tiny_llava, tmp_path, capsys):
    """Every call checked every row again (each image read, each row encoded: 1-4 ms a row),
    also a resume of the same run on the same files. Now a resume takes the result from the
    run file while the rows, the settings and each image file's size and time are the same;
    a changed image is checked again. A row that is never trained on (its image unreadable)
    shows it: a check is the only thing that opens its image."""
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i, row in enumerate(squares(8)):
        row["image"].save(images / f"{i}.png")
        rows.append({**row, "image": f"images/{i}.png"})
    broken = images / "broken.png"
    broken.write_bytes(b"not a picture")
    rows.append({"image": "images/broken.png", "question": QUESTION, "answer": "It is red."})
    (tmp_path / "train.json").write_text(json.dumps(rows))
    data = ln.data.load(tmp_path / "train.json")
    settings = dict(max_steps=8, output_dir=tmp_path / "run", **{**SETTINGS, "batch_size": 2})
    settings["progress"] = True

    first = ln.finetune(tiny_llava, data, callbacks=[InterruptAfter(1)], **settings)
    assert first.status == "interrupted" and first.step == 2
    assert "skipping 1 of 9 rows of data" in capsys.readouterr().err
    with opens_of(broken) as opened:
        second = ln.finetune(tiny_llava, data, callbacks=[InterruptAfter(3)], **settings)
    assert second.status == "interrupted" and second.step == 4
    assert opened == []  # not checked again
    assert "skipping 1 of 9 rows of data" in capsys.readouterr().err  # as the record says

    Image.new("RGB", (40, 40), (230, 20, 20)).save(broken, format="PNG")  # readable now
    with opens_of(broken) as opened:
        third = ln.finetune(tiny_llava, data, **settings)
    assert third.status == "finished" and third.step == 8
    assert opened  # checked again, and trained on
    assert "skipping" not in capsys.readouterr().err


def test_each_progress_line_shows_its_own_steps_loss(tiny_llava, tmp_path, monkeypatch, capsys):
    """Trainer calls on_step_end before it logs the step: a line drawn there showed the loss
    of the log before (so step N came twice at the end, and a resumed run began with the
    checkpoint's loss)."""
    import functools

    from llava_nb.training.progress import Progress

    every_time = functools.partialmethod(Progress.__init__, print_interval=0.0)
    monkeypatch.setattr(Progress, "__init__", every_time)  # a line at every step
    settings = dict(max_steps=5, output_dir=tmp_path / "run", **{**SETTINGS, "batch_size": 2})
    settings["progress"] = True
    first = ln.finetune(tiny_llava, squares(8), callbacks=[interrupt_after_step2()], **settings)
    assert first.status == "interrupted" and first.step == 3
    printed = capsys.readouterr().out
    second = ln.finetune(tiny_llava, squares(8), **settings)
    assert second.status == "finished" and second.step == 5
    resumed = capsys.readouterr().out
    losses = {h["step"]: f"{h['loss']:.4f}" for h in second.history if "loss" in h}
    for output, steps in ((printed, [1, 2, 3]), (resumed, [4, 5])):
        lines = [line for line in output.splitlines() if line.startswith("llava_nb: step")]
        shown = [(int(line.split()[2].split("/")[0]), line.split(" loss ")[1].split()[0])
                 for line in lines]  # fmt: skip
        assert shown == [(step, losses[step]) for step in steps], lines


def test_an_interrupt_while_the_adapter_is_written_waits_for_it(
    tiny_llava, tmp_path, monkeypatch, capsys
):
    """The final adapter write: an interrupt waits until it is whole (and the run file says
    how the run ended)."""
    import peft.peft_model

    settings, adapter = stopped_at_step3(tiny_llava, tmp_path)
    step3 = adapter.read_bytes()
    save = peft.peft_model.safe_save_file

    def interrupted_twice(tensors, filename, *args, **kwargs):  # Stop pressed while it writes
        if "checkpoint-" not in str(filename):
            Path(filename).write_bytes(b"cut short")
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", interrupted_twice)
    capsys.readouterr()
    run = ln.finetune(tiny_llava, squares(8), **{**settings, "progress": True})
    monkeypatch.undo()
    assert run.status == "finished" and run.step == 4
    assert "writing the adapter; stopping as soon as it is written" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "llava_nb_run.json").read_text())["status"] == "finished"
    assert adapter.read_bytes() != step3
    written = load_file(adapter)
    final = load_file(tmp_path / "run" / "checkpoint-4" / "adapter_model.safetensors")
    assert written.keys() == final.keys()
    assert all(torch.equal(written[key], final[key]) for key in final)
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if not p.is_dir()) == [
        "adapter_config.json", "adapter_model.safetensors", "llava_nb_run.json"
    ]  # fmt: skip


class FilesLimitedAtTheEnd(TrainerCallback):
    """When training ends (the last checkpoint saved), the process may write no file larger
    than `limit` bytes: the final adapter write fails for real (EFBIG, as a full disk does),
    while the small run file still fits."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def on_train_end(self, args, state, control, **kwargs):
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, resource.RLIM_INFINITY))


@contextlib.contextmanager
def file_size_limit_lifted():
    """Undo `FilesLimitedAtTheEnd` however the call ends; a write past the limit is an error
    (EFBIG), not the default SIGXFSZ that ends the process."""
    before = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, before)


def test_a_failed_adapter_write_is_recorded_and_the_next_call_writes_it(
    tiny_llava, tmp_path, capsys
):
    """The run file said "running" after the final write failed, and the next call resumed
    as if training had been cut, saying nothing. Now it says "failed" and why; the previous
    adapter and every checkpoint stay; the next call says what it does and writes it."""
    settings, adapter = stopped_at_step3(tiny_llava, tmp_path)
    step3 = adapter.read_bytes()
    run_file = tmp_path / "run" / "llava_nb_run.json"

    with file_size_limit_lifted():
        limit = FilesLimitedAtTheEnd(len(step3) // 2)
        with pytest.raises(FinetuneError, match=r"could not write the adapter in .*File too large"
                           r".*; the training is kept in checkpoint-4: free some space .*same "
                           r"output_dir to write it$") as error:  # fmt: skip
            ln.finetune(tiny_llava, squares(8), callbacks=[limit], **settings)
    assert "\n" not in str(error.value)
    record = json.loads(run_file.read_text())
    assert record["status"] == "failed" and "File too large" in record["error"]
    assert record["step"] == 4 and [h["step"] for h in record["history"] if "loss" in h] == [
        1, 2, 3, 4
    ]  # fmt: skip
    assert adapter.read_bytes() == step3  # the previous adapter, whole
    assert (tmp_path / "run" / "checkpoint-4" / "trainer_state.json").is_file()
    assert not (tmp_path / "run" / ".adapter-writing").exists()

    capsys.readouterr()
    run = ln.finetune(tiny_llava, squares(8), **{**settings, "progress": True})
    err = capsys.readouterr().err
    assert f"the last call on {tmp_path / 'run'} failed (writing the adapter: " in err
    assert "File too large" in err
    assert "resuming from checkpoint-4" in err
    assert run.status == "finished" and run.step == 4
    assert [h["step"] for h in run.history] == [h["step"] for h in record["history"]]
    assert json.loads(run_file.read_text())["status"] == "finished"
    final = load_file(tmp_path / "run" / "checkpoint-4" / "adapter_model.safetensors")
    written = load_file(adapter)
    assert written.keys() == final.keys() and all(torch.equal(written[k], final[k]) for k in final)


class FilesLimitedAfterStep(TrainerCallback):
    """After step `step` the process may write no file over 4 KB: the next checkpoint's write
    fails for real (EFBIG, as on a full disk), while the small run file still fits."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))


def test_a_checkpoint_that_cannot_be_written_fails_the_run_and_keeps_the_last_one(
    tiny_llava, tmp_path, capsys
):
    """The disk fills up during training: the checkpoint being written is cut short. That came
    out as the raw OSError with Trainer's traceback, and left the cut folder behind. Now it is
    one FinetuneError naming the step, the complete checkpoint before it and the fix; the cut
    folder is gone (its space freed, never resumed from); the next call resumes."""
    out = tmp_path / "run"
    settings = dict(max_steps=6, save_every=2, output_dir=out, **{**SETTINGS, "batch_size": 2})
    message = (
        r"^could not write checkpoint-4 at step 4 of 6 \(.*File too large.*\); the training so "
        r"far is kept in checkpoint-2; free some space on that disk and run ln\.finetune again "
        r"with the same output_dir to resume from there, or start over in an output_dir on a "
        r"disk with room$"
    )
    with file_size_limit_lifted(), pytest.raises(FinetuneError, match=message) as error:
        ln.finetune(tiny_llava, squares(8), callbacks=[FilesLimitedAfterStep(3)], **settings)
    assert "\n" not in str(error.value) and error.value.__cause__ is None
    record = json.loads((out / "llava_nb_run.json").read_text())
    assert record["status"] == "failed" and "File too large" in record["error"]
    assert record["error"].startswith("writing checkpoint-4 at step 4 failed: ")
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (out / "checkpoint-4").exists()
    capsys.readouterr()
    run = ln.finetune(tiny_llava, squares(8), **{**settings, "progress": True})
    err = capsys.readouterr().err
    assert "failed (writing checkpoint-4 at step 4 failed: " in err
    assert "resuming from checkpoint-2" in err
    assert run.status == "finished" and run.step == 6


def test_a_first_checkpoint_that_cannot_be_written_says_none_was_saved(tiny_llava, tmp_path):
    settings = dict(max_steps=4, save_every=2, output_dir=tmp_path / "run",
                    **{**SETTINGS, "batch_size": 2})  # fmt: skip
    with file_size_limit_lifted(), pytest.raises(FinetuneError, match=r"^could not write "
                                                 r"checkpoint-2 at step 2 of 4 \(.*\); no "
                                                 r"checkpoint was saved yet; free some space .* "
                                                 r"to start over, or start over in"):  # fmt: skip
        ln.finetune(tiny_llava, squares(4), callbacks=[FilesLimitedAfterStep(1)], **settings)
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_a_checkpoint_whose_state_was_cut_short_is_not_resumed_from(tiny_llava, tmp_path, capsys):
    """A process killed (or a disk filled) while trainer_state.json was written leaves a part
    of it: the checkpoint was taken as complete, and the resume failed on it."""
    out = tmp_path / "run"
    settings = dict(max_steps=6, save_every=2, output_dir=out, **{**SETTINGS, "batch_size": 2})
    first = ln.finetune(tiny_llava, squares(8), callbacks=[interrupt_after_step2()], **settings)
    assert first.status == "interrupted" and first.step == 3
    state = out / "checkpoint-3" / "trainer_state.json"
    state.write_text(state.read_text()[:100])
    capsys.readouterr()
    run = ln.finetune(tiny_llava, squares(8), **{**settings, "progress": True})
    err = capsys.readouterr().err
    assert "checkpoint-3 in" in err and "is incomplete" in err
    assert "resuming from checkpoint-2" in err
    assert run.status == "finished" and run.step == 6


class RaiseAt(TrainerCallback):
    """Raises `error` as the step numbered `step` (counting from 1) begins or ends."""

    def __init__(self, error: BaseException, step: int, when: str = "end") -> None:
        self.error, self.step, self.when = error, step, when

    def on_step_begin(self, args, state, control, **kwargs):
        if self.when == "begin" and state.global_step + 1 == self.step:
            raise self.error

    def on_step_end(self, args, state, control, **kwargs):
        if self.when == "end" and state.global_step == self.step:
            raise self.error


def test_a_failure_in_training_is_one_line_and_keeps_the_training_so_far(
    tiny_llava, tmp_path, capsys
):
    """A callback's exception and an out-of-memory error in the middle of training came out as
    the original exception with a traceback through Trainer. Now each is one FinetuneError
    naming what failed, at which step, where the training so far is kept, and the fix; the
    checkpoints and the previous adapter stay, and the next call resumes."""
    out = tmp_path / "run"
    settings = dict(max_steps=8, save_every=2, output_dir=out, **{**SETTINGS, "batch_size": 2})
    first = ln.finetune(tiny_llava, squares(8), callbacks=[interrupt_after_step2()], **settings)
    assert first.status == "interrupted" and first.step == 3
    adapter = (out / "adapter_model.safetensors").read_bytes()
    run_file = out / "llava_nb_run.json"

    with pytest.raises(FinetuneError, match=r"^your callback RaiseAt\.on_step_end failed at "
                       r"step 5 of 8 \(ValueError: boom\); the training so far is kept in "
                       r"checkpoint-4; fix the callback, then run ln\.finetune again with the "
                       r"same output_dir to resume from there$") as error:  # fmt: skip
        ln.finetune(tiny_llava, squares(8), callbacks=[RaiseAt(ValueError("boom"), 5)], **settings)
    assert error.value.__cause__ is None and error.value.__suppress_context__  # as the others
    record = json.loads(run_file.read_text())
    assert record["status"] == "failed" and record["step"] == 5
    assert record["error"] == "your callback RaiseAt.on_step_end failed at step 5: ValueError: boom"

    class OutOfMemoryAtStep6(RaiseAt):  # and notes the model trained, to see it let go
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            self.model = weakref.ref(model)
            super().on_step_begin(args, state, control, **kwargs)

    oom = OutOfMemoryAtStep6(
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 6, "begin"
    )
    with pytest.raises(FinetuneError, match=r"^ran out of memory at step 6 of 8 \(CUDA out of "
                       r"memory\. Tried to allocate 2\.00 GiB\); the training so far is kept in "
                       r"checkpoint-4; free memory and run ln\.finetune again with the same "
                       r"output_dir to resume, or start over in a new output_dir with a smaller "
                       r"batch_size \(now 2; a larger grad_accum keeps the batch size\) or "
                       r"max_length \(now \d+\), or method='qlora'$"):  # fmt: skip
        ln.finetune(tiny_llava, squares(8), callbacks=[oom], **settings)
    gc.collect()
    assert oom.model() is None  # the error, still held here, does not keep the model's memory
    assert json.loads(run_file.read_text())["error"].startswith("out of memory at step 6: CUDA")
    assert (out / "adapter_model.safetensors").read_bytes() == adapter  # the previous one, whole
    assert (out / "checkpoint-4" / "trainer_state.json").is_file()

    capsys.readouterr()
    run = ln.finetune(tiny_llava, squares(8), **{**settings, "progress": True})
    err = capsys.readouterr().err
    assert "failed (out of memory at step 6: CUDA out of memory" in err
    assert "resuming from checkpoint-4" in err
    assert run.status == "finished" and run.step == 8


def test_out_of_memory_before_any_checkpoint_says_none_was_saved(tiny_llava, tmp_path):
    """Python's MemoryError (the CPU's out of memory) at the first step: no checkpoint yet."""
    settings = dict(max_steps=4, output_dir=tmp_path / "run", **{**SETTINGS, "batch_size": 2})
    with pytest.raises(FinetuneError, match=r"^ran out of memory at step 1 of 4 \(MemoryError\); "
                       r"no checkpoint was saved yet; free memory and run ln\.finetune again, "
                       r"or in a new output_dir with a smaller batch_size \(now 2; a larger "
                       r"grad_accum keeps the batch size\) or max_length \(now \d+\), or "
                       r"method='qlora'$"):  # fmt: skip
        ln.finetune(
            tiny_llava, squares(4), callbacks=[RaiseAt(MemoryError(), 1, "begin")], **settings
        )
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_an_image_that_goes_missing_during_training_names_the_row(tiny_llava, tmp_path, capsys):
    """An image file that goes away while training runs (a network drive dropped, a folder
    moved) failed in the data loader with a traceback. Now one line names the row, the image
    and the step; once the image is back, the next call resumes."""
    images, away = tmp_path / "images", tmp_path / "away"
    images.mkdir()
    rows = []
    for i, row in enumerate(squares(8)):
        row["image"].save(images / f"{i}.png")
        rows.append({**row, "id": f"square-{i}", "image": str(images / f"{i}.png")})

    class ImagesGoAfterStep2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                images.rename(away)

    out = tmp_path / "run"
    settings = dict(max_steps=6, save_every=2, output_dir=out, **{**SETTINGS, "batch_size": 2})
    with pytest.raises(FinetuneError, match=r"^row \d of data \('square-\d'\) could not be read "
                       r"after step [23] of 6 \(image file '.*images/\d\.png' not found; check the "
                       r"path.*\); the training so far is kept in checkpoint-2; make that row "
                       r"readable again \(data\.validate\(\) lists such rows\), then run "
                       r"ln\.finetune again with the same output_dir to resume from "
                       r"there$"):  # fmt: skip
        ln.finetune(tiny_llava, rows, callbacks=[ImagesGoAfterStep2()], **settings)
    assert json.loads((out / "llava_nb_run.json").read_text())["error"].startswith("row ")
    away.rename(images)

    class ImagesGoAtTheStart(TrainerCallback):  # after the rows are checked, before a step
        def on_train_begin(self, args, state, control, **kwargs):
            images.rename(away)

    # the checkpoint loaded fine: it is kept, not named as one that cannot be resumed
    with pytest.raises(FinetuneError, match=r"^row \d of data \('square-\d'\) could not be read "
                       r"after step 2 of 6 \(image file .*; the training so far is kept in "
                       r"checkpoint-2; make that row readable again"):  # fmt: skip
        ln.finetune(tiny_llava, rows, callbacks=[ImagesGoAtTheStart()], **settings)
    away.rename(images)
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    capsys.readouterr()
    run = ln.finetune(tiny_llava, rows, **{**settings, "progress": True})
    assert "resuming from checkpoint-2" in capsys.readouterr().err
    assert run.status == "finished" and run.step == 6


def read_only(folder: Path, on: bool) -> None:
    """Make `folder` read-only for this process, for real: chmod, or for root (whom modes do
    not stop) the immutable attribute; the test is skipped where neither is possible."""
    if os.geteuid() != 0:
        folder.chmod(0o555 if on else 0o755)
        return
    done = subprocess.run(["chattr", "+i" if on else "-i", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot make a folder read-only here: {done.stderr.decode().strip()}")


def test_a_folder_that_turns_read_only_before_the_adapter_is_written(tiny_llava, tmp_path, capsys):
    """Not even the run file can say "failed": the error says what happened, and the next
    call says the last one ended without recording how, then writes the adapter."""
    out = tmp_path / "run"

    class ReadOnlyAtTheEnd(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            read_only(out, True)

    settings = dict(max_steps=2, output_dir=out, **{**SETTINGS, "batch_size": 2})
    try:
        with pytest.raises(FinetuneError, match=r"could not write the adapter in .* \(.*\); the "
                           "training is kept in checkpoint-2: free some"):  # fmt: skip
            ln.finetune(tiny_llava, squares(4), callbacks=[ReadOnlyAtTheEnd()], **settings)
    finally:
        read_only(out, False)
    assert json.loads((out / "llava_nb_run.json").read_text())["status"] == "running"
    assert not (out / "adapter_model.safetensors").exists()
    capsys.readouterr()
    run = ln.finetune(tiny_llava, squares(4), **{**settings, "progress": True})
    err = capsys.readouterr().err
    assert "the last call on " in err and "ended without recording how" in err
    assert "resuming from checkpoint-2" in err
    assert run.status == "finished" and (out / "adapter_model.safetensors").is_file()


BUSY = """
import sys, time
from PIL import Image
from transformers import TrainerCallback
import llava_nb as ln

class Busy(TrainerCallback):  # a long step, as a big model's
    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(600)

rows = [{"image": Image.new("RGB", (40, 40), "red"), "question": "Q?", "answer": "A."}] * 4
ln.finetune(sys.argv[1], rows, max_steps=2, batch_size=2, lr=5e-3, r=8, alpha=16, progress=False,
            output_dir=sys.argv[2], callbacks=[Busy()])
"""


def test_a_folder_another_process_is_training_in_is_refused(tiny_llava, tmp_path, capsys):
    """Two calls on one output_dir at once (the same cell run in two notebooks) trained over
    each other's checkpoints; once that process is gone, the next call says so and goes on."""
    import time

    out = tmp_path / "run"
    (tmp_path / "busy.py").write_text(BUSY)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    busy = subprocess.Popen([sys.executable, str(tmp_path / "busy.py"), tiny_llava, str(out)],
                            env=env, stderr=subprocess.DEVNULL)  # fmt: skip
    settings = dict(max_steps=2, output_dir=out, **{**SETTINGS, "batch_size": 2})
    rows = [{"image": Image.new("RGB", (40, 40), "red"), "question": "Q?", "answer": "A."}] * 4
    try:
        deadline = time.monotonic() + 120
        while not (out / "llava_nb_run.json").is_file():
            assert busy.poll() is None and time.monotonic() < deadline, "the busy run ended"
            time.sleep(0.2)
        record = json.loads((out / "llava_nb_run.json").read_text())
        assert record["pid"] == busy.pid and record.get("started") == process_start(busy.pid)
        with pytest.raises(FinetuneError, match=rf"output_dir '{out}' is in use: process "
                           rf"{busy.pid} on this machine is training there now; wait"):  # fmt: skip
            ln.finetune(tiny_llava, rows, **settings)
    finally:
        busy.kill()
        busy.wait()
    capsys.readouterr()
    run = ln.finetune(tiny_llava, rows, **{**settings, "progress": True})
    err = capsys.readouterr().err
    assert "ended without recording how" in err and "starting over (no checkpoint)" in err
    assert run.status == "finished" and run.step == 2


def process_start(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat: when the process started (None: not Linux)."""
    stat = Path(f"/proc/{pid}/stat")
    return int(stat.read_text().rpartition(")")[2].split()[19]) if stat.is_file() else None


def test_a_recorded_pid_now_used_by_another_process_is_not_in_use(tiny_llava, tmp_path, capsys):
    """The run file names the training process by its pid; once that process is gone, the pid
    can be given to an unrelated process, and the folder was refused as "in use" for good. The
    process's start time is recorded too: a live pid that started at another time is not it."""
    from llava_nb.training.train import _training_now

    out = tmp_path / "run"
    settings = dict(max_steps=2, output_dir=out, **{**SETTINGS, "batch_size": 2})
    rows = squares(4)
    ln.finetune(tiny_llava, rows, **settings)
    run_file = out / "llava_nb_run.json"
    finished = json.loads(run_file.read_text())
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        started = process_start(other.pid)
        if started is None:
            pytest.skip("no /proc/<pid>/stat here: the pid alone is recorded")

        def recorded(**process):
            run_file.write_text(json.dumps({**finished, "status": "running", **process}))

        here = {"pid": other.pid, "host": socket.gethostname()}
        recorded(**here, started=started)  # that process is training there: refused
        with pytest.raises(FinetuneError, match=rf"is in use: process {other.pid} on this"):
            ln.finetune(tiny_llava, rows, **settings)
        recorded(**here)  # a run file from before start times were recorded: the pid alone
        with pytest.raises(FinetuneError, match=rf"is in use: process {other.pid} on this"):
            ln.finetune(tiny_llava, rows, **settings)

        recorded(**here, started=started + 1)  # the pid is another process's now
        capsys.readouterr()
        run = ln.finetune(tiny_llava, rows, **{**settings, "progress": True})
        assert "ended without recording how" in capsys.readouterr().err
        assert run.status == "finished" and run.step == 2
    finally:
        other.kill()
        other.wait()
    assert _training_now({"status": "running", **here, "started": started}) is None  # gone


# ---------------------------------------------------------------- bad input


def test_bad_input_says_what_to_fix(tiny_llava, tmp_path):
    with pytest.raises(FinetuneError, match="no trainable rows"):
        ln.finetune(
            tiny_llava, [{"image": "missing.png", "answer": "x"}], output_dir=tmp_path / "a"
        )
    with pytest.raises(FinetuneError, match="unknown stage 'pretrain'"):
        ln.finetune(tiny_llava, squares(3), stage="pretrain")
    with pytest.raises(FinetuneError, match="unknown method"):
        ln.finetune(tiny_llava, squares(3), method="full")
    for name, value in (("batch_size", 0), ("batch_size", 1.5), ("max_steps", 1.5), ("r", 2.5),
                        ("save_every", 1.5), ("eval_every", "x"), ("eval_every", 0)):  # fmt: skip
        with pytest.raises(FinetuneError, match=f"{name} must be a whole number >= 1"):
            ln.finetune(tiny_llava, squares(3), output_dir=tmp_path / "a", **{name: value})
    with pytest.raises(FinetuneError, match="dropout must be a number in .0, 1."):
        ln.finetune(tiny_llava, squares(3), dropout=1.5)
    with pytest.raises(FinetuneError, match="lr must be a number > 0, got 'abc'"):
        ln.finetune(tiny_llava, squares(3), lr="abc")
    for seed in ("abc", -1, 2**32):
        with pytest.raises(FinetuneError, match=rf"seed must be a whole .* got {seed!r}"):
            ln.finetune(tiny_llava, squares(3), seed=seed)
    with pytest.raises(FinetuneError, match=r"'/proc/llava_nb/run' cannot be written \("):
        ln.finetune(tiny_llava, squares(3), output_dir="/proc/llava_nb/run")
    with pytest.raises(FinetuneError, match="output_dir must be a folder path, got None"):
        ln.finetune(tiny_llava, squares(3), output_dir=None)
    for text in ("{", "[]", '{"status": "finished"}'):
        (tmp_path / "run").mkdir(exist_ok=True)
        (tmp_path / "run" / "llava_nb_run.json").write_text(text)
        with pytest.raises(FinetuneError, match="is damaged; choose a new output_dir or delete"):
            ln.finetune(tiny_llava, squares(3), output_dir=tmp_path / "run")
    for callbacks in ("x", [print]):
        with pytest.raises(FinetuneError, match="callbacks must be transformers TrainerCallback"):
            ln.finetune(tiny_llava, squares(3), callbacks=callbacks)
    with pytest.raises(FinetuneError, match="group_by_length must be True or False, got 'no'"):
        ln.finetune(tiny_llava, squares(3), group_by_length="no")
    with pytest.raises(FinetuneError, match="progress must be True or False, got 'no'"):
        ln.finetune(tiny_llava, squares(3), progress="no")
    with pytest.raises(FinetuneError, match="no training data"):
        ln.finetune(tiny_llava)
    with pytest.raises(FinetuneError, match=r"unknown setting 'steps' \(did you mean max_steps"):
        ln.finetune(tiny_llava, squares(3), steps=3)
    with pytest.raises(FinetuneError, match="unknown setting 'image_folder'; .*ln.data.load"):
        ln.finetune(tiny_llava, "train.json", image_folder="images/")
    with pytest.raises(FinetuneError, match="unknown setting 'wibble'; the settings are model, "):
        ln.finetune(tiny_llava, squares(3), wibble=1)
    with pytest.raises(FinetuneError, match="fine-tuning needs local weights, not a server"):
        ln.finetune("openai:http://127.0.0.1:9/v1", squares(3))
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------- align, QLoRA


def test_align_trains_the_projector_and_optionally_the_vision_tower(tiny_llava, tmp_path):
    from transformers import LlavaForConditionalGeneration

    captions = [{"image": r["image"], "caption": r["answer"]} for r in squares(6)]
    run = ln.finetune(
        tiny_llava, captions, stage="align", train_vision=True, max_steps=3,
        output_dir=tmp_path / "align", **SETTINGS,
    )  # fmt: skip
    weights = load_file(tmp_path / "align" / "adapter_model.safetensors")
    base = LlavaForConditionalGeneration.from_pretrained(tiny_llava).state_dict()
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all((v == 0).all() for v in lora_b)  # the language model is untouched
    trained = {
        k.removeprefix("base_model.model."): v for k, v in weights.items() if "lora_" not in k
    }
    projector = [k for k in trained if "multi_modal_projector" in k]
    vision = [k for k in trained if "vision_tower" in k]
    assert projector and vision
    assert all(not torch.equal(trained[k], base[k]) for k in projector)
    assert any(not torch.equal(trained[k], base[k]) for k in vision)
    assert run.config["lr"] == 5e-3 and run.status == "finished"


def saved_modules(folder: Path, module: str) -> dict[str, torch.Tensor]:
    """The weights of `module` (saved whole) in an adapter file, by their names in the base."""
    weights = load_file(folder / "adapter_model.safetensors")
    named = {k.removeprefix("base_model.model."): v for k, v in weights.items()}
    return {k: v for k, v in named.items() if module in k and "lora_" not in k}


def test_instruct_starts_from_an_alignment_with_no_merge(run, tiny_llava, tmp_path):
    """Going from stage "align" to "instruct" needed ln.merge_adapter in between: the base given
    again started from its own projector, and the alignment was lost. Now the alignment's folder
    is the model to start from: the projector (and the vision tower it trained, kept frozen)
    goes on from there, and the result is still a plain PEFT adapter of the base."""
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    captions = [{"image": r["image"], "caption": r["answer"]} for r in squares(6)]
    ln.finetune(
        tiny_llava, captions, stage="align", train_vision=True, max_steps=3,
        output_dir=tmp_path / "align", **SETTINGS,
    )  # fmt: skip
    aligned = saved_modules(tmp_path / "align", "multi_modal_projector")
    aligned_vision = saved_modules(tmp_path / "align", "vision_tower")

    class FirstProjector(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.weights = {
                n.removeprefix("base_model.model.").replace(".modules_to_save.default", ""): p
                for n, p in model.named_parameters()
                if "multi_modal_projector.modules_to_save" in n
            }
            self.weights = {n: p.detach().clone() for n, p in self.weights.items()}

    first = FirstProjector()
    tuned = ln.finetune(
        tmp_path / "align", squares(8), max_steps=3, output_dir=tmp_path / "instruct",
        callbacks=[first], **SETTINGS,
    )  # fmt: skip
    assert first.weights.keys() == aligned.keys()
    assert all(torch.equal(first.weights[k], aligned[k]) for k in aligned)
    assert tuned.config["base"] == os.path.normpath(tiny_llava)
    assert tuned.config["train_vision"] is False and tuned.config["start"].startswith(
        f"{(tmp_path / 'align').resolve()} (sha256 "
    )
    projector = saved_modules(tmp_path / "instruct", "multi_modal_projector")
    assert any(not torch.equal(projector[k], aligned[k]) for k in aligned)  # trained on
    vision = saved_modules(tmp_path / "instruct", "vision_tower")
    assert vision.keys() == aligned_vision.keys()
    assert all(torch.equal(vision[k], aligned_vision[k]) for k in vision)  # carried, frozen

    plain = PeftModel.from_pretrained(
        LlavaForConditionalGeneration.from_pretrained(tiny_llava), tuned.adapter_path
    )
    loaded = plain.base_model.model.model
    for name, module in (("multi_modal_projector", loaded.multi_modal_projector),
                         ("vision_tower", loaded.vision_tower)):  # fmt: skip
        active = module.modules_to_save["default"].state_dict()
        saved = saved_modules(tmp_path / "instruct", name)
        assert all(torch.equal(active[k], saved[f"model.{name}.{k}"]) for k in active)
    again = ln.finetune(tmp_path / "align", squares(8), max_steps=3,
                        output_dir=tmp_path / "instruct", **SETTINGS)  # fmt: skip
    assert again.status == "finished"  # the same start: the finished run is found

    with pytest.raises(FinetuneError, match=r"holds a stage 'instruct' adapter, which a new run "
                       r"cannot start from; merge it first"):  # fmt: skip
        ln.finetune(run.adapter_path, squares(4), output_dir=tmp_path / "x", **SETTINGS)


def test_group_by_length_batches_similar_lengths_in_random_order(tiny_llava, tmp_path, monkeypatch):
    import random

    from llava_nb.training.collate import Collator

    batches = []
    collate = Collator.__call__

    def recording(self, items):
        batches.append(sorted(len(item["input_ids"]) for item in items))
        return collate(self, items)

    monkeypatch.setattr(Collator, "__call__", recording)
    rows = [  # answers of one to four sentences
        {**row, "answer": " ".join([row["answer"]] * (1 + i % 4))}
        for i, row in enumerate(squares(64))
    ]
    run = ln.finetune(
        tiny_llava, rows, max_steps=16, group_by_length=True, output_dir=tmp_path / "grouped",
        **SETTINGS,
    )  # fmt: skip
    assert run.status == "finished" and run.config["group_by_length"] is True
    batches = batches[:16]  # one epoch (the trainer may fetch a batch ahead)
    lengths = [n for batch in batches for n in batch]
    assert len(lengths) == 64

    def spread(groups) -> float:  # the mean length range within a batch: padding
        return sum(g[-1] - g[0] for g in groups) / len(groups)

    shuffle = random.Random(0).sample
    random_spread = (
        sum(
            spread([sorted(s[i : i + 4]) for i in range(0, 64, 4)])
            for s in (shuffle(lengths, 64) for _ in range(200))
        )
        / 200
    )
    assert spread(batches) < random_spread / 2
    # transformers sorts each "megabatch" (here 4 batches) longest first; llava_nb shuffles the
    # batches, so the lengths do not drift down within each run of 4 steps
    maxima = [batch[-1] for batch in batches]
    runs = [maxima[i : i + 4] for i in range(0, 16, 4)]
    assert any(run != sorted(run, reverse=True) for run in runs)


def test_projector_lr_sets_the_projectors_own_rate(tiny_llava, tmp_path):
    from transformers import LlavaForConditionalGeneration

    base = LlavaForConditionalGeneration.from_pretrained(tiny_llava).state_dict()

    def changes(name: str, **extra) -> tuple:
        """The run, and how far the projector and LoRA moved in 3 steps (largest entry)."""
        run = ln.finetune(
            tiny_llava, squares(12), max_steps=3, output_dir=tmp_path / name, **SETTINGS, **extra
        )
        weights = load_file(tmp_path / name / "adapter_model.safetensors")
        projector = max(
            float((v - base[k.removeprefix("base_model.model.")]).abs().max())
            for k, v in weights.items()
            if "multi_modal_projector" in k
        )
        lora = max(float(v.abs().max()) for k, v in weights.items() if "lora_B" in k)
        return run, projector, lora

    plain, projector, lora = changes("plain")
    slow, slow_projector, slow_lora = changes("slow", projector_lr=SETTINGS["lr"] / 1000)
    assert (
        slow.config["projector_lr"] == SETTINGS["lr"] / 1000 and "projector_lr" not in plain.config
    )
    assert 0 < slow_projector < projector / 100  # Adam's steps scale with the rate
    assert slow_lora > lora / 2  # LoRA keeps its own
    with pytest.raises(FinetuneError, match="projector_lr must be a number > 0, got 0"):
        ln.finetune(tiny_llava, squares(3), projector_lr=0)


@pytest.mark.parametrize("checkpoint", ["tiny_llava", "tiny_llava_next"])
def test_the_loss_reads_logits_only_where_labels_are(checkpoint, request):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from llava_nb.data import load
    from llava_nb.training.collate import IGNORE, Collator, TrainingSet
    from llava_nb.training.train import _labelled_logits_only

    path = request.getfixturevalue(checkpoint)
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    rows = [{**row, "answer": " ".join([row["answer"]] * (1 + i))}
            for i, row in enumerate(squares(3))]  # fmt: skip
    dataset = TrainingSet(processor, load(rows), [0, 1, 2])
    batch = Collator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(3)])
    labelled = int((batch["labels"][:, 1:] != IGNORE).sum())
    full, trimmed = model(**batch), model(**_labelled_logits_only(batch))
    assert trimmed.logits.shape == (labelled, full.logits.shape[-1])
    assert labelled < batch["labels"].numel() / 2  # image and prompt tokens never reach the head
    torch.testing.assert_close(trimmed.loss, full.loss, rtol=1e-6, atol=1e-6)
    total = torch.tensor(labelled)  # the Trainer's count over accumulated batches
    torch.testing.assert_close(
        model(**_labelled_logits_only(batch), num_items_in_batch=total).loss,
        model(**batch, num_items_in_batch=total).loss, rtol=1e-6, atol=1e-6,
    )  # fmt: skip


def test_qlora_trains_a_4bit_base(tiny_llava, tmp_path):
    from peft import PeftModel
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    run = ln.finetune(
        tiny_llava, squares(8), squares(3, offset=8), method="qlora", max_steps=8, eval_every=8,
        output_dir=tmp_path / "qlora", **SETTINGS,
    )  # fmt: skip
    assert run.metrics["eval_loss"] < run.metrics["first_eval_loss"] - 0.2
    weights = load_file(Path(run.adapter_path) / "adapter_model.safetensors")
    lora_b = {k: v for k, v in weights.items() if "lora_B" in k}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values())  # every layer learned
    base = LlavaForConditionalGeneration.from_pretrained(tiny_llava)
    batch = inputs(AutoProcessor.from_pretrained(tiny_llava), "red")
    before = logits(base, batch)
    tuned = PeftModel.from_pretrained(base, run.adapter_path).eval()
    assert not torch.allclose(logits(tuned, batch), before, atol=1e-3)


def test_qlora_evaluation_leaves_training_as_it_was(tiny_llava, tmp_path):
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit layer the first time it runs
    without gradients (an evaluation), and its repacked form has no backward: the training
    after the first evaluation went on with wrong gradients."""
    losses = {}
    for name, held_out in (("without", None), ("with", squares(3, offset=8))):
        run = ln.finetune(
            tiny_llava, squares(8), held_out, method="qlora", max_steps=6, eval_every=2,
            dropout=0.0, output_dir=tmp_path / name, **SETTINGS,
        )  # fmt: skip
        losses[name] = [round(h["loss"], 5) for h in run.history if "loss" in h]
    assert len(losses["with"]) == 6 and losses["with"] == losses["without"]


# ---------------------------------------------------------------- several processes


SCRIPT = """
import atexit, os, sys
import torch.distributed as dist
from PIL import Image
import llava_nb as ln
say = lambda line: os.write(1, (line + "\\n").encode())  # one write: the ranks share stdout
atexit.register(lambda: say(f"AT EXIT process group alive: {dist.is_initialized()}"))
rows = [{"image": Image.new("RGB", (40, 40), c), "question": "Color?", "answer": f"It is {c}."}
        for c in ["red", "green", "blue", "red"] * 4]
run = ln.finetune(sys.argv[1], rows, max_steps=None, epochs=1, batch_size=2, lr=5e-3,
                  output_dir=sys.argv[2])
saved = os.path.isfile(os.path.join(run.adapter_path, "adapter_model.safetensors"))
say(f"RESULT {run.status} {run.step} {run.max_steps} {'saved' if saved else 'not saved yet'}")
"""


def test_two_processes_with_accelerate_launch(tiny_llava, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(script), tiny_llava, str(tmp_path / "out"),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    # 16 rows, 2 per process per step, 2 processes: 4 steps (one process would take 8). The two
    # processes share one stdout, so a RESULT may land inside the other's progress line. Each
    # process returns once rank 0 has saved the adapter (one that exits first may abort the
    # saving one), and the process group is gone before interpreter shutdown (left to it, gloo's
    # threads can abort the process).
    assert done.stdout.count("RESULT") == done.stdout.count("RESULT finished 4 4 saved") == 2
    assert done.stdout.count("AT EXIT process group alive: False") == 2
    progress = [line for line in done.stdout.splitlines() if line.startswith("llava_nb: step")]
    assert progress and progress[-1].startswith("llava_nb: step 4/4")  # printed once, by rank 0
    assert len(progress) == len(set(progress)) or len(progress) <= 3
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------- the cell magic


@pytest.fixture(scope="module")
def shell(tmp_path_factory):
    from IPython.core.interactiveshell import InteractiveShell

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IPYTHONDIR", str(tmp_path_factory.mktemp("ipython")))
        shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "llava_nb")
    return shell


def test_finetune_cell_magic(shell, tiny_llava, tmp_path, capsys):
    shell.user_ns["rows"] = squares(4)
    shell.run_line_magic("llava", f"config model='{tiny_llava}'")
    body = (
        f"data: $rows\nmax_steps: 2\nbatch_size: 2\nprogress: false\noutput_dir: {tmp_path / 'm'}\n"
    )
    shell.run_cell_magic("llava_finetune", "-o tuned", body)
    run = shell.user_ns["tuned"]
    assert run.status == "finished" and run.step == 2 and run.config["base"] == tiny_llava
    assert capsys.readouterr().err == ""

    for bad, message in (
        ("data: $rows\nlr: 1e-3\nbatch_size: 1.5", "llava_nb: batch_size must be a whole numb"),
        ("data: [unclosed", "llava_nb: %%llava_finetune: the body is not valid YAML at line 1"),
        ("data: $nothing", "llava_nb: %%llava_finetune: no notebook variable named 'nothing'"),
        (
            "data: x.json\nsteps: 3",
            "llava_nb: %%llava_finetune: unknown key 'steps' (did you mean max_",
        ),
        ("data: $rows\n[a, b]: 3", "llava_nb: %%llava_finetune: line 2 has no key name; use key:"),
        ("data: $rows\nr: 4\nr: 8", "llava_nb: %%llava_finetune: 'r' is set twice (line 3); keep"),
        ("max_steps: 3", "llava_nb: %%llava_finetune: no data; add a line data: train.json"),
    ):
        assert shell.run_cell_magic("llava_finetune", "", bad) is None
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and err.startswith(message), err


def test_finetune_cell_uses_the_model_its_body_names(shell, tiny_llava, monkeypatch, capsys):
    import llava_nb.models as models

    monkeypatch.setattr(models, "_fallback_noticed", [])  # the demo notice would show again
    monkeypatch.delenv("LLAVA_NB_MODEL", raising=False)
    shell.run_line_magic("llava", "config model=''")  # no %llava model: the default's lookup
    shell.user_ns["rows"] = squares(4)
    body = f"model: {tiny_llava}\ndata: $rows\nbatch_size: 1.5"
    shell.run_cell_magic("llava_finetune", "", body)
    err = capsys.readouterr().err  # the bad setting, and no word of a default model
    assert err.startswith("llava_nb: batch_size must be") and len(err.splitlines()) == 1, err


# ---------------------------------------------------------------- the example notebook


def test_finetune_notebook_runs_offline(tmp_path):
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient

    path = ROOT / "examples" / "04_finetune.ipynb"
    nb = nbformat.read(path, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env["IPYTHONDIR"] = str(tmp_path / "ipython")
    env.pop("LLAVA_NB_MODEL", None)
    manager = AsyncKernelManager(
        kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[])
    )
    client = NotebookClient(
        nb,
        km=manager,
        timeout=300,
        allow_errors=False,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute(env=env)
    assert [p.name for p in tmp_path.iterdir()] == ["ipython"]  # everything else in a temp dir

    def texts(cell, kind):
        return [o for o in cell.outputs if o.output_type == kind]

    for cell in code:
        assert not texts(cell, "error")
        for output in texts(cell, "stream"):
            assert "Traceback" not in output.text and "{'loss'" not in output.text, output.text
    by_source = {cell.source.splitlines()[0]: cell for cell in code}

    report = texts(by_source["data.validate(MODEL)"], "execute_result")[0]
    assert "25 rows: 24 usable, 1 skipped" in report.data["text/markdown"]

    # the progress: one display, updated in place to the end, with the loss curve
    training = by_source["run = ln.finetune("]
    (shown,) = texts(training, "display_data")
    html = shown.data["text/html"]
    assert "step 150/150" in html and "eval loss" in html and "data:image/png;base64" in html
    assert "FinetuneRun(" in texts(training, "execute_result")[0].data["text/plain"]

    metrics = by_source['run.metrics["first_eval_loss"], run.metrics["eval_loss"]']
    first, last = ast.literal_eval(texts(metrics, "execute_result")[0].data["text/plain"])
    assert last < first

    comparison = texts(
        by_source["ln.compare(MODEL, run.adapter_path, held_out, max_new_tokens=12)"],
        "execute_result",
    )[0]
    assert "<table>" in comparison.data["text/html"]
    # 150 steps teach the tiny model the colours: the tuned chat names the blue square's
    tuned = texts(by_source["chat = ln.Chat(MODEL, max_new_tokens=12)"], "execute_result")[0]
    assert "It is blue." in json.dumps(tuned.data)
    aligned = texts(by_source["%%llava_finetune"], "execute_result")[0].data["text/plain"]
    assert "finished, step=3/3" in aligned
    assert not [o for o in by_source["%%llava_finetune"].outputs if o.get("name") == "stderr"]
    instructed = by_source["instructed = ln.finetune("]  # stage 2 from the alignment's folder
    assert "finished, step=3/3" in texts(instructed, "execute_result")[0].data["text/plain"]
