"""The demo's pictures: loss.png (the VAE fit beside the J-DiT loss) and samples.png (the labelled grid of
examples, queries, predictions and answers, with each prediction's gap). matplotlib when installed, else a plain grid."""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING

from lavin_fast._optional import optional_import

if TYPE_CHECKING:  # torch loads when a command runs, not for --help
    import torch

COLUMNS = (
    "example 1 input",
    "example 1 target",
    "example 2 input",
    "example 2 target",
    "query",
    "prediction",
    "answer through the VAE",
    "answer",
)
GRID_PANEL_IN = 1.1
"""inches per panel of samples.png (at 100 dpi)"""


def _pyplot():
    """matplotlib's pyplot (Agg), or None with a note: the demo's pictures are labelled with it."""
    try:
        matplotlib = optional_import("matplotlib")
    except ImportError as exc:
        print(f"note: loss.png is not drawn and samples.png has no labels: {exc}")
        return None
    matplotlib.use("Agg")
    return optional_import("matplotlib.pyplot")


def _plot_losses(
    losses: list[tuple[int, float]], vae_losses: list[float], vae_psnr: float | None, path: pathlib.Path
) -> pathlib.Path | None:
    """loss.png: the VAE fit's L1 (with its reconstruction PSNR) beside the J-DiT's flow-matching loss."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, (ax_vae, ax) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [1, 2]})
    if vae_losses:
        ax_vae.plot(vae_losses, lw=0.6)
        ax_vae.set_yscale("log")
    ax_vae.set_xlabel("VAE fit step")
    ax_vae.set_ylabel("L1 on crops")
    psnr_note = "" if vae_psnr is None else f"\nreconstruction PSNR {vae_psnr:.1f} dB on the demo photos"
    ax_vae.set_title(f"tiny ST-VAE fit{psnr_note}", fontsize=9)
    steps = [s for s, _ in losses]
    vals = [v for _, v in losses]
    ax.plot(steps, vals, lw=0.6, alpha=0.5, label="J-DiT loss per step")
    if len(vals) >= 10:
        k = max(len(vals) // 20, 5)
        smooth = [sum(vals[max(0, i - k + 1) : i + 1]) / len(vals[max(0, i - k + 1) : i + 1]) for i in range(len(vals))]
        ax.plot(steps, smooth, lw=2, label=f"moving mean ({k} steps)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("flow-matching loss (MSE of the velocity)")
    ax.set_title("tiny J-DiT on the demo photographs", fontsize=9)
    for a in (ax_vae, ax):
        a.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def grid_figure_size(n_rows: int, n_cols: int = len(COLUMNS)) -> tuple[int, int]:
    """(width, height) in pixels of samples.png with matplotlib: fixed inches per panel at 100 dpi."""
    return round(100 * (0.5 + GRID_PANEL_IN * n_cols)), round(100 * (0.75 + (GRID_PANEL_IN + 0.35) * n_rows))


def plot_sample_grid(rows: list[list[torch.Tensor]], labels: list[str], notes: list[dict[int, str]], path):
    """samples.png: one row per query, titled columns (COLUMNS), the row's label on its left and
    `notes[row][column]` (the PSNR figures) under a panel; without matplotlib a plain unlabelled grid."""
    from lavin_fast.flow.images import grid
    from lavin_fast.media import save_image, to_uint8

    plt = _pyplot()
    if plt is None:
        return save_image(grid(rows), path)
    w, h = grid_figure_size(len(rows), len(rows[0]))
    fig, axes = plt.subplots(len(rows), len(rows[0]), figsize=(w / 100, h / 100), squeeze=False)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            ax = axes[i][j]
            ax.imshow(to_uint8(tile), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(
                    COLUMNS[j]
                    .replace(" through", "\nthrough")
                    .replace(" target", "\ntarget")
                    .replace(" input", "\ninput"),
                    fontsize=8,
                )
            if j == 0:
                ax.set_ylabel(labels[i], fontsize=8)
            if j in notes[i]:
                ax.set_xlabel(notes[i][j], fontsize=7)
    fig.subplots_adjust(
        left=0.5 / (w / 100), right=0.995, top=1 - 0.55 / (h / 100), bottom=0.45 / (h / 100), wspace=0.06, hspace=0.45
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return pathlib.Path(path)
