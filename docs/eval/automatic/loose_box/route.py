"""The automatic route with a second (loose-box) decoder for the localiser's box, whose answer the box decoder then
re-boxes, against the served route. usage:

    MARGINS=0,10,30 python route.py MODEL_DIR LOOSE_MODEL_DIR...

MODEL_DIR: the served model (box decoder + localiser); each LOOSE_MODEL_DIR's mask decoder is a loose-box decoder."""
import os, sys
REPO=os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "..")); sys.path.insert(0, REPO+"/apps/fetal_head/lib")
import numpy as np, torch
torch.set_num_threads(2)
from fetal_head.io.hc18 import read_cases
from fetal_head.io import read_image
from fetal_head.segmentation.embedding_cache import EmbeddingCache
from fetal_head.segmentation.model_store import ModelSource
from fetal_head.segmentation.prompts import grow_box
from fetal_head.segmentation.localiser import localise
from fetal_head.segmentation import box_search
from fetal_head.evaluation.core import image_metrics
from fetal_head.measurement import answer_mask
md=sys.argv[1]; loose=sys.argv[2:]
split=os.environ.get("SPLIT","test")
cases=[c for c in read_cases(REPO+"/../shared/data/hc18") if c.split==split]
if os.environ.get("LIMIT"): cases=cases[:int(os.environ["LIMIT"])]
p=ModelSource(model_dir=md).load(); p.encoder_bf16=False; p.refresh_encoder_key()
decs={os.path.basename(d.rstrip('/')):ModelSource(model_dir=d).load().model.mask_decoder for d in loose}
cache=EmbeddingCache(REPO+"/.data/emb_cache", p)
def ell(m): return answer_mask(m,"ellipse") if m.sum()>=16 else m
res={}
def add(k,m,c,gt):
    d=image_metrics(ell(m), gt, c.pixel_size_mm, c.hc_mm); res.setdefault(k,[]).append((d["dice"],d["hc_abs_diff_mm"]))
margins=[int(x) for x in os.environ.get("MARGINS","10").split(",")]
for c in cases:
    im=read_image(c.image_path); e=cache.get(im); gt=c.load_mask(); h,w=gt.shape
    p.remember(im,e)
    add("served", p.predict_automatic(e,im,agreement=False).mask, c, gt)
    loc=localise(p.localiser, e.features, (h,w), e.input_hw)
    if loc.box is None:
        continue
    for name,dec in decs.items():
        for mg in margins:
            lg,iou=p.decode(e, boxes=np.array([grow_box(loc.box, mg, h, w)]), decoder=dec)
            first=p.finish(e,lg,iou)
            add(f"{name}_m{mg}_first", first.mask, c, gt)
            add(f"{name}_m{mg}_rebox", box_search.rebox(p,e,first).mask, c, gt)
for k,v in res.items():
    v=np.array(v,dtype=float); print(f"{k:40s} dice {100*v[:,0].mean():.2f} med {100*np.median(v[:,0]):.2f} <0.8 {(v[:,0]<0.8).sum()} hc {np.nanmean(v[:,1]):.2f} n {len(v)}", flush=True)
