"""Every named method builds an engine on the tiny model and streams frames with the token counts it promises."""

import math

import numpy as np
import pytest

from stc.methods import METHODS, MethodUnavailable, build_engine, get_method


# The paper's setting of every named row, written out here from the paper's tables (not read from
# stc.methods): (cache interval N, R_Cacher, share of pooled tokens kept). None: no cacher / all kept.
_CACHER = (4, 0.75)  # Cacher alone: N = 4, R = 75%
PAPER_SETTINGS = {
    "baseline": (None, None, None),
    "cacher": (*_CACHER, None),
    "pruner": (None, None, 0.25),  # R_Pruner 75%
    "cacher+pruner": (2, 0.75, 0.30),  # combined: N = 2, R = 75%, R_Pruner 70%
    **{m: (None, None, 0.25) for m in ("visionzip", "vidcom2", "uniform", "random")},  # the Pruner's budget
    "reuse-attn": (4, 0.85, None), "reuse-mlp": (4, 0.85, None), "reuse-attn+mlp": (*_CACHER, None),
    **{f"anchor-{a}": (None, None, 0.25) for a in ("spatial", "temporal", "both", "t+2s", "2t+s")},
    **{f"feature-{f}": (*_CACHER, None) for f in ("hidden", "value", "key")},
    **{f"metric-{m}": (*_CACHER, None) for m in ("l1", "l2", "dot", "cosine")},
    **{f"interval-{n}": (v, 0.75, None) for n, v in (("1", 1), ("4", 4), ("7", 7), ("10", 10), ("inf", math.inf))},
    **{f"reuse-{r}": (4, r / 100, None) for r in (85, 75, 50)},
    **{f"joint-{rc}-{rp}": (4, rc / 100, 1 - rp / 100) for rc, rp in ((50, 75), (75, 50), (75, 75))},
}
FRAMES = 11  # enough for a second reference frame at N = 4, 7 and 10 (frames 0, 7 / 0, 10)


def test_every_method_has_a_paper_setting():
    assert set(PAPER_SETTINGS) == set(METHODS) - {"tome"}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_runs(tiny, name):
    model, proc = tiny
    method = get_method(name)
    if method.tome_keep_ratio is not None:
        # the tiny ViT has 2 layers: ToMe can at most halve twice (64 -> 16), not reach 4 tokens
        with pytest.raises(MethodUnavailable, match="ToMe cannot reduce 64 tokens to 4"):
            build_engine(model, proc, name)
        return
    interval, reuse, keep = PAPER_SETTINGS[name]
    vcfg = model.config.vision_config
    side = vcfg.image_size // vcfg.patch_size
    vit_tokens, layers, pooled = side * side, vcfg.num_hidden_layers, math.ceil(side / 2) ** 2
    assert (vit_tokens, layers, pooled) == (64, 2, 16)
    frames = 16 if name == "vidcom2" else FRAMES  # VidCom2: one whole budget period of 16 frames
    with build_engine(model, proc, name) as engine:
        stream = engine.open_stream()
        stream.push_frames(np.random.default_rng(0).integers(0, 255, (frames, 64, 64, 3), dtype=np.uint8))
        stats = stream.stats()
    kept = pooled if keep is None else max(1, math.floor(round(pooled * keep, 9)))  # k = floor(N * (1 - R_Pruner))
    if name == "vidcom2":
        # per-frame budgets follow content, but a period keeps exactly 16 * k; the first frame (weight 1) gets k
        per_frame = stats["tokens_per_frame"]
        assert sum(per_frame) == 16 * kept and per_frame[0] == kept and all(1 <= n <= pooled for n in per_frame)
    else:
        assert stats["tokens_per_frame"] == [kept] * frames
    assert stats["kv_tokens"] == sum(stats["tokens_per_frame"])
    if interval is None:
        assert "reference_frames" not in stats and "vit_recomputed_tokens" not in stats
        return
    # reference frame every N-th frame; there every token at every layer, elsewhere k = floor(T * (1 - R)) per layer
    references = [0] if math.isinf(interval) else list(range(0, frames, interval))
    dynamic = math.floor(round(vit_tokens * (1 - reuse), 9))
    assert stats["reference_frames"] == references
    assert stats["vit_recomputed_tokens"] == [layers * (vit_tokens if i in references else dynamic) for i in range(frames)]


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
        answer = stream.answer("What?", max_new_tokens=2)
        assert isinstance(answer.text, str) and len(answer.token_ids) <= 2
        assert answer.text == engine.tokenizer.decode(answer.token_ids, skip_special_tokens=True)
        # the question attends to the init prompt and both frames' 20 merged tokens (2 blocks <= top-k 64)
        assert answer.context_tokens == engine.init_ids.shape[1] + 2 * 20
        assert stream.ask("What?", max_new_tokens=2) == answer.text  # asking again changes nothing
    assert "forward" not in model.model.vision_tower.encoder.layers[0].__dict__
    with pytest.raises(ValueError, match="excludes the cacher"):
        from stc.cacher import CacherConfig

        EngineConfig(tome_tokens_per_frame=20, cacher=CacherConfig())
