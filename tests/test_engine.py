"""The ReKV streaming engine on the tiny LLaVA-OneVision: exactness, retrieval, STC plumbing, errors."""

import contextlib
import inspect
from dataclasses import replace

import numpy as np
import pytest
import torch

from stc.cacher import CacherConfig
from stc.engine import INIT_PROMPT, QUESTION_TEMPLATE, EngineConfig, StreamingEngine, pool_frames
from stc.models import build_model, preprocess_frames
from stc.pruner import PrunerConfig

QUESTION = "What colour is the square?"
PREFIX = "Best option: ("


def frames(n=6, seed=0, size=64):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size, size, 3))
    out = [base]
    for _ in range(n - 1):
        out.append(np.clip(out[-1] + rng.integers(-40, 40, (size, size, 3)), 0, 255))
    return np.stack(out).astype(np.uint8)


def video_features(model, pix):
    """Pooled video tokens [1, F*16, D] through the model's own get_video_features (any 5.x return type)."""
    # transformers 5.17 names the pixels pixel_values, later 5.x pixel_values_videos
    params = inspect.signature(model.model.get_video_features).parameters
    pixels = "pixel_values_videos" if "pixel_values_videos" in params else "pixel_values"
    out = model.model.get_video_features(
        **{pixels: pix[None]},
        vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
    )
    feats = getattr(out, "pooler_output", out)
    if isinstance(feats, (tuple, list)):
        feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])[None]
    feats = feats.reshape(1, -1, feats.shape[-1])
    n = pix.shape[0] * 16
    return feats[:, :n]  # drop image_newline if present: ReKV feeds frames without it


def full_forward_greedy(model, processor, video, query, prefix, max_new, eos=()):
    """Greedy decoding by plain HF forwards over the whole sequence [init prompt, every frame's 16 tokens,
    question, tokens so far] (no cache), one per new token. Returns the first forward's logits and the tokens."""
    tok = processor.tokenizer
    lm = model.model.language_model
    emb = lm.embed_tokens
    ids = lambda t: tok(t, add_special_tokens=False, return_tensors="pt").input_ids
    first, tokens = None, []
    with torch.no_grad():
        feats = video_features(model, preprocess_frames(processor, video))
        seq = torch.cat([emb(ids(INIT_PROMPT)), feats, emb(ids(QUESTION_TEMPLATE.format(query=query) + prefix))], dim=1)
        for _ in range(max_new):
            logits = model.lm_head(lm(inputs_embeds=seq).last_hidden_state[:, -1])[0]
            first = logits if first is None else first
            token = int(logits.argmax())
            if token in eos:
                break
            tokens.append(token)
            seq = torch.cat([seq, emb(torch.tensor([[token]]))], dim=1)
    return first, tokens


def full_forward_logits(model, processor, video, query, prefix):
    """Reference: one plain HF forward over [init prompt, every frame's 16 tokens, question]."""
    return full_forward_greedy(model, processor, video, query, prefix, max_new=1)[0]


def test_streaming_prefill_equals_one_full_forward(tiny):
    model, proc = tiny
    video = frames(6)
    want = full_forward_logits(model, proc, video, QUESTION, PREFIX)
    with StreamingEngine(model, proc, EngineConfig(retrieve_top_k=None)) as engine:
        stream = engine.open_stream()
        stream.push_frames(video[:2], [0, 2])
        stream.push_frames(video[2:], [4, 6, 8, 10])  # chunks of any size
        got = stream.answer(QUESTION, answer_prefix=PREFIX, max_new_tokens=1).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # fp32


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the CUDA bilinear kernels need a GPU"))])
@pytest.mark.parametrize("side", [8, 27, 5])
def test_pooling_equals_the_models_apply_pooling(tiny, side, device):
    """pool_frames (a channels-last view) against the model's apply_pooling (a contiguous copy), on grids
    of even and odd sides; a model with another apply_pooling is pooled by it."""
    inner = tiny[0].model
    vcfg = inner.config.vision_config
    before = vcfg.image_size
    vcfg.image_size = side * vcfg.patch_size  # apply_pooling reads the grid from the config, as pool_frames
    try:
        for dtype in (torch.float32, torch.bfloat16) + ((torch.float16,) if device == "cuda" else ()):
            x = torch.randn(3, side * side, 24, dtype=dtype, device=device)
            got, want = pool_frames(inner, x), inner.apply_pooling(x)
            if device == "cuda" and dtype != torch.bfloat16:
                # the two CUDA kernels sum the weighted pixels in another order: float32 1-2 ulp apart on odd
                # grids (H200); float16, rounded from those, may then differ by one unit in rare values
                torch.testing.assert_close(got, want, atol=1e-6 if dtype == torch.float32 else 1e-3,
                                           rtol=1e-6 if dtype == torch.float32 else 1e-3)
            else:  # bf16 on the H200 (no value differed over 16 frames of 729 x 3584 either) and the CPU
                assert torch.equal(got, want)
        with pytest.raises(ValueError, match="tokens per frame"):
            pool_frames(inner, torch.randn(1, side * side + 1, 4))
    finally:
        vcfg.image_size = before

    class Other(type(inner)):
        def apply_pooling(self, image_features):
            return image_features[:, ::2]

    inner.__class__ = Other
    try:
        x = torch.randn(2, 64, 8)
        assert torch.equal(pool_frames(inner, x), x[:, ::2])
    finally:
        inner.__class__ = Other.__bases__[0]


