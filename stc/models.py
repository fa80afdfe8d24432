"""LLaVA-OneVision models by name: published architectures with random weights, an offline tiny model,
an offline tokenizer/processor, checkpoint download and loading, and frame preprocessing.

Nothing here needs the network except `download_checkpoint` / `load_model` of a hub id.

    model, processor = build_model("tiny")                      # a few hundred thousand parameters
    model, processor = build_model("llava-ov-7b", dtype=torch.bfloat16, device="cuda")  # random weights
    model, processor = load_model("llava-hf/llava-onevision-qwen2-7b-ov-hf", device="cuda")
    pixels = preprocess_frames(processor, frames)                # [F, H, W, 3] uint8 -> [F, 3, S, S]

Command line:
    python -m stc.models download llava-hf/llava-onevision-qwen2-7b-ov-hf [--cache-dir DIR]   # default data/models/hf
    python -m stc.models save-tiny PATH [--seed N]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from huggingface_hub import snapshot_download
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
from tokenizers import models as tokenizer_models
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    GenerationConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.image_utils import PILImageResampling
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

from stc.paths import Paths

__all__ = [
    "ARCHITECTURES",
    "KNOWN_CHECKPOINTS",
    "KnownCheckpoint",
    "ModelUnavailableError",
    "SPECIAL_TOKENS",
    "TINY_BPE_VOCAB_SIZE",
    "TINY_VOCAB_SIZE",
    "architecture_config",
    "build_model",
    "build_tiny_processor",
    "build_tiny_tokenizer",
    "download_checkpoint",
    "load_model",
    "main",
    "preprocess_frames",
    "save_tiny_checkpoint",
]


class ModelUnavailableError(RuntimeError):
    """A checkpoint is neither on local disk nor downloadable from here (offline, no access, disk full...)."""


class KnownCheckpoint(NamedTuple):
    architecture: str  # key of ARCHITECTURES
    download_size: str  # approximate size of the safetensors weights


# Sizes: 7B = 8.03e9 parameters stored in fp16 (4 safetensors shards, ~16.1 GB);
# 0.5B = model.safetensors of 1.79 GB (file listing of llava-hf/llava-onevision-qwen2-0.5b-ov-hf).
KNOWN_CHECKPOINTS: dict[str, KnownCheckpoint] = {
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": KnownCheckpoint("llava-ov-7b", "16 GB"),
    "llava-hf/llava-onevision-qwen2-0.5b-ov-hf": KnownCheckpoint("llava-ov-0.5b", "1.8 GB"),
}

# Only the files from_pretrained needs; the 0.5B repo also carries ONNX exports.
_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja"]
_DOWNLOAD_EXCLUDE = ["onnx/*"]

# The chat/control tokens of Qwen2 and the two LLaVA placeholders, in Qwen's id order
# (151643..151647 in the real vocabulary; appended after the BPE vocabulary in the tiny one).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")
TINY_BPE_VOCAB_SIZE = 763  # byte alphabet (256) + 507 merges; with SPECIAL_TOKENS the vocabulary is 768
TINY_VOCAB_SIZE = TINY_BPE_VOCAB_SIZE + len(SPECIAL_TOKENS)


def _tiny_token_id(token: str) -> int:
    return TINY_BPE_VOCAB_SIZE + SPECIAL_TOKENS.index(token)


# SigLIP normalisation (google/siglip-so400m-patch14-384 preprocessor_config.json): mean = std = 0.5.
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


# ---------------------------------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------------------------------
# Sources of the published numbers:
# [A] config.json of llava-hf/llava-onevision-qwen2-7b-ov-hf, seen in its commit bd59bb6 ("Upload
#     LlavaOnevisionForConditionalGeneration"): text_config Qwen/Qwen2-7B-Instruct, hidden 3584,
#     intermediate 18944, 28 layers, 28 heads, 4 KV heads, rope_theta 1e6, vocab_size 152128,
#     eos 151645, tie_word_embeddings false, image_token_index 151646, vision_aspect_ratio anyres_max_9,
#     vision_config hidden 1152, image_size 384, intermediate 4304.
# [B] transformers' convert_llava_onevision_weights_to_hf.py, which produced both llava-hf configs:
#     text_config = the Qwen2-*-Instruct config; SigLIP-so400m with num_hidden_layers=26 (last layer
#     dropped), 16 heads, patch 14, vision_use_head=False; LlavaOnevisionConfig defaults otherwise
#     (image/video token 151646/151647, vision_feature_layer -1, vision_feature_select_strategy "full",
#     projector gelu, anyres_max_9, 6x6 grid pinpoints of 384 px); use_image_newline_parameter=True;
#     embeddings resized to vocab + 2 padded to a multiple of 64: 152064 -> 152128 (7B, matches [A]),
#     151936 -> 152000 (0.5B).
# [C] config.json of Qwen/Qwen2-7B-Instruct: max_position_embeddings 32768, max_window_layers 28,
#     rms_norm_eps 1e-6, rope_theta 1e6, sliding_window 131072 (use_sliding_window false), silu,
#     initializer_range 0.02, bos 151643, eos 151645, tie_word_embeddings false.
# [D] config.json of Qwen/Qwen2-0.5B-Instruct: hidden 896, intermediate 4864, 24 layers, 14 heads,
#     2 KV heads, max_position_embeddings 32768, max_window_layers 24, rms_norm_eps 1e-6,
#     rope_theta 1e6, sliding_window 32768 (use_sliding_window false), tie_word_embeddings true,
#     bos 151643, eos 151645.
# [E] generation_config.json of both llava-hf checkpoints: bos_token_id 151643, eos_token_id 151645.
# [F] file sizes: 0.5B model.safetensors 1.79 GB, i.e. ~0.89e9 fp16 parameters with the LM head tied to
#     the embeddings (an untied head would add 136M parameters).

_QWEN_BOS_ID = 151643  # <|endoftext|> [C][D][E]
_QWEN_EOS_ID = 151645  # <|im_end|> [C][D][E]


def _grid_pinpoints(image_size: int) -> list[list[int]]:
    """The anyres grid: every (h, w) of 1..6 tiles of image_size, rows outer ([B]; published at 384 px)."""
    return [[image_size * rows, image_size * cols] for rows in range(1, 7) for cols in range(1, 7)]


def _siglip_so400m_26_layers() -> SiglipVisionConfig:
    # [A][B]: SigLIP-so400m-patch14-384 without its last layer and without the pooling head.
    return SiglipVisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=26,
        num_attention_heads=16,
        num_channels=3,
        image_size=384,
        patch_size=14,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        attention_dropout=0.0,
        vision_use_head=False,
    )


def _llava_onevision_config(
    vision_config: SiglipVisionConfig,
    text_config: Qwen2Config,
    *,
    image_token_id: int,
    video_token_id: int,
) -> LlavaOnevisionConfig:
    # [B]: the LlavaOnevisionConfig defaults, spelled out so a transformers default change cannot move them.
    return LlavaOnevisionConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        video_token_index=video_token_id,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=_grid_pinpoints(vision_config.image_size),
        tie_word_embeddings=text_config.tie_word_embeddings,
        use_image_newline_parameter=True,  # published key; 5.x always has the image_newline parameter
    )


def llava_ov_7b_config() -> LlavaOnevisionConfig:
    """llava-hf/llava-onevision-qwen2-7b-ov-hf: SigLIP-so400m (26 layers) + Qwen2-7B-Instruct, 8.03e9 params."""
    text_config = Qwen2Config(
        vocab_size=152128,  # [A][B]
        hidden_size=3584,  # [A]
        intermediate_size=18944,  # [A]
        num_hidden_layers=28,  # [A]
        num_attention_heads=28,  # [A]
        num_key_value_heads=4,  # [A]
        hidden_act="silu",  # [C]
        max_position_embeddings=32768,  # [C]
        initializer_range=0.02,  # [C]
        rms_norm_eps=1e-6,  # [C]
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},  # [A][C]
        use_sliding_window=False,  # [C]
        sliding_window=131072,  # [C] (unused: use_sliding_window is false)
        max_window_layers=28,  # [C]
        tie_word_embeddings=False,  # [A]
        bos_token_id=_QWEN_BOS_ID,
        eos_token_id=_QWEN_EOS_ID,
    )
    return _llava_onevision_config(
        _siglip_so400m_26_layers(), text_config, image_token_id=151646, video_token_id=151647
    )


def llava_ov_05b_config() -> LlavaOnevisionConfig:
    """llava-hf/llava-onevision-qwen2-0.5b-ov-hf: SigLIP-so400m (26 layers) + Qwen2-0.5B-Instruct.

    0.89e9 parameters (the LM head shares the embedding matrix).
    """
    text_config = Qwen2Config(
        vocab_size=152000,  # [B]: 151936 + 2 padded to 64; consistent with the 1.79 GB file [F]
        hidden_size=896,  # [D]
        intermediate_size=4864,  # [D]
        num_hidden_layers=24,  # [D]
        num_attention_heads=14,  # [D]
        num_key_value_heads=2,  # [D]
        hidden_act="silu",  # [D]
        max_position_embeddings=32768,  # [D]
        initializer_range=0.02,  # [D]
        rms_norm_eps=1e-6,  # [D]
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},  # [D]
        use_sliding_window=False,  # [D]
        sliding_window=32768,  # [D] (unused)
        max_window_layers=24,  # [D]
        tie_word_embeddings=True,  # [D][F]
        bos_token_id=_QWEN_BOS_ID,
        eos_token_id=_QWEN_EOS_ID,
    )
    return _llava_onevision_config(
        _siglip_so400m_26_layers(), text_config, image_token_id=151646, video_token_id=151647
    )


def tiny_config() -> LlavaOnevisionConfig:
    """The same architecture family at toy size, for CPU tests and the tiny profile.

    SigLIP: 112 px, patch 14 -> 8x8 = 64 tokens per frame (2x2 pooling -> 16), hidden 64, 2 layers,
    4 heads. Qwen2: hidden 64, 2 layers, 4 heads, 2 KV heads (GQA like the 7B), untied head like the
    7B, vocabulary = the tiny tokenizer's. A few hundred thousand parameters.
    """
    vision_config = SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_channels=3,
        image_size=112,
        patch_size=14,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )
    text_config = Qwen2Config(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=32768,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        use_sliding_window=False,
        tie_word_embeddings=False,
        bos_token_id=_tiny_token_id("<|endoftext|>"),
        eos_token_id=_tiny_token_id("<|im_end|>"),
        pad_token_id=_tiny_token_id("<|endoftext|>"),
    )
    return _llava_onevision_config(
        vision_config,
        text_config,
        image_token_id=_tiny_token_id("<image>"),
        video_token_id=_tiny_token_id("<video>"),
    )


ARCHITECTURES: dict[str, Callable[[], LlavaOnevisionConfig]] = {
    "llava-ov-7b": llava_ov_7b_config,
    "llava-ov-0.5b": llava_ov_05b_config,
    "tiny": tiny_config,
}


def architecture_config(arch: str) -> LlavaOnevisionConfig:
    """A fresh config of a named architecture (callers may modify it)."""
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"Unknown architecture {arch!r}; known architectures: {', '.join(sorted(ARCHITECTURES))}. "
            "For a checkpoint folder or hub id use load_model()."
        )
    return ARCHITECTURES[arch]()


# ---------------------------------------------------------------------------------------------------
# Offline tiny tokenizer and processor
# ---------------------------------------------------------------------------------------------------
# Training text for the tiny BPE. Any text still encodes (the byte alphabet is always in the
# vocabulary); these words just get short encodings. The prompt lines (ReKV / StreamingBench /
# OVO-Bench templates, colours, shapes, digits, Yes/No) are weighted up so they become whole tokens.
_TINY_PROMPT_TEXT = (
    "system\nYou are a helpful assistant.",
    "user assistant",
    "Question: What is the colour of the object?",
    "Options:",
    "(A) red\n(B) green\n(C) blue\n(D) yellow",
    "A. red B. green C. blue D. yellow E. none",
    "Only give the best option.",
    "Best option: (",
    "The best option is:",
    "Answer with the option's letter from the given choices directly.",
    "Yes No yes no",
    "0 1 2 3 4 5 6 7 8 9 10",
    "red orange yellow green blue purple pink brown black white gray",
    "circle square triangle rectangle star hexagon diamond",
    "How many times did they do it?",
)
_TINY_PROMPT_WEIGHT = 8
_TINY_GENERAL_TEXT = (
    "zero one two three four five six seven eight nine ten eleven twelve twenty hundred",
    "first second third fourth fifth last next previous",
    "violet silver gold dark light bright pale colour color colours colors grey",
    "pentagon ellipse oval cross heart shape shapes cube sphere cylinder cone line dot arrow",
    "big small large tiny tall short long wide round flat",
    "left right top bottom middle center centre above below behind front inside outside near far",
    "up down on under over between next to in of at by with from into onto",
    "How many objects are on the table?",
    "What is the person doing right now?",
    "What happened before the man opened the door?",
    "What will happen next in the video?",
    "Where is the ball at the end of the clip?",
    "Which object appears first in the scene?",
    "Who is holding the cup?",
    "Why did the woman stop walking?",
    "When does the car turn left?",
    "Is it possible to answer the question now?",
    "Has the step been completed yet?",
    "Describe what is happening in the video.",
    "Summarize the clip in one sentence.",
    "Count the number of people in the room.",
    "Read the text shown on the sign.",
    "the a an this that these those it they he she we you I is are was were be been being",
    "have has had do does did will would can could should may might must not and or but if then",
    "what which who whom whose where when why how",
    "person people man woman boy girl child children player players team crowd hand hands face head",
    "car bus truck bike bicycle train boat plane road street building house room kitchen table chair",
    "door window wall floor bed sofa desk screen phone computer book paper pen cup bottle box bag",
    "dog cat bird horse fish animal tree flower grass water sky sun cloud rain snow fire",
    "ball game goal score field court line net shot pass kick throw catch jump run",
    "walk walking run running sit sitting stand standing open opening close closing hold holding",
    "pick picks put puts take takes move moves moving turn turns turning push pull cut cook cooking",
    "play playing eat eating drink drinking talk talking look looking watch watching write writing",
    "video frame frames scene scenes camera clip clips moment moments time timestamp second seconds",
    "minute minutes hour hours start end beginning middle before after during while until",
    "event events action actions activity step steps task tasks order sequence again",
    "object objects item items thing things number numbers count counting total",
    "text sign label word words letter letters title caption",
    "spatial temporal causal reasoning perception understanding summary summarise summarize",
    "attribute attributes relation relationship prospective real time realtime online offline",
    "correct incorrect true false answer answers question questions option options choice choices",
    "The man in the red shirt picks up a blue cup from the table.",
    "A woman walks to the door and opens it.",
    "Two players pass the ball and one of them scores a goal.",
    "The camera moves to the left and shows a green tree.",
    "There are three yellow triangles and two purple circles on the screen.",
    "The dog runs after the white ball in the park.",
    "She puts the book on the shelf next to the window.",
    "He is cutting vegetables in the kitchen.",
    "The car stops at the red light and then turns right.",
    "A child is drawing a star with an orange pen.",
    "The numbers on the screen change from 1 to 9.",
    "At the beginning of the video a person is standing near the bus.",
    "In the end everyone leaves the room.",
    "What does the text on the white sign say?",
    "What colour is the square in the top left corner?",
    "Which shape is moving fastest?",
    "How many red circles are there in total?",
    "Is the light on or off?",
    "Did the man open the box before the woman arrived?",
    "Please answer yes or no. The answer is A. The answer is B. The answer is C. The answer is D.",
)

# A ChatML template like Qwen2's: content items rendered in order, images and videos as one placeholder.
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'video' %}<video>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer() -> Qwen2Tokenizer:
    """A Qwen2-style byte-level BPE tokenizer built offline, deterministically (same ids every build).

    BPE of TINY_BPE_VOCAB_SIZE tokens trained on a built-in corpus with Qwen2's pre-tokenizer and NFC
    normaliser, then SPECIAL_TOKENS appended in Qwen's order. eos = <|im_end|>, pad = <|endoftext|>;
    `tokenizer.image_token` / `tokenizer.video_token` are <image> / <video>.
    """
    bpe = Tokenizer(tokenizer_models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_BPE_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    bpe.train_from_iterator(_TINY_PROMPT_TEXT * _TINY_PROMPT_WEIGHT + _TINY_GENERAL_TEXT, trainer=trainer)
    trained = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(trained["vocab"])
    merges = [tuple(pair) for pair in trained["merges"]]
    if len(vocab) != TINY_BPE_VOCAB_SIZE:
        # Only a change of the corpus or of the tokenizers library can get here.
        raise RuntimeError(
            f"The tiny BPE has {len(vocab)} tokens instead of {TINY_BPE_VOCAB_SIZE}: the built-in corpus "
            "has too few distinct pairs; extend _TINY_GENERAL_TEXT or lower TINY_BPE_VOCAB_SIZE."
        )
    for token in SPECIAL_TOKENS:
        vocab[token] = _tiny_token_id(token)

    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
        model_max_length=32768,
    )
    tokenizer.add_special_tokens(
        {"extra_special_tokens": ["<|im_start|>", "<|im_end|>"]}, replace_extra_special_tokens=False
    )
    return tokenizer


def build_tiny_processor(image_size: int = 112, patch_size: int = 14) -> LlavaOnevisionProcessor:
    """A LlavaOnevisionProcessor around the tiny tokenizer, with image and video processors at image_size.

    Bicubic resize to image_size x image_size, rescale 1/255, SigLIP normalisation (mean = std = 0.5),
    anyres grid of image_size tiles, (image_size // patch_size)^2 tokens per image (27^2 = 729 at 384 px),
    ChatML chat template.
    """
    if not 0 < patch_size <= image_size:
        raise ValueError(
            f"patch_size must be in 1..image_size, got patch_size {patch_size} and image_size {image_size}."
        )
    common = dict(
        size={"height": image_size, "width": image_size},
        resample=PILImageResampling.BICUBIC,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(SIGLIP_MEAN),
        image_std=list(SIGLIP_STD),
        do_convert_rgb=True,
    )
    image_processor = LlavaOnevisionImageProcessor(image_grid_pinpoints=_grid_pinpoints(image_size), **common)
    video_processor = LlavaOnevisionVideoProcessor(**common)
    return LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=build_tiny_tokenizer(),
        video_processor=video_processor,
        num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
        chat_template=_CHAT_TEMPLATE,
        vision_aspect_ratio="anyres_max_9",
    )


# ---------------------------------------------------------------------------------------------------
# Random-weight models
# ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _seeded_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Seed torch's RNG for the block and restore the caller's RNG state afterwards."""
    cuda_devices = []
    if device.type == "cuda":
        cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        yield


def _generation_config(config: LlavaOnevisionConfig) -> GenerationConfig:
    text = config.text_config
    return GenerationConfig(
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
        pad_token_id=text.pad_token_id,
    )


def build_model(
    arch: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> tuple[LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor]:
    """A named architecture with random weights, in eval mode, and its processor. No download.

    The weights are allocated directly on `device` in `dtype` and initialised there (the 7B on a GPU
    needs no fp32 CPU copy and initialises in well under a second); the same seed gives the same weights
    on the same device. device="meta" gives shapes only (e.g. to count parameters).

    The processor is always the offline tiny-tokenizer processor at the architecture's image size.
    For "tiny" its token ids match the config (image/video/eos ids). For "llava-ov-7b" / "llava-ov-0.5b"
    the config keeps the published ids (<image> 151646, <video> 151647) while the tiny tokenizer's ids
    are < 768: ids are in range, which is all latency work needs, but text from this tokenizer means
    nothing to these models and its <video> placeholder is not the model's (feed visual features as
    embeddings, or use load_model() of a real checkpoint for its real tokenizer).
    """
    config = architecture_config(arch)
    device = torch.device(device)
    with _seeded_rng(device, seed), device:
        model = AutoModelForImageTextToText.from_config(
            config, dtype=dtype, attn_implementation=attn_implementation
        )
    model.eval()
    model.generation_config = _generation_config(model.config)
    vision = model.config.vision_config
    processor = build_tiny_processor(image_size=vision.image_size, patch_size=vision.patch_size)
    return model, processor


def save_tiny_checkpoint(path: str | os.PathLike, seed: int = 0) -> Path:
    """Build "tiny" with `seed` and save model + processor to `path` (a folder load_model() reads)."""
    path = Path(path)
    model, processor = build_model("tiny", seed=seed)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def _looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and ".." not in name


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _unavailable_message(repo_id: str, cache_dir: str | os.PathLike | None, error: BaseException) -> str:
    known = KNOWN_CHECKPOINTS.get(repo_id)
    size = f"about {known.download_size}" if known else "of unknown size"
    cache_option = f" --cache-dir {cache_dir}" if cache_dir is not None else ""
    excludes = "".join(f' --exclude "{pattern}"' for pattern in _DOWNLOAD_EXCLUDE)
    return (
        f"Model {repo_id!r} is not in the local cache and could not be downloaded "
        f"({type(error).__name__}: {error}). Its weights are {size}. "
        f"On a machine with network access run\n"
        f"    hf download {repo_id}{cache_option}{excludes}\n"
        f"(or: python -m stc.models download {repo_id}{cache_option}) and make that cache folder "
        "available here (pass it as cache_dir). Without it, build_model('tiny') and the tiny profile run "
        "fully offline."
    )


def download_checkpoint(repo_id: str, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """Download (or find in the cache) a hub checkpoint; returns its local snapshot folder.

    Resumable: an interrupted download continues where it stopped. Honours HF_HUB_OFFLINE /
    TRANSFORMERS_OFFLINE at call time (cache only). Any failure raises ModelUnavailableError.
    """
    if not _looks_like_hub_id(repo_id):
        raise ValueError(f"{repo_id!r} is not a hub id of the form 'owner/name'.")
    offline = _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE")
    try:
        folder = snapshot_download(
            repo_id=repo_id,
            cache_dir=cache_dir,
            allow_patterns=_DOWNLOAD_PATTERNS,
            ignore_patterns=_DOWNLOAD_EXCLUDE,
            local_files_only=offline,
        )
    except Exception as error:  # network, offline mode, missing repo, auth, disk: all mean "not available"
        raise ModelUnavailableError(_unavailable_message(repo_id, cache_dir, error)) from error
    return Path(folder)


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    attn_implementation: str = "sdpa",
) -> tuple[LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor]:
    """Load a LLaVA-OneVision checkpoint and its processor, in eval mode.

    name_or_path: a local folder written by save_pretrained (e.g. save_tiny_checkpoint), or a hub id
        such as "llava-hf/llava-onevision-qwen2-7b-ov-hf" (see KNOWN_CHECKPOINTS), downloaded into
        cache_dir first (resumable).
    dtype: None keeps the dtype stored in the checkpoint.
    device: where the weights end up; with `accelerate` installed they load straight onto a GPU,
        otherwise through CPU memory (the 7B needs ~16 GB of RAM for that).
    Raises ValueError for a name that is neither an existing folder nor a hub id, and
    ModelUnavailableError when a hub checkpoint cannot be downloaded.
    """
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        folder = path
    elif path.exists():
        raise ValueError(f"{name!r} is a file; pass the checkpoint folder that holds config.json.")
    elif _looks_like_hub_id(name):
        folder = download_checkpoint(name, cache_dir=cache_dir)
    else:
        raise ValueError(
            f"{name!r} is neither an existing folder nor a hub id 'owner/name'. Known hub checkpoints: "
            f"{', '.join(KNOWN_CHECKPOINTS)}; for random weights use build_model() with one of "
            f"{', '.join(sorted(ARCHITECTURES))}."
        )
    device = torch.device(device)
    placement = {}
    if device.type != "cpu" and importlib.util.find_spec("accelerate") is not None:
        placement["device_map"] = device  # weights go straight to the device (transformers needs accelerate)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        folder,
        dtype="auto" if dtype is None else dtype,
        attn_implementation=attn_implementation,
        **placement,
    )
    if not placement:
        model.to(device)
    model.eval()
    processor = AutoProcessor.from_pretrained(folder)
    return model, processor


# ---------------------------------------------------------------------------------------------------
# Frames
# ---------------------------------------------------------------------------------------------------
def preprocess_frames(
    processor: LlavaOnevisionProcessor | LlavaOnevisionVideoProcessor, frames: np.ndarray
) -> torch.Tensor:
    """Decoded RGB frames -> the vision tower's pixel input, exactly as the video processor makes it.

    frames: [F, H, W, 3] uint8 (e.g. from decord). Returns [F, 3, S, S] float32 on the CPU (S = the
    processor's size), bicubic-resized, rescaled and normalised; the caller casts and moves it.
    """
    if not isinstance(frames, np.ndarray):
        raise ValueError(f"frames must be a numpy array [F, H, W, 3] of uint8, got {type(frames).__name__}.")
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(
            f"frames must be [F, H, W, 3] uint8 RGB with F >= 1, got shape {frames.shape} "
            f"dtype {frames.dtype}; "
            "decode with decord (e.g. VideoReader(...).get_batch(indices).asnumpy())."
        )
    video_processor = getattr(processor, "video_processor", processor)
    pixels = video_processor(videos=[frames], return_tensors="pt")["pixel_values_videos"]
    return pixels[0].to(torch.float32).contiguous()


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stc.models", description="Fetch LLaVA-OneVision checkpoints or write the tiny one."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    download = commands.add_parser("download", help="download a hub checkpoint into the cache (resumable)")
    download.add_argument("name", help=f"hub id, e.g. {next(iter(KNOWN_CHECKPOINTS))}")
    download.add_argument("--cache-dir", default=None,
                          help="cache folder (default: data/models/hf under STC_ROOT or the repository, where the workflow looks)")
    save_tiny = commands.add_parser("save-tiny", help="save the offline tiny checkpoint to a folder")
    save_tiny.add_argument("path")
    save_tiny.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "download":
        if not _looks_like_hub_id(args.name):
            parser.error(f"{args.name!r} is not a hub id 'owner/name'; known: {', '.join(KNOWN_CHECKPOINTS)}")
        try:
            cache_dir = args.cache_dir if args.cache_dir is not None else Paths().hf_cache
            folder = download_checkpoint(args.name, cache_dir=cache_dir)
        except ModelUnavailableError as error:
            print(error, file=sys.stderr)
            return 1
        print(folder)
        return 0
    print(save_tiny_checkpoint(args.path, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
