"""Tiny random-weight vision-language models built from configs, for tests and examples.

Contract:
- `build_tiny(arch, seed=0, dtype=torch.float32)` returns `(model, processor)` for one of `ARCHS`.
  The model is the real transformers class for that architecture (so every code path the engine
  hooks is the real one), with random weights that depend only on `seed`, cast to `dtype`, in
  eval mode. The processor is the real processor class with a locally built tokenizer: nothing is
  downloaded, and a build takes a few tens of milliseconds.
- The tokenizer is a word-level vocabulary of a few hundred lowercase English words and
  punctuation; any other word maps to the unk token. It has eos and pad tokens (distinct), pads on
  the left (as batched generation needs), and a chat template, so
  `processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
  {"type": "text", "text": "..."}]}], add_generation_prompt=True)` works for every arch.
- The model config, its text config and `model.generation_config` agree with the tokenizer on
  the bos / eos / pad ids.
- `save_tiny(arch, path, seed=0)` writes model and processor to `path`; they reload with
  `AutoModelForImageTextToText.from_pretrained(path)` and `veridical.processing.load_processor`.

Sizes are chosen so every path the engine cares about is exercised: 2 decoder layers, 4 query
heads over 2 key/value heads (GQA), more than one image token per image, and for Qwen3-VL-MoE
sparse MoE layers (4 experts, top-2) in every decoder layer.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerFast
from transformers.processing_utils import ProcessorMixin

from veridical.processing import image_only_processor_class

ARCHS = ("llava", "llava-next", "qwen2-vl", "qwen2.5-vl", "qwen3-vl-moe")
# Text-only models (no image input): a dense Llama and a sparse Qwen3-MoE. Their processor is
# the tokenizer itself.
TEXT_ARCHS = ("llama", "qwen3-moe")

# Larger than the transformers default (0.02) so logits are spread out: near-ties would make
# greedy choices flip on float noise between batched and unbatched runs.
_INIT_RANGE = 0.1

# Text model shared by every arch: head_dim = 64 / 4 = 16.
_HIDDEN = 64
_INTERMEDIATE = 128
_LAYERS = 2
_HEADS = 4
_KV_HEADS = 2
_HEAD_DIM = _HIDDEN // _HEADS
# Qwen M-RoPE splits head_dim / 2 rotary frequencies between (temporal, height, width).
_MROPE_SECTION = [2, 3, 3]

# Qwen vision: 8-pixel patches merged 2x2, so one image token per 16x16 pixels; images are
# resized to between 32x32 (4 tokens) and 64x64 (16 tokens).
_QWEN_PATCH = 8
_QWEN_MERGE = 2
_QWEN_MIN_PIXELS = 32 * 32
_QWEN_MAX_PIXELS = 64 * 64

# LLaVA vision: 32x32 images in 8-pixel patches, 16 image tokens (plus CLIP's class token, dropped
# by the "default" feature selection).
_LLAVA_IMAGE = 32
_LLAVA_PATCH = 8
# LLaVA-NeXT tiles: the base 32x32 view plus up to 2x2 tiles of it.
_LLAVA_NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64]]

_PUNCTUATION = (".", ",", "?", "!", ":", ";", "'", '"', "-", "(", ")", "/")

# Ordinary words, COCO object names among them so that POPE/CHAIR-style prompts tokenise to words.
_WORDS = """
a an the this that these those there here it its is are was were be been being am do does did
have has had not no yes and or but if then so because of in on at to from with without by for
about above below under over between behind near next into onto out up down left right top bottom
front back middle side inside outside around one two three four five six seven eight nine ten
many some any all each every more most few several other another same different only also very
too just what which who whom whose where when why how can could will would should may might must
i you he she we they me him her us them my your his our their image picture photo scene view
describe description detail details detailed please answer question word words short sentence
see seen look looks looking show shows shown contain contains present visible appear appears
color colour red green blue yellow black white brown orange pink purple gray grey dark light
bright big small large little tall long round square old new young happy open closed empty full
person people man woman men women boy girl child children baby player crowd group family
bicycle car motorcycle airplane bus train truck boat traffic signal fire hydrant stop sign
parking meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella
handbag tie suitcase frisbee skis snowboard sports ball kite baseball bat glove skateboard
surfboard tennis racket bottle wine glass cup fork knife spoon bowl banana apple sandwich
orange broccoli carrot hot pizza donut cake chair couch potted plant bed dining table toilet tv
laptop mouse remote keyboard cell phone microwave oven toaster sink refrigerator book clock vase
scissors teddy hair drier toothbrush
tree trees grass sky cloud clouds sun water sea beach river lake mountain hill road street
building house window door wall floor room kitchen field park city snow rain
sitting standing walking running riding holding eating playing lying flying swimming wearing
parked carrying watching waiting using made
user assistant system
""".split()

_LLAVA_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
_QWEN_SPECIALS = (
    "<unk>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# LLaVA-1.5 style: "USER: <image>\n... ASSISTANT:". The words are lowercased by the normaliser.
_LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% else %} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Qwen ChatML style, an image as <|vision_start|><|image_pad|><|vision_end|>.
_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny(
    arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, head_dim: int = _HEAD_DIM
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Build `(model, processor)` for `arch` (one of `ARCHS`); see the module docstring.

    `head_dim` widens the text model (hidden size = 4 heads x `head_dim`); vLLM's CPU attention
    needs at least 32 (`veridical.vllm` tests use 32)."""
    builder = _BUILDERS.get(arch)
    if builder is None and arch not in TEXT_ARCHS:
        every = ARCHS + TEXT_ARCHS
        close = difflib.get_close_matches(str(arch), every, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(
            f"arch={arch!r} is not a tiny architecture; {hint}supported: {', '.join(every)}."
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r} must be an int, e.g. seed=0.")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r} must be a floating torch.dtype, e.g. torch.float32.")
    if head_dim not in (16, 32, 64):
        raise ValueError(f"head_dim={head_dim!r} must be 16, 32 or 64.")
    if builder is None:
        return _build_text(arch, seed, dtype, head_dim)
    config, processor = builder()
    _widen(config, head_dim)
    model = _instantiate(config, seed).to(dtype)
    _set_generation_ids(model, processor.tokenizer)
    return model.eval(), processor


