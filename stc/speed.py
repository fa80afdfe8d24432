"""The paper-scale speed report (issue 7) from committed latency JSON: tables and a figure.

`scripts/bench_latency.py` writes, per run, a JSON file with its GPU, versions and commit, and
optionally two sections this module reads:

- ``vit_graphs``: the graph-captured SigLIP step, full vs STC-Cacher (N=4, R=0.75), B synchronised
  streams, with the floors;
- ``batched``: `StreamBatch` runs, per B and method, ms per stream-frame of ViT and prefill over the
  whole run and (since commit 3af2d6d) over its first 16 and 32 steps;
- ``rows`` of a graph-path run (`--graphs`): one stream per method, per-stage ms per frame at the last
  checkpoint, and the question's time (retrieval + answer) with its floor where recorded.

It also reads the ``rows`` of `scripts/bench_vit_kernels.py --vit-parts layer_chain`: a SigLIP layer's
GEMMs and attention alone, chained over the tower's layers, for the full and the selective layer.

`load_speed` collects them from many files; where several files measured the same setting on the same
GPU, the newest (by the date in its meta) wins, so re-measuring updates the report without deleting
history. A StreamBatch row is the newest measurement of its method at that B, and it keeps the baseline
of its own run (``run_baseline_*``): its change, share and real-time gain are against that baseline,
never against another run's, so a later run of a few methods updates those alone. The one-stream rows
all come from the GPU's newest graph-path file. GPUs are never mixed: the tables take the measurements
of one GPU (`Speed.on`), and `report` and `plot_speed` show each GPU on its own. Runs kept for an A/B
comparison of code versions go under another key (``ab_runs``) and are not read.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from stc import flops

# GraphedVision's options after compile, as a row's flag and its level's suffix: the Cacher's Triton
# kernels, the MLP's GELU in its fc1 GEMM, the patch embedding as a GEMM, the attention projections as
# one GEMM, the LayerNorms as one-pass kernels, the Cacher's merged values in a buffer kept across frames, the
# Cacher's selective attention by stc.vit_kernel, the Cacher's projections of every token as one GEMM
_LEVEL_OPTIONS = (("kernels", " + kernels"), ("fused_mlp", " + fused MLP"), ("patch_gemm", " + patch GEMM"),
                  ("fused_qkv", " + fused QKV"), ("norm_kernel", " + norm kernel"), ("value_buffer", " + value buffer"),
                  ("attention_kernel", " + attention kernel"), ("project_all", " + all-token projections"))
# compile=False / True, each without and with every option, least optimised first
COMPILE_LEVELS = tuple(c + "".join(parts) for c in ("none", "inductor")
                       for parts in itertools.product(*(("", suffix) for _, suffix in _LEVEL_OPTIONS)))
REALTIME_FPS = 0.5  # the paper's streaming rate: a stream is real time if each frame is done in 2 s
BASELINE = "baseline"
PRUNED = ("pruner", "cacher+pruner")
VIT_CACHER = (4, 0.75)  # the Cacher the ViT rows measure (N, R): issue 7's setting


@dataclass
class Speed:
    vit: pd.DataFrame  # batch, compile (a COMPILE_LEVELS name), full_ms_per_frame, cacher_ms_per_frame, floors, source, device, commit
    batched: pd.DataFrame  # batch, method, tokens_per_frame, vit/prefill ms per stream-frame, prefill floor, ...
    stream: pd.DataFrame = field(default_factory=pd.DataFrame)  # method, frames, tokens, per-stage ms per frame, qa_ms, floors
    chain: pd.DataFrame = field(default_factory=pd.DataFrame)  # batch, layer (full, selective), weights, us per layer

    @property
    def _frames(self) -> tuple[pd.DataFrame, ...]:
        return self.vit, self.batched, self.stream, self.chain

    @property
    def empty(self) -> bool:
        return all(f.empty for f in self._frames)

    @property
    def devices(self) -> list[str]:
        """The GPUs measured, the one with the newest measurement first."""
        frames = [f[["device", "date"]] for f in self._frames if not f.empty]
        if not frames:
            return []
        newest = pd.concat(frames).groupby("device")["date"].max()
        return list(newest.sort_values(ascending=False, kind="stable").index)

    def on(self, device: str) -> "Speed":
        """The measurements of one GPU (a name from `devices`)."""
        if device not in self.devices:
            raise ValueError(f"no measurements on {device!r}; measured: {self.devices}")
        return Speed(*(f[f["device"] == device].reset_index(drop=True) if not f.empty else f for f in self._frames))


def _one_device(speed: Speed) -> None:
    if len(speed.devices) > 1:
        raise ValueError(f"these measurements come from several GPUs ({speed.devices}): pass one GPU's, speed.on(device)")


def _newest(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    if frame.empty:
        return frame
    return frame.sort_values("date").drop_duplicates(keys, keep="last").sort_values(keys).reset_index(drop=True)


def _level(compile, flags: dict | None = None) -> str:
    """A COMPILE_LEVELS name: compile (False, True or a backend) and the `_LEVEL_OPTIONS` set in flags."""
    level = {False: "none", True: "inductor"}.get(compile, compile) if isinstance(compile, bool) else str(compile)
    return level + "".join(suffix for flag, suffix in _LEVEL_OPTIONS if (flags or {}).get(flag))


@functools.lru_cache(maxsize=None)
def _architecture(arch: str):
    from stc.models import architecture_config

    return architecture_config(arch)


@functools.lru_cache(maxsize=None)
def _window() -> int:
    from stc.engine import EngineConfig

    return EngineConfig().n_local  # the runs' encoding window (the engine's default)


def _floor_model(meta: dict):
    """The floor functions of a run (`stc.flops`) at its measured rates, or None where its meta lacks them."""
    rates = {key: meta.get(key) for key in ("matmul_flops", "copy_bytes_per_s")}
    if not all(rates.values()) or meta.get("arch") is None:
        return None
    config, value_bytes = _architecture(meta["arch"]), flops.VALUE_BYTES.get(meta.get("dtype"), 2)

    def vit(batch: int) -> dict:
        full, cacher = flops.vit_floors_ms(config.vision_config, rates, *VIT_CACHER, batch, value_bytes)
        return {"floor_full_ms": full, "floor_cacher_ms": cacher}

    def prefill(tokens: int, frames: int, batch: int) -> float:
        return flops.llm_prefill_floor_ms(config.text_config, rates, tokens, frames, batch, window=_window(),
                                          bytes_per_param=value_bytes)

    return vit, prefill


def _lengths(row: dict) -> list[dict]:
    """A StreamBatch row at its full length and at each shorter checkpoint it recorded ("frames": the
    first c steps its times are means over)."""
    full = {k: v for k, v in row.items() if k != "checkpoints"}
    shorter = [{**full, **stage, "frames": int(c)} for c, stage in (row.get("checkpoints") or {}).items()
               if int(c) < row["frames"]]
    return [full, *shorter]


def load_speed(paths: Iterable[str | os.PathLike]) -> Speed:
    """The vit_graphs, batched and graph-path rows sections, and the layer-chain rows, of the given latency
    JSON files (others are skipped). Floors are those of `stc.flops` at each run's measured rates (where its
    meta records them and its architecture), not the ones written when it ran: the floor model applies to old
    runs alike."""
    vit, batched, stream, chain = [], [], [], []
    for path in sorted(Path(p) for p in paths):
        data = json.loads(path.read_text())
        meta = data.get("meta", {})
        info = {"source": path.name, "device": meta.get("device") or "unknown GPU", "dtype": meta.get("dtype"),
                "torch": meta.get("torch"), "commit": str(meta.get("commit", ""))[:7], "date": meta.get("date", "")}
        vit_floors, prefill_floor = _floor_model(meta) or (None, None)
        compiled = "compiled vision" in meta.get("protocol", "")
        for row in data.get("vit_graphs") or []:
            floors = vit_floors(row["batch"]) if vit_floors else {}
            vit.append({**row, **floors, **info, "compile": _level(row.get("compile", False), row)})
        for row in data.get("batched") or []:
            for one in _lengths(row):
                if prefill_floor:
                    one["prefill_floor_ms"] = prefill_floor(one["tokens_per_frame"], one["frames"], one["batch"])
                batched.append({**one, **info, "compile": _level(compiled)})
        graph_rows = (data.get("rows") or []) if "CUDA graphs" in meta.get("protocol", "") else []
        for row in graph_rows:
            frames = max(row["checkpoints"], key=int)
            last = dict(row["checkpoints"][frames])
            if prefill_floor:
                last["prefill_floor_ms"] = prefill_floor(row["tokens_per_frame"], int(frames), 1)
            stream.append({"method": row["method"], "frames": row["frames"], "tokens_per_frame": row["tokens_per_frame"],
                           **last, "qa_ms": row["qa_ms"], "qa_floor_ms": row.get("qa_floor_ms"),
                           "qa_retrieval_ms": row.get("qa_retrieval_ms"),
                           "qa_new_tokens": row.get("qa_new_tokens"), **info})
        for row in data.get("rows") or []:
            if isinstance(row, dict) and row.get("op") == "layer chain":  # variant: "full, weights cold"
                layer, weights = row["variant"].split(", weights ")
                chain.append({"batch": row["batch"], "layer": layer, "weights": weights, "rows": row["rows"],
                              "us_per_layer": row["us"], **info})
    vit_df = _newest(pd.DataFrame(vit), ["device", "batch", "compile"])
    if not vit_df.empty:  # per GPU and B: uncompiled first, then more optimised
        rank = vit_df["compile"].map(lambda c: COMPILE_LEVELS.index(c) if c in COMPILE_LEVELS else len(COMPILE_LEVELS))
        vit_df = vit_df.assign(_rank=rank).sort_values(["device", "batch", "_rank"]).drop(columns="_rank").reset_index(drop=True)
    batched_df = pd.DataFrame(batched)
    if not batched_df.empty:  # each row keeps its own run's baseline, then the newest row per method wins
        run = ["source", "device", "batch", "frames"]
        base = batched_df[batched_df["method"] == BASELINE].drop_duplicates(run, keep="last")
        if "projector_ms_per_frame" not in base:
            base = base.assign(projector_ms_per_frame=float("nan"))
        base = base[run + ["vit_ms_per_frame", "prefill_ms_per_frame", "prefill_floor_ms", "projector_ms_per_frame"]].rename(columns={
            "vit_ms_per_frame": "run_baseline_vit_ms", "prefill_ms_per_frame": "run_baseline_prefill_ms",
            "prefill_floor_ms": "run_baseline_prefill_floor_ms", "projector_ms_per_frame": "run_baseline_projector_ms"})
        batched_df = _newest(batched_df.merge(base, on=run, how="left"), ["device", "batch", "frames", "method"])
    stream_df = pd.DataFrame(stream)
    if not stream_df.empty:
        newest = stream_df.sort_values("date").groupby("device")["source"].last()
        stream_df = stream_df[stream_df["source"] == stream_df["device"].map(newest)].reset_index(drop=True)
    chain_df = _newest(pd.DataFrame(chain), ["device", "batch", "layer", "weights"])
    return Speed(vit=vit_df, batched=batched_df, stream=stream_df, chain=chain_df)


def _full_length(batched: pd.DataFrame) -> pd.DataFrame:
    """Each method's StreamBatch rows at the longest length measured at its B."""
    if batched.empty:
        return batched
    longest = batched.groupby(["device", "batch", "method"])["frames"].transform("max")
    return batched[batched["frames"] == longest]


