"""The conversation's key/value cache carried from turn to turn: reused, and never wrong."""

import pytest
from PIL import Image

from llava_nb.chat import Chat, Turn
from llava_nb.models import Model

from .test_chat import _plain_transformers_answers

SQUARE = Image.new("RGB", (64, 64), (20, 200, 30))


def _prompt_tokens(model: Model, chat: Chat, question: str, images) -> int:
    return len(_prompt_ids(model, chat.messages(question, images)))


def _prompt_ids(model: Model, messages) -> list[int]:
    inputs = model.processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    return inputs["input_ids"][0].tolist()


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_later_turns_reuse_the_conversation_and_answer_as_plain_transformers(kind, request, photo):
    path = request.getfixturevalue(f"tiny_{kind}")
    model = Model(path)
    chat = Chat(model, max_new_tokens=16)
    turns = [
        ("What is in this picture?", [photo]),
        ("And what color is it?", []),
        ("Compare it with this one.", [SQUARE]),
        ("Which one is larger?", []),
    ]
    answers, reused = [], []
    for question, images in turns:
        answers.append(chat.ask(question, image=images or None))
        reused.append(model._conversation.reused_tokens)
    assert answers == _plain_transformers_answers(path, turns, 16)
    assert reused[0] == 0
    # each later turn reads at least the whole previous prompt from the cache
    lengths = []
    replay = Chat(model, max_new_tokens=16)
    for (question, images), answer in zip(turns, answers, strict=True):
        lengths.append(_prompt_tokens(model, replay, question, images))
        replay._turns.append(Turn(question, list(images), answer))
    for i in range(1, len(turns)):
        assert lengths[i - 1] <= reused[i] < lengths[i], (reused, lengths)


def test_a_bigger_image_joining_a_next_chat_keeps_the_earlier_one_cached(tiny_llava_next):
    """LLaVA-NeXT pads each image's tiles to the most in the prompt: padding is not a change."""
    model = Model(tiny_llava_next)
    chat = Chat(model, max_new_tokens=8)
    small, big = Image.new("RGB", (32, 32), "red"), Image.new("RGB", (64, 64), "blue")
    turns = [("What is this?", [small]), ("And this?", [big])]
    answers = [chat.ask(*turn) for turn in turns]
    assert model._conversation.reused_tokens >= _prompt_tokens(model, Chat(model), *turns[0])
    assert answers == _plain_transformers_answers(tiny_llava_next, turns, 8)


def test_the_same_words_about_another_image_read_that_image_again(tiny_llava, photo):
    model = Model(tiny_llava)
    Chat(model, max_new_tokens=12).ask("What is this?", image=photo)
    other = Chat(model, max_new_tokens=12)
    answer = other.ask("What is this?", image=SQUARE)
    ids = _prompt_ids(model, other.messages()[:1])
    first_image_token = ids.index(model.model.config.image_token_id)
    assert model._conversation.reused_tokens == first_image_token  # the words before it only
    assert [answer] == _plain_transformers_answers(tiny_llava, [("What is this?", [SQUARE])], 12)


def test_undo_then_another_question_answers_as_plain_transformers(tiny_llava, photo):
    model = Model(tiny_llava)
    chat = Chat(model, max_new_tokens=12)
    chat.ask("What is in this picture?", image=photo)
    chat.ask("And what color is it?")
    chat.undo()
    answer = chat.ask("Where is she?")
    assert model._conversation.reused_tokens > 0
    plain = _plain_transformers_answers(
        tiny_llava, [("What is in this picture?", [photo]), ("Where is she?", [])], 12
    )
    assert [chat.history[0].answer, answer] == plain


def test_changed_weights_and_unload_drop_the_cache(tiny_llava, photo):
    model = Model(tiny_llava)
    chat = Chat(model, max_new_tokens=8)
    chat.ask("What is in this picture?", image=photo)
    model._weights_version += 1  # what switching an adapter does
    chat.ask("And now?")
    assert model._conversation.reused_tokens == 0
    chat.ask("And then?")
    assert model._conversation.reused_tokens > 0
    model.unload()
    assert model._conversation is None
    chat.ask("Once more?")  # loads again, reads the whole conversation again
    assert model._conversation.reused_tokens == 0


