"""Uncertainty scores and diversity features of one image, from its (cached) SAM embedding.

Uncertainty (higher = more informative), from one automatic answer plus one batched decoder call. The automatic
answer is :func:`automatic_answer`: the one the server would show (the head localiser's route with its verifier)
once a retrain has attached a localiser, else :func:`quick_automatic` (the trained automatic head, else the box
search around the image centre only: 4 boxes + 3 re-prompts instead of the served search's 20 + 3, which on 2 busy
CPU cores costs ~15 s per image, too much to score a pool):

- ``disagreement``: 1 - mean Dice (decoder grid) between the automatic answer and the answers to
  ``N_PERTURBED`` boxes around it, each side moved by up to ``PERTURB`` of the box size (a confident head is
  stable under small box changes; an ambiguous one is not);
- ``low_iou``: 1 - the decoder's predicted IoU of the automatic answer;
- ``non_ellipse``: 1 - :func:`~fetal_head.segmentation.box_search.ellipse_likeness` of the answer (heads are
  ellipses; crescents and fragments are failures);
- ``not_head``: 1 - the head verifier's probability that the answer is the head (``head_probability`` of its
  confidence); for the wide localiser's own box, which has no verifier, 1 when its answer says ``needs_review``
  (``localiser_head_prob`` below ``box_search.LOCALISER_REVIEW_BELOW``), else 0; 0 for a model with neither: the
  served answers' failures are mostly another structure (the fluid sac, the brain inside the skull), which this finds
  and the other three do not.

The score is their weighted sum (:data:`UNCERTAINTY_WEIGHTS`); an empty automatic answer scores the maximum.
Diversity features: the embedding average-pooled to a 2 x 2 grid (1024 values), L2-normalised.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..segmentation import box_search
from ..segmentation.predictor import ImageEmbedding, Prediction, SamPredictor
from ..segmentation.prompts import Prompt, mask_dice

N_PERTURBED = 4
PERTURB = 0.08  # fraction of the box's width/height each side may move
MARGIN_PX = 10.0  # the automatic answer's box grows by this before perturbing (boxes were trained 0-20 px out)
# Measured on 150 unlabelled HC18 pool images (docs/active_learning/uncertainty_served): ROC AUC of the score for a
# served failure (Dice < 0.80) 0.996 / 0.986 after 5 / 20 labels; scoring the served answer is most of the gain
# (u2, the quick answer: 0.939 / 0.872) and not_head the rest at 5 labels (0.970 without it; 0.987 at 20).
UNCERTAINTY_WEIGHTS = {"disagreement": 1.0, "low_iou": 0.5, "non_ellipse": 0.5, "not_head": 1.0}
# The wide localiser's route (self-trained 20 labels, seed 0; the 237 unlabelled pool images it did not train on, 16
# failures): the score's AUC 0.919 without not_head, 0.970 with its needs_review as not_head (that threshold was
# chosen on the same images; docs/eval/automatic/confidence/n20_s0_self_trained).
SCORE_VERSION = "u4"  # bump when the score's definition changes (part of the cache key); u3: the served answer;
# u4: not_head from the wide localiser's needs_review


@torch.inference_mode()
def quick_automatic(predictor: SamPredictor, emb: ImageEmbedding) -> Prediction:
    """A cheap automatic answer: the automatic head, else the box search centred on the image only."""
    if predictor.automatic_decoder is not None:
        pred = box_search.automatic_head(predictor, emb)
        if pred.mask.sum() >= 16:
            return pred
    h, w = emb.original_hw
    return box_search.search(predictor, emb, [(w / 2, h / 2)], Prompt())


@torch.inference_mode()
def automatic_answer(predictor: SamPredictor, emb: ImageEmbedding, image: Optional[np.ndarray] = None) -> Prediction:
    """The automatic answer a user would be shown: the served route (:meth:`SamPredictor.predict_automatic`) when
    the model has a head localiser (every retrained model does), else :func:`quick_automatic` (zero-shot: the
    served box search costs ~15 s per image on 2 busy cores, too much to score a pool)."""
    if predictor.localiser is not None:
        # the same mask; the box search for box_search_agreement (1.7 s on 2 cores beside the wide localiser's
        # 0.15 s box route) is not an uncertainty input
        return predictor.predict_automatic(emb, image, agreement=False)
    return quick_automatic(predictor, emb)


@torch.inference_mode()
def uncertainty_of(predictor: SamPredictor, emb: ImageEmbedding, pred: Prediction, seed: int = 0) -> Dict[str, float]:
    """The uncertainty components and total (``score``) of one automatic answer ``pred`` of ``emb``."""
    conf = pred.confidence or {}
    head_p = conf.get("head_probability")
    if head_p is not None:
        not_head = float(np.clip(1.0 - head_p, 0, 1))
    else:  # the wide localiser's own box flags its doubt (box_search.localiser_box); other routes say nothing
        not_head = 1.0 if conf.get("source") == "localiser_box" and conf.get("needs_review") else 0.0
    h, w = emb.original_hw
    if pred.mask.sum() < 16:
        out = {"disagreement": 1.0, "low_iou": 1.0, "non_ellipse": 1.0, "not_head": 1.0, "empty": 1.0}
        out["score"] = float(sum(UNCERTAINTY_WEIGHTS[k] * out[k] for k in UNCERTAINTY_WEIGHTS))
        return out
    ch, cw = predictor.low_res_hw(emb)
    ref_low = (pred.logits[0, 0, :ch, :cw] > 0).cpu().numpy()
    rows, cols = np.nonzero(pred.mask)
    x0, y0, x1, y1 = cols.min() - MARGIN_PX, rows.min() - MARGIN_PX, cols.max() + MARGIN_PX, rows.max() + MARGIN_PX
    bw, bh = x1 - x0, y1 - y0
    rng = np.random.default_rng(seed)
    d = rng.uniform(-PERTURB, PERTURB, size=(N_PERTURBED, 4)) * np.array([bw, bh, bw, bh])
    boxes = np.array([x0, y0, x1, y1])[None] + d
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w - 1)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h - 1)
    logits, _ = predictor.decode(emb, boxes=boxes)
    low = (logits[:, 0, :ch, :cw] > 0).cpu().numpy()
    agreement = float(np.mean([mask_dice(ref_low, m, empty=1.0) for m in low]))
    out = {"disagreement": 1.0 - agreement, "low_iou": float(np.clip(1.0 - pred.score, 0, 1)),
           "non_ellipse": 1.0 - box_search.ellipse_likeness(ref_low), "not_head": not_head, "empty": 0.0}
    out["score"] = float(sum(UNCERTAINTY_WEIGHTS[k] * out[k] for k in UNCERTAINTY_WEIGHTS))
    return out


@torch.inference_mode()
def uncertainty(predictor: SamPredictor, emb: ImageEmbedding, seed: int = 0,
                image: Optional[np.ndarray] = None) -> Tuple[Dict[str, float], Prediction]:
    """The uncertainty components and total (``score``) of the image's :func:`automatic_answer`, and that answer
    (``image``, the frame ``emb`` encodes, lets the served route add its skull-ring candidate)."""
    pred = automatic_answer(predictor, emb, image)
    return uncertainty_of(predictor, emb, pred, seed), pred


def pooled_feature(emb: ImageEmbedding) -> np.ndarray:
    """The embedding's image part average-pooled to 2 x 2 cells, flattened and L2-normalised (1024 values)."""
    f = emb.features.float()
    nh, nw = emb.input_hw
    # the features cover the padded square: keep the cells over the image part
    gh = max(1, int(np.ceil(f.shape[-2] * nh / max(nh, nw))))
    gw = max(1, int(np.ceil(f.shape[-1] * nw / max(nh, nw))))
    v = F.adaptive_avg_pool2d(f[..., :gh, :gw], 2).reshape(-1).cpu().numpy().astype(np.float32)
    return v / max(float(np.linalg.norm(v)), 1e-8)
