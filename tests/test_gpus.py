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


def start(tmp_path, seconds=0.5, visible="3,5", count=1, path=None, exclusive=False):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    if path is not None:
        env["PATH"] = path
    command = [sys.executable, "-m", "stc.gpus", "--count", str(count), "--lock-dir", str(tmp_path / "locks"),
               "--poll", "0.05", *(["--exclusive"] if exclusive else []), "--", sys.executable, "-c", JOB.format(seconds=seconds)]
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


def held_gpus(lock_dir):
    """The GPUs whose lock another process holds now."""
    held = []
    for path in sorted(lock_dir.glob("gpu-*.lock")) if lock_dir.exists() else []:
        with open(path) as handle:  # closing the file gives a probe's lock back
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held.append(path.name[len("gpu-") : -len(".lock")])
    return held


def gate_closed(lock_dir):
    """Whether an exclusive job holds the gate (new jobs wait)."""
    gate = lock_dir / "gate.lock"
    if not gate.exists():
        return False
    with open(gate) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


def wait_until(condition, timeout=60):
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"not reached within {timeout} s")
        time.sleep(0.05)


def test_a_killed_job_gives_its_gpu_back(tmp_path):
    holder = start(tmp_path, seconds=60, visible="0,1")
    other = start(tmp_path, seconds=60, visible="0,1")
    wait_until(lambda: held_gpus(tmp_path / "locks") == ["0", "1"])

    def holders():  # each lock file says who holds it
        texts = [(tmp_path / "locks" / f"gpu-{gpu}.lock").read_text() for gpu in "01"]
        return {int(text.split()[1]) for text in texts if text.startswith("pid ")}

    wait_until(lambda: holders() == {holder.pid, other.pid})
    waiting = start(tmp_path, seconds=0, visible="0,1")
    time.sleep(0.5)
    assert waiting.poll() is None  # waits while every GPU is held
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    (gpu, _, _), err = finish(waiting, with_stderr=True)
    assert gpu in ("0", "1") and "waiting for GPUs 0,1: other jobs hold them" in err
    other.kill()
    other.wait()


def test_an_exclusive_job_runs_alone(tmp_path):
    """For timing: it waits for the running jobs, and jobs started after it wait until it ends."""
    before = [start(tmp_path, seconds=1.0, visible="0,1,2") for _ in range(2)]
    wait_until(lambda: len(held_gpus(tmp_path / "locks")) == 2)
    alone = start(tmp_path, seconds=1.0, visible="0,1,2", exclusive=True)
    wait_until(lambda: gate_closed(tmp_path / "locks"))  # it holds the gate while it waits for GPUs 0 and 1
    after = [start(tmp_path, seconds=0.3, visible="0,1,2") for _ in range(3)]
    (gpu, alone_start, alone_end), err = finish(alone, with_stderr=True)
    assert gpu == "0" and "alone (every GPU held)" in err and "other jobs hold them" in err
    assert all(end <= alone_start for _, _, end in map(finish, before))
    assert all(begin >= alone_end for _, begin, _ in map(finish, after))  # GPU 2 was free, yet they waited


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
