"""The GPU scripts refuse a machine without a GPU before they measure or write anything."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")


def script(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, message", [
    (["--vit-only", "--skip-eager-vit"], "nothing to measure on cpu"),
    (["--graphs"], "--graphs need a CUDA device"),
    (["--stream-batches", "4"], "--stream-batches need a CUDA device"),
])  # fmt: skip
def test_bench_latency_refuses_before_writing(argv, message, tmp_path, capsys):
    out = tmp_path / "result.json"
    out.write_text("committed")
    with pytest.raises(SystemExit):
        script("bench_latency").main([*argv, "--device", "cpu", "--out", str(out)])
    assert message in capsys.readouterr().err
    assert out.read_text() == "committed"


@no_gpu
@pytest.mark.parametrize("name, argv", [
    ("bench_vit_kernels", ["--out"]), ("time_vit_steps", []), ("profile_step", []), ("bench_window_slide", ["--out"]),
])  # fmt: skip
def test_gpu_scripts_need_a_gpu(name, argv, tmp_path, capsys):
    with pytest.raises(SystemExit):
        script(name).main(argv + ([str(tmp_path / "x.json")] if argv else []))
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