def vit_table(speed: Speed) -> pd.DataFrame:
    """Graph-captured ViT per B and compile level: ms per frame, change, the change the floors predict, multiples of the floor."""
    _one_device(speed)
    v = speed.vit
    if v.empty:
        return pd.DataFrame()
    return pd.DataFrame({
        "B": v["batch"], "compile": v["compile"],
        "full ms/frame": v["full_ms_per_frame"], "Cacher ms/frame": v["cacher_ms_per_frame"],
        "change": v["cacher_ms_per_frame"] / v["full_ms_per_frame"] - 1,
        "floor predicts": v["floor_cacher_ms"] / v["floor_full_ms"] - 1,
        "full / floor": v["full_ms_per_frame"] / v["floor_full_ms"],
        "Cacher / floor": v["cacher_ms_per_frame"] / v["floor_cacher_ms"],
        "commit": v["commit"],
    })


def _most_optimised(frame: pd.DataFrame, batch: str) -> pd.DataFrame:
    """Each B's row of the most optimised ViT path measured there: its last (`load_speed` orders each B's rows
    from least to most optimised; the levels may differ between B, GraphedVision's project_all is on by default
    at B = 1 only). batch: the frame's column of B ("batch" in `Speed.vit`, "B" in `vit_table`)."""
    return frame.groupby(batch, sort=True).tail(1)


