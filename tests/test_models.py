"""Tests of stc.models: named architectures, the offline tokenizer/processor, checkpoints, frames."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlavaOnevisionVideoProcessor
from transformers.image_utils import PILImageResampling

from stc import models
from stc.models import (
    ARCHITECTURES,
    KNOWN_CHECKPOINTS,
    ModelUnavailableError,
    build_model,
    build_tiny_processor,
    build_tiny_tokenizer,
    load_model,
    preprocess_frames,
    save_tiny_checkpoint,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
HUB_7B = "llava-hf/llava-onevision-qwen2-7b-ov-hf"
HUB_05B = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def _random_frames(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, height, width, 3), dtype=np.uint8)


def _video_inputs(processor, frames: np.ndarray, question: str = "What colour is the circle?"):
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    return processor(text=[prompt], videos=[frames], return_tensors="pt")


def _parameter_count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


# ---------------------------------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------------------------------
def test_architecture_names_and_unknown_name():
    assert set(ARCHITECTURES) == {"llava-ov-7b", "llava-ov-0.5b", "tiny"}
    with pytest.raises(ValueError, match="llava-ov-0.5b.*llava-ov-7b.*tiny"):
        build_model("llava-ov-13b")
    # Each call returns a fresh config, so callers may edit theirs.
    assert ARCHITECTURES["tiny"]() is not ARCHITECTURES["tiny"]()


def test_7b_config_has_the_published_numbers():
    config = ARCHITECTURES["llava-ov-7b"]()
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.intermediate_size) == (3584, 18944)
    assert (text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (28, 28, 4)
    assert text.vocab_size == 152128
    assert text.rope_parameters["rope_theta"] == 1_000_000.0
    assert text.max_position_embeddings == 32768
    assert text.rms_norm_eps == 1e-6
    assert text.sliding_window is None  # use_sliding_window is false in Qwen2-7B-Instruct
    assert (text.bos_token_id, text.eos_token_id) == (151643, 151645)
    assert config.tie_word_embeddings is False and text.tie_word_embeddings is False
    assert (vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers) == (1152, 4304, 26)
    assert (vision.num_attention_heads, vision.image_size, vision.patch_size) == (16, 384, 14)
    assert vision.vision_use_head is False
    assert vision.hidden_act == "gelu_pytorch_tanh"
    assert (config.image_token_id, config.video_token_id) == (151646, 151647)
    assert config.vision_feature_layer == -1
    assert config.vision_feature_select_strategy == "full"
    assert config.projector_hidden_act == "gelu"
    assert config.vision_aspect_ratio == "anyres_max_9"
    assert len(config.image_grid_pinpoints) == 36
    assert config.image_grid_pinpoints[:3] == [[384, 384], [384, 768], [384, 1152]]
    assert config.image_grid_pinpoints[6] == [768, 384]
    assert config.image_grid_pinpoints[-1] == [2304, 2304]


def test_05b_config_has_the_published_numbers():
    config = ARCHITECTURES["llava-ov-0.5b"]()
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.intermediate_size) == (896, 4864)
    assert (text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (24, 14, 2)
    assert text.vocab_size == 152000
    assert text.rope_parameters["rope_theta"] == 1_000_000.0
    assert config.tie_word_embeddings is True and text.tie_word_embeddings is True
    assert (vision.hidden_size, vision.num_hidden_layers) == (1152, 26)
    assert (vision.image_size, vision.patch_size) == (384, 14)
    assert (config.image_token_id, config.video_token_id) == (151646, 151647)
    assert config.vision_feature_select_strategy == "full"


@pytest.mark.parametrize(
    "arch, expected_count, tied",
    [
        ("llava-ov-7b", 8_030_807_584, False),  # ~8.0e9
        ("llava-ov-0.5b", 893_675_552, True),  # ~0.89e9; head shares the embedding
    ],
)
def test_big_architectures_parameter_count_on_meta(arch, expected_count, tied):
    model, processor = build_model(arch, dtype=torch.bfloat16, device="meta")
    assert next(model.parameters()).device.type == "meta"
    assert next(model.parameters()).dtype == torch.bfloat16
    assert _parameter_count(model) == expected_count
    assert (model.lm_head.weight is model.model.language_model.embed_tokens.weight) is tied
    assert not model.training
    # The processor is the tiny-tokenizer one at the architecture's 384 px.
    assert processor.video_processor.size.height == 384
    assert processor.num_image_tokens == 27 * 27


def test_tiny_size_and_forward(tiny):
    model, processor = tiny
    config = model.config
    assert 100_000 < _parameter_count(model) < 1_000_000
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (112, 14)
    assert (config.vision_config.hidden_size, config.vision_config.num_hidden_layers) == (64, 2)
    assert config.vision_config.num_attention_heads == 4
    text = config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        64, 2, 4, 2,
    )
    assert text.vocab_size == len(processor.tokenizer) == 768
    assert not model.training and next(model.parameters()).dtype == torch.float32

    frames = _random_frames(3, 90, 160)
    inputs = _video_inputs(processor, frames)
    # 8x8 patches per frame, 2x2 pooling -> 16 tokens per frame, plus one newline token.
    assert int((inputs["input_ids"] == config.video_token_id).sum()) == 3 * 16 + 1
    with torch.no_grad():
        features = model.model.get_video_features(
            inputs["pixel_values_videos"], vision_feature_layer=-1, vision_feature_select_strategy="full"
        ).pooler_output
        logits = model(**inputs).logits
    assert features.shape == (1, 3 * 16 + 1, 64)
    assert logits.shape == (1, inputs["input_ids"].shape[1], 768)
    assert torch.isfinite(logits).all()


def test_build_model_is_seeded_and_leaves_global_rng_alone():
    rng_before = torch.random.get_rng_state()
    first, _ = build_model("tiny", seed=5)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    again, _ = build_model("tiny", seed=5)
    other, _ = build_model("tiny", seed=6)
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(first.state_dict()[name], again.state_dict()[name])
    assert not torch.equal(first.state_dict()[name], other.state_dict()[name])


def test_build_model_bfloat16_forward_is_finite(tiny):
    model, processor = build_model("tiny", dtype=torch.bfloat16)
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    inputs = _video_inputs(processor, _random_frames(2, 112, 112))
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(torch.bfloat16)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------------
# Tokenizer and processor
# ---------------------------------------------------------------------------------------------------
def test_special_tokens_match_the_tiny_config(tokenizer, tiny):
    model, processor = tiny
    ids = tokenizer.convert_tokens_to_ids(list(models.SPECIAL_TOKENS))
    assert models.SPECIAL_TOKENS == ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")
    assert ids == [763, 764, 765, 766, 767]  # appended after the 763-token BPE, in Qwen's order
    assert (model.config.image_token_id, model.config.video_token_id) == (766, 767)
    assert (processor.image_token_id, processor.video_token_id) == (766, 767)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 765
    assert model.config.text_config.eos_token_id == model.generation_config.eos_token_id == 765
    assert tokenizer.pad_token_id == 763
    # Specials are single tokens even inside text, and are dropped when asked.
    encoded = tokenizer.encode("<|im_start|>user\n<video>hi<|im_end|>")
    assert encoded[0] == 764 and 767 in encoded and encoded[-1] == 765
    assert tokenizer.decode(encoded, skip_special_tokens=True) == "user\nhi"


@pytest.mark.parametrize(
    "text",
    [
        "Question: What is the colour of the hexagon?\nOptions:\n(A) red\n(B) blue\n"
        "Only give the best option.\nBest option: (",
        "Yes",
        "No. 42 circles, 7 squares!",
        "Zebra \u00fcn\u00efc\u00f6d\u00e9 \U0001f642 \t tabs\r\n",  # unseen words and bytes still round-trip
    ],
)
def test_tokenizer_round_trips_text(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_covers_prompt_words_and_is_deterministic(tokenizer):
    words = ["Question", "Options", "Best", " option", "Only", " give", " best", "Yes", "No", " red", " blue",
             " square", " triangle", "7", " assistant"]
    for word in words:
        assert len(tokenizer.encode(word)) == 1, word
    rebuilt = build_tiny_tokenizer()
    assert rebuilt.get_vocab() == tokenizer.get_vocab()
    text = "Question: How many times did they jump?\nBest option: ("
    assert rebuilt.encode(text) == tokenizer.encode(text)


def test_tokenizer_ids_are_pinned(tokenizer):
    # Literal ids: training is deterministic across processes and runs; a change here breaks saved
    # tiny checkpoints' meaning and must be deliberate.
    assert tokenizer.encode("Question: What colour is the small pentagon in the corner?") == [
        465, 25, 437, 372, 291, 260, 266, 76, 482, 279, 444, 412, 340, 260, 325, 81, 77, 271, 30,
    ]


def test_chat_template_is_chatml(tiny):
    _, processor = tiny
    conversation = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Is it red?"}]},
    ]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<video>\nIs it red?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_processor_at_384_px_expands_video_to_196_tokens_per_frame():
    processor = build_tiny_processor(image_size=384)
    inputs = processor(text=["<video>"], videos=[_random_frames(2, 50, 60)], return_tensors="pt")
    assert inputs["pixel_values_videos"].shape == (1, 2, 3, 384, 384)
    assert int((inputs["input_ids"] == processor.video_token_id).sum()) == 2 * 14 * 14 + 1
    with pytest.raises(ValueError, match="patch_size must be in"):
        build_tiny_processor(image_size=10, patch_size=14)


# ---------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------
def test_save_tiny_then_load_gives_identical_logits(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "tiny", seed=3)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    built, built_processor = build_model("tiny", seed=3)
    loaded, loaded_processor = load_model(folder)
    assert not loaded.training
    assert next(loaded.parameters()).dtype == torch.float32

    frames = _random_frames(2, 72, 96, seed=1)
    built_inputs = _video_inputs(built_processor, frames)
    loaded_inputs = _video_inputs(loaded_processor, frames)
    for key in built_inputs:
        assert torch.equal(built_inputs[key], loaded_inputs[key]), key
    with torch.no_grad():
        assert torch.equal(built(**built_inputs).logits, loaded(**loaded_inputs).logits)
    assert loaded.generation_config.eos_token_id == 765
    assert loaded_processor.tokenizer.image_token == "<image>"

    reloaded, _ = load_model(str(folder), dtype=torch.bfloat16)
    assert next(reloaded.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("repo_id, size", [(HUB_7B, "16 GB"), (HUB_05B, "1.8 GB")])
def test_load_hub_id_offline_raises_model_unavailable(repo_id, size, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError) as caught:
        load_model(repo_id, cache_dir=tmp_path)
    message = str(caught.value)
    assert isinstance(caught.value, RuntimeError)
    assert repo_id in message and size in message
    assert f"hf download {repo_id} --cache-dir {tmp_path}" in message
    assert "build_model('tiny')" in message


@pytest.mark.parametrize("name", ["tiny", "not a model", "/nonexistent/folder/x", "a/b/c", "../escape"])
def test_load_model_rejects_names_that_are_neither_folder_nor_hub_id(name):
    with pytest.raises(ValueError, match="neither an existing folder nor a hub id"):
        load_model(name)


def test_load_model_rejects_a_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match="is a file"):
        load_model(path)


def test_known_checkpoints_name_their_architectures():
    assert KNOWN_CHECKPOINTS[HUB_7B] == ("llava-ov-7b", "16 GB")
    assert KNOWN_CHECKPOINTS[HUB_05B] == ("llava-ov-0.5b", "1.8 GB")
    assert all(entry.architecture in ARCHITECTURES for entry in KNOWN_CHECKPOINTS.values())


def test_cli_download_offline_fails_with_the_fetch_command(tmp_path):
    environment = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "stc.models", "download", HUB_05B, "--cache-dir", str(tmp_path)],
        cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert f"hf download {HUB_05B}" in result.stderr and "1.8 GB" in result.stderr


def test_cli_download_defaults_to_the_workflows_cache(tmp_path, monkeypatch, capsys):
    """Without --cache-dir the checkpoint goes to data/models/hf under STC_ROOT, where the workflow looks."""
    seen = {}

    def fake_download(name, *, cache_dir=None):
        seen.update(name=name, cache_dir=Path(cache_dir))
        return tmp_path / "snapshot"

    monkeypatch.setenv("STC_ROOT", str(tmp_path))
    monkeypatch.setattr(models, "download_checkpoint", fake_download)
    assert models.main(["download", HUB_05B]) == 0
    assert seen == {"name": HUB_05B, "cache_dir": tmp_path / "data" / "models" / "hf"}
    assert models.main(["download", HUB_05B, "--cache-dir", str(tmp_path / "elsewhere")]) == 0
    assert seen["cache_dir"] == tmp_path / "elsewhere"


def test_cli_save_tiny(tmp_path, capsys):
    assert models.main(["save-tiny", str(tmp_path / "ckpt"), "--seed", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "ckpt")
    loaded, _ = load_model(tmp_path / "ckpt")
    built, _ = build_model("tiny", seed=1)
    name = "lm_head.weight"
    assert torch.equal(loaded.state_dict()[name], built.state_dict()[name])


# ---------------------------------------------------------------------------------------------------
# Frames
# ---------------------------------------------------------------------------------------------------
def test_preprocess_frames_shape_dtype_and_normalisation(tiny):
    _, processor = tiny
    pixels = preprocess_frames(processor, _random_frames(5, 90, 160))
    assert pixels.shape == (5, 3, 112, 112) and pixels.dtype == torch.float32

    constant = np.zeros((2, 70, 130, 3), dtype=np.uint8)
    constant[1] = 255
    pixels = preprocess_frames(processor, constant)
    assert torch.allclose(pixels[0], torch.tensor(-1.0)) and torch.allclose(pixels[1], torch.tensor(1.0))

    # At the model's size there is no resize: exactly (x / 255 - 0.5) / 0.5, channels first.
    frames = _random_frames(2, 112, 112, seed=2)
    expected = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    assert torch.allclose(preprocess_frames(processor, frames), expected, atol=1e-6)


def test_preprocess_frames_matches_the_reference_video_processor(tiny):
    _, processor = tiny
    assert processor.video_processor.resample == PILImageResampling.BICUBIC
    reference = LlavaOnevisionVideoProcessor(
        size={"height": 112, "width": 112}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        resample=PILImageResampling.BICUBIC,
    )
    frames = _random_frames(4, 90, 160, seed=3)
    expected = reference(videos=[frames], return_tensors="pt")["pixel_values_videos"][0]
    assert torch.equal(preprocess_frames(processor, frames), expected)
    # The video processor alone works too.
    assert torch.equal(preprocess_frames(processor.video_processor, frames), expected)


@pytest.mark.parametrize(
    "frames",
    [
        np.zeros((2, 32, 32, 3), dtype=np.float32),  # not uint8
        np.zeros((32, 32, 3), dtype=np.uint8),  # one frame without the frame axis
        np.zeros((2, 32, 32, 4), dtype=np.uint8),  # RGBA
        np.zeros((0, 32, 32, 3), dtype=np.uint8),  # no frames
        [[[[0, 0, 0]]]],  # not an array
    ],
)
def test_preprocess_frames_rejects_bad_input(tiny, frames):
    _, processor = tiny
    with pytest.raises(ValueError, match="frames must be"):
        preprocess_frames(processor, frames)
