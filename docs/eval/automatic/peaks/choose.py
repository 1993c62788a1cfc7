"""Choice rules over the dumps of peak_candidates.py (K=2): the shipped logistic verifier, a listwise (conditional
logit) verifier and the oracle, on the candidates without, with one and with two extra peaks. Full-resolution Dice
of the chosen candidate before the final re-box. usage: python choose.py p2_TAG (a study script, not run by CI)"""
import os, pickle, glob, sys, numpy as np, torch
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", ".."))
sys.path.insert(0, os.path.join(REPO, "apps", "fetal_head", "lib"))
from fetal_head.segmentation.verifier import fit_verifier, POSITIVE_DICE
torch.set_num_threads(1)
def load(split, pfx):
    out = []
    for f in sorted(glob.glob(os.path.join(REPO, ".data", "peaks", f"{pfx}_{split}_*.pkl"))):
        out += pickle.load(open(f, "rb"))
    return out
def sub(recs, keep):
    out = []
    for r in recs:
        if not r["n"]:
            out.append(r); continue
        idx = [i for i, s in enumerate(r["src"]) if keep(s)]
        q = dict(r); q["n"] = len(idx)
        for k in ("X", "dlow", "score", "dfull", "masks"):
            if len(r[k]): q[k] = r[k][idx]
        q["src"] = [r["src"][i] for i in idx]
        out.append(q)
    return out
def fit_lr(recs, c=0.1):
    rs = [r for r in recs if r["n"]]
    X = np.concatenate([r["X"] for r in rs]).astype(np.float32); y = np.concatenate([r["dlow"] for r in rs]) >= POSITIVE_DICE
    net = fit_verifier(X, y, len(rs), c)
    return lambda r: r["score"] * net.probability(r["X"].astype(np.float32))
def fit_listwise(recs, c=0.1, tol=0.02):
    rs = [r for r in recs if r["n"]]
    Xs = [torch.tensor(r["X"].astype(np.float64)) for r in rs]
    allX = torch.cat(Xs); mu, sd = allX.mean(0), allX.std(0).clamp(min=1e-6)
    Xs = [(x - mu) / sd for x in Xs]
    ls = [torch.log(torch.tensor(r["score"], dtype=torch.float64).clamp(min=1e-6)) for r in rs]
    tg = [torch.tensor(r["dlow"] >= r["dlow"].max() - tol) for r in rs]
    w = torch.zeros(allX.shape[1], dtype=torch.float64, requires_grad=True)
    a = torch.ones((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, a], lr=1, max_iter=500, line_search_fn="strong_wolfe")
    def closure():
        opt.zero_grad()
        loss = 0.5 * w.pow(2).sum()
        for x, l, t in zip(Xs, ls, tg):
            z = x @ w + a * l
            loss = loss - c * (torch.logsumexp(z[t], 0) - torch.logsumexp(z, 0))
        loss.backward(); return loss
    opt.step(closure)
    w_, a_ = w.detach(), a.detach()
    return lambda r: (((torch.tensor(r["X"].astype(np.float64)) - mu) / sd) @ w_ + a_ * torch.log(torch.tensor(r["score"], dtype=torch.float64).clamp(min=1e-6))).numpy()
def evaluate(f, recs, key="dfull"):
    return np.array([r[key][int(np.argmax(f(r)))] if r["n"] else 0.0 for r in recs])
def fmt(d): return f"{100*d.mean():6.2f}  <0.8: {(d<0.8).sum():3d}"
if __name__ == "__main__":
    PFX = sys.argv[1] if len(sys.argv) > 1 else "p2_n20_s0_loc_nogate"
    L, T = load("labels", PFX), load("test", PFX)
    print(len(L), "labels", len(T), "test")
    sets = {"base": lambda s: not s.startswith("peak"), "peaks": lambda s: True,
            "peak0 only": lambda s: s != "peak1"}
    for name, keep in sets.items():
        Ls, Ts = sub(L, keep), sub(T, keep)
        print(f"--- {name}: {np.mean([r['n'] for r in Ts]):.1f} candidates/image")
        print("  score only ", fmt(evaluate(lambda r: r["score"], Ts)))
        print("  LR verifier", fmt(evaluate(fit_lr(Ls), Ts)))
        for c in (0.03, 0.1, 0.3):
            print(f"  listwise c={c}", fmt(evaluate(fit_listwise(Ls, c), Ts)))
        print("  oracle     ", fmt(np.array([r["dfull"].max() if r["n"] else 0 for r in Ts])))
