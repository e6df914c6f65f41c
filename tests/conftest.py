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


CHROMIUM = "/usr/bin/chromium"  # Debian's package; Playwright downloads no browser of its own
CHROMIUM_FLAGS = [  # this machine's network is closed: no background connections, no sandbox
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def browser():
    """Headless Debian Chromium driven by Playwright. Missing: a failure where end-to-end
    tests are required (LLAVA_NB_E2E=1, as in CI), a skip elsewhere."""
    if not os.path.exists(CHROMIUM):
        message = f"{CHROMIUM} not found: apt-get install chromium"
        if os.environ.get("LLAVA_NB_E2E") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS
        )
        yield chromium
        chromium.close()


# The reduced demo model (llava_nb.demo): about a third of the real build's images and steps
# (5.2 min on 2 CPU cores); tests/test_demo.py checks it answers above chance.
SMALL_DEMO = {"vision_steps": 200, "align_rows": 256, "align_steps": 32, "instruct_rows": 512,
              "instruct_steps": 64}  # fmt: skip


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> str:
    """A cache folder (for $LLAVA_NB_CACHE) holding a reduced demo build, made over a
    half-written folder (no marker, a truncated file) that the build must replace."""
    from llava_nb import demo

    cache = tmp_path_factory.mktemp("llava_nb-cache")
    folder = cache / f"demo-{demo.VERSION}"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llava"}')
    (folder / "model.safetensors").write_bytes(b"\0" * 100)
    assert not demo.is_built(folder)
    demo.build(folder, seed=0, progress=False, **SMALL_DEMO)
    return str(cache)
