"""Manifest parsing: accepted forms and the start-up errors."""

import json

import numpy as np
import pytest
from PIL import Image

from lavin_fast.data.manifest import ManifestError, load_manifest


@pytest.fixture
def files(tmp_path):
    for name in ("a.png", "b.png", "c.png", "d.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name)
    (tmp_path / "clip.avi").write_bytes(b"x")
    return tmp_path


def _write(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_accepted_forms(files):
    sub = files / "sub"
    sub.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(sub / "e.png")
    man = _write(
        files / "m.jsonl",
        [
            "# a comment",
            "",
            {"task": "depth_estimation", "input": "a.png", "target": "b.png"},
            {"task": "normal_to_video", "input": ["a.png", "b.png"], "target": ["c.png", "d.png"]},
            {"task": "frame_prediction", "video": "clip.avi"},
            {"image": "c.png"},
            {"root": "sub"},
            {"image": "e.png"},
        ],
    )
    m = load_manifest(man)
    assert [p.task for p in m.pairs] == ["depth_estimation", "normal_to_video"]
    assert m.pairs[0].input == (str(files / "a.png"),) and len(m.pairs[1].target) == 2
    assert m.videos == [str(files / "clip.avi")]
    assert m.images == [str(files / "c.png"), str(sub / "e.png")]
    m2 = load_manifest(
        _write(files / "x.jsonl", [{"task": "my_task", "input": "a.png", "target": "b.png"}]), extra_tasks=("my_task",)
    )
    assert m2.pairs[0].task == "my_task"


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"m.jsonl:1: not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({"input": "a.png", "target": "b.png"}, "missing 'task'"),
        ({"task": "dreaming", "input": "a.png", "target": "b.png"}, "unknown task 'dreaming'"),
        ({"task": "depth_estimation", "input": "a.png"}, "needs 'target'"),
        ({"task": "depth_estimation", "input": "a.png", "target": "nope.png"}, "'target' file not found: .*nope.png"),
        ({"task": "depth_to_video", "input": ["a.png", "b.png"], "target": ["c.png"]}, "2 frames but 'target' has 1"),
        ({"task": "depth_estimation", "input": [], "target": "b.png"}, "non-empty list"),
        ({"root": "missing_dir"}, "root directory not found"),
        ({"task": "frame_prediction", "video": "gone.avi"}, "'video' file not found"),
    ],
)
def test_errors_name_the_line_and_problem(files, line, message):
    with pytest.raises(ManifestError, match=message):
        load_manifest(_write(files / "m.jsonl", [line]))


def test_missing_and_empty_manifest(tmp_path):
    with pytest.raises(ManifestError, match="file not found"):
        load_manifest(tmp_path / "none.jsonl")
    with pytest.raises(ManifestError, match="has no entries"):
        load_manifest(_write(tmp_path / "e.jsonl", ["# nothing"]))
