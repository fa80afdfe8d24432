"""Download and unpack the public benchmarks into the layout of `stc.paths`.

    python -m stc.benchmarks.download NAME [--root DIR] [--target DIR] [--no-videos]

NAME is one of streamingbench, ovobench, mlvu, egoschema, videomme, or all. Files come from
the Hugging Face hub through huggingface_hub (resumable: a rerun fetches only what is missing),
and annotation files hosted on GitHub through urllib. Archives are unpacked once (a marker file
records each one) and the videos moved to `Paths(root).videos_dir(name)`; the annotation lands
at `Paths(root).annotation_path(name)`, converted to the schema the loader reads where needed:
- streamingbench: mjuicem/StreamingBench, Real_Time_Visual_Understanding.csv and the
  "Real-Time Visual Understanding_*.zip" archives -> videos/sample_N/video.mp4.
- ovobench: data/ovo_bench_new.json from GitHub JoeLeelyf/OVO-Bench; videos from HF
  JoeLeelyf/OVO-Bench src_videos.tar.parta* (read as one concatenated tar) -> src_videos/.
- mlvu: HF MLVU/MVLU, the dev tasks' MLVU/json/*.json converted to the ReKV dev JSON
  (mlvu_dev_mc.json) and MLVU/video/<task_dir>/*.mp4.
- egoschema: questions.json + subset_answers.json from GitHub egoschema/EgoSchema converted to
  the ReKV subset JSON (500 questions with answers); videos from HF lmms-lab/egoschema zips.
- videomme: HF lmms-lab/Video-MME, videomme/test-*.parquet converted to JSON lines (needs a
  parquet engine such as pyarrow) and the videos_chunked_*.zip archives -> data/<videoID>.mp4.

Without network (a connection error, or HF_HUB_OFFLINE=1) every download raises DownloadError
saying what could not be fetched, how big it is, and what to run on a machine with network;
the `tiny` profile needs none of this (it runs on the synthetic suite).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from stc.paths import Paths, annotation_path_in, videos_dir_in


class DownloadError(RuntimeError):
    """A benchmark could not be fetched (no network, offline mode, access denied, ...)."""


@dataclass(frozen=True)
class DatasetSource:
    """Where a benchmark comes from. approx_size: rough size of what gets fetched."""

    name: str
    hf_repo: str
    approx_size: str
    description: str


SOURCES = MappingProxyType(
    {
        "streamingbench": DatasetSource(
            "streamingbench", "mjuicem/StreamingBench", "roughly 60 GB",
            "StreamingBench Real-Time Visual Understanding (500 videos, 2,500 questions)",
        ),
        "ovobench": DatasetSource(
            "ovobench", "JoeLeelyf/OVO-Bench", "about 44 GB",
            "OVO-Bench (644 videos, 12 tasks)",
        ),
        "mlvu": DatasetSource(
            "mlvu", "MLVU/MVLU", "roughly 200 GB (dev videos)",
            "MLVU dev multiple choice (1,242 videos, 2,172 questions)",
        ),
        "egoschema": DatasetSource(
            "egoschema", "lmms-lab/egoschema", "roughly 100 GB (all 5,031 videos are packed together)",
            "EgoSchema subset (500 questions with public answers)",
        ),
        "videomme": DatasetSource(
            "videomme", "lmms-lab/Video-MME", "roughly 100 GB",
            "Video-MME (900 videos, 2,700 questions)",
        ),
    }
)  # fmt: skip

OVO_ANNOTATION_URL = "https://raw.githubusercontent.com/JoeLeelyf/OVO-Bench/main/data/ovo_bench_new.json"
EGOSCHEMA_QUESTIONS_URL = "https://raw.githubusercontent.com/egoschema/EgoSchema/main/questions.json"
EGOSCHEMA_ANSWERS_URL = "https://raw.githubusercontent.com/egoschema/EgoSchema/main/subset_answers.json"
MLVU_DEV_TASK_DIRS = (
    "1_plotQA", "2_needle", "3_ego", "4_count", "5_order", "6_anomaly_reco", "7_topic_reasoning",
)  # fmt: skip


@dataclass
class DownloadReport:
    """What a download produced. Sizes in bytes."""

    name: str
    target: Path
    annotation: Path
    videos: Path
    fetched_bytes: int = 0
    on_disk_bytes: int = 0
    archives: list[Path] = field(default_factory=list)


def human_size(n_bytes: int) -> str:
    size = float(n_bytes)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    raise AssertionError("unreachable")


def folder_size(path: Path) -> int:
    """Total size of the files under `path` (0 if it does not exist)."""
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


# ---------------------------------------------------------------- network


def _offline_message(source: DatasetSource, what: str, cause: str) -> str:
    return (
        f"cannot download {source.description} ({what}; {source.approx_size} in all from "
        f"hf.co/datasets/{source.hf_repo}): {cause}. On a machine with network run "
        f"`python -m stc.benchmarks.download {source.name} --root DIR` (set HF_TOKEN if the dataset "
        "asks you to accept its terms) and copy DIR/data/benchmarks to this machine. "
        "The `tiny` profile needs no download: it runs offline on the synthetic suite."
    )


def _hub_offline() -> bool:
    import huggingface_hub.constants as hub_constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.strip().upper() in {"1", "ON", "YES", "TRUE"} or bool(hub_constants.HF_HUB_OFFLINE)


def _network_errors() -> tuple[type[BaseException], ...]:
    import httpx
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    return (
        ConnectionError, TimeoutError, urllib.error.URLError, httpx.TransportError,
        LocalEntryNotFoundError, OfflineModeIsEnabled,
    )  # fmt: skip


def _hf_snapshot(source: DatasetSource, local_dir: Path, allow_patterns: list[str]) -> Path:
    """snapshot_download of the matching files into local_dir (resumable), as DownloadError on failure."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    what = f"files {allow_patterns}"
    if _hub_offline():
        raise DownloadError(_offline_message(source, what, "HF_HUB_OFFLINE is set, so the hub cannot be reached"))
    try:
        huggingface_hub.snapshot_download(
            source.hf_repo, repo_type="dataset", local_dir=str(local_dir), allow_patterns=allow_patterns
        )
    except _network_errors() as error:
        cause = f"no connection ({type(error).__name__}: {error})"
        raise DownloadError(_offline_message(source, what, cause)) from error
    except HfHubHTTPError as error:
        raise DownloadError(
            f"the hub refused {source.hf_repo} ({error}); log in (`hf auth login` or HF_TOKEN) and accept "
            f"the dataset's terms at https://huggingface.co/datasets/{source.hf_repo}, then rerun"
        ) from error
    return local_dir


