"""Shared fixtures. Tests run on CPU; the official parity data lives in tests/fixtures/."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# 8 virtual CPU devices for mesh tests, set before jax is imported; single-device code uses device 0.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
# One persistent compilation cache per test run, shared by the xdist workers and the CLIs the tests start (they
# inherit the variable): the tiny programs many tests compile alike are compiled once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"rdlm-tests-xla-cache-{os.environ.get('PYTEST_XDIST_TESTRUNUID', os.getpid())}"))

import re  # noqa: E402
import shutil  # noqa: E402
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


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
    """A 512-piece sentencepiece model trained on the bundled Shakespeare training documents."""
    from rdlm.config import DataConfig
    from rdlm.data import load_documents, split_documents
    from rdlm.tokenizer import train_tokenizer

    docs, _ = split_documents(load_documents(DataConfig()), DataConfig().val_fraction)
    return str(train_tokenizer(docs, tmp_path_factory.mktemp("tok") / "sp", 512))


@pytest.fixture
def train_overrides(tokenizer_path, tmp_path):
    """Overrides that make the tiny preset trainable on the bundled corpus in seconds."""
    return ["model.vocab_size=512", f"data.tokenizer={tokenizer_path}", f"train.out_dir={tmp_path / 'run'}",
            "data.prefetch=0"]


CHAT_BLOCK = 64  # chat_checkpoint's context


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory) -> Path:
    """The tiny official fixture as an rdlm checkpoint carrying the HF test tokenizer (with its chat template),
    its context widened to 64 tokens (RoPE: no parameter depends on it)."""
    from rdlm.convert import convert

    ckpt = tmp_path_factory.mktemp("harness") / "ckpt"
    convert(FIXTURES / "tiny_fp32", ckpt)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(FIXTURES / "hf_tokenizer" / name, ckpt / name)
    config = ckpt / "config.yml"
    config.write_text(re.sub(r"block_size: 32\b", f"block_size: {CHAT_BLOCK}", config.read_text()))
    return ckpt