def test_attention_capture_reads_the_whole_prompt(tiny_llava, photo):
    model = Model(tiny_llava)
    chat = Chat(model, max_new_tokens=6)
    chat.ask("What is in this picture?", image=photo)
    generation = model.generate(chat.messages("And now?"), max_new_tokens=4, attention=True)
    generation.wait()
    assert generation.reused_tokens == 0


def test_a_generation_reports_when_its_tokens_came(tiny_llava):
    generation = Model(tiny_llava).generate(
        [{"role": "user", "content": [{"type": "text", "text": "Hello?"}]}], max_new_tokens=5
    )
    assert generation.started_at is None
    generation.wait()
    assert generation.started_at <= generation.first_token_at <= generation.finished_at


# ---------------------------------------------------------------- the static-cache decoder


@pytest.fixture
def static(monkeypatch):
    """Decode with the static cache on the CPU (the GPU's path, without the CUDA graph)."""
    from llava_nb import decoding

    monkeypatch.setenv(decoding.ENV, "1")
    monkeypatch.setattr(decoding, "BLOCK", 64)  # small blocks: the cache grows during a chat
    return decoding


TURNS = [
    ("What is in this picture?", "photo"),
    ("And what color is it?", None),
    ("Compare it with this one.", "square"),
    ("Which one is larger?", None),
]


def _turns(photo):
    images = {"photo": [photo], "square": [SQUARE], None: []}
    return [(question, images[image]) for question, image in TURNS]


def _ask_all(model: Model, turns, max_new_tokens=16) -> tuple[list[str], list[int], list[str]]:
    chat = Chat(model, max_new_tokens=max_new_tokens)
    answers, reused, paths = [], [], []
    for question, images in turns:
        generation = model.generate(chat.messages(question, images), max_new_tokens=max_new_tokens)
        answers.append(generation.wait())
        chat._turns.append(Turn(question, list(images), generation.text))
        reused.append(generation.reused_tokens)
        paths.append(generation.decoding)
    return answers, reused, paths


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_static_decoding_answers_as_plain_transformers(kind, request, photo, static):
    path = request.getfixturevalue(f"tiny_{kind}")
    model = Model(path)
    turns = _turns(photo)
    answers, reused, paths = _ask_all(model, turns)
    assert paths == ["eager-static"] * len(turns)
    assert answers == _plain_transformers_answers(path, turns, 16)
    assert reused[0] == 0 and all(r > 0 for r in reused[1:])  # the conversation is reused
    assert model._decoder.capacity % 64 == 0 and model._decoder.capacity > 64  # it grew


def test_static_decoding_samples_as_generate_with_the_same_seed(tiny_llava, photo, monkeypatch):
    from llava_nb import decoding

    messages = Chat(tiny_llava).messages("Describe it.", [photo])
    settings = dict(max_new_tokens=20, temperature=0.9, top_p=0.8)
    runs = {}
    for mode in ("0", "1"):
        monkeypatch.setenv(decoding.ENV, mode)
        model = Model(tiny_llava)
        runs[mode] = [model.generate(messages, seed=s, **settings) for s in (1, 1, 2)]
        for generation in runs[mode]:
            generation.wait()
    plain, static = runs["0"], runs["1"]
    assert [g.decoding for g in static] == ["eager-static"] * 3
    assert [g.token_ids for g in static] == [g.token_ids for g in plain]
    assert static[0].token_ids != static[2].token_ids  # the seed matters: it really samples


