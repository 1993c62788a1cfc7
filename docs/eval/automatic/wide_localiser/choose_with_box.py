"""Offline choice rules on dump_candidates.py's dump: the served score x verifier probability, with / without the wide
localiser's own candidate, weighted by IoU with the wide localiser's box, and the oracle.
usage: python choose_with_box.py DUMP.pkl"""
import os as _os
REPO = _os.path.abspath(_os.path.join(_os.path.dirname(__file__), "..", "..", "..", ".."))
OUT = _os.path.join(REPO, ".data", "wide_localiser"); _os.makedirs(OUT, exist_ok=True)
import pickle, sys, numpy as np
recs = pickle.load(open(sys.argv[1], "rb"))
def run(name, f, use_wide=True):
    ds = []
    for r in recs:
        cs = [c for c in r["cands"] if use_wide or c["source"] != "wide_localiser"]
        s = np.array([f(c) for c in cs]); ds.append(cs[int(np.argmax(s))]["dice"])
    ds = np.array(ds); print(f"{name:45s} {100*ds.mean():.2f} median {100*np.median(ds):.2f} <0.80 {(ds<0.8).sum()}")
run("served: score x p (no wide cand)", lambda c: c["score"] * c["p"], False)
run("score x p (+ wide cand)", lambda c: c["score"] * c["p"])
for k in (0.5, 1, 2, 4):
    run(f"score x p x iou_wide^{k} (no wide cand)", lambda c, k=k: c["score"] * c["p"] * c["iou_wide"] ** k, False)
    run(f"score x p x iou_wide^{k} (+ wide cand)", lambda c, k=k: c["score"] * c["p"] * c["iou_wide"] ** k)
    run(f"score x iou_wide^{k} (+ wide)", lambda c, k=k: c["score"] * c["iou_wide"] ** k)
run("iou_wide alone", lambda c: c["iou_wide"])
run("oracle (no wide)", lambda c: c["dice"], False)
run("oracle (+ wide)", lambda c: c["dice"])
w = np.array([r["wide_iou_ref"] for r in recs]); print("wide box IoU with ref: mean %.3f median %.3f <0.5: %d" % (w.mean(), np.median(w), (w < 0.5).sum()))
