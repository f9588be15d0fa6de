"""In-context loader: frame counts, one task per sequence, identical crops for input and target,
frame prediction, task weights, sharding, resume, corrupt files (torch and DALI backends)."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from lavin_fast.data.demo_data import moving_shapes_clip
from lavin_fast.data.incontext import LoaderConfig, build_incontext_loader, crop_window
from lavin_fast.data.manifest import ManifestError
from lavin_fast.media import write_clip

RES = 32


@pytest.fixture(scope="module")
def demo_loader():
    return build_incontext_loader("demo", resolution=RES, n_pairs=3, batch_size=4, seed=5, backend="torch")


def test_demo_batches_have_the_right_layout(demo_loader):
    for _ in range(3):
        b = next(demo_loader)
        if b.task[0] == "frame_prediction":
            continue
        assert b.context.shape == (4, 3, 2 * 3 + 1, RES, RES)
        assert b.target.shape == (4, 3, 1, RES, RES)
        assert b.context_segments == (1,) * 7 and b.target_segments == (1,) and b.n_pairs == 3
        assert len(b.task) == 4
        assert b.context.min() >= -1 and b.context.max() <= 1 and b.target.min() >= -1 and b.target.max() <= 1


def test_one_task_per_sequence():
    loader = build_incontext_loader(
        "demo",
        resolution=RES,
        n_pairs=2,
        batch_size=6,
        tasks=["colorization", "edge_detection"],
        seed=1,
        backend="torch",
    )
    seen = set()
    for _ in range(2):
        b = next(loader)
        for i, task in enumerate(b.task):
            seen.add(task)
            ctx = b.context[i]
            inputs = [ctx[:, 0], ctx[:, 2], ctx[:, 4]]  # in_1, in_2, query
            targets = [ctx[:, 1], ctx[:, 3], b.target[i, :, 0]]
            if task == "colorization":  # every input of the sequence is gray
                assert all(torch.equal(x[0], x[1]) and torch.equal(x[1], x[2]) for x in inputs)
            else:  # every target of the sequence is an edge map
                assert all(set(t.unique().tolist()) <= {-1.0, 1.0} for t in targets)
    assert seen == {"colorization", "edge_detection"}


def test_frame_prediction_from_clips():
    loader = build_incontext_loader(
        "demo",
        resolution=RES,
        batch_size=2,
        tasks=["frame_prediction"],
        video_frames=5,
        predict_frames=4,
        video_n_pairs=1,
        backend="torch",
        augment=False,
    )
    b = next(loader)
    assert b.context_segments == (5, 4, 5) and b.target_segments == (4,)
    assert b.context.shape == (2, 3, 14, RES, RES) and b.target.shape == (2, 3, 4, RES, RES)
    # the target continues the query clip: its first frame is closer to the query's last frame
    # than the query's first frame is
    q = b.context[:, :, 9:]
    near = (b.target[:, :, 0] - q[:, :, -1]).abs().mean()
    far = (b.target[:, :, 0] - q[:, :, 0]).abs().mean()
    assert near < far


def test_dali_backend_demo_images_and_clips(tmp_path):
    pytest.importorskip("nvidia.dali")
    loader = build_incontext_loader(
        "demo",
        resolution=RES,
        n_pairs=2,
        batch_size=2,
        backend="dali",
        device="cpu",
        cache_dir=str(tmp_path),
        tasks={"frame_prediction": 1.0, "inpainting": 1.0},
        video_frames=5,
        predict_frames=4,
    )
    assert loader.backend == "dali" and len(list(tmp_path.glob("demo_clips/*.avi"))) == 4
    kinds = set()
    for i in range(8):
        b = loader.batch_at(i)
        kinds.add(b.task[0])
        assert b.context.min() >= -1 and b.context.max() <= 1
        if b.task[0] == "frame_prediction":
            assert b.context.shape == (2, 3, 14, RES, RES) and b.target.shape == (2, 3, 4, RES, RES)
        else:
            assert b.context.shape == (2, 3, 5, RES, RES)
        if len(kinds) == 2:
            break
    assert kinds == {"frame_prediction", "inpainting"}
    with pytest.raises(ValueError, match="num_workers"):
        build_incontext_loader("demo", backend="dali", device="cpu", num_workers=2, cache_dir=str(tmp_path))


def test_task_weights_and_unknown_task():
    loader = build_incontext_loader(
        "demo",
        resolution=RES,
        n_pairs=1,
        batch_size=8,
        tasks={"inpainting": 3.0, "colorization": 1.0, "deraining": 0.0},
        backend="torch",
    )
    assert loader.tasks == ["colorization", "inpainting"]
    counts = {"inpainting": 0, "colorization": 0}
    for _ in range(3):
        for t in next(loader).task:
            counts[t] += 1
    assert counts["inpainting"] > counts["colorization"]
    with pytest.raises(ValueError, match="not provided by this source"):
        build_incontext_loader("demo", resolution=RES, tasks=["depth_estimation"], backend="torch")


def test_resume_reproduces_batches():
    kw = dict(resolution=RES, n_pairs=2, batch_size=3, seed=11, backend="torch")
    a = build_incontext_loader("demo", **kw)
    for _ in range(2):
        next(a)
    state = a.state_dict()
    expect = [next(a) for _ in range(2)]
    b = build_incontext_loader("demo", **kw)
    b.load_state_dict(state)
    got = [next(b) for _ in range(2)]
    for x, y in zip(expect, got, strict=True):
        assert x.index == y.index and x.task == y.task
        assert torch.equal(x.context, y.context) and torch.equal(x.target, y.target)
    other = build_incontext_loader("demo", **{**kw, "seed": 12})
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)
    assert not torch.equal(other.batch_at(2).context, expect[0].context)


def test_resume_with_workers_matches_in_process():
    kw = dict(resolution=RES, n_pairs=1, batch_size=2, seed=3, backend="torch", tasks=["inpainting", "colorization"])
    plain = build_incontext_loader("demo", **kw)
    expect = [plain.batch_at(i) for i in (1, 2)]
    w = build_incontext_loader("demo", num_workers=1, **kw)
    w.load_state_dict({**w.state_dict(), "next_index": 1})
    got = [next(w) for _ in range(2)]
    for x, y in zip(expect, got, strict=True):
        assert torch.equal(x.context, y.context) and x.task == y.task


def test_shards_read_disjoint_images():
    pools = []
    for shard in (0, 1):
        loader = build_incontext_loader(
            "demo", resolution=RES, tasks=["inpainting"], shard_id=shard, num_shards=2, backend="torch"
        )
        pools.append(set(loader.pools["inpainting"].items))
    assert pools[0] and pools[1] and not pools[0] & pools[1]
    with pytest.raises(ValueError, match="shard_id"):
        build_incontext_loader("demo", shard_id=2, num_shards=2, backend="torch")


def test_crop_window_bounds():
    cfg = LoaderConfig()
    for u in [(0, 0, 0, 0), (1, 1, 1, 1), (0.3, 0.9, 0.2, 0.7)]:
        y0, x0, y1, x1 = crop_window(300, 500, u, cfg)
        assert 0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1
        area = (y1 - y0) * (x1 - x0)
        assert 0.5 - 1e-9 <= area <= 1 + 1e-9 or (y1 - y0 == 1 or x1 - x0 == 1)
    assert crop_window(300, 500, (0.5,) * 4, LoaderConfig(augment=False)) == (0.0, 0.0, 1.0, 1.0)


# --- files on disk: manifests, corrupt files, both backends -----------------------------------


def _write_pairs(root, n=6, size=(40, 56)):
    """Images and their negatives: a target that is a pixel-wise function of its input, so a
    different crop or flip of the two would show."""
    rng = np.random.default_rng(0)
    lines = []
    (root / "img").mkdir()
    (root / "neg").mkdir()
    for i in range(n):
        yy, xx = np.mgrid[0 : size[0], 0 : size[1]]
        a = np.stack([xx * 4 + i * 10, yy * 5, rng.integers(0, 255, size)], -1).clip(0, 255).astype(np.uint8)
        Image.fromarray(a).save(root / "img" / f"{i}.png")
        Image.fromarray(255 - a).save(root / "neg" / f"{i}.png")
        lines.append({"task": "depth_estimation", "input": f"img/{i}.png", "target": f"neg/{i}.png"})
    return lines


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_manifest_pairs_share_crop_and_flip(tmp_path, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    lines = _write_pairs(tmp_path)
    man = tmp_path / "m.jsonl"
    man.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    loader = build_incontext_loader(
        man, resolution=24, n_pairs=2, batch_size=3, backend=backend, device="cpu", tasks=["depth_estimation"]
    )
    b = next(loader)
    assert b.context.shape == (3, 3, 5, 24, 24) and set(b.task) == {"depth_estimation"}
    # target = -input up to the bicubic overshoot that clamping cuts
    for j in (0, 2):
        assert (b.context[:, :, j] + b.context[:, :, j + 1]).abs().mean() < 0.02
    assert (b.context[:, :, 4] + b.target[:, :, 0]).abs().mean() < 0.02


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_corrupt_files_are_skipped_and_counted(tmp_path, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    for i in range(5):
        Image.fromarray(np.full((40, 40, 3), 40 * i, np.uint8)).save(tmp_path / f"ok{i}.jpg", quality=90)
    good = (tmp_path / "ok0.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (tmp_path / "garbage.png").write_bytes(b"not an image at all" * 10)
    (tmp_path / "empty.jpg").write_bytes(b"")
    # DALI: with the background prefetch thread, which finds bad files in batches made ahead
    extra = {"prefetch": 2} if backend == "dali" else {}
    loader = build_incontext_loader(
        tmp_path, resolution=16, n_pairs=3, batch_size=4, backend=backend, device="cpu", tasks=["colorization"], **extra
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = [next(loader) for _ in range(4)]  # 64 draws from 8 files: every file is met
    assert loader.num_skipped == 3
    assert set(loader.skipped) == {str(tmp_path / n) for n in ("truncated.jpg", "garbage.png", "empty.jpg")}
    assert sum("skipping unreadable file" in str(w.message) for w in caught) == 3
    for b in batches:
        assert b.context.shape == (4, 3, 7, 16, 16) and torch.isfinite(b.context).all()
    # resuming with the skip list gives the same batches as the run that discovered them
    again = build_incontext_loader(
        tmp_path, resolution=16, n_pairs=3, batch_size=4, backend=backend, device="cpu", tasks=["colorization"]
    )
    again.load_state_dict({**loader.state_dict(), "next_index": 2})
    assert torch.equal(next(again).context, batches[2].context)


def test_video_files_and_frame_lists_from_manifest(tmp_path):
    clip = moving_shapes_clip(frames=16, height=48, width=64, seed=2)
    write_clip(clip, tmp_path / "a.avi", fps=10)
    write_clip(clip[::-1], tmp_path / "b.avi", fps=10)
    (tmp_path / "f").mkdir()
    for t in range(6):
        Image.fromarray(clip[t]).save(tmp_path / "f" / f"{t}.png")
        Image.fromarray(255 - clip[t]).save(tmp_path / "f" / f"n{t}.png")
    lines = [
        {"task": "frame_prediction", "video": "a.avi"},
        {"task": "frame_prediction", "video": "b.avi"},
        {
            "task": "video_depth_estimation",
            "input": [f"f/{t}.png" for t in range(6)],
            "target": [f"f/n{t}.png" for t in range(6)],
        },
    ]
    man = tmp_path / "m.jsonl"
    man.write_text("\n".join(json.dumps(x) for x in lines))
    loader = build_incontext_loader(man, resolution=16, batch_size=2, video_frames=5, predict_frames=4, backend="torch")
    assert loader.tasks == ["frame_prediction", "video_depth_estimation"]
    seen = set()
    for _ in range(6):
        b = next(loader)
        seen.update(b.task)
        if b.task[0] == "video_depth_estimation":
            assert b.context_segments == (5, 5, 5) and b.target.shape == (2, 3, 5, 16, 16)
            assert (b.context[:, :, 10:] + b.target).abs().mean() < 0.05
        else:
            assert b.context_segments == (5, 4, 5) and b.target.shape == (2, 3, 4, 16, 16)
    assert seen == {"frame_prediction", "video_depth_estimation"}


def test_startup_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither 'demo', an existing directory"):
        build_incontext_loader(tmp_path / "missing_dir", backend="torch")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no image"):
        build_incontext_loader(tmp_path / "empty", backend="torch")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    man = tmp_path / "m.jsonl"
    man.write_text(json.dumps({"task": "depth_estimation", "input": "x.png", "target": "gone.png"}))
    with pytest.raises(ManifestError, match="'target' file not found"):
        build_incontext_loader(man, backend="torch")
    man.write_text(json.dumps({"task": "teleportation", "input": "x.png", "target": "x.png"}))
    with pytest.raises(ManifestError, match="unknown task 'teleportation'"):
        build_incontext_loader(man, backend="torch")
    with pytest.raises(ValueError, match="unknown options"):
        build_incontext_loader("demo", backend="torch", resolutoin=8)
    with pytest.raises(ValueError, match="backend"):
        build_incontext_loader("demo", backend="tensorflow")


def _pixel_bomb(path):
    """A PNG of a few KB that decodes to 12000 x 12000 RGB (432 MB): a 1-bit blank image compresses to nothing."""
    Image.new("1", (12000, 12000)).save(path)
    assert path.stat().st_size < 100_000
    return path


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_pixel_bomb_is_skipped_and_counted_from_its_header(tmp_path, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    for i in range(4):
        Image.fromarray(np.full((40, 40, 3), 50 * i, np.uint8)).save(tmp_path / f"ok{i}.png")
    _pixel_bomb(tmp_path / "bomb.png")
    loader = build_incontext_loader(
        tmp_path, resolution=16, n_pairs=2, batch_size=4, backend=backend, device="cpu", tasks=["colorization"]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(4):  # 48 draws from 5 files
            next(loader)
    assert set(loader.skipped) == {str(tmp_path / "bomb.png")}
    assert "over the limit" in loader.skipped[str(tmp_path / "bomb.png")]


def test_pixel_limit_avoids_the_large_allocation(tmp_path):
    """Peak memory of a process that meets the bomb, with and without the limit (its own process: ru_maxrss is a
    high-water mark)."""
    import subprocess
    import sys

    bomb = _pixel_bomb(tmp_path / "bomb.png")
    probe = (
        "import resource, sys\n"
        "from lavin_fast.media import MediaError, open_image\n"
        "limit = None if sys.argv[2] == 'none' else int(sys.argv[2])\n"
        "try:\n"
        "    open_image(sys.argv[1], max_pixels=limit)\n"
        "    print('decoded', end=' ')\n"
        "except MediaError as e:\n"
        "    print('refused', end=' ')\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n"
    )
    runs = {}
    for limit in ("67108864", "none"):
        out = subprocess.run(
            [sys.executable, "-c", probe, str(bomb), limit], capture_output=True, text=True, check=True
        )
        what, mib = out.stdout.split()
        runs[limit] = (what, int(mib))
    assert runs["67108864"][0] == "refused" and runs["none"][0] == "decoded"
    # decoding costs >= 432 MB of RGB; the refused one stays far below it
    assert runs["none"][1] - runs["67108864"][1] > 300, runs
