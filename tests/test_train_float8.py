"""float8 training (train/float8.py, torchao): refused on the CPU and below compute capability 8.9; the conversion
(in torchao's emulation mode on the CPU) swaps exactly the block linears and stays close to the plain model."""

from __future__ import annotations

import pytest
import torch

from lavin_fast.models.dit import build_dit
from lavin_fast.train.config import ConfigError, load_config
from lavin_fast.train.sources import SyntheticLatentSource
from lavin_fast.train.trainer import Trainer


def _cfg(tmp_path, **over):
    return load_config(
        None,
        {"batch_size": 2, "micro_batch_size": 2, "steps": 3, "save_every": 100, "tensorboard": False,
         "progress": False, "float8": True, "out_dir": str(tmp_path), **over},
    )  # fmt: skip


def test_float8_is_refused_on_the_cpu_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"'float8'.*CUDA GPU with float8.*this run is on cpu"):
        Trainer(
            _cfg(tmp_path, device="cpu"),
            model_factory=lambda c, d: build_dit("tiny", hidden_size=32, depth=1, num_heads=2),
            source_factory=lambda c, ctx: SyntheticLatentSource(micro_batch=2),
        )


def test_float8_is_refused_below_compute_capability_8_9(monkeypatch):
    from lavin_fast.train import float8

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100-SXM4-80GB")
    why = float8.float8_refusal(torch.device("cuda", 0))
    assert "8.9" in why and "A100" in why and "8.0" in why
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    assert float8.float8_refusal(torch.device("cuda", 0)) is None


def test_emulated_conversion_swaps_the_block_linears_only():
    pytest.importorskip("torchao")
    from torchao.float8.float8_linear import Float8Linear

    from lavin_fast.train.float8 import convert_to_float8

    torch.manual_seed(0)
    model = build_dit("tiny", hidden_size=64, depth=2, num_heads=4)
    with torch.no_grad():
        for p in model.parameters():  # away from the zero-initialised output layer, so outputs are not all 0
            p.normal_(0, 0.05)
    plain = build_dit("tiny", hidden_size=64, depth=2, num_heads=4)
    plain.load_state_dict(model.state_dict())
    names = convert_to_float8(model, torch.device("cpu"), emulate=True)
    kinds = {n: type(m) for n, m in model.named_modules()}
    assert names and all(kinds[n] is Float8Linear for n in names)
    assert all(n.startswith("blocks.") for n, k in kinds.items() if k is Float8Linear)
    assert not any(k is Float8Linear for n, k in kinds.items() if not n.startswith("blocks."))
    g = torch.Generator().manual_seed(1)
    x, cond, t = torch.randn(2, 16, 1, 8, 8, generator=g), torch.randn(2, 16, 3, 8, 8, generator=g), torch.rand(2)
    a, b = model(x, t, cond), plain(x, t, cond)
    err = ((a - b).norm() / b.norm()).item()
    assert 0 < err < 0.1, err  # float8 rounding happened, and stayed small
    a.square().mean().backward()
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all() for n, p in model.named_parameters() if "blocks.0" in n
    )


@pytest.mark.gpu
def test_float8_training_on_a_float8_gpu(tmp_path):
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs a GPU with float8 (compute capability 8.9+)")
    trainer = Trainer(
        _cfg(tmp_path, device="cuda", precision="bf16"),
        model_factory=lambda c, d: build_dit("tiny", hidden_size=128, depth=2, num_heads=4),
        source_factory=lambda c, ctx: SyntheticLatentSource(micro_batch=2, device=ctx.device),
    )
    losses = [v for _, v in trainer.fit().losses]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
