"""Model: lazy loading, status, unload, quantization, errors, and the generation worker."""

import gc
import json
import os
import sys
import threading
import time
import weakref

import pytest

from llava_nb.errors import LlavaError
from llava_nb.models import (
    REGISTRY,
    GenerationError,
    Model,
    ModelError,
    default_model_id,
    get_model,
)
from tests.conftest import holding_lock, interrupt_in_unload


def _question(text="What is in this picture?", image=None):
    content = [{"type": "image", "image": image}] if image is not None else []
    return [{"role": "user", "content": [*content, {"type": "text", "text": text}]}]


def test_registry_lists_the_llava_hf_checkpoints():
    assert {
        "llava-hf/llava-1.5-7b-hf",
        "llava-hf/llava-1.5-13b-hf",
        "llava-hf/llava-v1.6-mistral-7b-hf",
        "llava-hf/llava-v1.6-vicuna-7b-hf",
        "llava-hf/llava-v1.6-vicuna-13b-hf",
        "llava-hf/llava-v1.6-34b-hf",
    } <= set(REGISTRY)
    assert REGISTRY["llava-hf/llava-1.5-7b-hf"].family == "llava"
    assert (
        REGISTRY["llava-hf/llava-v1.6-34b-hf"].fp16_gb
        > REGISTRY["llava-hf/llava-1.5-13b-hf"].fp16_gb
    )


def test_default_model_comes_from_the_environment(monkeypatch):
    import llava_nb.models

    monkeypatch.delenv("LLAVA_NB_MODEL", raising=False)
    # where LLaVA-1.5-7B is cached or the hub answers (offline, tests/test_demo.py: the demo)
    monkeypatch.setattr(llava_nb.models, "_default_available", lambda: True)
    assert default_model_id() == "llava-hf/llava-1.5-7b-hf"
    monkeypatch.setenv("LLAVA_NB_MODEL", "/some/folder")
    assert Model().model_id == "/some/folder"


def test_model_is_lazy(tiny_llava):
    model = Model(tiny_llava)
    assert model.model is None
    assert model.status()["state"] == "unloaded"
    assert model.status()["memory"] == 0


def test_load_status_and_unload_frees_the_weights(tiny_llava, capsys):
    model = Model(tiny_llava).load()
    assert "loading" in capsys.readouterr().out  # progress is shown
    status = model.status()
    assert status["state"] == "loaded"
    assert status["family"] == "LLaVA-1.5"
    assert status["device"] == "cpu"
    assert status["dtype"] == "float32"
    assert status["quantization"] == "none"  # auto picks none on the CPU
    assert status["memory"] >= sum(p.numel() * 4 for p in model.model.parameters())
    weights = weakref.ref(model.model)
    model.unload()
    gc.collect()
    assert weights() is None, "something still holds the unloaded weights"
    assert model.status() | {"model": None} == {
        "state": "unloaded",
        "model": None,
        "family": None,
        "device": "cpu",
        "dtype": None,
        "quantization": "auto",
        "memory": 0,
    }


def test_llava_next_family(tiny_llava_next):
    assert Model(tiny_llava_next).load().status()["family"] == "LLaVA-NeXT"


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantized_loading_keeps_vision_projector_and_head_unquantized(
    tiny_llava, bits, photo, monkeypatch
):
    import threading

    import torch
    import transformers

    loaded_on = []  # the thread each from_pretrained ran on
    real = transformers.AutoModelForImageTextToText.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        loaded_on.append(threading.current_thread())
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(
        transformers.AutoModelForImageTextToText, "from_pretrained", classmethod(from_pretrained)
    )
    full = Model(tiny_llava).load()
    model = Model(tiny_llava, quantization=bits).load()
    # every load runs on a thread of its own: a CPU quantizing load's OpenMP pool ends with it
    assert [thread.name for thread in loaded_on] == ["llava_nb-load"] * 2
    assert not any(thread.is_alive() for thread in loaded_on)
    quantized = type(model.model.model.language_model.layers[0].self_attn.q_proj).__name__
    assert quantized == {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}[bits]
    vision_q = model.model.model.vision_tower.encoder.layers[0].self_attn.q_proj
    for kept in (vision_q, model.model.model.multi_modal_projector.linear_1, model.model.lm_head):
        assert type(kept) is torch.nn.Linear
    assert model.status()["quantization"] == bits
    assert model.status()["memory"] < full.status()["memory"]
    answer = model.generate(_question(image=photo), max_new_tokens=5).wait()
    assert isinstance(answer, str)
    weights = weakref.ref(model.model)
    model.unload()
    gc.collect()
    assert weights() is None


