"""Does splitting the wide localiser's head component between its centre peaks give a tighter box for its box
route (157 test images)? The component's centre-map peaks (>= MIN_PEAK, MIN_DIST model-input px apart) are the
markers; SPLIT=cp: watershed of the centre map from them; SPLIT=H: watershed of the component's distance transform
from its H-maxima, keeping the basin of the strongest peak. Served: the box route as box_search.localiser_box.
usage: SPLIT=cp|H python split_component.py MODEL_DIR MIN_PEAK MIN_DIST"""
import os, sys
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", ".."))
sys.path.insert(0, REPO + "/apps/fetal_head/lib")
import numpy as np, torch
torch.set_num_threads(int(os.environ.get("THREADS","1")))
from scipy import ndimage
from skimage.segmentation import watershed
from tqdm import tqdm
from fetal_head.io.hc18 import read_cases
from fetal_head.segmentation.embedding_cache import EmbeddingCache
from fetal_head.segmentation.model_store import ModelSource
from fetal_head.segmentation import localiser as L
from fetal_head.segmentation.box_search import grow_box, AUTOMATIC_MARGIN_PX, localiser_box, rebox
from fetal_head.evaluation.core import load_test_images, image_metrics
from fetal_head.measurement import answer_mask
import torch.nn.functional as F
md=sys.argv[1]; min_peak=float(sys.argv[2]); min_dist=int(sys.argv[3])
cases=read_cases(os.environ.get("HC18_DIR", REPO+"/../shared/data/hc18")); test=load_test_images([c for c in cases if c.split=="test"], seed=0)
p=ModelSource(model_dir=md).load(); p.encoder_bf16=False; p.refresh_encoder_key()
cache=EmbeddingCache(REPO+"/.data/emb_cache", p)
def centre_map(emb):
    """The localiser's centre heatmap on the model-input frame, upsampled as localiser.localise does (it returns the
    head map only)."""
    with torch.no_grad(): lg=p.localiser(emb.features.float())[0]
    nh,nw=emb.input_hw; stride=max(1,int(round(max(nh,nw)/lg.shape[-1])))
    up=F.interpolate(lg[None],scale_factor=stride,mode="bilinear",align_corners=False)[0,:,:nh,:nw]
    return torch.sigmoid(up[1]).numpy()
def answer(emb, box):
    """box_search.localiser_box's decode and re-box for another box than the localiser's."""
    h,w=emb.original_hw
    lg,iou=p.decode(emb, boxes=np.array([grow_box(box, AUTOMATIC_MARGIN_PX, h, w)]))
    return rebox(p, emb, p.finish(emb, lg, iou))
res={"served":[], "split":[]}; nsplit=0; changed=[]
for t in tqdm(test, mininterval=30):
    emb=cache.get(t.image); h,w=t.mask.shape; nh,nw=emb.input_hw; sx,sy=w/nw,h/nh
    loc=L.localise(p.localiser, emb.features, (h,w), emb.input_hw)
    cp=centre_map(emb)
    region=loc.coarse_mask
    box=loc.box
    # centre peaks inside the component
    pk=(cp==ndimage.maximum_filter(cp,size=9,mode="constant",cval=0))&region&(cp>=min_peak)
    pts=sorted(np.argwhere(pk), key=lambda q:-cp[q[0],q[1]])
    keep=[]
    for q in pts:
        if all(np.hypot(*(q-k))>=min_dist for k in keep): keep.append(q)
    sbox=box
    if len(keep)>=2:
        markers=np.zeros(region.shape,int)
        for i,q in enumerate(keep): markers[q[0],q[1]]=i+1
        mode=os.environ.get("SPLIT","cp")
        if mode=="cp":
            lab=watershed(-cp, markers, mask=region)
            part=lab==1  # the strongest peak's basin
        else:
            from skimage.morphology import h_maxima
            dist=ndimage.distance_transform_edt(np.pad(region,1))[1:-1,1:-1]
            mk,_=ndimage.label(h_maxima(dist, float(mode)))
            lab=watershed(-dist, mk, mask=region)
            part=lab==lab[keep[0][0],keep[0][1]]
        if part.sum()>=16:
            rows,cols=np.nonzero(part)
            sbox=(cols.min()*sx, rows.min()*sy, min((cols.max()+1)*sx-1,w-1.0), min((rows.max()+1)*sy-1,h-1.0))
            nsplit+=1
    served = localiser_box(p, emb)  # the shipped route itself
    for k, pred in (("served", served), ("split", served if sbox is box else answer(emb, sbox))):
        d=image_metrics(answer_mask(pred.mask,"ellipse"), t.mask, t.case.pixel_size_mm, t.case.hc_mm)
        res[k].append((d["dice"], d["hc_abs_diff_mm"]))
    if sbox is not box: changed.append((t.case.image_id, round(res["served"][-1][0],3), round(res["split"][-1][0],3)))
for k,v in res.items():
    v=np.array(v,float); print(k, f"Dice {100*v[:,0].mean():.2f} median {100*np.median(v[:,0]):.2f} <0.80 {(v[:,0]<0.8).sum()} HC {np.nanmean(v[:,1]):.2f}")
print("split on", nsplit, "images:", changed)
