"""Give a command GPUs of its own on a machine with several: ``python -m stc.gpus [--count N] -- CMD ...``.

Snakemake's ``--resources gpu=N`` only limits how many GPU jobs run at once: every job would still run
on the first GPU. The workflow's GPU rules therefore start their command through this module. It picks
`count` GPUs that no other job holds, sets CUDA_VISIBLE_DEVICES to them and replaces itself with the
command (exec), so signals and the exit status are the command's own. A GPU is held by an exclusive
lock on a file, one per GPU in the lock folder, which the command's process keeps open: the GPU is
given back when the command ends, however it ends (killed too). When every GPU is held, it waits.

The GPUs to choose from: those CUDA_VISIBLE_DEVICES names where it is set (a cluster's allocation, or
the user's choice), else every GPU that ``nvidia-smi -L`` lists. Where there are no more than `count`
of them (one GPU, a cluster job's own GPUs, or none), the command runs as it is, without locks.

With --exclusive a job runs alone, for timing: it waits until no other job holds a GPU, holds all of
them while it runs (new jobs wait for it), and sees the first `count` as its own.

Locks are per user (the default folder is in the temporary directory, named after the user), so they
keep one user's jobs apart, not different users'.
"""

from __future__ import annotations

import argparse
import fcntl
import getpass
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def default_lock_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"stc-gpu-locks-{getpass.getuser()}"


def visible_gpus() -> list[str]:
    """The GPUs a job may use: the entries of CUDA_VISIBLE_DEVICES where it is set (empty: none), else
    the indices `nvidia-smi -L` lists (none where it is missing or fails)."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [gpu.strip() for gpu in given.split(",") if gpu.strip()]
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if listed.returncode != 0:
        return []
    return re.findall(r"^GPU (\d+):", listed.stdout, flags=re.MULTILINE)


def _lock_file(lock_dir: Path, gpu: str) -> Path:
    return lock_dir / f"gpu-{re.sub(r'[^A-Za-z0-9._-]', '_', gpu)}.lock"


def _try_lock(path: Path, mode: int) -> int | None:
    """An open descriptor of path holding a flock of `mode` (LOCK_EX or LOCK_SH), or None where another
    process holds a conflicting one."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def acquire(gpus: list[str], count: int, lock_dir: Path, poll: float = 2.0,
            exclusive: bool = False) -> tuple[list[str], list[int]]:
    """Lock `count` of `gpus` that no other process holds (exclusive: all of them, and the gate that keeps
    new jobs waiting), waiting (polling every `poll` s) until they are free. Returns the chosen GPUs and
    the open file descriptors holding the locks, which last as long as the descriptors stay open in some
    process: ([gpu, ...], [fd, ...])."""
    if not 1 <= count <= len(gpus):
        raise ValueError(f"cannot hold {count} of the {len(gpus)} GPUs {gpus}")
    lock_dir.mkdir(parents=True, exist_ok=True)
    gate = lock_dir / "gate.lock"
    told, gate_fd = False, None
    while True:
        if exclusive:
            if gate_fd is None:
                gate_fd = _try_lock(gate, fcntl.LOCK_EX)  # from here on, new jobs wait
            open_gate = gate_fd is not None
        else:  # pass only while no exclusive job holds the gate
            passing = _try_lock(gate, fcntl.LOCK_SH)
            open_gate = passing is not None
            if open_gate:
                os.close(passing)
        held = []
        for gpu in gpus if open_gate else ():
            fd = _try_lock(_lock_file(lock_dir, gpu), fcntl.LOCK_EX)
            if fd is not None:
                held.append((gpu, fd))
                # Who holds it, for people; writing also keeps the file new, so that a cleaner of old files
                # in the temporary directory never deletes a held lock (a new job would lock a new file).
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
            if len(held) == (len(gpus) if exclusive else count):
                chosen = [g for g, _ in held][:count]
                return chosen, [fd for _, fd in held] + ([gate_fd] if exclusive else [])
        for _, fd in held:  # not all needed are free: give back the partial set and wait
            os.close(fd)
        if not told:
            what = "an exclusive job holds or waits for them" if not open_gate else "other jobs hold them"
            print(f"stc.gpus: waiting for GPUs {','.join(gpus)}: {what} (locks in {lock_dir})", file=sys.stderr, flush=True)
            told = True
        time.sleep(poll)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stc.gpus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, usage="python -m stc.gpus [--count N] [--exclusive] [--lock-dir DIR] -- COMMAND [ARG ...]")
    parser.add_argument("--count", type=int, default=1, help="GPUs the command needs (default 1)")
    parser.add_argument("--lock-dir", type=Path, default=None, help=f"lock folder (default {default_lock_dir()})")
    parser.add_argument("--poll", type=float, default=2.0, help="seconds between tries while every GPU is held")
    parser.add_argument("--exclusive", action="store_true", help="run alone: hold every GPU, wait for the others' jobs")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --, e.g. python -m stc.gpus -- python -m papermill in.ipynb out.ipynb")
    if args.count < 1:
        parser.error(f"--count must be at least 1, got {args.count}")
    gpus = visible_gpus()
    if len(gpus) > args.count:
        chosen, fds = acquire(gpus, args.count, args.lock_dir or default_lock_dir(), args.poll, args.exclusive)
        for fd in fds:
            os.set_inheritable(fd, True)  # the command's process keeps the locks
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(chosen)
        alone = ", alone (every GPU held)" if args.exclusive else ""
        print(f"stc.gpus: GPU {','.join(chosen)} of {','.join(gpus)}{alone} for: {' '.join(command)[:200]}",
              file=sys.stderr, flush=True)
    try:
        os.execvp(command[0], command)
    except OSError as error:
        print(f"stc.gpus: cannot run {command[0]!r}: {error}", file=sys.stderr)
        sys.exit(127)


if __name__ == "__main__":
    main()
