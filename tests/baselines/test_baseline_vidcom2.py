"""Causal VidCom2 against a direct NumPy implementation of its specification, plus budget properties."""

import math

import numpy as np
import pytest
import torch

from stc.baselines import VidCom2
from stc.compress import FrameCompressor

BANDWIDTHS = (1 / 8, 1 / 4, 1 / 2, 1, 2)


def np_vidcom2(frames, k, period, window, temperature, fraction=0.5, kind="gaussian", min_tokens=1):
    """frames: list of [N, D] float64 arrays in stream order. Returns (kept indices, budgets) per frame."""
    seen, uniq, out, budgets, spent = [], [], [], [], 0
    for t, x in enumerate(frames):
        n, d = x.shape
        everything = np.concatenate(seen + [x])
        ch = np.sort(np.argsort(everything.var(axis=0), kind="stable")[: max(1, int(d * fraction))])
        z = x[:, ch] / np.linalg.norm(x[:, ch], axis=1, keepdims=True)
        past = np.concatenate(seen) if seen else x
        mem = past.mean(0)[ch]
        mem = mem / np.linalg.norm(mem)

        def sim(a):
            if kind == "cosine":
                return z @ a / np.linalg.norm(a)
            d2 = ((z - a) ** 2).sum(1)
            return sum(np.exp(-d2 / (2 * b)) for b in BANDWIDTHS)

        s_mem, s_frame = sim(mem), sim(z.mean(0))
        uniq = (uniq + [-s_mem.mean()])[-window:]
        e = np.exp((np.array(uniq) - max(uniq)) / temperature)
        w = 1 + e[-1] / e.sum() - 1 / len(uniq)
        pos = t % period
        left = period - pos
        remaining = period * k - spent
        lo = max(min(min_tokens, k), remaining - (left - 1) * n)
        hi = min(n, remaining - (left - 1) * min(min_tokens, k))
        b = min(hi, max(lo, math.floor(w * remaining / left + 0.5)))
        out.append(np.sort(np.argsort(s_mem + s_frame, kind="stable")[:b]))
        budgets.append(b)
        spent = 0 if pos == period - 1 else spent + b
        seen.append(x)
    return out, budgets


def stream(frames=12, n=20, d=10, seed=0, scene_every=4):
    """Frames that drift slowly, with a scene cut every few frames."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(frames):
        if t % scene_every == 0:
            base = rng.normal(size=(n, d)) + rng.normal(size=d) * 2
        out.append(base + 0.3 * rng.normal(size=(n, d)))
    return out


@pytest.mark.parametrize(
    "period, window, temperature, kind", [(4, 3, 0.01, "gaussian"), (5, 16, 0.5, "gaussian"), (3, 2, 0.1, "cosine")]
)
def test_matches_numpy_reference(period, window, temperature, kind):
    frames = stream()
    comp = VidCom2(tokens_per_frame=6, period=period, window=window, temperature=temperature, similarity=kind)
    state = comp.new_state()
    out = comp.compress(torch.tensor(np.stack(frames)), state)
    ref_idx, ref_budgets = np_vidcom2(frames, 6, period, window, temperature, kind=kind)
    assert state.budgets == ref_budgets
    for got, want in zip(out.indices, ref_idx):
        assert got.tolist() == want.tolist()


def test_budgets_sum_exactly_over_each_period():
    frames = torch.tensor(np.stack(stream(frames=15, seed=3, scene_every=3)))
    for comp, k in [(VidCom2(tokens_per_frame=5, period=4), 5), (VidCom2(keep_ratio=0.3, period=5), 6)]:
        state = comp.new_state()
        out = comp.compress(frames, state)
        budgets = out.counts
        assert budgets == state.budgets and all(1 <= b <= 20 for b in budgets)
        p = comp.period
        for start in range(0, 15 - p + 1, p):
            assert sum(budgets[start : start + p]) == p * k
        assert len(set(budgets)) > 1  # the content moved tokens between frames
    fixed = VidCom2(tokens_per_frame=5, period=1)
    assert fixed.compress(frames, fixed.new_state()).counts == [5] * 15


def test_new_frame_gets_more_tokens_than_a_repeat():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(32, 8)), rng.normal(size=(32, 8)) + 3.0
    comp = VidCom2(tokens_per_frame=8, period=4)
    state = comp.new_state()
    comp.compress(torch.tensor(np.stack([a, a, b])), state)
    assert state.budgets[0] == state.budgets[1] == 8  # a repeat is an average frame
    assert state.budgets[2] > state.budgets[1]


def test_chunking_order_determinism_and_causality():
    frames = torch.tensor(np.stack(stream(frames=11, seed=5)))
    comp = VidCom2(keep_ratio=0.25, period=4, window=5)
    assert isinstance(comp, FrameCompressor)
    whole = comp.compress(frames, comp.new_state())
    again = comp.compress(frames, comp.new_state())
    state = comp.new_state()
    chunked = []
    for lo, hi in [(0, 1), (1, 4), (4, 6), (6, 11)]:
        chunked += comp.compress(frames[lo:hi], state).indices
    for x, y, z in zip(whole.indices, again.indices, chunked):
        assert torch.equal(x, y) and torch.equal(x, z)
    for f, idx in enumerate(whole.indices):
        assert torch.all(idx[1:] > idx[:-1])
        assert torch.equal(whole.tokens[f], frames[f, idx])
    # the future never changes the past
    other = frames.clone()
    other[7:] = torch.randn_like(other[7:])
    changed = comp.compress(other, comp.new_state())
    assert all(torch.equal(x, y) for x, y in zip(changed.indices[:7], whole.indices[:7]))


def test_state_reset_and_bad_inputs():
    frames = torch.tensor(np.stack(stream(frames=6)))
    comp = VidCom2(tokens_per_frame=5, period=3)
    state = comp.new_state()
    first = comp.compress(frames, state)
    with pytest.raises(ValueError, match="tokens"):
        comp.compress(frames[:, :10], state)
    state.reset()
    assert all(torch.equal(x, y) for x, y in zip(comp.compress(frames, state).indices, first.indices))
    with pytest.raises(TypeError):
        comp.compress(frames, None)
    with pytest.raises(ValueError):
        comp.compress(frames, VidCom2(window=3).new_state())
    with pytest.raises(ValueError, match="shape"):
        comp.compress(frames[0], comp.new_state())
    for kwargs in [dict(period=0), dict(window=0), dict(temperature=0), dict(temperature=float("inf")),
                   dict(similarity="l2"), dict(channel_fraction=0), dict(min_tokens=0), dict(keep_ratio=2.0),
                   dict(keep_ratio=0.2, tokens_per_frame=3), dict(period=2.0)]:
        with pytest.raises(ValueError):
            VidCom2(**kwargs)
