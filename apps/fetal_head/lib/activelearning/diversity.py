"""Diversity sampling: k-center greedy on pooled SAM image embeddings, with the labelled images as centres (the
unlabelled image farthest from everything labelled so far); the cold-start strategy."""

import numpy as np

from fetal_head.selection import select_diverse

from .common import ScoredStrategy


class Diversity(ScoredStrategy):
    def __init__(self, service, description="Coverage of the unlabelled pool (k-center greedy on SAM embeddings)"):
        super().__init__(description, service)

    def pick(self, unlabelled, labelled, scores, feats):
        cands = [i for i, _ in unlabelled if i in feats]
        if not cands:
            return None
        best = select_diverse(feats, [i for i in labelled if i in feats], cands, 1)[0]
        done = [feats[i] for i in labelled if i in feats]
        dist = float(min(np.sum((feats[best] - f) ** 2) for f in done)) if done else 0.0
        return best, dist
