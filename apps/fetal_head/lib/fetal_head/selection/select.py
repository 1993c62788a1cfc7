"""Selection rules on precomputed numbers (no model here): top uncertainty, k-center greedy, hybrid."""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np


def select_uncertain(scores: Dict[str, float], k: int) -> List[str]:
    """The ``k`` ids with the highest score (ties broken by id, so the answer is deterministic)."""
    return [i for i, _ in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def k_center_greedy(features: np.ndarray, centres: Sequence[int], k: int) -> List[int]:
    """Indices of ``k`` rows of ``features`` chosen greedily to be farthest from the ``centres`` rows and from
    each other (Sener & Savarese 2018's core-set greedy); with no centre the first pick is the row nearest the
    mean (a typical image, not an outlier)."""
    n = len(features)
    k = min(k, n)
    if k <= 0:
        return []
    x = np.asarray(features, dtype=np.float32)
    if len(centres):
        d = np.min(((x[:, None, :] - x[list(centres)][None]) ** 2).sum(-1), axis=1)
    else:
        first = int(np.argmin(((x - x.mean(0)) ** 2).sum(-1)))
        d = ((x - x[first]) ** 2).sum(-1)
        picked = [first]
        d[first] = -1
        k -= 1
        if k == 0:
            return picked
        return picked + _greedy(x, d, k, picked)
    return _greedy(x, d, k, list(centres))


def _greedy(x, d, k, taken) -> List[int]:
    d = d.copy()
    for i in taken:
        d[i] = -1
    out = []
    for _ in range(k):
        j = int(np.argmax(d))
        if d[j] < 0:
            break
        out.append(j)
        d = np.minimum(d, ((x - x[j]) ** 2).sum(-1))
        d[j] = -1
        for i in taken:
            d[i] = -1
    return out


def select_diverse(features: Dict[str, np.ndarray], labelled: Sequence[str], candidates: Sequence[str], k: int) -> List[str]:
    """``k`` candidates covering the pool: k-center greedy with the labelled images as the existing centres."""
    ids = list(candidates) + [i for i in labelled if i in features and i not in set(candidates)]
    if not candidates:
        return []
    x = np.stack([features[i] for i in ids])
    centres = list(range(len(candidates), len(ids)))
    picks = k_center_greedy(x, centres, k)
    return [ids[j] for j in picks if j < len(candidates)][:k]


def select_hybrid(scores: Dict[str, float], features: Dict[str, np.ndarray], labelled: Sequence[str], k: int,
                  shortlist: int = 3) -> List[str]:
    """Diversity among the uncertain: the ``shortlist * k`` most uncertain scored images, then k-center greedy
    among them (so one batch does not spend its labels on near-duplicates of one hard case)."""
    top = select_uncertain(scores, max(k, shortlist * k))
    return select_diverse(features, labelled, top, k)
