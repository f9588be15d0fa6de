"""Data at scale: O(1) planner draws, the latent cache's index (no per-row lists), the Table 2 mixture on the
cache path, one layout per step on every rank, the cache look-ahead."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy import stats

from lavin_fast.data.latent_cache import LatentCacheLoader
from lavin_fast.data.mixture import PAPER_SAMPLES

ROOT = pathlib.Path(__file__).resolve().parents[1]

# task -> (rows per shard, pixel frames (in, out), latent frames (in, out))
SPEC = {
    "colorization": ([7, 5, 9], (1, 1), (1, 1)),
    "depth_estimation": ([6, 6], (1, 1), (1, 1)),
    "pose_estimation": ([11], (1, 1), (1, 1)),
    "frame_prediction": ([4, 8], (5, 4), (2, 1)),
}
TASK_ID = {t: i + 1 for i, t in enumerate(sorted(SPEC))}


def write_fake_cache(root: pathlib.Path, spec=SPEC, shard_counts_in_index: bool = True) -> dict:
    """A cache directory in the build's layout, written directly (no encoder): every latent of row r of shard
    file s of task t holds the value TASK_ID[t] * 1000 + its row number in the task (shards concatenated), so a
    test can read back which row a batch took."""
    root.mkdir(parents=True, exist_ok=True)
    index = {"version": 1, "resolution": [16, 16], "encoder": "fake", "encoder_sha256": None, "sources": ["x"]}
    index.update(seed=0, copies=1, augment=False, counts={}, tasks={}, skipped={})
    for task, (counts, pix, lat) in spec.items():
        names, row = [], 0
        for k, n in enumerate(counts):
            name = f"{task}-s0-{k:05d}.safetensors"
            v = TASK_ID[task] * 1000 + torch.arange(row, row + n, dtype=torch.float32)
            x = v.view(n, 1, 1, 1, 1).expand(n, 2, lat[0], 2, 2).contiguous()
            y = v.view(n, 1, 1, 1, 1).expand(n, 2, lat[1], 2, 2).contiguous()
            save_file({"input": x, "target": y}, str(root / name))
            names.append(name)
            row += n
        info = {"count": row, "shards": names, "input_frames": lat[0], "target_frames": lat[1]}
        info.update(pixel_frames=list(pix), latent_shape=[2, lat[0], 2, 2])
        if shard_counts_in_index:
            info["shard_counts"] = list(counts)
        index["tasks"][task] = info
        index["counts"][task] = row
    (root / "index.json").write_text(json.dumps(index))
    return index


def _rows(batch) -> list[list[int]]:
    """The task row of every example pair (its input; its target holds the same row) and of the query, per
    sequence."""
    ctx = batch.context[:, 0, :, 0, 0]  # [B, Tc]
    out = []
    for b in range(ctx.shape[0]):
        starts = np.cumsum((0,) + batch.context_segments[:-1])
        vals = [int(ctx[b, s]) % 1000 for s in starts[::2]]
        assert int(batch.target[b, 0, 0, 0, 0]) == int(ctx[b, starts[-1]])  # the query's own target
        out.append(vals)
    return out


def test_cache_task_shares_follow_the_paper_mixture(tmp_path):
    write_fake_cache(tmp_path)
    loader = LatentCacheLoader(tmp_path, n_pairs=2, batch_size=8, seed=3)
    counts = dict.fromkeys(SPEC, 0)
    for _ in range(500):  # 4000 sequences
        for t in next(loader).task:
            counts[t] += 1
    # Table 2's counts, renormalised over the cached tasks (frame_prediction: UCF101 + K700 + Kubric)
    table = {t: PAPER_SAMPLES[t] for t in SPEC}
    expected = np.array([table[t] for t in SPEC], dtype=float)
    expected *= sum(counts.values()) / expected.sum()
    chi2 = stats.chisquare([counts[t] for t in SPEC], expected)
    assert chi2.pvalue > 1e-3, (counts, expected)
    # a 3% shift of the largest share is detected at this size
    assert abs(counts["depth_estimation"] / 4000 - table["depth_estimation"] / sum(table.values())) < 0.025


def test_cache_given_weights_override_the_mixture(tmp_path):
    write_fake_cache(tmp_path)
    loader = LatentCacheLoader(tmp_path, batch_size=8, tasks={"colorization": 1, "pose_estimation": 3}, seed=1)
    assert loader.mixture == "given"
    tasks = [t for _ in range(300) for t in next(loader).task]
    share = tasks.count("pose_estimation") / len(tasks)
    assert abs(share - 0.75) < 0.03 and set(tasks) == {"colorization", "pose_estimation"}
    uniform = LatentCacheLoader(tmp_path, tasks=["colorization", "pose_estimation"], mixture="given")
    assert uniform.weights == {"colorization": 1.0, "pose_estimation": 1.0}
    with pytest.raises(ValueError, match="mixture"):
        LatentCacheLoader(tmp_path, mixture="uniform")
    with pytest.raises(ValueError, match="weights"):
        LatentCacheLoader(tmp_path, tasks={"colorization": -1.0})


@pytest.mark.parametrize("indexed", [True, False])
def test_cache_rows_found_from_the_index_without_row_lists(tmp_path, indexed):
    write_fake_cache(tmp_path, shard_counts_in_index=indexed)
    for rank in range(3):
        loader = LatentCacheLoader(tmp_path, n_pairs=2, batch_size=4, seed=rank, shard_id=rank, num_shards=3)
        for task, pool in loader.pools.items():
            assert isinstance(pool.items, range)  # O(1) memory: no list of every row
            # an independent enumeration: every (file, row) of the task, rank r takes r, r + 3, ...
            flat = [
                (n, r)
                for n, c in zip(loader.index["tasks"][task]["shards"], SPEC[task][0], strict=True)
                for r in range(c)
            ]
            mine = flat[rank::3]
            assert [loader.locate(task, i) for i in range(len(pool.items))] == mine
        for _ in range(20):
            b = next(loader)
            for seq in _rows(b):
                assert all(r % 3 == rank for r in seq)  # this rank's rows only
                assert len(set(seq)) == len(seq)  # distinct examples in a sequence


def test_planner_draws_are_uniform_over_a_pool(tmp_path):
    write_fake_cache(tmp_path, {"colorization": ([23], (1, 1), (1, 1))})
    loader = LatentCacheLoader(tmp_path, n_pairs=1, batch_size=8, seed=0)
    hits = np.zeros(23)
    for i in range(400):
        for s in loader.planner.plan(i):
            for p in s.pairs:
                hits[loader.pools["colorization"].items[p.item]] += 1
    assert stats.chisquare(hits).pvalue > 1e-3


def test_cache_look_ahead_gives_the_same_stream_and_resumes(tmp_path):
    write_fake_cache(tmp_path)
    plain = LatentCacheLoader(tmp_path, batch_size=3, seed=2)
    ahead = LatentCacheLoader(tmp_path, batch_size=3, seed=2, prefetch=3)
    try:
        for _ in range(6):
            a, b = next(plain), next(ahead)
            assert torch.equal(a.context, b.context) and a.task == b.task and a.index == b.index
        state = ahead.state_dict()
        want = [next(ahead) for _ in range(3)]
        again = LatentCacheLoader(tmp_path, batch_size=3, seed=2, prefetch=2)
        again.load_state_dict(state)
        got = [next(again) for _ in range(3)]
        assert [g.index for g in got] == [w.index for w in want] == [6, 7, 8]
        assert all(torch.equal(g.target, w.target) for g, w in zip(got, want, strict=True))
        again.close()
    finally:
        ahead.close()


_TWO_RANKS = r"""
import json, os, sys, types, torch, torch.distributed as dist
from lavin_fast.data.latent_cache import LatentCacheLoader
from lavin_fast.train.sources import CachedLatentSource, pop_task_counts
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
loader = LatentCacheLoader(sys.argv[1], n_pairs=2, batch_size=2, seed=5, shard_id=rank, num_shards=world)
source = CachedLatentSource(loader, torch.device("cpu"))
layouts, rows, tasks = [], [], []
for i in range(40):
    source.next_batch()
    tasks += source.last_tasks
    b = loader.batch_at(i)
    layouts.append(list(b.context_segments))
    ctx = b.context[:, 0, :, 0, 0]
    rows += [(t, int(v) % 1000) for t, seq in zip(b.task, ctx.tolist()) for v in seq]
