"""Profile per-frame streaming steps of the 7B architecture (random weights) on a GPU: where does a
step's time go? Prints the top CUDA kernels of a few steps for one method and setting.

    python scripts/profile_step.py --method baseline --graphs --frames 32 --profile-frames 3
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from stc.engine import EngineConfig
from stc.latency import synthetic_pixels
from stc.methods import build_engine
from stc.models import build_model


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="llava-ov-7b")
    p.add_argument("--method", default="baseline")
    p.add_argument("--graphs", action="store_true")
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--profile-frames", type=int, default=3)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--vit-batch", type=int, default=0, help="profile the ViT's steps (full, the Cacher's selective and reference) at this batch instead")
    p.add_argument("--compile", action="store_true", help="with --vit-batch: torch.compile'd layer functions")
    p.add_argument("--sequence", type=int, default=0, help="with --vit-batch or --prefill-batch: also list a step's first kernels in order")
    p.add_argument("--prefill-batch", type=int, default=0,
                   help="profile one StreamBatch prefill step of this many streams (after --frames frames) instead")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("this script profiles CUDA kernels: it needs a CUDA GPU, and none is visible here")
    if args.vit_batch:
        return profile_vit(args)
    if args.prefill_batch:
        return profile_prefill(args)
    model, processor = build_model(args.arch, dtype=torch.bfloat16, device="cuda")
    pixels = synthetic_pixels(args.frames + args.profile_frames, model.config.vision_config.image_size)
    with build_engine(model, processor, args.method, EngineConfig(cuda_graphs=args.graphs)) as engine:
        stream = engine.open_stream()
        for i in range(args.frames):
            stream.push_pixels(pixels[i : i + 1])
        torch.cuda.synchronize()
        stream.timer.reset()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(args.frames, args.frames + args.profile_frames):
                stream.push_pixels(pixels[i : i + 1])
            torch.cuda.synchronize()
        print(f"{args.method} graphs={args.graphs}: stages (ms per step)",
              {k: round(v["mean_ms"], 2) for k, v in stream.timer.summary().items()})
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))


def _cuda_events(prof) -> list:
    """The profiled kernels (and device copies and memsets), in the order they ran."""
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def _print_sequence(title: str, events: list) -> None:
    print(f"{title}, in order (us):")
    for e in events:
        print(f"  {e.device_time:7.1f}  {e.name[:90]}")


def profile_prefill(args):
    """Kernels of one StreamBatch prefill step: run uncaptured (and uncompiled) so that each kernel is
    visible, the same step's graph replay time, and a profiled replay (what the engine runs)."""
    model, processor = build_model(args.arch, dtype=torch.bfloat16, device="cuda")
    b = args.prefill_batch
    pixels = synthetic_pixels(args.frames + b, model.config.vision_config.image_size)
    with build_engine(model, processor, args.method, EngineConfig(cuda_graphs=True)) as engine:
        group = engine.open_batch(b)
        for i in range(args.frames):
            group.push_pixels(pixels[i : i + b])
        w, n = group._window, group.streams[0].tokens_per_frame[0]
        dim = model.config.text_config.hidden_size
        tokens = torch.randn(b, n, dim, device="cuda", dtype=torch.bfloat16)
        start = w.length  # the next frame's slot; the steps below write there and are not committed
        replay = engine._static_step(w, group._graphs, n, start, dim, b)
        times = []
        for _ in range(10):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            replay(tokens)
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        engine.capture = False
        eager = engine._static_step(w, {}, n, start, dim, b)
        eager(tokens)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            eager(tokens)
            torch.cuda.synchronize()
        events = _cuda_events(prof)
        print(f"{args.method} B={b}, {n} tokens per stream after {args.frames} frames: graph replay "
              f"{sorted(times)[len(times) // 2]:.2f} ms; uncaptured: {len(events)} kernels, "
              f"{sum(e.device_time for e in events) / 1e3:.2f} ms of kernel time")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:  # the captured step: compiled layers
            replay(tokens)
            torch.cuda.synchronize()
        graphed = _cuda_events(prof)
        print(f"graph replay, profiled: {len(graphed)} kernels, {sum(e.device_time for e in graphed) / 1e3:.2f} ms of kernel time")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
        if args.sequence:
            _print_sequence(f"the first {args.sequence} kernels of the uncaptured step", events[: args.sequence])
            _print_sequence(f"the first {args.sequence} kernels of the graph replay", graphed[: args.sequence])


def profile_vit(args):
    """Kernels of the graphed ViT's steps (uncaptured, so each kernel is visible) at --vit-batch: the
    baseline's full step, and the Cacher's selective and reference steps."""
    from transformers import SiglipVisionModel

    from stc.cacher import CacherConfig
    from stc.fast import GraphedVision
    from stc.models import architecture_config

    with torch.device("cuda"):
        tower = SiglipVisionModel(architecture_config(args.arch).vision_config).to(torch.bfloat16).eval()
    b = args.vit_batch
    n = max(8, b)  # distinct frames: at least one per stream
    pixels = synthetic_pixels(n, tower.config.image_size).cuda().to(torch.bfloat16)
    for cfg in (None, CacherConfig(cache_interval=4, reuse_ratio=0.75)):
        runner = GraphedVision(tower, batch=b, cacher=cfg, use_graphs=False, compile=args.compile)
        states = [runner.new_state() for _ in range(b)] if cfg else None
        steps = [pixels[[(i + s) % n for s in range(b)]] for i in range(6)]
        runner(steps[0], states)  # reference frame (and warm-up)
        runner(steps[1], states)
        kinds = ["selective", "reference"] if cfg else ["full"]
        for kind, todo in zip(kinds, ([steps[2], steps[3]], [steps[4]]) if cfg else ([steps[2], steps[3]],)):
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for x in todo:  # with N = 4, frames 2 and 3 are selective, frame 4 a reference
                    runner(x, states)
                torch.cuda.synchronize()
            events = _cuda_events(prof)
            steps_run = len(todo)
            print(f"ViT B={b} {'cacher ' + kind if cfg else 'full'}{' compiled' if args.compile else ''}: {steps_run} step(s), "
                  f"{len(events) / steps_run:.0f} kernels and {sum(e.device_time for e in events) / steps_run / 1e3:.2f} ms of kernel "
                  f"time per step; graph replay {graph_replay_ms(tower, b, cfg, args.compile, pixels[:b], kind):.2f} ms")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=50))
            if args.sequence:
                _print_sequence(f"the first {args.sequence} kernels of a step", events[: args.sequence])


def graph_replay_ms(tower, batch, cacher, compile, pixels, kind, repeats=50):
    """Median replay time of one captured ViT step of `kind`, for comparison with its kernel time."""
    from stc.fast import GraphedVision

    runner = GraphedVision(tower, batch=batch, cacher=cacher, compile=compile)
    states = [runner.new_state() for _ in range(batch)] if cacher else None
    for _ in range(2):
        runner(pixels, states)
    graph, _ = runner._graph(kind)
    times = []
    for _ in range(repeats):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return sorted(times)[len(times) // 2]


if __name__ == "__main__":
    main()