def test_stop_ends_static_decoding_within_a_token_or_two(tiny_llava, photo, static):
    model = Model(tiny_llava)
    generation = model.generate(Chat(model).messages("Describe it.", [photo]), max_new_tokens=200)
    made = None  # tokens the worker had made when stop() came (read or still queued)
    for _ in generation:
        if made is None and len(generation.token_ids) >= 3:
            made = len(generation.token_ids) + generation._queue.qsize()
            generation.stop()
    assert generation.decoding == "eager-static"
    assert generation.finish_reason == "interrupted"
    assert len(generation.token_ids) - made <= 2  # the step under way, then it stops


def test_end_of_answer_token_stops_static_decoding_as_generate(tiny_llava, photo, monkeypatch):
    """The static decoder queues the next step before it knows a token ends the answer; that
    spare step records an attention row that is not the answer's, and feeds the last token
    into the cache the next turn continues from."""
    import numpy as np

    from llava_nb import decoding

    messages = Chat(tiny_llava).messages("Describe it.", [photo])
    generations = {}
    for mode in ("0", "1"):
        monkeypatch.setenv(decoding.ENV, mode)
        model = Model(tiny_llava).load()
        free = model.generate(messages, max_new_tokens=12)
        free.wait()
        model.model.generation_config.eos_token_id = free.token_ids[4]  # its fifth token
        generations[mode] = model.generate(messages, max_new_tokens=12, attention=True)
        generations[mode].wait()
        follow = Chat(model)
        follow._turns.append(Turn("Describe it.", [photo], generations[mode].text))
        generations[mode + " next"] = model.generate(follow.messages("More?"), max_new_tokens=8)
        generations[mode + " next"].wait()
    ours, plain = generations["1"], generations["0"]
    ids = ours.token_ids
    assert ours.decoding == "eager-static"
    assert ids == plain.token_ids == free.token_ids[: ids.index(free.token_ids[4]) + 1]
    assert len(ids) <= 5 and ours.finish_reason == "stop"
    np.testing.assert_allclose(ours.attention.weights, plain.attention.weights, atol=1e-6)
    ours, plain = generations["1 next"], generations["0 next"]
    assert ours.reused_tokens > 0 and ours.token_ids == plain.token_ids


def test_undo_and_changed_weights_with_the_static_cache(tiny_llava, photo, static):
    model = Model(tiny_llava)
    chat = Chat(model, max_new_tokens=12)
    chat.ask("What is in this picture?", image=photo)
    chat.ask("And what color is it?")
    chat.undo()
    answer = chat.ask("Where is she?")
    assert model._conversation.reused_tokens > 0
    plain = _plain_transformers_answers(
        tiny_llava, [("What is in this picture?", [photo]), ("Where is she?", [])], 12
    )
    assert [chat.history[0].answer, answer] == plain
    recorded = model.generate(chat.messages("Where?"), max_new_tokens=4, attention=True)
    recorded.wait()
    assert recorded.decoding == "eager-static" and recorded.reused_tokens == 0  # whole prompt
    chat.ask("And why?")
    assert model._conversation.reused_tokens > 0  # continues from what the recording left
    model._weights_version += 1  # what switching an adapter does
    chat.ask("And now?")
    assert model._conversation.reused_tokens == 0
    model.unload()
    assert model._decoder is None and model._conversation is None


# A CPU stand-in for CUDA graph capture, to check that the step is replayable: it records the
# step's kernels (aten operators) with their arguments as they were at capture, then replays
# exactly those into the same output buffers — Python values frozen, tensors read afresh, as
# a CUDA graph does. A step that took its position from a Python value would replay wrongly.


class _Tape:
    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        tape = self
        self.ops: list = []

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                import torch

                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                if isinstance(out, bool | int | float) or func is torch.ops.aten.nonzero.default:
                    raise RuntimeError(f"{func} reads the device from the host: not capturable")
                tape.ops.append((func, args, kwargs, out))
                return out

        self.mode = Record

    def capture(self, body):
        body()  # warm-up, as before a CUDA capture
        with self.mode():
            output = body()

        def replay():
            import torch
            from torch.utils._pytree import tree_leaves

            for func, args, kwargs, out in self.ops:
                fresh = func(*args, **kwargs)
                for dst, src in zip(tree_leaves(out), tree_leaves(fresh), strict=True):
                    if isinstance(dst, torch.Tensor) and dst.data_ptr() != src.data_ptr():
                        dst.copy_(src)
            return output

        return replay


