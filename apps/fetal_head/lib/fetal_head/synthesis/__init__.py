"""Synthetic image-mask pairs from diffusion models, kept apart from real data.

As diffusers keeps models, schedulers and pipelines apart:

- :mod:`.diffusion`: configuration, the UNet and noise schedulers, training data and the training loop;
- :mod:`.schemes`: one class per generator scheme (mask-conditioned, joint), the only place that knows how a
  scheme builds its input and splits its output;
- :mod:`.shape_model`: where real heads sit, how big and tilted (the mask-conditioned scheme draws masks from it);
- :mod:`.sampling`: sampling pairs from a trained generator, with quality control;
- :mod:`.quality`: the QC gates a pair must pass before it may enter a datastore;
- :mod:`.pipeline`: end to end, train a generator on real pairs and write QC-passed pairs to a datastore or folder;
- :mod:`.store`: synthetic pairs in a MONAI Label datastore (provenance, purge, never mistaken for real ones);
- :mod:`.realism`: FD/KID in SAM feature space and sample grids.
"""
