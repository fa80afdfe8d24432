"""Plotting helpers for the paper's figures: each takes data (latency rows, analysis results, tables) and
returns a matplotlib Figure. No computation of results happens here; see stc.analysis and stc.latency.

    fig = plot_time_shares(load_latency(path))           # Fig. 1
    fig = plot_frame_similarity(similarity)               # Fig. 2
    fig = plot_ablations(tables, figure7_scores)          # Tables 4-10 and Fig. 7 as bars
    fig = plot_latency_sweep(load_latency(path))          # ViT latency vs reuse ratio and cache interval
    fig = plot_token_maps(token_maps)                     # which tokens STC recomputes and keeps
    label_figure(fig, "tiny profile - not paper numbers")
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import pandas as pd

from stc.paper_numbers import FIG1_STAGES, FIG1_TIME_SHARES, FIG2_ADJACENT_SIMILARITY

STAGE_COLUMNS = ("vit_ms_per_frame", "projector_ms_per_frame", "prefill_ms_per_frame")
STAGE_COLOURS = ("#4c72b0", "#dd8452", "#55a868")
FIG1_SETTINGS = {"image": 1, "32 frames": 32, "64 frames": 64}
PAPER_COLOUR, OURS_COLOUR = "#8c8c8c", "#c44e52"


def label_figure(fig: plt.Figure, label: str) -> plt.Figure:
    """Stamp a profile label (e.g. "tiny profile - not paper numbers") across the top of a figure.

    The plots below leave the top 4% of the figure free for it."""
    if label:
        fig.text(0.5, 0.995, label, ha="center", va="top", fontsize=11, color="crimson", weight="bold")
    return fig


def _finish(fig: plt.Figure) -> plt.Figure:
    """Lay a figure out, leaving room at the top for `label_figure`."""
    fig.get_layout_engine().set(rect=(0, 0, 1, 0.96))
    return fig


def _latency_row(latency: pd.DataFrame, method: str, frames: int) -> pd.Series | None:
    if latency is None or latency.empty:
        return None
    hits = latency[(latency["method"] == method) & (latency["frames"] == frames)]
    return None if hits.empty else hits.iloc[0]


def time_shares(latency: pd.DataFrame, method: str = "baseline", settings: Mapping[str, int] = FIG1_SETTINGS) -> dict:
    """{setting: (ViT, projector, prefill) shares in % of their sum, or None} from latency rows."""
    out = {}
    for name, frames in settings.items():
        row = _latency_row(latency, method, frames)
        values = None if row is None else [row.get(c) for c in STAGE_COLUMNS]
        if values is None or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
            out[name] = None
            continue
        total = sum(values)
        out[name] = tuple(100.0 * v / total for v in values)
    return out


def plot_time_shares(latency: pd.DataFrame, method: str = "baseline", ours: str = "ours",
                     settings: Mapping[str, int] = FIG1_SETTINGS) -> plt.Figure:  # fmt: skip
    """Fig. 1: share of time in ViT / projector / LLM prefill, the paper's LLaVA-OV bars above ours."""
    shares = time_shares(latency, method, settings)
    paper = FIG1_TIME_SHARES["LLaVA-OV"]
    bars = []
    for name in settings:
        bars.append((f"{name}\npaper (LLaVA-OV)", paper.get(name)))
        bars.append((f"{name}\n{ours}", shares[name]))
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(bars) + 1.4), layout="constrained")
    for y, (_, values) in enumerate(bars):
        if values is None:
            ax.text(2, y, "no latency data", va="center", fontsize=8, color="grey")
            continue
        left = 0.0
        for value, colour, stage in zip(values, STAGE_COLOURS, FIG1_STAGES):
            ax.barh(y, value, left=left, color=colour, label=stage if y < 2 else None)
            if value >= 6:
                ax.text(left + value / 2, y, f"{value:.0f}%", ha="center", va="center", fontsize=8, color="white")
            left += value
    ax.set_yticks(range(len(bars)), [name for name, _ in bars], fontsize=8)
    ax.set_ylim(len(bars) - 0.5, -0.5)  # first bar on top, room for rows without data
    ax.set_xlim(0, 100)
    ax.set_xlabel("share of inference time (%)")
    devices = latency["device"].dropna().unique() if latency is not None and "device" in latency else []
    measured = f"; {ours}: {', '.join(map(str, devices))}" if len(devices) else ""
    ax.set_title(f"Fig. 1: where the time goes ({method}, streaming one frame per step{measured})", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=8)
    return _finish(fig)


