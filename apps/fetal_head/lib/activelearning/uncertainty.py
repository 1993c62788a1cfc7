"""Uncertainty sampling: the unlabelled image whose automatic answer (the one the server would show) SAM is least
sure of (:func:`fetal_head.selection.uncertainty`)."""

from fetal_head.selection import select_uncertain

from .common import ScoredStrategy


class Uncertainty(ScoredStrategy):
    def __init__(self, service, description="Most uncertain automatic answer (head probability, perturbed-box disagreement, decoder IoU, ellipse fit)"):
        super().__init__(description, service)

    def pick(self, unlabelled, labelled, scores, feats):
        s = {i: scores[i]["score"] for i, _ in unlabelled if i in scores}
        if not s:
            return None
        best = select_uncertain(s, 1)[0]
        return best, s[best]
