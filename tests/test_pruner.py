"""STC-Pruner against direct NumPy implementations of both strategies."""

import math

import numpy as np
import pytest
import torch

from stc.compress import FrameCompressor
from stc.pruner import Pruner, PrunerConfig


def np_cos(a, b):
    return (a @ b) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b))


def np_dual_anchor(frames, k, alpha, window):
    """frames: list of [N, D] arrays in stream order. Returns kept indices per frame."""
    buffer, out = [], []
    for z in frames:
        a_s = z.mean(0)
        a_t = np.mean(buffer, axis=0) if buffer else a_s
        s = alpha * (1 - np_cos(z, a_t)) + (1 - alpha) * (1 - np_cos(z, a_s))
        out.append(np.sort(np.argsort(-s, kind="stable")[:k]))
        buffer = (buffer + [a_s])[-window:]
    return out


def np_gaussian(chunks, k, fraction=0.5):
    """chunks: list of [F, N, D] arrays. Returns kept indices per frame. Each frame is its own encode
    chunk (ReKV's one frame per chunk), however the frames were pushed: nothing looks at a later frame."""
    memory, out = [], []
    for c in (frame[None] for chunk in chunks for frame in chunk):
        f, n, d = c.shape
        var = c.reshape(f * n, d).var(axis=0)
        ch = np.argsort(var, kind="stable")[: int(d * fraction)]
        x = c[..., ch]
        memory.append(x.mean(axis=(0, 1)))
        m = np.mean(memory, axis=0)
        m = m / np.linalg.norm(m)
        xn = x / np.linalg.norm(x, axis=-1, keepdims=True)
        fa = xn.mean(axis=1, keepdims=True)

        def g(a):
            d2 = ((xn - a) ** 2).sum(-1)
            return sum(np.exp(-d2 / (2 * al)) for al in (1 / 8, 1 / 4, 1 / 2, 1, 2))

        s = g(m[None, None]) + g(fa)
        for row in s:
            out.append(np.sort(np.argsort(row, kind="stable")[:k]))
    return out


def random_stream(frames=10, n=49, d=24, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, d))
    return [(base + 0.8 * rng.normal(size=(n, d))).astype(np.float64) for _ in range(frames)]


@pytest.mark.parametrize("alpha", [0.0, 1 / 3, 0.5, 1.0])
@pytest.mark.parametrize("window", [1, 3, 16])
def test_dual_anchor_matches_numpy(alpha, window):
    frames = random_stream()
    cfg = PrunerConfig(strategy="dual_anchor", keep_ratio=0.25, alpha=alpha, window=window)
    pruner = Pruner(cfg)
    state = pruner.new_state()
    got = [pruner.select(torch.tensor(f)[None], state)[0].numpy() for f in frames]
    want = np_dual_anchor(frames, k=12, alpha=alpha, window=window)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_dual_anchor_chunks_equal_frames():
    frames = random_stream(9)
    pruner = Pruner(PrunerConfig(keep_ratio=0.3, window=4))
    s1, s2 = pruner.new_state(), pruner.new_state()
    one = torch.cat([pruner.select(torch.tensor(f)[None], s1) for f in frames])
    t = torch.tensor(np.stack(frames))
    chunked = torch.cat([pruner.select(t[i : i + 4], s2) for i in range(0, 9, 4)])
    assert torch.equal(one, chunked)


