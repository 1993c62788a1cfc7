"""Selection rules over click_candidates.py's dumps. usage: python click_rules.py TAG [TAG...]"""
import glob, os, pickle, sys
import numpy as np

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", ".."))

for tag in sys.argv[1:]:
    recs = []
    for f in sorted(glob.glob(os.path.join(REPO, ".data", "click_candidates", f"{tag}_*.pkl"))):
        recs += pickle.load(open(f, "rb"))
    rules = {
        "A score*cent (shipped)": lambda c, A: A and c["score"] * c["cent"],
        "A score*cent*p": lambda c, A: A and c["score"] * c["cent"] * c["p"],
        "A score*p": lambda c, A: A and c["score"] * c["p"],
        "A+S score*cent": lambda c, A: c["score"] * c["cent"],
        "A+S score*cent*p": lambda c, A: c["score"] * c["cent"] * c["p"],
        "A+S score*cent*sqrt(p)": lambda c, A: c["score"] * c["cent"] * np.sqrt(c["p"]),
        "A+S p": lambda c, A: c["p"] + 1e-3 * c["score"],
        "oracle A": lambda c, A: A and c["dice"],
        "oracle A+S": lambda c, A: c["dice"],
    }
    print(f"{tag}: {len(recs)} images; served {100 * np.mean([r['served'] for r in recs]):.2f} %")
    for name, rule in rules.items():
        ds = []
        for r in recs:
            cs = r["cands"]
            if not cs:
                ds.append(r["served"]); continue
            s = [float(rule(c, c["src"] != "click_search") or 0.0) for c in cs]
            ds.append(cs[int(np.argmax(s))]["dice"])
        ds = np.array(ds)
        print(f"  {name:28s} {100 * ds.mean():6.2f} %  <0.80: {(ds < 0.8).sum():3d}  median {100 * np.median(ds):.2f}")
