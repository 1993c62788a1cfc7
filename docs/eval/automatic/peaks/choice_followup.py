"""Follow-up on the choice among the automatic route's candidates (2026-11-27, second session), on the dumps of
peak_candidates.py (K=2), restricted to the shipped candidate set (one extra peak). Full-resolution Dice of the chosen
candidate before the final re-box; images below 0.80 after "<0.8:".

1. the listwise verifier against the shipped logistic one, on every cell with a full test dump;
2. is the verifier short of training data? fitted on half of the test images (2-fold: ~78 images whose candidates
   the decoder never trained on) instead of the 20 labels;
3. consensus: how much each candidate agrees with the others (score-weighted mean IoU, share of near-duplicates);
4. the raw image around each candidate's outline (mean intensity in bands inside / outside it, a ridge filter).

usage: python choice_followup.py [CELL ...]   (default: n20_s0 n20_s1; a study script, not run by CI)
"""
import os
import sys

import numpy as np
from scipy import ndimage

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from choose import REPO, evaluate, fit_listwise, fit_lr, fmt, load, sub  # noqa: E402

from fetal_head.io import read_image  # noqa: E402
from fetal_head.io.hc18 import read_cases  # noqa: E402

SHIPPED = lambda s: s != "peak1"  # noqa: E731


def masks(r):
    return np.unpackbits(r["masks"], axis=-1).astype(bool)


def with_columns(r, cols):
    q = dict(r)
    if r["n"]:
        q["X"] = np.concatenate([r["X"].astype(np.float32), cols.astype(np.float32)], 1)
    return q


def consensus(r):
    if not r["n"]:
        return r, None
    m = masks(r).reshape(r["n"], -1).astype(np.float32)
    inter = m @ m.T
    a = m.sum(1)
    iou = inter / (a[:, None] + a[None] - inter + 1e-6)
    np.fill_diagonal(iou, 0)
    w = r["score"]
    agree = (iou * w[None]).sum(1) / (w.sum() - w + 1e-6)
    dup = (iou > 0.8).sum(1) / max(1, r["n"] - 1)
    return with_columns(r, np.stack([agree, dup], 1)), agree


def intensity(r, cases):
    if not r["n"]:
        return r
    img = read_image(cases[r["id"]].image_path).astype(np.float32)
    img = img.mean(-1) if img.ndim == 3 else img
    m = masks(r)
    h, w = img.shape
    s = 256 / max(h, w)  # the decoder's low-resolution grid: the long side is 256
    small = ndimage.zoom(img, (np.ceil(h * s) / h, np.ceil(w * s) / w), order=1)[: m.shape[1], : m.shape[2]]
    m = m[:, : small.shape[0], : small.shape[1]]
    small = (small - small.mean()) / (small.std() + 1e-6)
    ridge = small - ndimage.gaussian_filter(small, 3)
    rows = []
    for mk in m:
        d_in, d_out = ndimage.distance_transform_edt(mk), ndimage.distance_transform_edt(~mk)
        row = []
        for k in (1.5, 3, 6):
            bi, bo = (d_in > 0) & (d_in <= k), (d_out > 0) & (d_out <= k)
            a, b = (small[bi].mean() if bi.any() else 0), (small[bo].mean() if bo.any() else 0)
            row += [a, b, a - b]
        edge = ((d_in > 0) & (d_in <= 4)) | ((d_out > 0) & (d_out <= 1.5))
        row += [ridge[edge].mean() if edge.any() else 0, small[mk].mean() if mk.any() else 0]
        rows.append(row)
    return with_columns(r, np.array(rows))


def main():
    cells = sys.argv[1:] or ["n20_s0", "n20_s1"]
    print("1. listwise vs logistic (c of the listwise fit: its weight on the log-likelihood)")
    for cell in cells:
        pfx = f"p2_{cell}_loc_nogate"
        L, T = sub(load("labels", pfx), SHIPPED), sub(load("test", pfx), SHIPPED)
        if len(T) != 157:
            print(f"  {cell}: no full test dump ({len(T)} images)")
            continue
        out = [f"score only {fmt(evaluate(lambda r: r['score'], T))}", f"logistic {fmt(evaluate(fit_lr(L), T))}"]
        out += [f"listwise c={c} {fmt(evaluate(fit_listwise(L, c), T))}" for c in (0.03, 0.1, 0.3, 1.0)]
        out.append(f"oracle {fmt(np.array([r['dfull'].max() if r['n'] else 0 for r in T]))}")
        print(f"  {cell} ({len(L)} labels): " + " | ".join(out), flush=True)

    pfx = f"p2_{cells[0]}_loc_nogate"
    L, T = sub(load("labels", pfx), SHIPPED), sub(load("test", pfx), SHIPPED)
    print(f"2. {cells[0]}: fitted on the labels vs on half of the test images (2-fold)")
    halves = np.array_split(np.random.default_rng(0).permutation(len(T)), 2)
    for name, fit in (("logistic", fit_lr), ("listwise c=0.1", lambda d: fit_listwise(d, 0.1))):
        cv = np.zeros(len(T))
        for tr, te in ((halves[0], halves[1]), (halves[1], halves[0])):
            f = fit([T[i] for i in tr])
            cv[te] = evaluate(f, [T[i] for i in te])
        print(f"  {name}: labels {fmt(evaluate(fit(L), T))} | half the test images {fmt(cv)}", flush=True)

    print(f"3. {cells[0]}: consensus among the candidates")
    Lc, Tc = [consensus(r)[0] for r in L], [consensus(r) for r in T]
    agree = {id(q): a for q, a in Tc}
    Tc = [q for q, _ in Tc]
    print(f"  logistic {fmt(evaluate(fit_lr(L), T))} | logistic + consensus {fmt(evaluate(fit_lr(Lc), Tc))} | "
          f"agreement alone {fmt(evaluate(lambda r: agree[id(r)], Tc))}", flush=True)

    print(f"4. {cells[0]}: raw-image intensity around the outline")
    cases = {c.image_id: c for c in read_cases(os.path.join(REPO, "..", "shared", "data", "hc18"))}
    Li, Ti = [intensity(r, cases) for r in L], [intensity(r, cases) for r in T]
    print(f"  logistic + intensity {fmt(evaluate(fit_lr(Li), Ti))} | listwise c=0.1 + intensity "
          f"{fmt(evaluate(fit_listwise(Li, 0.1), Ti))}")


if __name__ == "__main__":
    main()
