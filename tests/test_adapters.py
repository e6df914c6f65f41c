"""Adapters made elsewhere, with plain peft, on the tiny checkpoints of both LLaVA families:
each kind llava_nb takes answers in a chat, in compare and merged exactly as plain peft does;
the kinds it cannot take are refused with one line before any model loads."""

from __future__ import annotations

import json

import pytest
from PIL import Image

import llava_nb as ln
from llava_nb.training.adapters import AdapterError

from .test_chat import plain_greedy_answer, user_message

QUESTION = "What is in the picture?"
PICTURE = Image.new("RGB", (40, 30), (200, 30, 30))
TOKENS = 6
LANGUAGE = r".*language_model.*\.(q_proj|v_proj)"


def peft_config(kind: str):
    """A fresh peft config of `kind` (peft fills in a config when it is used)."""
    import peft

    return {
        "dora": lambda: peft.LoraConfig(r=4, target_modules=LANGUAGE, use_dora=True),
        "rslora": lambda: peft.LoraConfig(r=4, target_modules=LANGUAGE, use_rslora=True),
        "projector_saved": lambda: peft.LoraConfig(
            r=4, target_modules=LANGUAGE, modules_to_save=["multi_modal_projector"]
        ),
        # transformers 5: also the vision tower's and the projector's linear layers
        "all_linear": lambda: peft.LoraConfig(r=4, target_modules="all-linear"),
        "ia3": lambda: peft.IA3Config(
            target_modules=r".*language_model.*\.(k_proj|v_proj|down_proj)",
            feedforward_modules=r".*language_model.*\.down_proj",
        ),
        "loha": lambda: peft.LoHaConfig(r=4, target_modules=LANGUAGE),
        "lokr": lambda: peft.LoKrConfig(r=4, target_modules=LANGUAGE),
        "adalora": lambda: peft.AdaLoraConfig(init_r=4, target_modules=LANGUAGE, total_step=10),
        "vera": lambda: peft.VeraConfig(r=4, target_modules=LANGUAGE),
        "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    }[kind]()


SWAPPABLE = ["dora", "rslora", "projector_saved", "all_linear", "ia3", "loha", "lokr", "adalora"]


def load(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path).eval()


def make_adapter(base, kind: str, folder, seed: int = 0):
    """What a user brings: a plain peft adapter of `kind` on `base`, its weights moved off their
    start (which for most kinds leaves the model unchanged)."""
    import torch
    from peft import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(load(base), peft_config(kind))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.3)
    model.save_pretrained(folder)
    return folder


def plain_answer(model, base) -> str:
    from transformers import AutoProcessor

    messages = [user_message(QUESTION, [PICTURE])]
    return plain_greedy_answer(model, AutoProcessor.from_pretrained(base), messages, TOKENS)


def plain_peft_answer(base, folder) -> str:
    from peft import PeftModel

    return plain_answer(PeftModel.from_pretrained(load(base), folder).eval(), base)


@pytest.fixture(scope="module")
def shared_models():
    """One loaded model per base for the whole file: adapters pile up on it, as in a notebook."""
    models: dict[str, ln.Model] = {}
    yield lambda base: models.setdefault(base, ln.Model(base))
    for model in models.values():
        model.unload()


@pytest.mark.parametrize("kind", SWAPPABLE)
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_a_plain_peft_adapter_answers_as_plain_peft(family, kind, request, tmp_path, shared_models):
    base = request.getfixturevalue(f"tiny_{family}")
    folder = make_adapter(base, kind, tmp_path / kind)
    tuned, untuned = plain_peft_answer(base, folder), plain_answer(load(base), base)
    assert tuned != untuned  # the adapter really acts
    model = shared_models(base)

    chat = ln.Chat(model, max_new_tokens=TOKENS)
    chat.use_adapter(folder)
    assert chat.ask(QUESTION, PICTURE) == tuned
    chat.reset()
    chat.use_adapter(None)
    assert chat.ask(QUESTION, PICTURE) == untuned

    table = ln.compare(model, folder, [(QUESTION, PICTURE)], max_new_tokens=TOKENS)
    assert (table.rows[0]["base"], table.rows[0]["tuned"]) == (untuned.strip(), tuned.strip())
    merged = ln.merge_adapter(model, folder, tmp_path / "merged")
    assert plain_answer(load(merged), base) == tuned


def test_a_projector_saved_whole_and_a_lora_in_it_take_turns_on_one_model(tiny_llava, tmp_path):
    """PEFT cannot hold a LoRA layer inside a module another adapter saves whole (nor the
    reverse): the adapters loaded make way, and load again when next used."""
    saved = make_adapter(tiny_llava, "projector_saved", tmp_path / "saved")
    everywhere = make_adapter(tiny_llava, "all_linear", tmp_path / "everywhere")
    expected = {f: plain_peft_answer(tiny_llava, f) for f in (saved, everywhere)}
    chat = ln.Chat(ln.Model(tiny_llava), max_new_tokens=TOKENS)
    for folder in (saved, everywhere, saved, everywhere):
        chat.reset()
        chat.use_adapter(folder)
        assert chat.ask(QUESTION, PICTURE) == expected[folder]
    chat.reset()
    chat.use_adapter(None)
    assert chat.ask(QUESTION, PICTURE) == plain_answer(load(tiny_llava), tiny_llava)