def save_tiny(arch: str, path: str | Path, seed: int = 0, head_dim: int = _HEAD_DIM) -> Path:
    """Build `arch` with `seed` and save model and processor to the folder `path`; return it."""
    folder = Path(path)
    model, processor = build_tiny(arch, seed=seed, head_dim=head_dim)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# Tokenizer


def _build_tokenizer(
    specials: tuple[str, ...],
    *,
    bos: str | None,
    eos: str,
    pad: str,
    named: dict[str, str],
    chat_template: str,
    words: Iterable[str] = _WORDS,
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: specials first (ids 0..), then punctuation, then words."""
    vocab: dict[str, int] = {}
    for token in (*specials, *_PUNCTUATION, *words):
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos is not None:
        # LLaMA tokenizers prepend bos to every encoded text; the chat template does not write it.
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        extra_special_tokens=named,
        padding_side="left",
        model_max_length=512,
    )
    # Specials are matched before normalisation and pre-tokenisation, so "<|im_start|>user"
    # splits into two tokens and "<image>" is never lowercased or split on "<".
    tokenizer.add_special_tokens(
        {"extra_special_tokens": [t for t in specials if t != "<unk>"]},
        replace_extra_special_tokens=False,
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def _llava_tokenizer() -> PreTrainedTokenizerFast:
    return _build_tokenizer(
        _LLAVA_SPECIALS,
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        named={"image_token": "<image>"},
        chat_template=_LLAVA_CHAT_TEMPLATE,
    )


def llava_word_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A LLaVA-style word-level tokenizer over ``words`` (lowercase, in order, duplicates kept once).

    The same construction as the tiny LLaVA tokenizer (specials ``<unk> <s> </s> <pad> <image>``
    at ids 0-4, then punctuation, then ``words``; bos prepended; left padding; the LLaVA-1.5 chat
    template "USER: <image>\\n... ASSISTANT:"), with a caller-chosen vocabulary: the built-in
    SynthCOCO model uses the world's words (``veridical.world.train``).
    """
    words = [w.lower() for w in words]
    return _build_tokenizer(
        _LLAVA_SPECIALS,
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        named={"image_token": "<image>"},
        chat_template=_LLAVA_CHAT_TEMPLATE,
        words=words,
    )


def _qwen_tokenizer() -> PreTrainedTokenizerFast:
    return _build_tokenizer(
        _QWEN_SPECIALS,
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        named={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
        chat_template=_QWEN_CHAT_TEMPLATE,
    )


def _token_ids(tokenizer: PreTrainedTokenizerFast) -> dict:
    """Fields every text config takes for its special tokens."""
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


# ---------------------------------------------------------------------------------------------
# Per-architecture configs and processors


def _pil_class(name: str):
    # transformers 5 picks a torchvision backend for `name` when torchvision is installed and
    # warns when it falls back to PIL; ask for the PIL class directly where it exists.
    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


def _llama_text_config(tokenizer: PreTrainedTokenizerFast) -> dict:
    return {
        "model_type": "llama",
        "hidden_size": _HIDDEN,
        "intermediate_size": _INTERMEDIATE,
        "num_hidden_layers": _LAYERS,
        "num_attention_heads": _HEADS,
        "num_key_value_heads": _KV_HEADS,
        "max_position_embeddings": 512,
        "initializer_range": _INIT_RANGE,
        **_token_ids(tokenizer),
    }


def _clip_vision_config(image_size: int) -> dict:
    return {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": _LLAVA_PATCH,
        "projection_dim": 32,
        "initializer_range": _INIT_RANGE,
    }


def _llava():
    tokenizer = _llava_tokenizer()
    config = transformers.LlavaConfig(
        vision_config=_clip_vision_config(_LLAVA_IMAGE),
        text_config=_llama_text_config(tokenizer),
        image_token_index=tokenizer.image_token_id,
        image_seq_length=(_LLAVA_IMAGE // _LLAVA_PATCH) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    image_processor = _pil_class("CLIPImageProcessor")(
        size={"shortest_edge": _LLAVA_IMAGE},
        crop_size={"height": _LLAVA_IMAGE, "width": _LLAVA_IMAGE},
    )
    processor = transformers.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=_LLAVA_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token
        chat_template=_LLAVA_CHAT_TEMPLATE,
    )
    return config, processor


def _llava_next():
    tokenizer = _llava_tokenizer()
    config = transformers.LlavaNextConfig(
        vision_config=_clip_vision_config(_LLAVA_IMAGE),
        text_config=_llama_text_config(tokenizer),
        image_token_index=tokenizer.image_token_id,
        image_grid_pinpoints=_LLAVA_NEXT_PINPOINTS,
        image_seq_length=(_LLAVA_IMAGE // _LLAVA_PATCH) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    image_processor = _pil_class("LlavaNextImageProcessor")(
        size={"shortest_edge": _LLAVA_IMAGE},
        crop_size={"height": _LLAVA_IMAGE, "width": _LLAVA_IMAGE},
        image_grid_pinpoints=_LLAVA_NEXT_PINPOINTS,
    )
    processor = transformers.LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=_LLAVA_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_LLAVA_CHAT_TEMPLATE,
    )
    return config, processor


def _qwen_text_config(tokenizer: PreTrainedTokenizerFast, **extra) -> dict:
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(_MROPE_SECTION)}
    rope.update(extra.pop("rope_extra", {}))
    return {
        "hidden_size": _HIDDEN,
        "intermediate_size": _INTERMEDIATE,
        "num_hidden_layers": _LAYERS,
        "num_attention_heads": _HEADS,
        "num_key_value_heads": _KV_HEADS,
        "max_position_embeddings": 512,
        "initializer_range": _INIT_RANGE,
        "rope_parameters": rope,
        **_token_ids(tokenizer),
        **extra,
    }


def _qwen_token_fields(tokenizer: PreTrainedTokenizerFast) -> dict:
    """Top-level Qwen config fields naming the vision special tokens."""
    ids = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
    }


