"""stc: STC-Cacher and STC-Pruner for streaming video LLMs, with a ReKV streaming engine."""

from stc.cacher import Cacher, CacherConfig, CacherState, attach_cacher
from stc.compress import Compressed, FrameCompressor, VisionContext
from stc.pruner import Pruner, PrunerConfig, PrunerState

__all__ = [
    "Cacher",
    "CacherConfig",
    "CacherState",
    "Compressed",
    "FrameCompressor",
    "Pruner",
    "PrunerConfig",
    "PrunerState",
    "VisionContext",
    "attach_cacher",
]
__version__ = "0.1.0"
