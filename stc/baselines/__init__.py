"""The compression baselines the paper compares STC with, plus two simple reference points.

In the vision encoder:
- `attach_tome` (ToMe): merges r tokens per encoder layer; pick r with `tome_r_for_budget`.

After projector and pooling, as `stc.compress.FrameCompressor`s:
- `VisionZip`: dominant (most attended) tokens plus merged contextual tokens;
- `VidCom2`: per-frame budgets by frame uniqueness, then the most distinctive tokens (causal);
- `UniformPooling`: a spatially uniform subset of the grid;
- `RandomDrop`: a seeded random subset.

All budgets are per frame: ``keep_ratio`` in (0, 1] or ``tokens_per_frame``; the default keep_ratio = 0.25
matches STC-Pruner alone (the paper's prefill-side baselines all sit at its prefill latency).
"""

from stc.baselines.simple import RandomDrop, RandomDropState, UniformPooling, check_budget, kept_tokens
from stc.baselines.tome import (
    MergePlan,
    ToMe,
    ToMeState,
    attach_tome,
    bipartite_soft_matching,
    merge_assignment,
    merge_tokens,
    merge_weighted_average,
    tome_r_for_budget,
)
from stc.baselines.vidcom2 import VidCom2, VidCom2State
from stc.baselines.visionzip import VisionZip

__all__ = [
    "MergePlan",
    "RandomDrop",
    "RandomDropState",
    "ToMe",
    "ToMeState",
    "UniformPooling",
    "VidCom2",
    "VidCom2State",
    "VisionZip",
    "attach_tome",
    "bipartite_soft_matching",
    "check_budget",
    "kept_tokens",
    "merge_assignment",
    "merge_tokens",
    "merge_weighted_average",
    "tome_r_for_budget",
]

# Post-projector baselines by the names stc.methods uses; each factory takes the budget keywords.
COMPRESSORS = {
    "visionzip": VisionZip,
    "vidcom2": VidCom2,
    "uniform": UniformPooling,
    "random": RandomDrop,
}
