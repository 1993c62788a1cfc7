"""(Benchmark, used for docs/eval/automatic.) Resumable, incremental evaluation of one cell through fetal_head.evaluation.core (prompts: load_test_images over
all 157 test cases in case order, seed 0, exactly as core/eval_automatic.py), one image at a time in a fixed random
order (numpy default_rng(0) permutation), rows appended to <work>/inc/<tag>.jsonl.
  python scripts/eval_cell.py MODEL_DIR TAG MODES...        evaluate a saved model
  python scripts/eval_cell.py --localiser N TAG MODES...    load models/n{N}_s0 (the localiser-off cell's decoder), train the head localiser
      on the same N labels exactly as training.fit_localiser does for its attached net (LocaliserConfig(steps=300,
      seed=0) on localiser_samples; the gate's cross-validation is skipped: gate off, it does not change the net),
      attach, save + reload (models/<TAG>), evaluate."""
import json, os, sys, time
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(REPO, "apps", "fetal_head", "lib"))
import numpy as np, torch
torch.set_num_threads(1)
from fetal_head.evaluation.core import evaluate, load_test_images, warm_embeddings
from fetal_head.io.hc18 import read_cases
from fetal_head.segmentation.embedding_cache import EmbeddingCache
from fetal_head.segmentation.model_store import ModelSource, save_finetuned, FINETUNED_NAME
from fetal_head.segmentation.models import LITEMEDSAM
from fetal_head.segmentation.predictor import SamPredictor
from fetal_head.segmentation import training as T
from fetal_head.segmentation.localiser import LocaliserConfig, train_localiser
from fetal_head.evaluation.benchmark import select_labels

W = os.path.join(REPO, ".data", "eval_automatic"); CACHE = os.path.join(REPO, ".data", "emb_cache")
HC18 = os.environ.get("HC18_DIR", os.path.join(REPO, "..", "shared", "data", "hc18"))
os.makedirs(os.path.join(W, "inc"), exist_ok=True)
cases = read_cases(HC18)
args = sys.argv[1:]
if args[0] == "--localiser":
    n, tag, modes = int(args[1]), args[2], args[3:]
    model_dir = os.path.join(W, "models", tag)
    if not os.path.isfile(os.path.join(model_dir, FINETUNED_NAME)):
        t0 = time.time()
        off_dir = os.path.join(W, "models", f"n{n}_s0")
        pool = [c for c in cases if c.split == "pool" and (c.mask_path or c.annotation_path)]
        items = T.label_items(select_labels(pool, n, 0), os.path.join(W, "labels"))
        pred = ModelSource(model_dir=off_dir).load()
        samples = T.localiser_samples(pred, items, CACHE)
        net = train_localiser(samples, LocaliserConfig(steps=300, seed=0))
        setattr(pred.model, T.LOCALISER, net.to(pred.device))
        meta = json.load(open(os.path.join(off_dir, FINETUNED_NAME.replace(".pt", ".json"))))
        meta["localiser"] = {"labels": len(samples), "steps": 300, "replaced": True, "reason": "gate off (CV skipped)",
                             "seconds": round(time.time() - t0, 1)}
        save_finetuned(pred.model, LITEMEDSAM, model_dir, meta)
        print("localiser trained in", round(time.time() - t0, 1), "s", flush=True)
else:
    model_dir, tag, modes = args[0], args[1], args[2:]
test_cases = [c for c in cases if c.split == "test"]
holder = SamPredictor.litemedsam(version=LITEMEDSAM)
test = load_test_images(test_cases, seed=0)
warm_embeddings(holder, test, EmbeddingCache(CACHE, holder))
tuned = ModelSource(model_dir=model_dir).load()
if args[0] == "--localiser":
    assert tuned.localiser is not None, "the localiser did not survive save/reload"
tuned.share_cache(holder)
tuned.automatic_agreement = False
out = os.path.join(W, "inc", tag + ".jsonl")
done = set()
if os.path.isfile(out):
    done = {json.loads(l)["image"] for l in open(out) if l.strip()}
order = np.random.default_rng(0).permutation(len(test))
for i in order:
    t = test[i]
    if t.case.image_id in done:
        continue
    t0 = time.time()
    rows, _ = evaluate(tuned, [t], modes, desc=tag)
    with open(out, "a") as f:
        for r in rows:
            f.write(json.dumps({**r, "seconds": round(time.time() - t0, 2)}, default=float) + "\n")
