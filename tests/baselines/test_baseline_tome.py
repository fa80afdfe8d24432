"""ToMe: the matching and merging functions against brute force, and the SigLIP/CLIP glue against
the unpatched encoders."""

import pytest
import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from stc.baselines import (
    ToMeState,
    attach_tome,
    bipartite_soft_matching,
    merge_assignment,
    merge_tokens,
    merge_weighted_average,
    tome_r_for_budget,
)
from stc.baselines.tome import tome_layer
from stc.cacher import CacherConfig, attach_cacher

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=112, patch_size=14)


@pytest.fixture(scope="module")
def siglip():
    torch.manual_seed(0)
    return SiglipVisionModel(SiglipVisionConfig(**TINY)).eval()


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------
# Tensor functions against brute force
# ---------------------------------------------------------------------------------------------


def brute_force_plan(metric, r, class_token=False):
    """Per batch row: {src A position: dst B position} of the r strongest A->B edges."""
    plans = []
    for m in metric:
        m = m / m.norm(dim=-1, keepdim=True)
        a, b = m[::2], m[1::2]
        edges = []
        for i in range(a.shape[0]):
            if class_token and i == 0:
                continue
            sims = [float(a[i] @ b[j]) for j in range(b.shape[0])]
            best = max(range(len(sims)), key=lambda j: sims[j])
            edges.append((sims[best], i, best))
        edges.sort(key=lambda e: -e[0])
        plans.append({i: j for _, i, j in edges[:r]})
    return plans


