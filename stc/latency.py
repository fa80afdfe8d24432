"""Latency measurement of the streaming engine and of the vision tower, with a floor model.

`measure_stream` streams frames one per step (the ReKV protocol) through a method's engine and
reports per-stage medians over repeats after warm-up; `measure_vit` times the vision tower alone,
full versus STC-Cacher. Both use CUDA events on a GPU. `environment()` records what the numbers were
measured on; `device_rates()` measures the matmul rate and copy bandwidth the floors divide by.
"""

from __future__ import annotations

import datetime
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from stc.cacher import CacherConfig, attach_cacher
from stc.engine import EngineConfig
from stc.methods import build_engine


def synthetic_pixels(n_frames: int, size: int, seed: int = 0, drift: float = 0.1) -> torch.Tensor:
    """A smooth random 'video' in pixel space [F, 3, S, S]: adjacent frames alike, as at 0.5 fps."""
    g = torch.Generator().manual_seed(seed)
    frames = [torch.randn(3, size, size, generator=g).clamp(-1, 1)]
    for _ in range(n_frames - 1):
        frames.append((frames[-1] + drift * torch.randn(3, size, size, generator=g)).clamp(-1, 1))
    return torch.stack(frames)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(commit: str | None = None) -> dict:
    """GPU, versions and commit to store next to the numbers."""
    import transformers

    if commit is None:
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def device_rates(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Measured matmul rate (FLOP/s) and device copy bandwidth (bytes/s)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    x = torch.empty(256 * 2**20 if device.type == "cuda" else 16 * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        a @ b
        y.copy_(x)
    reps = 10

    def timed(fn):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync(device)
        return (time.perf_counter() - t0) / reps

    mm = timed(lambda: a @ b)
    cp = timed(lambda: y.copy_(x))
    return {"matmul_flops": 2 * n**3 / mm, "copy_bytes_per_s": 2 * x.numel() / cp}


def _per_frame_ms(run, frames: int, device: torch.device, warmup: int, repeats: int) -> dict:
    """Median wall ms per frame of `run()` (one whole pass over `frames` frames), synchronised, after warm-up."""
    per_frame = []
    for rep in range(warmup + repeats):
        _sync(device)
        t0 = time.perf_counter()
        run()
        _sync(device)
        if rep >= warmup:
            per_frame.append((time.perf_counter() - t0) * 1e3 / frames)
    return {"ms_per_frame": statistics.median(per_frame), "all_ms_per_frame": per_frame}


def measure_vit(tower, pixels: torch.Tensor, cacher: CacherConfig | None, *, chunk: int = 1, warmup: int = 1, repeats: int = 3) -> dict:
    """Median ms per frame of the vision tower over a stream of pixels [F, 3, S, S], in chunks of `chunk`."""
    device, dtype = next(tower.parameters()).device, next(tower.parameters()).dtype
    pixels = pixels.to(device, dtype)
    handle = attach_cacher(tower, cacher) if cacher is not None else None

    @torch.no_grad()
    def run():  # one stream, from a fresh state
        kwargs = {"stc_state": handle.new_state()} if handle else {}
        for s in range(0, len(pixels), chunk):
            tower(pixels[s : s + chunk], **kwargs)

    try:
        return _per_frame_ms(run, len(pixels), device, warmup, repeats)
    finally:
        if handle is not None:
            handle.detach()


def measure_graphed_vit(tower, pixels: torch.Tensor, cacher: CacherConfig | None, *, batch: int = 1,
                        warmup: int = 1, repeats: int = 3, compile: bool | str = False, kernels: bool | None = None,
                        fused_mlp: bool | None = None, patch_gemm: bool | None = None, fused_qkv: bool | None = None,
                        norm_kernel: bool | None = None, value_buffer: bool | None = None,
                        attention_kernel: bool | None = None, project_all: bool | None = None) -> dict:
    """Median ms per stream-frame of `GraphedVision`: B synchronised streams, one frame each per step
    (compile: the layer functions through torch.compile, as `GraphedVision(compile=True)`; kernels,
    fused_mlp, patch_gemm, fused_qkv, norm_kernel, value_buffer, attention_kernel, project_all: as the `GraphedVision` options
    of those names), and the value the runner resolved for each of them (`GraphedVision.OPTIONS`)."""
    from stc.fast import GraphedVision

    device, dtype = next(tower.parameters()).device, next(tower.parameters()).dtype
    pixels = pixels.to(device, dtype)
    f = len(pixels)
    runner = GraphedVision(tower, batch=batch, cacher=cacher, compile=compile, kernels=kernels, fused_mlp=fused_mlp,
                           patch_gemm=patch_gemm, fused_qkv=fused_qkv, norm_kernel=norm_kernel, value_buffer=value_buffer,
                           attention_kernel=attention_kernel, project_all=project_all)
    steps = [pixels[[(i + s) % f for s in range(batch)]] for i in range(f)]

    def run():  # B streams, from fresh states
        states = [runner.new_state() for _ in range(batch)] if cacher else None
        for x in steps:
            runner(x, states)

    return {**_per_frame_ms(run, f * batch, device, warmup, repeats), **{name: getattr(runner, name) for name in runner.OPTIONS}}


def measure_batch(model, processor, method: str, n_frames: int, batch: int, *, checkpoints=(16, 32, 64), warmup: int = 1,
                  repeats: int = 3, base: EngineConfig | None = None, seed: int = 0) -> dict:
    """B synchronised streams of n_frames each (one frame per stream per step, `StreamBatch`); per
    stream-frame medians of vision, projector and prefill over repeats, over the whole run and over the
    first c steps for each checkpoint c (as `measure_stream`). Needs cuda_graphs."""
    from dataclasses import replace

    size = model.config.vision_config.image_size
    pixels = synthetic_pixels(n_frames + batch, size, seed)
    steps = [pixels[i : i + batch] for i in range(n_frames)]  # stream b sees the video shifted by b frames
    cfg = replace(base or EngineConfig(), cuda_graphs=True)
    runs = []
    with build_engine(model, processor, method, cfg) as engine:
        for rep in range(warmup + repeats):
            group = engine.open_batch(batch)
            for x in steps:
                group.push_pixels(x)
            times = group.timer.times()
            tokens = group.streams[0].tokens_per_frame[0]
            group.close()
            if rep >= warmup:
                runs.append(times)
    lengths = {c: batch_stages(runs, c, batch) for c in sorted({c for c in checkpoints if c <= n_frames} | {n_frames})}
    return {"method": method, "frames": n_frames, "batch": batch, "tokens_per_frame": tokens, **lengths[n_frames],
            "checkpoints": lengths}


def batch_stages(runs: list[dict], steps: int, batch: int) -> dict:
    """Per stream-frame ms of each stage over the first `steps` steps of B-stream runs (`StageTimer.times()`
    of each), the median over the runs: the init prompt's prefill left out, each step's window slide
    counted in its prefill (and alone as "window")."""
    per = steps * batch
    return {key: statistics.median([total(t) / per for t in runs]) for key, total in (
        ("vit_ms_per_frame", lambda t: sum(t["vision"][:steps])),
        ("projector_ms_per_frame", lambda t: sum(t["projector"][:steps])),
        ("prefill_ms_per_frame", lambda t: sum(t["prefill"][1 : steps + 1]) + sum(t.get("window", [])[:steps])),
        ("window_ms_per_frame", lambda t: sum(t.get("window", [])[:steps])),
    )}


def measure_stream(model, processor, method: str, n_frames: int, *, checkpoints=(16, 32, 64), warmup: int = 1,
                   repeats: int = 3, base: EngineConfig | None = None, seed: int = 0) -> dict:
    """Stream n_frames one per step through `method`, then ask one question; medians over repeats.

    Returns per-stage ms per frame over the first c frames for each checkpoint c, the question's
    retrieval + answer time (and each part) with its generated and context token counts, and peak memory.
    """
    size = model.config.vision_config.image_size
    pixels = synthetic_pixels(n_frames, size, seed)
    device = model.model.language_model.embed_tokens.weight.device
    runs = []
    with build_engine(model, processor, method, base or EngineConfig(max_new_tokens=16)) as engine:
        for rep in range(warmup + repeats):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            stream = engine.open_stream()
            for i in range(n_frames):
                stream.push_pixels(pixels[i : i + 1], [2.0 * i])
            answer = stream.answer(
                "Question: What happens in the video?\nOptions:\n(A) a\n(B) b\n(C) c\n(D) d\nOnly give the best option.",
                answer_prefix="Best option: (", retrieval_text="What happens in the video?")
            times = stream.timer.times()
            stats = stream.stats()
            stats["qa_new_tokens"] = len(answer.token_ids)
            stats["qa_context_tokens"] = answer.context_tokens
            stream.close()
            if rep >= warmup:
                runs.append((times, stats))
    out = {"method": method, "frames": n_frames, "repeats": repeats, "checkpoints": {}}
    for c in sorted({c for c in checkpoints if c <= n_frames} | {n_frames}):
        vit = [sum(t["vision"][:c]) / c for t, _ in runs]
        # prefill entries: the init prompt first, then one per frame; with each frame's window slide
        pre = [(sum(t["prefill"][1 : c + 1]) + sum(t.get("window", [])[:c])) / c for t, _ in runs]
        proj = [sum(t["projector"][:c]) / c for t, _ in runs]
        out["checkpoints"][c] = {
            "vit_ms_per_frame": statistics.median(vit),
            "projector_ms_per_frame": statistics.median(proj),
            "prefill_ms_per_frame": statistics.median(pre),
        }
    out["qa_ms"] = statistics.median([sum(t.get("retrieval", [])) + sum(t.get("decode", [])) for t, _ in runs])
    out["qa_retrieval_ms"] = statistics.median([sum(t.get("retrieval", [])) for t, _ in runs])
    out["qa_decode_ms"] = statistics.median([sum(t.get("decode", [])) for t, _ in runs])
    out["qa_new_tokens"] = runs[-1][1]["qa_new_tokens"]  # tokens generated (random weights: rarely an early stop)
    out["qa_context_tokens"] = runs[-1][1]["qa_context_tokens"]  # init + retrieved tokens the answer attends to
    out["tokens_per_frame"] = runs[-1][1]["tokens_per_frame"][0]
    out["peak_memory_gb"] = max(s.get("peak_memory_bytes", 0) for _, s in runs) / 2**30
    return out
