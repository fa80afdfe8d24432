"""STC-Cacher: exactness against the unpatched encoder and a brute-force reference of the algorithm."""

import math

import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from stc.cacher import CacherConfig, attach_cacher

TOKENS = 36  # 84 px / 14 px patches = 6 x 6


def siglip(seed=0, layers=3, dtype=torch.float32, attn="sdpa", hidden=32, heads=4):
    """A tiny random SigLIP tower (heads of hidden / heads channels: 8 by default; hidden=144, heads=2 gives
    SigLIP-so400m's 72, for `stc.vit_kernel.attention`)."""
    torch.manual_seed(seed)
    cfg = SiglipVisionConfig(
        hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=heads,
        image_size=84, patch_size=14, attn_implementation=attn,
    )
    return SiglipVisionModel(cfg).eval().to(dtype)


def clip(seed=0):
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=84, patch_size=14, projection_dim=16,
    )
    return CLIPVisionModel(cfg).eval()


def video(frames=8, seed=1, drift=0.15):
    """Frames that change a little from one to the next, like a real stream at 0.5 fps."""
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(3, 84, 84, generator=g)]
    for _ in range(frames - 1):
        x.append(x[-1] + drift * torch.randn(3, 84, 84, generator=g))
    return torch.stack(x)


def run_stream(tower, frames, state, chunk=1, hidden=False):
    outs, hs = [], []
    with torch.no_grad():
        for s in range(0, len(frames), chunk):
            o = tower(frames[s : s + chunk], stc_state=state, output_hidden_states=hidden)
            outs.append(o.last_hidden_state)
            if hidden:
                hs.append(o.hidden_states)
    out = torch.cat(outs)
    if hidden:
        return out, [torch.cat([h[i] for h in hs]) for i in range(len(hs[0]))]
    return out


def unpatched(tower, frames):
    with torch.no_grad():
        o = tower(frames, output_hidden_states=True)
    return o.last_hidden_state, list(o.hidden_states)


# -- brute-force reference: explicit per-token loops, written independently of stc.cacher --------------


def _sim(a, b, metric):
    a, b = a.double(), b.double()
    if metric == "cosine":
        return float(a @ b / (a.norm() * b.norm()))
    if metric == "dot":
        return float(a @ b)
    if metric == "l1":
        return -float((a - b).abs().sum())
    return -float((a - b).norm())


def _attend(layer, q_rows, keys, values):
    """Softmax attention of the given query rows over all keys, head by head. Returns [len(q_rows), C]."""
    attn = layer.self_attn
    heads, hd = attn.num_heads, attn.head_dim
    out = torch.zeros(q_rows.shape[0], heads * hd, dtype=torch.float64)
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        logits = q_rows[:, sl].double() @ keys[:, sl].double().T * attn.scale
        out[:, sl] = torch.softmax(logits, dim=-1) @ values[:, sl].double()
    return attn.out_proj(out.float())


def brute_force(tower, frames, cfg):
    """Frame by frame, layer by layer, with explicit selection by sorting."""
    layers = tower.encoder.layers
    T = TOKENS
    k = math.floor(round(T * (1 - cfg.reuse_ratio), 9))
    refs = [None] * len(layers)
    outputs, chosen = [], []
    with torch.no_grad():
        for i, frame in enumerate(frames):
            x = tower.embeddings(frame[None])[0]
            is_ref = (i == 0) if math.isinf(cfg.cache_interval) else i % int(cfg.cache_interval) == 0
            picks = []
            shared = None
            for li, layer in enumerate(layers):
                a = layer.self_attn
                h = layer.layer_norm1(x)
                key, value, query = a.k_proj(h), a.v_proj(h), a.q_proj(h)
                if is_ref:
                    att = _attend(layer, query, key, value)
                    mid = x + att
                    mlp = layer.mlp(layer.layer_norm2(mid))
                    refs[li] = dict(key=key, value=value, attn=att, mlp=mlp, hidden=x)
                    x = mid + mlp
                    continue
                r = refs[li]
                feat, rfeat = {"key": (key, r["key"]), "value": (value, r["value"]), "hidden": (x, r["hidden"])}[cfg.selection_feature]
                if cfg.per_layer_selection or shared is None:
                    sims = [_sim(feat[t], rfeat[t], cfg.metric) for t in range(T)]
                    dyn = sorted(sorted(range(T), key=lambda t: sims[t])[:k])
                    shared = dyn
                dyn = shared
                picks.append(dyn)
                if cfg.reuse == "mlp":
                    att = _attend(layer, query, key, value)
                else:
                    v_full = r["value"].clone()
                    v_full[dyn] = value[dyn]
                    att = r["attn"].clone()
                    att[dyn] = _attend(layer, query[dyn], key, v_full)
                mid = x + att
                if cfg.reuse == "attn":
                    mlp = layer.mlp(layer.layer_norm2(mid))
                else:
                    mlp = r["mlp"].clone()
                    mlp[dyn] = layer.mlp(layer.layer_norm2(mid[dyn]))
                x = mid + mlp
            outputs.append(tower.post_layernorm(x))
            chosen.append(None if is_ref else picks)
    return torch.stack(outputs), chosen


