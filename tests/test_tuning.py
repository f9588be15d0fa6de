"""lavin_fast.ops.tuning: the first-call tuner's logic on CPU with a fake timer and a fake GPU name.

A "cuda" torch.device object needs no GPU; the timer runs the candidate's launch (a recorder here) and
returns the time a table assigns to it, so the choice, the cache file and its invalidation are checked
exactly.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from lavin_fast.ops import tuning
from lavin_fast.ops.tuning import FirstCallTuner

ENV = "LAVIN_FAST_TEST_TUNE"
CUDA = torch.device("cuda")
CANDIDATES = ["A", "B", "C", "D", "E"]


class FakeGPU:
    """A timer and a launcher: run(c) records the launch; timer(fn) runs fn and returns that candidate's time."""

    def __init__(self, times: dict[str, float]):
        self.times = times
        self.launched: list[str] = []
        self.timed: list[str] = []

    def run(self, cand: str) -> None:
        self.launched.append(cand)

    def timer(self, fn) -> float:
        before = len(self.launched)
        fn()
        cand = self.launched[before]
        self.timed.append(cand)
        t = self.times[cand]
        if t is None:
            raise RuntimeError(f"{cand} does not compile")
        return t


def _tuner(tmp_path, gpu: FakeGPU, name: str = "NVIDIA H100 80GB HBM3") -> FirstCallTuner:
    return FirstCallTuner("attention", ENV, timer=gpu.timer, device_name=lambda d: name, directory=tmp_path)


