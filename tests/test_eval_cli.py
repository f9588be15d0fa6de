"""`lavin-fast eval score / make-set` on small generated sets: file matching, per-task decoding, the JSON, errors, make-set."""

import json

import cv2
import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from lavin_fast.cli import main
from lavin_fast.eval.fid import InceptionV3Features
from lavin_fast.eval.lpips import LPIPS
from lavin_fast.eval.tasks import EvalConfig, Evaluator


def _write_rgb(path, arr):
    assert cv2.imwrite(str(path), np.ascontiguousarray(arr[..., ::-1]))


def _images(rng, n, h=40, w=36):
    base = rng.integers(0, 256, size=(n, h, w, 3)).astype(np.float64)
    base = cv2.blur(base.reshape(n * h, w, 3), (3, 3)).reshape(n, h, w, 3)  # some structure
    return base.round().astype(np.uint8)


def _eval(args, tmp_path, capsys):
    out = tmp_path / "res.json"
    rc = main(["eval", "score", *args, "--out", str(out), "--device", "cpu"])
    cap = capsys.readouterr()
    return rc, (json.loads(out.read_text()) if rc == 0 else None), cap


def test_restoration_psnr_ssim_match_skimage_and_report_unmatched(tmp_path, capsys):
    rng = np.random.default_rng(0)
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir(), gt_dir.mkdir()
    gts = _images(rng, 3)
    preds = np.clip(gts.astype(int) + rng.integers(-20, 21, size=gts.shape), 0, 255).astype(np.uint8)
    for i in range(3):
        _write_rgb(gt_dir / f"img{i}_target.png", gts[i])  # the make-set naming
        _write_rgb(gt_dir / f"img{i}_input.png", preds[i])  # query halves are skipped
        _write_rgb(pred_dir / f"img{i}.png", preds[i])
    _write_rgb(pred_dir / "stray.png", preds[0])
    _write_rgb(gt_dir / "lonely_target.png", gts[0])
    rc, res, cap = _eval(["deraining", "--pred", str(pred_dir), "--gt", str(gt_dir)], tmp_path, capsys)
    assert rc == 0, cap.err
    assert res["num_pairs"] == 3
    assert res["unmatched"] == {"pred_only": ["stray"], "gt_only": ["lonely"]}
    assert "1 predictions without ground truth: stray" in cap.err and "lonely" in cap.err
    want_psnr = np.mean([peak_signal_noise_ratio(gts[i], preds[i], data_range=255) for i in range(3)])
    want_ssim = np.mean([
        structural_similarity(gts[i] / 255.0, preds[i] / 255.0, gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False, data_range=1.0, channel_axis=2)
        for i in range(3)
    ])  # fmt: skip
    assert res["metrics"]["psnr"] == pytest.approx(want_psnr, abs=1e-4)
    assert res["metrics"]["ssim"] == pytest.approx(want_ssim, abs=1e-5)
    assert set(res["per_image"]) == {"img0", "img1", "img2"}
    assert "psnr" in cap.out and "ssim" in cap.out  # the table


