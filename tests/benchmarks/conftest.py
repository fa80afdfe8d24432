"""Fixtures of the benchmark tests."""

import pytest
from bench_helpers import write_mp4


@pytest.fixture
def mp4(tmp_path):
    """Factory: mp4(name, **write_mp4 kwargs) -> path of a fresh test video under tmp_path."""

    def make(name: str = "video.mp4", **kwargs):
        return write_mp4(tmp_path / name, **kwargs)

    return make
