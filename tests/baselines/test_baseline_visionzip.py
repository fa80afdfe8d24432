"""VisionZip: dominant tokens against the encoder's own attention maps (SigLIP and CLIP), contextual
merging against a loop reference, all streams at once against one at a time, budgets and bad inputs."""

import pytest
import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from stc.baselines import VisionZip
from stc.baselines.visionzip import merge_contextual
from stc.compress import FrameCompressor, VisionContext

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=112, patch_size=14)


@pytest.fixture(scope="module")
def encoded():
    """A tiny SigLIP (8x8 patches) with eager attention, its hidden states and attention maps for 3 frames."""
    torch.manual_seed(0)
    model = SiglipVisionModel(SiglipVisionConfig(**TINY)).eval()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(torch.randn(3, 3, 112, 112), output_hidden_states=True, output_attentions=True)
    return model, out


def brute_force_dominant(attentions, layer, k):
    """Top-k tokens of the 4x4 grid by attention received (mean over heads and queries), pooled 8x8 -> 4x4.

    For an even grid, LLaVA-OneVision's bilinear halving samples between each 2x2 block's pixels, i.e. it is
    a 2x2 average.
    """
    received = attentions[layer].mean(dim=(1, 2))  # [F, 64]
    pooled = nn.functional.avg_pool2d(received.view(-1, 1, 8, 8), 2).flatten(1)  # [F, 16]
    return [set(torch.topk(row, k).indices.tolist()) for row in pooled]


@pytest.mark.parametrize("layer", [-1, 0])
def test_dominant_tokens_are_the_most_attended(encoded, layer):
    model, out = encoded
    tokens = torch.randn(3, 16, 8)
    comp = VisionZip(dominant=5, contextual=3, attention_layer=layer)
    assert isinstance(comp, FrameCompressor)
    ctx = VisionContext(hidden_states=out.hidden_states, vision_tower=model, grid=(4, 4))
    res = comp.compress(tokens, comp.new_state(), ctx)
    assert res.counts == [8, 8, 8]
    for f, expected in enumerate(brute_force_dominant(out.attentions, layer, 5)):
        dominant = res.indices[f][:5]
        assert set(dominant.tolist()) == expected
        assert torch.all(dominant[1:] > dominant[:-1])  # spatial order
        assert torch.equal(res.tokens[f][:5], tokens[f, dominant])
        contextual = res.indices[f][5:]
        assert not set(contextual.tolist()) & expected  # contextual tokens come from the rest


@pytest.mark.parametrize("one_frame_at_a_time", [False, True])
def test_a_class_token_tower_ranks_by_the_class_tokens_attention(monkeypatch, one_frame_at_a_time):
    """CLIP has a CLS token: VisionZip's original score, the CLS query's attention to the patches."""
    import stc.baselines.visionzip as visionzip

    if one_frame_at_a_time:
        monkeypatch.setattr(visionzip, "ATTENTION_ELEMENTS", 1)
    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(**TINY)).eval()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(torch.randn(3, 3, 112, 112), output_hidden_states=True, output_attentions=True)
    comp = VisionZip(dominant=5, contextual=0)
    res = comp.compress(torch.randn(3, 16, 8), comp.new_state(),
                        VisionContext(hidden_states=out.hidden_states, vision_tower=model, grid=(4, 4)))
    received = out.attentions[-1][:, :, 0, 1:].mean(1)  # [F, 64]: the CLS query's row, without itself
    pooled = nn.functional.avg_pool2d(received.view(-1, 1, 8, 8), 2).flatten(1)
    for f in range(3):
        assert set(res.indices[f].tolist()) == set(torch.topk(pooled[f], 5).indices.tolist())


def test_compress_without_pooling_and_grid_inference(encoded):
    model, out = encoded
    tokens = torch.randn(3, 64, 8)  # the 8x8 patch grid itself (no grid given: a square is inferred)
    comp = VisionZip(dominant=4, contextual=0)
    res = comp.compress(tokens, comp.new_state(), VisionContext(hidden_states=out.hidden_states, vision_tower=model))
    received = out.attentions[-1].mean(dim=(1, 2))
    for f in range(3):
        assert set(res.indices[f].tolist()) == set(torch.topk(received[f], 4).indices.tolist())


def test_total_budget_split_and_counts(encoded):
    model, out = encoded
    assert VisionZip(tokens_per_frame=64).split(196) == (54, 10)  # VisionZip's own settings
    assert VisionZip(tokens_per_frame=128).split(196) == (108, 20)
    assert VisionZip(tokens_per_frame=59).split(196) == (50, 9)
    assert VisionZip().split(196) == (41, 8)  # default keep_ratio 0.25: 49 tokens
    assert VisionZip(tokens_per_frame=1).split(196) == (1, 0)
    ctx = VisionContext(hidden_states=out.hidden_states, vision_tower=model, grid=(4, 4))
    tokens = torch.randn(3, 16, 8)
    for comp, n in [(VisionZip(keep_ratio=0.5), 8), (VisionZip(contextual=4), 4), (VisionZip(dominant=16), 16)]:
        res = comp.compress(tokens, comp.new_state(), ctx)
        assert res.counts == [n] * 3
        assert all(i.shape == (n,) for i in res.indices)