def test_unknown_hub_id_fails_fast_with_a_fix(monkeypatch):
    """Offline, a missing hub id is refused from the cache at once, not after the hub's
    retries. The libraries are imported first: a first import of torch alone can take longer
    than the bound on a busy machine."""
    import transformers.models.llava.modeling_llava  # noqa: F401

    start = time.perf_counter()
    with pytest.raises(ModelError, match="not in the local Hugging Face cache.*local checkpoint"):
        Model("nobody/no-such-llava").load()
    assert time.perf_counter() - start < 10
    for name in ("my llava", "org/bad--name"):  # neither a folder nor a hub id
        with pytest.raises(ModelError, match=f"'{name}' is neither a model folder nor a hub id"):
            Model(name).load()


def test_missing_folder_and_non_llava_checkpoints(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        Model(str(tmp_path / "nope" / "x")).load()
    with pytest.raises(ModelError, match="no config.json"):
        Model(str(tmp_path)).load()
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, num_hidden_layers=1).save_pretrained(tmp_path / "llama")
    model = Model(str(tmp_path / "llama"))
    with pytest.raises(ModelError, match="'llama' model, not LLaVA"):
        model.load()
    assert model.status()["state"] == "unloaded"
    config = json.loads((tmp_path / "llama" / "config.json").read_text())
    (tmp_path / "llama" / "config.json").write_text(json.dumps({**config, "hidden_size": 65}))
    with pytest.raises(ModelError, match="config.json in .* cannot be read .*hidden size .65."):
        Model(str(tmp_path / "llama")).load()  # the config's own checks: not a ValueError


def _damaged(tiny_llava, folder, damage):
    import shutil

    shutil.copytree(tiny_llava, folder)
    damage(folder)
    return str(folder)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "config.json").write_text("{not json"), "config.json in .* cannot be read"),
        (lambda f: (f / "config.json").write_text("{}"), "config.json in .* cannot be read"),
        (lambda f: (f / "model.safetensors").unlink(), "cannot be loaded .*complete checkpoint"),
        (
            lambda f: (f / "model.safetensors").write_bytes(
                (f / "model.safetensors").read_bytes()[:5000]
            ),
            "cannot be loaded .*complete checkpoint",
        ),  # half a download
        (lambda f: (f / "tokenizer.json").unlink(), "cannot be loaded .*complete checkpoint"),
    ],
)
def test_a_damaged_checkpoint_folder_gets_one_line(tiny_llava, tmp_path, damage, message):
    model = Model(_damaged(tiny_llava, tmp_path / "damaged", damage))
    with pytest.raises(ModelError, match=message) as error:
        model.load()
    assert len(str(error.value).splitlines()) == 1
    assert model.status()["state"] == "unloaded"


def test_a_file_is_not_a_model_folder(photo, tmp_path):
    image = tmp_path / "photo.jpg"
    photo.save(image)
    with pytest.raises(ModelError, match="is a file; pass the checkpoint's folder"):
        Model(str(image)).load()


def test_a_name_too_long_for_a_path_gets_one_line():
    with pytest.raises(ModelError, match="is not a usable path .File name too long") as error:
        Model("a" * 300).load()
    assert len(str(error.value)) < 200


def test_bad_quantization_is_refused():
    with pytest.raises(ModelError, match="unknown quantization '3bit'"):
        Model("x", quantization="3bit")


def test_get_model_shares_one_instance_per_id(tiny_llava):
    assert get_model(tiny_llava) is get_model(tiny_llava)
    assert get_model(tiny_llava, quantization="4bit") is not get_model(tiny_llava)
    model = Model(tiny_llava)
    assert get_model(model) is model


def test_streamed_pieces_add_up_to_the_answer(tiny_llava, photo):
    generation = Model(tiny_llava).generate(_question(image=photo), max_new_tokens=30)
    pieces = list(generation)
    assert generation.done and not generation.stopped
    assert "".join(pieces) == generation.text
    assert len(generation.token_ids) == 30 or generation.token_ids[-1] == 2  # length or </s>


BYTE_FALLBACK_WORDS = ["▁Hello", "▁world", "x", "▁again"]


