"""Named method settings: every row of the paper's Tables 1-10 as one engine configuration.

`METHODS[name]` is a `Method`; `build_engine(model, processor, name)` makes the engine for it. Names
are what the workflow, the notebooks and the result files use. A method whose implementation is not
available raises `MethodUnavailable`, so tables show the row as missing instead of inventing it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

from stc.cacher import CacherConfig
from stc.engine import EngineConfig, StreamingEngine, check_model
from stc.pruner import PrunerConfig


class MethodUnavailable(RuntimeError):
    """The method is named by the paper but not implemented in this installation."""


@dataclass(frozen=True)
class Method:
    """One method setting. `label` is how tables print it; `paper_row` names the paper's row."""

    name: str
    label: str
    cacher: CacherConfig | None = None
    pruner: PrunerConfig | None = None
    compressor: str | None = None  # a baseline from stc.baselines, built by `make_compressor`
    compressor_args: dict = field(default_factory=dict)
    tome_keep_ratio: float | None = None  # ToMe: merge in the ViT to this share of the pooled tokens
    group: str = "main"

    def engine_config(self, base: EngineConfig | None = None, pooled_tokens: int = 196) -> EngineConfig:
        tome = None if self.tome_keep_ratio is None else max(1, math.floor(pooled_tokens * self.tome_keep_ratio))
        return replace(base or EngineConfig(), cacher=self.cacher, pruner=self.pruner, tome_tokens_per_frame=tome)


def _cacher(**kw):
    return CacherConfig(**{"cache_interval": 4, "reuse_ratio": 0.75, **kw})


def _both(n=2, r=0.75, keep=0.30, **pruner):
    return dict(cacher=CacherConfig(cache_interval=n, reuse_ratio=r), pruner=PrunerConfig(keep_ratio=keep, **pruner))


_ROWS = [
    # Tables 1-3: ReKV + LLaVA-OV-7B
    Method("baseline", "ReKV"),
    Method("cacher", "+STC-Cacher", cacher=_cacher()),
    Method("pruner", "+STC-Pruner", pruner=PrunerConfig(keep_ratio=0.25)),
    Method("cacher+pruner", "+STC-Cacher & Pruner", **_both()),
    Method("tome", "+ToMe", tome_keep_ratio=0.25),
    Method("visionzip", "+VisionZip", compressor="visionzip", compressor_args={"keep_ratio": 0.25}),
    Method("vidcom2", "+VidCom2", compressor="vidcom2", compressor_args={"keep_ratio": 0.25}),
    Method("uniform", "+Uniform pooling", compressor="uniform", compressor_args={"keep_ratio": 0.25}, group="reference"),
    Method("random", "+Random drop", compressor="random", compressor_args={"keep_ratio": 0.25}, group="reference"),
    # Table 4 / 6: reused features
    Method("reuse-attn", "attn only (R 85%)", cacher=_cacher(reuse="attn", reuse_ratio=0.85), group="T4"),
    Method("reuse-mlp", "MLP only (R 85%)", cacher=_cacher(reuse="mlp", reuse_ratio=0.85), group="T4"),
    Method("reuse-attn+mlp", "attn+MLP (R 75%)", cacher=_cacher(), group="T4"),
    # Table 5 / 10: pruner anchors and their weights (Eq. 9 alpha = weight of the temporal anchor); the
    # paper's "a_t + a_s" row equals Table 1's "+STC-Pruner", so these are the Pruner alone at R_Pruner 75%
    Method("anchor-spatial", "only a_s", pruner=PrunerConfig(keep_ratio=0.25, alpha=0.0), group="T5"),
    Method("anchor-temporal", "only a_t", pruner=PrunerConfig(keep_ratio=0.25, alpha=1.0), group="T5"),
    Method("anchor-both", "a_t + a_s", pruner=PrunerConfig(keep_ratio=0.25, alpha=0.5), group="T5"),
    Method("anchor-t+2s", "a_t + 2 a_s", pruner=PrunerConfig(keep_ratio=0.25, alpha=1 / 3), group="T10"),
    Method("anchor-2t+s", "2 a_t + a_s", pruner=PrunerConfig(keep_ratio=0.25, alpha=2 / 3), group="T10"),
    # Table 7 and Fig. 7: selection feature and metric
    Method("feature-hidden", "hidden feature", cacher=_cacher(selection_feature="hidden"), group="T7"),
    Method("feature-value", "value", cacher=_cacher(selection_feature="value"), group="T7"),
    Method("feature-key", "key", cacher=_cacher(), group="T7"),
    Method("metric-l1", "L1", cacher=_cacher(metric="l1"), group="F7"),
    Method("metric-l2", "L2", cacher=_cacher(metric="l2"), group="F7"),
    Method("metric-dot", "dot", cacher=_cacher(metric="dot"), group="F7"),
    Method("metric-cosine", "cosine", cacher=_cacher(), group="F7"),
    # Table 8: cache interval
    *[Method(f"interval-{n}", f"N = {n}", cacher=_cacher(cache_interval=v), group="T8")
      for n, v in (("1", 1), ("4", 4), ("7", 7), ("10", 10), ("inf", math.inf))],
    # Table 9a: reuse ratio; 9b: joint (R_Cacher, R_Pruner)
    *[Method(f"reuse-{int(r * 100)}", f"R = {int(r * 100)}%", cacher=_cacher(reuse_ratio=r), group="T9a") for r in (0.85, 0.75, 0.5)],
    *[Method(f"joint-{int(rc * 100)}-{int(rp * 100)}", f"({int(rc * 100)}%, {int(rp * 100)}%)",
             **_both(n=4, r=rc, keep=round(1 - rp, 2)), group="T9b")
      for rc, rp in ((0.5, 0.75), (0.75, 0.5), (0.75, 0.75))],
]
METHODS: dict[str, Method] = {m.name: m for m in _ROWS}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def make_compressor(method: Method):
    """The baseline compressor of a method, or MethodUnavailable if stc.baselines lacks it."""
    try:
        from stc import baselines
    except ImportError as err:
        raise MethodUnavailable(f"{method.name}: stc.baselines is not available ({err})") from err
    factory: Callable | None = getattr(baselines, "COMPRESSORS", {}).get(method.compressor)
    if factory is None:
        raise MethodUnavailable(f"{method.name}: no compressor {method.compressor!r} in stc.baselines")
    return factory(**method.compressor_args)


def build_engine(model, processor, name: str, base: EngineConfig | None = None) -> StreamingEngine:
    """The streaming engine for a named method (see METHODS). MethodUnavailable if this model cannot
    run it (e.g. ToMe on an encoder too shallow to reach the token budget)."""
    method = get_method(name)
    check_model(model)
    compressor = make_compressor(method) if method.compressor else None
    vcfg = model.config.vision_config
    pooled = math.ceil(vcfg.image_size // vcfg.patch_size / 2) ** 2
    config = method.engine_config(base, pooled)
    if method.tome_keep_ratio is not None:
        from stc.baselines.tome import tome_r_for_budget

        try:
            tome_r_for_budget((vcfg.image_size // vcfg.patch_size) ** 2, vcfg.num_hidden_layers, config.tome_tokens_per_frame)
        except ValueError as err:
            raise MethodUnavailable(f"{name}: {err}") from err
    return StreamingEngine(model, processor, config, compressor=compressor)
