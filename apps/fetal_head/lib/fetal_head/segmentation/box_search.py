"""Turning click-only and no-prompt requests into box prompts.

LiteMedSAM was trained on boxes, and a box around the head is what its decoder segments best (a lone click gives
an empty mask zero-shot). Three routes, all ending in the box decoder:

- :func:`localised`: a fine-tuned model's head localiser (:mod:`.localiser`, a small conv head on the image
  embedding) says where the head is (a foreground click picks the component that holds it, a background click
  removes one); candidate boxes centred there, plus the skull ring's box (:mod:`.skull_ring`), are decoded,
  re-boxed once, and scored; with the model's head verifier (:mod:`.verifier`) the box search's best candidates
  join in and every score is weighted by the probability that the candidate is the head; the winner is decoded
  once more from its own box plus the training jitter's margin (:func:`rebox`). A localiser trained on many labels
  answers automatic requests with its own box instead (:func:`localiser_box`);
- :func:`automatic_head`: a fine-tuned model's automatic head (a second mask decoder trained with no prompt) gives
  a coarse head mask; its largest component's box plus a margin goes to the box decoder, whose mask is re-boxed
  once more;
- :func:`search`: candidate boxes of several sizes around the click (or over the image) are decoded in one batch;
  each candidate's head component is re-prompted with its own box plus a margin (the model under-segments with
  tight boxes), and the answer that is confident (predicted IoU), stable under that re-prompt, and ellipse-shaped
  wins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence, Tuple

import numpy as np
import torch

from .prompts import Prompt, grow_box, mask_box, mask_dice

if TYPE_CHECKING:  # the predictor calls in here; only its type is needed
    from .predictor import ImageEmbedding, Prediction, SamPredictor

SEARCH_SCALES = (0.25, 0.45, 0.65, 0.85)  # box height as a fraction of the shorter side
SEARCH_ASPECT = 1.25  # box width / height: heads are ellipses, mostly wider than tall on screen
REFINE_MARGIN = 0.08
REFINE_TOP_K = 3  # the decoder costs ~40 ms per box on 2 CPU cores: re-prompt only the best candidates
SEARCH_TOP_K = 5  # box-search candidates the head verifier also weighs in automatic mode (top by iou x ellipse)
# The box decoder was fine-tuned on boxes 0-20 px outside the head and under-segments tight ones.
AUTOMATIC_MARGIN_PX = 10.0  # at the image's own resolution, the mean of the training jitter
AUTOMATIC_REFINE = 1


def image_centres(height: int, width: int) -> Sequence[Tuple[float, float]]:
    """Where the no-prompt search centres its candidate boxes: the middle and four points around it."""
    return [(width / 2, height / 2)] + [(width * fx, height * fy) for fx in (0.35, 0.65) for fy in (0.35, 0.65)]


@torch.inference_mode()
def automatic_head(predictor: "SamPredictor", emb: "ImageEmbedding") -> "Prediction":
    """The automatic head's coarse mask -> its box plus a margin -> the box decoder, re-boxed AUTOMATIC_REFINE
    times. Separate weights: box-prompt results are untouched."""
    h, w = emb.original_hw
    ch, cw = predictor.low_res_hw(emb)
    logits, iou = predictor.decode(emb, decoder=predictor.automatic_decoder)
    pred = predictor.empty(emb)
    coarse = logits[:1, :1]
    for _ in range(1 + AUTOMATIC_REFINE):
        head = head_component((coarse[0, 0, :ch, :cw] > 0).cpu().numpy())
        if head is None:
            break
        rows, cols = np.nonzero(head)
        sx, sy = w / cw, h / ch  # low-res cell -> image pixels
        box = grow_box((cols.min() * sx, rows.min() * sy, (cols.max() + 1) * sx - 1, (rows.max() + 1) * sy - 1),
                       AUTOMATIC_MARGIN_PX, h, w)
        logits, iou = predictor.decode(emb, boxes=np.array([box]))
        pred = predictor.finish(emb, logits, iou)
        coarse = pred.logits
    return pred


LOCALISED_SCALES = (0.3, 0.45, 0.6, 0.75, 0.9)  # candidate box heights around the localiser's centre
# A foreground click marks the head: a candidate with the click near its rim is usually a neighbouring structure,
# so click answers are scored x exp(-d^2 / CENTRALITY_SCALE) (:func:`centrality`). On the 157 test images (20
# labels, seed 0) click Dice 94.42 -> 94.84 %; the same weighting around the localiser's own centre in automatic
# mode lost a point (91.04 -> 89.97 %: the localiser's centre is less sure than a click), so it is not used there.
# Also tried and dropped: weighting by the image's brightness along each candidate's outline (the skull is bright)
# fixed over-segmented answers (14 failures: click 82.4 -> 86.4 %) but cost more elsewhere (157 images: automatic
# 91.04 -> 89.72 %, click 94.84 -> 94.18 %).
CENTRALITY_SCALE = 2.0
# An automatic answer is flagged ``needs_review`` when the head verifier gives the served candidate less than this:
# the logistic regression's own decision boundary (more likely not the head), not a threshold tuned on test images.
# On the 157 test images it flagged 17 % of the answers and all 10 failures (Dice < 0.80) after 20 labels, 15 % and
# 7 of 8 after 5; the unflagged answers scored 96.0 / 95.7 % (docs/eval/automatic/confidence).
REVIEW_BELOW = 0.5
# The wide localiser's answers (:func:`localiser_box`, no verifier) are flagged when the localiser's mean head
# probability over the component it boxed is below this. Chosen on the 237 unlabelled pool images the self-trained
# 20-label localiser (seed 0) did not train on: it flagged 33 and 15 of their 16 failures (ROC AUC 0.97; the
# decoder's predicted IoU 0.91, the re-box stability 0.85). On the 157 test images it flagged 16 answers (10 %) and 5
# of the 6 failures; the unflagged scored 95.90 % (96.16 % as the served ellipse) (docs/eval/automatic/confidence/
# n20_s0_self_trained).
LOCALISER_REVIEW_BELOW = 0.965


@torch.inference_mode()
def localised(predictor: "SamPredictor", emb: "ImageEmbedding", prompt: Prompt = Prompt(),
              image: Optional[np.ndarray] = None) -> Optional["Prediction"]:
    """The localiser says *where* the head is (its centre was inside the true head box on 40 of 40 test images
    after 5 labels) more reliably than *how far* it extends (its thresholded map over-reaches: median box area
    1.7x the true one, and the box decoder fed that box scored 0.70-0.74 Dice). So: candidate boxes of several
    sizes (plus the localiser's own box) centred on the localiser's head (or the foreground click), and without a
    click also around its next centre peaks (:data:`.localiser.OTHER_PEAKS`, none by default), are decoded in one
    batch, each candidate's component holding the centre is re-prompted with its own box plus a margin, and the
    answer that is confident (predicted IoU), stable under that re-prompt and ellipse-shaped wins (its agreement
    with the localiser's soft head map is reported in ``confidence``). With the ``image``, the skull ring around
    that centre (:mod:`.skull_ring`) adds one more candidate box. With a trained head verifier (:mod:`.verifier`)
    and no click, the box search's best SEARCH_TOP_K candidates join in and each score is weighted by the
    verifier's probability that the candidate is the head. None when the localiser finds no head (or none holding
    the click)."""
    if not len(prompt.points) and int(predictor.localiser.answers_with_box):
        return localiser_box(predictor, emb)
    found = localised_candidates(predictor, emb, prompt, image)
    if found is None:
        return None
    loc, cands, ring, clicked = found
    ch, cw = predictor.low_res_hw(emb)
    fg = prompt.points[prompt.labels == 1] if len(prompt.points) else None
    scores = np.array([c.score for c in cands])
    if clicked:
        scores = scores * np.array([centrality(c.mask, c.centre) for c in cands])
    verifier = predictor.head_verifier
    head_p = None
    if verifier is not None and not clicked:
        head_p = verifier.probability(verifier_inputs(emb, cands))
        scores = scores * head_p
    best = int(np.argmax(scores))
    win = cands[best]
    pred = predictor.finish(emb, win.logits, win.iou)
    pred = rebox(predictor, emb, pred, fg)  # the confidence below describes this answer (pred.logits: its own)
    prob = torch.from_numpy(loc.prob_map.astype(np.float32))[None, None]
    prob = torch.nn.functional.interpolate(prob, size=(ch, cw), mode="bilinear", align_corners=False)[0, 0].numpy()
    served = (pred.logits[0, 0, :ch, :cw] > 0).cpu().numpy()
    pred.confidence = {
        "source": "localiser",
        "localiser_score": round(loc.score, 4),
        "localiser_head_prob": round(loc.head_prob, 4),
        "localiser_centre_prob": round(loc.centre_prob, 4),
        "localiser_candidates": loc.candidates,
        "decoder_iou": round(pred.score, 4),
        # soft Dice with the localiser's head probability (reported, not scored: weighting by it did not help)
        "localiser_decoder_dice": round(float(2 * (prob * served).sum() / max(prob.sum() + served.sum(), 1e-6)), 4),
        "candidate_score": round(float(scores[best]), 4),
        "skull_ring_support": None if ring is None else round(ring.support, 4),
        "chosen_candidate": win.source,
    }
    if head_p is not None:
        pred.confidence["head_probability"] = round(float(head_p[best]), 4)
        pred.confidence["needs_review"] = bool(head_p[best] < REVIEW_BELOW)
        searched = [c for c in cands if c.source == "box_search"]
        if searched:  # what the box search alone answers (:func:`search`'s rule on the same candidates)
            top = search_choice(searched)
            other = predictor.finish(emb, top.logits, top.iou)
            pred.confidence["box_search_agreement"] = round(mask_dice(pred.mask, other.mask), 4)
    return pred


@torch.inference_mode()
def localiser_box(predictor: "SamPredictor", emb: "ImageEmbedding") -> Optional["Prediction"]:
    """The automatic answer of a localiser trained on many labels (``answers_with_box``, see
    :data:`.localiser.WIDE_FROM_LABELS`): its own box plus AUTOMATIC_MARGIN_PX, decoded, then re-boxed once
    (:func:`rebox`). None when it finds no head."""
    from .localiser import localise

    h, w = emb.original_hw
    loc = localise(predictor.localiser, emb.features, (h, w), emb.input_hw)
    if loc.box is None:
        return None
    logits, iou = predictor.decode(emb, boxes=np.array([grow_box(loc.box, AUTOMATIC_MARGIN_PX, h, w)]))
    first = predictor.finish(emb, logits, iou)
    pred = rebox(predictor, emb, first)
    pred.confidence = {
        "source": "localiser_box",
        "localiser_score": round(loc.score, 4),
        "localiser_head_prob": round(loc.head_prob, 4),
        "localiser_centre_prob": round(loc.centre_prob, 4),
        "localiser_candidates": loc.candidates,
        "decoder_iou": round(pred.score, 4),
        # the re-box moves a sound answer little; a large move says the box held more than one structure
        "rebox_stability": round(mask_dice(first.mask, pred.mask), 4),
        "needs_review": bool(loc.head_prob < LOCALISER_REVIEW_BELOW),
    }
    return pred


class Candidate:
    """One re-prompted candidate answer of :func:`localised_candidates`."""

    def __init__(self, source, head, mask, logits, iou, first_iou, centre):
        self.source = source  # "localiser", "skull_ring", "localiser_peak" or "box_search"
        self.head = head  # (ch, cw) bool: the first decode's head component
        self.mask = mask  # (ch, cw) bool: the re-prompted answer at low resolution
        self.logits, self.iou = logits, iou  # (1, 1, 256, 256), (1, 1): what finish() takes
        self.first_iou = first_iou
        self.centre = centre  # (x, y) at low resolution: the localiser's centre or the click
        self.stability = mask_dice(head, mask)
        self.ellipse = ellipse_likeness(mask)
        # confident, stable under the re-prompt, ellipse-shaped
        self.score = float(iou[0, 0]) * self.stability * self.ellipse


def verifier_inputs(emb: "ImageEmbedding", cands: Sequence[Candidate]) -> np.ndarray:
    """The head verifier's inputs (N, D) for one image's candidates (:func:`.verifier.candidate_features`)."""
    from .verifier import candidate_features

    return candidate_features(emb.features, [c.mask for c in cands],
                              [(c.first_iou, float(c.iou[0, 0]), c.stability, c.ellipse) for c in cands])


def localised_candidates(predictor: "SamPredictor", emb: "ImageEmbedding", prompt: Prompt = Prompt(),
                         image: Optional[np.ndarray] = None, search_too: Optional[bool] = None):
    """The candidates :func:`localised` chooses among: (localisation, [Candidate], skull ring or None, clicked),
    or None when the localiser finds no head (or none holding the click). ``search_too`` (default: the model has a
    head verifier and there is no click) adds the box search's best SEARCH_TOP_K candidates. The trainer fits the
    head verifier on these same candidates of its labelled images."""
    from .localiser import localise
    from .skull_ring import skull_ring

    h, w = emb.original_hw
    fg = prompt.points[prompt.labels == 1] if len(prompt.points) else None
    bg = prompt.points[prompt.labels == 0] if len(prompt.points) else None
    loc = localise(predictor.localiser, emb.features, (h, w), emb.input_hw, fg, bg)
    if loc.box is None:
        return None
    cx, cy = loc.centre
    clicked = fg is not None and len(fg) > 0
    if clicked:
        cx, cy = fg.mean(axis=0)
    if search_too is None:
        search_too = predictor.head_verifier is not None and not clicked
    boxes = [loc.box] + boxes_around([(cx, cy)], LOCALISED_SCALES, h, w)
    ring = skull_ring(image, (cx, cy)) if image is not None else None
    if ring is not None:
        boxes.append(ring.box(AUTOMATIC_MARGIN_PX, h, w))
    n_loc = len(boxes)
    peaks = loc.other_peaks  # none with a click
    for p in peaks:
        boxes += boxes_around([p], LOCALISED_SCALES, h, w)
    n_peak = len(boxes)
    if search_too:
        boxes += boxes_around(image_centres(h, w), SEARCH_SCALES, h, w)
    ch, cw = predictor.low_res_hw(emb)
    to_low = np.array([cw / w, ch / h])
    centre = np.array([[cx, cy]]) * to_low
    bg_low = None if bg is None else bg * to_low

    logits, iou = predictor.decode(emb, boxes=np.array(boxes))
    low = (logits[:, 0, :ch, :cw] > 0).cpu().numpy()
    # (index in boxes, head, re-prompt box): the localiser's candidates keep the component holding its centre (a
    # peak's candidates the one holding that peak), the box search's their largest (as :func:`search` does)
    first = _heads_with_boxes(low[:n_loc], centre, bg_low, to_low, h, w)
    sources = ["skull_ring" if ring is not None and i == n_loc - 1 else "localiser" for i, _, _ in first]
    for k, p in enumerate(peaks):
        at = n_loc + k * len(LOCALISED_SCALES)
        got = _heads_with_boxes(low[at : at + len(LOCALISED_SCALES)], np.array([p]) * to_low, bg_low, to_low, h, w)
        first += [(at + i, head, box) for i, head, box in got]
        sources += ["localiser_peak"] * len(got)
    searched = [(n_peak + i, head, box) for i, head, box in _heads_with_boxes(low[n_peak:], None, bg_low, to_low, h, w)]
    top = _best_first(searched, iou, SEARCH_TOP_K)
    first += top
    sources += ["box_search"] * len(top)
    if not first:
        return None
    return loc, _reprompted(predictor, emb, first, iou, sources, centre[0]), ring, clicked


def _best_first(first, iou: torch.Tensor, k: int) -> list:
    """The k (index, head, box) of a first decode with the best iou x ellipse-likeness of their head, best first."""
    return sorted(first, key=lambda c: -float(iou[c[0], 0]) * ellipse_likeness(c[1]))[:k]


def _reprompted(predictor: "SamPredictor", emb: "ImageEmbedding", first, iou: torch.Tensor, sources,
                centre) -> list:
    """Each (index, head, box) of a first decode (``iou`` its scores) re-prompted with its box, in one batch, as
    :class:`Candidate` s in the same order."""
    ch, cw = predictor.low_res_hw(emb)
    logits2, iou2 = predictor.decode(emb, boxes=np.array([c[2] for c in first]))
    low2 = (logits2[:, 0, :ch, :cw] > 0).cpu().numpy()
    return [Candidate(src, head, low2[j], logits2[j : j + 1], iou2[j : j + 1], float(iou[i, 0]), centre)
            for j, ((i, head, _), src) in enumerate(zip(first, sources))]


def search_choice(searched: Sequence[Candidate]) -> Candidate:
    """What :func:`search` answers among box-search candidates ordered best first by their first decode: the best
    re-prompted score among the first REFINE_TOP_K."""
    return max(searched[:REFINE_TOP_K], key=lambda c: c.score)


def rebox_box(mask: np.ndarray) -> Tuple[float, float, float, float]:
    """The box a re-box decodes: the mask's own box plus AUTOMATIC_MARGIN_PX, clipped to the image."""
    h, w = mask.shape
    return grow_box(mask_box(mask), AUTOMATIC_MARGIN_PX, h, w)


def rebox(predictor: "SamPredictor", emb: "ImageEmbedding", pred: "Prediction", fg=None) -> "Prediction":
    """The winner's own box plus AUTOMATIC_MARGIN_PX, decoded once more: the box decoder was fine-tuned on boxes
    0-20 px outside the head, while the candidates were re-prompted with REFINE_MARGIN (8 % of their size, ~40 px on
    a large head). On the 157 test images (20 labels, seed 0) automatic 90.79 -> 91.30 %, median 95.76 -> 96.21 %;
    a second re-box added nothing (91.33 %). Kept only when it still holds the clicks (``fg``, image pixels)."""
    if pred.mask.sum() < 16:
        return pred
    logits, iou = predictor.decode(emb, boxes=np.array([rebox_box(pred.mask)]))
    out = predictor.finish(emb, logits, iou)
    if out.mask.sum() < 16:
        return pred
    if fg is not None and len(fg):
        h, w = emb.original_hw
        xy = np.clip(np.round(fg).astype(int), 0, [w - 1, h - 1])
        if not out.mask[xy[:, 1], xy[:, 0]].all():
            return pred
    return out


def search(predictor: "SamPredictor", emb: "ImageEmbedding", centres, prompt: Prompt) -> "Prediction":
    """The best head among candidate boxes around ``centres`` (clicks in ``prompt`` select and exclude)."""
    h, w = emb.original_hw
    boxes = boxes_around(centres, SEARCH_SCALES, h, w)
    ch, cw = predictor.low_res_hw(emb)
    to_low = np.array([cw / w, ch / h])
    fg = prompt.points[prompt.labels == 1] * to_low if len(prompt.points) else None
    bg = prompt.points[prompt.labels == 0] * to_low if len(prompt.points) else None

    logits, iou = predictor.decode(emb, boxes=np.array(boxes))
    low = (logits[:, 0, :ch, :cw] > 0).cpu().numpy()
    first = _best_first(_heads_with_boxes(low, fg, bg, to_low, h, w), iou, REFINE_TOP_K)
    if not first:
        return predictor.empty(emb)
    best = search_choice(_reprompted(predictor, emb, first, iou, ["box_search"] * len(first), None))
    return predictor.finish(emb, best.logits, best.iou)


def boxes_around(centres, scales, h: int, w: int) -> list:
    """Candidate boxes of each height ``scale x shorter side`` (width x SEARCH_ASPECT) around each centre, clipped."""
    boxes = []
    for cx, cy in centres:
        for s in scales:
            bh = s * min(h, w)
            bw = min(bh * SEARCH_ASPECT, w)
            boxes.append((max(cx - bw / 2, 0), max(cy - bh / 2, 0), min(cx + bw / 2, w - 1), min(cy + bh / 2, h - 1)))
    return boxes


def _heads_with_boxes(low: np.ndarray, fg, bg, to_low: np.ndarray, h: int, w: int):
    """For each low-resolution candidate mask: (index, its head component (the one holding ``fg``, free of ``bg``),
    that component's box in image pixels grown by REFINE_MARGIN) -- the boxes the candidates are re-prompted with."""
    out = []
    for i, m in enumerate(low):
        head = head_component(m, fg, bg)
        if head is None:
            continue
        rows, cols = np.nonzero(head)
        x0, y0 = cols.min() / to_low[0], rows.min() / to_low[1]
        x1, y1 = (cols.max() + 1) / to_low[0] - 1, (rows.max() + 1) / to_low[1] - 1
        out.append((i, head, grow_box((x0, y0, x1, y1), ((x1 - x0) * REFINE_MARGIN, (y1 - y0) * REFINE_MARGIN), h, w)))
    return out


def centrality(mask: np.ndarray, point) -> float:
    """exp(-d^2 / CENTRALITY_SCALE), d^2 the point's squared Mahalanobis distance from the mask's centroid (4 on the
    rim of a filled ellipse)."""
    rows, cols = np.nonzero(mask)
    if len(rows) < 3:
        return 0.0
    xy = np.stack([cols + 0.5, rows + 0.5], 1).astype(np.float64)
    (a, b), (_, c) = np.cov(xy.T) + 1e-3 * np.eye(2)
    dx, dy = np.asarray(point, np.float64) - xy.mean(0)
    d2 = (c * dx * dx - 2 * b * dx * dy + a * dy * dy) / (a * c - b * b)  # 2x2 inverse written out: no LAPACK call
    return float(np.exp(-d2 / CENTRALITY_SCALE))


def head_component(mask: np.ndarray, fg=None, bg=None) -> Optional[np.ndarray]:
    """The connected component holding the foreground clicks (else the largest), free of background clicks."""
    from skimage.measure import label

    if mask.sum() < 16:
        return None
    comps = label(mask, connectivity=2)
    hh, ww = mask.shape

    def at(p):
        return comps[int(np.clip(p[1], 0, hh - 1)), int(np.clip(p[0], 0, ww - 1))]

    if fg is not None and len(fg):
        ids = {at(p) for p in fg}
        if 0 in ids or len(ids) != 1:
            return None
        chosen = ids.pop()
    else:
        chosen = int(np.argmax(np.bincount(comps.ravel())[1:])) + 1
    head = comps == chosen
    if bg is not None and any(at(p) == chosen for p in bg):
        return None
    return head


def ellipse_likeness(mask: np.ndarray) -> float:
    """1 for a filled ellipse; lower for crescents, fragments and blobs (solidity x area/ellipse-area)."""
    from skimage.measure import regionprops

    if not mask.any():
        return 0.0
    rp = max(regionprops(mask.astype(np.uint8)), key=lambda r: r.area)
    ellipse_area = np.pi / 4 * rp.axis_major_length * rp.axis_minor_length
    if ellipse_area <= 0:
        return 0.0
    return float(rp.solidity * min(rp.area / ellipse_area, ellipse_area / rp.area))