def test_a_captured_step_replays_right_at_every_position(
    tiny_llava_next, photo, static, monkeypatch
):
    captured_at = []  # the cache size at each capture

    def capture(body):
        captured_at.append(model._decoder.capacity)
        return _Tape().capture(body)

    monkeypatch.setattr(static, "_capture_for", lambda device: capture)
    static.BLOCK = 256
    model = Model(tiny_llava_next)
    turns = _turns(photo)
    answers, reused, paths = _ask_all(model, turns)
    assert paths == ["graph"] * len(turns) and model._decoder.graphs_ok
    assert answers == _plain_transformers_answers(tiny_llava_next, turns, 16)
    assert all(r > 0 for r in reused[1:])
    # captured again only when the cache grew
    assert 1 <= len(captured_at) < len(turns) and sorted(set(captured_at)) == captured_at


def test_captured_steps_record_attention_as_generate_does(
    tiny_llava_next, photo, static, monkeypatch
):
    """The recording step is captured once per layout and replayed for later answers; its
    rows leave the device every few steps (4 here) and match plain generate's capture."""
    import numpy as np

    from llava_nb.attention import _Recorder

    model = Model(tiny_llava_next)
    messages = Chat(model).messages("Describe both.", [photo, SQUARE])
    monkeypatch.setenv(static.ENV, "0")
    reference = model.generate(messages, max_new_tokens=14, attention=True)
    reference.wait()
    assert reference.decoding == "generate" and len(reference.token_ids) > 8
    monkeypatch.setenv(static.ENV, "1")
    monkeypatch.setattr(static, "_capture_for", lambda device: _Tape().capture)
    monkeypatch.setattr(_Recorder, "slots", 4)
    recorded = []
    for _ in range(2):
        generation = model.generate(messages, max_new_tokens=14, attention=True)
        generation.wait()
        recorded.append(generation)
    assert [g.decoding for g in recorded] == ["graph", "graph"]
    assert model._decoder.captures == 1  # the second answer replayed the first one's step
    for generation in recorded:
        assert generation.token_ids == reference.token_ids
        ours, theirs = generation.attention, reference.attention
        np.testing.assert_allclose(ours.weights, theirs.weights, rtol=0, atol=1e-6)
        np.testing.assert_allclose(ours.self_weights, theirs.self_weights, rtol=0, atol=1e-6)
    # a turn without attention continues from the cache the recording left
    follow = Chat(model)
    follow._turns.append(Turn("Describe both.", [photo, SQUARE], recorded[-1].text))
    answer = model.generate(follow.messages("And now?"), max_new_tokens=6)
    answer.wait()
    assert answer.decoding == "graph" and answer.reused_tokens > 0


def test_a_capture_that_replays_wrongly_falls_back_after_one_warning(
    tiny_llava, photo, static, caplog, monkeypatch
):
    def stale(body):  # replays the captured result without recomputing it
        output = body()
        return lambda: output

    monkeypatch.setattr(static, "_capture_for", lambda device: stale)
    model = Model(tiny_llava)
    turns = _turns(photo)[:2]
    with caplog.at_level("WARNING", logger="llava_nb"):
        answers, _, paths = _ask_all(model, turns)
    assert paths == ["eager-static"] * 2
    warnings = [r for r in caplog.records if "without CUDA graphs" in r.getMessage()]
    assert len(warnings) == 1 and "disagreed" in warnings[0].getMessage()
    assert answers == _plain_transformers_answers(tiny_llava, turns, 16)