def _fetch_url(source: DatasetSource, url: str, destination: Path) -> Path:
    """Download `url` to `destination` (via a .part file) unless it is already there."""
    if destination.is_file() and destination.stat().st_size > 0:
        return destination
    if _hub_offline():
        raise DownloadError(_offline_message(source, url, "HF_HUB_OFFLINE is set: treating the machine as offline"))
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as handle:
            shutil.copyfileobj(response, handle)
    except urllib.error.HTTPError as error:  # reached the server, which refused: not an offline case
        partial.unlink(missing_ok=True)
        raise DownloadError(
            f"{url} answered HTTP {error.code} ({error.reason}); the file may have moved: look for it in "
            f"the project's repository and download it to {destination} by hand"
        ) from error
    except _network_errors() as error:
        partial.unlink(missing_ok=True)
        cause = f"no connection ({type(error).__name__}: {error})"
        raise DownloadError(_offline_message(source, url, cause)) from error
    partial.replace(destination)
    return destination


# ---------------------------------------------------------------- unpacking


def extract_zip(archive: Path, destination: Path) -> list[Path]:
    """Unpack a zip archive (member paths are sanitised by zipfile); returns the extracted files."""
    destination.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(archive) as bundle:
            names = [info.filename for info in bundle.infolist() if not info.is_dir()]
            bundle.extractall(destination)
    except zipfile.BadZipFile as error:
        raise DownloadError(f"{archive} is not a valid zip archive ({error}); delete it and download again") from error
    return [destination / name for name in names]


class _ConcatenatedParts(io.RawIOBase):
    """Read several files back to back as one stream (split archives, without joining them on disk)."""

    def __init__(self, parts: list[Path]) -> None:
        super().__init__()
        self._parts = list(parts)
        self._handle = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            if self._handle is None:
                if not self._parts:
                    return 0
                self._handle = open(self._parts.pop(0), "rb")
            n_read = self._handle.readinto(buffer)
            if n_read:
                return n_read
            self._handle.close()
            self._handle = None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        super().close()