@pytest.mark.parametrize("t, r, class_token", [(9, 3, False), (10, 5, False), (9, 2, True), (8, 3, True)])
def test_matching_and_weighted_merge_match_brute_force(t, r, class_token):
    g = torch.Generator().manual_seed(t + r)
    metric = torch.randn(2, t, 5, generator=g, dtype=torch.float64)
    x = torch.randn(2, t, 3, generator=g, dtype=torch.float64)
    size = torch.rand(2, t, generator=g, dtype=torch.float64) + 0.5
    plan = bipartite_soft_matching(metric, r, class_token=class_token)
    merged, new_size = merge_weighted_average(plan, x, size)
    assert merged.shape == (2, t - r, 3) and new_size.shape == (2, t - r)
    for row, expected in enumerate(brute_force_plan(metric, r, class_token)):
        got = dict(zip(plan.src[row].tolist(), plan.dst[row].tolist()))
        assert got == expected
        kept_a = [i for i in range((t + 1) // 2) if i not in expected]
        # layout: the kept A tokens in order, then every B token with its merged A tokens
        groups = [[2 * i] for i in kept_a] + [[2 * j + 1] + [2 * i for i, d in expected.items() if d == j] for j in range(t // 2)]
        for out_pos, members in enumerate(groups):
            w = size[row, members]
            ref = (x[row, members] * w[:, None]).sum(0) / w.sum()
            torch.testing.assert_close(merged[row, out_pos], ref)
            torch.testing.assert_close(new_size[row, out_pos], w.sum())
        if class_token:
            torch.testing.assert_close(merged[row, 0], x[row, 0])


def test_merge_caps_and_modes():
    metric = torch.randn(1, 9, 4)
    assert bipartite_soft_matching(metric, 100).r == 4  # at most (T - protected) // 2
    assert bipartite_soft_matching(metric, 100, class_token=True).r == 4
    assert bipartite_soft_matching(metric[:, :8], 100, class_token=True).r == 3
    plan = bipartite_soft_matching(metric, 0)
    x = torch.randn(1, 9, 2)
    assert torch.equal(merge_tokens(plan, x), torch.cat([x[:, ::2], x[:, 1::2]], dim=1))
    plan = bipartite_soft_matching(metric, 3)
    ones = torch.ones(1, 9, 1)
    assert merge_tokens(plan, ones, "mean").eq(1).all() and merge_tokens(plan, ones, "sum").sum() == 9
    with pytest.raises(ValueError):
        merge_tokens(plan, x, "max")
    with pytest.raises(ValueError):
        merge_tokens(plan, x[:, :8])
    with pytest.raises(ValueError):
        bipartite_soft_matching(metric, -1)
    with pytest.raises(ValueError):
        bipartite_soft_matching(metric[0], 1)


def test_assignment_tracks_sources_through_merges():
    # After any number of size-weighted merges, each token is the plain mean of its source patches.
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 21, 4, generator=g, dtype=torch.float64)
    x, size = x0.clone(), torch.ones(2, 21, dtype=torch.float64)
    assignment = torch.arange(21).expand(2, -1).clone()
    for r in (5, 4, 6):
        plan = bipartite_soft_matching(torch.randn(2, x.shape[1], 3, generator=g), r)
        x, size = merge_weighted_average(plan, x, size)
        assignment = merge_assignment(plan, assignment)
    assert x.shape[1] == 21 - 15
    for row in range(2):
        assert torch.equal(torch.bincount(assignment[row], minlength=x.shape[1]).double(), size[row])
        for tok in range(x.shape[1]):
            torch.testing.assert_close(x[row, tok], x0[row, assignment[row] == tok].mean(0))


def test_proportional_attention_counts_a_merged_token_as_its_members(siglip):
    # A token of size 2 must act like two identical tokens of size 1 (ToMe's proportional attention).
    layer = siglip.encoder.layers[0]
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(2, 1, 5, 32, generator=g)
    dup = torch.cat([a, b, b[:, :1]], dim=1)  # tokens a0..a4, b0..b4, b0 again
    state_full = ToMeState(schedule=(0, 0), class_token=False, sizes=torch.ones(1, 11), token_counts=[11])
    state_merged = ToMeState(schedule=(0, 0), class_token=False, token_counts=[11])
    state_merged.sizes = torch.ones(1, 10)
    state_merged.sizes[0, 5] = 2.0
    with torch.no_grad():
        full = tome_layer(layer, dup, 0, state_full)
        merged = tome_layer(layer, torch.cat([a, b], dim=1), 0, state_merged)
        state_merged.proportional_attention = False
        plain = tome_layer(layer, torch.cat([a, b], dim=1), 0, state_merged)
    torch.testing.assert_close(merged, full[:, :10], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain, full[:, :10], atol=1e-4)


# ---------------------------------------------------------------------------------------------
# The glue
# ---------------------------------------------------------------------------------------------


def test_r_zero_equals_unpatched_encoder(siglip, pixels):
    with torch.no_grad():
        ref = siglip(pixels, output_hidden_states=True)
        with attach_tome(siglip, 0) as tome:
            state = tome.new_state()
            out = siglip(pixels, tome_state=state, output_hidden_states=True)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=1e-5)
    for got, want in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert state.token_counts == [64, 64, 64]
    assert torch.equal(state.sizes, torch.ones(3, 64))


def test_token_counts_sizes_and_detach(siglip, pixels):
    with torch.no_grad():
        ref = siglip(pixels, output_hidden_states=True).last_hidden_state
    tome = attach_tome(siglip, 10)
    try:
        assert attach_tome(siglip, 10) is tome  # idempotent
        with pytest.raises(ValueError, match="detach"):
            attach_tome(siglip, 11)
        with pytest.raises(ValueError, match="detach"):
            attach_cacher(siglip, CacherConfig())
        state = tome.new_state()
        with torch.no_grad():
            out = siglip(pixels, tome_state=state, output_hidden_states=True)
            untouched = siglip(pixels).last_hidden_state  # no state: the original forward
        assert state.token_counts == [64, 54, 44] == [h.shape[1] for h in out.hidden_states]
        assert out.last_hidden_state.shape == (3, 44, 32) and tome.final_tokens(64) == 44
        assert torch.equal(state.sizes.sum(1), torch.full((3,), 64.0))
        assert torch.equal(torch.bincount(state.assignment[0], minlength=44).float(), state.sizes[0])
        torch.testing.assert_close(untouched, ref, atol=0, rtol=0)
        # spatial order: positions are each token's first patch; ordering sorts them
        positions = state.positions()
        for tok in range(44):
            assert positions[1, tok] == (state.assignment[1] == tok).nonzero().min()
        ordered = positions.gather(1, state.spatial_order())
        assert torch.all(ordered[:, 1:] > ordered[:, :-1])
    finally:
        tome.detach()
    assert all("forward" not in layer.__dict__ for layer in siglip.encoder.layers)
    tome.detach()  # twice is fine
    with torch.no_grad():
        torch.testing.assert_close(siglip(pixels).last_hidden_state, ref, atol=0, rtol=0)
    with attach_cacher(siglip, CacherConfig()):
        with pytest.raises(ValueError, match="detach"):
            attach_tome(siglip, 1)


def test_schedule_reaches_budget_exactly(siglip, pixels):
    schedule = tome_r_for_budget(64, 2, 20)
    assert sum(schedule) == 44
    with attach_tome(siglip, schedule) as tome:
        state = tome.new_state()
        with torch.no_grad():
            out = siglip(pixels, tome_state=state)
    assert out.last_hidden_state.shape[1] == 20 and state.token_counts[-1] == 20
    llava_ov = tome_r_for_budget(729, 26, 49)
    assert len(llava_ov) == 26 and sum(llava_ov) == 680 and max(llava_ov) - min(llava_ov) <= 1
    t = 729
    for r in llava_ov:
        assert r <= t // 2
        t -= r
    with pytest.raises(ValueError, match="cannot reduce"):
        tome_r_for_budget(64, 2, 15)  # 64 -> 32 -> 16 at best
    for bad in [(64, 2, 0), (64, 0, 10), (10, 2, 11), (64, 2, 2.5)]:
        with pytest.raises(ValueError):
            tome_r_for_budget(*bad)


def test_clip_keeps_class_token():
    torch.manual_seed(0)
    clip = CLIPVisionModel(CLIPVisionConfig(**TINY)).eval()
    pixels = torch.randn(2, 3, 112, 112)
    with attach_tome(clip, 30) as tome:  # asks more than the cap: (65 - 1) // 2 = 32, then (35 - 1) // 2 = 17
        state = tome.new_state()
        with torch.no_grad():
            out = clip(pixels, tome_state=state)
    assert state.token_counts == [65, 35, 18]
    assert torch.equal(state.sizes[:, 0], torch.ones(2)) and torch.all(state.positions()[:, 0] == 0)
    torch.testing.assert_close(out.pooler_output, clip.post_layernorm(out.last_hidden_state[:, 0]))


def test_bad_models_and_arguments(siglip):
    with pytest.raises(TypeError, match="vision encoder"):
        attach_tome(nn.Linear(2, 2), 1)
    fake = nn.Module()
    fake.encoder = nn.Module()
    fake.encoder.layers = nn.ModuleList([nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="unsupported encoder layer"):
        attach_tome(fake, 1)
    for bad in (-1, 1.5, True, (1,), (1, 2, 3), "2"):
        with pytest.raises(ValueError):
            attach_tome(siglip, bad)
    with attach_tome(siglip, 1):
        with pytest.raises(TypeError, match="ToMeState"):
            siglip(torch.randn(1, 3, 112, 112), tome_state="not a state")
    assert all("forward" not in layer.__dict__ for layer in siglip.encoder.layers)
