"""Trainer: config, schedule, EMA, overfitting, exact resume, NaN stop, 2-process FSDP2 = 1 process."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from standin import StandInVelocity, spawned_rank, standin_training_run

from lavin_fast.train.config import ConfigError, field_docs, load_config
from lavin_fast.train.ema import EMA
from lavin_fast.train.schedule import lr_factor
from lavin_fast.train.sources import SyntheticLatentSource
from lavin_fast.train.trainer import Trainer, TrainingDiverged

BASE = {
    "batch_size": 4,
    "micro_batch_size": 4,
    "lr": 1e-3,
    "tensorboard": False,
    "progress": False,
    "log_every": 1,
    "null_prob": 0.3,
    "ema_decay": 0.9,
}


def test_config_yaml_overrides_and_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("steps: 50\nlr: 1.0e-3\nmodel_overrides: {depth: 1}\n")
    cfg = load_config(p, ["--steps", "200", "--lr", "3e-4", "--compile"])
    assert (cfg.steps, cfg.lr, cfg.compile, cfg.model_overrides) == (200, 3e-4, True, {"depth": 1})
    with pytest.raises(ConfigError, match="'stepz'.*did you mean 'steps'"):
        load_config(p, ["--stepz", "3"])
    p.write_text("lerning_rate: 1\n")
    with pytest.raises(ConfigError, match="lerning_rate"):
        load_config(p)
    with pytest.raises(ConfigError, match="'steps'.*cannot read"):
        load_config(None, ["--steps", "many"])
    with pytest.raises(ConfigError, match="schedule"):
        load_config(None, ["--schedule", "linear"])
    docs = field_docs()
    assert set(docs) == set(cfg.__dataclass_fields__) and all(docs.values())


def test_shipped_configs_load():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "configs"
    names = sorted(p.name for p in root.glob("*.yaml"))
    assert {"tiny-cpu.yaml", "0.1B.yaml", "1.0B.yaml", "3.4B.yaml"} <= set(names)
    for name in names:
        load_config(root / name)


def test_lr_schedule():
    kw = dict(steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_factor(0, schedule="constant", **kw) == pytest.approx(0.1)
    assert lr_factor(9, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_factor(50, schedule="constant", **kw) == 1.0
    assert lr_factor(55, schedule="cosine", **kw) == pytest.approx(0.55)
    assert lr_factor(100, schedule="cosine", **kw) == pytest.approx(0.1)


def test_ema_float32():
    m = torch.nn.Linear(3, 3).to(torch.bfloat16)
    ema = EMA(m, decay=0.5)
    assert all(t.dtype == torch.float32 for t in ema.shadow.values())
    before = ema.shadow["weight"].clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m)
    assert torch.allclose(ema.shadow["weight"], 0.5 * before + 0.5 * m.weight.float())


def test_loss_falls_overfitting_fixed_batch(tmp_path):
    from lavin_fast.models.dit import build_dit

    cfg = load_config(
        None, {**BASE, "steps": 40, "lr": 1e-2, "null_prob": 0.0, "out_dir": str(tmp_path), "save_every": 1000}
    )
    trainer = Trainer(
        cfg,
        model_factory=lambda c, d: build_dit("tiny", depth=1),
        source_factory=lambda c, ctx: SyntheticLatentSource(micro_batch=4, num_samples=4, size=4),
    )
    losses = [loss for _, loss in trainer.fit().losses]
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.85 * first, (first, last)


@pytest.mark.parametrize("model", ["standin", "tiny-dit"])
def test_resume_reproduces_uninterrupted_losses(tmp_path, model):
    kw = {**BASE, "batch_size": 4, "micro_batch_size": 2, "save_every": 3, "warmup_steps": 2, "schedule": "cosine"}
    full = standin_training_run({**kw, "steps": 6, "out_dir": str(tmp_path / "a")}, model=model)
    part = standin_training_run({**kw, "steps": 6, "out_dir": str(tmp_path / "b")}, interrupt_after=4, model=model)
    part["losses"] = part["losses"][:3]  # step 4 was lost in the crash: the resume restarts after step 3
    rest = standin_training_run({**kw, "steps": 6, "out_dir": str(tmp_path / "b")}, model=model)
    assert rest["resumed"] and not full["resumed"]
    assert part["losses"] + rest["losses"] == full["losses"]  # exact, CPU is deterministic
    assert rest["ema"] == full["ema"]


def test_gradient_accumulation_matches_one_big_micro_batch(tmp_path):
    kw = {**BASE, "steps": 3, "save_every": 100, "batch_size": 4}
    big = standin_training_run({**kw, "micro_batch_size": 4, "out_dir": str(tmp_path / "a")})
    accum = standin_training_run({**kw, "micro_batch_size": 1, "out_dir": str(tmp_path / "b")})  # 4 micro-steps
    assert accum["losses"] == pytest.approx(big["losses"], rel=1e-5, abs=1e-6)
    for name, values in big["ema"].items():
        assert accum["ema"][name] == pytest.approx(values, rel=1e-4, abs=1e-6), name


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path):
    class Exploding(StandInVelocity):
        calls = 0

        def forward(self, x, t, cond):
            Exploding.calls += 1
            v = super().forward(x, t, cond)
            return v * float("nan") if Exploding.calls > 4 else v

    cfg = load_config(None, {**BASE, "null_prob": 0.0, "steps": 10, "save_every": 2, "out_dir": str(tmp_path)})
    trainer = Trainer(
        cfg, model_factory=lambda c, d: Exploding(), source_factory=lambda c, ctx: SyntheticLatentSource(micro_batch=4)
    )
    with pytest.raises(TrainingDiverged, match="step 5.*not finite.*step_00000004"):
        trainer.fit()
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000004"
    assert not (tmp_path / "checkpoints" / "step_00000005").exists()


def test_batch_not_divisible_is_an_error(tmp_path):
    cfg = load_config(None, {**BASE, "batch_size": 6, "micro_batch_size": 4, "out_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="batch_size"):
        Trainer(
            cfg,
            model_factory=lambda c, d: StandInVelocity(),
            source_factory=lambda c, ctx: SyntheticLatentSource(micro_batch=4),
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two spawned processes: ~10-30 s of start-up on 2 cores
@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_two_process_gloo_matches_single_process(tmp_path, parallel):
    """The real (tiny) J-DiT: its last block has parameters without gradients, which DDP must be told about."""
    import torch.multiprocessing as mp

    kw = {**BASE, "steps": 4, "save_every": 2, "parallel": parallel, "batch_size": 4}
    single = standin_training_run({**kw, "micro_batch_size": 4, "out_dir": str(tmp_path / "one")}, model="tiny-dit")
    result = tmp_path / "two.json"
    two_kw = {**kw, "micro_batch_size": 2, "out_dir": str(tmp_path / "two")}
    mp.spawn(spawned_rank, args=(2, _free_port(), two_kw, str(result), "tiny-dit"), nprocs=2, join=True)
    two = json.loads(result.read_text())
    assert two["losses"] == pytest.approx(single["losses"], rel=1e-5, abs=1e-6)
    for name, values in single["ema"].items():
        assert two["ema"][name] == pytest.approx(values, rel=1e-4, abs=1e-5), name
    # the 2-process run's checkpoint exists and was written by both ranks
    ckpt = tmp_path / "two" / "checkpoints" / "step_00000004"
    assert (ckpt / "trainer_rank0.json").is_file() and (ckpt / "trainer_rank1.json").is_file()
    # DCP reshards: the 2-process checkpoint resumes in one process
    more = standin_training_run(
        {**kw, "steps": 5, "micro_batch_size": 4, "out_dir": str(tmp_path / "two")}, model="tiny-dit"
    )
    assert more["resumed"] and more["step"] == 5 and len(more["losses"]) == 1


@pytest.mark.parametrize(
    "kw", [dict(hidden_size=64, depth=2, num_heads=4), dict(hidden_size=288, depth=2, num_heads=4, kv_group=2)]
)
def test_mfu_flop_count_matches_flop_counter(kw):
    from torch.utils.flop_counter import FlopCounterMode

    from lavin_fast.models.dit import build_dit
    from lavin_fast.train.metrics import dit_forward_flops, dit_shape_of

    model = build_dit("tiny", **kw)
    x, c, t = torch.randn(2, 16, 1, 4, 4), torch.randn(2, 16, 5, 4, 4), torch.rand(2)
    with FlopCounterMode(display=False) as counter:
        model(x, t, c)
    shape = dit_shape_of(model)
    # attention is a custom op that the counter does not see: compare the rest exactly
    assert counter.get_total_flops() == 2 * dit_forward_flops(shape, 5 * 4, 4, attention=False)
    assert dit_forward_flops(shape, 20, 4) > dit_forward_flops(shape, 20, 4, attention=False)


def _tiny_dit_trainer(tmp_path, **over):
    cfg = load_config(
        None,
        {
            **BASE,
            "null_prob": 0.0,
            "model": "tiny",
            "model_overrides": {"depth": 1},
            "steps": 2,
            "save_every": 100,
            "out_dir": str(tmp_path),
            **over,
        },
    )
    return Trainer(cfg, source_factory=lambda c, ctx: SyntheticLatentSource(micro_batch=4, size=4, device=ctx.device))


def test_activation_checkpointing_gives_the_same_losses(tmp_path):
    plain = _tiny_dit_trainer(tmp_path / "a")
    ckpt = _tiny_dit_trainer(tmp_path / "b", grad_checkpointing=True)
    assert ckpt.model.cfg.grad_checkpointing and not plain.model.cfg.grad_checkpointing
    assert [v for _, v in ckpt.fit().losses] == pytest.approx([v for _, v in plain.fit().losses], rel=1e-6)


@pytest.mark.gpu
def test_trainer_on_cuda_bf16_reports_mfu(tmp_path):
    trainer = _tiny_dit_trainer(tmp_path, device="cuda", precision="auto", peak_tflops=100.0, log_every=1)
    assert trainer.bf16 and trainer.optimizer.defaults.get("fused")
    losses = [v for _, v in trainer.fit().losses]
    assert all(torch.isfinite(torch.tensor(losses)))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["mfu"] < 1 for r in rows)
    assert all(t.dtype == torch.float32 for t in trainer.ema.shadow.values())


def test_vae_encoding_of_images_and_clips():
    from lavin_fast.models.vae import build_vae
    from lavin_fast.models.vae_latents import encode_frames, encode_segments
    from lavin_fast.seeding import keyed_generator

    vae = build_vae(block_out_channels=(8, 8, 8), layers_per_block=1, norm_num_groups=4)
    pix = torch.rand(2, 3, 7, 16, 16) * 2 - 1  # image, image, then a 5-frame clip
    gens = [keyed_generator("cpu", 0, i) for i in range(2)]
    z = encode_segments(vae, pix, (1, 1, 5), gens)
    assert z.shape == (2, 16, 1 + 1 + 2, 4, 4)
    # each still image on its own: the same as encoding that frame alone (posterior mode)
    alone = vae.normalize_latents(vae.encode(pix[:, :, 1:2]).mode())
    assert torch.allclose(encode_frames(vae, pix[:, :, :2], None)[:, :, 1:2], alone, atol=1e-5)
    again = encode_segments(vae, pix, (1, 1, 5), [keyed_generator("cpu", 0, i) for i in range(2)])
    assert torch.equal(z, again)  # keyed posterior samples
    with pytest.raises(ValueError, match="segments"):
        encode_segments(vae, pix, (1, 5), gens)
