"""Every named method builds an engine on the tiny model and streams frames with the token counts it promises."""

import numpy as np
import pytest

from stc.methods import METHODS, MethodUnavailable, build_engine, get_method
from stc.models import build_model


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny", seed=0)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_runs(tiny, name):
    model, proc = tiny
    method = get_method(name)
    if method.tome_keep_ratio is not None:
        # the tiny ViT has 2 layers: ToMe can at most halve twice (64 -> 16), not reach 4 tokens
        with pytest.raises(MethodUnavailable, match="ToMe cannot reduce 64 tokens to 4"):
            build_engine(model, proc, name)
        return
    with build_engine(model, proc, name) as engine:
        stream = engine.open_stream()
        stream.push_frames(np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8))
        stats = stream.stats()
        expected = 16 if method.pruner is None and method.compressor is None else None
        if expected:
            assert stats["tokens_per_frame"] == [16, 16, 16]
        else:
            assert all(1 <= n < 16 for n in stats["tokens_per_frame"])
        if method.cacher is not None:
            assert stats["reference_frames"][0] == 0


def test_paper_defaults():
    assert get_method("cacher").cacher.cache_interval == 4 and get_method("cacher").cacher.reuse_ratio == 0.75
    both = get_method("cacher+pruner")
    assert both.cacher.cache_interval == 2 and both.pruner.keep_ratio == pytest.approx(0.30)
    assert get_method("pruner").pruner.keep_ratio == 0.25
    assert get_method("anchor-both").pruner == get_method("pruner").pruner and get_method("anchor-both").cacher is None
    with pytest.raises(ValueError, match="unknown method"):
        get_method("nope")


def test_tome_in_the_engine(tiny):
    from stc.engine import EngineConfig, StreamingEngine

    model, proc = tiny
    with StreamingEngine(model, proc, EngineConfig(tome_tokens_per_frame=20)) as engine:
        assert "forward" in model.model.vision_tower.encoder.layers[0].__dict__
        stream = engine.open_stream()
        stream.push_frames(np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8))
        assert stream.stats()["tokens_per_frame"] == [20, 20]  # merged in the ViT, no pooling
        assert isinstance(stream.ask("What?", max_new_tokens=2), str)
    assert "forward" not in model.model.vision_tower.encoder.layers[0].__dict__
    with pytest.raises(ValueError, match="excludes the cacher"):
        from stc.cacher import CacherConfig

        EngineConfig(tome_tokens_per_frame=20, cacher=CacherConfig())
