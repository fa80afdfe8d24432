"""Time each step of the graphed ViT (`stc.fast.GraphedVision`) as the latency benchmark runs it: B
streams from fresh states, one frame each per step, 32 frames per run. Prints, per run, the wall time,
each step's GPU time between CUDA events (the first step, the reference and the selective steps) and
the host time of each call, for the baseline and the Cacher (N = 4, R = 0.75); then the benchmark's
own measurement (`stc.latency.measure_graphed_vit`) of both. It shows costs outside the captured
steps, such as saving the caches of the streams a runner served before.

    python scripts/time_vit_steps.py --batch 16 > results/latency/h200_vit_b16_step_times.txt
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv=None):
    from transformers import SiglipVisionModel

    from stc.cacher import CacherConfig
    from stc.fast import GraphedVision
    from stc.latency import measure_graphed_vit, synthetic_pixels
    from stc.models import architecture_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--arch", default="llava-ov-7b")
    p.add_argument("--frames", type=int, default=32)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("this script times graph replays: it needs a CUDA GPU, and none is visible here")
    b, n = args.batch, args.frames
    with torch.device("cuda"):
        tower = SiglipVisionModel(architecture_config(args.arch).vision_config).to(torch.bfloat16).eval()
    pixels = synthetic_pixels(n, tower.config.image_size).cuda().to(torch.bfloat16)
    for cfg in (None, CacherConfig(cache_interval=4, reuse_ratio=0.75)):
        runner = GraphedVision(tower, batch=b, cacher=cfg, compile=True)
        steps = [pixels[[(i + s) % n for s in range(b)]] for i in range(n)]
        for rep in range(3):
            states = [runner.new_state() for _ in range(b)] if cfg else None
            torch.cuda.synchronize()
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
            cpu = []
            t0 = time.perf_counter()
            ev[0].record()
            for i, x in enumerate(steps):
                c0 = time.perf_counter()
                runner(x, states)
                cpu.append((time.perf_counter() - c0) * 1e3)
                ev[i + 1].record()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) * 1e3
            gpu = [ev[i].elapsed_time(ev[i + 1]) for i in range(n)]
            selective = [g for i, g in enumerate(gpu) if i % 4]
            print(f"{'cacher' if cfg else 'full'} B={b} rep {rep}: wall {wall:.1f} ms ({wall / n / b:.3f}/stream-frame); gpu per step "
                  f"first {gpu[0]:.2f}, ref {statistics.median(gpu[4::4]):.2f}, sel {statistics.median(selective):.2f}; "
                  f"cpu per call first {cpu[0]:.1f}, median {statistics.median(cpu):.2f}, max {max(cpu):.1f}", flush=True)
    for cfg in (None, CacherConfig(cache_interval=4, reuse_ratio=0.75)):
        r = measure_graphed_vit(tower, pixels, cfg, batch=b, repeats=3, compile=True)
        print("measure_graphed_vit", "cacher" if cfg else "full", r["ms_per_frame"], r["all_ms_per_frame"], flush=True)


if __name__ == "__main__":
    main()