def brute_force_contextual(tokens, metric, c):
    r = tokens.shape[0]
    step = max(1, r // c)
    targets = list(range(0, r, step))[:c]
    groups = {t: [t] for t in targets}
    for i in range(r):
        if i in groups:
            continue
        sims = [float(nn.functional.cosine_similarity(metric[i], metric[t], dim=0)) for t in targets]
        groups[targets[max(range(c), key=lambda j: sims[j])]].append(i)
    return targets, [tokens[groups[t]].mean(0) for t in targets], [len(groups[t]) for t in targets]


@pytest.mark.parametrize("r, c", [(11, 3), (12, 4), (5, 5), (7, 1)])
def test_contextual_merging_matches_loop_reference(r, c):
    g = torch.Generator().manual_seed(r * 10 + c)
    tokens = torch.randn(r, 6, generator=g, dtype=torch.float64)
    metric = torch.randn(r, 4, generator=g, dtype=torch.float64)
    merged, targets, sizes = merge_contextual(tokens, metric, c)
    ref_targets, ref_tokens, ref_sizes = brute_force_contextual(tokens, metric, c)
    assert targets.tolist() == ref_targets and sizes.tolist() == ref_sizes and int(sizes.sum()) == r
    torch.testing.assert_close(merged, torch.stack(ref_tokens))
    with pytest.raises(ValueError):
        merge_contextual(tokens, metric, r + 1)
    # Several frames at once: each frame as alone.
    frames = torch.randn(3, r, 6, generator=g, dtype=torch.float64)
    metrics = torch.randn(3, r, 4, generator=g, dtype=torch.float64)
    merged, targets, sizes = merge_contextual(frames, metrics, c)
    assert merged.shape == (3, c, 6) and sizes.shape == (3, c)
    for f in range(3):
        ref_targets, ref_tokens, ref_sizes = brute_force_contextual(frames[f], metrics[f], c)
        assert targets.tolist() == ref_targets and sizes[f].tolist() == ref_sizes
        torch.testing.assert_close(merged[f], torch.stack(ref_tokens))


def test_kept_tokens_match_a_brute_force_selection():
    """Every frame keeps its top-scored tokens in spatial order, then the contextual merge of all the
    other tokens (ascending), with a token's index where its group is itself alone and -1 otherwise."""
    g = torch.Generator().manual_seed(3)
    frames, n, dominant, contextual = 3, 16, 5, 3
    tokens = torch.randn(frames, n, 6, generator=g, dtype=torch.float64)
    keys = torch.randn(frames, n, 4, generator=g, dtype=torch.float64)
    scores = torch.randn(frames, n, generator=g, dtype=torch.float64)
    comp = VisionZip(dominant=dominant, contextual=contextual)
    assert comp.split(n) == (dominant, contextual)
    res = comp._keep(tokens, scores, keys)
    for f in range(frames):
        top = sorted(torch.topk(scores[f], dominant).indices.tolist())
        rest = [i for i in range(n) if i not in top]
        targets, merged, sizes = brute_force_contextual(tokens[f, rest], keys[f, rest], contextual)
        want = torch.cat([tokens[f, top], torch.stack(merged)])
        torch.testing.assert_close(res.tokens[f], want)
        assert res.indices[f].tolist() == top + [rest[t] if size == 1 else -1 for t, size in zip(targets, sizes)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation is a GPU matter")
def test_selection_does_not_wait_for_the_gpu():
    """Choosing and merging the kept tokens needs no host synchronisation (a streaming step's GPU would
    idle while the host waits), and gives the CPU's result."""
    g = torch.Generator().manual_seed(4)
    tokens, keys, scores = torch.randn(2, 196, 8, generator=g), torch.randn(2, 196, 4, generator=g), torch.randn(2, 196, generator=g)
    comp = VisionZip()
    want = comp._keep(tokens, scores, keys)
    cuda = [t.cuda() for t in (tokens, scores, keys)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = comp._keep(*cuda)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b, i, j in zip(got.tokens, want.tokens, got.indices, want.indices):
        torch.testing.assert_close(a.cpu(), b)
        assert torch.equal(i.cpu(), j)


def test_invalid_configs_and_inputs(encoded):
    model, out = encoded
    for kwargs in [dict(dominant=5, keep_ratio=0.3), dict(dominant=-1), dict(contextual=1.5), dict(dominant=0, contextual=0),
                   dict(keep_ratio=0), dict(tokens_per_frame=0), dict(contextual_share=1.0), dict(attention_layer=0.5)]:
        with pytest.raises(ValueError):
            VisionZip(**kwargs)
    tokens = torch.randn(3, 16, 8)
    comp = VisionZip(tokens_per_frame=6)
    with pytest.raises(ValueError, match="hidden states"):
        comp.compress(tokens, comp.new_state())
    ctx = VisionContext(hidden_states=out.hidden_states, vision_tower=model, grid=(4, 4))
    with pytest.raises(ValueError, match="exceeds"):
        VisionZip(dominant=10, contextual=7).compress(tokens, comp.new_state(), ctx)
    with pytest.raises(ValueError, match="out of range"):
        VisionZip(attention_layer=2).compress(tokens, comp.new_state(), ctx)
    with pytest.raises(ValueError, match="frames"):
        comp.compress(tokens[:2], comp.new_state(), ctx)
    with pytest.raises(ValueError, match="hidden states"):
        comp.compress(tokens, comp.new_state(), VisionContext(hidden_states=out.hidden_states[:2], vision_tower=model))
    with pytest.raises(ValueError, match="hidden states"):  # the fast path's layer input, but of another layer
        comp.compress(tokens, comp.new_state(), VisionContext(layer_inputs={0: out.hidden_states[0]}, vision_tower=model))


def test_layer_input_alone_equals_all_hidden_states(encoded):
    """The CUDA-graph path passes only the attention layer's input; VisionZip gives the same tokens."""
    model, out = encoded
    tokens = torch.randn(out.hidden_states[0].shape[0], 16, 8)
    comp = VisionZip(tokens_per_frame=6)
    n = len(out.hidden_states) - 1
    assert comp.vision_layer_input == -1
    full = comp.compress(tokens, comp.new_state(), VisionContext(hidden_states=out.hidden_states, vision_tower=model, grid=(4, 4)))
    alone = comp.compress(tokens, comp.new_state(),
                          VisionContext(layer_inputs={n - 1: out.hidden_states[n - 1]}, vision_tower=model, grid=(4, 4)))
    for a, b in zip(full.tokens, alone.tokens):
        torch.testing.assert_close(a, b)
    with pytest.raises(TypeError):
        comp.compress(tokens, comp.new_state(), VisionContext(hidden_states=out.hidden_states, vision_tower=nn.Linear(2, 2)))


def test_score_mapping_is_llava_onevision_pooling():
    # pool_to_grid must move per-patch values exactly as LLaVA-OneVision pools features (27x27 -> 14x14).
    from types import SimpleNamespace

    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    from stc.baselines.visionzip import pool_to_grid

    fake = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(image_size=378, patch_size=14)))
    feats = torch.randn(2, 729, 3)
    expected = LlavaOnevisionModel.apply_pooling(fake, feats)
    torch.testing.assert_close(pool_to_grid(feats, (27, 27), (14, 14)), expected, atol=0, rtol=0)
    torch.testing.assert_close(pool_to_grid(feats[..., 0], (27, 27), (14, 14)), expected[..., 0], atol=0, rtol=0)


def test_compress_streams_equals_one_compress_per_stream(encoded, monkeypatch):
    """What StreamBatch calls: one frame of each stream at once, against a compress call per stream."""
    import stc.baselines.visionzip as visionzip

    model, out = encoded
    n = len(out.hidden_states) - 1
    hidden = out.hidden_states[n - 1]  # the last layer's input, as the graphed ViT keeps it
    tokens = torch.randn(3, 16, 8)
    comp = VisionZip(dominant=5, contextual=3)
    contexts = [VisionContext(layer_inputs={n - 1: hidden[i : i + 1]}, vision_tower=model, grid=(4, 4)) for i in range(3)]
    alone = [comp.compress(tokens[i : i + 1], comp.new_state(), contexts[i]) for i in range(3)]
    monkeypatch.setattr(visionzip, "ATTENTION_ELEMENTS", 1)  # score one frame at a time: the same result
    states = [comp.new_state() for _ in range(3)]
    together = comp.compress_streams(tokens, states, contexts)
    for i, one in enumerate(alone):
        assert torch.equal(together.indices[i], one.indices[0])
        torch.testing.assert_close(together.tokens[i], one.tokens[0], rtol=0, atol=0)
    assert [s.frames_seen for s in states] == [1, 1, 1]
    with pytest.raises(ValueError, match="one state and one context per stream"):
        comp.compress_streams(tokens, states[:2], contexts)
    with pytest.raises(ValueError, match="its own state"):
        comp.compress_streams(tokens, [states[0], states[0], states[1]], contexts)
    with pytest.raises(TypeError, match="new_state"):
        comp.compress_streams(tokens, [object() for _ in range(3)], contexts)
    with pytest.raises(ValueError, match="one grid"):
        comp.compress_streams(tokens, states, contexts[:2] + [VisionContext(layer_inputs=contexts[2].layer_inputs,
                                                                            vision_tower=model, grid=(2, 8))])
    with pytest.raises(ValueError, match="its one frame"):
        comp.compress_streams(tokens, states, contexts[:2] + [VisionContext(layer_inputs={n - 1: hidden[:2]},
                                                                            vision_tower=model, grid=(4, 4))])