def test_a_compiled_step_answers_as_plain_transformers(tiny_llava, photo, static, monkeypatch):
    """$LLAVA_NB_STATIC_DECODE=compile: the step through torch.compile (inductor's CPU
    kernels here), over a reused cache that grows, gives plain transformers' tokens. A grown
    cache compiles once more, with its length symbolic, and never again."""
    import gc
    import weakref

    import torch
    from torch._dynamo.utils import counters

    monkeypatch.setenv(static.ENV, "compile")
    torch._dynamo.reset()  # no compiled step, nor a shape seen to vary, from earlier tests
    counters.clear()
    model = Model(tiny_llava)
    turns = _turns(photo)
    answers, reused, paths = _ask_all(model, turns)
    assert paths == ["compiled eager-static"] * len(turns)
    assert model._decoder.capacity > 2 * static.BLOCK  # it grew twice or more
    assert counters["stats"]["unique_graphs"] == 2, dict(counters)  # really compiled, twice
    assert answers == _plain_transformers_answers(tiny_llava, turns, 16)
    assert all(r > 0 for r in reused[1:])
    recorded = model.generate(
        Chat(model).messages("Where?", [photo]), max_new_tokens=8, attention=True
    )
    recorded.wait()  # a recording step is not compiled
    assert recorded.decoding == "eager-static" and recorded.attention.weights.size
    weights = weakref.ref(model.model)
    model.unload()  # the compiled step keeps nothing of the model alive
    gc.collect()
    assert weights() is None


def _broken_compile(monkeypatch):
    """torch.compile with a backend that fails, as a compiler error on a new stack would."""
    import torch

    def backend(graph, example_inputs):
        raise RuntimeError("no kernel for this op")

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend=backend))


@pytest.mark.parametrize("captured", [False, True])
def test_a_step_that_cannot_be_compiled_runs_as_written_after_one_warning(
    captured, tiny_llava, photo, static, monkeypatch, caplog
):
    monkeypatch.setenv(static.ENV, "compile")
    if captured:

        def capture(body):
            return _Tape().capture(body)

        monkeypatch.setattr(static, "_capture_for", lambda device: capture)
    _broken_compile(monkeypatch)
    model = Model(tiny_llava)
    turns = _turns(photo)[:2]
    with caplog.at_level("WARNING", logger="llava_nb"):
        answers, _, paths = _ask_all(model, turns)
    assert paths == ["graph" if captured else "eager-static"] * 2
    warnings = [r.getMessage() for r in caplog.records if "could not be compiled" in r.getMessage()]
    assert warnings == [
        "llava_nb: the decoding step could not be compiled (RuntimeError: no kernel for this op); "
        "running it as written"
    ]
    assert answers == _plain_transformers_answers(tiny_llava, turns, 16)


def test_a_compiled_step_that_replays_wrongly_is_captured_as_written(
    tiny_llava, photo, static, monkeypatch, caplog
):
    def capture(body):
        if body == model._decoder._step_body:
            return _Tape().capture(body)
        output = body()  # the compiled step replays its first result, as a broken capture would
        return lambda: output

    monkeypatch.setenv(static.ENV, "compile")
    monkeypatch.setattr(static, "_capture_for", lambda device: capture)
    model = Model(tiny_llava)
    turns = _turns(photo)[:2]
    with caplog.at_level("WARNING", logger="llava_nb"):
        answers, _, paths = _ask_all(model, turns)
    assert paths == ["graph"] * 2 and model._decoder.graphs_ok
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "could not be compiled (RuntimeError: it disagreed" in warnings[0]
    assert answers == _plain_transformers_answers(tiny_llava, turns, 16)


