"""MONAI Label's first strategy (first unlabelled id in sort order), over real images only."""

from monailabel.interfaces.tasks.strategy import Strategy

from .common import EMPTY_POOL, SelectionService, logger


class FirstReal(Strategy):
    def __init__(self, service: SelectionService, description="First unlabelled real (non-synthetic) image"):
        super().__init__(description)
        self.service = service

    def __call__(self, request, datastore):
        unlabelled, _ = self.service.pool(request, datastore)
        if not unlabelled:
            logger.info(f"FirstReal: {EMPTY_POOL}")
            return None
        image_id, path = sorted(unlabelled)[0]
        try:
            self.service.scorer.preannotate(path)
        except Exception as e:
            logger.warning(f"pre-annotation of {image_id} failed: {e}")
        return {"id": image_id}
