"""Every named method builds an engine on the tiny model and streams a frame; ToMe is reported missing."""

import numpy as np
import pytest

from stc.methods import METHODS, MethodUnavailable, build_engine, get_method
from stc.models import build_model


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny", seed=0)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_runs_or_is_reported_missing(tiny, name):
    model, proc = tiny
    method = get_method(name)
    if method.compressor == "tome":
        with pytest.raises(MethodUnavailable, match="tome"):
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
    with pytest.raises(ValueError, match="unknown method"):
        get_method("nope")
