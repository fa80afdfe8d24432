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


def compile_for_hopper(kernel, signature: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3) -> dict:
    """Compile a Triton kernel ahead of time for an H100/H200 (sm_90), down to a cubin by Triton's own
    ptxas, with no GPU: the kernel's lowering, which the interpreter skips, checked on a CPU.
    signature: each runtime argument's Triton type ("*bf16", "i32", ...), in order; constexprs: the
    compile-time ones by name. Returns the kernel's assembly by stage. Skips without Triton's CUDA backend."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this Triton has no ahead-of-time compile API")
    names = list(kernel.arg_names)
    sig = {name: signature.get(name, "constexpr") for name in names}
    missing = [name for name in names if name not in signature and name not in constexprs]
    if missing:
        raise ValueError(f"no type or value for {missing}")
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    except (ImportError, FileNotFoundError, RuntimeError) as err:
        if "ptxas" in str(err) or "backend" in str(err).lower():
            pytest.skip(f"Triton's CUDA backend cannot compile here: {err}")
        raise
    return compiled.asm