@pytest.fixture(autouse=True)
def _tuning_on(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


def test_first_call_times_at_most_four_candidates_and_keeps_the_fastest(tmp_path):
    gpu = FakeGPU({"A": 1.0, "B": 0.7, "C": 0.9, "D": 0.8, "E": 0.1})
    t = _tuner(tmp_path, gpu)
    assert t.choose("fwd", ("bf16", 1024), CANDIDATES, gpu.run, device=CUDA) == "B"
    assert gpu.timed == ["A", "B", "C", "D"]  # E (the fastest) is past the 4-candidate cap
    assert t.choose("fwd", ("bf16", 1024), CANDIDATES, gpu.run, device=CUDA) == "B"
    assert gpu.timed == ["A", "B", "C", "D"]  # second call: from memory, no timing
    assert t.chosen() == {"fwd|bf16|1024": "B"}


def test_cache_is_written_and_read_by_a_new_process(tmp_path):
    gpu = FakeGPU({"A": 1.0, "B": 2.0, "C": 0.5, "D": 3.0})
    _tuner(tmp_path, gpu).choose("dkdv", ("bf16", 2048, 32, 4), CANDIDATES[:4], gpu.run, device=CUDA)
    files = list(tmp_path.glob("attention-*.json"))
    assert [f.name for f in files] == ["attention-nvidia-h100-80gb-hbm3.json"]
    data = json.loads(files[0].read_text())
    assert data["gpu"] == "NVIDIA H100 80GB HBM3" and data["versions"] == tuning.versions()
    (entry,) = data["entries"].values()
    assert entry["choice"] == "C" and entry["ms"] == {"A": 1.0, "B": 2.0, "C": 0.5, "D": 3.0}

    fresh = FakeGPU({c: None for c in CANDIDATES})  # timing now would raise: the cache must answer
    got = _tuner(tmp_path, fresh).choose("dkdv", ("bf16", 2048, 32, 4), CANDIDATES[:4], fresh.run, device=CUDA)
    assert got == "C" and fresh.timed == []
    # another bucket, another GPU name or another candidate list is a miss
    other = FakeGPU({"A": 0.2, "B": 1.0, "C": 1.0, "D": 1.0})
    assert _tuner(tmp_path, other).choose("dkdv", ("bf16", 4096, 32, 4), CANDIDATES[:4], other.run, device=CUDA) == "A"
    h200 = FakeGPU({"A": 1.0, "B": 0.3, "C": 1.0, "D": 1.0})
    assert (
        _tuner(tmp_path, h200, "NVIDIA H200").choose(
            "dkdv", ("bf16", 2048, 32, 4), CANDIDATES[:4], h200.run, device=CUDA
        )
        == "B"
    )
    relisted = FakeGPU({"A": 1.0, "C": 2.0, "E": 0.1})
    assert _tuner(tmp_path, relisted).choose("dkdv", ("bf16", 2048, 32, 4), ["A", "C", "E"], relisted.run,
                                             device=CUDA) == "E"  # fmt: skip


def test_two_processes_sharing_the_cache_keep_both_entries(tmp_path):
    one, two = FakeGPU({"A": 1.0, "B": 0.5}), FakeGPU({"A": 0.5, "B": 1.0})
    t1, t2 = _tuner(tmp_path, one), _tuner(tmp_path, two)
    t1.choose("fwd", (1,), ["A", "B"], one.run, device=CUDA)  # both have read the (empty) file by now
    t2.choose("fwd", (2,), ["A", "B"], two.run, device=CUDA)
    t1.choose("fwd", (3,), ["A", "B"], one.run, device=CUDA)
    data = json.loads(next(tmp_path.glob("attention-*.json")).read_text())
    assert sorted(e["choice"] for e in data["entries"].values()) == ["A", "B", "B"]


def test_cache_is_invalidated_when_a_version_changes(tmp_path, monkeypatch):
    gpu = FakeGPU({"A": 1.0, "B": 0.5})
    _tuner(tmp_path, gpu).choose("fwd", ("bf16", 1024), ["A", "B"], gpu.run, device=CUDA)
    real = tuning.versions()
    monkeypatch.setattr(tuning, "versions", lambda: {**real, "triton": "9.9.9"})
    upgraded = FakeGPU({"A": 0.4, "B": 0.5})  # the new compiler made A the faster
    assert _tuner(tmp_path, upgraded).choose("fwd", ("bf16", 1024), ["A", "B"], upgraded.run, device=CUDA) == "A"
    assert upgraded.timed == ["A", "B"]
    data = json.loads(next(tmp_path.glob("attention-*.json")).read_text())
    assert data["versions"]["triton"] == "9.9.9"
    assert [e["choice"] for e in data["entries"].values()] == ["A"]  # the old entry is gone


def test_tuning_off_non_cuda_and_single_candidate_take_the_static_pick(tmp_path, monkeypatch):
    gpu = FakeGPU({"A": 2.0, "B": 1.0})
    t = _tuner(tmp_path, gpu)
    assert t.choose("fwd", (1,), ["A", "B"], gpu.run, device=torch.device("cpu")) == "A"
    assert t.choose("fwd", (1,), ["A"], gpu.run, device=CUDA) == "A"
    monkeypatch.setenv(ENV, "0")
    assert t.choose("fwd", (1,), ["A", "B"], gpu.run, device=CUDA) == "A"
    assert gpu.timed == [] and not list(tmp_path.iterdir())
    monkeypatch.setenv(ENV, "yes")
    with pytest.raises(ValueError, match=ENV):
        t.choose("fwd", (1,), ["A", "B"], gpu.run, device=CUDA)


def test_failing_candidates_are_skipped_and_all_failing_falls_back_loudly(tmp_path, caplog):
    gpu = FakeGPU({"A": None, "B": 3.0, "C": 2.0})
    assert _tuner(tmp_path, gpu).choose("fwd", (1,), ["A", "B", "C"], gpu.run, device=CUDA) == "C"
    broken = FakeGPU({"A": None, "B": None})  # e.g. the timer itself cannot run: the static pick, untimed
    t = _tuner(tmp_path, broken)
    with caplog.at_level(logging.WARNING, logger="lavin_fast.ops.tuning"):
        assert t.choose("fwd", (2,), ["A", "B"], broken.run, device=CUDA) == "A"
    assert "timing every candidate of fwd" in caplog.text and "A does not compile" in caplog.text
    assert "fwd|2" not in "".join(json.loads(next(tmp_path.glob("attention-*.json")).read_text())["entries"])


def test_no_timing_inside_a_trace_or_a_cuda_graph_capture_and_it_says_so(tmp_path, monkeypatch, caplog):
    from torch._subclasses.fake_tensor import FakeTensorMode

    gpu = FakeGPU({"A": 2.0, "B": 1.0})
    t = _tuner(tmp_path, gpu)
    with FakeTensorMode():
        fake = torch.empty(4)
    with caplog.at_level(logging.WARNING, logger="lavin_fast.ops.tuning"):
        assert t.choose("fwd", (7,), ["A", "B"], gpu.run, device=CUDA, tensors=[fake]) == "A"
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        assert t.choose("fwd", (8,), ["A", "B"], gpu.run, device=CUDA) == "A"
    assert gpu.timed == []
    text = caplog.text
    assert "torch.compile/make_fx trace" in text and "CUDA-graph capture" in text and "static pick A" in text
    # a bucket tuned before (eagerly) is served from the cache inside a trace or a capture, untimed
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert t.choose("fwd", (9,), ["A", "B"], gpu.run, device=CUDA) == "B"
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert t.choose("fwd", (9,), ["A", "B"], gpu.run, device=CUDA, tensors=[fake]) == "B"
    assert gpu.timed == ["A", "B"]


def test_one_info_line_per_tuned_bucket_and_unreadable_cache_is_retuned(tmp_path, caplog):
    path = tmp_path / "attention-nvidia-h100-80gb-hbm3.json"
    path.write_text("{not json")
    gpu = FakeGPU({"A": 2.0, "B": 1.0})
    with caplog.at_level(logging.INFO, logger="lavin_fast.ops.tuning"):
        t = _tuner(tmp_path, gpu)
        for _ in range(3):
            t.choose("fwd", (1,), ["A", "B"], gpu.run, device=CUDA)
    tuned = [r for r in caplog.records if "tuned fwd" in r.getMessage()]
    assert len(tuned) == 1 and "B 1.000 ms (static pick A 2.000 ms" in tuned[0].getMessage()
    assert "unreadable" in caplog.text
    assert json.loads(path.read_text())["entries"]  # rewritten as valid JSON


def test_bad_op_name_is_refused():
    with pytest.raises(ValueError, match="file-name"):
        FirstCallTuner("../x", ENV)
