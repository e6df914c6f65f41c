"""Tiny random LLaVA checkpoints, built offline, for tests and examples.

They are saved with ``save_pretrained`` and load through the same ``from_pretrained`` path
as ``llava-hf/llava-1.5-7b-hf`` and ``llava-hf/llava-v1.6-mistral-7b-hf``: same model classes,
same processor classes, a chat template in the same style. Only the sizes are tiny, and the
weights are random, so the answers are gibberish.
"""

from __future__ import annotations

from pathlib import Path

# The chat templates follow the llava-hf checkpoints: LLaVA-1.5 ("USER: <image>\n... ASSISTANT:")
# and LLaVA-NeXT on Mistral ("[INST] <image>\n... [/INST]").
LLAVA_15_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'][0]['text'] + ' ' }}"
    "{% else %}{{ message['role'].upper() + ': ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
LLAVA_NEXT_MISTRAL_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{ ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ ' ' + content['text'] }}{% endfor %}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)

_CORPUS = """\
USER: What is in this picture? ASSISTANT: The picture shows a red car parked next to a tree.
[INST] Describe the image. [/INST] A small dog sits on green grass under a blue sky.
What color is it? It is yellow. How many people are there? There are three people.
Where is the cat? The cat is on the left, near the window, on top of a wooden table.
Is there any text in the photo? Yes, a sign says OPEN. The woman wears a dark uniform.
Explain the chart: sales rise from January to June, then fall in July. 0 1 2 3 4 5 6 7 8 9
"""
_SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
_KINDS = ("llava", "llava_next")


def tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained in-process, with LLaVA's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


def make_tiny_llava(
    path: str | Path, kind: str = "llava", *, width: int = 64, layers: int = 2, seed: int = 0
) -> str:
    """Build a tiny random LLaVA (``kind="llava"``) or LLaVA-NeXT (``"llava_next"``) checkpoint.

    ``width`` >= 64 keeps every linear layer wide enough for bitsandbytes 4-bit on the CPU.
    Returns the folder, ready for ``Model(path)`` or ``from_pretrained(path)``.
    """
    if kind not in _KINDS:
        from llava_nb.errors import LlavaError

        raise LlavaError(f"unknown tiny checkpoint kind {kind!r}; use one of {', '.join(_KINDS)}")
    import torch

    path = Path(path)
    tok = tokenizer()
    size = 32
    vision = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                  num_attention_heads=4, image_size=size, patch_size=8)  # fmt: skip
    text = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=4,
                max_position_embeddings=1024)  # fmt: skip
    pinpoints = [[size, 2 * size], [2 * size, size], [2 * size, 2 * size]]
    model_class, config, processor = llava_parts(kind, tok, vision, text, pinpoints=pinpoints)
    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


# The shape of llava-hf/llava-1.5-7b-hf (CLIP ViT-L/14 at 336 px, a LLaMA-2-7B), for benchmarks
# on random weights: the numbers of interest (speed, memory) do not depend on the weight values.
LLAVA_7B_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                       num_attention_heads=16, image_size=336, patch_size=14)  # fmt: skip
LLAVA_7B_TEXT = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32,
                     max_position_embeddings=4096, vocab_size=32064)  # fmt: skip


def llava_parts(kind: str, tok, vision: dict, text: dict, *, pinpoints: list | None = None):
    """The model class, config and processor of a LLaVA-1.5 (``kind="llava"``) or LLaVA-NeXT
    (``"llava_next"``) checkpoint with the given CLIP and LLaMA settings, laid out like the
    llava-hf ones (vision feature layer -2, CLS dropped, their chat templates). `text` may set
    ``vocab_size`` wider than the tokenizer; NeXT's `pinpoints` default to LLaVA-1.6's five."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    size, patch = vision["image_size"], vision["patch_size"]
    text_config = LlamaConfig(
        **{"vocab_size": len(tok), **text},
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    common = dict(
        vision_config=CLIPVisionConfig(**vision, projection_dim=vision["hidden_size"]),
        text_config=text_config,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    images = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    shared = dict(tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
                  num_additional_image_tokens=1)  # fmt: skip
    if kind == "llava":
        processor = LlavaProcessor(
            image_processor=CLIPImageProcessor(**images), chat_template=LLAVA_15_TEMPLATE, **shared
        )
        return LlavaForConditionalGeneration, LlavaConfig(**common), processor
    pinpoints = pinpoints or [[size, 2 * size], [2 * size, size], [2 * size, 2 * size],
                              [3 * size, size], [size, 3 * size]]  # fmt: skip
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(**images, image_grid_pinpoints=pinpoints),
        chat_template=LLAVA_NEXT_MISTRAL_TEMPLATE,
        **shared,
    )
    config = LlavaNextConfig(image_grid_pinpoints=pinpoints, **common)
    return LlavaNextForConditionalGeneration, config, processor
