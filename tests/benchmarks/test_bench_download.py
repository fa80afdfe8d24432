import fnmatch
import io
import json
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import httpx
import huggingface_hub
import huggingface_hub.constants
import pytest
from bench_helpers import FIXTURES, write_mp4

from stc.benchmarks.download import (
    SOURCES,
    DownloadError,
    download,
    egoschema_subset_json,
    extract_tar_parts,
    human_size,
    main,
    mlvu_native_to_dev_json,
    videomme_parquet_to_jsonl,
)
from stc.benchmarks.loaders import load_benchmark, load_egoschema, load_mlvu
from stc.video import load_video

NAMES = list(SOURCES)


@pytest.fixture
def no_network(monkeypatch):
    """Every network entry point fails like a machine without network; returns the attempts."""
    attempts = []

    def fail_urlopen(url, *args, **kwargs):
        attempts.append(url)
        raise urllib.error.URLError("[Errno 101] Network is unreachable")

    def fail_snapshot(repo_id, **kwargs):
        attempts.append(repo_id)
        raise httpx.ConnectError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", fail_urlopen)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail_snapshot)
    return attempts


@pytest.fixture
def online(monkeypatch):
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.mark.parametrize("name", NAMES)
def test_offline_mode_fails_clearly_without_touching_the_network(name, tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError) as caught:
        download(name, target=tmp_path / name)
    message = str(caught.value)
    source = SOURCES[name]
    for part in (source.description, source.approx_size, source.hf_repo, f"python -m stc.benchmarks.download {name}",
                 "HF_HUB_OFFLINE", "tiny"):  # fmt: skip
        assert part in message, (part, message)
    assert no_network == []


@pytest.mark.parametrize("name", NAMES)
def test_connection_errors_become_download_errors(name, tmp_path, online, no_network):
    with pytest.raises(DownloadError, match="no connection .*Network is unreachable") as caught:
        download(name, target=tmp_path / name)
    assert "synthetic suite" in str(caught.value) and no_network  # it did try, and failed cleanly


def test_cli_reports_offline_failure(tmp_path, monkeypatch, capsys, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["ovobench", "--target", str(tmp_path / "ovo")]) == 1
    assert "error: cannot download OVO-Bench" in capsys.readouterr().err


# ---------------------------------------------------------------- unpacking, with a fake hub


def fake_hub(monkeypatch, files: dict[str, bytes]):
    """snapshot_download serving `files` (repo path -> content), honouring allow_patterns."""
    calls = []

    def snapshot(repo_id, *, repo_type=None, local_dir=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, repo_type, tuple(allow_patterns)))
        for name, content in files.items():
            if any(fnmatch.fnmatch(name, pattern) for pattern in allow_patterns):
                path = Path(local_dir) / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content)
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    return calls


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for name, content in members.items():
            bundle.writestr(name, content)
    return buffer.getvalue()


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as bundle:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            bundle.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def test_streamingbench_download_unpacks_into_the_loader_layout(tmp_path, monkeypatch, online):
    video = write_mp4(tmp_path / "src.mp4", n_frames=8, fps=4).read_bytes()
    archive = zip_bytes({
        "Real-Time Visual Understanding_1-12/sample_1/video.mp4": video,
        "Real-Time Visual Understanding_1-12/sample_12/video.mp4": video,
    })  # fmt: skip
    calls = fake_hub(monkeypatch, {
        "StreamingBench/Real_Time_Visual_Understanding.csv": (FIXTURES / "streamingbench" /
                                                             "Real_Time_Visual_Understanding.csv").read_bytes(),
        "StreamingBench/Real-Time Visual Understanding_1-12.zip": archive,
        "StreamingBench/Omni_Source_Understanding.csv": b"not wanted",
    })  # fmt: skip
    report = download("streamingbench", target=tmp_path / "sb")
    assert calls[0][:2] == ("mjuicem/StreamingBench", "dataset")
    questions = load_benchmark("streamingbench", report.annotation)
    assert len(questions) == 6
    for question in questions:
        assert load_video(report.videos / question.video).frames.shape[0] == 1  # 2 s at 0.5 fps
    assert not (tmp_path / "sb" / "_unpack" / "Real-Time Visual Understanding_1-12").exists()
    assert report.fetched_bytes == len(archive) and report.on_disk_bytes > 2 * len(video)
    # A rerun skips archives it has unpacked already (the marker), even if the zip went bad.
    (tmp_path / "sb" / "_hf" / "StreamingBench" / "Real-Time Visual Understanding_1-12.zip").write_bytes(b"junk")
    fake_hub(monkeypatch, {})
    download("streamingbench", target=tmp_path / "sb")
    assert (report.videos / "sample_12" / "video.mp4").read_bytes() == video


