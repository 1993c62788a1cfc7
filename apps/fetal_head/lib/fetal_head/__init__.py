"""Fetal head ultrasound: SAM segmentation, head biometry and the datastore glue behind the MONAI Label app.

Everything here works without the MONAI Label server; ``apps/fetal_head/lib/{infers,trainers}`` are thin
adapters over it.
"""

__version__ = "0.1.0"