# -- exactness against the unpatched encoder -----------------------------------------------------------


@pytest.mark.parametrize("cfg", [CacherConfig(cache_interval=1, reuse_ratio=0.75), CacherConfig(cache_interval=3, reuse_ratio=0.0)])
@pytest.mark.parametrize("chunk", [1, 3])
def test_no_reuse_reproduces_unpatched(cfg, chunk):
    tower, frames = siglip(), video(7)
    want, want_hs = unpatched(tower, frames)
    with attach_cacher(tower, cfg) as cacher:
        state = cacher.new_state()
        got, got_hs = run_stream(tower, frames, state, chunk=chunk, hidden=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(got_hs) == len(want_hs) == 4
    for g, w in zip(got_hs, want_hs):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_reference_frames_equal_unpatched_and_others_differ():
    tower, frames = siglip(), video(8)
    want, _ = unpatched(tower, frames)
    with attach_cacher(tower, CacherConfig(cache_interval=4, reuse_ratio=0.75)) as cacher:
        state = cacher.new_state()
        got = run_stream(tower, frames, state)
    assert state.reference_frames == [0, 4]
    torch.testing.assert_close(got[[0, 4]], want[[0, 4]], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[1], want[1], atol=1e-3)  # reuse really happened


@pytest.mark.parametrize(
    "cfg",
    [
        CacherConfig(cache_interval=4, reuse_ratio=0.75),
        CacherConfig(cache_interval=2, reuse_ratio=0.5, metric="l1"),
        CacherConfig(cache_interval=3, reuse_ratio=0.75, metric="l2"),
        CacherConfig(cache_interval=4, reuse_ratio=0.75, metric="dot"),
        CacherConfig(cache_interval=4, reuse_ratio=0.75, selection_feature="value"),
        CacherConfig(cache_interval=4, reuse_ratio=0.75, selection_feature="hidden"),
        CacherConfig(cache_interval=4, reuse_ratio=0.85, reuse="attn"),
        CacherConfig(cache_interval=4, reuse_ratio=0.85, reuse="mlp"),
        CacherConfig(cache_interval=math.inf, reuse_ratio=0.75, per_layer_selection=False),
    ],
    ids=lambda c: f"N{c.cache_interval}-R{c.reuse_ratio}-{c.metric}-{c.selection_feature}-{c.reuse}-{c.per_layer_selection}",
)
def test_matches_brute_force(cfg):
    tower, frames = siglip(), video(7)
    want, want_dyn = brute_force(tower, frames, cfg)
    with attach_cacher(tower, cfg) as cacher:
        state = cacher.new_state(record_indices=True)
        got = run_stream(tower, frames, state)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    k = math.floor(round(TOKENS * (1 - cfg.reuse_ratio), 9))
    for report, dyn in zip(state.reports, want_dyn):
        if dyn is None:
            assert report.reference and report.recomputed == [TOKENS] * 3
        else:
            assert not report.reference and report.recomputed == [k] * 3
            assert [d.tolist() for d in report.dynamic] == dyn


def test_chunks_equal_frame_by_frame():
    tower, frames = siglip(), video(9)
    cfg = CacherConfig(cache_interval=4, reuse_ratio=0.75)
    with attach_cacher(tower, cfg) as cacher:
        one = run_stream(tower, frames, cacher.new_state(), chunk=1)
        for chunk in (2, 3, 5, 9):
            state = cacher.new_state()
            torch.testing.assert_close(run_stream(tower, frames, state, chunk=chunk), one, atol=1e-5, rtol=1e-5)
            assert state.reference_frames == [0, 4, 8]


def test_interleaved_streams_equal_separate_streams():
    tower = siglip()
    a, b = video(6, seed=1), video(6, seed=2)
    with attach_cacher(tower, CacherConfig(cache_interval=3, reuse_ratio=0.75)) as cacher:
        alone_a = run_stream(tower, a, cacher.new_state())
        alone_b = run_stream(tower, b, cacher.new_state())
        sa, sb = cacher.new_state(), cacher.new_state()
        got_a, got_b = [], []
        with torch.no_grad():
            for i in range(6):
                got_a.append(tower(a[i : i + 1], stc_state=sa).last_hidden_state)
                got_b.append(tower(b[i : i + 1], stc_state=sb).last_hidden_state)
    assert torch.equal(torch.cat(got_a), alone_a)
    assert torch.equal(torch.cat(got_b), alone_b)


def test_new_stream_and_reset_start_clean():
    tower, frames = siglip(), video(5)
    with attach_cacher(tower, CacherConfig(cache_interval=4, reuse_ratio=0.75)) as cacher:
        state = cacher.new_state()
        first = run_stream(tower, frames, state)
        state.reset()
        again = run_stream(tower, frames, state)
        fresh = run_stream(tower, frames, cacher.new_state())
    assert torch.equal(first, again) and torch.equal(first, fresh)


def test_no_state_runs_original_forward():
    tower, frames = siglip(), video(3)
    want, _ = unpatched(tower, frames)
    with attach_cacher(tower, CacherConfig()):
        with torch.no_grad():
            got = tower(frames).last_hidden_state
    assert torch.equal(got, want)


def test_detach_restores_original_forward():
    tower, frames = siglip(), video(4)
    want, _ = unpatched(tower, frames)
    cls_forward = type(tower.encoder.layers[0]).forward
    cacher = attach_cacher(tower, CacherConfig())
    assert all("forward" in layer.__dict__ for layer in tower.encoder.layers)
    cacher.detach()
    cacher.detach()  # idempotent
    assert all("forward" not in layer.__dict__ for layer in tower.encoder.layers)
    assert type(tower.encoder.layers[0]).forward is cls_forward
    got, _ = unpatched(tower, frames)
    assert torch.equal(got, want)


def test_attach_is_idempotent_and_refuses_a_second_config():
    tower = siglip()
    cfg = CacherConfig(cache_interval=2)
    first = attach_cacher(tower, cfg)
    assert attach_cacher(tower, CacherConfig(cache_interval=2)) is first
    with pytest.raises(ValueError, match="detach it first"):
        attach_cacher(tower, CacherConfig(cache_interval=3))
    first.detach()
    attach_cacher(tower, CacherConfig(cache_interval=3)).detach()


def test_state_from_another_cacher_is_refused():
    tower = siglip()
    other = attach_cacher(siglip(seed=3), CacherConfig(cache_interval=2)).new_state()
    with attach_cacher(tower, CacherConfig(cache_interval=4)):
        with pytest.raises(ValueError, match="another Cacher"), torch.no_grad():
            tower(video(1), stc_state=other)
    with pytest.raises(TypeError, match="CacherState"):
        with attach_cacher(tower, CacherConfig()), torch.no_grad():
            tower(video(1), stc_state="not a state")


def test_clip_tower_is_supported():
    tower, frames = clip(), video(6)
    want, _ = unpatched(tower, frames)
    cfg = CacherConfig(cache_interval=1, reuse_ratio=0.5)
    with attach_cacher(tower, cfg) as cacher:
        got = run_stream(tower, frames, cacher.new_state())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with attach_cacher(tower, CacherConfig(cache_interval=3, reuse_ratio=0.5)) as cacher:
        state = cacher.new_state()
        got = run_stream(tower, frames, state)
    torch.testing.assert_close(got[[0, 3]], want[[0, 3]], atol=1e-5, rtol=1e-5)
    assert state.recomputed_tokens[1] == 2 * math.floor((TOKENS + 1) * 0.5)  # CLIP adds a class token


def test_unsupported_models_fail_loudly():
    with pytest.raises(TypeError, match="not a supported vision encoder"):
        attach_cacher(torch.nn.Linear(3, 3))

    class Layer(torch.nn.Module):
        pass

    class Tower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Module()
            self.encoder.layers = torch.nn.ModuleList([Layer()])

    with pytest.raises(TypeError, match="unsupported encoder layer Layer"):
        attach_cacher(Tower())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(reuse_ratio=1.0), "reuse_ratio must be in"),
        (dict(reuse_ratio=-0.1), "reuse_ratio must be in"),
        (dict(cache_interval=0), "cache_interval"),
        (dict(cache_interval=2.5), "cache_interval"),
        (dict(cache_interval="4"), "cache_interval"),
        (dict(metric="cos"), "metric must be one of"),
        (dict(reuse="both"), "reuse must be one of"),
        (dict(selection_feature="query"), "selection_feature must be one of"),
    ],
)
def test_invalid_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CacherConfig(**kwargs)