def test_ovobench_download_joins_tar_parts(tmp_path, monkeypatch, online):
    video = write_mp4(tmp_path / "src.mp4", n_frames=8, fps=4).read_bytes()
    tar = tar_bytes({"src_videos/COIN/Yc1YYQWzLfE.mp4": video, "src_videos/AutoEvalMetaData/248.mp4": video})
    third = len(tar) // 3 + 1
    parts = {f"src_videos.tar.parta{c}": tar[i * third : (i + 1) * third] for i, c in enumerate("abc")}
    fake_hub(monkeypatch, parts)
    annotation = (FIXTURES / "ovobench" / "ovo_bench_new.json").read_bytes()
    requested = []

    def urlopen(url, timeout=None):
        requested.append(url)
        return io.BytesIO(annotation)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    report = download("ovobench", target=tmp_path / "ovo")
    assert requested == ["https://raw.githubusercontent.com/JoeLeelyf/OVO-Bench/main/data/ovo_bench_new.json"]
    assert report.annotation.read_bytes() == annotation
    assert (report.videos / "COIN" / "Yc1YYQWzLfE.mp4").read_bytes() == video
    assert len(load_benchmark("ovobench", report.annotation)) == 14


def test_extract_tar_parts_adds_a_missing_top_folder_and_rejects_broken_parts(tmp_path):
    tar = tar_bytes({"COIN/a.mp4": b"a" * 5000, "thumos/b.mp4": b"bb"})
    for i, start in enumerate(range(0, len(tar), 1000)):
        (tmp_path / f"x.tar.part{i:02d}").write_bytes(tar[start : start + 1000])
    parts = sorted(tmp_path.glob("x.tar.part*"), reverse=True)  # order is restored by name
    extracted = extract_tar_parts(parts, tmp_path / "out", top_folder="src_videos")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in extracted) == [
        "src_videos/COIN/a.mp4", "src_videos/thumos/b.mp4"]  # fmt: skip
    assert (tmp_path / "out" / "src_videos" / "thumos" / "b.mp4").read_bytes() == b"bb"
    assert (tmp_path / "out" / "src_videos" / "COIN" / "a.mp4").read_bytes() == b"a" * 5000
    first_parts = sorted(parts)[:4]  # the download stopped inside a.mp4
    with pytest.raises(DownloadError, match="missing or truncated"):
        extract_tar_parts(first_parts, tmp_path / "out2")


@pytest.mark.parametrize("prefix", ["", "./", "./src_videos/"])
def test_extract_tar_parts_places_dot_prefixed_members_once(prefix, tmp_path):
    """Members named "./COIN/a.mp4" or "./src_videos/COIN/a.mp4" land in src_videos/COIN/a.mp4, not in a
    nested src_videos/./src_videos."""
    (tmp_path / "x.tar.part00").write_bytes(tar_bytes({f"{prefix}COIN/a.mp4": b"a", f"{prefix}thumos/b.mp4": b"b"}))
    extracted = extract_tar_parts([tmp_path / "x.tar.part00"], tmp_path / "out", top_folder="src_videos")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in extracted) == ["src_videos/COIN/a.mp4", "src_videos/thumos/b.mp4"]
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.mp4")) == [
        "src_videos/COIN/a.mp4", "src_videos/thumos/b.mp4"]  # fmt: skip


def test_mlvu_native_json_converts_to_the_dev_schema(tmp_path):
    json_dir = tmp_path / "MLVU" / "json"
    json_dir.mkdir(parents=True)
    native = {
        "1_plotQA": [{"video": "movie101_66.mp4", "duration": 246, "question": "What colour is the car?",
                      "candidates": ["Red", "Blue", "Black", "White"], "answer": "Black", "question_type": "plotQA"},
                     {"video": "movie101_66.mp4", "duration": 246, "question": "Who drives?",
                      "candidates": ["A man", "A woman"], "answer": "A man", "question_type": "plotQA"}],
        "4_count": [{"video": "count_6.mp4", "duration": 480, "question": "How many jumps?",
                     "candidates": ["4", "5", "3", "1"], "answer": "3", "question_type": "count"}],
    }  # fmt: skip
    for task_dir in ("1_plotQA", "2_needle", "3_ego", "4_count", "5_order", "6_anomaly_reco", "7_topic_reasoning"):
        (json_dir / f"{task_dir}.json").write_text(json.dumps(native.get(task_dir, [])))
    entries = mlvu_native_to_dev_json(json_dir)
    path = tmp_path / "mlvu_dev_mc.json"
    path.write_text(json.dumps(entries))
    questions = {q.qid: q for q in load_mlvu(path)}
    assert set(questions) == {"1_plotQA/movie101_66#0", "1_plotQA/movie101_66#1", "4_count/count_6#0"}
    assert questions["1_plotQA/movie101_66#0"].video == "1_plotQA/movie101_66.mp4" and questions["1_plotQA/movie101_66#0"].answer == "C"
    assert questions["4_count/count_6#0"].answer == "C" and questions["4_count/count_6#0"].task == "count"
    (json_dir / "5_order.json").unlink()
    with pytest.raises(DownloadError, match="5_order.json is missing"):
        mlvu_native_to_dev_json(json_dir)