def _byte_fallback_tokenizer():
    """A tokenizer that decodes as Llama's (llava-1.5's) does: "<0xE2>" tokens are bytes, and a
    run of them holding an invalid byte decodes to U+FFFD for every byte of the run."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tokens = special + [f"<0x{b:02X}>" for b in range(256)] + BYTE_FALLBACK_WORDS
    vocab = {token: i for i, token in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>")
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
         decoders.Strip(" ", 1, 0)]
    )  # fmt: skip
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
    )  # fmt: skip


@pytest.fixture(scope="module")
def stray_byte_llava(tmp_path_factory) -> str:
    """A tiny LLaVA with a byte-fallback tokenizer that always answers "Hello world€", one
    stray byte pair (E2 41), then "x again": decoded whole, the stray bytes turn the € before
    them into U+FFFD too."""
    from llava_nb.testing import llava_parts

    tok = _byte_fallback_tokenizer()
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, image_size=32, patch_size=8)  # fmt: skip
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=1024)  # fmt: skip
    model_class, config, processor = llava_parts("llava", tok, vision, text)
    model = model_class(config)
    ids = tok.convert_tokens_to_ids
    answer = ids(["▁Hello", "▁world", "<0xE2>", "<0x82>", "<0xAC>", "<0xE2>", "<0x41>", "x",
                  "▁again", "</s>"])  # fmt: skip
    # the first token always a little likelier; each next one far likelier after its two
    bias = [[[answer[0]], 50.0]]
    bias += [[answer[i - 2 : i + 1], 1000.0] for i in range(2, len(answer))]
    bias += [[answer[0:2], 1000.0]]
    model.generation_config.sequence_bias = bias
    model.generation_config.pad_token_id = tok.pad_token_id
    path = tmp_path_factory.mktemp("stray") / "llava"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def test_streamed_pieces_survive_a_decode_that_rewrites_earlier_text(stray_byte_llava):
    """Decoded whole, "Hello world€" became "Hello world�����x again" once a stray byte came:
    no later decode began with what was shown, and streaming stopped for good (" again" and
    the rest never came, and the chat kept text the stream never showed)."""
    generation = Model(stray_byte_llava).generate(_question("Hi?"), max_new_tokens=20)
    pieces = list(generation)
    assert generation._decode(generation.token_ids) == "Hello world�����x again"  # the setup
    assert "".join(pieces) == generation.text == "Hello world€��x again"
    assert pieces[:3] == ["Hello", " world", "€"]


def test_stop_ends_generation_within_a_token_or_two(tiny_llava):
    generation = Model(tiny_llava).generate(_question(), max_new_tokens=900)
    pieces = iter(generation)
    while len(generation.token_ids) < 3:
        next(pieces)
    seen = len(generation.token_ids)
    pieces.close()  # what leaving a loop early, or KeyboardInterrupt, does
    assert generation.stopped
    assert seen <= len(generation.token_ids) <= seen + 2
    assert generation.text.startswith(
        generation._decode(generation.token_ids[:seen]).rstrip("\ufffd")
    )


def test_sampling_is_reproducible_with_a_seed(tiny_llava):
    model = Model(tiny_llava)
    settings = {"max_new_tokens": 20, "temperature": 1.0, "top_p": 0.9}
    a = model.generate(_question(), seed=7, **settings).wait()
    b = model.generate(_question(), seed=7, **settings).wait()
    c = model.generate(_question(), seed=8, **settings).wait()
    assert a == b
    assert a != c
    greedy = model.generate(_question(), max_new_tokens=20).wait()
    for tiny in (1e-300, 5e-324, 1e-6):  # would overflow the logits: greedy, as in vLLM
        assert model.generate(_question(), max_new_tokens=20, temperature=tiny).wait() == greedy


def test_a_seeded_answer_leaves_the_callers_random_numbers_alone(tiny_llava):
    """`seed=` reseeded torch's global generator: a notebook's own random numbers after a
    seeded question changed. They stay as they were; the answer is still `generate`'s after
    `torch.manual_seed(seed)`, as the README promises."""
    import torch

    from llava_nb.chat import Chat

    settings = {"max_new_tokens": 20, "temperature": 1.0, "top_p": 0.9}
    chat = Chat(tiny_llava)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    answer = chat.ask("Tell me a story.", seed=7, **settings)
    assert torch.equal(torch.rand(4), expected)
    assert Chat(chat.model).ask("Tell me a story.", seed=7, **settings) == answer

    model, processor = chat.model.model, chat.model.processor
    inputs = processor.apply_chat_template(
        chat.messages()[:1], add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt",
    )  # fmt: skip
    torch.manual_seed(7)
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=True, **settings)
    prompt = inputs["input_ids"].shape[1]
    assert processor.decode(out[0, prompt:], skip_special_tokens=True) == answer


def test_numpy_numbers_are_settings_and_become_plain_ones():
    import numpy as np

    from llava_nb.models import check_settings

    numbers = dict(max_new_tokens=np.int64(3), temperature=np.float32(0.5), top_p=np.float64(1))
    checked = check_settings(**numbers, seed=np.int8(1))
    assert checked == {"max_new_tokens": 3, "temperature": 0.5, "top_p": 1.0, "seed": 1}
    assert [type(v) for v in checked.values()] == [int, float, float, int]  # JSON-ready


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
        ({"max_new_tokens": True}, "max_new_tokens must be a positive integer"),
        ({"temperature": -1}, "temperature must be a number >= 0"),
        ({"top_p": 0}, r"top_p must be in \(0, 1\]"),
        ({"temperature": float("nan")}, "temperature must be a number >= 0"),
        ({"temperature": float("inf")}, "temperature must be a number >= 0"),
        ({"seed": "x"}, "seed must be a 64-bit integer"),
        ({"seed": 10**20}, "seed must be a 64-bit integer"),  # torch.manual_seed overflows
    ],
)
def test_bad_settings_are_refused_before_loading(setting, message):
    model = Model("never/loaded")
    with pytest.raises(GenerationError, match=message):
        model.generate(_question(), **setting)
    assert model.model is None


def test_prompt_longer_than_the_context(tiny_llava):
    from llava_nb.models import ContextFullError

    model = Model(tiny_llava)
    full = r"is \d+ tokens, which leaves no room for an answer in the model.s context of 1024"
    with pytest.raises(ContextFullError, match=full):
        model.generate(_question("why " * 1200))
    # text that no tokenization can fit is refused before tokenizing: megabytes take minutes
    longest = max(map(len, model.processor.tokenizer.get_vocab()))
    text = "why " * (1024 * longest // 4 + 1)
    tokenize, model.processor.apply_chat_template = model.processor.apply_chat_template, None
    with pytest.raises(ContextFullError, match=f"text is {len(text):,} characters, more than"):
        model.generate(_question(text))
    model.processor.apply_chat_template = tokenize
    assert model.generate(_question(), max_new_tokens=2).wait() is not None  # still works


def test_importing_llava_nb_stays_light():
    import subprocess

    code = (
        "import llava_nb, llava_nb.models, llava_nb.chat, sys;"
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_bitsandbytes_optional_kernel_warning_is_kept_out_of_cells():
    import subprocess

    code = "import llava_nb, peft, bitsandbytes"  # peft imports it for LoRA, 4-bit or not
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "kernels-community" not in out.stderr + out.stdout


def test_llava_error_is_the_base_of_model_errors():
    assert issubclass(ModelError, LlavaError) and issubclass(GenerationError, LlavaError)


def test_out_of_memory_while_loading_suggests_4bit(tmp_path):
    """A real allocation failure: the loading process gets too little address space. One
    OpenMP thread, as an OpenMP pool thread that cannot get its stack ends the process
    (libgomp) instead of failing the load. (A CI run once saw the child print nothing; its
    lines are now flushed, and a failure shows its exit status and stderr.) The tokenizer's
    thread pool is made before the limit: made under it, its threads once got no stack (a
    loaded run) and tokenizers panicked instead of the weights failing to fit."""
    import os
    import subprocess

    from llava_nb.testing import make_tiny_llava

    path = make_tiny_llava(tmp_path / "big", width=768, layers=4)  # ~200 MB of fp32 weights
    code = f"""
