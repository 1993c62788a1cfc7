"""MONAI Label's random strategy (weighted towards images not handed out lately), over real images only."""

import random as _random
import time

from .common import RealImageStrategy


class RandomReal(RealImageStrategy):
    def __init__(self, service, description="Random unlabelled real (non-synthetic) image"):
        super().__init__(description, service)

    def choose(self, unlabelled, labelled, request, datastore):
        strategy, now = request.get("strategy"), int(time.time())
        weights = [now - datastore.get_image_info(i).get("strategy", {}).get(strategy, {}).get("ts", 0) + 1
                   for i, _ in unlabelled]
        k = _random.choices(range(len(unlabelled)), weights=weights)[0]
        return unlabelled[k][0], weights[k], {}
