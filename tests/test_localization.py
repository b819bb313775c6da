"""Heatmaps against boxes (pointing game, energy, IoU; box placement under each resize policy; box lists and
their bad rows) and the saliency sanity checks (Adebayo et al. 2018)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medsight.cli import main
from medsight.data.transforms import AspectResize
from medsight.explainers.localization import (Box, BoxListError, box_in_view, box_mask, centre_prior,
                                              energy_ratios, match_boxes, pointing_hits, read_boxes, score_maps,
                                              threshold_ious)
from medsight.explainers.sanity import (SIMILAR, cascading_randomization, data_randomization, rank_correlation,
                                        reinitialize, ssim)


def _box(x, y, w, h, width=64, height=64, image="a.png", finding="patch", row=2) -> Box:
    return Box(image, finding, x, y, w, h, width, height, row)


# --- scores: known answers and an independent computation -------------------------------------------------

def test_scores_on_a_hand_computed_map():
    # 4x4 map, box covering the 2x2 top-left block (x 0..2, y 0..2)
    m = np.array([[0, 1, 0, 0],
                  [1, 4, 0, 0],
                  [0, 0, 2, 0],
                  [0, 0, 0, 2]], dtype=float)[None]
    box = np.array([[0.0, 0.0, 2.0, 2.0]])
    s = score_maps(m, box, tolerance=0.0, iou_threshold=0.5)
    assert s["pointing"][0] == 1  # the maximum (4) sits at pixel (1, 1), inside
    # heat inside 6 of 10 = 0.6; the box is 4 of 16 pixels = 0.25; ratio 2.4
    assert s["energy_ratio"][0] == pytest.approx(2.4)
    # at 0.5 x max = 2: pixels (1,1), (2,2), (3,3); with the box (4 pixels): intersection 1, union 6
    assert s["iou"][0] == pytest.approx(1 / 6)


def test_pointing_tolerance_is_a_distance_to_the_box():
    m = np.zeros((1, 8, 8))
    m[0, 0, 6] = 1.0  # pixel centre (6.5, 0.5); box x 0..4: 2.5 px to its right edge
    box = np.array([[0.0, 0.0, 4.0, 4.0]])
    assert pointing_hits(m, box, tolerance=2.4)[0] == 0
    assert pointing_hits(m, box, tolerance=2.5)[0] == 1
    assert pointing_hits(np.zeros((1, 8, 8)), box, tolerance=100)[0] == 0  # an empty map points nowhere


def _loop_scores(m: np.ndarray, b: np.ndarray, tol: float, thr: float) -> tuple[float, float, float]:
    """Pixel by pixel, with no numpy vectorization: the reference the library must agree with."""
    h, w = m.shape
    inside = [[b[0] <= j + 0.5 < b[2] and b[1] <= i + 0.5 < b[3] for j in range(w)] for i in range(h)]
    best, bi, bj = -1.0, 0, 0
    for i in range(h):
        for j in range(w):
            if m[i, j] > best:
                best, bi, bj = m[i, j], i, j
    cx, cy = bj + 0.5, bi + 0.5
    dx = max(b[0] - cx, 0, cx - b[2])
    dy = max(b[1] - cy, 0, cy - b[3])
    hit = float((dx * dx + dy * dy) ** 0.5 <= tol)
    total = sum(m[i, j] for i in range(h) for j in range(w))
    heat_in = sum(m[i, j] for i in range(h) for j in range(w) if inside[i][j])
    area = sum(inside[i][j] for i in range(h) for j in range(w)) / (h * w)
    region = [[m[i, j] >= thr * best for j in range(w)] for i in range(h)]
    inter = sum(region[i][j] and inside[i][j] for i in range(h) for j in range(w))
    union = sum(region[i][j] or inside[i][j] for i in range(h) for j in range(w))
    return hit, heat_in / total / area, inter / union


def test_scores_agree_with_an_independent_computation():
    rng = np.random.default_rng(3)
    maps = rng.random((12, 16, 16)) ** 3
    boxes = []
    for _ in range(12):
        x0, y0 = rng.uniform(0, 10, 2)
        boxes.append([x0, y0, x0 + rng.uniform(1.5, 6), y0 + rng.uniform(1.5, 6)])
    boxes = np.array(boxes)
    s = score_maps(maps, boxes, tolerance=1.5, iou_threshold=0.4)
    for k in range(12):
        hit, energy, iou = _loop_scores(maps[k], boxes[k], 1.5, 0.4)
        assert s["pointing"][k] == hit
        assert s["energy_ratio"][k] == pytest.approx(energy)
        assert s["iou"][k] == pytest.approx(iou)


def test_uniform_map_scores_one_and_the_centre_prior_beats_it_on_a_centre_box():
    masks = box_mask((24, 24, 40, 40), (64, 64))[None]
    assert energy_ratios(np.ones((1, 64, 64)), masks)[0] == pytest.approx(1.0)
    assert energy_ratios(centre_prior(64)[None], masks)[0] > 2
    assert energy_ratios(centre_prior(64)[None], box_mask((0, 0, 10, 10), (64, 64))[None])[0] < 0.2
    assert threshold_ious(np.ones((1, 64, 64)), masks)[0] == pytest.approx(masks.sum() / 64 ** 2)


# --- boxes into the model's frame ---------------------------------------------------------------------------

@pytest.mark.parametrize("policy,expected", [("squash", (16, 16, 48, 48)), ("pad", (16, 24, 48, 40)),
                                             ("crop", (0, 16, 64, 48))])
def test_box_in_view_follows_the_resize_policy(policy, expected):
    # a 200 x 100 (w x h) image; the list's coordinates are for 400 x 200, so every number halves first
    b = _box(100, 50, 200, 100, width=400, height=200)
    assert box_in_view(b, (100, 200), 64, policy) == pytest.approx(expected)


@pytest.mark.parametrize("policy", ["squash", "pad", "crop"])
def test_box_lands_where_the_transform_puts_the_pixels(policy):
    img = torch.zeros(1, 90, 150)
    img[:, 30:60, 45:90] = 1.0  # the box x 45..90, y 30..60
    seen = AspectResize(60, policy)(img)[0] > 0.5
    ys, xs = np.nonzero(seen.numpy())
    v = box_in_view(_box(45, 30, 45, 30, width=150, height=90), (90, 150), 60, policy)
    assert v[0] == pytest.approx(xs.min(), abs=1) and v[2] == pytest.approx(xs.max() + 1, abs=1)
    assert v[1] == pytest.approx(ys.min(), abs=1) and v[3] == pytest.approx(ys.max() + 1, abs=1)


def test_box_in_view_scales_each_axis_by_its_own_coordinate_size():
    # coordinates for a 100 x 100 image, drawn on a 200 x 100 (w x h) one: x doubles, y stays
    v = box_in_view(_box(10, 10, 20, 20, width=100, height=100), (100, 200), 64, "squash")
    assert v == pytest.approx((6.4, 6.4, 19.2, 19.2))


def test_a_box_cut_away_by_the_crop_is_none():
    assert box_in_view(_box(0, 0, 20, 20, width=200, height=100), (100, 200), 64, "crop") is None


# --- box lists ------------------------------------------------------------------------------------------------

NIH = ("Image Index,Finding Label,Bbox [x,y,w,h]\n"
       "00000032_037.png,Infiltrate,192,256,320,128\n"
       "00000181_061.png,Atelectasis,100.5,200.25,50,60\n")


def test_nih_format_scaled_and_infiltrate_named_infiltration(tmp_path):
    p = tmp_path / "BBox_List_2017.csv"
    p.write_text(NIH)
    boxes, problems = read_boxes(p)
    assert not problems and len(boxes) == 2
    assert (boxes[0].width, boxes[0].height, boxes[0].row) == (1024, 1024, 2)
    assert box_in_view(boxes[0], (64, 64), 64) == pytest.approx((12, 16, 32, 24))  # 1/16 of the originals
    classes = ["Atelectasis", "Cardiomegaly", "Infiltration"]
    m = match_boxes(boxes, {"00000032_037.png": Path("x"), "00000181_061.png": Path("y")}, classes)
    assert [(b.finding, k) for b, _, k in m.boxes] == [("Infiltrate", 2), ("Atelectasis", 0)]


def test_plain_list_needs_the_coordinates_size(tmp_path):
    p = tmp_path / "boxes.csv"
    p.write_text("image,finding,x,y,w,h\na.png,patch,1,2,3,4\n")
    with pytest.raises(BoxListError, match="--box-size"):
        read_boxes(p)
    boxes, _ = read_boxes(p, size=(32, 32))
    assert (boxes[0].width, boxes[0].x, boxes[0].h) == (32, 1, 4)


def test_bad_rows_are_named_one_by_one(tmp_path):
    p = tmp_path / "boxes.csv"
    p.write_text("image,finding,x,y,w,h,width,height\n"
                 "a.png,patch,1,2,3,4,32,32\n"
                 "b.png,patch,30,2,8,4,32,32\n"      # row 3: x to 38 on a 32-px image
                 "c.png,patch,one,2,3,4,32,32\n"     # row 4: not a number
                 "../d.png,patch,1,2,3,4,32,32\n"    # row 5: a path, not a file name
                 "e.png,patch,1,2,0,4,32,32\n")      # row 6: empty box
    boxes, problems = read_boxes(p)
    assert [b.image for b in boxes] == ["a.png"]
    assert any(q.startswith("row 3 (b.png, patch)") and "outside" in q for q in problems)
    assert any(q.startswith("row 4 (c.png") and "numbers" in q for q in problems)
    assert any(q.startswith("row 5") and "file name" in q for q in problems)
    assert any(q.startswith("row 6") and "positive" in q for q in problems)


def test_a_list_with_no_usable_row_is_refused(tmp_path):
    p = tmp_path / "boxes.csv"
    p.write_text("image,finding,x,y,w,h,width,height\nb.png,patch,30,2,8,4,32,32\n")
    with pytest.raises(BoxListError, match="row 2"):
        read_boxes(p)
    (tmp_path / "other.csv").write_text("path,label\na.png,1\n")
    with pytest.raises(BoxListError, match="lacks column"):
        read_boxes(tmp_path / "other.csv")


def test_unknown_images_and_findings_are_named():
    boxes = [_box(1, 1, 2, 2, image="a.png", finding="Mass", row=2),
             _box(1, 1, 2, 2, image="zzz.png", finding="patch", row=3)]
    m = match_boxes(boxes, {"a.png": Path("a.png")}, ["none", "patch"], where="/data/x")
    assert not m.boxes
    assert any(q.startswith("row 2 (a.png, Mass)") and "no finding 'Mass'" in q for q in m.problems)
    assert any(q.startswith("row 3 (zzz.png") and "no image named zzz.png in /data/x" in q for q in m.problems)


# --- sanity checks ----------------------------------------------------------------------------------------------

def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al.'s SSIM with scipy's correlation on the valid region, written independently."""
    from scipy.signal import correlate2d

    t = np.arange(11) - 5.0
    g = np.exp(-t ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    f = lambda z: correlate2d(z, w, mode="valid")  # noqa: E731
    ma, mb = f(a), f(b)
    va, vb, cab = f(a * a) - ma ** 2, f(b * b) - mb ** 2, f(a * b) - ma * mb
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return float((((2 * ma * mb + c1) * (2 * cab + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))).mean())


def test_ssim_and_rank_correlation_against_references():
    rng = np.random.default_rng(0)
    a = rng.random((3, 24, 24))
    b = np.clip(a + rng.normal(0, 0.3, a.shape), 0, 1)
    got = ssim(a, b)
    for k in range(3):
        assert got[k] == pytest.approx(_ssim_reference(a[k], b[k]), abs=1e-9)
    assert ssim(a, a) == pytest.approx(1.0)
    assert rank_correlation(a, a) == pytest.approx(1.0)
    assert rank_correlation(a, 1 - a) == pytest.approx(-1.0)
    assert rank_correlation(np.zeros((1, 4, 4)), a[:1, :4, :4])[0] == 0.0  # a constant map has no ranking


@pytest.fixture(scope="module")
def tiny_model(tiny_run):
    from medsight.inference import Predictor

    return Predictor(tiny_run / "best.pt", "cpu")


def _test_batch(pred, tiny_run: Path, n: int = 8) -> tuple[torch.Tensor, list[int]]:
    from medsight.data.imageio import read_image

    files = sorted((tiny_run.parent / "images" / "pneumonia").glob("*.png"))[:n]
    x = torch.cat([pred.preprocess(read_image(f)) for f in files])
    return x, [1] * len(files)


def test_cascading_randomization_drops_similarity(tiny_model, tiny_run):
    x, cls = _test_batch(tiny_model, tiny_run)
    before = {k: v.clone() for k, v in tiny_model.model.state_dict().items()}
    r = cascading_randomization(tiny_model.model, x, cls, ["gradcam"], n_boot=200)
    steps = r["methods"]["gradcam"]["steps"]
    assert r["order"][0] == "head" and len(steps) == len(r["order"]) >= 3
    assert steps[-1]["spearman"]["mean"] < SIMILAR and steps[-1]["spearman"]["n"] == 8
    assert steps[-1]["ssim"]["mean"] < 0.9
    assert r["methods"]["gradcam"]["explains_model"] is True
    after = tiny_model.model.state_dict()  # the trained model itself is untouched
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_maps_that_ignore_the_model_fail_the_data_test(tiny_model, tiny_run):
    x, cls = _test_batch(tiny_model, tiny_run, 4)
    same = data_randomization(tiny_model.model, tiny_model.model, x, cls, ["gradcam"], n_boot=100)
    assert same["methods"]["gradcam"]["spearman"]["mean"] == pytest.approx(1.0)
    assert same["methods"]["gradcam"]["explains_model"] is False
    assert "do not explain the model" in same["methods"]["gradcam"]["verdict"]


def test_reinitialize_touches_only_the_named_layers(tiny_model):
    import copy

    m = copy.deepcopy(tiny_model.model)
    head = {n for n, _ in m.named_parameters() if n.startswith("head")}
    old = {n: p.detach().clone() for n, p in m.named_parameters()}
    reinitialize(m, head, seed=0)
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, old[n])}
    assert changed and changed <= head