out = [None] * world
ctx = types.SimpleNamespace(initialized=True, world=world, device=torch.device("cpu"))
summed = pop_task_counts(source, ctx)
dist.all_gather_object(out, {"layouts": layouts, "rows": rows, "tasks": tasks, "summed": summed})
if rank == 0:
    open(sys.argv[2], "w").write(json.dumps(out))
dist.barrier()  # no rank closes its connections while the other is still in a collective (gloo SIGABRT)
dist.destroy_process_group()
# Skip interpreter finalization: gloo worker threads can still hold work objects whose destruction there aborts
# the process (SIGABRT, "terminate called without an active exception"; pytorch/pytorch#179291) after the results
# are written. The results are checked by the test; the exit status only has to say the script got here.
sys.stdout.flush()
os._exit(0)
"""


@pytest.mark.slow  # one torchrun launch of 2 gloo processes
def test_two_ranks_take_the_same_layout_each_step_and_disjoint_rows(tmp_path):
    write_fake_cache(tmp_path / "cache")
    script = tmp_path / "two.py"
    script.write_text(_TWO_RANKS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    done = subprocess.run([*cmd, str(tmp_path / "cache"), str(tmp_path / "out.json")], env=env, capture_output=True)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = json.loads((tmp_path / "out.json").read_text())
    assert r0["layouts"] == r1["layouts"]
    kinds = {tuple(x) for x in r0["layouts"]}
    assert len(kinds) == 2  # both image and video steps occurred, on both ranks together
    assert not {tuple(x) for x in r0["rows"]} & {tuple(x) for x in r1["rows"]}
    # task_share/<task>: the counts of both ranks, summed (an independent count of what each rank drew)
    both = r0["tasks"] + r1["tasks"]
    assert r0["summed"] == r1["summed"] == {t: both.count(t) for t in set(both)}


def test_train_config_data_threads_and_prefetch():
    from lavin_fast.train.config import ConfigError, load_config, online_data

    cfg = load_config(None, {"data": {"sources": ["demo"], "num_threads": 4, "prefetch": 3}})
    assert online_data(cfg)["num_threads"] == 4 and online_data(cfg)["prefetch"] == 3
    assert online_data(load_config(None, {"data": {"sources": ["demo"]}}))["prefetch"] is None
    for bad in ({"num_threads": 0}, {"prefetch": -1}, {"num_threads": None}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            load_config(None, {"data": {"sources": ["demo"], **bad}})


def test_bench_scale_rows_small(tmp_path):
    """The `lavin-fast data bench --rows scale` rows at a small size (no timing checked): the synthetic index holds
    the asked number of pairs, split by Table 2, and the planning index stays far under 64 bytes per pair."""
    from lavin_fast.data.benchmark import bench_plan, bench_shards, make_jpeg_set, synthetic_cache_index

    index = synthetic_cache_index(200_000, shard_size=1000)
    total = sum(PAPER_SAMPLES.values())
    assert sum(index["counts"].values()) == pytest.approx(200_000, abs=len(PAPER_SAMPLES))
    for task, info in index["tasks"].items():
        assert sum(info["shard_counts"]) == info["count"] == 200_000 * PAPER_SAMPLES[task] // total
    plan, memory = bench_plan(n_items=200_000, micro_batches=20)
    assert plan["micro_batches"] == 20 and plan["ms_per_micro_batch"] > 0
    shards = sum(-(-n // 1024) for n in synthetic_cache_index(200_000)["counts"].values())  # default 1024 per shard
    assert 0 < memory["bytes_per_item"] < 64 and memory["shards"] == shards
    files = make_jpeg_set(tmp_path / "jpg", n=6)
    rows = bench_shards(files, resolution=32, batch_size=4, workers=1, seconds=0.1, out_dir=tmp_path / "b")
    assert [r["impl"].split(":")[0] for r in rows] == ["shards", "shards"] and all(r["images_per_s"] > 0 for r in rows)


def test_config_file_overrides_the_cache_mixture(tmp_path):
    """A YAML config's data section gives the cache's task weights; bad weights are refused when the config is
    read (before any model, loader or run folder), naming what is wrong."""
    from lavin_fast.parallel.distributed import DistContext
    from lavin_fast.train.config import ConfigError, load_config
    from lavin_fast.train.sources import CachedLatentSource, build_source

    write_fake_cache(tmp_path / "cache")
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(
        f"data:\n  latent_cache: {tmp_path / 'cache'}\n  weights: {{colorization: 1, pose_estimation: 3}}\n"
        "  prefetch: 0\nmicro_batch_size: 8\nbatch_size: 8\nnum_pairs: 2\nseed: 5\n"
        f"out_dir: {tmp_path / 'out'}\n"
    )
    cfg = load_config(cfg_file)
    ctx = DistContext(rank=0, world=1, local_rank=0, device=torch.device("cpu"), initialized=False)
    source = build_source(cfg, ctx)
    assert isinstance(source, CachedLatentSource) and source.loader.mixture == "given"
    tasks = []
    for _ in range(300):  # 2400 sequences
        source.next_batch()
        tasks += source.last_tasks
    assert set(tasks) == {"colorization", "pose_estimation"}
    assert abs(tasks.count("pose_estimation") / len(tasks) - 0.75) < 0.03  # the paper's mixture would give 0.21
    # without weights: the paper's mixture, as with `data: latent-cache`
    plain = build_source(load_config(None, {"data": {"latent_cache": str(tmp_path / "cache")}}), ctx)
    assert plain.loader.mixture == "paper" and set(plain.loader.weights) == set(SPEC)
    # the field latent_cache (--latent-cache DIR) fills a null latent_cache of the mapping
    over = {"data": {"latent_cache": None, "weights": {"colorization": 1}}, "latent_cache": str(tmp_path / "cache")}
    assert build_source(load_config(None, over), ctx).loader.weights == {"colorization": 1.0}

    def bad(weights, match, **data):
        (tmp_path / "out").mkdir(exist_ok=True)
        before = sorted((tmp_path / "out").iterdir())
        with pytest.raises(ConfigError, match=match):
            load_config(None, {"data": {"latent_cache": str(tmp_path / "cache"), "weights": weights, **data}})
        assert sorted((tmp_path / "out").iterdir()) == before

    bad({"colorisation": 1.0}, r"does not hold.*colorisation")  # a typo: not a cached task
    bad({"object_detection": 1.0}, r"does not hold.*object_detection")  # a known task the cache lacks
    bad({"colorization": -1.0}, r"colorization.*>= 0")
    bad({"colorization": 0.0, "pose_estimation": 0}, "sum to 0")
    bad({"colorization": float("nan")}, "colorization")
    bad({"colorization": 1e13}, r"\[0, 1000000000000\]")  # the bounds schema's upper bound
    bad({"colorization": True}, "colorization")
    bad({}, "non-empty mapping")
    bad({"colorization": 1.0}, "unknown keys", sources=["demo"])
    bad({"colorization": 1.0}, "prefetch", prefetch=-1)
    with pytest.raises(ConfigError, match="no cache index"):
        load_config(None, {"data": {"latent_cache": str(tmp_path / "nope"), "weights": {"colorization": 1}}})


def test_bench_cache_read_rows_small(tmp_path):
    """The latent cache read rows (no timing checked): both formats are written and read back."""
    from lavin_fast.data.benchmark import bench_cache_reads

    rows = bench_cache_reads(rows=40, shard_size=16, batch_size=2, n_pairs=1, seconds=0.05, out_dir=tmp_path)
    assert [r["impl"].split(",")[1].split()[0] for r in rows] == ["safetensors", "shards"]
    assert all(r["micro_batches_per_s"] > 0 for r in rows)
    assert json.loads((tmp_path / "shards" / "index.json").read_text())["tasks"]["colorization"]["shard_counts"] == [
        16,
        16,
        8,
    ]