import resource
import transformers.models.llava.modeling_llava
from transformers import AutoProcessor
from llava_nb.models import Model
AutoProcessor.from_pretrained({path!r})  # the tokenizer's thread pool made before the limit
model = Model({path!r})
vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 80_000_000, vm + 80_000_000))
try:
    model.load()
except Exception as e:
    print(type(e).__name__, e, flush=True)
print(model.status()["state"], flush=True)
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env
    )
    lines = out.stdout.strip().splitlines()
    assert len(lines) >= 2, f"exit status {out.returncode}: {out.stderr[-2000:]}"
    assert (
        lines[-2]
        == f"ModelError out of memory loading {path} on cpu; try --4bit (quantization='4bit')"
    )
    assert lines[-1] == "unloaded"


def test_fp16_size_is_counted_without_loading(tiny_llava_next):
    """What quantization="auto" compares with free GPU memory, for any config, from the config."""
    from transformers import AutoConfig

    from llava_nb.models import _fp16_bytes

    model = Model(tiny_llava_next).load()
    expected = 2 * sum(p.numel() for p in model.model.parameters())
    assert _fp16_bytes(AutoConfig.from_pretrained(tiny_llava_next)) == expected


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("bogus", "unknown device 'bogus'"),
        ("cuda", "device 'cuda' is not available to this torch build; use --device cpu"),
        ("meta", "device 'meta' is not supported"),
    ],
)
def test_unusable_devices_are_refused_in_one_line(tiny_llava, device, message):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    model = Model(tiny_llava, device=device)
    with pytest.raises(ModelError, match=message):
        model.load()
    assert model.status()["state"] == "unloaded"


