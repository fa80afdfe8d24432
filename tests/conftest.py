"""Fixtures shared by the test modules."""

import pytest

from stc.models import build_model


@pytest.fixture(scope="module")
def tiny():
    """The tiny random LLaVA-OneVision and its processor (seed 0), built once per test module."""
    return build_model("tiny", seed=0)
