"""Retraining in the loop: after every K newly labelled real images, queue MONAI Label's training task.

``--conf auto_retrain_every K`` (0: off, the default), ``--conf auto_retrain_epochs E`` and
``--conf auto_retrain_options JSON`` (further train options, e.g. ``{"train_batch_size": 8}``). The app calls
:meth:`AutoRetrain.on_label` from ``MONAILabelApp.on_save_label`` (the datastore endpoint's callback after every
submitted label). Counting labelled images (not calls) makes a re-submitted label not count twice.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag

from fetal_head.synthesis.store import is_synthetic

logger = logging.getLogger(__name__)

DEFAULT_EVERY = 5  # ~1 min per retrain on 2 CPU cores at 20-30 labels with the default epochs (README)
DEFAULT_EPOCHS = 10


class AutoRetrain:
    def __init__(self, every: int, train: Callable[[dict], object], epochs: int = DEFAULT_EPOCHS,
                 options: Optional[dict] = None):
        self.every = int(every)
        self.train = train  # (params) -> queues the training task
        self.epochs = int(epochs)
        self.options = dict(options or {})
        self.baseline: Optional[int] = None  # labelled real images at the last (queued) retrain
        self.triggered = 0
        self._lock = threading.Lock()

    @staticmethod
    def count(datastore: Datastore) -> int:
        return sum(not is_synthetic(i, datastore.get_image_info(i))
                   for i in datastore.get_labeled_images(DefaultLabelTag.FINAL))

    def start(self, datastore: Datastore) -> None:
        """Labels already there at start do not count towards the first K."""
        self.baseline = self.count(datastore)

    def on_label(self, datastore: Datastore) -> Optional[dict]:
        if self.every <= 0:
            return None
        with self._lock:
            n = self.count(datastore)
            if self.baseline is None:
                self.baseline = max(0, n - 1)
            if n - self.baseline < self.every:
                return {"auto_retrain": f"{n - self.baseline}/{self.every} new labels"}
            self.baseline = n
            self.triggered += 1
        logger.info(f"auto-retrain: {self.every} new labels ({n} in all); queueing training ({self.epochs} epochs)")
        try:
            self.train({**self.options, "max_epochs": self.epochs})
        except Exception as e:
            logger.warning(f"auto-retrain could not queue training: {e}")
            return {"auto_retrain": f"failed to queue: {e}"}
        return {"auto_retrain": f"queued after {n} labels"}
