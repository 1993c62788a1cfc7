"""Input and output: ultrasound frames and masks from files (PNG/JPEG, NRRD/NIfTI, DICOM US), DICOM SEG, and
HC18-style folders.

- :mod:`.readers` is the one entry point for frames: a registry that picks the reader by content;
- :mod:`.images` (bitmaps and label files), :mod:`.dicom_us` (DICOM US and SEG) are the readers and writers;
- :mod:`.common` is the leaf they share (errors, gray conversion, size limits), so no reader imports another;
- :mod:`.hc18` reads HC18-style folders and imports them into a MONAI Label datastore.
"""

from .common import MAX_PIXELS, MIN_SIDE, ImageReadError, to_gray_uint8
from .images import read_mask, write_mask, write_mask_png
from .readers import read_frame, read_image

__all__ = ["ImageReadError", "MAX_PIXELS", "MIN_SIDE", "read_frame", "read_image", "read_mask", "to_gray_uint8",
           "write_mask", "write_mask_png"]