def chain_table(speed: Speed) -> pd.DataFrame:
    """The layer chains per B (weights cold, as in the tower): a full and a selective layer's GEMMs and
    attention alone, in us per layer; "chains predict": the Cacher's change against the full ViT (N=4: one
    reference step, a full one, in every N) if every step, the full ones too, took its layers' chains alone;
    "change": the one measured on the most optimised path (`vit_table`, another run)."""
    _one_device(speed)
    c = speed.chain
    if c.empty:
        return pd.DataFrame()
    cold = c[c["weights"] == "cold"]
    us = cold.pivot_table(index="batch", columns="layer", values="us_per_layer", aggfunc="last")
    if not {"full", "selective"} <= set(us.columns):
        return pd.DataFrame()
    us = us.dropna(subset=["full", "selective"])
    runs = cold[cold["layer"].isin(["full", "selective"])].groupby("batch")["commit"].agg(lambda x: ", ".join(dict.fromkeys(x)))
    n = VIT_CACHER[0]
    ratio = us["selective"] / us["full"]
    vit = vit_table(speed)
    measured = _most_optimised(vit, "B").set_index("B")["change"] if not vit.empty else pd.Series(dtype=float)
    return pd.DataFrame({
        "B": us.index, "full layer (us)": us["full"].values, "selective layer (us)": us["selective"].values,
        "selective / full": ratio.values, "chains predict": ((1 + (n - 1) * ratio) / n - 1).values,
        "change": [measured.get(b) for b in us.index], "commit": [runs[b] for b in us.index],
    })


