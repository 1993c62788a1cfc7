"""What every strategy shares: the unlabelled, non-synthetic pool, the scorer, hand-out bookkeeping."""

from __future__ import annotations

import logging
import time
from typing import Dict, List, Optional, Tuple

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.strategy import Strategy

from fetal_head.selection import PoolScorer
from fetal_head.synthesis.store import is_synthetic

logger = logging.getLogger(__name__)

EMPTY_POOL = "no unlabelled real image left: every non-synthetic image in the datastore has a final label"
RECENT_S = 600  # an image handed out this recently (and not labelled yet) is offered again only when nothing else is


class SelectionService:
    """One scorer per app, shared by the strategies; ``sync_first`` images are scored at once when nothing is
    scored yet (the rest of the pool follows in the background)."""

    def __init__(self, scorer: PoolScorer, sync_first: int = 2):
        self.scorer = scorer
        self.sync_first = sync_first

    def pool(self, request, datastore: Datastore) -> Tuple[List[Tuple[str, str]], List[Tuple[str, str]]]:
        """(unlabelled, labelled) real images as (id, path)."""
        tag = request.get("label_tag") or DefaultLabelTag.FINAL
        unlabelled = datastore.get_unlabeled_images(tag, request.get("labels"))
        labelled = datastore.get_labeled_images(tag)

        def real(ids):
            out = []
            for i in ids:
                if is_synthetic(i, datastore.get_image_info(i)):
                    continue
                path = datastore.get_image_uri(i)
                if path:
                    out.append((i, path))
            return out

        return real(unlabelled), real(labelled)

    def refresh(self, request, datastore: Datastore) -> None:
        """Start (or re-target) the background pass over the pool: unlabelled first, then labelled (features)."""
        unlabelled, labelled = self.pool(request, datastore)
        self.scorer.start_background(unlabelled + labelled)


def not_recent(items, request, datastore: Datastore) -> list:
    """Items not handed out by this strategy in the last RECENT_S seconds (all of them if that leaves none)."""
    strategy, now = request.get("strategy"), time.time()
    fresh = [it for it in items
             if now - datastore.get_image_info(it[0]).get("strategy", {}).get(strategy, {}).get("ts", 0) > RECENT_S]
    return fresh or list(items)


class RealImageStrategy(Strategy):
    """A strategy over real (non-synthetic) unlabelled images; a variant overrides one hook, :meth:`choose`. This
    base answers an empty pool clearly and pre-annotates the image handed out (its embedding is cached, so the
    next infer on it skips the encoder)."""

    def __init__(self, description: str, service: SelectionService):
        super().__init__(description)
        self.service = service

    def choose(self, unlabelled, labelled, request, datastore: Datastore) -> Optional[Tuple[str, float, dict]]:
        """(image id, weight, extra answer fields) among ``unlabelled`` [(id, path)], or None."""
        raise NotImplementedError

    def __call__(self, request, datastore: Datastore):
        unlabelled, labelled = self.service.pool(request, datastore)
        if not unlabelled:
            logger.info(f"{type(self).__name__}: {EMPTY_POOL}")
            return None
        choice = self.choose(unlabelled, labelled, request, datastore)
        if choice is None:
            return None
        image_id, weight, extra = choice
        try:
            self.service.scorer.preannotate(dict(unlabelled)[image_id])
        except Exception as e:
            logger.warning(f"pre-annotation of {image_id} failed: {e}")
        return {"id": image_id, "weight": float(weight), **extra}


class ScoredStrategy(RealImageStrategy):
    """A strategy that picks from cached scores/features; subclasses implement :meth:`pick`."""

    def pick(self, unlabelled, labelled, scores: Dict[str, dict], feats) -> Optional[Tuple[str, float]]:
        raise NotImplementedError

    def choose(self, unlabelled, labelled, request, datastore: Datastore):
        scorer = self.service.scorer
        scores, feats = scorer.known(unlabelled + labelled)
        if not any(i in scores for i, _ in unlabelled):  # cold start: score a few now, the rest in the background
            first = unlabelled[: self.service.sync_first]
            scorer.score_items(first)
            scores, feats = scorer.known(unlabelled + labelled)
        missing = [it for it in unlabelled + labelled if it[0] not in scores and it[0] not in feats]
        if missing or any(i not in scores for i, _ in unlabelled):
            scorer.start_background([it for it in unlabelled if it[0] not in scores] + missing)
        candidates = not_recent(unlabelled, request, datastore)
        cand_ids = {i for i, _ in candidates}
        choice = self.pick([it for it in candidates if it[0] in scores or it[0] in feats],
                           [i for i, _ in labelled], {k: v for k, v in scores.items() if k in cand_ids}, feats)
        if choice is None:
            return None
        image_id, weight = choice
        stats = {**scorer.stats(), "unlabelled": len(unlabelled),
                 "scored": sum(i in scores for i, _ in unlabelled), "preannotated": image_id}
        logger.info(f"{type(self).__name__}: next sample {image_id} (weight {weight:.4f}; {stats})")
        return image_id, weight, {"active_learning": stats}