def test_a_generation_nobody_reads_does_no_work(tiny_llava):
    model = Model(tiny_llava)
    generation = model.generate(_question(), max_new_tokens=900)
    assert generation._running is None and generation.token_ids == []
    assert model.generate(_question(), max_new_tokens=2).wait() is not None
    finished = model.generate(_question(), max_new_tokens=2)
    assert finished.wait() == finished.wait()  # reading it again gives the same answer


def _main_thread_waits_in(function_name: str) -> bool:
    """Whether the main thread is in a `wait` called by `function_name` itself (where an
    interrupt is meant to land), rather than somewhere before it."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    while frame is not None and frame.f_back is not None:
        if (frame.f_code.co_name, frame.f_back.f_code.co_name) == ("wait", function_name):
            return True
        frame = frame.f_back
    return False


def _wait_until(condition, seconds: float = 60) -> None:
    """Poll `condition` until it holds; fail after `seconds` (generous: a busy 2-core CI)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"waited {seconds} s for {condition.__name__}"
        time.sleep(0.001)


def _interrupt_taken_by_the_caller() -> bool:
    """The caller of `_on_a_thread_of_its_own` running this load thread has taken an
    interrupt (and asked the load to stop): a load ending after this outlasted it."""
    from llava_nb.models import _STOP_ASKED

    return threading.get_ident() in _STOP_ASKED


def test_work_on_a_thread_of_its_own_returns_raises_and_outlasts_an_interrupt():
    """Loads run there: an interrupt waits for them, and their OpenMP pool ends with them."""
    import signal
    import threading

    from llava_nb.models import _on_a_thread_of_its_own

    assert _on_a_thread_of_its_own(lambda: "loaded") == "loaded"
    with pytest.raises(ZeroDivisionError):
        _on_a_thread_of_its_own(lambda: 1 / 0)
    done = []

    def work():
        _wait_until(lambda: _main_thread_waits_in("_on_a_thread_of_its_own"))
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # as Jupyter's ■
        _wait_until(_interrupt_taken_by_the_caller)
        done.append(True)

    with pytest.raises(KeyboardInterrupt):
        _on_a_thread_of_its_own(work)
    assert done == [True]  # the interrupt came once the work had ended, not halfway


def test_an_interrupt_as_the_load_thread_starts_still_waits_for_it(monkeypatch):
    """Jupyter's stop landing inside Thread.start() (or just after it) escaped while the load
    went on, and the model was marked loaded with nothing in it."""
    import signal
    import threading

    from llava_nb import models

    start = threading.Thread.start

    def start_then_interrupted(thread):
        start(thread)
        signal.raise_signal(signal.SIGINT)  # before the caller's wait began

    monkeypatch.setattr(threading.Thread, "start", start_then_interrupted)
    done = []

    def work():
        _wait_until(_interrupt_taken_by_the_caller)
        done.append(True)

    with pytest.raises(KeyboardInterrupt):
        models._on_a_thread_of_its_own(work)
    assert done == [True]


def test_an_interrupt_sent_to_the_process_as_the_load_thread_starts_waits_for_it(monkeypatch):
    """A kernel has other threads (heartbeat, iopub), and Jupyter's stop is sent to the
    process: one of them takes the signal, and the interrupt is raised on the main thread
    whatever its signal mask says. Landing just after start(), it escaped while the load went
    on."""
    import signal
    import threading

    from llava_nb import models

    other = threading.Event()
    bystander = threading.Thread(target=other.wait, daemon=True)  # as the kernel's threads
    bystander.start()
    start = threading.Thread.start

    def start_then_interrupted(thread):
        start(thread)
        if thread.name == "llava_nb-load":
            os.kill(os.getpid(), signal.SIGINT)  # process-directed, as Jupyter's interrupt
            time.sleep(0.05)  # some thread takes it; the main thread raises at its next check

    monkeypatch.setattr(threading.Thread, "start", start_then_interrupted)
    done = []

    def work():
        _wait_until(_interrupt_taken_by_the_caller)
        done.append(True)

    try:
        with pytest.raises(KeyboardInterrupt):
            models._on_a_thread_of_its_own(work)
        assert done == [True]
    finally:
        other.set()


