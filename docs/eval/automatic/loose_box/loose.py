"""The box decoder of MODEL_DIR against loose boxes: each test image's reference box grown on each side by U(0, f) of
its width / height, for each f of FRACTIONS, and the benchmark's 0-20 px jittered box ("jit"). usage:

    python loose.py MODEL_DIR 0,0.3,0.5

Prints Dice % / images below 0.80 of the answer's ellipse per looseness."""
import os, sys
REPO=os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "..")); sys.path.insert(0, REPO+"/apps/fetal_head/lib")
import numpy as np, torch
torch.set_num_threads(2)
from fetal_head.io.hc18 import read_cases
from fetal_head.io import read_image
from fetal_head.segmentation.embedding_cache import EmbeddingCache
from fetal_head.segmentation.model_store import ModelSource
from fetal_head.segmentation.prompts import jitter_box, mask_box
from fetal_head.measurement import answer_mask
md=sys.argv[1]; fr=[float(x) for x in sys.argv[2].split(",")]
cases=[c for c in read_cases(REPO+"/../shared/data/hc18") if c.split=="test"]
p=ModelSource(model_dir=md).load(); p.encoder_bf16=False; p.refresh_encoder_key()
cache=EmbeddingCache(REPO+"/.data/emb_cache", p)
res={f:[] for f in fr}; res['jit']=[]
for c in cases:
    im=read_image(c.image_path); e=cache.get(im); gt=c.load_mask(); h,w=gt.shape
    x0,y0,x1,y1=mask_box(gt); bw,bh=x1-x0,y1-y0
    rng=np.random.default_rng(int(c.image_id.split('_')[0]))
    for f in fr:
        g=rng.uniform(0,f,4)
        b=(max(x0-g[0]*bw,0),max(y0-g[1]*bh,0),min(x1+g[2]*bw,w-1),min(y1+g[3]*bh,h-1))
        lg,iou=p.decode(e, boxes=np.array([b])); pr=p.finish(e,lg,iou)
        m=answer_mask(pr.mask,"ellipse") if pr.mask.sum()>=16 else pr.mask
        res[f].append(2*(m&gt).sum()/(m.sum()+gt.sum()))

    b=jitter_box((x0,y0,x1,y1), rng, 20, h, w)
    lg,iou=p.decode(e, boxes=np.array([b])); pr=p.finish(e,lg,iou)
    m=answer_mask(pr.mask,"ellipse") if pr.mask.sum()>=16 else pr.mask
    res['jit'].append(2*(m&gt).sum()/(m.sum()+gt.sum()))
print(md.split('/')[-1], '  '.join(f"{k}: {100*np.mean(v):.2f}/{(np.array(v)<0.8).sum()}" for k,v in res.items()), flush=True)