def test_egoschema_github_files_convert_to_the_subset_schema(tmp_path):
    questions = [{"q_uid": uid, "google_drive_id": "x", "question": f"What does c do in {uid}?",
                  **{f"option {i}": f"option {i} of {uid}" for i in range(5)}} for uid in ("u1", "u2", "u3")]  # fmt: skip
    path = tmp_path / "egoschema_subset.json"
    path.write_text(json.dumps(egoschema_subset_json(questions, {"u2": 4, "u1": 0})))
    loaded = load_egoschema(path)
    assert [(q.qid, q.video, q.answer) for q in loaded] == [("u2", "u2.mp4", "E"), ("u1", "u1.mp4", "A")]
    with pytest.raises(DownloadError, match="absent from questions.json"):
        egoschema_subset_json(questions, {"u9": 1})


def test_videomme_parquet_conversion(tmp_path):
    rows = [json.loads(line) for line in (FIXTURES / "videomme" / "test-00000-of-00001.jsonl").read_text().splitlines()]
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        (tmp_path / "t.parquet").write_bytes(b"PAR1")
        with pytest.raises(DownloadError, match="pip install pyarrow"):
            videomme_parquet_to_jsonl(tmp_path / "t.parquet", tmp_path / "t.jsonl")
        return
    import pandas as pd

    pd.DataFrame(rows).to_parquet(tmp_path / "t.parquet")
    assert videomme_parquet_to_jsonl(tmp_path / "t.parquet", tmp_path / "t.jsonl") == len(rows)
    assert [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()] == rows


def test_human_size_and_unknown_name(tmp_path):
    assert human_size(512) == "512 B" and human_size(1536) == "1.5 KB" and human_size(3 * 1024**3) == "3.0 GB"
    with pytest.raises(ValueError, match="unknown benchmark"):
        download("kinetics", target=tmp_path)


def test_cli_prints_sizes(tmp_path, monkeypatch, capsys, online):
    fake_hub(monkeypatch, {"Real_Time_Visual_Understanding.csv":
                           (FIXTURES / "streamingbench" / "Real_Time_Visual_Understanding.csv").read_bytes()})  # fmt: skip
    assert main(["streamingbench", "--target", str(tmp_path / "sb"), "--no-videos"]) == 0
    out = capsys.readouterr().out
    assert "annotation" in out and "folder" in out and "KB" in out


def test_http_refusal_is_not_reported_as_offline(tmp_path, monkeypatch, online):
    def not_found(url, timeout=None):
        raise urllib.error.HTTPError(url, 404, "Not Found", None, None)

    monkeypatch.setattr(urllib.request, "urlopen", not_found)
    with pytest.raises(DownloadError, match="HTTP 404") as caught:
        download("ovobench", target=tmp_path / "ovo", videos=False)
    assert "no connection" not in str(caught.value)


def test_streamingbench_placing_accepts_nested_and_flat_archives(tmp_path):
    from stc.benchmarks.download import place_streamingbench_videos

    unpacked = tmp_path / "unpacked"
    (unpacked / "Real-Time Visual Understanding_1-50" / "sample_3").mkdir(parents=True)
    (unpacked / "Real-Time Visual Understanding_1-50" / "sample_3" / "video.mp4").write_bytes(b"3")
    (unpacked / "flat").mkdir()
    (unpacked / "flat" / "sample_7.mp4").write_bytes(b"7")
    (unpacked / "flat" / "sample_notes.txt").write_bytes(b"x")
    assert place_streamingbench_videos(unpacked, tmp_path / "videos") == 2
    assert (tmp_path / "videos" / "sample_3" / "video.mp4").read_bytes() == b"3"
    assert (tmp_path / "videos" / "sample_7" / "video.mp4").read_bytes() == b"7"
