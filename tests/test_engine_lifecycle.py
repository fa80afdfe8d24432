"""The engine's patches over its lifetime: shared by engines, undone after a failed start; bad inputs."""

import numpy as np
import pytest
import torch

from stc.cacher import CacherConfig
from stc.engine import EngineConfig, StreamingEngine
from stc.methods import build_engine
from stc.models import build_model, preprocess_frames
from stc.patching import encoder_layers, patch_owner

QUESTION = "What colour is the square?"


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny", seed=0)


def frames(n=4, seed=0, size=64):
    rng = np.random.default_rng(seed)
    out = [rng.integers(0, 255, (size, size, 3))]
    for _ in range(n - 1):
        out.append(np.clip(out[-1] + rng.integers(-40, 40, (size, size, 3)), 0, 255))
    return np.stack(out).astype(np.uint8)


def vision_layers(model):
    return encoder_layers(model.model.vision_tower, "test")


def first_logits(engine, video):
    stream = engine.open_stream()
    stream.push_frames(video)
    return stream.answer(QUESTION, answer_prefix="Best option: (", max_new_tokens=1).logits


def test_engines_sharing_a_cacher_keep_it_until_the_last_closes(tiny):
    model, proc = tiny
    video = frames()
    config = EngineConfig(cacher=CacherConfig(cache_interval=2, reuse_ratio=0.5))
    with StreamingEngine(model, proc, EngineConfig()) as plain:
        baseline = first_logits(plain, video)
    first = StreamingEngine(model, proc, config)
    with first, StreamingEngine(model, proc, config) as second:
        assert first.cacher is second.cacher
        with_cacher = first_logits(second, video)
        assert not torch.allclose(with_cacher, baseline)  # the cacher changes the features
        first.close()
        assert patch_owner(vision_layers(model)[0]) is second.cacher  # still attached for the second engine
        torch.testing.assert_close(first_logits(second, video), with_cacher, rtol=0, atol=0)
    assert patch_owner(vision_layers(model)[0]) is None


def test_a_detached_cacher_is_an_error_not_the_baseline(tiny):
    model, proc = tiny
    with StreamingEngine(model, proc, EngineConfig(cacher=CacherConfig())) as engine:
        stream = engine.open_stream()
        engine.cacher.detach()
        with pytest.raises(RuntimeError, match="STC-Cacher was detached"):
            stream.push_frames(frames())


def test_a_failed_start_leaves_the_model_unpatched(tiny):
    model, proc = tiny
    hooks_before = [len(layer.self_attn._forward_pre_hooks) for layer in model.model.language_model.layers]
    with pytest.raises(ValueError):  # the init prompt is tokenised after the cacher and the hooks are in place
        StreamingEngine(model, proc, EngineConfig(cacher=CacherConfig(), init_prompt=None))
    assert patch_owner(vision_layers(model)[0]) is None
    assert [len(layer.self_attn._forward_pre_hooks) for layer in model.model.language_model.layers] == hooks_before
    other = CacherConfig(cache_interval=3)
    StreamingEngine(model, proc, EngineConfig(cacher=other)).close()  # another config is not refused


def test_build_engine_refuses_an_unsupported_model(tiny):
    with pytest.raises(TypeError, match="LlavaOnevisionForConditionalGeneration"):
        build_engine(torch.nn.Linear(2, 2), tiny[1], "baseline")


def test_bad_questions_and_token_counts(tiny):
    model, proc = tiny
    with StreamingEngine(model, proc, EngineConfig(retrieve_top_k=1)) as engine:
        stream = engine.open_stream()
        stream.push_pixels(preprocess_frames(proc, frames(1))[:0])  # no frame: nothing happens
        assert stream.frames_seen == 0 and not stream.blocks
        stream.push_frames(frames(3))
        for query in ("", "   "):
            with pytest.raises(ValueError, match="non-empty string"):
                stream.ask(query)
        for bad in (0, -1, 2.5, True):
            with pytest.raises(ValueError, match="max_new_tokens"):
                stream.ask(QUESTION, max_new_tokens=bad)
        assert len(stream.answer(QUESTION, max_new_tokens=np.int64(2)).token_ids) <= 2


@pytest.mark.parametrize("field", ["n_local", "retrieve_top_k", "device_blocks", "max_new_tokens"])
def test_config_refuses_bools(field):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: True})
    EngineConfig(**{field: np.int64(3)})