def test_recomputed_token_count_follows_the_paper():
    cfg = CacherConfig(reuse_ratio=0.75)
    assert cfg.recomputed_tokens(729) == 182  # floor(729 * 0.25)
    assert CacherConfig(reuse_ratio=0.5).recomputed_tokens(729) == 364
    assert CacherConfig(reuse_ratio=0.85).recomputed_tokens(729) == 109
    assert CacherConfig(reuse_ratio=0.0).recomputed_tokens(729) == 729


@pytest.mark.parametrize("metric", ["dot", "l1", "l2"])
def test_unbounded_metrics_do_not_overflow_in_fp16(metric):
    """Sums over 1,152 channels of fp16 keys of magnitude ~60 pass fp16's 65,504: the ranking must still be the
    float64 one, not ties at infinity broken by token index."""
    from stc.cacher import select_dynamic_tokens, token_similarity

    g = torch.Generator().manual_seed(0)
    ref = 60 * torch.randn(1, 16, 1152, generator=g, dtype=torch.float64)
    cur = ref * torch.linspace(0.5, 2.0, 16, dtype=torch.float64)[None, :, None] + 6 * torch.randn(1, 16, 1152, generator=g, dtype=torch.float64)
    cur = cur[:, torch.randperm(16, generator=g)]  # the ranking is not the index order
    sim = token_similarity(cur.half(), ref.half(), metric)
    assert torch.isfinite(sim).all()
    want = torch.sort(token_similarity(cur, ref, metric), dim=1, stable=True).indices[:, :5].sort(dim=1).values
    assert torch.equal(select_dynamic_tokens(cur.half(), ref.half(), 5, metric), want)


