"""MONAI Label's random strategy (weighted towards images not handed out lately), over real images only."""

import random as _random
import time

from monailabel.interfaces.tasks.strategy import Strategy

from .common import EMPTY_POOL, SelectionService, logger


class RandomReal(Strategy):
    def __init__(self, service: SelectionService, description="Random unlabelled real (non-synthetic) image"):
        super().__init__(description)
        self.service = service

    def __call__(self, request, datastore):
        unlabelled, _ = self.service.pool(request, datastore)
        if not unlabelled:
            logger.info(f"RandomReal: {EMPTY_POOL}")
            return None
        strategy, now = request.get("strategy"), int(time.time())
        weights = [now - datastore.get_image_info(i).get("strategy", {}).get(strategy, {}).get("ts", 0) + 1
                   for i, _ in unlabelled]
        k = _random.choices(range(len(unlabelled)), weights=weights)[0]
        image_id, path = unlabelled[k]
        try:
            self.service.scorer.preannotate(path)
        except Exception as e:
            logger.warning(f"pre-annotation of {image_id} failed: {e}")
        return {"id": image_id, "weight": weights[k]}