def _no_data(ax, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="grey")


def plot_frame_similarity(similarity: Mapping | None) -> plt.Figure:
    """Fig. 2: adjacent-frame similarity by layer, the paper's points (left) next to ours (right, if given)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    for (name, points), marker in zip(FIG2_ADJACENT_SIMILARITY.items(), ("o", "s")):
        left.plot(list(points), list(points.values()), marker=marker, label=name)
    left.set_title("paper (LLaVA-OV, Fig. 2)")
    if similarity is None:
        _no_data(right, "no similarity measurement")
        similarity = {}
    layers = similarity.get("layers", [])
    for key, marker in (("offline", "o"), ("online", "s")):
        gap = similarity.get(f"{key}_gap_s")
        frames = similarity.get(f"{key}_frames")
        text = f"{key}: {frames} frames, {gap:.2f} s apart" if gap is not None else key
        if key in similarity:
            right.plot(layers, similarity[key], marker=marker, label=text)
    right.set_title(f"ours ({similarity.get('video', '?')})")
    for ax in (left, right):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("ViT layer (0 = patch embeddings)")
        ax.set_ylabel("mean cosine similarity of adjacent frames")
        ax.set_ylim(0, 1.05)
        if ax.lines:
            ax.legend(fontsize=8)
    return _finish(fig)


def _summary_metric(table: pd.DataFrame) -> str:
    metrics = list(dict.fromkeys(table.columns.get_level_values(0)))
    return "Avg" if "Avg" in metrics else metrics[-1]


def _bar_pair(ax, labels: Sequence[str], paper: Sequence[float], ours: Sequence[float], ours_name: str) -> None:
    x = np.arange(len(labels))
    paper = np.asarray(paper, dtype=float)
    ours = np.asarray(ours, dtype=float)
    ax.bar(x - 0.2, np.nan_to_num(paper), 0.4, color=PAPER_COLOUR, label="paper")
    ax.bar(x + 0.2, np.nan_to_num(ours), 0.4, color=OURS_COLOUR, label=ours_name)
    top = np.nanmax(np.concatenate([paper, ours, [0.0]]))
    ax.set_ylim(0, max(top * 1.1, 10.0))
    for xi, value in zip(x, ours):  # a bar of no height: missing ("n/a") or measured as 0 ("0")
        if math.isnan(value):
            ax.text(xi + 0.2, 0.5, "n/a", ha="center", va="bottom", fontsize=7, rotation=90, color="grey")
        elif value == 0:
            ax.text(xi + 0.2, 0.5, "0", ha="center", va="bottom", fontsize=7, color=OURS_COLOUR)
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)


def plot_ablations(tables: Mapping[str, pd.DataFrame], figure7: Mapping[str, float | None] | None = None) -> plt.Figure:
    """The ablation tables as bars (each table's summary column: "Avg", else its last), paper next to ours,
    and, if given, Fig. 7: our OVO-Bench Overall by selection feature / similarity metric against ToMe."""
    panels = list(tables.items()) + ([("figure7", None)] if figure7 is not None else [])
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False, layout="constrained")
    for ax, (key, table) in zip(axes.flat, panels):
        if table is None:
            names = list(figure7)
            _bar_pair(ax, names, [math.nan] * len(names), [math.nan if v is None else v for v in figure7.values()],
                      "ours")  # fmt: skip
            ax.set_title("Fig. 7: selection feature / metric vs ToMe\n(OVO-Bench Overall; no paper numbers)", fontsize=9)
            continue
        metric = _summary_metric(table)
        ours = table.attrs.get("ours", "ours")
        labels = [str(r).removeprefix("ReKV ").removeprefix("StreamForest ") for r in table.index]
        _bar_pair(ax, labels, table[(metric, "paper")], table[(metric, ours)], ours)
        ax.set_title(f"{table.attrs.get('title', key).split(':')[0]}: {metric}", fontsize=9)
        ax.set_ylabel("accuracy (%)", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    return _finish(fig)


def plot_latency_sweep(latency: pd.DataFrame, frames: int = 16, reuse: Mapping[str, float] | None = None,
                       interval: Mapping[str, float] | None = None) -> plt.Figure:  # fmt: skip
    """ViT ms per frame against the reuse ratio R and the cache interval N (STC-Cacher alone), with the
    baseline as a dashed line; points without measurements are left out."""
    from stc.workflow import INTERVAL_SWEEP, REUSE_SWEEP

    reuse = dict(reuse or REUSE_SWEEP)
    interval = dict(interval or INTERVAL_SWEEP)
    aliases = {"reuse-75": "cacher", "interval-4": "cacher"}  # the same settings, run once
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    base = _latency_row(latency, "baseline", frames)
    for ax, sweep, xlabel in ((axes[0], reuse, "reuse ratio R (%)"), (axes[1], interval, "cache interval N")):
        xs, ys, ticks = [], [], []
        for position, (method, value) in enumerate(sweep.items()):
            row = _latency_row(latency, method, frames)
            if row is None and method in aliases:
                row = _latency_row(latency, aliases[method], frames)
            x = position if sweep is interval else value
            ticks.append((x, "inf" if isinstance(value, float) and math.isinf(value) else f"{value:g}"))
            if row is not None:
                xs.append(x)
                ys.append(row["vit_ms_per_frame"])
        ax.plot(xs, ys, marker="o", color=OURS_COLOUR, label="STC-Cacher")
        if base is not None:
            ax.axhline(base["vit_ms_per_frame"], ls="--", color=PAPER_COLOUR, label="baseline (no cacher)")
        ax.set_xticks([t for t, _ in ticks], [s for _, s in ticks])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"ViT ms per frame ({frames}-frame stream)")
        if not xs:
            _no_data(ax, "no latency data")
        ax.legend(fontsize=8)
    return _finish(fig)


def _grid_overlay(ax, image: np.ndarray, mask: np.ndarray, grid: int, colour: str) -> None:
    """Draw image with the cells of a grid x grid token mask highlighted (others dimmed)."""
    size = image.shape[0]
    ax.imshow(image)
    cell = size / grid
    alpha = np.where(mask.reshape(grid, grid), 0.0, 0.6)
    ax.imshow(np.ones((grid, grid, 3)) * 0.05, alpha=alpha, extent=(0, size, size, 0))
    for i, j in zip(*np.nonzero(mask.reshape(grid, grid))):
        ax.add_patch(plt.Rectangle((j * cell, i * cell), cell, cell, fill=False, lw=0.6, ec=colour))
    ax.set_xticks([])
    ax.set_yticks([])


def plot_token_maps(maps: Mapping | None, layer: int | None = None) -> plt.Figure:
    """Per frame: the frame, the ViT tokens STC-Cacher recomputed (at `layer`, default the middle layer;
    every token on reference frames) and the pooled tokens the compressor kept."""
    if maps is None:
        fig, ax = plt.subplots(figsize=(6, 2), layout="constrained")
        ax.axis("off")
        _no_data(ax, "no token maps")
        return fig
    images, reference = np.asarray(maps["images"]), np.asarray(maps["reference"])
    recomputed, kept = np.asarray(maps["recomputed"]), np.asarray(maps["kept"])
    vit_grid, pooled_grid = int(maps["vit_grid"]), int(maps["pooled_grid"])
    layer = recomputed.shape[1] // 2 if layer is None else layer
    n = len(images)
    fig, axes = plt.subplots(3, n, figsize=(2.3 * n + 0.4, 7.6), squeeze=False, layout="constrained")
    for i in range(n):
        axes[0, i].imshow(images[i])
        axes[0, i].set_xticks([])
        axes[0, i].set_yticks([])
        axes[0, i].set_title(f"frame {i}" + (" (reference)" if reference[i] else ""), fontsize=8)
        _grid_overlay(axes[1, i], images[i], recomputed[i, layer], vit_grid, "yellow")
        share = recomputed[i, layer].mean() * 100
        axes[1, i].set_title(f"ViT layer {layer}: {share:.0f}% recomputed", fontsize=8)
        _grid_overlay(axes[2, i], images[i], kept[i], pooled_grid, "cyan")
        axes[2, i].set_title(f"kept {kept[i].sum()}/{kept[i].size} tokens", fontsize=8)
    method = str(maps.get("method", ""))
    fig.supxlabel(f"STC on a real video ({method}): ViT tokens STC-Cacher recomputed (middle row), "
                  "tokens the compressor kept for the LLM (bottom row)", fontsize=9)
    return _finish(fig)