# --- end to end -------------------------------------------------------------------------------------------------

def _boxes_of_blobs(folder: Path, n: int = 6) -> list[list]:
    rows = []
    for f in sorted(folder.glob("*.png"))[:n]:
        ys, xs = np.nonzero(np.array(Image.open(f)) >= 230)
        rows.append([f.name, "pneumonia", xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min(), 32, 32])
    return rows


def test_cli_boxes_and_sanity_end_to_end(tiny_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    rows = _boxes_of_blobs(tiny_run.parent / "images" / "pneumonia")
    rows.append(["normal_000.png", "Effusion", 1, 1, 4, 4, 32, 32])     # a finding the model lacks
    rows.append(["nowhere.png", "pneumonia", 1, 1, 4, 4, 32, 32])       # no such image
    rows.append(["normal_001.png", "pneumonia", 1, 1, 4, 4, 64, 32])    # coordinates for another shape
    p = tmp_path / "boxes.csv"
    p.write_text("image,finding,x,y,w,h,width,height\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    out = tmp_path / "checks"
    assert main(["explain", str(run), "--boxes", str(p), "--sanity", "--out", str(out), "--store",
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr()
    assert "6 box(es) scored, 3 row(s) left out" in printed.out
    r = json.loads((out / "localization.json").read_text())
    loc = r["localization"]
    assert set(loc["methods"]) == {"gradcam", "centre", "random"}
    assert loc["methods"]["gradcam"]["overall"]["pointing"]["n"] == 6
    assert loc["methods"]["gradcam"]["findings"]["pneumonia"]["iou"]["ci95"] is not None
    assert loc["settings"]["tolerance_px"] == pytest.approx(15 * 32 / 224, abs=1e-3)
    from medsight.inference import Predictor
    from medsight.models import cam_target  # the layer the maps came from, and their registration, are recorded

    assert loc["settings"]["target_layer"] == cam_target(Predictor(run / "best.pt", "cpu").model, img_size=32).name
    assert len(loc["settings"]["cell_offset_px"]) == 2
    skipped = " ".join(loc["skipped"])
    assert "row 8 (normal_000.png, Effusion)" in skipped and "no finding 'Effusion'" in skipped
    assert "row 9 (nowhere.png" in skipped
    assert "row 10 (normal_001.png" in skipped and "64x32" in skipped
    assert all((out / "boxes" / b["overlay"]).is_file() for b in loc["boxes"])
    assert "pointing game" in (out / "report.html").read_text()
    assert r["sanity"]["cascading"]["methods"]["gradcam"]["steps"][0]["randomized"] == "head"
    stored = json.loads((run / "metrics.json").read_text())
    assert stored["localization"]["boxes"] == loc["boxes"]
    card = (run / "model_card.md").read_text()
    assert "Do the heatmaps point at the finding?" in card and "Saliency sanity checks" in card
    assert "Saliency sanity checks" in (run / "report.html").read_text()


def test_cli_boxes_on_an_npz_run_ask_for_the_image_folder(tiny_run, tmp_path, capsys):
    from medsight.checkpoint import load_checkpoint, save_atomic

    ckpt = load_checkpoint(tiny_run / "best.pt")
    ckpt["config"]["data"]["path"] = str(tmp_path / "images.npz")  # a run trained on arrays: no file names
    save_atomic(ckpt, tmp_path / "best.pt")
    p = tmp_path / "boxes.csv"
    p.write_text("image,finding,x,y,w,h,width,height\na.png,pneumonia,1,1,4,4,32,32\n")
    assert main(["explain", str(tmp_path / "best.pt"), "--boxes", str(p), "--out", str(tmp_path / "o")]) == 2
    assert "give the folder(s) holding the boxed images" in capsys.readouterr().err
