"""The engine's patches over its lifetime: shared by engines, undone after a failed start; bad inputs."""

import numpy as np
import pytest
import torch

from stc.cacher import CacherConfig
from stc.engine import EngineConfig, StreamingEngine
from stc.methods import build_engine
from stc.models import preprocess_frames
from stc.patching import encoder_layers, patch_owner
from tests.test_engine import PREFIX, QUESTION, frames


def vision_layers(model):
    return encoder_layers(model.model.vision_tower, "test")


def first_logits(engine, video):
    stream = engine.open_stream()
    stream.push_frames(video)
    return stream.answer(QUESTION, answer_prefix=PREFIX, max_new_tokens=1).logits


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


# ---------------------------------------------------------------- the sliding window's keys


def rotated(model, keys, delta):
    """RoPE by `delta` positions per token (keys [..., n, d]), in float32 and rounded once: the reference."""
    from transformers.models.qwen2.modeling_qwen2 import rotate_half

    x = keys.float()
    cos, sin = model.model.language_model.rotary_emb(x, delta[None])
    return (x * cos[0] + rotate_half(x) * sin[0]).to(keys.dtype)


def window_from_blocks(model, stream, w):
    """The context a slide should leave in window w for `stream` (one stream's, or a batch's): the init
    tokens rotated once from their first copy to w.first.., then the last block tokens, each rotated once
    from its block's position to its slot (by 0 where it was never moved: bit for bit its block's copy);
    values as written."""
    n_init = stream._n_init
    kept = w.length - w.first - n_init
    init = stream._init_kv
    keys = torch.cat([b.kv[:, 0] for b in stream.blocks], dim=-2)[..., -kept:, :]
    values = torch.cat([b.kv[:, 1] for b in stream.blocks], dim=-2)[..., -kept:, :]
    old = torch.cat([torch.arange(b.start, b.start + b.length) for b in stream.blocks])[-kept:]
    keys = rotated(model, keys, torch.arange(w.first + n_init, w.length) - old)
    init_keys = rotated(model, init[:, 0], torch.full((n_init,), w.first)) if w.first else init[:, 0]
    return torch.cat([init_keys, keys], dim=-2), torch.cat([init[:, 1], values], dim=-2)


def window_context(w, i=None):
    """The K and V of window w's context, slots first .. length - 1 (of stream i of a batch)."""
    buf = w.buf if i is None else w.buf[:, :, i]
    return buf[:, 0, :, w.first : w.length], buf[:, 1, :, w.first : w.length]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("slack,moves", [(0, 9), (40, 2)])
@pytest.mark.parametrize("move_bytes", [2**30, 1], ids=["all-layers", "layer-by-layer"])
def test_slid_window_keys_are_rotated_once_from_their_blocks(tiny, dtype, graphs, slack, moves, move_bytes, monkeypatch):
    """After 12 frames of 16 tokens in a window of 40 (9 slides), every kept key equals its block's key rotated
    once to its slot, and the init keys their first copy rotated once, bit for bit: re-rotating the window's own
    copy at each move would round it again each time. With no slack each slide moves the window back; with 40
    slots it advances, and moves back twice (at the 7th and the 10th frame)."""
    import stc.engine

    monkeypatch.setattr(stc.engine, "MOVE_BYTES", move_bytes)
    model, proc = tiny
    assert model.config.text_config.num_hidden_layers > 1
    model.to(dtype)
    try:
        with StreamingEngine(model, proc, EngineConfig(n_local=40, window_slack=slack, cuda_graphs=graphs)) as engine:
            moved = []
            real = engine._slide_window

            def slide(w, *args):
                before = w.length
                real(w, *args)
                moved.append(w.length < before)  # moved back (an advance keeps the length)

            monkeypatch.setattr(engine, "_slide_window", slide)
            stream = engine.open_stream()
            video = frames(12, seed=3)
            for f in range(12):
                stream.push_frames(video[f : f + 1])
            w = stream._window
            assert w.length - w.first - stream._n_init == 40 + 16  # n_local, and the last frame pushed after the slide
            assert sum(moved) == moves
            keys, values = window_from_blocks(model, stream, w)
            got_keys, got_values = window_context(w)
            assert torch.equal(got_keys, keys)
            assert torch.equal(got_values, values)
    finally:
        model.float()


@pytest.mark.parametrize("slack", [0, 40])
@pytest.mark.parametrize("move_bytes", [2**30, 1], ids=["all-layers", "layer-by-layer"])
def test_batch_windows_slide_like_single_streams(tiny, slack, move_bytes, monkeypatch):
    import stc.engine

    monkeypatch.setattr(stc.engine, "MOVE_BYTES", move_bytes)
    model, proc = tiny
    with StreamingEngine(model, proc, EngineConfig(n_local=40, window_slack=slack, cuda_graphs=True)) as engine:
        batch = engine.open_batch(2)
        videos = [frames(12, seed=4), frames(12, seed=5)]
        for f in range(12):
            batch.push_frames(np.stack([v[f] for v in videos]))
        w = batch._window
        assert w.first == (0 if slack == 0 else 32)
        for i, stream in enumerate(batch.streams):
            keys, values = window_from_blocks(model, stream, w)
            got_keys, got_values = window_context(w, i)
            assert torch.equal(got_keys, keys)
            assert torch.equal(got_values, values)
            assert (stream._window.first, stream._window.length) == (w.first, w.length)