def test_an_interrupt_as_the_handler_is_put_back_still_waits_for_the_load(monkeypatch):
    """An interrupt landing just after the handler that records interrupts was put back, but
    before the caller's wait began, escaped while the load went on (a race of a few
    bytecodes, made certain here)."""
    import contextlib
    import signal

    from llava_nb import models

    recorded = models._interrupts_recorded

    @contextlib.contextmanager
    def then_interrupted():
        with recorded() as caught:
            yield caught
        signal.raise_signal(signal.SIGINT)  # as the handler is put back

    monkeypatch.setattr(models, "_interrupts_recorded", then_interrupted)
    done = []

    def work():  # ends only once the caller waits for it
        _wait_until(lambda: _main_thread_waits_in("_on_a_thread_of_its_own"))
        done.append(True)

    with pytest.raises(KeyboardInterrupt):
        models._on_a_thread_of_its_own(work)
    assert done == [True]


def test_an_interrupt_before_the_load_began_leaves_the_model_unloaded(tiny_llava, monkeypatch):
    from llava_nb import models

    recorded = models._interrupts_recorded
    calls = []

    def interrupted():
        calls.append(True)
        if len(calls) == 1:
            raise KeyboardInterrupt  # before the load thread could start
        return recorded()  # the clean-up's own

    monkeypatch.setattr(models, "_interrupts_recorded", interrupted)
    model = Model(tiny_llava)
    with pytest.raises(KeyboardInterrupt):
        model.load()
    assert model.status()["state"] == "unloaded" and model.model is None
    monkeypatch.undo()
    assert model.load().loaded


def test_an_interrupt_while_a_failed_load_cleans_up_lets_it_finish(tmp_path, monkeypatch):
    """A Stop pressed as a failed load released what it held cut the release short and took
    the failure's place: the error line was lost, and views never heard "failed"."""
    import signal

    from transformers import LlamaConfig

    from llava_nb import models

    LlamaConfig(hidden_size=64, num_hidden_layers=1).save_pretrained(tmp_path / "llama")
    trim = models._trim_process_heap

    def interrupted_midway() -> None:
        signal.raise_signal(signal.SIGINT)  # as a kernel's Stop, in the middle of the release
        trim()

    monkeypatch.setattr(models, "_trim_process_heap", interrupted_midway)
    model = Model(str(tmp_path / "llama"))
    events: list[str] = []
    model.on_state_change(events.append)
    with pytest.raises(ModelError, match="'llama' model, not LLaVA"):
        model.load()
    assert events == ["loading", "failed"] and model.status()["state"] == "unloaded"


INTERRUPTED_LOAD = """
import signal, sys, threading, time
import llava_nb as ln
assert "torch" not in sys.modules
main = threading.main_thread().ident

def stop_while_torch_imports():  # as Jupyter's stop, pressed once the import has begun
    deadline = time.monotonic() + 120
    while "torch" not in sys.modules and time.monotonic() < deadline:
        time.sleep(0.001)
    signal.pthread_kill(main, signal.SIGINT)

model = ln.Model(sys.argv[1])
threading.Thread(target=stop_while_torch_imports).start()
try:
    model.load()  # imports torch and transformers first
except KeyboardInterrupt:
    print("interrupted:", model.status()["state"])
question = [{"role": "user", "content": [{"type": "text", "text": "Hello?"}]}]
print("answered:", isinstance(model.generate(question, max_new_tokens=3).wait(), str))
"""


def test_an_interrupt_during_the_first_load_leaves_the_libraries_whole(tiny_llava, tmp_path):
    """Stop pressed while torch is being imported: a half-imported torch could not be imported
    again until the kernel restarted. The interrupt waits for the load, which is kept."""
    import os
    import subprocess

    script = tmp_path / "interrupt.py"
    script.write_text(INTERRUPTED_LOAD)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(script), tiny_llava],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "interrupted: loaded" in done.stdout and "answered: True" in done.stdout
    assert "llava_nb: stopping once loading ends (it cannot stop halfway)" in done.stderr


TWO_FIRST_LOADS = """
import sys, threading, time
import llava_nb as ln
models = [ln.Model(path) for path in sys.argv[1:]]
threads = [threading.Thread(target=m.load) for m in models]
threads[0].start()
deadline = time.monotonic() + 120
while "transformers" not in sys.modules and time.monotonic() < deadline:
    time.sleep(0.001)
threads[1].start()  # the second while the first still imports transformers
for thread in threads:
    thread.join()
print("loaded:", [m.loaded for m in models])
"""