def _qwen_processor(class_name: str, tokenizer: PreTrainedTokenizerFast, **image_kwargs):
    image_processor = _pil_class("Qwen2VLImageProcessor")(
        min_pixels=_QWEN_MIN_PIXELS,
        max_pixels=_QWEN_MAX_PIXELS,
        patch_size=_QWEN_PATCH,
        merge_size=_QWEN_MERGE,
        temporal_patch_size=2,
        **image_kwargs,
    )
    # Qwen processors cannot be built without torchvision; see veridical.processing.
    return image_only_processor_class(class_name)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=_QWEN_CHAT_TEMPLATE
    )


def _qwen_vision_config(**extra) -> dict:
    """The vision tower fields Qwen2-VL, Qwen2.5-VL and Qwen3-VL share, plus ``extra``."""
    return {
        "depth": 2,
        "num_heads": 2,
        "patch_size": _QWEN_PATCH,
        "spatial_merge_size": _QWEN_MERGE,
        "temporal_patch_size": 2,
        "initializer_range": _INIT_RANGE,
        **extra,
    }


def _qwen2_vl():
    tokenizer = _qwen_tokenizer()
    config = transformers.Qwen2VLConfig(
        text_config=_qwen_text_config(tokenizer),
        vision_config=_qwen_vision_config(
            embed_dim=32,
            hidden_size=_HIDDEN,  # the merger's output size, i.e. the text hidden size
            mlp_ratio=2,
        ),
        **_qwen_token_fields(tokenizer),
    )
    return config, _qwen_processor("Qwen2VLProcessor", tokenizer)