@pytest.mark.parametrize("old_first", [0, 3])
@pytest.mark.parametrize("move_bytes", [2**30, 1], ids=["all-layers", "layer-by-layer"])
def test_a_block_in_cpu_memory_is_re_rotated_from_the_window(tiny, old_first, move_bytes, monkeypatch):
    """When the window moves back, rows whose block is not on the window's device (here: on the meta device) are
    rotated from the window's copy by the slots they move; the others from their blocks; the init tokens are
    their first copy. From a window at slot 0 and from one that had advanced by 3 slots."""
    import stc.engine
    from stc.engine import Block, _KV

    monkeypatch.setattr(stc.engine, "MOVE_BYTES", move_bytes)
    model, proc = tiny
    with StreamingEngine(model, proc, EngineConfig(n_local=6, window_slack=0)) as engine:
        layers, kvh, d, n_init = engine.num_layers, engine.kv_heads, engine.head_dim, 2
        g = torch.Generator().manual_seed(0)
        base = old_first + n_init
        blocks = [Block(frame=i, time=None, start=base + 4 * i, kv=torch.randn(layers, 2, kvh, 4, d, generator=g),
                        mean_key=torch.zeros(layers, kvh, d)) for i in range(3)]  # fmt: skip
        window = _KV(torch.randn(layers, 2, kvh, base + 12, d, generator=g), base + 12)
        window.first = old_first
        window.buf[..., base:, :] = torch.cat([b.kv for b in blocks], dim=-2)
        init = torch.randn(layers, 2, kvh, n_init, d, generator=g)
        before = window.buf.clone()
        blocks[1].kv = blocks[1].kv.to("meta")  # "in CPU memory": not where the window is
        engine._slide_window(window, init, 4, [blocks])
        moved = old_first + 6  # 6 tokens dropped
        assert (window.first, window.length) == (0, n_init + 6)
        got = window.buf[:, 0, :, n_init : n_init + 6]
        # the kept tokens: the last 2 of block 1 (from the window, by -moved), then block 2 (from its block)
        torch.testing.assert_close(got[..., :2, :], rotated(model, before[:, 0, :, base + 6 : base + 8], torch.full((2,), -moved)),
                                   rtol=0, atol=0)  # fmt: skip
        torch.testing.assert_close(got[..., 2:, :], rotated(model, blocks[2].kv[:, 0], torch.full((4,), n_init + 2 - blocks[2].start)),
                                   rtol=0, atol=0)  # fmt: skip
        assert torch.equal(window.buf[:, 1, :, n_init : n_init + 6], before[:, 1, :, base + 6 : base + 12])
        assert torch.equal(window.buf[..., :n_init, :], init)


def test_a_batch_blocks_streams_are_stacked_as_a_view_of_their_tensor():
    """A StreamBatch block's streams (`kv[:, :, i]`, also their last rows) stack as a view of `kv`: equal to
    torch.stack, no copy; parts that are not consecutive slices of one tensor are not stacked as a view."""
    from stc.engine import _stacked_view

    kv = torch.randn(3, 2, 4, 2, 5, 8)  # [layers, 2, streams, kv_heads, tokens, d]
    for rows in (5, 3):
        parts = [kv[:, :, i][..., 5 - rows :, :] for i in range(4)]
        view = _stacked_view(parts)
        assert torch.equal(view, torch.stack(parts, dim=2))
        assert view.data_ptr() == kv[..., 5 - rows :, :].data_ptr() and view.stride() == kv.stride()
    one = _stacked_view([kv[:, :, 1]])
    assert torch.equal(one, kv[:, :, 1:2]) and one.data_ptr() == kv[:, :, 1].data_ptr()
    shifted = [kv[:, :, 0, :, :4], kv[:, :, 1, :, 1:]]  # a constant step apart all the same
    assert torch.equal(_stacked_view(shifted), torch.stack(shifted, dim=2))
    parts = [kv[:, :, i] for i in range(4)]
    for not_a_view in ([p.clone() for p in parts], parts[::-1], parts[:1] + parts[2:], [parts[0], parts[0]],
                       [kv[:, :, 0, :, :4], kv[:, :, 1, :, :3]], [kv[:, :, 0], kv[:, :, 1].double()]):
        assert _stacked_view(not_a_view) is None


@pytest.mark.parametrize("batch", [False, True])
def test_joined_blocks_equal_their_cat(batch):
    """The move's join of block K and V (contiguous, and the strided last rows of the oldest block) equals
    torch.cat along the tokens."""
    from stc.engine import _joined

    g = torch.Generator().manual_seed(0)
    lead = (3, 2, 2, 4) if batch else (3, 2, 4)
    parts = [torch.randn(*lead, n, 8, generator=g) for n in (7, 5, 1)]
    parts[0] = parts[0][..., 4:, :]  # the oldest block's last 3 rows: not contiguous
    assert not parts[0].is_contiguous()
    assert torch.equal(_joined(parts), torch.cat(parts, dim=-2))


def test_the_window_slide_is_timed_as_part_of_prefill(tiny, monkeypatch):
    """Each frame records one "window" interval before its prefill, and the latency benchmark counts it
    in the prefill time (here a slide made to take 50 ms)."""
    import time

    from stc.engine import Stream
    from stc.latency import measure_stream

    model, proc = tiny
    with StreamingEngine(model, proc, EngineConfig(n_local=20)) as engine:
        stream = engine.open_stream()
        stream.push_frames(frames(3))
        assert len(stream.timer.times()["window"]) == 3
    slide = Stream._ensure_window
    monkeypatch.setattr(Stream, "_ensure_window", lambda self, n: (time.sleep(0.05), slide(self, n)))
    out = measure_stream(model, proc, "baseline", 3, checkpoints=(3,), warmup=0, repeats=1, base=EngineConfig(n_local=20))
    assert out["checkpoints"][3]["prefill_ms_per_frame"] >= 50
