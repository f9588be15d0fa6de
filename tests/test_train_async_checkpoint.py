"""Async checkpoints: training goes on while a save is written, and a process killed mid-save resumes exactly from
the previous checkpoint (the interrupted one stays `step_N.tmp`, never `latest`)."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from standin import standin_training_run

BASE = {
    "batch_size": 4,
    "micro_batch_size": 2,
    "lr": 1e-3,
    "tensorboard": False,
    "progress": False,
    "log_every": 1,
    "null_prob": 0.3,
    "ema_decay": 0.9,
    "save_every": 2,
    "steps": 6,
    "warmup_steps": 2,
    "schedule": "cosine",
}

# The child trains the stand-in; the hashing of the step-4 checkpoint (done in the save thread, after DCP wrote
# the shards) blocks forever, and every step the main thread finishes is appended to `steps.txt`.
CHILD = """
import json, pathlib, sys, time
sys.path.insert(0, {tests!r})
import lavin_fast.train.checkpoint_io as cio
from standin import StandInVelocity
from lavin_fast.train.config import load_config
from lavin_fast.train.sources import SyntheticLatentSource
from lavin_fast.train.trainer import Trainer

real = cio._sha256
def blocking(path, fsync=False):
    if path.parent.name == "step_00000004.tmp":
        time.sleep(3600)  # the test kills the process here
    return real(path, fsync)
cio._sha256 = blocking
cfg = load_config(None, json.loads({overrides!r}))
trainer = Trainer(cfg, model_factory=lambda c, d: StandInVelocity(),
                  source_factory=lambda c, ctx: SyntheticLatentSource(micro_batch=2, num_samples=16))
log = pathlib.Path({log!r})
trainer.fit(on_step=lambda step, loss: log.open("a").write(f"{{step}}\\n"))
"""


@pytest.mark.slow  # one child process
def test_kill_during_an_async_save_then_resume_exactly(tmp_path):
    full = standin_training_run({**BASE, "out_dir": str(tmp_path / "full")}, num_samples=16)
    run = tmp_path / "run"
    steps_log = tmp_path / "steps.txt"
    script = CHILD.format(
        tests=str(pathlib.Path(__file__).parent),
        overrides=json.dumps({**BASE, "out_dir": str(run)}),
        log=str(steps_log),
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        # steps 5 and 6 are trained while the step-4 save is still being written (it never finishes)
        while not (steps_log.is_file() and "6" in steps_log.read_text().split()):
            assert child.poll() is None, child.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "the child did not reach step 6"
            time.sleep(0.2)
        ckpts = run / "checkpoints"
        assert (ckpts / "step_00000004.tmp").is_dir() and not (ckpts / "step_00000004").exists()
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
        child.stderr.close()
    assert (ckpts / "latest").read_text() == "step_00000002"
    rest = standin_training_run({**BASE, "out_dir": str(run)}, num_samples=16)
    assert rest["resumed"] and not (ckpts / "step_00000004.tmp").exists()  # the orphan is removed at start
    assert rest["losses"] == full["losses"][2:]  # exact: CPU is deterministic
    assert rest["ema"] == full["ema"]
