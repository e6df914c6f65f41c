"""Shared fixtures: tiny random checkpoints, built once per test session (offline)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # CI has no hub; fail fast, never wait on retries
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> str:
    from llava_nb.testing import make_tiny_llava

    return make_tiny_llava(tmp_path_factory.mktemp("tiny") / "llava", "llava")


@pytest.fixture(scope="session")
def tiny_llava_next(tmp_path_factory) -> str:
    from llava_nb.testing import make_tiny_llava

    return make_tiny_llava(tmp_path_factory.mktemp("tiny") / "llava_next", "llava_next")


@pytest.fixture
def photo():
    """A real photo that ships with matplotlib (Grace Hopper), as a PIL image."""
    import matplotlib.cbook
    from PIL import Image

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        return Image.open(f).convert("RGB")