@pytest.mark.parametrize("strategy", ["dual_anchor", "gaussian"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_streams_at_once_equal_one_stream_at_a_time(strategy, dtype):
    """select_streams / compress_streams (what StreamBatch calls) against B separate select calls (which
    test_dual_anchor_matches_numpy holds to NumPy): the same tokens and the same memory, frame after frame,
    also once the windows are full; streams whose memories differ in length take the one-at-a-time path
    and still agree."""
    streams = [random_stream(7, seed=s) for s in range(3)]
    pruner = Pruner(PrunerConfig(strategy=strategy, keep_ratio=0.25, window=3))
    together, apart = [pruner.new_state() for _ in streams], [pruner.new_state() for _ in streams]
    for f in range(7):
        tokens = torch.stack([torch.tensor(s[f]) for s in streams]).to(dtype)
        want = torch.cat([pruner.select(tokens[b : b + 1], st) for b, st in enumerate(apart)])
        out = pruner.compress_streams(tokens, together)
        got = torch.stack(out.indices)
        assert torch.equal(got, want)
        assert all(torch.equal(t, tokens[b, i]) for b, (t, i) in enumerate(zip(out.tokens, out.indices)))
        for a, b in zip(together, apart):
            for mine, theirs in ((a.frame_means, b.frame_means), (a.chunk_means, b.chunk_means)):
                assert len(mine) == len(theirs) and all(torch.equal(x, y) for x, y in zip(mine, theirs))
    ragged = [pruner.new_state(), pruner.new_state()]
    pruner.select(torch.tensor(streams[0][0])[None], ragged[0])  # one stream has seen a frame more
    tokens = torch.stack([torch.tensor(streams[0][1]), torch.tensor(streams[1][0])])
    copies = [pruner.new_state(), pruner.new_state()]
    pruner.select(torch.tensor(streams[0][0])[None], copies[0])
    want = torch.cat([pruner.select(tokens[b : b + 1], st) for b, st in enumerate(copies)])
    assert torch.equal(pruner.select_streams(tokens, ragged), want)


def test_streams_at_once_refuse_bad_input():
    pruner = Pruner()
    state = pruner.new_state()
    with pytest.raises(ValueError, match="one state per stream"):
        pruner.select_streams(torch.zeros(2, 8, 4), [state])
    with pytest.raises(ValueError, match="the same state was given twice"):
        pruner.select_streams(torch.zeros(2, 8, 4), [state, state])
    with pytest.raises(TypeError, match="PrunerStates"):
        pruner.select_streams(torch.zeros(1, 8, 4), [object()])
    with pytest.raises(ValueError, match="at least one token"):
        pruner.select_streams(torch.zeros(1, 0, 4), [state])
    with pytest.raises(ValueError, match="one state per stream"):
        pruner.select_streams(torch.zeros(8, 4), [state])


def test_gaussian_matches_numpy():
    rng = np.random.default_rng(1)
    chunks = [rng.normal(size=(f, 49, 24)) for f in (1, 1, 2, 1, 3)]
    pruner = Pruner(PrunerConfig(strategy="gaussian", tokens_per_frame=15))
    state = pruner.new_state()
    got = [row.numpy() for c in chunks for row in pruner.select(torch.tensor(c), state)]
    want = np_gaussian(chunks, k=15)
    assert len(got) == len(want) == 8
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("strategy", ["dual_anchor", "gaussian"])
def test_causal_whatever_the_push_size(strategy):
    """Frames pushed together keep what they keep pushed one by one, and later frames change nothing before them."""
    pruner = Pruner(PrunerConfig(strategy=strategy, tokens_per_frame=15))
    frames = torch.tensor(np.random.default_rng(2).normal(size=(6, 49, 24)))
    together = pruner.select(frames, pruner.new_state())
    state = pruner.new_state()
    one_by_one = torch.cat([pruner.select(frames[i : i + 1], state) for i in range(6)])
    assert torch.equal(together, one_by_one)
    changed = frames.clone()
    changed[3:] = torch.randn(3, 49, 24, dtype=changed.dtype)
    assert torch.equal(pruner.select(changed, pruner.new_state())[:3], together[:3])


@pytest.mark.parametrize("strategy", ["dual_anchor", "gaussian"])
@pytest.mark.parametrize("budget, k", [(dict(keep_ratio=0.25), 49), (dict(keep_ratio=0.3), 58), (dict(tokens_per_frame=64), 64)])
def test_exact_k_and_spatial_order(strategy, budget, k):
    pruner = Pruner(PrunerConfig(strategy=strategy, **budget))
    tokens = torch.randn(3, 196, 16)
    out = pruner.prune(tokens, pruner.new_state())
    assert out.tokens.shape == (3, k, 16) and out.indices.shape == (3, k)
    assert torch.all(out.indices[:, 1:] > out.indices[:, :-1])
    for f in range(3):
        assert torch.equal(out.tokens[f], tokens[f, out.indices[f]])


def test_keeps_the_distinct_tokens():
    """A frame of near-identical tokens with a few outliers: the outliers are kept."""
    torch.manual_seed(0)
    frame = torch.ones(1, 20, 8) + 0.01 * torch.randn(1, 20, 8)
    outliers = [3, 11, 17]
    frame[0, outliers] = torch.randn(3, 8) * 5
    for strategy in ("dual_anchor", "gaussian"):
        pruner = Pruner(PrunerConfig(strategy=strategy, tokens_per_frame=3, channel_fraction=1.0))
        assert pruner.select(frame, pruner.new_state())[0].tolist() == outliers


def test_reset_and_new_state_forget_the_past():
    frames = [torch.tensor(f)[None] for f in random_stream(6)]
    for strategy in ("dual_anchor", "gaussian"):
        pruner = Pruner(PrunerConfig(strategy=strategy))
        state = pruner.new_state()
        first = [pruner.select(f, state) for f in frames]
        state.reset()
        again = [pruner.select(f, state) for f in frames]
        fresh = pruner.select(frames[0], pruner.new_state())
        assert all(torch.equal(a, b) for a, b in zip(first, again))
        assert torch.equal(fresh, first[0])


def test_memory_changes_the_selection():
    frames = random_stream(8, seed=3)
    pruner = Pruner(PrunerConfig(alpha=1.0, window=8))
    state = pruner.new_state()
    history = [pruner.select(torch.tensor(f)[None], state) for f in frames]
    alone = pruner.select(torch.tensor(frames[-1])[None], pruner.new_state())
    assert not torch.equal(history[-1], alone)


def test_implements_frame_compressor():
    pruner = Pruner(PrunerConfig(tokens_per_frame=5))
    assert isinstance(pruner, FrameCompressor)
    out = pruner.compress(torch.randn(2, 16, 4), pruner.new_state())
    assert out.counts == [5, 5]
    assert all(idx.dtype == torch.int64 for idx in out.indices)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(strategy="topk"), "strategy must be one of"),
        (dict(keep_ratio=0.0), "keep_ratio must be in"),
        (dict(keep_ratio=1.5), "keep_ratio must be in"),
        (dict(keep_ratio=True), "keep_ratio must be in"),
        (dict(keep_ratio=0.5, tokens_per_frame=10), "not both"),
        (dict(tokens_per_frame=0), "tokens_per_frame"),
        (dict(tokens_per_frame=2.5), "tokens_per_frame"),
        (dict(alpha=1.5), "alpha"),
        (dict(window=0), "window"),
        (dict(channel_fraction=0.0), "channel_fraction"),
    ],
)
def test_invalid_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PrunerConfig(**kwargs)


def test_wrong_tensor_shape():
    pruner = Pruner()
    with pytest.raises(ValueError, match=r"\[frames, tokens, dim\]"):
        pruner.select(torch.randn(196, 16), pruner.new_state())
    with pytest.raises(ValueError, match="at least one frame"):
        pruner.select(torch.randn(0, 196, 16), pruner.new_state())
    with pytest.raises(TypeError, match="PrunerState"):
        pruner.select(torch.randn(1, 196, 16), None)


def test_paper_budgets():
    assert PrunerConfig().keep_ratio == 0.25
    assert PrunerConfig(keep_ratio=0.25).kept_tokens(196) == 49
    assert PrunerConfig(keep_ratio=0.3).kept_tokens(196) == math.floor(196 * 0.3)
    assert PrunerConfig(tokens_per_frame=300).kept_tokens(196) == 196
