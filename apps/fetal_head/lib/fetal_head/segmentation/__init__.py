"""Segmentation with Segment Anything: everything between a gray frame plus a prompt and a head mask.

- :mod:`.models`: the model family registry (input size, normalisation, builder per family) and the automatic head;
- :mod:`.prompts`: :class:`Prompt`, :class:`PromptError`, parsing MONAI Label clients' prompts, simulated prompts;
- :mod:`.predictor`: :class:`SamPredictor` (encoder, in-memory embedding cache, decoder, geometry back to the image);
- :mod:`.box_search`: click-only and automatic requests turned into box prompts;
- :mod:`.localiser`: the head localiser learnt from few labels (where the head is, from the image embedding);
- :mod:`.skull_ring`: the skull's ellipse around a centre, from the image's bright ridges (a candidate box);
- :mod:`.embedding_cache`: embeddings on disk for training and evaluation;
- :mod:`.model_store`: which weights the server serves, and writing fine-tuned ones atomically;
- :mod:`.training`: fine-tuning the mask decoder and the automatic head on labelled images.
"""

from .models import LITEMEDSAM, META_SAM_TYPES
from .predictor import ImageEmbedding, Prediction, SamPredictor
from .prompts import AUTOMATIC, Prompt, PromptError

__all__ = ["AUTOMATIC", "ImageEmbedding", "LITEMEDSAM", "META_SAM_TYPES", "Prediction", "Prompt", "PromptError",
           "SamPredictor"]