def test_settings_accept_numpy_numbers():
    cfg = CacherConfig(cache_interval=np.int64(4), reuse_ratio=np.float32(0.75))
    assert cfg.recomputed_tokens(729) == 182


def test_no_token_to_recompute_is_a_clear_error():
    """R >= 1 - 1/T would leave k = 0: refused when a selective frame comes, with the largest R that works."""
    assert CacherConfig(reuse_ratio=0.97).recomputed_tokens(36) == 1
    with pytest.raises(ValueError, match="leaves no token to recompute"):
        CacherConfig(reuse_ratio=0.98).recomputed_tokens(36)
    tower, frames = siglip(), video(3)
    with attach_cacher(tower, CacherConfig(cache_interval=1, reuse_ratio=0.99)) as cacher:
        run_stream(tower, frames, cacher.new_state())  # every frame a reference frame: no k needed
    with attach_cacher(tower, CacherConfig(cache_interval=4, reuse_ratio=0.99)) as cacher:
        state = cacher.new_state()
        with pytest.raises(ValueError, match=r"use reuse_ratio <= 0\.972222"):
            run_stream(tower, frames, state)


def test_stored_reference_does_not_keep_the_chunk_alive():
    """The reference cache holds one frame's rows in storage of its own, not views into the chunk's tensors."""
    tower, frames = siglip(), video(8)
    with attach_cacher(tower, CacherConfig(cache_interval=2)) as cacher:
        state = cacher.new_state()
        run_stream(tower, frames, state, chunk=8)
        for cache in state._refs:
            for t in (cache.key, cache.value, cache.attn, cache.mlp):
                assert t.shape[0] == 1
                assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_reports_count_the_work():
    tower, frames = siglip(), video(8)
    with attach_cacher(tower, CacherConfig(cache_interval=4, reuse_ratio=0.75)) as cacher:
        state = cacher.new_state()
        run_stream(tower, frames, state, chunk=3)
    assert [r.index for r in state.reports] == list(range(8))
    k = 9  # floor(36 * 0.25)
    assert state.recomputed_tokens == [TOKENS * 3 if i % 4 == 0 else k * 3 for i in range(8)]
    assert state.recomputed_fraction(TOKENS) == pytest.approx((2 * 36 + 6 * 9) / (8 * 36))


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_low_precision_matches_unpatched(dtype, tol):
    tower, frames = siglip(dtype=dtype, attn="eager"), video(5).to(dtype)
    want, _ = unpatched(tower, frames)
    with attach_cacher(tower, CacherConfig(cache_interval=1)) as cacher:
        got = run_stream(tower, frames, cacher.new_state())
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    with attach_cacher(tower, CacherConfig(cache_interval=4, reuse_ratio=0.0)) as cacher:
        got = run_stream(tower, frames, cacher.new_state())
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_autocast_matches_unpatched_under_autocast():
    tower, frames = siglip(), video(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, _ = unpatched(tower, frames)
        with attach_cacher(tower, CacherConfig(cache_interval=1)) as cacher:
            got = run_stream(tower, frames, cacher.new_state())
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


def test_selection_is_not_a_constant():
    """Guard for the brute-force test: different frames recompute different tokens."""
    tower, frames = siglip(), video(8, drift=0.5)
    with attach_cacher(tower, CacherConfig(cache_interval=math.inf, reuse_ratio=0.75)) as cacher:
        state = cacher.new_state(record_indices=True)
        run_stream(tower, frames, state)
    sets = {tuple(r.dynamic[0].tolist()) for r in state.reports[1:]}
    assert len(sets) > 1
    assert np.all([len(s) == 9 for s in sets])
