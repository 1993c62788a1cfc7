"""Self-training the wide localiser below 100 labels: the served model's automatic answers on the unlabelled pool
images become pseudo-labels (kept by confidence), and the wide localiser (localiser.WIDE_WIDTH channels,
WIDE_STEPS steps) is trained on the real labels plus them; its box route is scored on the 157 test images with
the cell's own decoder. usage:

    python pseudo_boxes.py MODEL_DIR pseudo          # automatic answers of MODEL_DIR on its unlabelled pool images
    python pseudo_boxes.py MODEL_DIR fit RULE...      # RULE: all | hp0.5 (head_probability >= 0.5) | topK (by it) | drawK (hp0.5 among K drawn)
                                                      # | lhp0.965 (a self-trained MODEL_DIR: a second round, its unflagged answers)
    python pseudo_boxes.py MODEL_DIR real             # the same wide localiser on the real labels only

Outputs go to .data/self_training/<cell>/ (pseudo.jsonl, masks/, loc_<rule>.pt)."""
import os, sys, json, time
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", ".."))
sys.path.insert(0, os.path.join(REPO, "apps", "fetal_head", "lib"))
import numpy as np, torch
from tqdm import tqdm
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
from fetal_head.io.hc18 import read_cases
from fetal_head.io import read_image
from fetal_head.evaluation.core import load_test_images, image_metrics
from fetal_head.measurement import answer_mask
from fetal_head.segmentation.embedding_cache import EmbeddingCache
from fetal_head.segmentation.model_store import ModelSource
from fetal_head.segmentation.localiser import train_localiser, LocaliserConfig, Localiser, WIDE_WIDTH, WIDE_STEPS

md, what = sys.argv[1], sys.argv[2]
cell = os.path.basename(md.rstrip("/"))
out = os.path.join(REPO, ".data", "self_training", cell)
os.makedirs(os.path.join(out, "masks"), exist_ok=True)
labels = json.load(open(os.path.join(md, "cell_info.json")))["labels"]
cases = read_cases(os.environ.get("HC18_DIR", os.path.join(REPO, "..", "shared", "data", "hc18")))
site = os.environ.get("SITE")  # "new": the new-site simulation's pool (coarsest-pixel third)
pool = [c for c in cases if c.split == "pool" and c.image_id not in labels]
test_cases = [c for c in cases if c.split == "test"]
if site:
    cut = np.quantile([c.pixel_size_mm for c in cases], 2 / 3)
    pool = [c for c in pool if c.pixel_size_mm > cut]
    test_cases = [c for c in test_cases if c.pixel_size_mm > cut]
byid = {c.image_id: c for c in cases}
p = ModelSource(model_dir=md).load(); p.encoder_bf16 = False; p.refresh_encoder_key()
cache = EmbeddingCache(os.path.join(REPO, ".data", "emb_cache"), p)
p.automatic_agreement = False


def ellipse_dice(mask, ref):
    a = answer_mask(mask, "ellipse")
    return float(2 * (a & ref).sum() / max(a.sum() + ref.sum(), 1))


if what == "pseudo":
    path = os.path.join(out, "pseudo.jsonl")
    done = {json.loads(l)["image"] for l in open(path)} if os.path.exists(path) else set()
    todo = [c for c in pool if c.image_id not in done]
    if os.environ.get("LIMIT"):  # a seeded draw of LIMIT unlabelled images, as the trainer takes them
        keep = set(np.random.default_rng(0).permutation(len(pool))[: int(os.environ["LIMIT"])].tolist())
        todo = [c for i, c in enumerate(pool) if i in keep and c.image_id not in done]
    for c in tqdm(todo, mininterval=30):
        im = read_image(c.image_path); emb = cache.get(im)
        pred = p.predict_automatic(emb, im, agreement=False)
        m = answer_mask(pred.mask, "ellipse") if pred.mask.sum() >= 16 else pred.mask
        np.save(os.path.join(out, "masks", c.image_id + ".npy"), np.packbits(m))
        row = {"image": c.image_id, "shape": list(m.shape), "true_dice": ellipse_dice(pred.mask, c.load_mask()),
               **{k: v for k, v in pred.confidence.items() if isinstance(v, (int, float, str, bool))}}
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    sys.exit()


