"""Budgets shared by the baselines, UniformPooling and RandomDrop."""

import pytest
import torch

from stc.baselines import RandomDrop, UniformPooling, check_budget, kept_tokens
from stc.baselines.simple import uniform_grid_indices
from stc.compress import FrameCompressor, VisionContext


@pytest.mark.parametrize(
    "keep_ratio, tokens_per_frame",
    [(0.3, 10), (0.0, None), (-0.1, None), (1.01, None), (float("nan"), None), (True, None), ("0.3", None),
     (None, 0), (None, -3), (None, 2.0), (None, True)],
)
def test_invalid_budgets_raise(keep_ratio, tokens_per_frame):
    with pytest.raises(ValueError):
        check_budget(keep_ratio, tokens_per_frame)
    for cls in (UniformPooling, RandomDrop):
        with pytest.raises(ValueError):
            cls(keep_ratio=keep_ratio, tokens_per_frame=tokens_per_frame)


def test_budget_arithmetic():
    assert check_budget(None, None) == (0.25, None)
    assert kept_tokens(196, 0.25, None) == 49  # floor(196 * 0.25) without float drift
    assert kept_tokens(196, 0.3, None) == 58
    assert kept_tokens(196, 1.0, None) == 196
    assert kept_tokens(10, 0.01, None) == 1  # never zero tokens
    assert kept_tokens(196, None, 59) == 59
    assert kept_tokens(16, None, 59) == 16  # never more than the frame has


def test_uniform_grid_regular_lattice():
    # 49 of a 14x14 grid: every other row and column, starting at 1 (the centres of 2x2 cells).
    idx = uniform_grid_indices(14, 14, 49)
    expected = sorted((2 * i + 1) * 14 + (2 * j + 1) for i in range(7) for j in range(7))
    assert idx.tolist() == expected
    assert uniform_grid_indices(3, 5, 15).tolist() == list(range(15))


@pytest.mark.parametrize("h, w", [(14, 14), (4, 4), (3, 7), (7, 3), (1, 9), (9, 1)])
def test_uniform_grid_properties(h, w):
    for k in range(1, h * w + 1):
        idx = uniform_grid_indices(h, w, k)
        assert idx.shape == (k,) and idx.dtype == torch.int64
        assert idx.unique().numel() == k and torch.all(idx[1:] > idx[:-1])
        assert 0 <= int(idx.min()) and int(idx.max()) < h * w
        rows = torch.bincount(idx // w, minlength=h)
        used = rows[rows > 0]
        assert int(used.max() - used.min()) <= 1  # rows hold equal shares, within one


def test_uniform_pooling_compress():
    tokens = torch.randn(3, 15, 4)
    ctx = VisionContext(grid=(3, 5))
    comp = UniformPooling(tokens_per_frame=6)
    assert isinstance(comp, FrameCompressor)
    state = comp.new_state()
    out = comp.compress(tokens, state, ctx)
    assert out.counts == [6, 6, 6]
    expected = uniform_grid_indices(3, 5, 6)
    for f in range(3):
        assert torch.equal(out.indices[f], expected)
        assert torch.equal(out.tokens[f], tokens[f, expected])
    assert state.frames_seen == 3
    with pytest.raises(ValueError, match="square"):
        comp.compress(tokens, state)  # 15 tokens without a grid
    with pytest.raises(ValueError, match="grid"):
        comp.compress(tokens, state, VisionContext(grid=(4, 4)))
    with pytest.raises(ValueError, match="shape"):
        comp.compress(torch.randn(15, 4), state, ctx)
    with pytest.raises(TypeError):
        comp.compress(tokens, None, ctx)


def test_random_drop_seeded_and_per_stream():
    tokens = torch.randn(5, 16, 3)
    comp = RandomDrop(keep_ratio=0.25, seed=7)
    a = comp.compress(tokens, comp.new_state())
    b = comp.compress(tokens, comp.new_state())
    assert all(torch.equal(x, y) for x, y in zip(a.indices, b.indices))
    for f in range(5):
        idx = a.indices[f]
        assert idx.numel() == 4 and torch.all(idx[1:] > idx[:-1])
        assert torch.equal(a.tokens[f], tokens[f, idx])
    assert len({tuple(i.tolist()) for i in a.indices}) > 1  # frames get different draws

    # chunking and a second stream in between change nothing
    s1, s2 = comp.new_state(), comp.new_state(seed=99)
    parts = [comp.compress(tokens[:2], s1), comp.compress(tokens[:3], s2), comp.compress(tokens[2:], s1)]
    chunked = parts[0].indices + parts[2].indices
    assert all(torch.equal(x, y) for x, y in zip(chunked, a.indices))
    other = RandomDrop(keep_ratio=0.25, seed=8).compress(tokens, RandomDrop(keep_ratio=0.25, seed=8).new_state())
    assert any(not torch.equal(x, y) for x, y in zip(other.indices, a.indices))


def test_random_drop_is_uniform():
    comp = RandomDrop(tokens_per_frame=3)
    out = comp.compress(torch.zeros(400, 10, 1), comp.new_state())
    counts = torch.bincount(torch.cat(out.indices), minlength=10)
    # each token kept with probability 0.3: 120 expected, standard deviation ~9
    assert int(counts.sum()) == 1200
    assert all(abs(int(c) - 120) < 50 for c in counts), counts.tolist()
