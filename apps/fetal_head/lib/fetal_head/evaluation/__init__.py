"""Measuring the segmenter: one evaluation core (:mod:`.core`: the prompt each test image gets, Dice and HD95 via
MONAI metrics, HC error, and one convention for images where no head is found) used by the trainer's evaluation,
the benchmark (:mod:`.benchmark`: N real labels with or without synthetic pairs) and ``scripts/eval_sam.py``."""
