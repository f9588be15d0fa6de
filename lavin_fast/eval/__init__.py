"""lavin_fast.eval: the paper's metrics and protocol (seed B.2), `lavin-fast eval`.

- `metrics`: MSE, PSNR, SSIM, affine-aligned AbsRel/MSE, angular error, mask IoU on batched tensors.
- `lpips`, `fid`: the LPIPS and Inception-v3 networks (weights from user-given files) and the Frechet distance.
- `tasks`: per-task metric sets, file decoding rules and the data-set `Evaluator`.
- `cli`: the command. Conventions and weight files: docs/eval.md.
Submodules are imported on use, so `import lavin_fast.eval` stays light.
"""