def test_missing_weights_fail_with_the_option_name(tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    _write_rgb(d / "a.png", np.zeros((16, 16, 3), np.uint8))
    rc, _, cap = _eval(["colorization", "--pred", str(d), "--gt", str(d)], tmp_path, capsys)
    assert rc == 2 and "--lpips-weights" in cap.err
    rc, _, cap = _eval(["inpainting", "--pred", str(d), "--gt", str(d), "--metrics", "fid"], tmp_path, capsys)
    assert rc == 2 and "--fid-weights" in cap.err
    # without the networks, colorization's MSE alone runs
    rc, res, cap = _eval(["colorization", "--pred", str(d), "--gt", str(d), "--metrics", "mse"], tmp_path, capsys)
    assert rc == 0 and res["metrics"] == {"mse": 0.0}
    rc, _, cap = _eval(["colorization", "--pred", str(d), "--gt", str(tmp_path / "nope")], tmp_path, capsys)
    assert rc == 2 and "--gt: not a folder" in cap.err


def _weight_files(tmp_path):
    lp = LPIPS("alex")
    sd = {f"features.{k}.{p}": getattr(c, p) for k, c in lp.net.features.items() for p in ("weight", "bias")}
    sd.update({f"lin{k}.model.1.weight": lin.weight.abs() for k, lin in enumerate(lp.lins)})
    torch.save(sd, tmp_path / "lpips.pth")
    torch.save(InceptionV3Features().state_dict(), tmp_path / "inc.pth")
    return tmp_path / "lpips.pth", tmp_path / "inc.pth"


def test_lpips_and_fid_with_weight_files(tmp_path, capsys):
    rng = np.random.default_rng(1)
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir(), gt_dir.mkdir()
    gts = _images(rng, 3, 32, 32)
    for i in range(3):
        _write_rgb(gt_dir / f"{i}.png", gts[i])
        _write_rgb(pred_dir / f"{i}.png", gts[(i + 1) % 3])
    lpips_w, fid_w = _weight_files(tmp_path)
    # the command: colorization = LPIPS + MSE
    args = ["colorization", "--pred", str(pred_dir), "--gt", str(gt_dir), "--lpips-weights", str(lpips_w)]
    rc, res, cap = _eval(args, tmp_path, capsys)
    assert rc == 0, cap.err
    assert res["metrics"]["lpips"] > 0 and res["metrics"]["mse"] > 0
    # FID through the same evaluator at Inception's smallest input (299 px on CPU takes too long for CI)
    cfg = EvalConfig("inpainting", device="cpu", lpips_weights=str(lpips_w), fid_weights=str(fid_w), fid_resolution=75)
    ev = Evaluator(cfg)
    for i in range(3):
        ev.add(str(i), pred_dir / f"{i}.png", gt_dir / f"{i}.png")
    out = ev.result()
    # predictions are a permutation of the ground truth: the same feature distribution, so FID ~ 0
    assert abs(out["fid"]) < 1e-3
    assert out["lpips"] == pytest.approx(res["metrics"]["lpips"], rel=1e-5)


def test_depth_normal_and_mask_tasks(tmp_path, capsys):
    rng = np.random.default_rng(2)
    p, g, m = tmp_path / "p", tmp_path / "g", tmp_path / "m"
    for d in (p, g, m):
        d.mkdir()
    # depth: 8-bit gray rendering, 16-bit millimetre ground truth exactly affine in it, one hole (0 = no depth)
    render = rng.integers(0, 256, size=(20, 24)).astype(np.uint8)
    gt_mm = (render.astype(np.uint16) * 10 + 500).astype(np.uint16)
    gt_mm[0, 0] = 0
    cv2.imwrite(str(p / "d.png"), np.stack([render] * 3, -1))
    cv2.imwrite(str(g / "d.png"), gt_mm)
    valid = np.full((20, 24), 255, np.uint8)
    valid[5:, :] = 0
    cv2.imwrite(str(m / "d.png"), valid)
    rc, res, cap = _eval(["depth_estimation", "--pred", str(p), "--gt", str(g), "--mask", str(m)], tmp_path, capsys)
    assert rc == 0, cap.err
    assert res["metrics"]["abs_rel"] < 1e-6 and res["metrics"]["mse"] < 1e-10
    assert res["per_image"]["d"]["scale"] == pytest.approx(2.55, rel=1e-5)  # 10 mm per level * 255 / 1000

    # normals: +x everywhere in the ground truth, +y in the prediction's left half -> 90 and 0 degrees
    for d in (p, g):
        for f in d.iterdir():
            f.unlink()
    gt = np.zeros((8, 8, 3), np.uint8)
    gt[...] = (255, 128, 128)  # n = (1, ~0, ~0)
    pred = gt.copy()
    pred[:, :4] = (128, 255, 128)
    _write_rgb(g / "n.png", gt)
    _write_rgb(p / "n.png", pred)
    rc, res, cap = _eval(["surface_normal", "--pred", str(p), "--gt", str(g)], tmp_path, capsys)
    assert rc == 0, cap.err
    assert res["metrics"]["angular_mean"] == pytest.approx(45.0, abs=0.5)
    assert res["metrics"]["within_11.25"] == pytest.approx(50.0)

    # foreground masks: white on black, prediction at half resolution (resized to the ground truth's size)
    for f in list(p.iterdir()) + list(g.iterdir()):
        f.unlink()
    gtm = np.zeros((16, 16, 3), np.uint8)
    gtm[0:8, 0:8] = 255
    pm = np.zeros((8, 8, 3), np.uint8)
    pm[0:4, 0:8] = 255  # = columns 0..15 of rows 0..7 at full size: IoU 64 / 128
    _write_rgb(g / "s.png", gtm)
    _write_rgb(p / "s.png", pm)
    rc, res, cap = _eval(["foreground_segmentation", "--pred", str(p), "--gt", str(g)], tmp_path, capsys)
    assert rc == 0, cap.err
    assert res["metrics"]["miou"] == pytest.approx(0.5)
    assert res["resized_predictions"] == 1


def test_make_set_is_deterministic_and_evaluable(tmp_path, capsys):
    rng = np.random.default_rng(3)
    src = tmp_path / "clean"
    src.mkdir()
    imgs = _images(rng, 3, 48, 56)
    for i in range(3):
        _write_rgb(src / f"im{i}.png", imgs[i])
    outs = []
    for k in range(2):
        out = tmp_path / f"set{k}"
        args = ["eval", "make-set", "de_motion_blur", "--images", str(src), "--out", str(out), "--seed", "0"]
        assert main([*args, "--count", "2", "--size", "32"]) == 0
        outs.append(out)
    names = sorted(f.name for f in outs[0].iterdir())
    assert len(names) == 4 and all(n.endswith(("_input.png", "_target.png")) for n in names)
    for n in names:
        assert (outs[0] / n).read_bytes() == (outs[1] / n).read_bytes()
    stem = names[0].rsplit("_", 1)[0]
    inp = cv2.imread(str(outs[0] / f"{stem}_input.png"))
    tgt = cv2.imread(str(outs[0] / f"{stem}_target.png"))
    assert inp.shape == tgt.shape == (32, 32, 3) and np.abs(inp.astype(int) - tgt).max() > 0
    # the set is a valid --gt folder; its blurred inputs as predictions score below a perfect restoration
    pred = tmp_path / "pred"
    pred.mkdir()
    for n in names:
        if n.endswith("_input.png"):
            (pred / n.replace("_input", "")).write_bytes((outs[0] / n).read_bytes())
    rc, res, cap = _eval(["de_motion_blur", "--pred", str(pred), "--gt", str(outs[0])], tmp_path, capsys)
    assert rc == 0, cap.err
    assert res["num_pairs"] == 2 and res["unmatched"] == {"pred_only": [], "gt_only": []}
    assert 0 < res["metrics"]["ssim"] < 1
    rc = main(["eval", "make-set", "no_such_task", "--images", str(src), "--out", str(tmp_path / "x")])
    assert rc == 2 and "no builder" in capsys.readouterr().err


def test_folder_errors_are_clear(tmp_path, capsys):
    p, g, m = tmp_path / "p", tmp_path / "g", tmp_path / "m"
    for d in (p, g, m):
        d.mkdir()
    img = np.full((16, 16, 3), 200, np.uint8)
    for d in (p, g):
        _write_rgb(d / "a.png", img)
    rc, _, cap = _eval(["deraining", "--pred", str(p), "--gt", str(g), "--mask", str(m)], tmp_path, capsys)
    assert rc == 2 and "--mask applies to the depth and normal tasks" in cap.err
    rc, _, cap = _eval(["surface_normal", "--pred", str(p), "--gt", str(g), "--mask", str(m)], tmp_path, capsys)
    assert rc == 2 and "no mask for 1 pairs: a" in cap.err
    _write_rgb(p / "a_pred.png", img)  # two predictions for one name
    rc, _, cap = _eval(["deraining", "--pred", str(p), "--gt", str(g)], tmp_path, capsys)
    assert rc == 2 and "two files match the name 'a'" in cap.err
    (p / "a_pred.png").rename(p / "b.png")
    (g / "a.png").rename(g / "c.png")
    rc, _, cap = _eval(["deraining", "--pred", str(p), "--gt", str(g)], tmp_path, capsys)
    assert rc == 2 and "no file in --pred" in cap.err


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_prediction_is_an_error_naming_the_file(tmp_path, capsys, bad):
    p, g = tmp_path / "pred", tmp_path / "gt"
    p.mkdir(), g.mkdir()
    for i in range(2):
        gt = np.random.default_rng(i).uniform(0.5, 3.0, size=(8, 8))
        np.save(g / f"im{i}.npy", gt[..., None])
        pred = gt.copy()
        if i == 1:
            pred[3, 4] = bad
        np.save(p / f"im{i}.npy", pred[..., None])
    rc, res, cap = _eval(["depth_estimation", "--pred", str(p), "--gt", str(g)], tmp_path, capsys)
    assert rc == 2 and res is None
    assert "im1.npy: 1 NaN/Inf value(s) of 64" in cap.err and "Traceback" not in cap.err
