"""The few-labels + synthetic-pairs benchmark (scripts/benchmark.py, fetal_head.evaluation.benchmark): the smoke configuration
end to end on real HC18 images, and the completeness and sanity of what it writes."""

import contextlib
import csv
import io
import math
import os

import numpy as np
import pytest
from PIL import Image

from conftest import HC18, REPO, run_script

from fetal_head.evaluation.benchmark import (
    MODES,
    NOT_RUN_GPU,
    REAL,
    REAL_SYNTHETIC,
    ZERO_SHOT,
    Benchmark,
    make_config,
    planned_cells,
    select_labels,
    write_report,
)
from fetal_head.evaluation.core import image_metrics

CACHE = REPO / ".data" / "emb_cache"  # content-keyed embeddings, shared with the other tools


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One run of the smoke configuration through the command line, as CI runs it (in this process: a subprocess
    would spend ~15 s of CPU importing torch and monai again)."""
    import torch

    tmp = tmp_path_factory.mktemp("bench")
    out, work = tmp / "out", tmp / "work"
    printed, threads = io.StringIO(), torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(printed):
            status = run_script(REPO / "scripts" / "benchmark.py", "--config", "smoke", "--out", out, "--work-dir",
                                work, "--cache-dir", CACHE, "--hc18", HC18, "--threads", 1)
    finally:
        torch.set_num_threads(threads)  # --threads is meant for the script's own process
    assert status == 0, printed.getvalue()[-4000:]
    return {"out": out, "work": work, "stdout": printed.getvalue(), "cfg": make_config("smoke")}


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_every_cell_is_present_and_done(smoke):
    cfg = smoke["cfg"]
    cells = read_csv(smoke["out"] / "cells.csv")
    got = {(r["arm"], int(r["n_labels"]), int(r["seed"]), r["mode"]): r for r in cells}
    expected = {(ZERO_SHOT, 0, 0, m) for m in MODES}
    expected |= {(arm, n, s, m) for arm in (REAL, REAL_SYNTHETIC) for n in cfg.n_labels for s in cfg.seeds
                 for m in MODES}
    assert set(got) == expected
    assert all(r["status"] == "done" for r in cells)
    assert all(int(r["images"]) == cfg.test_limit for r in cells)
    # the synthetic arm really trained on synthetic pairs (the tiny generator's ellipse masks pass shape QC)
    for (arm, *_), r in got.items():
        assert (int(r["synthetic_in_training"]) > 0) == (arm == REAL_SYNTHETIC)


def test_per_image_metrics_are_complete_and_in_range(smoke):
    cfg = smoke["cfg"]
    rows = read_csv(smoke["out"] / "per_image.csv")
    by_cell = {}
    for r in rows:
        by_cell.setdefault((r["arm"], r["n_labels"], r["seed"], r["mode"]), set()).add(r["image"])
    assert len(by_cell) == 2 * (1 + 2 * len(cfg.n_labels) * len(cfg.seeds))
    images = next(iter(by_cell.values()))
    assert len(images) == cfg.test_limit and all(v == images for v in by_cell.values())  # the same test images
    for r in rows:
        assert 0.0 <= float(r["dice"]) <= 1.0
        for k in ("hd95_mm", "hc_abs_diff_mm", "hc_mm", "hc_ref_mm"):
            assert math.isfinite(float(r[k])) and float(r[k]) >= 0, (k, r)
    # a box prompt from the reference is an easy case even for the zero-shot model on these images
    box = [float(r["dice"]) for r in rows if r["arm"] == ZERO_SHOT and r["mode"] == "box"]
    assert np.mean(box) > 0.8


def test_summary_table_and_figures(smoke):
    cfg = smoke["cfg"]
    text = (smoke["out"] / "summary.md").read_text()
    assert text in smoke["stdout"]  # the CLI prints the table
    table = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| arm")]
    table = [line for line in table if not line.startswith("| ---")]
    keys = {tuple(c.strip() for c in line.strip("|").split("|")[:3]) for line in table}
    expected = {(ZERO_SHOT, "-", m) for m in MODES} | {(arm, str(n), m) for arm in (REAL, REAL_SYNTHETIC)
                                                          for n in cfg.n_labels for m in MODES}
    assert keys == expected
    assert "passed QC" in text
    for name in ("dice_vs_n.png", "hc_error_vs_n.png", "best_worst.png"):
        with Image.open(smoke["out"] / name) as im:
            im.verify()
        with Image.open(smoke["out"] / name) as im:
            assert im.format == "PNG" and im.width >= 400 and im.height >= 250


def test_finished_cells_are_not_recomputed(smoke):
    bench = Benchmark(smoke["cfg"], str(HC18), str(smoke["work"]), str(CACHE))
    paths = [bench.cell_path(a, n, s) for a, n, s, status in bench.cells() if not status]
    before = {p: os.stat(p).st_mtime_ns for p in paths}
    bench.run(progress=False)
    assert {p: os.stat(p).st_mtime_ns for p in paths} == before


def test_cells_left_to_a_gpu_are_marked_not_faked(tmp_path):
    cfg = make_config("cpu", test_limit=2)
    cells = planned_cells(cfg, 438)
    assert (REAL_SYNTHETIC, 10, 0, NOT_RUN_GPU) in cells and (REAL_SYNTHETIC, 5, 0, "") in cells
    bench = Benchmark(cfg, str(HC18), str(tmp_path / "work"), str(CACHE))
    report = write_report(bench, str(tmp_path / "out"))  # nothing run yet
    assert all(c["status"] != "done" for c in report["cells"])
    assert f"| {REAL_SYNTHETIC} | 10 | box | 0/3 | {NOT_RUN_GPU} |" in report["markdown"]
    assert not (tmp_path / "out" / "best_worst.png").exists()


def test_image_metrics(hc18):
    case = next(c for c in hc18 if c.split == "test" and c.mask_path)
    ref = case.load_mask()
    perfect = image_metrics(ref, ref, case.pixel_size_mm, case.hc_mm)
    assert perfect["dice"] == pytest.approx(1.0) and perfect["hd95_mm"] == pytest.approx(0.0)
    assert perfect["hc_abs_diff_mm"] < 0.5 and perfect["head_found"]
    shifted = image_metrics(np.roll(ref, 10, axis=1), ref, case.pixel_size_mm, case.hc_mm)
    assert shifted["dice"] < 1.0 and shifted["hd95_mm"] == pytest.approx(10 * case.pixel_size_mm, rel=0.05)
    empty = image_metrics(np.zeros_like(ref), ref, case.pixel_size_mm, case.hc_mm)
    assert empty["dice"] == 0.0 and not empty["head_found"]
    assert empty["hd95_mm"] == pytest.approx(math.hypot(*ref.shape) * case.pixel_size_mm)
    assert empty["hc_abs_diff_mm"] == pytest.approx(case.hc_mm)


def test_label_draw_is_seeded_and_within_the_pool(hc18):
    pool = [c for c in hc18 if c.split == "pool"]
    a, b, c = select_labels(pool, 5, 0), select_labels(pool, 5, 0), select_labels(pool, 5, 1)
    assert [x.name for x in a] == [x.name for x in b] != [x.name for x in c]
    assert len({x.name for x in a}) == 5 and all(x.split == "pool" for x in a)
    assert len(select_labels(pool, 10_000, 0)) == len(pool)


@pytest.mark.timeout(2400)  # the zero-shot and three fine-tuned cells: minutes on a quiet 2-core CPU, far more on a loaded one
def test_gpu_config_code_path_at_tiny_size(tmp_path):
    """The `gpu` configuration (issue 14) with its sizes shrunk to CPU scale: both generator variants (the
    semi-supervised one with unlabelled pool images and guidance), DPM sampling, FD/KID vs the real-vs-real
    yardstick and the sample grids."""
    from fetal_head.evaluation.benchmark import REAL_SYNTHETIC_SEMI, CONFIGS

    gpu = CONFIGS["gpu"]
    assert gpu.n_labels == (5, 20) and gpu.seeds == (0,) and gpu.generator_variants == ("labelled", "semi")
    cfg = make_config("gpu", n_labels=(3,), test_limit=1, train_steps=2, max_epochs=1, device="cpu",
                      diffusion_config="tiny", diffusion_overrides={"max_steps": 3, "checkpoint_every": 3},
                      sampling_steps=3, qc="shape-only", max_synthetic_pairs=2, unlabelled_pool=4, realism_images=4,
                      modes=("box",))
    bench = Benchmark(cfg, str(HC18), str(tmp_path / "work"), str(CACHE))
    assert {c[0] for c in bench.cells()} == {ZERO_SHOT, REAL, REAL_SYNTHETIC, REAL_SYNTHETIC_SEMI}
    bench.run(progress=False)
    report = write_report(bench, str(tmp_path / "out"))
    assert all(c["status"] == "done" for c in report["cells"])
    results = bench.load_cells()
    semi = results[(REAL_SYNTHETIC_SEMI, 3, 0)]["synthesis"]
    labelled = results[(REAL_SYNTHETIC, 3, 0)]["synthesis"]
    assert semi["variant"] == "semi" and semi["generator_unlabelled"] == 4 and semi["guidance_scale"] == 1.5
    assert labelled["variant"] == "labelled" and labelled["generator_unlabelled"] == 0
    assert semi["sampler"] == "dpm" and semi["sampling_steps"] == 3
    # unlabelled images come from the pool, never the labels or the test split
    unl = {i for i, _ in bench.unlabelled_for(select_labels(bench.pool, 3, 0), 0)}
    assert not unl & set(results[(REAL, 3, 0)]["labels"]) and not unl & {c.image_id for c in bench.test_cases}
    for syn in (semi, labelled):
        rl = syn["realism"]
        assert rl["real_vs_real"]["n"] == [2, 2] and math.isfinite(rl["real_vs_synthetic"]["fd"])
    assert "real-vs-real yardstick" in report["markdown"]
    for name in ("synthetic_n3_s0.png", "synthetic-semi_n3_s0.png"):
        assert (tmp_path / "out" / name).exists()