def prefill_table(speed: Speed) -> pd.DataFrame:
    """StreamBatch per B, length and method: ViT and prefill per stream-frame over the first `frames`
    steps, the prefill floor, the change against the baseline of the method's own run (its prefill in
    "run's baseline"), what the floor model predicts, and the share achieved."""
    _one_device(speed)
    b = speed.batched
    if b.empty:
        return pd.DataFrame()
    rows = []
    for _, r in b.sort_values(["batch", "frames"], kind="stable").iterrows():
        base_prefill = r.get("run_baseline_prefill_ms")
        compared = r["method"] != BASELINE and pd.notna(base_prefill)
        change = predicted = share = None
        if compared:
            change = r["prefill_ms_per_frame"] / base_prefill - 1
            predicted = r["prefill_floor_ms"] / r["run_baseline_prefill_floor_ms"] - 1
            share = change / predicted if predicted <= -SMALLEST_PREDICTED_CUT else None
        rows.append({"B": r["batch"], "frames": r["frames"], "method": r["method"], "tokens": r["tokens_per_frame"],
                     "ViT": r["vit_ms_per_frame"], "prefill": r["prefill_ms_per_frame"],
                     "prefill floor": r["prefill_floor_ms"], "prefill / floor": r["prefill_ms_per_frame"] / r["prefill_floor_ms"],
                     "run's baseline": base_prefill if compared else None,
                     "prefill change": change, "floor predicts": predicted, "share of predicted": share,
                     "commit": r["commit"]})
    return pd.DataFrame(rows)


def stream_table(speed: Speed) -> pd.DataFrame:
    """One stream on the graph path, per method: per-stage ms per frame over the stream, the prefill
    floor, and the question's time (retrieval + answer) against its floor (`stc.flops.llm_answer_bytes`),
    with its retrieval part where the run recorded it."""
    _one_device(speed)
    st = speed.stream
    if st.empty:
        return pd.DataFrame()
    qa_floor = st["qa_floor_ms"].astype(float)
    return pd.DataFrame({
        "method": st["method"], "frames": st["frames"], "tokens": st["tokens_per_frame"],
        "ViT": st["vit_ms_per_frame"], "projector": st["projector_ms_per_frame"], "prefill": st["prefill_ms_per_frame"],
        "prefill / floor": st["prefill_ms_per_frame"] / st["prefill_floor_ms"],
        "answer": st["qa_ms"], "of which retrieval": st["qa_retrieval_ms"].astype(float),
        "answer floor": qa_floor, "answer / floor": st["qa_ms"] / qa_floor,
        "commit": st["commit"],
    })


