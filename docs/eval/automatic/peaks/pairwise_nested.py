"""Offline, not shipped (negative): after the logistic verifier chooses, a pairwise rule for nested candidates (the
head inside its fluid sac, the brain inside the skull) decides which of the two is the head from the embedding pooled
over the ring between them (derived exactly from the two candidates' pooled inputs and areas), fitted on the labels'
nested head / non-head pairs. usage: python pairwise_nested.py [CELL ...] (dumps of peak_candidates.py)"""
import os, sys, numpy as np
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from choose import evaluate, fit_lr, fmt, load, sub
from fetal_head.segmentation.verifier import fit_verifier
SH = lambda s: s != "peak1"
def masks(r): return np.unpackbits(r["masks"], axis=-1).astype(bool)
def nested_pairs(r):
    """(outer, inner) index pairs: >= 90 % of inner inside outer, outer >= 1.2x inner's area."""
    m = masks(r).reshape(r["n"], -1)
    a = m.sum(1).astype(float); out = []
    inter = m.astype(np.float32) @ m.T.astype(np.float32)
    for i in range(r["n"]):
        for j in range(r["n"]):
            if i != j and a[j] > 0 and inter[i, j] / a[j] >= 0.9 and a[i] >= 1.2 * a[j]:
                out.append((i, j))
    return out
def ring(r, i, j, kind):
    x = r["X"].astype(np.float64); s = x[:, 771]  # mask.mean(): proportional to the pooled weight sum
    ri = (x[i, 0:256] * s[i] - x[j, 0:256] * s[j]) / max(s[i] - s[j], 1e-6)
    f = [ri, x[i, 0:256] - x[j, 0:256]] if kind == "ring+diff" else [ri]
    f.append(np.log([s[i] / max(s[j], 1e-6)]))
    return np.concatenate(f)
def train_pairs(L, kind):
    X, y = [], []
    for r in L:
        if not r["n"]: continue
        for i, j in nested_pairs(r):
            di, dj = r["dlow"][i], r["dlow"][j]
            if di >= 0.9 and dj < 0.8: X.append(ring(r, i, j, kind)); y.append(1)
            elif dj >= 0.9 and di < 0.8: X.append(ring(r, i, j, kind)); y.append(0)
    return np.array(X, np.float32), np.array(y, bool)
def rule(lr, net, kind, pmin):
    def f(r):
        v = lr(r).copy(); c = int(np.argmax(v)); pairs = nested_pairs(r)
        for _ in range(3):
            moved = False
            for i, j in pairs:
                if c not in (i, j): continue
                o = j if c == i else i
                if v[o] < pmin * v[c]: continue
                p_outer = float(net.probability(ring(r, i, j, kind)[None].astype(np.float32))[0])
                want = i if p_outer > 0.5 else j
                if want != c: c = want; moved = True; break
            if not moved: break
        out = np.full(r["n"], -1.0); out[c] = 1.0; return out
    return f
for cell in sys.argv[1:] or ["n20_s0", "n20_s1"]:
    pfx = f"p2_{cell}_loc_nogate"
    L, T = sub(load("labels", pfx), SH), sub(load("test", pfx), SH)
    lr = fit_lr(L)
    print(cell, "logistic", fmt(evaluate(lr, T)))
    for kind in ("ring", "ring+diff"):
        X, y = train_pairs(L, kind)
        print(f"  {kind}: {len(y)} training pairs, outer is head {y.sum()}")
        net = fit_verifier(X, y, 1)
        if net is None: continue
        for pmin in (0.1, 0.3, 0.5):
            print(f"   pmin {pmin}", fmt(evaluate(rule(lr, net, kind, pmin), T)))
