"""Running Triton kernels through Triton's interpreter on a CPU, for the kernel tests."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_in_triton_interpreter(code: str, timeout: int) -> None:
    """Run `code` in a subprocess with TRITON_INTERPRET=1 and the repository importable: the
    interpreter is chosen when kernels are defined, so it needs a fresh process. Skips without Triton,
    and with a GPU, where the compiled kernels are tested instead (the interpreter differs across
    Triton versions)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("with a GPU the compiled kernels are tested instead (the interpreter differs across Triton versions)")
    script = f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n" + textwrap.dedent(code)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