def realtime_table(speed: Speed, fps: float = REALTIME_FPS) -> pd.DataFrame:
    """Streams one GPU serves in real time (ViT + prefill per stream-frame within 1/fps), per method,
    from the largest B measured (compute only: KV memory is not counted); and the same with the
    projector stage counted too (the projector, LLaVA-OneVision's pooling and a compressor's selection)."""
    _one_device(speed)
    b = _full_length(speed.batched)
    if b.empty:
        return pd.DataFrame()
    top = b[b["batch"] == b["batch"].max()]
    budget_ms = 1000.0 / fps
    rows = []
    for _, r in top.iterrows():
        per = r["vit_ms_per_frame"] + r["prefill_ms_per_frame"]
        streams = int(budget_ms // per)
        base = r.get("run_baseline_vit_ms", float("nan")) + r.get("run_baseline_prefill_ms", float("nan"))
        projector, base_projector = r.get("projector_ms_per_frame", float("nan")), r.get("run_baseline_projector_ms", float("nan"))
        with_projector = per + projector
        streams_all = int(budget_ms // with_projector) if pd.notna(with_projector) else None
        base_all = base + base_projector
        rows.append({"method": r["method"], "B": r["batch"], "commit": r.get("commit"), "ms per stream-frame": per, "streams": streams,
                     "vs baseline": streams / (budget_ms // base) if pd.notna(base) else None,
                     "with projector (ms)": with_projector, "streams with projector": streams_all,
                     "vs baseline with projector": streams_all / (budget_ms // base_all)
                     if streams_all is not None and pd.notna(base_all) else None})
    return pd.DataFrame(rows)


# Issue 7's targets
TARGET_VIT_CHANGE = -0.40  # the Cacher (N=4, R=0.75) against the full ViT, one stream
TARGET_SHARE = 0.90  # of the prefill reduction the floor model predicts for pruning, at every B
# A share of a cut the floor predicts below this is not shown: where the weights' read bounds the step (B = 1), the
# floor predicts no cut or a tiny one (its last steps' FLOPs over the past), and a share of it reads 200% or 20,000%.
SMALLEST_PREDICTED_CUT = 0.01
TARGET_PREFILL_CHANGE = {16: -0.55}  # the Pruner's prefill against the baseline's
TARGET_FLOOR_MULTIPLE = {1: 3.0, 16: 2.0}  # every stage within this multiple of its floor
TARGET_REALTIME_GAIN = 2.0  # streams served in real time, STC (Cacher + Pruner) against the baseline
STC = "cacher+pruner"


def _target(target: str, b: int, measured: str, required: str, met: bool, commit: str) -> dict:
    return {"target": target, "B": b, "measured": measured, "required": required, "met": "yes" if met else "no",
            "commit": commit}


def _worst(table: pd.DataFrame, column: str, largest: bool) -> pd.Series:
    values = table[column].astype(float)
    return table.loc[values.idxmax() if largest else values.idxmin()]


def _which(row: pd.Series) -> str:
    return f"{row['method']}, {row['frames']} frames"


def targets_table(speed: Speed) -> pd.DataFrame:
    """Issue 7's targets against the measurements: one row per target and B, with the measured value (the
    worst of the methods and lengths where a target covers several), what it must be, whether it is met, and the commit
    that was measured (a GPU's rows may come from runs of different code). The ViT
    rows take the most optimised path measured at each B; StreamBatch rows compare with their own run's
    baseline (`prefill_table`, `realtime_table`); the question's time comes from the one-stream rows (B = 1)."""
    _one_device(speed)
    rows = []
    vit = vit_table(speed)
    if not vit.empty:
        best = _most_optimised(vit, "B").set_index("B")
        if 1 in best.index:
            change = best.loc[1, "change"]
            rows.append(_target("ViT: Cacher N=4 R=0.75 against full", 1, f"{change:+.0%}", f"<= {TARGET_VIT_CHANGE:+.0%}",
                                change <= TARGET_VIT_CHANGE, best.loc[1, "commit"]))
        for b, limit in TARGET_FLOOR_MULTIPLE.items():
            for side in ("full", "Cacher") if b in best.index else ():
                multiple = best.loc[b, f"{side} / floor"]
                rows.append(_target(f"ViT {side} / floor", b, f"{multiple:.2f}x", f"<= {limit:g}x", multiple <= limit,
                                    best.loc[b, "commit"]))
    prefill = prefill_table(speed)
    for b, group in prefill.groupby("B", sort=True) if not prefill.empty else ():
        compared = group[group["method"].isin(PRUNED) & group["prefill change"].notna()]
        pruned = compared[compared["share of predicted"].notna()]
        if not pruned.empty:
            worst = _worst(pruned, "share of predicted", largest=False)
            rows.append(_target("prefill: share of the reduction the floor predicts, pruned", b,
                                f"{worst['share of predicted']:.1%} ({_which(worst)})", f">= {TARGET_SHARE:.0%}",
                                worst["share of predicted"] >= TARGET_SHARE, worst["commit"]))
        # Where the floor predicts no cut or a tiny one (a step bound by reading the weights, as at B = 1), the same
        # target without the division: the change at most 90% of the predicted one (where none is predicted, no
        # slower than the baseline).
        uncut = compared[compared["share of predicted"].isna()]
        if not uncut.empty:
            bound = TARGET_SHARE * uncut["floor predicts"].astype(float).clip(upper=0)
            worst = uncut.loc[(uncut["prefill change"].astype(float) - bound).idxmax()]
            rows.append(_target(f"prefill, pruned, where the floor predicts a cut under {SMALLEST_PREDICTED_CUT:.0%}: change", b,
                                f"{worst['prefill change']:+.1%} ({_which(worst)})", f"<= {bound[worst.name]:+.1%}",
                                worst["prefill change"] <= bound[worst.name], worst["commit"]))
        pruner = group[(group["method"] == "pruner") & group["prefill change"].notna()]
        if b in TARGET_PREFILL_CHANGE and not pruner.empty:
            worst, limit = _worst(pruner, "prefill change", largest=True), TARGET_PREFILL_CHANGE[b]
            rows.append(_target("prefill: Pruner against baseline", b, f"{worst['prefill change']:+.0%} ({worst['frames']} frames)",
                                f"<= {limit:+.0%}", worst["prefill change"] <= limit, worst["commit"]))
        if b in TARGET_FLOOR_MULTIPLE:
            worst, limit = _worst(group, "prefill / floor", largest=True), TARGET_FLOOR_MULTIPLE[b]
            rows.append(_target("prefill / floor", b, f"{worst['prefill / floor']:.2f}x ({_which(worst)})", f"<= {limit:g}x",
                                worst["prefill / floor"] <= limit, worst["commit"]))
    stream = stream_table(speed)
    answered = stream[stream["answer / floor"].notna()] if not stream.empty else stream
    if not answered.empty:
        worst, limit = _worst(answered, "answer / floor", largest=True), TARGET_FLOOR_MULTIPLE[1]
        rows.append(_target("a question (retrieval + answer) / floor, one stream", 1,
                            f"{worst['answer / floor']:.2f}x ({worst['method']})", f"<= {limit:g}x", worst["answer / floor"] <= limit,
                            worst["commit"]))
    realtime = realtime_table(speed)
    stc = realtime[realtime["method"] == STC] if not realtime.empty else realtime
    if not stc.empty and pd.notna(stc["vs baseline"].iloc[0]):
        gain = stc["vs baseline"].iloc[0]
        rows.append(_target(f"streams in real time at {REALTIME_FPS} fps: STC against baseline", int(stc["B"].iloc[0]),
                            f"{gain:.2f}x", f">= {TARGET_REALTIME_GAIN:g}x", gain >= TARGET_REALTIME_GAIN, stc["commit"].iloc[0]))
    return pd.DataFrame(rows)


def _cell(value, column: str) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if isinstance(value, (bool, str)) or column in ("B", "tokens", "frames") or column.startswith("streams"):
        return str(value)
    if column in ("change", "prefill change", "floor predicts", "chains predict"):
        return f"{value:+.0%}"
    if column == "share of predicted":  # one decimal: 89.9% must not read as a met 90%
        return f"{value:.1%}"
    if "/ floor" in column or column.startswith("vs baseline"):
        return f"{value:.2f}x"
    return f"{value:.2f}"


def markdown(table: pd.DataFrame) -> str:
    if table.empty:
        return "(no measurements)\n"
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in table.iterrows():
        lines.append("| " + " | ".join(_cell(r[c], c) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def environment_line(speed: Speed, files: bool = True) -> str:
    """Where the numbers come from: per file (files=True), or per device and versions with their commits."""
    both = pd.concat([f for f in speed._frames if not f.empty], ignore_index=True) if not speed.empty else pd.DataFrame()
    if both.empty:
        return ""
    parts = both.drop_duplicates("source")
    if files:
        return "; ".join(f"{r.source}: {r.device}, {r.dtype}, torch {r.torch}, commit {r.commit}" for r in parts.itertuples())
    groups = parts.groupby(["device", "dtype", "torch"], sort=False)["commit"]
    return "; ".join(f"{d}, {t}, torch {v}, commits {', '.join(dict.fromkeys(c))}" for (d, t, v), c in groups)


_VIT_NOTE = (
    "compile: none or inductor (the layer functions through torch.compile, both sides alike); \"+ kernels\": "
    "the Cacher ranks its tokens with stc.vit_kernel (Triton; since commit d0bc602 its key similarity too); "
    "\"+ fused MLP\": both sides run fc1, its bias and the GELU as one GEMM (stc.cacher.mlp_forward); "
    "\"+ patch GEMM\": both sides embed the patches with one GEMM instead of cuDNN's convolution "
    "(stc.fast.patch_embeddings); \"+ fused QKV\": both sides compute the attention projections of the same rows "
    "as one GEMM (stc.cacher.project; a selective layer fuses only its query and value projections, so the Cacher "
    "gains less); \"+ norm kernel\": both sides run their LayerNorms, and the residual add before the second, "
    "as one pass each (stc.vit_kernel.layer_norm, add_layer_norm; since commit 3a0bda6 a layer's output pass also "
    "computes the next layer's first norm, merge_layer_norm in a selective layer). Since commit 60920d0 the Cacher's "
    "runs no longer pay for saving the caches of the previous run's streams, which nobody held (25-30 ms per run of 32 "
    "steps at B = 16 on the H200). Since commit c8d5ac6 the Cacher without the kernel ranks "
    "with a stable sort (before: top-k). In rows without \"+ patch GEMM\" from before commit 31f5f3e, the baseline's "
    "layers and the Cacher's reference frames ran on the embedding module's transposed layout (its selective frames "
    "did not): they overstate the Cacher's saving at B = 1.\n")


_CHAIN_NOTE = (
    "### Layer chains: a SigLIP layer's GEMMs and attention alone (us per layer)\n\n"
    "`scripts/bench_vit_kernels.py --vit-parts layer_chain`: the projections of every token, the attention, the output "
    "projection, fc1 with its GELU and fc2 of each of 26 layers, each with its own weights, and nothing else (no norm, "
    "selection or merge); the selective layer's attention and the rest for its 182 recomputed tokens per frame. "
    "\"chains predict\": the Cacher's change if every step, the full ones too, took its layers' chains alone (N=4: "
    "a reference step, full, in every four); \"change\": the measured one, on the most optimised path.\n")


def report(speed: Speed) -> str:
    """The tables of each GPU measured (the newest first), its targets last, as one Markdown document."""
    parts = ["# Speed at paper scale (LLaVA-OV-7B architecture, random weights)\n",
             "GPU measurements committed under `results/latency/`, the same in every profile: the tiny profile "
             "renders them and measures nothing here.\n"]
    if speed.empty:
        return "\n".join(parts + ["Measured: nothing yet.\n", "(no measurements)\n"])
    parts.append(_VIT_NOTE)
    for device in speed.devices:
        one = speed.on(device)
        parts += [
            f"## {device}\n",
            f"Measured: {environment_line(one)}.\n",
            "### SigLIP step, graph-captured, B synchronised streams (ms per stream-frame)\n", markdown(vit_table(one)),
            *([_CHAIN_NOTE, markdown(chain_table(one))] if not one.chain.empty else []),
            "### StreamBatch: ViT and prefill per stream-frame (ms), means over each stream's first `frames` frames\n",
            f"\"share of predicted\": the prefill's change over the change the floor predicts, where it predicts a cut of "
            f"{SMALLEST_PREDICTED_CUT:.0%} or more (a step bound by the weights' read predicts none).\n",
            markdown(prefill_table(one)),
            f"### Streams served in real time at {REALTIME_FPS} fps (ViT + prefill, compute only)\n",
            "Each row against the baseline of its own run. \"with projector\": the projector stage counted too; before "
            "commit e39e43f it held LLaVA-OneVision's pooling on a layout that PyTorch's CUDA kernel runs slowly (0.75 ms "
            "per frame at B = 1 on the H200, 8 us after), so older runs' rows overstate it. Since commit 2406c65 STC-Pruner "
            "selects for every stream of a batch at once, and VisionZip since commit 6315fe8; in older runs they ran once "
            "per stream.\n",
            markdown(realtime_table(one)),
            "### One stream, graph path: ms per frame, and one question (retrieval + answer, ms)\n",
            markdown(stream_table(one)),
            "### Issue 7's targets\n",
            "The worst of the methods and lengths where a target covers several; the ViT on its most optimised path measured; "
            "\"commit\": the code measured, so a row from older code than the rest shows as such.\n",
            markdown(targets_table(one)),
        ]
    return "\n".join(parts)


def plot_speed(speed: Speed) -> plt.Figure:
    """One row per GPU (the newest measured first). Left: graph-captured ViT ms per stream-frame against
    B, full vs Cacher, with their floors. Right: StreamBatch prefill per stream-frame against B per
    method, with each one's floor."""
    devices = speed.devices or [None]
    fig, axes = plt.subplots(len(devices), 2, figsize=(11, 4.2 * len(devices)), squeeze=False)
    for (ax1, ax2), device in zip(axes, devices):
        _plot_device(ax1, ax2, speed.on(device) if device else speed, device)
    line = environment_line(speed, files=False)
    if line:
        fig.text(0.01, 0.01, line, fontsize=6, color="0.4")
    fig.tight_layout(rect=(0, 0.04 / len(devices), 1, 1 - 0.04 / len(devices)))  # the top for stc.figures.label_figure
    return fig


def _plot_device(ax1, ax2, speed: Speed, device: str | None) -> None:
    on = f" on {device}" if device else ""
    v = speed.vit
    if v.empty:
        ax1.text(0.5, 0.5, "no ViT measurements", ha="center", va="center", transform=ax1.transAxes)
    else:
        v = _most_optimised(v, "batch")  # both sides alike, as `targets_table` takes them
        ax1.plot(v["batch"], v["full_ms_per_frame"], "o-", label="full")
        ax1.plot(v["batch"], v["cacher_ms_per_frame"], "s-", label="STC-Cacher N=4, R=0.75")
        ax1.plot(v["batch"], v["floor_full_ms"], "--", color="C0", lw=1, label="full floor")
        ax1.plot(v["batch"], v["floor_cacher_ms"], "--", color="C1", lw=1, label="Cacher floor")
        ax1.set_xscale("log", base=2)
        ax1.set_xticks(sorted(v["batch"].unique()), [str(x) for x in sorted(v["batch"].unique())])
        ax1.set_ylim(bottom=0)
        ax1.legend(fontsize=8)
    ax1.set(xlabel="synchronised streams B", ylabel="ms per stream-frame", title=f"SigLIP step (graph-captured){on}")
    b = _full_length(speed.batched)
    if b.empty:
        ax2.text(0.5, 0.5, "no StreamBatch measurements", ha="center", va="center", transform=ax2.transAxes)
    else:
        for i, (method, group) in enumerate(b.groupby("method", sort=False)):
            group = group.sort_values("batch")
            ax2.plot(group["batch"], group["prefill_ms_per_frame"], "o-", color=f"C{i}", label=method)
            ax2.plot(group["batch"], group["prefill_floor_ms"], ":", color=f"C{i}", lw=1)
        ax2.set_xscale("log", base=2)
        ax2.set_xticks(sorted(b["batch"].unique()), [str(x) for x in sorted(b["batch"].unique())])
        ax2.set_ylim(bottom=0)
        ax2.legend(fontsize=8)
    ax2.set(xlabel="synchronised streams B", ylabel="ms per stream-frame", title=f"LLM prefill (dotted: floor){on}")
