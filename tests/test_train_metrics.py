"""Per-rank metrics at logging steps (train/metrics.py): the straggler rule and the ranks.jsonl rows."""

from __future__ import annotations

import json
import logging

from standin import StandInVelocity

from lavin_fast.train.config import load_config
from lavin_fast.train.metrics import RANK_FIELDS, rank_summary, stragglers
from lavin_fast.train.sources import SyntheticLatentSource
from lavin_fast.train.trainer import Trainer


def test_straggler_is_a_rank_above_the_median_by_more_than_pct():
    # interval, busy, data wait, memory
    ranks = [[1.0, 0.50, 0.10, 1.0], [1.0, 0.52, 0.10, 1.0], [1.0, 0.55, 0.20, 1.0], [1.0, 0.50, 0.12, 1.0]]
    # work: 0.60 0.62 0.75 0.62 -> median 0.62; rank 2 is 21% above
    slow = stragglers(ranks, 20.0)
    assert [r for r, _, _ in slow] == [2] and abs(slow[0][2] - 100 * (0.75 / 0.62 - 1)) < 1e-9
    assert stragglers(ranks, 25.0) == []
    summary = rank_summary(ranks)
    assert summary["rank_data_wait_s_max"] == 0.20 and summary["rank_busy_s_min"] == 0.50


def test_logging_steps_write_one_row_per_rank(tmp_path, caplog):
    cfg = load_config(
        None,
        {"batch_size": 2, "micro_batch_size": 2, "steps": 4, "log_every": 2, "save_every": 100,
         "tensorboard": False, "progress": False, "out_dir": str(tmp_path)},
    )  # fmt: skip
    trainer = Trainer(
        cfg,
        model_factory=lambda c, d: StandInVelocity(),
        source_factory=lambda c, ctx: SyntheticLatentSource(micro_batch=2),
    )
    with caplog.at_level(logging.WARNING):
        trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "ranks.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    for row in rows:
        (only,) = row["ranks"]
        assert set(only) == set(RANK_FIELDS)
        assert 0 <= only["data_wait_s"] <= only["busy_s"] <= only["interval_s"] and only["memory_gb"] > 0
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(m["stragglers"] == 0 and "rank_busy_s_max" in m for m in metrics)
    assert "straggler" not in caplog.text