def sample(c, mask=None):
    im = read_image(c.image_path); e = cache.get(im)
    return (e.features, c.load_mask() if mask is None else mask, e.input_hw)


def pseudo_rows():
    return [json.loads(l) for l in open(os.path.join(out, "pseudo.jsonl"))]


def chosen(rule, rows):
    hp = lambda r: r.get("head_probability", r.get("candidate_score", 0.0))
    if rule == "all":
        return rows
    if rule.startswith("lhp"):  # a second round: the wide route's answers by localiser_head_prob (needs_review < 0.965)
        return [r for r in rows if r.get("localiser_head_prob", 0.0) >= float(rule[3:])]
    if rule.startswith("hp"):
        return [r for r in rows if hp(r) >= float(rule[2:])]
    if rule.startswith("top"):
        return sorted(rows, key=hp, reverse=True)[: int(rule[3:])]
    if rule.startswith("draw"):  # hp0.5 among a seeded draw of K of the unlabelled pool images
        ids = [c.image_id for c in pool]
        keep = {ids[i] for i in np.random.default_rng(0).permutation(len(ids))[: int(rule[4:])]}
        return [r for r in rows if r["image"] in keep and hp(r) >= 0.5]
    if rule == "oracle":  # upper bound: the pseudo-labels that are right (true Dice >= 0.9)
        return [r for r in rows if r["true_dice"] >= 0.9]
    raise ValueError(rule)


def score_test(net, tag):
    test = load_test_images(test_cases, seed=0)
    model_loc = p.localiser
    net.answers_with_box.fill_(1)
    setattr(p.model, "localiser", net)
    res = {"automatic": [], "click": []}
    for t in tqdm(test, mininterval=30, desc=tag):
        emb = cache.get(t.image); p.remember(t.image, emb)
        for mode, prompt in (("automatic", None), ("click", t.prompt("click"))):
            pred = p.predict_automatic(emb, t.image, agreement=False) if prompt is None else p.predict(t.image, prompt)
            d = image_metrics(answer_mask(pred.mask, "ellipse"), t.mask, t.case.pixel_size_mm, t.case.hc_mm)
            res[mode].append((d["dice"], d["hc_abs_diff_mm"]))
    setattr(p.model, "localiser", model_loc)
    line = {"tag": tag, "images": len(test)}
    for mode, v in res.items():
        v = np.array(v, dtype=float)
        line[mode] = {"dice": round(100 * v[:, 0].mean(), 2), "median": round(100 * np.median(v[:, 0]), 2),
                      "below_0.80": int((v[:, 0] < 0.8).sum()), "hc_mm": round(float(np.nanmean(v[:, 1])), 2)}
    print(json.dumps(line), flush=True)
    with open(os.path.join(out, "scores.jsonl"), "a") as f:
        f.write(json.dumps(line) + "\n")


real = [sample(byid[i]) for i in labels]
steps = int(os.environ.get("STEPS", WIDE_STEPS)); width = int(os.environ.get("WIDTH", WIDE_WIDTH))
rules = sys.argv[3:] if what == "fit" else ["real"]
for rule in rules:
    rows = [] if rule == "real" else chosen(rule, pseudo_rows())
    if rule != "real":
        ok = np.array([r["true_dice"] for r in rows])
        print(f"{rule}: {len(rows)} pseudo-labels, true Dice mean {100*ok.mean():.2f}, below 0.80: {(ok<0.8).sum()}", flush=True)
    tag = f"{rule}_w{width}_s{steps}"
    path = os.path.join(out, f"loc_{tag}.pt")
    if os.path.exists(path):
        net = Localiser(width=width); net.load_state_dict(torch.load(path, weights_only=True)); net.eval()
    else:
        ps = []
        for r in rows:
            m = np.unpackbits(np.load(os.path.join(out, "masks", r["image"] + ".npy")))[: r["shape"][0] * r["shape"][1]]
            m = m.reshape(r["shape"]).astype(bool)
            if m.sum() >= 16:
                ps.append(sample(byid[r["image"]], m))
        t0 = time.time()
        net = train_localiser(real + ps, LocaliserConfig(steps=steps, width=width, answers_with_box=True))
        print(f"trained on {len(real)} real + {len(ps)} pseudo in {time.time()-t0:.0f} s", flush=True)
        torch.save(net.state_dict(), path)
    score_test(net, tag)
