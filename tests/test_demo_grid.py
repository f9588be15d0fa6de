"""The demo's labelled sample grid (lavin_fast.cli.demo.plot_sample_grid): its size and its rows, on made-up tiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lavin_fast.cli.demo import COLUMNS, grid_figure_size, plot_sample_grid

pytest.importorskip("matplotlib")


def _rows(n_rows: int, size: int = 32) -> list[list[torch.Tensor]]:
    """Solid tiles: row i, column j has a colour of its own (red = column, green = row)."""
    return [
        [torch.tensor([j / 4 - 1, i / 2 - 0.9, 0.8]).view(3, 1, 1).expand(3, size, size) for j in range(len(COLUMNS))]
        for i in range(n_rows)
    ]


@pytest.mark.parametrize("n_rows", [2, 4])
def test_grid_size_rows_and_labels(tmp_path, n_rows):
    labels = [f"task {i}\nseen query" for i in range(n_rows)]
    notes = [{5: "12.3 dB vs VAE answer", 6: "20.0 dB"} for _ in range(n_rows)]
    path = plot_sample_grid(_rows(n_rows), labels, notes, tmp_path / "grid.png")
    img = np.asarray(Image.open(path).convert("RGB"))
    assert (img.shape[1], img.shape[0]) == grid_figure_size(n_rows)
    # down the middle of the "answer" column: one band per row, plus the title's text above the first one
    w = img.shape[1]
    x = round(w * 0.995 - 0.5 * (w * 0.995 - 50) / len(COLUMNS))  # centre of the last column
    tile = np.asarray([0.8 * 127.5 + 127.5])
    column = img[:, x]
    blue_rows = np.abs(column[:, 2].astype(float) - tile) < 3
    starts = int(blue_rows[0]) + int(np.count_nonzero(blue_rows[1:] & ~blue_rows[:-1]))
    assert starts == n_rows
    top_of_first_panel = int(np.argmax(blue_rows))
    assert (img[:top_of_first_panel, x - 20 : x + 20] < 128).any()  # the column title, above the first row
    left = img[:, :40]  # the row labels are drawn left of the first column
    assert (left < 128).any()
