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


@pytest.mark.parametrize("slack, tokens", [(4096, 196), (4096, 59), (40, 16), (0, 196), (100, 200)])
def test_window_slide_cost_per_frame_counts_the_engines_moves(tiny, slack, tokens):
    """bench_window_slide's cost per frame (advances, and one move per cycle) against the moves and advances
    of the engine's own `_slide_window`, counted over 3 cycles from the first frame that drops tokens."""
    from stc.engine import Block, EngineConfig, StreamingEngine, _KV

    per_frame_ms = script("bench_window_slide").per_frame_ms
    model, proc = tiny
    n_init, n_local = 2, 3 * tokens
    cycle = slack // tokens + 1
    with StreamingEngine(model, proc, EngineConfig(n_local=n_local, window_slack=slack)) as engine:
        engine._rotate = lambda x, delta: x  # only the slots matter here
        w = _KV(torch.zeros(1, 2, 1, n_init + n_local + tokens + slack, 1), n_init)
        init, blocks, moves, advances = torch.zeros(1, 2, 1, n_init, 1), [], 0, 0
        for f in range(4 + 3 * cycle):
            first, length = w.first, w.length
            engine._slide_window(w, init, tokens, [blocks])
            if f >= 4:  # n_local holds 3 frames: from the 5th on, each frame drops one
                moved = w.length < length
                assert moved or w.first == first + tokens
                moves, advances = moves + moved, advances + (not moved)
            blocks.append(Block(frame=f, time=None, start=w.length, kv=torch.zeros(1, 2, 1, tokens, 1), mean_key=None))
            w.length += tokens
    assert moves == 3
    assert per_frame_ms(1.0, 0.0, slack, tokens) == pytest.approx(advances / (3 * cycle))
    assert per_frame_ms(0.0, 1.0, slack, tokens) == pytest.approx(moves / (3 * cycle))
