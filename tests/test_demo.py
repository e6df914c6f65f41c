"""The offline demo model: the shapes data, a reduced build that really answers, the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import llava_nb as ln
from llava_nb import demo
from tests.conftest import SMALL_DEMO


def test_shapes_dataset_is_deterministic():
    a, b = demo.shapes_dataset(6, seed=3), demo.shapes_dataset(6, seed=3)
    assert [r["image"].tobytes() for r in a] == [r["image"].tobytes() for r in b]
    assert [r["conversations"] for r in a] == [r["conversations"] for r in b]
    other = demo.shapes_dataset(6, seed=4)
    assert [r["image"].tobytes() for r in a] != [r["image"].tobytes() for r in other]


def test_shapes_ground_truth_matches_the_pixels():
    rows = demo.shapes_dataset(60, seed=0)
    counts = set()
    for row in rows:
        image, objects = row["image"], row["objects"]
        counts.add(len(objects))
        assert 1 <= len(objects) <= 3
        assert (
            len({o["color"] for o in objects}) == len({o["shape"] for o in objects}) == len(objects)
        )
        for o in objects:
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height
            centre = image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2))
            assert (
                max(abs(c - t) for c, t in zip(centre, demo.COLORS[o["color"]], strict=True)) <= 20
            )
        answers = {kind: answer for kind, _, answer in row["qa"]}
        assert set(answers) == set(demo.QUESTION_TYPES)
        assert answers["count"] == str(len(objects))
        assert answers["describe"] == row["caption"]
        # the caption names the shapes in reading order (top to bottom, left to right)
        named = sorted(objects, key=lambda o: row["caption"].index(f"{o['color']} {o['shape']}"))
        assert [o["cell"] for o in named] == sorted(o["cell"] for o in objects)
        # one question about each shape: its color, or its shape named by its color
        by_shape = {o["shape"]: o["color"] for o in objects}
        by_color = {o["color"]: o["shape"] for o in objects}
        asked = []
        for kind, question, answer in row["qa"]:
            if kind == "color" and len(objects) > 1:
                asked.append(question.split()[-1].rstrip("?"))
                assert by_shape[asked[-1]] == answer
            if kind == "shape" and len(objects) > 1:
                asked.append(by_color[question.split()[-2]])
                assert asked[-1] == answer
        assert sorted(asked) == sorted(by_shape) if len(objects) > 1 else len(row["qa"]) == 5
        # one position question, whose answer agrees with where its shape's box is
        where = [(q, a) for kind, q, a in row["qa"] if kind == "position"]
        assert len(where) == 1
        for question, answer in where:
            (o,) = [
                o for o in objects if len(objects) == 1 or f"the {o['color']} shape" in question
            ]
            x = (o["box"][0] + o["box"][2]) / 2 / image.width
            y = (o["box"][1] + o["box"][3]) / 2 / image.height
            sides = {"left": x < 1 / 3, "right": x > 2 / 3, "top": y < 1 / 3, "bottom": y > 2 / 3}
            assert sides[answer]
        # conversations: LLaVA JSON, the image in the first question, the description last
        conversation = row["conversations"]
        assert conversation[0]["value"].startswith("<image>\n")
        assert [turn["from"] for turn in conversation] == ["human", "gpt"] * len(row["qa"])
        assert conversation[-1]["value"] == row["caption"]
    assert counts == {1, 2, 3}


def test_stage_two_describes_one_image_in_describe_every():
    rows = demo.shapes_dataset(16, seed=0)
    data = demo._stage_data(rows, "instruct", describe_every=8)
    described = [i for i, row in enumerate(data) if "Describe" in row["conversations"][0]["value"]]
    assert described == [0, 8]
    for row, source in zip(data, rows, strict=True):
        turns = row["conversations"]
        assert turns[0]["value"].startswith("<image>\n")
        if len(turns) > 2:  # the short questions, never with the description that answers them
            assert {t["value"] for t in turns[1::2]} <= {a for _, _, a in source["qa"][:-1]}
            assert not any("Describe" in t["value"] for t in turns[::2])


def test_offline_default_falls_back_to_the_demo(monkeypatch, capsys):
    import llava_nb.models as models

    monkeypatch.delenv("LLAVA_NB_MODEL", raising=False)
    monkeypatch.setattr(models, "_fallback_noticed", [])
    models._default_available.cache_clear()  # conftest: HF_HUB_OFFLINE=1, nothing cached
    try:
        assert models.default_model_id() == "demo"
        assert ln.Model().model_id == "demo"
    finally:
        models._default_available.cache_clear()
    lines = capsys.readouterr().err.splitlines()  # stderr: stdout is for answers
    assert len(lines) == 1  # one notice, once
    assert lines[0].startswith("llava_nb: llava-hf/llava-1.5-7b-hf is not cached")
    assert "LLAVA_NB_MODEL" in lines[0]


def test_a_stale_build_folder_is_told_from_a_build_in_progress(tmp_path):
    """A temporary build folder names the process building it. It was judged by the pid alone:
    once that process was gone and its pid given to another, the folder was kept as a build in
    progress, for good. The start time recorded with the pid (as a fine-tuning run's file
    records it, by the same function) tells them apart."""
    import os
    import socket
    import subprocess
    import sys

    from llava_nb.training.train import this_process

    if "started" not in this_process():
        pytest.skip("no /proc/<pid>/stat here: the pid alone is recorded")

    def building(name: str, owner) -> Path:
        folder = tmp_path / f".demo-{demo.VERSION}-building-{name}"
        folder.mkdir()
        if owner is not None:
            (folder / "pid").write_text(json.dumps(owner))
        return folder

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        stat = Path(f"/proc/{other.pid}/stat").read_text()
        started = int(stat.rpartition(")")[2].split()[19])
        here = socket.gethostname()
        running = building("running", {"pid": other.pid, "host": here, "started": started})
        reused = building("reused", {"pid": other.pid, "host": here, "started": started + 1})
        old = building("old", other.pid)  # an earlier version's file: the pid alone
        elsewhere = building("elsewhere", {"pid": 1, "host": f"not-{here}", "started": 1})
        mine = building("mine", this_process())  # what build() writes for itself
        fresh = building("fresh", None)  # its pid not written yet
        demo._clear_stale_builds(tmp_path / f"demo-{demo.VERSION}")
        assert not reused.exists()
        assert all(f.exists() for f in (running, old, elsewhere, mine, fresh))
    finally:
        other.kill()
        other.wait()
    demo._clear_stale_builds(tmp_path / f"demo-{demo.VERSION}")
    assert not running.exists() and not old.exists()  # that process is gone
    assert all(f.exists() for f in (elsewhere, mine, fresh))
    assert json.loads((mine / "pid").read_text())["pid"] == os.getpid()


# ---------------------------------------------------------------- a reduced build (conftest)


@pytest.fixture(scope="module")
def small_demo(demo_cache) -> Path:
    return Path(demo_cache) / f"demo-{demo.VERSION}"


def test_half_written_folder_is_rebuilt(small_demo):
    assert demo.is_built(small_demo)
    marker = json.loads((small_demo / demo.MARKER).read_text())
    assert marker["recipe"]["align_steps"] == SMALL_DEMO["align_steps"]
    assert "model.safetensors" in marker["files"]
    assert not list(small_demo.parent.glob(".*building*"))  # no temporary folder left behind


def test_model_demo_uses_the_cached_build_and_answers_above_chance(demo_cache, monkeypatch):
    monkeypatch.setenv("LLAVA_NB_CACHE", demo_cache)
    model = ln.Model("demo")
    model.load()  # found complete in the cache: loaded, not rebuilt
    assert model.status()["model"] == "demo" and model.status()["family"] == "LLaVA-1.5"
    rows = demo.shapes_dataset(60, seed=999)  # not the training seed
    right = 0
    for row in rows:
        question, answer = next((q, a) for kind, q, a in row["qa"] if kind == "color")
        chat = ln.Chat(model, max_new_tokens=4)
        words = chat.ask(question, image=row["image"]).lower().split()
        right += bool(words) and words[0].strip(".,!") == answer
    model.unload()
    from llava_nb.training.train import base_id

    assert base_id("demo") == base_id(model) == str(Path(demo_cache) / f"demo-{demo.VERSION}")
    # chance is 1 in 6; the full build answers 98% of held-out color questions
    # (benchmarks/demo_accuracy.py), the reduced one of recipe 4 about 40%
    assert right / len(rows) >= 0.3


def test_damaged_build_is_detected(small_demo, tmp_path):
    import shutil

    copy = tmp_path / "demo-copy"
    shutil.copytree(small_demo, copy)
    assert demo.is_built(copy)
    weights = copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # a half-written file
    assert not demo.is_built(copy)
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
    assert not demo.is_built(copy)
    weights.write_bytes(data)
    assert demo.is_built(copy)
    (copy / demo.MARKER).unlink()  # interrupted before the marker
    assert not demo.is_built(copy)


def test_build_refuses_unknown_or_bad_settings(tmp_path):
    with pytest.raises(ln.LlavaError, match="unknown build setting 'steps'"):
        demo.build(tmp_path / "demo", steps=3)
    with pytest.raises(ln.LlavaError, match="describe_every must be a whole number >= 1"):
        demo.build(tmp_path / "demo", describe_every=0)
    assert not (tmp_path / "demo").exists()


def test_an_interrupted_load_stops_the_demo_build(tmp_path, capsys):
    """`Model("demo")` builds on the load's thread: Jupyter's stop ends the build after its
    current step (it waited minutes for the whole build), and nothing is cached. Told by the
    build's own progress lines, not by a wall-clock bound: the interrupt lands before the first
    stage ends, and no later stage starts (a bound from the start failed on a loaded 2-core machine,
    where loading SmolLM2 alone, before the first check, took over 30 s)."""
    import signal
    import threading

    from llava_nb.models import _on_a_thread_of_its_own

    timer = threading.Timer(
        3.0, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT)
    )
    timer.start()
    with pytest.raises(demo.DemoError, match="interrupted; nothing was cached"):
        _on_a_thread_of_its_own(lambda: demo.build(tmp_path / "demo", progress=True, **SMALL_DEMO))
    timer.join()
    said = capsys.readouterr().out
    assert "building the demo model" in said and "[2/5]" not in said, said
    assert list(tmp_path.iterdir()) == []
