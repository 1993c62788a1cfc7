"""MONAI Label active-learning strategies (thin adapters over :mod:`fetal_head.selection`), one file each, and the
auto-retrain hook. Every strategy returns an unlabelled, non-synthetic image id, or None when there is none."""

from .auto_retrain import AutoRetrain
from .common import SelectionService
from .diversity import Diversity
from .first import FirstReal
from .hybrid import Hybrid
from .random import RandomReal
from .uncertainty import Uncertainty

__all__ = ["AutoRetrain", "SelectionService", "Diversity", "FirstReal", "Hybrid", "RandomReal", "Uncertainty"]
