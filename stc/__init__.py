"""stc: STC-Cacher and STC-Pruner for streaming video LLMs, with a ReKV streaming engine.

The names below load on first use, so `import stc` (and tools that only need stc.workflow or
stc.paths) do not pay for importing torch and transformers.
"""

import importlib

_EXPORTS = {
    "Cacher": "stc.cacher",
    "CacherConfig": "stc.cacher",
    "CacherState": "stc.cacher",
    "attach_cacher": "stc.cacher",
    "Compressed": "stc.compress",
    "FrameCompressor": "stc.compress",
    "VisionContext": "stc.compress",
    "Pruner": "stc.pruner",
    "PrunerConfig": "stc.pruner",
    "PrunerState": "stc.pruner",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'stc' has no attribute {name!r}")
