"""MONAI Label's first strategy (first unlabelled id in sort order), over real images only."""

from .common import RealImageStrategy


class FirstReal(RealImageStrategy):
    def __init__(self, service, description="First unlabelled real (non-synthetic) image"):
        super().__init__(description, service)

    def choose(self, unlabelled, labelled, request, datastore):
        return sorted(unlabelled)[0][0], 1.0, {}