def extract_tar_parts(parts: Iterable[Path], destination: Path, *, top_folder: str | None = None) -> list[Path]:
    """Unpack a tar archive split into parts (read in sorted name order) into `destination`.

    top_folder: members whose first path component differs are placed under this folder, so
    the archive lands in destination/top_folder whether or not it was packed with that folder.
    """
    parts = sorted(Path(p) for p in parts)
    if not parts:
        raise DownloadError("no archive parts to unpack")
    destination.mkdir(parents=True, exist_ok=True)
    extracted = []
    stream = io.BufferedReader(_ConcatenatedParts(parts), buffer_size=1 << 20)
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as bundle:
            for member in bundle:
                name = member.name
                while name.startswith("./"):  # an archive packed as "tar -C dir ." names its members ./...
                    name = name[2:]
                if name in ("", "."):
                    continue
                if top_folder and name.split("/", 1)[0] != top_folder:
                    name = f"{top_folder}/{name}"
                member.name = name
                bundle.extract(member, destination, filter="data")
                if member.isfile():
                    extracted.append(destination / member.name)
    except tarfile.TarError as error:
        raise DownloadError(
            f"cannot unpack {[p.name for p in parts]} ({error}); a part is missing or truncated: "
            "delete the parts and download again"
        ) from error
    finally:
        stream.close()
    return extracted


