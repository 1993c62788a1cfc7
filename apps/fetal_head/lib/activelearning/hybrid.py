"""Hybrid: k-center greedy among the most uncertain unlabelled images (uncertain, and unlike what is labelled)."""

from fetal_head.selection import select_hybrid

from .common import ScoredStrategy


class Hybrid(ScoredStrategy):
    def __init__(self, service, shortlist: int = 3,
                 description="Most uncertain, then most unlike the labelled images (uncertainty + k-center)"):
        super().__init__(description, service)
        self.shortlist = shortlist

    def pick(self, unlabelled, labelled, scores, feats):
        s = {i: scores[i]["score"] for i, _ in unlabelled if i in scores and i in feats}
        if not s:
            return None
        best = select_hybrid(s, feats, [i for i in labelled if i in feats], 1, self.shortlist)[0]
        return best, s[best]
