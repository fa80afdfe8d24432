"""GraphedVision runs the same semantics as stc.cacher (eager here; graphs are compared on a GPU)."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from stc.cacher import CacherConfig, attach_cacher, fused_mlp_supported, fused_projection_weights, mlp_forward, project
from stc.fast import (FusedProjections, GraphedVision, attention_kernel_supported, norm_kernel_supported, patch_embeddings,
                      patch_gemm_supported)
from tests.test_cacher import clip, siglip, video

CUDA = torch.cuda.is_available()


def reference_stream(tower, frames, cfg):
    """Layer-by-layer features from the attached Cacher (or the plain tower), one frame per step."""
    outs = []
    with torch.no_grad():
        if cfg is None:
            return torch.cat([tower(f[None], output_hidden_states=True).hidden_states[-1] for f in frames])
        with attach_cacher(tower, cfg) as cacher:
            state = cacher.new_state()
            for f in frames:
                outs.append(tower(f[None], stc_state=state, output_hidden_states=True).hidden_states[-1])
    return torch.cat(outs)


@pytest.mark.parametrize("cfg", [None, CacherConfig(cache_interval=3, reuse_ratio=0.75),
                                 CacherConfig(cache_interval=2, reuse_ratio=0.5, selection_feature="hidden", per_layer_selection=False)])
def test_same_semantics_as_the_cacher(cfg):
    tower, frames = siglip(), video(7)
    want = reference_stream(tower, frames, cfg)
    runner = GraphedVision(tower, cacher=cfg, use_graphs=False)
    state = [runner.new_state()] if cfg else None
    got = torch.cat([runner(f[None], state) for f in frames])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if cfg:
        assert state[0].reference_frames == [i for i in range(7) if i % cfg.cache_interval == 0]


@pytest.mark.parametrize("cfg, value_buffer", [(None, False), (CacherConfig(cache_interval=3, reuse_ratio=0.75), False),
                                               (CacherConfig(cache_interval=3, reuse_ratio=0.75), True)])
def test_compiled_layer_functions_trace_whole(cfg, value_buffer):
    """compile= runs the same layer functions through torch.compile (aot_eager: traced, not codegen'd),
    also where they write the value buffers in place."""
    tower, frames = siglip(), video(5)
    want = reference_stream(tower, frames, cfg)
    runner = GraphedVision(tower, cacher=cfg, use_graphs=False, compile="aot_eager", value_buffer=value_buffer)
    state = [runner.new_state()] if cfg else None
    got = torch.cat([runner(f[None], state) for f in frames])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg", [None, CacherConfig(cache_interval=3, reuse_ratio=0.75)])
def test_kept_layer_input_is_that_layers_hidden_state(cfg):
    """keep_input_of=-1 keeps the last layer's input: hidden_states[-2] of the (patched) tower."""
    tower, frames = siglip(), video(4)
    want = []
    with torch.no_grad():
        if cfg is None:
            want = [tower(f[None], output_hidden_states=True).hidden_states[-2] for f in frames]
        else:
            with attach_cacher(tower, cfg) as cacher:
                state = cacher.new_state()
                want = [tower(f[None], stc_state=state, output_hidden_states=True).hidden_states[-2] for f in frames]
    runner = GraphedVision(tower, cacher=cfg, use_graphs=False, keep_input_of=-1)
    states = [runner.new_state()] if cfg else None
    for f, w in zip(frames, want):
        runner(f[None], states)
        torch.testing.assert_close(runner.layer_input, w, atol=1e-5, rtol=1e-5)
    for bad in (3, -4, True, 1.0):
        with pytest.raises(ValueError, match="keep_input_of"):
            GraphedVision(tower, use_graphs=False, keep_input_of=bad)
    with pytest.raises(ValueError, match="keep_input_of"):  # layer 2 is not run when the features come from layer 2's input
        GraphedVision(tower, use_graphs=False, feature_layer=2, keep_input_of=2)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("compile", [False, "aot_eager"])
def test_tome_step_equals_the_attached_tome(batch, compile):
    """GraphedVision(tome=schedule) gives the attached ToMe's last-layer tokens in raster order, also
    with its layer function traced whole by torch.compile (dynamic shapes: 36, 27 and 18 tokens)."""
    from stc.baselines.tome import attach_tome, tome_r_for_budget

    tower, frames = siglip(), video(batch)
    schedule = tome_r_for_budget(36, 3, 10)
    with torch.no_grad(), attach_tome(tower, schedule) as tome:
        state = tome.new_state()
        want = tower(frames, tome_state=state, output_hidden_states=True).hidden_states[-1]
        want = want.gather(1, state.spatial_order()[..., None].expand_as(want))
    runner = GraphedVision(tower, batch=batch, use_graphs=False, tome=schedule, compile=compile)
    got = runner(frames)
    assert got.shape == (batch, 10, 32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="either STC-Cacher or ToMe"):
        GraphedVision(tower, cacher=CacherConfig(), tome=schedule)


@pytest.mark.parametrize("value_buffer", [False, True])
def test_streams_swap_in_and_out(value_buffer):
    """Also with the value buffers (whose rows are written only where marked: a stream swapped in must
    not see the last one's values)."""
    tower = siglip()
    cfg = CacherConfig(cache_interval=4, reuse_ratio=0.75)
    a, b = video(6, seed=1), video(6, seed=2)
    want_a, want_b = reference_stream(tower, a, cfg), reference_stream(tower, b, cfg)
    runner = GraphedVision(tower, cacher=cfg, use_graphs=False, value_buffer=value_buffer)
    assert runner.value_buffer == value_buffer
    sa, sb = runner.new_state(), runner.new_state()
    got_a, got_b = [], []
    for i in range(6):
        got_a.append(runner(a[i : i + 1], [sa]))
        got_b.append(runner(b[i : i + 1], [sb]))
    torch.testing.assert_close(torch.cat(got_a), want_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(got_b), want_b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("value_buffer", [False, True])
def test_synchronised_streams_in_one_batch(value_buffer):
    tower = siglip()
    cfg = CacherConfig(cache_interval=3, reuse_ratio=0.75)
    a, b = video(5, seed=1), video(5, seed=2)
    runner = GraphedVision(tower, batch=2, cacher=cfg, use_graphs=False, value_buffer=value_buffer)
    states = [runner.new_state(), runner.new_state()]
    got = torch.stack([runner(torch.stack([a[i], b[i]]), states) for i in range(5)], dim=1)
    torch.testing.assert_close(got[0], reference_stream(tower, a, cfg), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], reference_stream(tower, b, cfg), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="same frame index"):
        runner(torch.stack([a[0], b[0]]), [states[0], runner.new_state()])


@pytest.mark.parametrize("value_buffer", [False, True])
def test_batches_of_streams_change_and_dropped_streams_are_not_kept(value_buffer):
    """Streams leave a batch and come back in other rows with their caches (saved when the batch
    changes); a stream that nobody holds is not kept alive by the runner, nor saved."""
    import gc
    import weakref

    tower = siglip()
    cfg = CacherConfig(cache_interval=3, reuse_ratio=0.75)
    a, b, c = video(5, seed=1), video(5, seed=2), video(5, seed=3)
    runner = GraphedVision(tower, batch=2, cacher=cfg, use_graphs=False, value_buffer=value_buffer)
    sa, sb = runner.new_state(), runner.new_state()
    got_a, got_b = [], []
    for i in range(2):
        out = runner(torch.stack([a[i], b[i]]), [sa, sb])
        got_a.append(out[0])
        got_b.append(out[1])
    sc, sd = runner.new_state(), runner.new_state()
    for i in range(2):  # two other streams in between; the first two are saved
        runner(torch.stack([c[i], c[i]]), [sc, sd])
    gone = weakref.ref(sc)
    del sc, sd
    gc.collect()
    assert gone() is None
    for i in range(2, 5):  # back, in swapped rows
        out = runner(torch.stack([b[i], a[i]]), [sb, sa])
        got_b.append(out[0])
        got_a.append(out[1])
    torch.testing.assert_close(torch.stack(got_a), reference_stream(tower, a, cfg), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(got_b), reference_stream(tower, b, cfg), atol=1e-5, rtol=1e-5)
    se, sf = runner.new_state(), runner.new_state()
    runner(torch.stack([c[0], c[1]]), [se, sf])  # a and b are alive, so they are saved again, as views of one copy
    assert all(r.key._base is not None for r in sa._refs + sb._refs)


def test_no_gc_collects_before_and_not_during_the_block():
    """What a CUDA graph capture runs in: garbage cycles from before are destroyed on entry, cycles that
    die inside are not destroyed there however much Python allocates, and the collector's state comes
    back afterwards (also after an error, and off if it was off)."""
    import gc

    from stc.fast import no_gc

    destroyed = []

    class Node:
        def __init__(self, name):
            self.name, self.me = name, self  # a cycle: only the collector frees it

        def __del__(self):
            destroyed.append(self.name)

    gc.collect()
    Node("before")
    with no_gc():
        assert destroyed == ["before"] and not gc.isenabled()
        Node("inside")
        junk = [[i] for i in range(200_000)]  # allocations that would set the collector off
        del junk
        assert destroyed == ["before"]
    assert gc.isenabled()
    gc.collect()
    assert destroyed == ["before", "inside"]
    with pytest.raises(RuntimeError), no_gc():
        raise RuntimeError("a failed capture")
    assert gc.isenabled()
    gc.disable()
    try:
        with no_gc():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_bad_inputs():
    tower = siglip()
    runner = GraphedVision(tower, cacher=CacherConfig(), use_graphs=False)
    with pytest.raises(ValueError, match="expected pixels of shape"):
        runner(video(2), [runner.new_state()])
    with pytest.raises(ValueError, match="one CacherState per stream"):
        runner(video(1))
    with pytest.raises(ValueError, match="no cacher"):
        GraphedVision(tower, use_graphs=False).new_state()
    for bad in (1, "", None):
        with pytest.raises(ValueError, match="compile must be"):
            GraphedVision(tower, use_graphs=False, compile=bad)
    assert not runner.kernels and not runner.fused_mlp  # on a CPU the layers run PyTorch and the HF MLP
    with pytest.raises(ValueError, match="kernels=True needs Triton and a CUDA device"):
        GraphedVision(tower, cacher=CacherConfig(), use_graphs=False, kernels=True)
    with pytest.raises(ValueError, match="fused_mlp=True needs a SigLIP MLP"):
        GraphedVision(tower, use_graphs=False, fused_mlp=True)
    assert not runner.value_buffer  # by default only with the kernels, where it writes only the rows that change
    for cfg in (None, CacherConfig(cache_interval=1), CacherConfig(reuse="mlp")):  # no selective value merge
        assert not GraphedVision(tower, cacher=cfg, use_graphs=False).value_buffer
        with pytest.raises(ValueError, match="value_buffer=True needs a Cacher whose selective layers merge values"):
            GraphedVision(tower, cacher=cfg, use_graphs=False, value_buffer=True)
    wide = siglip(hidden=144, heads=2)  # SigLIP-so400m's heads of 72: the attention kernel's, but it needs a GPU
    assert not runner.attention_kernel and not GraphedVision(wide, cacher=CacherConfig(), use_graphs=False).attention_kernel
    with pytest.raises(ValueError, match="attention_kernel=True needs a Cacher whose selective layers recompute"):
        GraphedVision(wide, cacher=CacherConfig(), use_graphs=False, attention_kernel=True)
    assert not runner.project_all  # by default only with the kernels (and at one frame per step)
    for cfg in (None, CacherConfig(cache_interval=1), CacherConfig(reuse="mlp")):  # no selective attention
        with pytest.raises(ValueError, match="project_all=True needs a Cacher whose selective layers recompute"):
            GraphedVision(tower, cacher=cfg, use_graphs=False, project_all=True)


def test_attention_kernel_only_for_siglip_heads_on_a_gpu():
    """`stc.vit_kernel.attention` runs heads of 64 < D <= 128 channels (SigLIP-so400m's 72; not the tiny
    towers' 8 nor CLIP's), on a CUDA device with Triton."""
    wide = siglip(hidden=144, heads=2).encoder.layers[0]
    assert not attention_kernel_supported(wide, torch.float32, torch.device("cpu"))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert attention_kernel_supported(wide, dtype, torch.device("cuda")) == (importlib.util.find_spec("triton") is not None)
    assert not attention_kernel_supported(wide, torch.float64, torch.device("cuda"))
    assert not attention_kernel_supported(siglip().encoder.layers[0], torch.bfloat16, torch.device("cuda"))
    assert not attention_kernel_supported(clip().encoder.layers[0], torch.bfloat16, torch.device("cuda"))


@pytest.mark.parametrize("size, dtype, tol", [(84, torch.float32, 1e-5), (90, torch.float32, 1e-5), (90, torch.bfloat16, 2e-2)])
def test_patch_embeddings_equal_the_module(size, dtype, tol):
    """The patchify GEMM gives the module's embeddings, also where the image is not a whole number of
    patches (90 = 6 * 14 + 6: the convolution drops the last 6 rows and columns)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                             image_size=size, patch_size=14)
    emb = SiglipVisionModel(cfg).eval().to(dtype).embeddings
    pixels = torch.randn(3, 3, size, size)  # float32: both cast to the weights' dtype
    assert patch_gemm_supported(emb)
    with torch.no_grad():
        want, got = emb(pixels).double(), patch_embeddings(emb, pixels).double()
    assert got.shape == want.shape == (3, 36, 32)
    assert ((got - want).norm() / want.norm()).item() < tol
    pixels[:, :, 84:, :] = 1e4  # the dropped border changes nothing
    pixels[:, :, :, 84:] = 1e4
    with torch.no_grad():
        torch.testing.assert_close(patch_embeddings(emb, pixels).double(), got)


def test_patch_gemm_only_for_a_plain_patchify():
    emb = siglip().embeddings
    assert patch_gemm_supported(emb) and not patch_gemm_supported(clip().embeddings)  # CLIP: a class token
    emb.patch_embedding.stride = (7, 7)  # overlapping patches: a convolution, not a patchify
    assert not patch_gemm_supported(emb)
    assert GraphedVision(siglip(), use_graphs=False).patch_gemm  # the default where it applies, on a CPU too
    with pytest.raises(ValueError, match="patch_gemm=True needs SigLIP-style patch embeddings"):
        GraphedVision(clip(), use_graphs=False, patch_gemm=True)
    tower, frames = siglip(), video(3)
    plain = GraphedVision(tower, use_graphs=False, patch_gemm=False)
    assert not plain.patch_gemm
    with torch.no_grad():  # both give the layers row-major input (the module's own output is a transposed view)
        assert plain._embed().is_contiguous() and GraphedVision(tower, use_graphs=False)._embed().is_contiguous()
    torch.testing.assert_close(plain(frames[:1]), GraphedVision(tower, use_graphs=False)(frames[:1]), atol=1e-5, rtol=1e-5)


def test_project_runs_fused_projections_as_the_modules():
    layer = siglip().encoder.layers[0]
    attn, fused = layer.self_attn, fused_projection_weights(layer)
    h = torch.randn(2, 5, attn.q_proj.in_features)
    modules = {"q": attn.q_proj, "v": attn.v_proj, "k": attn.k_proj}
    with torch.no_grad():
        for names in ("q", "v", "k", "qv", "vk", "qvk"):
            got, plain = project(layer, h, names, fused), project(layer, h, names)
            assert len(got) == len(plain) == len(names)
            for n, g, p in zip(names, got, plain):
                assert torch.equal(p, modules[n](h))
                torch.testing.assert_close(g, p, atol=1e-6, rtol=1e-5)
    for bad in ("qk", "kq", "x", ""):
        with pytest.raises(ValueError, match="contiguous run"):
            project(layer, h, bad, fused)


@pytest.mark.parametrize("cfg", [CacherConfig(cache_interval=3, reuse="attn"), CacherConfig(cache_interval=3, reuse="mlp"),
                                 CacherConfig(cache_interval=3, selection_feature="value", metric="l2")])
def test_fused_projections_in_every_selective_mode(cfg):
    """Each reuse mode and selection feature computes another subset of the projections per row set."""
    tower, frames = siglip(), video(5)
    runner = GraphedVision(tower, cacher=cfg, use_graphs=False)
    assert runner.fused_qkv  # the default where the layers allow it, on a CPU too
    state = [runner.new_state()]
    got = torch.cat([runner(f[None], state) for f in frames])
    torch.testing.assert_close(got, reference_stream(tower, frames, cfg), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("value_buffer", [False, True])
@pytest.mark.parametrize("cfg", [CacherConfig(cache_interval=3, reuse_ratio=0.75), CacherConfig(cache_interval=3, reuse="attn"),
                                 CacherConfig(cache_interval=3, selection_feature="value", metric="l2"),
                                 CacherConfig(cache_interval=2, reuse_ratio=0.5, selection_feature="hidden",
                                              per_layer_selection=False)])
def test_projections_of_every_token_give_the_cachers_features(cfg, value_buffer):
    """project_all: every token's query, value and key from one GEMM, of which the recomputed tokens' rows are
    used, gives the features of projecting those rows alone (the attached Cacher's), in every reuse mode that
    recomputes some tokens' attention and with each selection feature; two streams in one batch too."""
    tower, frames = siglip(), video(7)
    runner = GraphedVision(tower, cacher=cfg, use_graphs=False, project_all=True, value_buffer=value_buffer)
    assert runner.project_all and runner.fused_qkv
    state = [runner.new_state()]
    got = torch.cat([runner(f[None], state) for f in frames])
    torch.testing.assert_close(got, reference_stream(tower, frames, cfg), atol=1e-5, rtol=1e-5)
    pair = GraphedVision(tower, batch=2, cacher=cfg, use_graphs=False, project_all=True, value_buffer=value_buffer)
    alone = GraphedVision(tower, batch=2, cacher=cfg, use_graphs=False, project_all=False, value_buffer=value_buffer)
    sp, sa = [pair.new_state(), pair.new_state()], [alone.new_state(), alone.new_state()]
    for i in range(len(frames) - 1):
        torch.testing.assert_close(pair(frames[i : i + 2], sp), alone(frames[i : i + 2], sa), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg", [None, CacherConfig(cache_interval=2)])
def test_fused_projections_follow_weights_changed_in_place(cfg):
    tower, frames = siglip(), video(4)
    runner = GraphedVision(tower, cacher=cfg, use_graphs=False)
    state = [runner.new_state()] if cfg else None
    runner(frames[:1], state)
    assert not runner._projections.sync()  # nothing changed
    buffers = [t.data_ptr() for fused in runner._projections.weights for t in fused]
    torch.manual_seed(1)
    new = {k: v + 0.05 * torch.randn_like(v) if "_proj" in k else v for k, v in tower.state_dict().items()}
    tower.load_state_dict(new)  # in place, as an optimiser or a checkpoint load would
    got = torch.cat([runner(f[None], state) for f in frames[1:]])
    fresh = GraphedVision(tower, cacher=cfg, use_graphs=False, fused_qkv=False)
    fresh_state = [fresh.new_state()] if cfg else None
    fresh(frames[:1], fresh_state)  # the same reference frame, computed with the new weights
    want = torch.cat([fresh(f[None], fresh_state) for f in frames[1:]])
    assert not cfg or state[0].reference_frames == fresh_state[0].reference_frames == [0, 2]
    # frame 1 of the first runner reuses frame 0's caches, computed with the old weights: compare from frame 2
    torch.testing.assert_close(got[1:], want[1:], atol=1e-5, rtol=1e-5)
    assert not runner._projections.sync()
    # copied in place: captured graphs keep reading the same buffers
    assert [t.data_ptr() for fused in runner._projections.weights for t in fused] == buffers


def test_fused_projections_only_where_they_fuse():
    tower = siglip()
    assert FusedProjections.supported(tower.encoder.layers) and FusedProjections.supported(clip().encoder.layers)
    assert not GraphedVision(tower, use_graphs=False, fused_qkv=False).fused_qkv
    tower.encoder.layers[1].self_attn.k_proj.bias = None
    assert not FusedProjections.supported(tower.encoder.layers)
    assert not GraphedVision(tower, use_graphs=False).fused_qkv
    with pytest.raises(ValueError, match="fused_qkv=True needs linear query, key and value projections"):
        GraphedVision(tower, use_graphs=False, fused_qkv=True)
    with torch.inference_mode():  # inference tensors have no version counter to follow
        frozen = siglip()
    assert not FusedProjections.supported(frozen.encoder.layers)
    with pytest.raises(ValueError, match="cannot be fused"):
        FusedProjections(frozen.encoder.layers)


def test_norm_kernel_only_where_it_runs():
    """The one-pass norms need Triton and a CUDA device, and LayerNorms with weights and biases."""
    tower = siglip()
    layer = tower.encoder.layers[0]
    assert not norm_kernel_supported(layer, torch.device("cpu"))
    assert not GraphedVision(tower, use_graphs=False).norm_kernel
    with pytest.raises(ValueError, match="norm_kernel=True needs LayerNorms"):
        GraphedVision(tower, use_graphs=False, norm_kernel=True)
    if importlib.util.find_spec("triton") is not None:
        assert norm_kernel_supported(layer, torch.device("cuda"))
        plain = siglip()
        plain.encoder.layers[0].layer_norm2 = torch.nn.LayerNorm(layer.layer_norm2.normalized_shape, bias=False)
        assert not norm_kernel_supported(plain.encoder.layers[0], torch.device("cuda"))


def test_fused_mlp_only_where_its_gelu_is_the_layers():
    """torch._addmm_activation's GELU is the tanh one on CUDA only (the exact one on a CPU), and only
    SigLIP's MLP uses the tanh GELU (CLIP: quick GELU)."""
    layer = siglip().encoder.layers[0]
    assert fused_mlp_supported(layer, torch.device("cuda")) and not fused_mlp_supported(layer, torch.device("cpu"))
    assert not fused_mlp_supported(clip().encoder.layers[0], torch.device("cuda"))
    x = torch.randn(3, 5, layer.mlp.fc1.in_features)
    assert torch.equal(mlp_forward(layer, x), layer.mlp(x))  # not fused: the module itself


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("cfg", [None, CacherConfig(cache_interval=4, reuse_ratio=0.75), "tome"])
def test_graphs_equal_eager_on_gpu(cfg, compile):
    tower = siglip().cuda()
    frames = video(9).cuda()
    tome, cfg = ((2, 2, 2), None) if cfg == "tome" else (None, cfg)
    keep = None if tome else 1  # and the input of layer 1, as for VisionZip
    eager = GraphedVision(tower, cacher=cfg, use_graphs=False, tome=tome, keep_input_of=keep, kernels=False, fused_mlp=False,
                          patch_gemm=False, fused_qkv=False, norm_kernel=False)
    graphed = GraphedVision(tower, cacher=cfg, use_graphs=True, compile=compile, tome=tome, keep_input_of=keep)
    # the defaults on a GPU
    assert graphed.kernels == bool(cfg) and graphed.fused_mlp and graphed.patch_gemm and graphed.fused_qkv and graphed.norm_kernel
    assert graphed.value_buffer == graphed.project_all == bool(cfg)  # project_all: at one frame per step
    se = [eager.new_state()] if cfg else None
    sg = [graphed.new_state()] if cfg else None
    graphed.prepare(sg, frames=2)  # captures now what the next two frames replay
    assert set(graphed._graphs) == ({"tome" if tome else "full"} if cfg is None else {"reference", "selective"})
    outs = []
    tol = 1e-4  # inductor's fused kernels and the GEMM's GELU epilogue round differently in fp32
    for f in frames:
        e, g = eager(f[None], se), graphed(f[None], sg)
        torch.testing.assert_close(g, e, atol=tol, rtol=tol)
        if keep is not None:
            torch.testing.assert_close(graphed.layer_input, eager.layer_input, atol=tol, rtol=tol)
        outs.append(g)
    # returned features are copies: later replays do not change earlier outputs
    assert not torch.equal(outs[1], outs[2])
    torch.testing.assert_close(outs[1], eager_again(tower, frames, cfg, tome)[1], atol=tol, rtol=tol)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("project_all", [None, True])
@pytest.mark.parametrize("compile", [False, True])
def test_graphs_with_the_attention_kernel_equal_eager_on_gpu(compile, project_all):
    """With SigLIP-so400m's heads of 72 the graphed Cacher computes its selective attention by the kernel (its
    default on a GPU): the features of two streams equal the eager runner's without it (nor the other Cacher
    kernels), through reference and selective frames; the mode that recomputes every token's attention ("mlp")
    keeps PyTorch's. project_all (off by default for two streams): the kernel reads the recomputed queries
    through a row map. (Both embed the patches by the GEMM: cuDNN's convolution may run in TF32.)"""
    tower = siglip(hidden=144, heads=2).cuda()
    cfg = CacherConfig(cache_interval=4, reuse_ratio=0.75)
    frames = video(10).cuda()
    eager = GraphedVision(tower, batch=2, cacher=cfg, use_graphs=False, kernels=False)
    graphed = GraphedVision(tower, batch=2, cacher=cfg, use_graphs=True, compile=compile, project_all=project_all)
    assert graphed.attention_kernel and not eager.attention_kernel and graphed.project_all == bool(project_all)
    assert not GraphedVision(tower, cacher=CacherConfig(reuse="mlp"), use_graphs=False).attention_kernel
    se, sg = [eager.new_state(), eager.new_state()], [graphed.new_state(), graphed.new_state()]
    for i in range(len(frames) - 1):
        pair = frames[i : i + 2]  # stream 1 runs one frame ahead of stream 0
        torch.testing.assert_close(graphed(pair, sg), eager(pair, se), atol=1e-4, rtol=1e-4)
    assert set(graphed._graphs) == {"reference", "selective"}


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_graphed_runner_takes_over_a_stream_mid_way_on_gpu():
    """A runner that first meets a stream at a non-reference frame (its caches loaded from the state)
    captures the reference step first, whose outputs become the static caches, and keeps the loaded
    caches in them: the same features as one eager runner throughout."""
    tower = siglip().cuda()
    cfg = CacherConfig(cache_interval=4, reuse_ratio=0.75)
    frames = video(6).cuda()
    eager = GraphedVision(tower, cacher=cfg, use_graphs=False)
    eager_state = [eager.new_state()]
    want = [eager(f[None], eager_state) for f in frames]
    first = GraphedVision(tower, cacher=cfg, use_graphs=False)
    state = first.new_state()
    first(frames[:1], [state])
    first(frames[:1], [first.new_state()])  # another stream: the first one's caches move into its state
    graphed = GraphedVision(tower, cacher=cfg, use_graphs=True)
    got = [graphed(f[None], [state]) for f in frames[1:]]
    assert list(graphed._graphs) == ["reference", "selective"]  # both captured at frame 1, reference first
    for g, w in zip(got, want[1:]):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def eager_again(tower, frames, cfg, tome=None):
    runner = GraphedVision(tower, cacher=cfg, use_graphs=False, tome=tome)
    states = [runner.new_state()] if cfg else None
    return [runner(f[None], states) for f in frames]


@pytest.mark.skipif(not CUDA, reason="the fused MLP runs on a GPU")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_mlp_equals_the_module_on_gpu(dtype, tol):
    """One GEMM with a GELU_BIAS epilogue gives the Hugging Face MLP (tanh GELU), not the exact GELU."""
    layer = siglip().to("cuda", dtype).encoder.layers[0]
    x = torch.randn(2, 182, layer.mlp.fc1.in_features, device="cuda", dtype=dtype)
    with torch.no_grad():
        want = layer.mlp(x).double()
        got = mlp_forward(layer, x, fused=True).double()
        exact = layer.mlp.fc2(torch.nn.functional.gelu(layer.mlp.fc1(x).float()).to(dtype)).double()
    err = ((got - want).norm() / want.norm()).item()
    assert got.shape == want.shape and err < tol, err
    if dtype == torch.float32:
        assert ((exact - want).norm() / want.norm()).item() > 10 * err  # the test can tell the two GELUs apart


def _decoder_run(lm, x, steps=2):
    """A prefill of x [B, n, C], then `steps` one-token steps through a DynamicCache: the hidden states."""
    from transformers import DynamicCache

    from stc.engine import cache_keyword

    cache, n, outs = {cache_keyword(lm): DynamicCache()}, x.shape[1], []
    with torch.no_grad():
        outs.append(lm(inputs_embeds=x, position_ids=torch.arange(n)[None], use_cache=True, **cache).last_hidden_state)
        for i in range(steps):
            step = outs[-1][:, -1:] * 0.5
            outs.append(lm(inputs_embeds=step, position_ids=torch.tensor([[n + i]]), use_cache=True, **cache).last_hidden_state)
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("bias", [True, False])
def test_fused_decoder_projections_equal_the_model(bias):
    """Qwen2 decoder layers with their q, k, v and gate, up projections fused: the same hidden states
    as the model's own forwards (a prefill and cached decode steps), weights loaded in place while
    fused are used, and closing restores the modules (own storage, same values, no forwards)."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2MLP

    from stc.fast import FusedDecoderProjections
    from stc.models import build_model

    torch.manual_seed(0)
    lm = build_model("tiny", seed=0)[0].model.language_model.float()
    if not bias:
        for layer in lm.layers:
            for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                m.bias = None
    x = torch.randn(2, 5, lm.config.hidden_size)
    want = _decoder_run(lm, x)
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    fused = FusedDecoderProjections(lm)
    attn, mlp = lm.layers[1].self_attn, lm.layers[1].mlp
    classes = (type(attn), type(mlp))
    assert isinstance(attn, Qwen2Attention) and isinstance(mlp, Qwen2MLP) and classes != (Qwen2Attention, Qwen2MLP)
    w = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
    assert all(a.untyped_storage().data_ptr() == w[0].untyped_storage().data_ptr() for a in w)
    assert mlp.gate_proj.weight.untyped_storage().data_ptr() == mlp.up_proj.weight.untyped_storage().data_ptr()
    assert "stc_gate_up_weight" in dict(mlp.named_buffers()) and lm.state_dict().keys() == before.keys()
    torch.testing.assert_close(_decoder_run(lm, x), want, atol=1e-6, rtol=1e-6)
    changed = {k: v * 1.5 if k.endswith(("k_proj.weight", "up_proj.weight", "v_proj.bias")) else v for k, v in before.items()}
    lm.load_state_dict(changed)  # copies into the parameters, so into the fused buffers
    got_changed = _decoder_run(lm, x)
    fused.close()
    assert all((type(layer.self_attn), type(layer.mlp)) == (Qwen2Attention, Qwen2MLP) for layer in lm.layers)
    assert not any(name.startswith("stc_") for layer in lm.layers for m in (layer.self_attn, layer.mlp)
                   for name in [*vars(m), *dict(m.named_buffers())])
    ptrs = [p.untyped_storage().data_ptr() for p in lm.parameters()]
    assert len(set(ptrs)) == len(ptrs)
    torch.testing.assert_close(got_changed, _decoder_run(lm, x), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(got_changed, want, atol=1e-3)
    lm.load_state_dict(before)
    torch.testing.assert_close(_decoder_run(lm, x), want, atol=0, rtol=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                          reason="needs CUDA"))])
def test_split_k_linear_equals_the_gemm(device):
    """split_k_linear against float64 x @ w.T: float32 on the CPU to 1e-5, bf16 on a GPU (float32
    partial sums, one rounding) no further from float64 than cuBLAS's own bf16 GEMM, plus one bf16
    rounding of the result; leading dimensions kept; input features not a multiple of the splits refused."""
    from stc.fast import split_k_linear

    g = torch.Generator().manual_seed(0)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    x = torch.randn(2, 7, 96, generator=g).to(device, dtype)
    w = (torch.randn(40, 96, generator=g) / 96**0.5).to(device, dtype)
    want = x.double() @ w.double().T
    for splits in (1, 2, 3, 4, 8):
        got = split_k_linear(x, w, splits)
        assert got.shape == (2, 7, 40) and got.dtype == dtype
        if device == "cpu":
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
        else:
            gemm_err = (F.linear(x, w).double() - want).abs().max().item()
            assert (got.double() - want).abs().max().item() <= gemm_err + want.abs().max().item() * 2**-8
    with pytest.raises(ValueError, match="multiple"):
        split_k_linear(x, w, 5)


def test_split_k_settings_refuse_bad_values_and_apply_by_rows():
    from stc.fast import DOWN_SPLIT, SplitK

    for bad in ({"splits": 1}, {"rows": (0, 4)}, {"rows": (8, 4)}):
        with pytest.raises(ValueError, match="SplitK"):
            SplitK(**bad)
    split = SplitK(splits=4, rows=(8, 12))
    w = torch.zeros(3, 16)
    assert [split.applies(torch.zeros(1, n, 16), w) for n in (7, 8, 12, 13)] == [False, True, True, False]
    assert split.applies(torch.zeros(2, 5, 16), w)  # rows over every leading dimension
    assert not split.applies(torch.zeros(10, 15), torch.zeros(3, 15))  # 15 features, 4 splits
    assert DOWN_SPLIT.splits >= 2 and 18944 % DOWN_SPLIT.splits == 0  # Qwen2-7B's intermediate size


def test_fused_decoder_down_split_equals_the_model(monkeypatch):
    """With a SplitK for the down projections, the prefill (10 rows, in range) runs split_k_linear in
    every layer and the one-token steps (2 rows, out of range) the plain GEMM; the hidden states equal
    the model's own (float32, CPU)."""
    import stc.fast
    from stc.fast import FusedDecoderProjections, SplitK
    from stc.models import build_model

    lm = build_model("tiny", seed=0)[0].model.language_model.float()
    x = torch.randn(2, 5, lm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    want = _decoder_run(lm, x)
    calls = []
    plain = stc.fast.split_k_linear
    monkeypatch.setattr(stc.fast, "split_k_linear", lambda h, w, n: calls.append((tuple(h.shape), n)) or plain(h, w, n))
    fused = FusedDecoderProjections(lm, SplitK(splits=2, rows=(8, 12)))
    try:
        got = _decoder_run(lm, x)
    finally:
        fused.close()
    assert calls == [((2, 5, lm.config.intermediate_size), 2)] * len(lm.layers)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not any("stc_down_split" in vars(layer.mlp) for layer in lm.layers)


def test_fused_decoder_weights_have_static_shapes_in_compiled_layers():
    """Inside compiled_decoder (dynamic=True), the token dimensions are symbolic but the fused weights'
    shapes are not: with symbolic feature sizes every kernel after the fused GEMMs indexes by them
    (SiLU * up ran 3x slower on the H200). Traced by a recording backend on the CPU."""
    from stc.fast import FusedDecoderProjections, compiled_decoder
    from stc.models import build_model

    from tests.test_engine import _recording_backend

    lm = build_model("tiny", seed=0)[0].model.language_model.float()
    graphs, record = _recording_backend()
    fused = FusedDecoderProjections(lm)
    try:
        torch._dynamo.reset()
        with torch.no_grad(), compiled_decoder(lm, record):
            for n in (3, 5):
                lm(inputs_embeds=torch.randn(1, n, lm.config.hidden_size), position_ids=torch.arange(n)[None])
    finally:
        fused.close()
        torch._dynamo.reset()
    shapes = {}
    for gm in graphs:
        for node in gm.graph.find_nodes(op="placeholder"):
            value = node.meta.get("example_value")
            if isinstance(value, torch.Tensor):
                shapes.setdefault(node.name, []).append(tuple(value.shape))
    weights = {k: v for k, v in shapes.items() if "stc_" in k}
    assert all(any(w in k for k in weights) for w in ("qkv_weight", "qkv_bias", "gate_up_weight")), sorted(shapes)
    assert all(isinstance(d, int) for v in weights.values() for s in v for d in s), weights
    hidden = [s for k, v in shapes.items() if "hidden_states" in k for s in v]
    assert any(isinstance(d, torch.SymInt) for s in hidden for d in s), "the token dimensions should be symbolic"


def test_fused_decoder_projections_only_for_qwen2_layers():
    from transformers import LlamaConfig, LlamaModel

    from stc.fast import FusedDecoderProjections
    from stc.models import build_model

    llama = LlamaModel(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=16))
    assert not FusedDecoderProjections.supported(llama)
    with pytest.raises(ValueError, match="Qwen2"):
        FusedDecoderProjections(llama)
    lm = build_model("tiny", seed=0)[0].model.language_model
    assert FusedDecoderProjections.supported(lm)
    fused = FusedDecoderProjections(lm)
    assert not FusedDecoderProjections.supported(lm)  # already fused
    fused.close()
    lm.layers[0].mlp.up_proj.to(torch.float64)
    assert not FusedDecoderProjections.supported(lm)  # gate and up of different dtypes
