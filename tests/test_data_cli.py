"""`lavin-fast data`: check, demo, bench and build-cache (tiny sizes; no timing assertions)."""

import json

import pytest
from PIL import Image

from lavin_fast.cli import main


def test_cli_check_and_demo(tmp_path, capsys):
    assert main(["data", "check", "demo", "--backend", "torch", "--resolution", "16", "--num-pairs", "1"]) == 0
    out = capsys.readouterr().out
    assert "inpainting" in out and "first batch: context" in out
    png = tmp_path / "grid.png"
    argv = ["data", "demo", "--backend", "torch", "--resolution", "16", "--num-pairs", "1", "--batch-size", "2"]
    assert main([*argv, "--out", str(png)]) == 0
    img = Image.open(png)
    # 2 sequences (rows) of 3 context frames and 1 target (columns), 16 px tiles with 2 px gaps, under a 16 px row
    # of column labels and right of a column of task names (tests/test_install.py checks the cells and labels)
    assert img.height == 16 + 2 * 18 and img.width > 4 * 18
    assert main(["data"]) == 2
    assert "give a subcommand" in capsys.readouterr().err


def test_cli_source_errors_exit_2(tmp_path, capsys):
    rc = main(["data", "check", str(tmp_path / "missing"), "--backend", "torch", "--resolution", "16"])
    assert rc == 2 and "lavin-fast data check: error:" in capsys.readouterr().err


def test_cli_build_cache_feeds_the_cache_loader(tmp_path, capsys):
    from lavin_fast.data.latent_cache import LatentCacheLoader
    from lavin_fast.models.checkpoints import save_vae
    from lavin_fast.models.vae import build_vae

    vae = build_vae(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4).eval()
    vae_file = save_vae(vae, tmp_path / "vae.safetensors")
    out = tmp_path / "cache"
    argv = ["data", "build-cache", "demo", "--vae", str(vae_file), "--out", str(out), "--resolution", "16"]
    assert main([*argv, "--tasks", "colorization", "--backend", "torch", "--device", "cpu", "--shard-size", "4"]) == 0
    assert "colorization" in capsys.readouterr().out
    index = json.loads((out / "index.json").read_text())
    info = index["tasks"]["colorization"]
    assert list(index["tasks"]) == ["colorization"] and index["resolution"] == [16, 16]
    assert info["count"] >= 2 and len(info["shards"]) == -(-info["count"] // 4)
    assert info["latent_shape"][0] == vae.config.latent_channels and info["latent_shape"][2:] == [2, 2]
    batch = next(LatentCacheLoader(out, n_pairs=1, batch_size=2, seed=0))
    assert batch.context.shape[0] == 2 and batch.context.shape[1] == vae.config.latent_channels
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "build-cache", "demo", "--out", str(out)])
    assert exit_info.value.code == 2 and "--vae" in capsys.readouterr().err


def test_cli_bench_runs(tmp_path, capsys):
    pytest.importorskip("nvidia.dali")
    out = tmp_path / "bench.json"
    argv = ["data", "bench", "--quick", "--seconds", "0.2", "--repeats", "1", "--resolution", "32"]
    assert main([*argv, "--batch-size", "4", "--workers", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    online = "online path: torch decode + augment + VAE encode (CPU)"  # the same files, decoded and encoded
    assert [r["impl"] for r in rows] == ["PIL + torch DataLoader", "DALI (CPU)", online]
    assert all(r["images_per_s"] > 0 and r["batches"] >= 2 for r in rows)
    assert "images_per_s" in capsys.readouterr().out


def test_cli_bench_scale_rows(tmp_path):
    pytest.importorskip("nvidia.dali")
    out = tmp_path / "scale.json"
    argv = ["data", "bench", "--rows", "scale", "--plan-items", "100000", "--seconds", "0.2", "--resolution", "32"]
    assert main([*argv, "--batch-size", "4", "--workers", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["impl"].split(",")[0].split(":")[0] for r in rows] == [
        "cache plan + locate",
        "cache index host memory",
        "PIL + torch DataLoader",
        "DALI (CPU)",
        "shards",
        "shards",
        "latent cache reads",
        "latent cache reads",
    ]
    assert rows[0]["ms_per_micro_batch"] > 0 and 0 < rows[1]["bytes_per_item"] < 64


@pytest.mark.slow  # builds a demo latent cache and trains the tiny-cpu config twice (1 step each)
def test_cli_bench_cache_wait_rows(tmp_path):
    out = tmp_path / "wait.json"
    assert main(["data", "bench", "--rows", "cache-wait", "--wait-steps", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["impl"] for r in rows] == [
        "tiny-cpu from a latent cache, 0 micro-batches ahead",
        "tiny-cpu from a latent cache, 2 micro-batches ahead",
    ]
    assert all(0 <= r["data_wait_frac"] <= 1 and r["steps"] == 1 for r in rows)
