"""DICOM ultrasound in and out: read a US frame with its calibration, write US files, and DICOM SEG for masks.

Usage::

    from fetal_head.io.dicom_us import read_ultrasound, write_ultrasound, segmentation_from_mask, mask_from_segmentation

    us = read_ultrasound("series_dir_or_file.dcm", frame=None)  # frame: 0-based, for cine (multi-frame) files
    us.pixels, us.pixel_size_mm, us.calibration, us.calibration_note  # (H, W) uint8, mm or None, where it came from
    write_ultrasound("out.dcm", gray_or_rgb_uint8, pixel_size_mm=0.12, photometric="YBR_FULL_422", jpeg=True)
    seg = segmentation_from_mask(mask, us.dataset, frame_index=us.frame_index)
    seg.save_as("seg.dcm")
    mask, source_sop_uid = mask_from_segmentation(pydicom.dcmread("seg.dcm"))

Rules chosen here (one place each):

* A directory is one series (MONAI Label's DICOMweb datastore downloads a series into one): its DICOM image
  instances are sorted by (InstanceNumber, SOPInstanceUID) and the first is read.
* Multi-frame (cine): the default frame is ``RepresentativeFrameNumber`` (1-based in DICOM) if present, else the
  first frame; ``frame`` is 0-based.
* Modality must be US (``modalities`` widens it, e.g. ``("US", "OT")`` for secondary captures); anything else is
  refused, so a CT or MR series gets a clear error rather than a meaningless head measurement.
* Calibration: a per-frame ``PixelMeasuresSequence`` (enhanced multi-frame cine), else
  ``SequenceOfUltrasoundRegions`` (2D regions in cm: the B-mode ones, ``RegionDataType`` 1, when any is typed so;
  of those the one containing the head, or the image centre, the largest if several or none do; a calibration
  warning in the note and the log when the choice is ambiguous, see :func:`select_region`), else a shared
  ``PixelMeasuresSequence``, else ``PixelSpacing`` (mm), else none (measurements in pixels). X and Y within 1 % give
  ``pixel_size_mm`` (their mean); otherwise ``pixel_size_mm`` is None and ``pixel_spacing_mm`` = (x, y) carries
  both, which the biometry measures correctly.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import logging
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixel_data_handlers.util import apply_color_lut, convert_color_space
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

from .common import MIN_SIDE, ImageReadError, check_pixel_count, to_gray_uint8

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
CM_UNITS = 3  # PhysicalUnitsX/YDirection code for cm (PS3.3 C.8.5.5.1.15)
# (photometric, JPEG Baseline?) pairs the US Image IODs allow, as dciodvfy (dicom3tools) checks them
US_ENCODINGS = {("MONOCHROME2", False), ("MONOCHROME2", True), ("RGB", False), ("YBR_FULL_422", True)}
ANISOTROPY_TOLERANCE = 0.01
SEG_COPIED_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber",
                    "StudyDate", "StudyTime", "ReferringPhysicianName")


class DicomReadError(ImageReadError):
    """The DICOM input cannot be used as a 2D ultrasound frame (the message says why)."""


@dataclass
class UltrasoundFrame:
    pixels: np.ndarray  # (H, W) uint8 gray
    pixel_size_mm: Optional[float]  # isotropic pixel size, None if unknown or anisotropic
    pixel_spacing_mm: Optional[Tuple[float, float]]  # (x, y) in mm, None if unknown
    calibration: str  # "SequenceOfUltrasoundRegions", "PixelSpacing" or "none"
    calibration_note: str
    frame_index: int  # 0-based
    n_frames: int
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    modality: str
    dataset: Dataset  # the header (PixelData removed), e.g. the source for segmentation_from_mask
    path: str = ""

    def calibration_dict(self) -> dict:
        """What an answer tells the user about where its mm came from, and which frame was read."""
        return {"source": self.calibration, "note": self.calibration_note, "pixel_spacing_mm": self.pixel_spacing_mm,
                "frame_index": self.frame_index, "n_frames": self.n_frames}


def is_dicom_file(path: PathLike) -> bool:
    """True for a DICOM Part 10 file ('DICM' at byte 128) or a file named *.dcm."""
    path = os.fspath(path)
    if path.lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def series_instance_file(directory: str) -> str:
    """The first DICOM image instance of the series in ``directory`` (by InstanceNumber, then SOPInstanceUID)."""
    found = []
    for root, _, files in os.walk(directory):
        for name in files:
            p = os.path.join(root, name)
            try:
                h = pydicom.dcmread(p, stop_before_pixels=True)
            except Exception:  # not DICOM: DICOMweb downloads may sit beside other files
                continue
            if "Rows" in h:
                found.append((int(h.get("InstanceNumber") or 0), str(h.get("SOPInstanceUID", "")), p))
    if not found:
        raise DicomReadError(f"no DICOM image found in the directory {directory}")
    return sorted(found)[0][2]


TISSUE = 1  # RegionDataType 1: tissue (the B-mode image); 2..: colour flow, PW/CW Doppler, M-mode, ...


def _region_box(r) -> Tuple[int, int, int, int]:
    return (int(r.RegionLocationMinX0), int(r.RegionLocationMinY0), int(r.RegionLocationMaxX1),
            int(r.RegionLocationMaxY1))


def _region_area(r) -> int:
    x0, y0, x1, y1 = _region_box(r)
    return (x1 - x0 + 1) * (y1 - y0 + 1)


def _contains(r, x: float, y: float) -> bool:
    x0, y0, x1, y1 = _region_box(r)
    return x0 <= x <= x1 and y0 <= y <= y1


def _region_spacing(r) -> Tuple[float, float]:
    return float(r.PhysicalDeltaX) * 10, float(r.PhysicalDeltaY) * 10


def select_region(ds: Dataset, head_xy: Optional[Tuple[float, float]] = None):
    """(region, note, ambiguous) among the calibrated 2D regions of ``SequenceOfUltrasoundRegions``, or None.

    A scanner may send several regions (a B-mode image beside a Doppler strip, a thumbnail, a dual view). Chosen:
    the tissue (B-mode, ``RegionDataType`` 1) regions if any is typed so, else all; among them the ones that
    contain the head (``head_xy``, e.g. the prompt's centre; default the image centre); the largest of those
    (or of all, when none contains it). Ambiguous, and said in the note: several candidate regions containing
    the head with different calibrations, or no region typed as tissue.
    """
    regions = [
        r for r in ds.get("SequenceOfUltrasoundRegions", [])
        if r.get("PhysicalUnitsXDirection") == CM_UNITS and r.get("PhysicalUnitsYDirection") == CM_UNITS
        and r.get("RegionSpatialFormat", 1) == 1 and float(r.get("PhysicalDeltaX", 0) or 0) > 0
        and float(r.get("PhysicalDeltaY", 0) or 0) > 0
        and all(k in r for k in ("RegionLocationMinX0", "RegionLocationMinY0", "RegionLocationMaxX1",
                                 "RegionLocationMaxY1"))
    ]
    if not regions:
        return None, "", False
    notes, ambiguous = [], False
    tissue = [r for r in regions if r.get("RegionDataType") == TISSUE]
    if tissue:
        candidates, kind = tissue, "B-mode (tissue)"
        if len(tissue) < len(regions):
            notes.append(f"{len(regions) - len(tissue)} non-tissue region(s) ignored")
    else:
        candidates, kind = regions, "untyped"
        if len(regions) > 1:
            ambiguous = True
            notes.append("no region is typed as tissue (RegionDataType 1): check the calibration")
    if head_xy is None:
        hx, hy, where = (int(ds.Columns) - 1) / 2, (int(ds.Rows) - 1) / 2, "the image centre"
    else:
        (hx, hy), where = head_xy, f"the head ({head_xy[0]:g}, {head_xy[1]:g})"
    containing = [r for r in candidates if _contains(r, hx, hy)]
    region = max(containing or candidates, key=_region_area)
    if len(containing) > 1 and len({tuple(round(v, 6) for v in _region_spacing(r)) for r in containing}) > 1:
        ambiguous = True
        notes.append(f"{len(containing)} {kind} regions with different calibrations contain {where}: "
                     "the largest is used, check the calibration")
    head = f"containing {where}" if containing else f"largest; none contains {where}"
    note = f"{kind} ultrasound region {_region_box(region)} ({head}), cm -> mm"
    return region, "; ".join([note] + notes), ambiguous


def _frame_pixel_measures(ds: Dataset, frame: int) -> Optional[Tuple[Tuple[float, float], str]]:
    """(x, y) mm of ``frame`` from the functional groups (enhanced multi-frame): per-frame, else shared."""
    for name, groups in (("per-frame", ds.get("PerFrameFunctionalGroupsSequence")),
                         ("shared", ds.get("SharedFunctionalGroupsSequence"))):
        if not groups:
            continue
        item = groups[frame] if name == "per-frame" and frame < len(groups) else groups[0]
        for measures in item.get("PixelMeasuresSequence", []):
            ps = measures.get("PixelSpacing")
            if ps is not None and len(ps) == 2 and min(float(v) for v in ps) > 0:
                row, col = (float(v) for v in ps)
                return (col, row), f"PixelMeasuresSequence ({name} functional group, frame {frame}), mm"
    return None


def _calibration(ds: Dataset, frame: int = 0, head_xy=None) -> Tuple[Optional[Tuple[float, float]], str, str]:
    """(x, y) pixel spacing in mm, its source and a note for people (a calibration warning when ambiguous)."""
    per_frame = _frame_pixel_measures(ds, frame)
    if per_frame is not None and ds.get("PerFrameFunctionalGroupsSequence"):
        return per_frame[0], "PixelMeasuresSequence", per_frame[1]
    region, note, ambiguous = select_region(ds, head_xy)
    if region is not None:
        if ambiguous:
            logger.warning(f"calibration of {ds.get('SOPInstanceUID', '?')}: {note}")
            note = "calibration warning: " + note
        return _region_spacing(region), "SequenceOfUltrasoundRegions", note
    if per_frame is not None:
        return per_frame[0], "PixelMeasuresSequence", per_frame[1]
    if "PixelSpacing" in ds and len(ds.PixelSpacing) == 2 and min(float(v) for v in ds.PixelSpacing) > 0:
        row, col = (float(v) for v in ds.PixelSpacing)  # DICOM order: between rows (y), between columns (x)
        return (col, row), "PixelSpacing", "PixelSpacing (mm)"
    return None, "none", "no calibration: measurements in pixels"


def _decode(ds: Dataset) -> np.ndarray:
    """All frames as an array, with a clear error for transfer syntaxes no installed decoder handles."""
    ts = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID")
    if ts is not None and ts.is_compressed:
        available = [h for h in pydicom.config.pixel_data_handlers if h.is_available()]
        if not any(h.supports_transfer_syntax(ts) for h in available):
            raise DicomReadError(f"unsupported transfer syntax {ts.name} ({ts}): no installed decoder for it")
    try:
        return ds.pixel_array
    except Exception as e:
        name = f"{ts.name} ({ts})" if ts is not None else "unknown"
        raise DicomReadError(f"cannot decode the pixel data (transfer syntax {name}): {e}") from e


def _to_gray(frame: np.ndarray, ds: Dataset) -> np.ndarray:
    """One decoded frame in its photometric interpretation -> (H, W) uint8 gray."""
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if pi == "MONOCHROME1":  # 0 is white: invert so that bright means echo, as everywhere else
        frame = (2 ** int(ds.BitsStored) - 1) - frame.astype(np.int64)
    elif pi in ("YBR_FULL", "YBR_FULL_422"):  # pydicom 2 leaves these as YCbCr, JPEG Baseline included
        frame = convert_color_space(frame, pi, "RGB")
    elif pi == "PALETTE COLOR":
        frame = apply_color_lut(frame, ds)
        if frame.dtype != np.uint8:  # 16-bit LUT entries
            frame = (frame.astype(np.uint32) >> 8).astype(np.uint8)
    elif pi not in ("MONOCHROME2", "RGB", "YBR_ICT", "YBR_RCT"):  # ICT/RCT: the JPEG 2000 decoder gives RGB
        raise DicomReadError(f"unsupported photometric interpretation {pi}")
    return to_gray_uint8(frame)


def read_ultrasound(
    path: PathLike, frame: Optional[int] = None, modalities: Sequence[str] = ("US",),
    head_xy: Optional[Tuple[float, float]] = None,
) -> UltrasoundFrame:
    """Read one frame of a US DICOM file, or of the series in a directory (see the module rules).

    ``head_xy`` (x, y), where known (e.g. the prompt's centre), picks the ultrasound region that contains the head
    when the file has several (default: the image centre)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = series_instance_file(path)
    elif not os.path.isfile(path):
        raise DicomReadError(f"DICOM file not found: {path}")
    try:
        ds = pydicom.dcmread(path)
    except pydicom.errors.InvalidDicomError as e:
        raise DicomReadError(f"not a DICOM file (no 'DICM' marker at byte 128): {os.path.basename(path)}") from e
    except Exception as e:
        raise DicomReadError(f"cannot read the DICOM file ({type(e).__name__}: {e})") from e
    modality = str(ds.get("Modality", "")).strip()
    if modality not in modalities:
        raise DicomReadError(
            f"modality {modality or '(missing)'} is not supported: expected {' or '.join(modalities)}")
    if "PixelData" not in ds:
        raise DicomReadError("the DICOM file has no pixel data (not an image)")
    n_frames = int(ds.get("NumberOfFrames") or 1)
    if frame is None:
        representative = int(ds.get("RepresentativeFrameNumber") or 1) - 1  # 1-based in DICOM
        frame = representative if 0 <= representative < n_frames else 0
    try:
        frame = int(frame)
    except (TypeError, ValueError):
        raise DicomReadError(f"frame index must be a whole number, got {frame!r}") from None
    if not 0 <= frame < n_frames:
        raise DicomReadError(
            f"frame index {frame} is out of range: this file has {n_frames} frame(s), valid 0..{n_frames - 1}")
    check_pixel_count(int(ds.get("Columns") or 0), int(ds.get("Rows") or 0), n_frames)  # before decoding
    frames = _decode(ds)
    samples = int(ds.get("SamplesPerPixel", 1))
    one = frames[frame] if n_frames > 1 else frames
    if one.ndim != (3 if samples > 1 else 2):
        raise DicomReadError(f"unexpected pixel array of shape {frames.shape} for {n_frames} frame(s)")
    pixels = _to_gray(one, ds)
    if min(pixels.shape) < MIN_SIDE:
        raise DicomReadError(f"image of {pixels.shape[1]}x{pixels.shape[0]} pixels is too small to segment")
    spacing, source, note = _calibration(ds, frame, head_xy)
    size = None
    if spacing is not None:
        if abs(spacing[0] - spacing[1]) <= ANISOTROPY_TOLERANCE * max(spacing):
            size = (spacing[0] + spacing[1]) / 2
        else:
            note += f"; anisotropic pixels ({spacing[0]:.4g} x {spacing[1]:.4g} mm): measured with both"
    del ds.PixelData  # keep the header only
    return UltrasoundFrame(
        pixels=pixels, pixel_size_mm=size, pixel_spacing_mm=spacing, calibration=source, calibration_note=note,
        frame_index=frame, n_frames=n_frames, sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        modality=modality, dataset=ds, path=path,
    )


def _rgb(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] >= 3 and a.dtype == np.uint8:
        return np.ascontiguousarray(a[..., :3])
    return np.repeat(to_gray_uint8(a)[..., None], 3, axis=-1)


def _encode_frame(image: np.ndarray, photometric: str, jpeg: bool, quality: int) -> bytes:
    if photometric == "MONOCHROME2":
        gray = to_gray_uint8(image)
        if not jpeg:
            return gray.tobytes()
        buf = io.BytesIO()
        Image.fromarray(gray).save(buf, format="JPEG", quality=quality)
        return buf.getvalue()
    rgb = _rgb(image)
    if jpeg:  # RGB: no colour transform (Adobe marker); YBR_*: Pillow's YCbCr with the matching subsampling
        opts = {"keep_rgb": True, "subsampling": "4:4:4"} if photometric == "RGB" else {
            "subsampling": "4:2:2" if photometric == "YBR_FULL_422" else "4:4:4"}
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=quality, **opts)
        return buf.getvalue()
    if photometric == "RGB":
        return rgb.tobytes()
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    if photometric == "YBR_FULL":
        return ybr.tobytes()
    # YBR_FULL_422 native: Y0 Y1 Cb Cr per pixel pair, chroma averaged over the pair (PS3.3 C.7.6.3.1.2)
    h, w, _ = ybr.shape
    pairs = ybr.reshape(h, w // 2, 2, 3).astype(np.float64)
    out = np.stack([pairs[:, :, 0, 0], pairs[:, :, 1, 0], pairs[:, :, :, 1].mean(-1), pairs[:, :, :, 2].mean(-1)], -1)
    return np.clip(np.round(out), 0, 255).astype(np.uint8).tobytes()


@dataclass
class UltrasoundHeader:
    """Who and what a written US file is: identifiers and descriptions (``None`` UIDs: new ones generated)."""

    study_uid: Optional[str] = None
    series_uid: Optional[str] = None
    sop_uid: Optional[str] = None
    patient_id: str = "ANON"
    patient_name: str = "Anonymous^"
    series_description: str = ""
    study_description: str = ""
    modality: str = "US"
    instance_number: int = 1
    series_number: int = 1
    frame_time_ms: float = 40.0  # cine only


@dataclass
class UltrasoundEncoding:
    """How the pixels are written: photometric interpretation, JPEG Baseline or not, calibration region."""

    photometric: str = "MONOCHROME2"
    jpeg: bool = False
    jpeg_quality: int = 95
    implicit_vr: bool = False
    calibrate: bool = True  # write pixel_size_mm as a SequenceOfUltrasoundRegions region
    strict: bool = True  # refuse encodings the US IODs do not allow


_HEADER_FIELDS = {f.name for f in dataclasses.fields(UltrasoundHeader)}
_ENCODING_FIELDS = {f.name for f in dataclasses.fields(UltrasoundEncoding)}


def write_ultrasound(
    path: PathLike, image: Optional[np.ndarray], pixel_size_mm: Union[float, Sequence[float], None], *,
    frames: Optional[Sequence[np.ndarray]] = None, header: Optional[UltrasoundHeader] = None,
    encoding: Optional[UltrasoundEncoding] = None, **options,
) -> Dataset:
    """Write ``image`` (H, W[, 3] uint8) or a ``frames`` stack (cine) as US (Multi-frame) Image Storage.

    ``header`` (:class:`UltrasoundHeader`) and ``encoding`` (:class:`UltrasoundEncoding`) hold the options; each of
    their fields may also be given as a keyword (``photometric="RGB"``, ``patient_id="X"``, as before), which
    overrides the dataclass's value.

    ``pixel_size_mm`` (one number or (x, y)) goes into a 2D ``SequenceOfUltrasoundRegions`` region covering the
    image (cm, unit code 3) unless ``calibrate`` is False. Valid US encodings: MONOCHROME2 (uncompressed or
    ``jpeg``), RGB (uncompressed), YBR_FULL_422 (``jpeg``: JPEG Baseline from Pillow, 4:2:2). ``strict=False``
    also writes combinations the US IODs do not allow (RGB JPEG, YBR_FULL, native YBR_FULL_422, which needs an
    even width), to test that readers cope with non-conforming files. Returns the dataset written.
    """
    unknown = set(options) - _HEADER_FIELDS - _ENCODING_FIELDS
    if unknown:
        raise TypeError(f"write_ultrasound() got unexpected keyword argument(s) {sorted(unknown)}")
    header = dataclasses.replace(header or UltrasoundHeader(),
                                 **{k: v for k, v in options.items() if k in _HEADER_FIELDS})
    encoding = dataclasses.replace(encoding or UltrasoundEncoding(),
                                   **{k: v for k, v in options.items() if k in _ENCODING_FIELDS})
    return _write_ultrasound(path, image, pixel_size_mm, frames, header, encoding)


def _write_ultrasound(path, image, pixel_size_mm, frames, h: UltrasoundHeader, e: UltrasoundEncoding) -> Dataset:
    photometric, jpeg, jpeg_quality, implicit_vr = e.photometric, e.jpeg, e.jpeg_quality, e.implicit_vr
    calibrate, strict, modality = e.calibrate, e.strict, h.modality
    if photometric not in ("MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422"):
        raise ValueError(f"unsupported photometric interpretation {photometric!r}")
    if strict and (photometric, jpeg) not in US_ENCODINGS:
        raise ValueError(f"{photometric} {'JPEG' if jpeg else 'uncompressed'} is not a valid US encoding: use "
                         "MONOCHROME2, RGB (uncompressed) or YBR_FULL_422 (jpeg=True); strict=False writes it anyway")
    stack = [np.asarray(f) for f in (frames if frames is not None else [image])]
    if not stack or stack[0] is None or stack[0].ndim < 2:
        raise ValueError("write_ultrasound needs an image or a non-empty frames stack")
    rows, cols = stack[0].shape[:2]
    if any(f.shape[:2] != (rows, cols) for f in stack):
        raise ValueError("all frames must have the same size")
    if photometric == "YBR_FULL_422" and not jpeg and cols % 2:
        raise ValueError("native YBR_FULL_422 needs an even number of columns")
    encoded = [_encode_frame(f, photometric, jpeg, jpeg_quality) for f in stack]
    multi = frames is not None and len(stack) > 1

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage if multi else UltrasoundImageStorage
    meta.MediaStorageSOPInstanceUID = h.sop_uid or generate_uid()
    meta.TransferSyntaxUID = (
        JPEGBaseline8Bit if jpeg else ImplicitVRLittleEndian if implicit_vr else ExplicitVRLittleEndian)
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
    ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "", "", "1"
    ds.Modality, ds.Manufacturer = modality, "fetal_head MONAI Label app"
    ds.StudyDescription, ds.SeriesDescription = h.study_description, h.series_description
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = h.patient_name, h.patient_id, "", ""
    ds.StudyInstanceUID, ds.SeriesInstanceUID = h.study_uid or generate_uid(), h.series_uid or generate_uid()
    ds.SeriesNumber, ds.InstanceNumber = h.series_number, h.instance_number
    ds.PatientOrientation = ""
    ds.BodyPartExamined = "ABDOMEN"  # obstetric (transabdominal) scan; unpaired, so no Laterality
    ds.SamplesPerPixel = 1 if photometric == "MONOCHROME2" else 3
    ds.PhotometricInterpretation = photometric
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if multi:
        ds.NumberOfFrames = len(stack)
        ds.FrameIncrementPointer = pydicom.tag.Tag("FrameTime")
        ds.FrameTime = h.frame_time_ms
    if calibrate and pixel_size_mm is not None:
        dx, dy = (pixel_size_mm, pixel_size_mm) if np.isscalar(pixel_size_mm) else pixel_size_mm
        region = Dataset()
        region.RegionSpatialFormat, region.RegionDataType, region.RegionFlags = 1, 1, 0  # 2D tissue
        region.RegionLocationMinX0, region.RegionLocationMinY0 = 0, 0
        region.RegionLocationMaxX1, region.RegionLocationMaxY1 = cols - 1, rows - 1
        region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = CM_UNITS
        region.PhysicalDeltaX, region.PhysicalDeltaY = float(dx) / 10, float(dy) / 10
        ds.SequenceOfUltrasoundRegions = [region]
    if jpeg:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        raw_bytes = rows * cols * ds.SamplesPerPixel * len(stack)
        ds.LossyImageCompressionRatio = round(raw_bytes / sum(map(len, encoded)), 2)
        ds.PixelData = encapsulate(encoded)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    else:
        data = b"".join(encoded)
        ds.PixelData = data + (b"\0" if len(data) % 2 else b"")
        ds["PixelData"].VR = "OB" if not implicit_vr else "OW"
    ds.is_little_endian, ds.is_implicit_VR = True, implicit_vr and not jpeg
    ds.save_as(os.fspath(path), write_like_original=False)
    return ds


def segmentation_from_mask(mask: np.ndarray, source: Dataset, frame_index: Optional[int] = None,
                           series_number: int = 100, software_version: str = "") -> Dataset:
    """A BINARY DICOM SEG (highdicom) of ``mask`` (H, W) over ``source``, in a new series.

    2D ultrasound has no patient coordinates, so highdicom references the source by pixel-matrix correspondence
    (Derivation Image Sequence); for a multi-frame source the mask belongs to ``frame_index`` (0-based, default
    0) and the SEG references that frame only.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    mask = np.asarray(mask) > 0
    if mask.shape != (int(source.Rows), int(source.Columns)):
        raise ValueError(f"mask of shape {mask.shape} does not match the source image {source.Rows}x{source.Columns}")
    n_frames = int(source.get("NumberOfFrames") or 1)
    k = 0 if frame_index is None else int(frame_index)
    if not 0 <= k < n_frames:
        raise ValueError(f"frame index {k} is out of range 0..{n_frames - 1}")
    # A header of our own to adjust: no pixel data, and the type 2 attributes highdicom copies filled (empty)
    # where an anonymiser dropped them.
    source = Dataset({e.tag: e for e in source if e.keyword != "PixelData"})
    for keyword in SEG_COPIED_TYPE2:
        if keyword not in source:
            setattr(source, keyword, "")
    if n_frames > 1:
        # highdicom 0.22 takes only single-frame sources without a Frame of Reference (and multi-frame ones only
        # with functional groups, which US cine lacks): present the cine as one frame, then point the frame
        # references at frame k (1-based in DICOM).
        del source.NumberOfFrames
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Fetal head",
        segmented_property_category=hd.sr.CodedConcept("123037004", "SCT", "Anatomical Structure"),
        segmented_property_type=codes.SCT.Head,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="fetal_head SAM", family=codes.cid7162.ArtificialIntelligence, version=software_version or "1"),
    )
    seg = hd.seg.Segmentation(
        source_images=[source],
        pixel_array=mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="fetal_head MONAI Label app",
        manufacturer_model_name="fetal_head SAM",
        software_versions=software_version or "1",
        device_serial_number="0",
        series_description="Fetal head segmentation",
    )
    seg.PatientOrientation = source.get("PatientOrientation", "")  # type 2C without a Frame of Reference
    if n_frames > 1:
        for item in seg.PerFrameFunctionalGroupsSequence:
            for derivation in item.DerivationImageSequence:
                for ref in derivation.SourceImageSequence:
                    ref.ReferencedFrameNumber = k + 1
    return seg


def mask_from_segmentation(seg_ds: Dataset) -> Tuple[np.ndarray, str]:
    """Segment 1 of a SEG (as :func:`segmentation_from_mask` writes it) as an (H, W) bool mask, and the SOP
    Instance UID of the image it belongs to; for a multi-frame source, the first frame the SEG references."""
    import highdicom as hd

    seg = hd.seg.Segmentation.from_dataset(seg_ds, copy=False)
    sources = seg.get_source_image_uids()
    if not sources:
        raise ValueError("the SEG references no source image")
    sop_uid = str(sources[0][2])
    frame_numbers = [
        int(ref.ReferencedFrameNumber)
        for item in seg_ds.get("PerFrameFunctionalGroupsSequence", [])
        for derivation in item.get("DerivationImageSequence", [])
        for ref in derivation.get("SourceImageSequence", [])
        if "ReferencedFrameNumber" in ref and ref.ReferencedSOPInstanceUID == sop_uid
    ]
    if frame_numbers:
        pixels = seg.get_pixels_by_source_frame(sop_uid, frame_numbers[:1], segment_numbers=[1])
    else:
        pixels = seg.get_pixels_by_source_instance([sop_uid], segment_numbers=[1])
    return pixels[0, :, :, 0] > 0, sop_uid
