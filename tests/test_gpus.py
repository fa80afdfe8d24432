"""stc.gpus: jobs started at once get GPUs of their own, wait while all are held, get them back when a
holder dies, and run as they are where there is nothing to choose."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A job that reports its GPUs and when it held them.
JOB = ("import json, os, time; start = time.time(); time.sleep({seconds}); "
       "print(json.dumps([os.environ.get('CUDA_VISIBLE_DEVICES'), start, time.time()]))")


def start(tmp_path, seconds=0.5, visible="3,5", count=1, path=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    if path is not None:
        env["PATH"] = path
    command = [sys.executable, "-m", "stc.gpus", "--count", str(count), "--lock-dir", str(tmp_path / "locks"),
               "--poll", "0.05", "--", sys.executable, "-c", JOB.format(seconds=seconds)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process, with_stderr=False):
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    return (json.loads(out), err) if with_stderr else json.loads(out)


def test_jobs_started_at_once_get_gpus_of_their_own(tmp_path):
    runs = [finish(p) for p in [start(tmp_path) for _ in range(5)]]
    assert {gpu for gpu, _, _ in runs} == {"3", "5"}  # both used, one GPU each
    for gpu in ("3", "5"):
        spans = sorted((s, e) for g, s, e in runs if g == gpu)
        assert all(prev_end <= next_start for (_, prev_end), (next_start, _) in zip(spans, spans[1:]))  # never shared
    # and two GPUs per job: the jobs hold both, one after the other
    runs = [finish(p) for p in [start(tmp_path, visible="0,1,2", count=2) for _ in range(2)]]
    assert all(len(gpu.split(",")) == 2 for gpu, _, _ in runs)
    (_, _, first_end), (_, second_start, _) = sorted(runs, key=lambda r: r[1])
    assert first_end <= second_start  # 3 GPUs hold one pair at a time


def wait_until_held(lock_dir, gpus, timeout=60):
    """Until another process holds the lock of every GPU in gpus."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        free = []
        for gpu in gpus:
            path = lock_dir / f"gpu-{gpu}.lock"
            if not path.exists():
                free.append(gpu)
                continue
            with open(path) as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    free.append(gpu)  # closing the file gives the probe's lock back
                except BlockingIOError:
                    pass
        if not free:
            return
        time.sleep(0.05)
    raise AssertionError(f"GPUs {gpus} were not all held within {timeout} s")


def test_a_killed_job_gives_its_gpu_back(tmp_path):
    holder = start(tmp_path, seconds=60, visible="0,1")
    other = start(tmp_path, seconds=60, visible="0,1")
    wait_until_held(tmp_path / "locks", ["0", "1"])
    waiting = start(tmp_path, seconds=0, visible="0,1")
    time.sleep(0.5)
    assert waiting.poll() is None  # waits while every GPU is held
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    (gpu, _, _), err = finish(waiting, with_stderr=True)
    assert gpu in ("0", "1") and "are held by other jobs" in err and "waiting" in err
    other.kill()
    other.wait()


@pytest.mark.parametrize("visible", ["7", ""])
def test_nothing_to_choose_runs_the_command_as_it_is(tmp_path, visible):
    gpu, _, _ = finish(start(tmp_path, seconds=0, visible=visible))
    assert gpu == visible  # one GPU (a cluster job's own) or none: CUDA_VISIBLE_DEVICES untouched
    assert not (tmp_path / "locks").exists()


def test_without_cuda_visible_devices_it_asks_nvidia_smi(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text('#!/bin/sh\necho "GPU 0: NVIDIA H200 (UUID: GPU-a)"\necho "GPU 1: NVIDIA H200 (UUID: GPU-b)"\n')
    smi.chmod(0o755)
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    runs = [finish(p) for p in [start(tmp_path, visible=None, path=path) for _ in range(2)]]
    assert sorted(gpu for gpu, _, _ in runs) == ["0", "1"]
    # no nvidia-smi at all: no GPUs to choose from, the command runs as it is
    assert finish(start(tmp_path, seconds=0, visible=None, path=str(tmp_path / "empty")))[0] is None


def test_bad_usage(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for args, message in (([], "give the command after --"), (["--count", "0", "--", "true"], "--count must be at least 1")):
        done = subprocess.run([sys.executable, "-m", "stc.gpus", *args], env=env, capture_output=True, text=True)
        assert done.returncode == 2 and message in done.stderr
    done = subprocess.run([sys.executable, "-m", "stc.gpus", "--", "no-such-command-here"], env=env, capture_output=True, text=True)
    assert done.returncode == 127 and "cannot run 'no-such-command-here'" in done.stderr
    done = subprocess.run([sys.executable, "-m", "stc.gpus", "--", sys.executable, "-c", "raise SystemExit(3)"],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 3  # the command's own exit status