def _unpack_zip_once(archive: Path, target: Path, place: Callable[[Path], int]) -> None:
    """Unzip `archive` into a scratch folder and place(scratch) its videos, unless a marker says
    it was done before (so a rerun after an interruption skips finished archives)."""
    marker = target / ".unpacked" / f"{archive.name}.done"
    if marker.exists():
        return
    scratch = target / "_unpack" / archive.stem
    shutil.rmtree(scratch, ignore_errors=True)
    extract_zip(archive, scratch)
    place(scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("unpacked\n")


def _move(source: Path, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    if destination.exists():
        shutil.rmtree(destination) if destination.is_dir() else destination.unlink()
    shutil.move(str(source), str(destination))


def place_streamingbench_videos(unpacked: Path, videos_dir: Path) -> int:
    """Move every sample_N/video.mp4 (or a flat sample_N.mp4) found under `unpacked` to
    videos_dir/sample_N/video.mp4; returns how many videos were placed."""
    moved = 0
    for found in sorted(unpacked.rglob("sample_*")):
        if found.is_dir() and re.fullmatch(r"sample_\d+", found.name) and (found / "video.mp4").exists():
            _move(found, videos_dir / found.name)
            moved += 1
        elif found.is_file() and re.fullmatch(r"sample_\d+\.mp4", found.name):
            _move(found, videos_dir / found.stem / "video.mp4")
            moved += 1
    return moved


def place_flat_videos(unpacked: Path, videos_dir: Path) -> int:
    """Move every .mp4 under `unpacked` to videos_dir/<file name>; returns how many."""
    moved = 0
    for video in sorted(unpacked.rglob("*.mp4")):
        _move(video, videos_dir / video.name)
        moved += 1
    return moved


# ---------------------------------------------------------------- annotation conversion


def mlvu_native_to_dev_json(json_dir: Path, task_dirs: Iterable[str] = MLVU_DEV_TASK_DIRS) -> list[dict]:
    """MLVU's per-task JSON ({video, duration, question, candidates, answer, question_type}) ->
    the ReKV dev JSON (one entry per video with its conversations; video_path <task_dir>/<video>)."""
    entries: dict[str, dict] = {}
    for task_dir in task_dirs:
        path = json_dir / f"{task_dir}.json"
        if not path.is_file():
            raise DownloadError(f"MLVU annotation {path} is missing; the download is incomplete: rerun it")
        for record in json.loads(path.read_text(encoding="utf-8")):
            video_path = f"{task_dir}/{record['video']}"
            entry = entries.setdefault(
                video_path,
                {"video_id": Path(record["video"]).stem, "video_path": video_path,
                 "duration": record.get("duration"), "conversations": []},
            )  # fmt: skip
            entry["conversations"].append(
                {"question": record["question"], "choices": record["candidates"],
                 "answer": record["answer"], "question_type": record["question_type"]}
            )  # fmt: skip
    return list(entries.values())


def egoschema_subset_json(questions: list[dict], answers: dict[str, int]) -> list[dict]:
    """EgoSchema questions.json + subset_answers.json -> the ReKV subset JSON (answer = index)."""
    by_uid = {q["q_uid"]: q for q in questions}
    missing = sorted(set(answers) - set(by_uid))
    if missing:
        raise DownloadError(f"EgoSchema subset answers name {len(missing)} questions absent from questions.json")
    entries = []
    for uid, answer in answers.items():
        question = by_uid[uid]
        entries.append(
            {"video_id": uid, "video_path": f"{uid}.mp4", "duration": 180.0,
             "conversations": [{"question_idx": uid, "question": question["question"],
                                "choices": [question[f"option {i}"] for i in range(5)], "answer": int(answer)}]}
        )  # fmt: skip
    return entries


def videomme_parquet_to_jsonl(parquet_path: Path, jsonl_path: Path) -> int:
    """Rewrite the Video-MME parquet as JSON lines (one row per line); returns the row count."""
    import pandas as pd

    try:
        frame = pd.read_parquet(parquet_path)
    except ImportError as error:
        raise DownloadError(
            f"converting {parquet_path} needs a parquet engine: `pip install pyarrow`, then rerun the download"
        ) from error
    jsonl_path.parent.mkdir(parents=True, exist_ok=True)
    with open(jsonl_path, "w", encoding="utf-8") as handle:
        for row in frame.to_dict(orient="records"):
            row = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in row.items()}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(frame)


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    partial.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    partial.replace(path)


# ---------------------------------------------------------------- per benchmark


def _download_streamingbench(source: DatasetSource, target: Path, videos: bool) -> list[Path]:
    hub_dir = target / "_hf"
    patterns = ["*Real_Time_Visual_Understanding.csv"] + (["*Real-Time Visual Understanding_*.zip"] if videos else [])
    _hf_snapshot(source, hub_dir, patterns)
    csv_files = sorted(hub_dir.rglob("Real_Time_Visual_Understanding.csv"))
    if not csv_files:
        raise DownloadError(f"{source.hf_repo} has no Real_Time_Visual_Understanding.csv; the dataset layout changed")
    shutil.copyfile(csv_files[0], annotation_path_in(target, "streamingbench"))
    archives = sorted(hub_dir.rglob("Real-Time Visual Understanding_*.zip"))
    videos_dir = videos_dir_in(target, "streamingbench")
    for archive in archives:
        _unpack_zip_once(archive, target, lambda scratch: place_streamingbench_videos(scratch, videos_dir))
    return archives


def _download_ovobench(source: DatasetSource, target: Path, videos: bool) -> list[Path]:
    _fetch_url(source, OVO_ANNOTATION_URL, annotation_path_in(target, "ovobench"))
    if not videos:
        return []
    hub_dir = target / "_hf"
    _hf_snapshot(source, hub_dir, ["src_videos.tar.parta*", "*/src_videos.tar.parta*"])
    parts = sorted(hub_dir.rglob("src_videos.tar.parta*"))
    if not parts:
        raise DownloadError(f"{source.hf_repo} has no src_videos.tar.parta* files; the dataset layout changed")
    marker = target / ".unpacked" / "src_videos.tar.done"
    if not marker.exists():
        extract_tar_parts(parts, target, top_folder="src_videos")
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("unpacked\n")
    return parts


def _download_mlvu(source: DatasetSource, target: Path, videos: bool) -> list[Path]:
    patterns = ["MLVU/json/*.json"] + ([f"MLVU/video/{d}/*" for d in MLVU_DEV_TASK_DIRS] if videos else [])
    _hf_snapshot(source, target, patterns)
    found = sorted(target.rglob(f"{MLVU_DEV_TASK_DIRS[0]}.json"))
    if not found:
        raise DownloadError(
            f"{source.hf_repo} has no MLVU/json/{MLVU_DEV_TASK_DIRS[0]}.json; the dataset layout changed"
        )
    _write_json(annotation_path_in(target, "mlvu"), mlvu_native_to_dev_json(found[0].parent))
    return []


def _download_egoschema(source: DatasetSource, target: Path, videos: bool) -> list[Path]:
    raw = target / "_github"
    questions = json.loads(_fetch_url(source, EGOSCHEMA_QUESTIONS_URL, raw / "questions.json").read_text())
    answers = json.loads(_fetch_url(source, EGOSCHEMA_ANSWERS_URL, raw / "subset_answers.json").read_text())
    _write_json(annotation_path_in(target, "egoschema"), egoschema_subset_json(questions, answers))
    if not videos:
        return []
    hub_dir = target / "_hf"
    _hf_snapshot(source, hub_dir, ["videos_chunked_*.zip", "*/videos_chunked_*.zip"])
    archives = sorted(hub_dir.rglob("videos_chunked_*.zip"))
    videos_dir = videos_dir_in(target, "egoschema")
    for archive in archives:
        _unpack_zip_once(archive, target, lambda scratch: place_flat_videos(scratch, videos_dir))
    return archives


def _download_videomme(source: DatasetSource, target: Path, videos: bool) -> list[Path]:
    hub_dir = target / "_hf"
    patterns = ["videomme/test-*.parquet"] + (["videos_chunked_*.zip"] if videos else [])
    _hf_snapshot(source, hub_dir, patterns)
    parquets = sorted(hub_dir.rglob("test-*.parquet"))
    if not parquets:
        raise DownloadError(f"{source.hf_repo} has no videomme/test-*.parquet; the dataset layout changed")
    videomme_parquet_to_jsonl(parquets[0], annotation_path_in(target, "videomme"))
    archives = sorted(hub_dir.rglob("videos_chunked_*.zip"))
    videos_dir = videos_dir_in(target, "videomme")
    for archive in archives:
        _unpack_zip_once(archive, target, lambda scratch: place_flat_videos(scratch, videos_dir))
    return archives


_DOWNLOADERS = MappingProxyType(
    {
        "streamingbench": _download_streamingbench,
        "ovobench": _download_ovobench,
        "mlvu": _download_mlvu,
        "egoschema": _download_egoschema,
        "videomme": _download_videomme,
    }
)


def download(
    name: str, root: str | Path | None = None, *, target: str | Path | None = None, videos: bool = True
) -> DownloadReport:
    """Fetch and unpack benchmark `name`; returns where everything is and how big it is.

    root: the project root whose Paths(root).benchmark_dir(name) receives the files (default:
        STC_ROOT or the repository root); target: another folder to use instead.
    videos: False fetches only the annotations.
    Raises DownloadError without network (see the module docstring).
    """
    if name not in SOURCES:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {sorted(SOURCES)}")
    source = SOURCES[name]
    paths = Paths(Path(root)) if root is not None else Paths()
    target_dir = Path(target) if target is not None else paths.benchmark_dir(name)
    target_dir.mkdir(parents=True, exist_ok=True)
    archives = _DOWNLOADERS[name](source, target_dir, videos)
    return DownloadReport(
        name=name,
        target=target_dir,
        annotation=annotation_path_in(target_dir, name),
        videos=videos_dir_in(target_dir, name),
        fetched_bytes=sum(a.stat().st_size for a in archives if a.exists()),
        on_disk_bytes=folder_size(target_dir),
        archives=archives,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stc.benchmarks.download", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=[*SOURCES, "all"], help="benchmark to fetch")
    parser.add_argument("--root", type=Path, default=None, help="project root (default: STC_ROOT or the repository)")
    parser.add_argument("--target", type=Path, default=None, help="folder to fill instead of the root's layout")
    parser.add_argument("--no-videos", action="store_true", help="fetch the annotations only")
    args = parser.parse_args(argv)
    names = list(SOURCES) if args.name == "all" else [args.name]
    if args.target is not None and len(names) > 1:
        parser.error("--target names one benchmark's folder; use --root with 'all'")
    for name in names:
        print(f"{name}: {SOURCES[name].description}, {SOURCES[name].approx_size}", flush=True)
        try:
            report = download(name, args.root, target=args.target, videos=not args.no_videos)
        except DownloadError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(
            f"{name}: annotation {report.annotation}\n{name}: videos {report.videos}\n"
            f"{name}: archives {human_size(report.fetched_bytes)}, folder {human_size(report.on_disk_bytes)}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