def test_an_adapter_trained_again_after_making_way_answers_with_its_new_weights(
    tiny_llava, tmp_path
):
    """The conversation's cache was computed with the old weights: it must not be reused."""
    from peft import PeftModel
    from transformers import AutoProcessor

    saved = make_adapter(tiny_llava, "projector_saved", tmp_path / "saved")
    everywhere = make_adapter(tiny_llava, "all_linear", tmp_path / "everywhere")
    model = ln.Model(tiny_llava)
    chat = ln.Chat(model, max_new_tokens=TOKENS)
    chat.use_adapter(saved)
    first = chat.ask(QUESTION, PICTURE)
    ln.Chat(model).use_adapter(everywhere)  # `saved` makes way
    make_adapter(tiny_llava, "projector_saved", saved, seed=1)  # trained again, in place
    messages = [
        user_message(QUESTION, [PICTURE]),
        {"role": "assistant", "content": [{"type": "text", "text": first}]},
        user_message("And now?", []),
    ]
    tuned = PeftModel.from_pretrained(load(tiny_llava), saved).eval()
    processor = AutoProcessor.from_pretrained(tiny_llava)
    assert chat.ask("And now?") == plain_greedy_answer(tuned, processor, messages, TOKENS)


def test_vera_is_refused_before_the_model_loads_and_merges(tiny_llava, tmp_path):
    """VeRA's layers share state that only a wrapped peft model holds: no hot swap, but a
    merge works."""
    folder = make_adapter(tiny_llava, "vera", tmp_path / "vera")
    model = ln.Model(tiny_llava)
    message = r"is a VERA adapter, .* merge it \(ln.merge_adapter\) .*: LoRA .*, LoHa, LoKr, IA3"
    with pytest.raises(AdapterError, match=message) as error:
        ln.Chat(model).use_adapter(folder)
    assert "\n" not in str(error.value)
    with pytest.raises(AdapterError, match=message):
        ln.compare(model, folder, [QUESTION])
    assert not model.loaded
    merged = ln.merge_adapter(model, folder, tmp_path / "merged")
    assert plain_answer(load(merged), tiny_llava) == plain_peft_answer(tiny_llava, folder)


def test_prompt_tuning_is_refused_before_the_model_loads(tiny_llava, tmp_path):
    folder = make_adapter(tiny_llava, "prompt", tmp_path / "prompt")
    model = ln.Model(tiny_llava)
    message = r"is a PROMPT_TUNING adapter: .* kinds llava_nb takes: LoRA .*, LoHa, LoKr, IA3"
    with pytest.raises(AdapterError, match=message) as error:
        ln.Chat(model).use_adapter(folder)
    assert "\n" not in str(error.value)
    assert not model.loaded
    with pytest.raises(AdapterError, match=message):
        ln.merge_adapter(model, folder, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_a_kind_with_no_4bit_layers_is_refused_on_a_4bit_model(kind, tiny_llava, tmp_path):
    """peft would build LoHa and LoKr layers from the packed weights' shapes: a misleading
    "another base model" (LoHa) or a traceback when asked (LoKr)."""
    folder = make_adapter(tiny_llava, kind, tmp_path / kind)
    chat = ln.Chat(ln.Model(tiny_llava, quantization="4bit"), max_new_tokens=TOKENS)
    base_answer = chat.ask(QUESTION, PICTURE)
    message = (
        f"'{folder}' is a {kind.upper()} adapter, which peft cannot put on 4-bit weights; load "
        r"the model with quantization='none', or merge the adapter \(ln.merge_adapter\)"
    )
    with pytest.raises(AdapterError, match=message):
        chat.use_adapter(folder)
    chat.reset()
    assert chat.adapter is None and chat.ask(QUESTION, PICTURE) == base_answer


def test_a_llava_next_adapter_is_refused_on_a_llava_1_5_model(
    tiny_llava, tiny_llava_next, tmp_path
):
    """Its shapes fit (plain peft loads it without a word), but it was trained on another
    family's model: peft recorded that model's class in adapter_config.json."""
    folder = make_adapter(tiny_llava_next, "dora", tmp_path / "next")
    message = (
        f"adapter '{folder}' was built for a LLaVA-NeXT model \\({tiny_llava_next}\\), not this "
        "LLaVA-1.5 one; use it with that model"
    )
    chat = ln.Chat(ln.Model(tiny_llava), max_new_tokens=TOKENS)
    with pytest.raises(AdapterError, match=message):
        chat.use_adapter(folder)
    assert chat.adapter is None and not hasattr(chat.model.model, "peft_config")
    with pytest.raises(AdapterError, match=message):
        ln.merge_adapter(tiny_llava, folder, tmp_path / "merged")


def test_an_adapter_naming_another_base_of_its_family_loads(tiny_llava, tmp_path):
    """The base's name is where it was trained (a hub id, another machine's folder), not a
    check: the same family and shapes is enough, as for plain peft."""
    folder = make_adapter(tiny_llava, "rslora", tmp_path / "renamed")
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "base_model_name_or_path": "someone/llava-7b"}))
    chat = ln.Chat(ln.Model(tiny_llava), max_new_tokens=TOKENS)
    chat.use_adapter(folder)
    assert chat.ask(QUESTION, PICTURE) == plain_peft_answer(tiny_llava, folder)