def test_two_first_loads_at_once_both_load(tiny_llava, tiny_llava_next, tmp_path):
    import os
    import subprocess

    script = tmp_path / "two.py"
    script.write_text(TWO_FIRST_LOADS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(script), tiny_llava, tiny_llava_next],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert "loaded: [True, True]" in done.stdout, done.stderr[-3000:]


def test_unload_stops_an_answer_and_keeps_it(tiny_llava):
    from llava_nb.chat import Chat

    model = Model(tiny_llava)
    chat = Chat(model, max_new_tokens=500)
    pieces = chat.stream("Tell me a long story.")
    shown = next(pieces)
    model.unload()  # stops it within a token; what it wrote is still read and kept
    shown += "".join(pieces)
    turn = chat.history[-1]
    assert not model.loaded and turn.interrupted and turn.answer == shown
    waiting = chat.stream("Handed out before the unload?")
    model.unload()
    with pytest.raises(GenerationError, match="was unloaded before this answer began; ask"):
        list(waiting)
    assert chat.history == [turn] and chat.ask("Again?", max_new_tokens=2)  # loads again


def test_an_interrupt_during_unload_ends_the_release_then_reaches_the_caller(tiny_llava):
    """Ctrl-C while unload waits for an answer finishing on another thread (a panel's): cut
    short, the model stayed marked loaded with its weights. It releases whole, tells its
    listeners, and only then raises the interrupt, once."""
    model = Model(tiny_llava).load()
    events: list[str] = []
    model.on_state_change(events.append)
    release = threading.Event()
    holder = holding_lock(model, release)
    interrupter = threading.Thread(target=interrupt_in_unload, args=(release,))
    interrupter.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            model.unload()
        interrupter.join()
        time.sleep(0.05)  # a second interrupt would land here, failing the test
    finally:
        release.set()
        holder.join()
    assert not model.loaded and model.status()["state"] == "unloaded"
    assert events == ["unloaded"] and model._generator is None
    model.load()
    unloading = threading.Thread(target=model.unload)  # no signal handlers off the main thread
    unloading.start()
    unloading.join()
    assert not model.loaded and events == ["unloaded", "loading", "loaded", "unloaded"]