def _qwen2_5_vl():
    tokenizer = _qwen_tokenizer()
    config = transformers.Qwen2_5_VLConfig(
        text_config=_qwen_text_config(tokenizer),
        vision_config=_qwen_vision_config(
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=_HIDDEN,
            # Windows of 32 pixels (2x2 merged tokens) in block 0, full attention in block 1.
            window_size=32,
            fullatt_block_indexes=[1],
        ),
        **_qwen_token_fields(tokenizer),
    )
    return config, _qwen_processor("Qwen2_5_VLProcessor", tokenizer)


def _qwen3_vl_moe():
    tokenizer = _qwen_tokenizer()
    text_config = _qwen_text_config(
        tokenizer,
        head_dim=_HEAD_DIM,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        decoder_sparse_step=1,  # every decoder layer is a sparse MoE layer
        rope_extra={"mrope_interleaved": True},
    )
    config = transformers.Qwen3VLMoeConfig(
        text_config=text_config,
        vision_config=_qwen_vision_config(
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=_HIDDEN,
            # Learned position table of 8x8 patches, interpolated to each image's grid.
            num_position_embeddings=64,
            # Features of vision block 1 are added to the first text layer's hidden states.
            deepstack_visual_indexes=[1],
        ),
        **_qwen_token_fields(tokenizer),
    )
    processor = _qwen_processor(
        "Qwen3VLProcessor", tokenizer, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]
    )
    return config, processor


_TEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _widen(config: PreTrainedConfig, head_dim: int) -> None:
    """Give the text model `head_dim`-wide heads (hidden size `_HEADS * head_dim`), and the
    vision tower's output the new hidden size; M-RoPE sections scale along."""
    if head_dim == _HEAD_DIM:
        return
    scale = head_dim // _HEAD_DIM
    text = config.get_text_config()
    text.hidden_size = _HEADS * head_dim
    text.head_dim = head_dim
    rope = getattr(text, "rope_parameters", None) or {}
    if "mrope_section" in rope:
        rope["mrope_section"] = [s * scale for s in rope["mrope_section"]]
    vision = getattr(config, "vision_config", None)
    if vision is not None and getattr(vision, "model_type", "") != "clip_vision_model":
        field = "out_hidden_size" if hasattr(vision, "out_hidden_size") else "hidden_size"
        setattr(vision, field, text.hidden_size)


def _build_text(arch: str, seed: int, dtype: torch.dtype, head_dim: int = _HEAD_DIM):
    """A text-only causal LM (`llama` dense or `qwen3-moe` sparse) and its tokenizer."""
    tokenizer = _build_tokenizer(
        ("<unk>", "<s>", "</s>", "<pad>"), bos="<s>", eos="</s>", pad="<pad>", named={},
        chat_template=_TEXT_CHAT_TEMPLATE,
    )
    fields = _llama_text_config(tokenizer)
    fields.pop("model_type")
    fields.update(hidden_size=_HEADS * head_dim, head_dim=head_dim)
    if arch == "llama":
        config = transformers.LlamaConfig(**fields)
    else:
        config = transformers.Qwen3MoeConfig(
            **fields, num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=_INTERMEDIATE // 2, decoder_sparse_step=1,
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
    _set_generation_ids(model, tokenizer)
    return model.to(dtype).eval(), tokenizer


# Keys in the order of ARCHS (tests check they agree).
_BUILDERS = {
    "llava": _llava,
    "llava-next": _llava_next,
    "qwen2-vl": _qwen2_vl,
    "qwen2.5-vl": _qwen2_5_vl,
    "qwen3-vl-moe": _qwen3_vl_moe,
}


# ---------------------------------------------------------------------------------------------
# Model


def _instantiate(config: PreTrainedConfig, seed: int) -> PreTrainedModel:
    """The model for `config` with weights drawn from `seed`, leaving the global RNG untouched."""
    # fork_rng restores the CPU generator afterwards, so building a model never shifts the random
    # stream of the caller (a test that samples after building gets the same draws either way).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.AutoModelForImageTextToText.from_config(config)


def _set_generation_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> None:
    # generate() reads these from generation_config; composite configs do not always copy them
    # from the text config, so set them in both places.
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    text_config = model.config.get_text_config()
    for name, value in ids.items():
        setattr(text_config, name, value)
        setattr(model.generation_config, name, value)