def test_retrieval_keeping_every_frame_is_exact(tiny):
    """top_k >= frames skips retrieval; top_k = frames - 0 via the retrieval path must agree."""
    model, proc = tiny
    video = frames(5)
    want = full_forward_logits(model, proc, video, QUESTION, PREFIX)
    with StreamingEngine(model, proc, EngineConfig(retrieve_top_k=5)) as engine:
        stream = engine.open_stream()
        stream.push_frames(video)
        got = stream.answer(QUESTION, answer_prefix=PREFIX, max_new_tokens=1).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def rope(x, pos, theta):
    """RoPE written out here (Qwen2's default: half-split pairs, no scaling), independent of the model's
    and the engine's code: x [..., n, d] rotated to positions pos [n] (float64 inside, x's dtype out)."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.as_tensor(pos, dtype=torch.float64)[:, None] * inv_freq[None]  # [n, d / 2]
    cos, sin = torch.cos(angle), torch.sin(angle)
    x1, x2 = x[..., : d // 2].double(), x[..., d // 2 :].double()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Reference:
    """Brute force through plain HF forwards of the model's decoder. Keys and values are captured at the
    outputs of k_proj / v_proj (before RoPE) and queries at q_proj; a context is given to the decoder as
    a transformers DynamicCache holding those keys rotated (by `rope` above) to positions 0..m-1.

    `stream(video, n_local)` encodes a video the ReKV way, token by token of the definition: each frame
    (16 tokens) attends to the init tokens plus the last n_local tokens before it, all at contiguous
    positions. It returns the frames as dicts: start (first position), k and v before RoPE
    [layers, kv_heads, 16, d], mean_key [layers, kv_heads, d]."""

    def __init__(self, model, processor):
        from transformers import DynamicCache

        from stc.engine import cache_keyword

        self.model, self.processor, self.tok = model, processor, processor.tokenizer
        self.lm = lm = model.model.language_model
        cfg = lm.config
        self.layers, self.heads, self.kvh = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
        self.d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        params = getattr(cfg, "rope_parameters", None) or {}
        self.theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
        assert params.get("rope_type", "default") == "default" and self.theta
        self.cache_cls, self.cache_kw = DynamicCache, cache_keyword(lm)
        self.eos = {i for i in (self.tok.convert_tokens_to_ids("<|im_end|>"), self.tok.eos_token_id) if isinstance(i, int) and i >= 0}
        init = self.embed(INIT_PROMPT)
        self.n_init = init.shape[1]
        self.init_kv, _, _ = self.run(init, None)

    def ids(self, text):
        return self.tok(text, add_special_tokens=False, return_tensors="pt").input_ids

    def embed(self, text):
        return self.lm.embed_tokens(self.ids(text))

    @torch.no_grad()
    def run(self, embeds, ctx):
        """Decoder over embeds [1, n, D] after the context ctx ((k, v) before RoPE, [layers, kvh, m, d],
        at positions 0..m-1; None: no context). Returns the new tokens' (k, v) before RoPE, their queries
        before RoPE [layers, n, heads, d] and the last token's logits [vocab]."""
        captured = {}
        handles = []
        for i, layer in enumerate(self.lm.layers):
            for name in ("q", "k", "v"):
                proj = getattr(layer.self_attn, f"{name}_proj")
                handles.append(proj.register_forward_hook(
                    lambda mod, args, out, key=(name, i): captured.__setitem__(key, out[0].detach().clone())))
        m = 0 if ctx is None else ctx[0].shape[2]
        n = embeds.shape[1]
        kwargs = {}
        if m:
            cache = self.cache_cls()
            pos = torch.arange(m)
            for i in range(self.layers):
                cache.update(rope(ctx[0][i], pos, self.theta)[None], ctx[1][i][None].clone(), i)
            kwargs[self.cache_kw] = cache
        try:
            out = self.lm(inputs_embeds=embeds, position_ids=torch.arange(m, m + n)[None], **kwargs)
        finally:
            for h in handles:
                h.remove()
        split = lambda name: torch.stack([captured[(name, i)].view(n, -1, self.d) for i in range(self.layers)])
        k, v = split("k").transpose(1, 2), split("v").transpose(1, 2)  # [layers, kvh, n, d]
        return (k, v), split("q"), self.model.lm_head(out.last_hidden_state[0, -1])

    @staticmethod
    def cat(*kvs):
        return tuple(torch.cat([kv[j] for kv in kvs], dim=2) for j in (0, 1))

    def frame_tokens(self, video):
        """Per frame, its 16 pooled LLM tokens [1, 16, D] (the model's own get_video_features)."""
        with torch.no_grad():
            feats = video_features(self.model, preprocess_frames(self.processor, video))
        return list(feats.split(feats.shape[1] // len(video), dim=1))

    def stream(self, video, n_local=10**9):
        blocks, window = [], None
        for tokens in self.frame_tokens(video):
            if window is not None and window[0].shape[2] > n_local:
                window = tuple(x[:, :, x.shape[2] - n_local :] for x in window)
            ctx = self.init_kv if window is None else self.cat(self.init_kv, window)
            (k, v), _, _ = self.run(tokens, ctx)
            blocks.append({"start": ctx[0].shape[2], "k": k, "v": v, "mean_key": k.mean(dim=2)})
            window = (k, v) if window is None else self.cat(window, (k, v))
        return blocks

    def queries(self, text):
        """Per layer, the text's mean query before RoPE (attending to the init tokens), summed over each
        KV head's group of query heads: [layers, kvh, d]."""
        _, q, _ = self.run(self.embed(text), self.init_kv)
        return q.mean(dim=1).view(self.layers, self.kvh, self.heads // self.kvh, self.d).sum(dim=2)

    def picks(self, text, blocks, top_k):
        """Per layer, the top-k frames by <mean query, mean key> (a Python loop over heads), ascending."""
        q = self.queries(text)
        picks = []
        for layer in range(self.layers):
            scores = [sum(float(q[layer, h] @ b["mean_key"][layer, h]) for h in range(self.kvh)) for b in blocks]
            picks.append(sorted(np.argsort(scores)[::-1][:top_k].tolist()))
        return picks

    def context(self, blocks, picks):
        """Per layer, init + the picked frames' (k, v) before RoPE, one after another: [layers, kvh, m, d]."""
        if picks is None:
            picks = [list(range(len(blocks)))] * self.layers
        per_layer = [self.cat(*[(b["k"][layer : layer + 1], b["v"][layer : layer + 1])
                                for b in [blocks[i] for i in picks[layer]]]) for layer in range(self.layers)]
        frames = tuple(torch.cat([kv[j] for kv in per_layer]) for j in (0, 1))
        return self.cat(self.init_kv, frames)

    def answer(self, blocks, picks, query, prefix="", max_new=16):
        """Greedy answer over init + picked frames at contiguous positions: (first logits, token ids)."""
        ctx = self.context(blocks, picks)
        kv, _, logits = self.run(self.embed(QUESTION_TEMPLATE.format(query=query) + prefix), ctx)
        first, tokens = logits, []
        for step in range(max_new):
            token = int(logits.argmax())
            if token in self.eos:
                break
            tokens.append(token)
            if step + 1 < max_new:
                ctx = self.cat(ctx, kv)
                kv, _, logits = self.run(self.lm.embed_tokens(torch.tensor([[token]])), ctx)
        return first, tokens


def assert_blocks_match(stream, blocks, theta, starts=None):
    """The engine's blocks against the reference's: start (the reference's, or `starts`: a window that
    advances puts a frame at other slots, with the same relative positions), keys after RoPE at their
    start, values, mean key."""
    assert [b.start for b in stream.blocks] == (starts or [b["start"] for b in blocks])
    for got, want in zip(stream.blocks, blocks):
        pos = torch.arange(got.start, got.start + want["k"].shape[2])
        torch.testing.assert_close(got.kv[:, 0].cpu(), rope(want["k"], pos, theta), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(got.kv[:, 1].cpu(), want["v"], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(got.mean_key.cpu(), want["mean_key"], atol=2e-5, rtol=1e-4)


def spy(monkeypatch, obj, name):
    """Record each call of obj.name (args, kwargs, result) in a list, calling through."""
    calls = []
    real = getattr(obj, name)

    def wrapper(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out

    monkeypatch.setattr(obj, name, wrapper)
    return calls


def test_retrieval_matches_brute_force(tiny, monkeypatch):
    """Each block's mean key is the mean of its keys before RoPE (k_proj's outputs), the question's
    queries are q_proj's (before RoPE, attending to init only), and the picks follow the retrieval text,
    not the full question: both brute-forced through plain HF forwards."""
    model, proc = tiny
    video = frames(7, seed=3)
    ref = Reference(model, proc)
    blocks = ref.stream(video)
    query = "Question: " + QUESTION + "\nOptions:\n(A) red\n(B) blue"
    text = "Where is the ball?"
    want, by_query = ref.picks(text, blocks, 3), ref.picks(query, blocks, 3)
    assert want != by_query and all(len(p) == 3 for p in want)  # the picks tell the two texts apart
    with StreamingEngine(model, proc, EngineConfig(retrieve_top_k=3)) as engine:
        stream = engine.open_stream()
        stream.push_frames(video)
        assert_blocks_match(stream, blocks, ref.theta)
        torch.testing.assert_close(torch.stack(stream._question_queries(text)).cpu(), ref.queries(text), atol=2e-5, rtol=1e-4)
        asked = spy(monkeypatch, stream, "_question_queries")
        answer = stream.answer(query, retrieval_text=text, max_new_tokens=3)
        assert [args for args, _, _ in asked] == [(text,)]
        plain = stream.answer(query, max_new_tokens=3)  # no retrieval text: the question itself
    assert answer.retrieved == want
    assert plain.retrieved == by_query
    assert answer.context_tokens == ref.n_init + 3 * 16  # init + three retrieved frames of 16 tokens
    logits, tokens = ref.answer(blocks, want, query, max_new=3)
    torch.testing.assert_close(answer.logits, logits, atol=1e-4, rtol=1e-4)
    assert answer.token_ids == tokens


def test_retrieved_blocks_move_to_contiguous_positions(tiny, monkeypatch):
    """top_k < frames: the answer's context holds init, then each layer's retrieved blocks with their keys
    rotated from where they were encoded to contiguous positions after init (exact to rounding), and
    the answer equals a brute force over that context."""
    model, proc = tiny
    video = frames(6, seed=1)
    ref = Reference(model, proc)
    blocks = ref.stream(video)
    with StreamingEngine(model, proc, EngineConfig(retrieve_top_k=2)) as engine:
        stream = engine.open_stream()
        stream.push_frames(video)
        built = spy(monkeypatch, stream, "_context")
        answer = stream.answer(QUESTION, answer_prefix=PREFIX, max_new_tokens=2)
    (picks, _), _, kv = built[0]
    assert [[stream.blocks[i].frame for i in p] for p in picks] == answer.retrieved == ref.picks(QUESTION, blocks, 2)
    assert any(p != list(range(len(p))) for p in picks)  # some block really moves
    budget = 2 * 16
    ctx = ref.context(blocks, picks)
    pos = torch.arange(ref.n_init + budget)
    assert ctx[0].shape[2] == ref.n_init + budget and answer.context_tokens == ref.n_init + budget
    torch.testing.assert_close(kv.buf[:, 0, :, : ref.n_init + budget], rope(ctx[0], pos, ref.theta), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(kv.buf[:, 1, :, : ref.n_init + budget], ctx[1], atol=2e-5, rtol=1e-4)
    logits, tokens = ref.answer(blocks, picks, QUESTION, PREFIX, max_new=2)
    torch.testing.assert_close(answer.logits, logits, atol=1e-4, rtol=1e-4)
    assert answer.token_ids == tokens


def test_retrieval_returns_a_planted_frame(tiny):
    """A block whose mean key points along the question's query wins at every layer."""
    model, proc = tiny
    video = frames(6, seed=4)
    with StreamingEngine(model, proc, EngineConfig(retrieve_top_k=2)) as engine:
        stream = engine.open_stream()
        stream.push_frames(video)
        picks_before = stream._retrieve(QUESTION)
        queries = stream._question_queries(QUESTION)
        for layer in range(engine.num_layers):
            stream.blocks[2].mean_key[layer] = 1e3 * queries[layer]
        picks = stream.answer(QUESTION, max_new_tokens=1).retrieved
    assert all(2 in p for p in picks)
    assert not all(2 in p for p in picks_before)


def test_answer_path_gives_an_option_letter(tiny):
    """The answer is greedy decoding: without retrieval its tokens (the first one the argmax of a full
    forward's logits) equal greedy decoding by full forwards; with retrieval, a brute force over the
    retrieved frames. ask() returns their text."""
    from stc.benchmarks.prompts import parse_answer
    from stc.benchmarks.records import Question

    model, proc = tiny
    video = frames(4)
    query = "Question: what?\nOptions:\n(A) a\n(B) b\nOnly give the best option."
    ref = Reference(model, proc)
    decode = lambda ids: proc.tokenizer.decode(ids, skip_special_tokens=True)
    _, want_full = full_forward_greedy(model, proc, video, query, PREFIX, 16, ref.eos)
    first = int(full_forward_logits(model, proc, video, query, PREFIX).argmax())
    assert len(want_full) > 1 and want_full[0] == first
    blocks = ref.stream(video)
    _, want_retrieved = ref.answer(blocks, ref.picks(query, blocks, 2), query, PREFIX, max_new=16)
    assert want_retrieved and want_retrieved != want_full
    texts = []
    for top_k, want in ((None, want_full), (2, want_retrieved)):
        with StreamingEngine(model, proc, EngineConfig(retrieve_top_k=top_k)) as engine:
            stream = engine.open_stream()
            stream.push_frames(video, [0, 2, 4, 6])
            answer = stream.answer(query, answer_prefix=PREFIX)
            text = stream.ask(query, answer_prefix=PREFIX)
        assert answer.token_ids == want and int(answer.logits.argmax()) == want[0]
        assert text == answer.text == decode(want)
        texts.append(text)
    q = Question(benchmark="synthetic", qid="1", video="v.mp4", question="what?", options=("a", "b"), answer="A",
                 ask_time=6.0, task="t", kind="mc")
    assert all(isinstance(parse_answer(q, t), str) for t in texts)


def test_stc_changes_vision_work_and_token_counts_as_configured(tiny):
    model, proc = tiny
    video = frames(6)
    cfg = EngineConfig(retrieve_top_k=None, cacher=CacherConfig(cache_interval=2, reuse_ratio=0.75), pruner=PrunerConfig(keep_ratio=0.25))
    with StreamingEngine(model, proc, cfg) as engine:
        stream = engine.open_stream()
        stream.push_frames(video[:3])
        stream.push_frames(video[3:])
        stats = stream.stats()
    # tiny: 64 ViT tokens over 2 layers; 16 pooled tokens per frame
    assert stats["reference_frames"] == [0, 2, 4]
    assert stats["vit_recomputed_tokens"] == [128, 32, 128, 32, 128, 32]
    assert stats["tokens_per_frame"] == [4] * 6 and stats["kv_tokens"] == 24
    assert all(b.length == 4 for b in stream.blocks)
    with StreamingEngine(model, proc, EngineConfig(retrieve_top_k=None)) as engine:
        stream = engine.open_stream()
        stream.push_frames(video)
        plain = stream.stats()
    assert plain["tokens_per_frame"] == [16] * 6 and "vit_recomputed_tokens" not in plain


def test_several_questions_reuse_the_stream(tiny):
    model, proc = tiny
    video = frames(6)
    with StreamingEngine(model, proc, EngineConfig(retrieve_top_k=2)) as engine:
        stream = engine.open_stream()
        stream.push_frames(video[:3], [0, 2, 4])
        first = stream.answer(QUESTION, max_new_tokens=4)
        again = stream.answer(QUESTION, max_new_tokens=4)
        vision_calls = stream.stats()["stages"]["vision"]["count"]
        stream.push_frames(video[3:], [6, 8, 10])
        later = stream.answer(QUESTION, max_new_tokens=4)
        assert stream.stats()["stages"]["vision"]["count"] == vision_calls + 1
        # causal: the answer at t=4 equals a stream that only ever saw frames up to t=4
        short = engine.open_stream()
        short.push_frames(video[:3], [0, 2, 4])
        alone = short.answer(QUESTION, max_new_tokens=4)
    assert first.token_ids == again.token_ids == alone.token_ids
    torch.testing.assert_close(first.logits, alone.logits)
    assert not torch.allclose(first.logits, later.logits)
    assert all(f < 3 for p in first.retrieved for f in p)


def test_interleaved_streams_equal_separate_streams(tiny):
    model, proc = tiny
    a, b = frames(5, seed=1), frames(5, seed=2)
    cfg = EngineConfig(retrieve_top_k=2, cacher=CacherConfig(cache_interval=2), pruner=PrunerConfig(keep_ratio=0.5))
    with StreamingEngine(model, proc, cfg) as engine:
        alone = []
        for v in (a, b):
            s = engine.open_stream()
            s.push_frames(v)
            alone.append(s.answer(QUESTION, max_new_tokens=3).logits)
        sa, sb = engine.open_stream(), engine.open_stream()
        for i in range(5):
            sa.push_frames(a[i : i + 1])
            sb.push_frames(b[i : i + 1])
        both = [sa.answer(QUESTION, max_new_tokens=3).logits, sb.answer(QUESTION, max_new_tokens=3).logits]
    torch.testing.assert_close(both[0], alone[0])
    torch.testing.assert_close(both[1], alone[1])


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "static"])
def test_offloaded_blocks_change_nothing(tiny, graphs):
    model, proc = tiny
    video = frames(6)
    cfg = EngineConfig(retrieve_top_k=3, n_local=1000, cuda_graphs=graphs)
    with StreamingEngine(model, proc, cfg) as engine:
        s = engine.open_stream()
        s.push_frames(video)
        wide = s.answer(QUESTION, max_new_tokens=2)
    with StreamingEngine(model, proc, replace(cfg, device_blocks=2)) as engine:
        s = engine.open_stream()
        s.push_frames(video)
        assert [b.kv.device.type for b in s.blocks] == ["cpu"] * 4 + [engine.device.type] * 2
        offloaded = s.answer(QUESTION, max_new_tokens=2)
    torch.testing.assert_close(offloaded.logits, wide.logits)
    assert offloaded.token_ids == wide.token_ids and offloaded.retrieved == wide.retrieved
    assert all(b.start == 14 + 16 * i for i, b in enumerate(s.blocks))  # never slid: frames follow each other


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("slack,firsts,starts", [
    (0, [0, 0, 0, 0, 0, 0], [0, 16, 32, 40, 40, 40]),  # every slide moves the window back
    (24, [0, 0, 0, 8, 24, 0], [0, 16, 32, 48, 64, 40]),  # advances by 8 and 16 slots, then moves back (40 > 24)
    (4096, [0, 0, 0, 8, 24, 40], [0, 16, 32, 48, 64, 80]),  # only advances
], ids=["move", "advance-then-move", "advance"])
def test_local_window_equals_rekv_brute_force(tiny, graphs, slack, firsts, starts, monkeypatch):
    """A narrow window (n_local = 40: 2.5 frames of 16 tokens) drops its oldest tokens, by advancing (the
    init tokens rewritten before the oldest kept token) or by moving the kept tokens back behind the init
    tokens at slot 0. Either way, before every frame the window's context is, up to rounding, the init
    tokens then the last n_local tokens at contiguous positions from its first slot, each key rotated by
    an independent float64 RoPE; every frame's KV and the answer equal a brute force where each frame
    attends to init plus the last n_local tokens at contiguous positions."""
    model, proc = tiny
    video = frames(6)
    ref = Reference(model, proc)
    n_local, n_init = 40, ref.n_init
    blocks = ref.stream(video, n_local=n_local)
    cfg = EngineConfig(retrieve_top_k=3, n_local=n_local, window_slack=slack, cuda_graphs=graphs)
    with StreamingEngine(model, proc, cfg) as engine:
        seen = []
        real = engine._slide_window

        def slide(w, *args, **kwargs):
            real(w, *args, **kwargs)
            seen.append((w.first, w.buf[..., w.first : w.length, :].clone()))

        monkeypatch.setattr(engine, "_slide_window", slide)
        s = engine.open_stream()
        s.push_frames(video)
        narrow = s.answer(QUESTION, max_new_tokens=2)
        assert s._window.length - s._window.first == n_init + n_local + 16
        if graphs:
            assert s._window.buf.shape[3] == n_init + n_local + engine.max_frame_tokens + slack
    assert [first for first, _ in seen] == firsts
    for f, (first, window) in enumerate(seen):  # the context frame f attends to
        kept = min(16 * f, n_local)
        k = torch.cat([ref.init_kv[0]] + [b["k"] for b in blocks[:f]], dim=2)
        v = torch.cat([ref.init_kv[1]] + [b["v"] for b in blocks[:f]], dim=2)
        rows = list(range(n_init)) + list(range(k.shape[2] - kept, k.shape[2]))
        assert window.shape[-2] == len(rows)
        want = rope(k[:, :, rows], torch.arange(first, first + len(rows)), ref.theta)
        torch.testing.assert_close(window[:, 0], want, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(window[:, 1], v[:, :, rows], atol=2e-5, rtol=1e-4)
    assert_blocks_match(s, blocks, ref.theta, starts=[n_init + x for x in starts])
    assert [b["start"] for b in blocks] == [n_init + x for x in (0, 16, 32, 40, 40, 40)]  # ReKV's positions
    picks = ref.picks(QUESTION, blocks, 3)
    assert narrow.retrieved == picks
    logits, tokens = ref.answer(blocks, picks, QUESTION, max_new=2)
    torch.testing.assert_close(narrow.logits, logits, atol=1e-4, rtol=1e-4)
    assert narrow.token_ids == tokens


def test_rotation_composes_like_rope(tiny):
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    model, proc = tiny
    with StreamingEngine(model, proc) as engine:
        x = torch.randn(2, 5, engine.head_dim)
        pos = torch.tensor([3, 7, 11, 2, 40])
        cos, sin = engine.lm.rotary_emb(x, pos[None])
        hf, _ = apply_rotary_pos_emb(x[None], x[None], cos, sin)
        torch.testing.assert_close(engine._rotate(x, pos), hf[0], atol=1e-6, rtol=1e-6)
        twice = engine._rotate(engine._rotate(x, pos), torch.tensor([5, -7, 1, 0, -40]))
        torch.testing.assert_close(twice, engine._rotate(x, torch.tensor([8, 0, 12, 2, 0])), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation is a GPU matter")
def test_block_mean_keys_do_not_wait_for_the_gpu():
    """A frame's retrieval key is computed without a host synchronisation (which would wait for the
    frame's captured step and leave the GPU idle while the kernels after it are launched), and equals
    the mean of the keys rotated back to position 0, computed on the CPU."""
    model, proc = build_model("tiny", seed=0, device="cuda")
    with StreamingEngine(model, proc) as engine:
        keys = torch.randn(2, 3, 5, engine.head_dim, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = engine._mean_keys(keys, 7)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        want = engine._rotate(keys.cpu(), -torch.arange(7, 12)).mean(dim=-2)
        torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)


def test_errors(tiny):
    model, proc = tiny
    with StreamingEngine(model, proc) as engine:
        s = engine.open_stream()
        with pytest.raises(ValueError, match="no frame has been pushed"):
            s.ask(QUESTION)
        with pytest.raises(ValueError, match=r"\[frames, height, width, 3\]"):
            s.push_frames(np.zeros((64, 64, 3), np.uint8))
        with pytest.raises(ValueError, match="timestamps"):
            s.push_frames(frames(2), [0.0])
        s.push_frames(frames(1), [4.0])
        with pytest.raises(ValueError, match="time order"):
            s.push_frames(frames(1), [2.0])
        s.close()
        with pytest.raises(RuntimeError, match="closed"):
            s.ask(QUESTION)
    with pytest.raises(TypeError, match="LlavaOnevisionForConditionalGeneration"):
        StreamingEngine(torch.nn.Linear(2, 2), proc)
    for bad in (dict(retrieve_top_k=0), dict(n_local=-1), dict(max_new_tokens=0), dict(device_blocks=-2)):
        with pytest.raises(ValueError):
            EngineConfig(**bad)


def test_close_restores_the_model(tiny):
    model, proc = tiny
    tower = model.model.vision_tower
    engine = StreamingEngine(model, proc, EngineConfig(cacher=CacherConfig()))
    assert "forward" in tower.encoder.layers[0].__dict__
    engine.close()
    assert "forward" not in tower.encoder.layers[0].__dict__
    assert all(not layer.self_attn._forward_pre_hooks for layer in model.model.language_model.layers)
    # An engine with CUDA graphs holds the model until it is closed: a second one says so.
    with StreamingEngine(model, proc, EngineConfig(cuda_graphs=True)):
        with pytest.raises(ValueError, match="another StreamingEngine with cuda_graphs=True still holds this model"):
            StreamingEngine(model, proc, EngineConfig())
    StreamingEngine(model, proc, EngineConfig(cuda_graphs=True)).close()  # closed: the model is free again


@pytest.mark.parametrize("cfg", [
    EngineConfig(retrieve_top_k=None),
    EngineConfig(retrieve_top_k=2, cacher=CacherConfig(cache_interval=2), pruner=PrunerConfig(keep_ratio=0.5)),
    EngineConfig(retrieve_top_k=3, n_local=40),  # the window is trimmed and re-rotated in place
    EngineConfig(retrieve_top_k=2, tome_tokens_per_frame=20),  # ToMe's merge schedule inside the graphed ViT
    "visionzip",  # reads its attention layer's input, which the graphed ViT keeps
], ids=["plain", "stc", "window", "tome", "visionzip"])
@pytest.mark.parametrize("bucket", [1024, 16])
def test_cuda_graph_mode_equals_the_default_path(tiny, cfg, bucket, monkeypatch):
    """The static-shape path of cuda_graphs (captured on a GPU, run as is on a CPU) gives the same answers,
    with one context bucket or many."""
    from dataclasses import replace

    import stc.engine

    monkeypatch.setattr(stc.engine, "GRAPH_BUCKET", bucket)
    model, proc = tiny
    video = frames(6)
    results = []
    compressor = None
    if cfg == "visionzip":
        from stc.baselines.visionzip import VisionZip

        cfg, compressor = EngineConfig(retrieve_top_k=2), VisionZip(keep_ratio=0.25)
    for graphs in (False, True):
        with StreamingEngine(model, proc, replace(cfg, cuda_graphs=graphs), compressor=compressor) as engine:
            s = engine.open_stream()
            s.push_frames(video[:2])
            s.push_frames(video[2:])
            # two questions of different lengths: the answering window and its decode step are reused
            answers = [s.answer(QUESTION, answer_prefix=PREFIX, max_new_tokens=3),
                       s.answer("Which shape moves the most, and where does it go next?", max_new_tokens=5)]
            results.append((answers, s.stats()))
    (a, sa), (b, sb) = results
    for x, y in zip(a, b):
        torch.testing.assert_close(y.logits, x.logits, atol=1e-4, rtol=1e-4)
        assert x.token_ids == y.token_ids and x.retrieved == y.retrieved
    assert sa["tokens_per_frame"] == sb["tokens_per_frame"]
    assert sa.get("reference_frames") == sb.get("reference_frames")
    assert model.model.language_model.config._attn_implementation == "sdpa"  # restored on close
    lm = model.model.language_model  # and the fused decoder projections undone
    assert all(type(layer.self_attn).__name__ == "Qwen2Attention" and type(layer.mlp).__name__ == "Qwen2MLP" for layer in lm.layers)
    ptrs = [p.untyped_storage().data_ptr() for p in lm.parameters()]
    assert len(set(ptrs)) == len(ptrs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("bucket", [1024, 16])
def test_captured_graphs_equal_eager_on_gpu(bucket, monkeypatch):
    import stc.engine

    monkeypatch.setattr(stc.engine, "GRAPH_BUCKET", bucket)
    model, proc = build_model("tiny", seed=0, device="cuda")
    video = frames(6)
    cfg = EngineConfig(retrieve_top_k=2, cacher=CacherConfig(cache_interval=2), pruner=PrunerConfig(keep_ratio=0.5))
    out = []
    for graphs in (False, True):
        with StreamingEngine(model, proc, EngineConfig(**{**cfg.__dict__, "cuda_graphs": graphs})) as engine:
            assert engine.capture == graphs
            s = engine.open_stream()
            for i in range(6):
                s.push_frames(video[i : i + 1])
            kv = [b.kv.clone() for b in s.blocks]
            out.append((s.answer(QUESTION, max_new_tokens=3), kv))
    (a, kva), (b, kvb) = out
    torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=1e-4)
    for x, y in zip(kva, kvb):  # every frame's block, not just the last: no aliasing across steps
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_dropped_batches_streams_and_engines_are_freed_at_once(tiny):
    """No reference cycles: a batch (with its vision runner and streams), a stream and a closed engine
    are freed when the last reference goes, not at some later garbage collection, which may run inside
    another CUDA graph capture and destroy their graphs there (captures failed at random on the H200 in
    repeated StreamBatch runs, results/latency/h200_capture_failure_b4.txt)."""
    import gc
    import weakref

    model, proc = tiny
    video = frames(2)
    gc.collect()
    gc.disable()
    try:
        engine = StreamingEngine(model, proc, EngineConfig(cuda_graphs=True, cacher=CacherConfig(cache_interval=2),
                                                           pruner=PrunerConfig(keep_ratio=0.5)))
        batch = engine.open_batch(2)
        batch.push_frames(video)
        stream = engine.open_stream()
        stream.push_frames(video[:1])
        stream.answer(QUESTION, max_new_tokens=2)
        refs = {"engine": weakref.ref(engine), "batch": weakref.ref(batch), "vision runner": weakref.ref(batch.vision),
                "batch stream": weakref.ref(batch.streams[0]), "stream": weakref.ref(stream)}
        batch.close()
        stream.close()
        del batch, stream
        assert [k for k, r in refs.items() if k != "engine" and r() is not None] == []
        engine.close()
        del engine
        assert refs["engine"]() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("cfg", [
    EngineConfig(retrieve_top_k=2, cuda_graphs=True),
    EngineConfig(retrieve_top_k=2, cuda_graphs=True, cacher=CacherConfig(cache_interval=2), pruner=PrunerConfig(keep_ratio=0.5)),
    EngineConfig(retrieve_top_k=2, cuda_graphs=True, n_local=20, pruner=PrunerConfig(keep_ratio=0.5)),
    EngineConfig(retrieve_top_k=2, cuda_graphs=True, tome_tokens_per_frame=20),
    "visionzip",
], ids=["plain", "stc", "sliding", "tome", "visionzip"])
def test_stream_batch_equals_separate_streams(tiny, cfg):
    model, proc = tiny
    videos = [frames(5, seed=s) for s in (1, 2, 3)]
    compressor = None
    if cfg == "visionzip":
        from stc.baselines.visionzip import VisionZip

        cfg, compressor = EngineConfig(retrieve_top_k=2, cuda_graphs=True), VisionZip(keep_ratio=0.25)
    with StreamingEngine(model, proc, cfg, compressor=compressor) as engine:
        alone = []
        for v in videos:
            s = engine.open_stream()
            for i in range(5):
                s.push_frames(v[i : i + 1])
            alone.append(s.answer(QUESTION, max_new_tokens=3))
        batch = engine.open_batch(3)
        for i in range(5):
            batch.push_frames(np.stack([v[i] for v in videos]), [2.0 * i] * 3)
        together = [s.answer(QUESTION, max_new_tokens=3) for s in batch.streams]
        with pytest.raises(ValueError, match="push frames to the batch"):
            batch.streams[0].push_frames(videos[0][:1])
        with pytest.raises(ValueError, match="one frame per stream"):
            batch.push_frames(videos[0][:2])
    for a, b in zip(alone, together):
        torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=1e-4)
        assert a.token_ids == b.token_ids and a.retrieved == b.retrieved
    assert [s.frames_seen for s in batch.streams] == [5, 5, 5]
    recent = batch._window.length - batch._window.first - batch.streams[0]._n_init
    per_frame = batch.streams[0].tokens_per_frame[0]
    if cfg.n_local < 5 * per_frame:  # the window slid: n_local recent tokens, then the newest frame
        assert recent == cfg.n_local + per_frame
    else:
        assert recent == 5 * per_frame
    with StreamingEngine(model, proc, EngineConfig()) as engine, pytest.raises(ValueError, match="cuda_graphs"):
        engine.open_batch(2)


def test_stream_batch_rejects_content_dependent_budgets(tiny):
    """VidCom2 budgets each frame by its content; streams of a batch must keep equal counts."""
    from stc.baselines.vidcom2 import VidCom2

    model, proc = tiny
    with StreamingEngine(model, proc, EngineConfig(cuda_graphs=True), compressor=VidCom2(keep_ratio=0.25, temperature=0.001)) as engine:
        batch = engine.open_batch(2)
        still = np.full((64, 64, 3), 100, dtype=np.uint8)
        batch.push_frames(np.stack([still, still]))  # the same content: the same budget
        noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        with pytest.raises(ValueError, match=r"same number of tokens per frame, got \[\d+, \d+\]: VidCom2 .*separate streams"):
            batch.push_frames(np.stack([still, noise]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_stream_batch_equals_uncaptured_on_gpu(monkeypatch):
    import stc.engine

    monkeypatch.setattr(stc.engine, "GRAPH_BUCKET", 16)
    model, proc = build_model("tiny", seed=0, device="cuda")
    videos = [frames(5, seed=s) for s in (1, 2)]
    cfg = EngineConfig(retrieve_top_k=2, cuda_graphs=True, cacher=CacherConfig(cache_interval=2), pruner=PrunerConfig(keep_ratio=0.5))
    out = []
    for capture in (False, True):
        with StreamingEngine(model, proc, cfg) as engine:
            engine.capture = capture
            batch = engine.open_batch(2)
            for i in range(5):
                batch.push_frames(np.stack([v[i] for v in videos]))
            out.append([s.answer(QUESTION, max_new_tokens=2).logits for s in batch.streams])
    for a, b in zip(*out):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def _recording_backend():
    """A torch.compile backend that runs each traced graph as traced and records it: (graphs, backend)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return graphs, backend


def test_compiled_decoder_gives_the_same_static_steps(tiny):
    """stc.fast.compiled_decoder (the decoder's own forwards through torch.compile, here with the
    aot_eager backend: traced, not code-generated) around static prefill steps, as the engine uses it
    around capture: the same KV blocks and answers, the KV write and attention as graph breaks, and
    the model's forwards restored afterwards (also when the block raises)."""
    from stc.fast import compiled_decoder

    model, proc = tiny
    lm = model.model.language_model
    video = frames(4)
    compiled, backend = _recording_backend()

    out = []
    for compile in (False, True):
        with StreamingEngine(model, proc, EngineConfig(retrieve_top_k=2, cuda_graphs=True)) as engine:
            s = engine.open_stream()
            for i in range(4):
                with compiled_decoder(lm, backend) if compile else contextlib.nullcontext():
                    s.push_frames(video[i : i + 1])
            out.append((s.answer(QUESTION, max_new_tokens=3), [b.kv.clone() for b in s.blocks]))
    (a, kva), (b, kvb) = out
    assert compiled, "nothing went through the compiler"
    torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=1e-5)
    assert a.token_ids == b.token_ids
    for x, y in zip(kva, kvb):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)
    modules = [*lm.layers, lm.norm, lm.rotary_emb]
    assert not any("forward" in vars(m) for m in modules)
    with pytest.raises(RuntimeError, match="nested"), compiled_decoder(lm, backend):
        assert all("forward" in vars(m) for m in modules)
        with compiled_decoder(lm, backend):
            pass
    assert not any("forward" in vars(m) for m in modules)

    def broken(gm, example_inputs):
        raise NotImplementedError("no code generation here")

    with pytest.raises(RuntimeError, match=r"compile_llm=False"), compiled_decoder(lm, broken):
        lm(inputs_embeds=torch.zeros(1, 3, lm.config.hidden_size), position_ids=torch.arange(3)[None])
    assert not any("forward" in vars(m) for m in modules)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("batch", [False, True], ids=["stream", "batch"])
def test_compiled_decoder_steps_equal_uncompiled_on_gpu(batch):
    """fp32 tiny model, captured steps: EngineConfig.compile_llm (inductor) gives the same KV and
    answers as the uncompiled captured steps (up to the rounding of fused fp32 kernels)."""
    model, proc = build_model("tiny", seed=0, device="cuda")
    videos = [frames(5, seed=s) for s in (1, 2)]
    out = []
    for compile in (False, True):
        cfg = EngineConfig(retrieve_top_k=2, cuda_graphs=True, compile_llm=compile, cacher=CacherConfig(cache_interval=2),
                           pruner=PrunerConfig(keep_ratio=0.5))
        with StreamingEngine(model, proc, cfg) as engine:
            assert engine.compile_llm == compile
            if batch:
                group = engine.open_batch(2)
                for i in range(5):
                    group.push_frames(np.stack([v[i] for v in videos]))
                streams = group.streams
            else:
                streams = [engine.open_stream()]
                for i in range(5):
                    streams[0].push_frames(videos[0][i : i + 1])
            out.append([(s.answer(QUESTION, max_new_tokens=3), [b.kv.clone() for b in s.blocks]) for s in streams])
    for (a, kva), (b, kvb) in zip(*out):
        torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=1e-4)
        assert a.token_ids == b.token_ids
        for x, y in zip(kva, kvb):
            torch.testing.assert_close(y, x, atol=1e-4, rtol=1e-4)


def test_compiled_decoder_is_reused_by_the_next_engine(tiny):
    """Engines built one after another on one model (as the latency benchmark does, one per method)
    reuse the compiled decoder layers: nothing compiles again, so no run can reach dynamo's
    recompile limit and fall back to uncompiled layers."""
    from stc.fast import compiled_decoder

    model, proc = tiny
    lm = model.model.language_model
    video = frames(3)
    compiled, backend = _recording_backend()

    counts = []
    for _ in range(3):
        with StreamingEngine(model, proc, EngineConfig(retrieve_top_k=2, cuda_graphs=True)) as engine:
            s = engine.open_stream()
            for i in range(3):
                with compiled_decoder(lm, backend):
                    s.push_frames(video[i : i + 1])
        counts.append(len(compiled))
    assert counts[0] > 0 and counts[1] == counts[0] and counts[2] == counts[0], counts


def test_compiled_decoder_raises_at_the_recompile_limit(tiny, monkeypatch):
    """Past dynamo's recompile limit the block raises instead of running layers uncompiled."""
    import stc.fast
    from stc.fast import compiled_decoder

    model, proc = tiny
    lm = model.model.language_model
    monkeypatch.setattr(stc.fast, "_recompile_limit", lambda lm: 1)  # each layer needs its own entry
    torch._dynamo.reset()
    with StreamingEngine(model, proc, EngineConfig(retrieve_top_k=2, cuda_graphs=True)) as engine:
        s = engine.open_stream()
        with pytest.raises(RuntimeError, match="FailOnRecompileLimitHit"), compiled_decoder(lm, lambda gm, ex: gm.forward):
            s.push_frames(frames(1))
    torch._dynamo.reset()


def test_cache_keyword_follows_the_decoder_signature():
    """transformers 5.24 renamed the decoders' `past_key_values` argument to `cache` (the old name is
    deprecated, behind a decorator); the engine passes the name the model's forward declares."""
    import functools

    from stc.engine import cache_keyword

    def renamed(fn):  # a signature-preserving decorator, as transformers' deprecate_kwarg
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return fn(*args, **kwargs)
        return wrapper

    class Old(torch.nn.Module):
        def forward(self, inputs_embeds=None, past_key_values=None, use_cache=None):
            return past_key_values

    class New(torch.nn.Module):
        @renamed
        def forward(self, inputs_embeds=None, cache=None, use_cache=None):
            return cache

    assert cache_keyword(Old()) == "past_key_values"
    assert cache_keyword(New()) == "cache"
    for module in (Old(), New()):
        assert module(**{cache_keyword(module): "kv"}) == "kv"
