"""Shared fixtures. Tests run on CPU; the official parity data lives in tests/fixtures/."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL = ["tiny_fp32", "tiny_bf16_sharded"]
REPO = Path(__file__).parent.parent


@pytest.fixture(params=OFFICIAL)
def official(request):
    """(fixture directory, expected arrays) for each checkpoint made with the official code."""
    d = FIXTURES / request.param
    return d, dict(np.load(d / "expected.npz"))


def rel_l2(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))
