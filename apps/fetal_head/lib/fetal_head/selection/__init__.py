"""Choosing which image to label next (active learning), importable without the server.

This subpackage owns:

- :mod:`.scores`: per-image uncertainty of the automatic answer the server would show (the head verifier's
  probability that it is not the head, its disagreement with the answers to slightly perturbed boxes around it,
  the decoder's predicted IoU, how far it is from an ellipse), and pooled image-embedding features for diversity;
- :mod:`.select`: the selection rules on those numbers: top uncertainty, k-center greedy coverage of the
  unlabelled pool, and a hybrid (k-center among the most uncertain);
- :mod:`.score_cache`: scores and features on disk, keyed like the embedding cache (encoder key + image hash, plus
  the model version for scores, which depend on the decoder);
- :mod:`.scorer`: the pool scorer the server's strategies use (disk embeddings, score cache, background pass).

MONAI Label adapters (the ``Strategy`` classes) live in ``lib/activelearning``; the simulated annotation study is
``scripts/simulate_active_learning.py``.
"""

from .score_cache import ScoreCache
from .scores import UNCERTAINTY_WEIGHTS, automatic_answer, pooled_feature, quick_automatic, uncertainty
from .select import k_center_greedy, select_diverse, select_hybrid, select_uncertain
from .scorer import PoolScorer

__all__ = ["ScoreCache", "UNCERTAINTY_WEIGHTS", "automatic_answer", "pooled_feature", "quick_automatic", "uncertainty",
           "k_center_greedy", "select_diverse", "select_hybrid", "select_uncertain", "PoolScorer"]