def test_a_transformers_the_decoder_cannot_use_means_plain_generate(
    tiny_llava, static, monkeypatch, caplog
):
    def prepare(self, *args):  # as if a private generate step had changed its signature
        raise TypeError("_get_logits_processor() got an unexpected keyword argument")

    monkeypatch.setattr(static.StaticDecoder, "prepare", prepare)
    monkeypatch.setattr(static, "_unsupported_noticed", [])
    model = Model(tiny_llava)
    turns = [("What is in this picture?", [SQUARE]), ("And now?", [])]
    with caplog.at_level("WARNING", logger="llava_nb"):
        answers, reused, paths = _ask_all(model, turns, max_new_tokens=8)
    assert paths == ["generate", "generate"] and reused[1] > 0
    assert answers == _plain_transformers_answers(tiny_llava, turns, 8)
    assert len([r for r in caplog.records if "using generate" in r.getMessage()]) == 1


def test_a_prompt_read_on_cuda_leaves_out_cudnn_attention(static):
    """cuDNN builds a plan per prompt length (75 ms for a 48-token read on an H200)."""
    import torch

    with static._without_cudnn_attention(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled()
    with static._without_cudnn_attention(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled()


@pytest.mark.parametrize("value", ["true", "compiled", "graph"])
def test_an_unknown_static_decode_mode_is_refused_in_one_line(tiny_llava, monkeypatch, value):
    """A mistyped mode was read as "auto": plain generate on the CPU, with no word said."""
    from llava_nb import decoding
    from llava_nb.models import GenerationError

    monkeypatch.setenv(decoding.ENV, value)
    chat = Chat(Model(tiny_llava), max_new_tokens=2)
    message = rf"^LLAVA_NB_STATIC_DECODE={value!r} is not a mode; set it to auto, 0, 1, eager"
    with pytest.raises(GenerationError, match=message):
        chat.ask("Hi?")
    assert chat.history == []
    monkeypatch.setenv(decoding.ENV, " Auto ")
    chat.ask("Hi?")
    assert len(chat.history) == 1


def _without_separators(path: str, folder) -> str:
    """A copy of a checkpoint whose chat template writes one image's placeholder right after
    another's, with nothing between (as llava-interleave's template does)."""
    import shutil

    from transformers import AutoProcessor

    shutil.copytree(path, folder)
    processor = AutoProcessor.from_pretrained(path)
    template = processor.chat_template.replace("{{ '<image>\n' }}", "{{ '<image>' }}")
    assert template != processor.chat_template
    processor.chat_template = template
    processor.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_images_whose_placeholders_touch_are_told_apart(kind, request, tmp_path):
    """Two images in one question, their placeholder runs touching: the cache took them for
    one image, handed `generate` the second one's pixels with none of its tokens, and the
    next turn failed ("Image features and image tokens do not match")."""
    path = _without_separators(request.getfixturevalue(f"tiny_{kind}"), tmp_path / "ckpt")
    model = Model(path)
    red, blue, green = (Image.new("RGB", (40, 40), color) for color in ("red", "blue", "green"))
    chat = Chat(model, max_new_tokens=6)
    turns = [("Two?", [red, blue]), ("And now?", [])]
    answers = [chat.ask(question, images or None) for question, images in turns]
    assert answers == _plain_transformers_answers(path, turns, 6)
    # the images are reused (where each image ends is known for LLaVA-1.5, whose images all
    # take as many tokens; LLaVA-NeXT's are reused all together, while all are the same)
    assert model._conversation.reused_tokens >= _prompt_tokens(model, Chat(model), *turns[0])
    chat.reset()
    chat.ask("Two?", [red, blue])
    chat.undo()
    answer = chat.ask("Two?", [red, green])  # the same first image, another second one
    assert answer == _plain_transformers_answers(path, [("Two?", [red, green])], 6)[0]
    chat.ask("And a third?", blue)
    turns = [("Two?", [red, green], answer), ("And a third?", [blue], chat.history[-1].answer)]
    reference = Chat(Model(path), max_new_tokens=6)
    reference._turns = [Turn(question, images, said) for question, images, said in turns[:1]]
    assert chat.history[-1].answer == reference.ask("And a third?", blue)
    assert model._conversation.reused_tokens >= _prompt_tokens(model, Chat(model), *turns[0][:2])