def test_a_second_interrupt_waits_for_the_answer_to_end():
    """Stop pressed again while an answer ends: the wait goes on. The answer ends only once
    the interrupt was raised in the wait, so it cannot land after it, in the test."""
    import signal
    from concurrent.futures import ThreadPoolExecutor

    from llava_nb.models import _wait_through_interrupts

    raised = threading.Event()

    def interrupt(signum, frame):  # Python's own handler, telling the test it ran
        raised.set()
        signal.default_int_handler(signum, frame)

    def stop_again() -> None:
        _wait_until(lambda: _main_thread_waits_in("_wait_through_interrupts"))
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        with ThreadPoolExecutor(1) as pool:
            ending = pool.submit(raised.wait, 60)  # an answer stopping after its current token
            threading.Thread(target=stop_again).start()
            _wait_through_interrupts(ending)  # no KeyboardInterrupt: it waits the answer out
            assert ending.result() is True  # ended by the interrupt, not the 60 s
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("quantization", ["none", "4bit", "8bit"])
def test_unload_gives_the_memory_back(tmp_path_factory, quantization):
    """Resident memory, measured: load/unload cycles (after a first one that imports the
    libraries) leave the process no bigger. A leak would keep a footprint per cycle; one cycle
    alone kept 0-60 MB by chance (heap fragmentation) on a busy 2-core machine."""
    import subprocess

    from llava_nb.testing import make_tiny_llava

    path = make_tiny_llava(tmp_path_factory.mktemp("rss") / "m", width=768, layers=4)
    code = f"""
import threading
from llava_nb.models import Model
def rss():
    status = open("/proc/self/status").read()
    return int(status.split("VmRSS:")[1].split()[0]) * 1024
question = [{{"role": "user", "content": [{{"type": "text", "text": "hi"}}]}}]
for cycle in range(3):
    before = rss()
    model = Model({path!r}, quantization={quantization!r})
    model.generate(question, max_new_tokens=3).wait()
    footprint, loaded = model.status()["memory"], rss()
    model.unload()
    for thread in threading.enumerate():  # measured once its answers' thread has ended too
        if thread.name.startswith("llava_nb-generate"):
            thread.join(60)
    if cycle == 0:
        start = rss()  # the libraries are imported: what cycles 2 and 3 keep is measured
print(footprint, loaded - before, rss() - start, model.status()["memory"])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    footprint, grew, kept, reported = map(int, out.stdout.split()[-4:])
    assert footprint > 80e6 and grew > footprint / 3  # the weights really were in memory
    assert kept < footprint, f"{kept / 1e6:.0f} MB kept by 2 cycles of {footprint / 1e6:.0f} MB"
    assert reported == 0
    assert "inputs will be cast" not in out.stderr


def test_finish_reason(tiny_llava):
    model = Model(tiny_llava)
    short = model.generate(_question(), max_new_tokens=2)
    assert short.finish_reason is None
    short.wait()
    assert short.finish_reason == "length"
    long = model.generate(_question(), max_new_tokens=900)
    pieces = iter(long)
    next(pieces)
    pieces.close()
    assert long.finish_reason == "interrupted"
    # an end-of-answer token that is also the last one allowed: the answer ended by itself
    ids = model.generate(_question(), max_new_tokens=8)
    ids.wait()
    end = next(i for i, token in enumerate(ids.token_ids) if token not in ids.token_ids[:i] and i)
    config = model.model.generation_config
    eos, config.eos_token_id = config.eos_token_id, ids.token_ids[end]  # as if it were EOS
    try:
        for room, reason in ((end + 1, "stop"), (end, "length"), (end + 2, "stop")):
            ended = model.generate(_question(), max_new_tokens=room)
            ended.wait()
            assert ended.token_ids == ids.token_ids[: min(room, end + 1)]
            assert ended.finish_reason == reason, room
    finally:
        config.eos_token_id = eos


def test_answers_run_on_one_thread_kept_until_unload(tiny_llava):
    model = Model(tiny_llava).load()
    ran_on = []
    generate = model.model.generate

    def recorded(*args, **kwargs):
        ran_on.append(threading.current_thread())
        return generate(*args, **kwargs)

    model.model.generate = recorded
    for _ in range(3):
        assert model.generate(_question(), max_new_tokens=2).wait() is not None
    thread = ran_on[0]
    assert ran_on == [thread] * 3 and thread is not threading.current_thread()
    assert thread.name.startswith("llava_nb-generate") and thread.is_alive()
    model.unload()
    thread.join(60)
    assert not thread.is_alive()  # unloading ends it
    assert model.generate(_question(), max_new_tokens=2).wait() is not None  # on a new one


def test_a_model_dropped_without_unload_leaves_no_thread_behind(tiny_llava):
    model = Model(tiny_llava)
    model.generate(_question(), max_new_tokens=2).wait()
    (thread,) = model._generator._threads
    weights = weakref.ref(model.model)
    del model
    gc.collect()
    thread.join(60)
    assert not thread.is_alive() and weights() is None


HALF_READ_AT_EXIT = """
import atexit, sys, threading
import llava_nb as ln
model = ln.Model(sys.argv[1]).load()
model.model.generation_config.min_new_tokens = 900
answer = model.generate([{"role": "user", "content": "Hello?"}], max_new_tokens=900)
pieces = iter(answer)  # read one piece; the generator stays suspended until the exit
if sys.argv[2] == "main":
    next(pieces)
elif sys.argv[2] == "ended":  # a thread reads it and ends; the answer stops before any exit
    reader = threading.Thread(target=lambda: next(pieces))
    reader.start()
    reader.join()
    answer._running.result(timeout=60)
else:  # a daemon thread reads it, then waits for good
    read_one = threading.Event()
    threading.Thread(target=lambda: (next(pieces), read_one.set(), threading.Event().wait()),
                     daemon=True).start()
    read_one.wait()
atexit.register(lambda: print("tokens made:", answer._queue.qsize(), flush=True))
"""


@pytest.mark.parametrize("reader", ["main", "daemon", "ended"])
def test_an_answer_left_half_read_stops_when_the_program_exits(tiny_llava, tmp_path, reader):
    """Nothing will read the rest, so the exit does not wait for it (a thread per answer,
    killed at exit, could abort the process instead: SIGABRT)."""
    import subprocess

    script = tmp_path / "half_read.py"
    script.write_text(HALF_READ_AT_EXIT)
    done = subprocess.run(
        [sys.executable, str(script), tiny_llava, reader],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    made = int(done.stdout.split("tokens made:")[1])
    assert made < 100, done.stdout  # the whole answer was 900


def test_stop_from_another_thread_marks_the_answer_interrupted(tiny_llava):
    generation = Model(tiny_llava).generate(_question(), max_new_tokens=900)
    for _ in generation:
        if len(generation.token_ids) >= 3:
            generation.stop()  # as a Stop button or a server's disconnect would
    assert generation.stopped and generation.finish_reason == "interrupted"
    assert generation._running.done()
    assert len(generation.token_ids) < 900
