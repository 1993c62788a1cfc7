"""A DICOMweb (PACS) datastore for 2D ultrasound: series in, DICOM SEG out.

MONAI Label's ``DICOMWebDatastore`` is built for CT/MR volumes: it lists CT series, converts each series to NIfTI
and converts labels back with dcmqi (downloaded from GitHub at start). For ultrasound this app instead

- lists US series (unless ``MONAI_LABEL_DICOMWEB_SEARCH_FILTER`` is set) and refuses other modalities with a 422;
- caches each series as the DICOM files Orthanc stores (``transfer-syntax=*``: no transcoding), so the infer task
  reads the pixels *and* the region calibration (pixel size in mm) with :func:`fetal_head.io.dicom_us.read_ultrasound`;
- checks ids and tags as the local datastore does (lib/datastores/local.py): images are never added or deleted
  through this server (405), a final label is replaced only with ``force`` (the previous cached label goes to
  ``labels/final/.history/<id>/``; its SEG stays in the PACS), clients cannot set the synthesis keys;
- writes a final label as a DICOM SEG with highdicom (:func:`fetal_head.io.dicom_us.segmentation_from_mask`) that
  references its source instance, and stores it with STOW-RS. Nothing on the server is modified or deleted: a SEG
  is always a new instance in a new series.

The image id is the SeriesInstanceUID. Labels are also kept as 0/1 PNGs in the local cache (``GET
/datastore/label``, training); a final label missing from the cache is read back from its SEG in the PACS.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from typing import Any, Dict, List, Optional

import numpy as np
import requests
from dicomweb_client import DICOMwebClient
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.interfaces.datastore import DefaultLabelTag
from pydicom.dataset import Dataset

from fetal_head.io import ImageReadError, write_mask_png
from lib.datastores.local import HISTORY_DIR, _stamp, check_image_id, check_tag, flag, refuse_provenance_keys

logger = logging.getLogger(__name__)

DEFAULT_SEARCH_FILTER = {"Modality": "US"}
UID_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")  # a DICOM UID; anything else never reaches a URL or a path
SERIES_INFO_FIELDS = ("StudyInstanceUID", "Modality", "PatientID", "StudyDate", "StudyTime", "SeriesDescription",
                      "NumberOfSeriesRelatedInstances")
RAW_DICOM = (("application/dicom", "*"),)  # WADO-RS: the stored bytes, whatever their transfer syntax


class LabelError(ValueError):
    """An uploaded label that cannot be stored for its image (unreadable, wrong shape)."""


class SeriesError(ImageReadError):
    """A series the app cannot segment (wrong modality, empty, unreadable from the server)."""


def is_uid(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and UID_PATTERN.fullmatch(value) is not None


def read_label(path: str, shape) -> np.ndarray:
    """A label file (PNG/JPEG from our infer or OHIF, NRRD/NIfTI from Slicer) as a (H, W) 0/1 uint8 mask.

    Singleton axes ((1, H, W), (H, W, 1)) are dropped; any non-zero value is the head. A label whose shape is not
    the image's (rows, columns) is refused rather than resampled: it was drawn on another image.
    """
    from fetal_head.io import read_mask

    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise LabelError("the label file is empty")
    try:
        mask = read_mask(path)
    except Exception as e:  # itk and PIL raise many types for a corrupt file
        raise LabelError(f"cannot read the label file ({type(e).__name__}: {e})") from e
    if mask.shape != tuple(shape):
        raise LabelError(f"the label is {'x'.join(map(str, mask.shape))} but the image is "
                         f"{shape[0]}x{shape[1]} (rows x columns): a label must have the image's geometry")
    return mask.astype(np.uint8)


def search_filter_from_settings() -> Dict[str, Any]:
    """MONAI Label's search filter when the user set one, else ultrasound (MONAI Label's own default is CT)."""
    if "MONAI_LABEL_DICOMWEB_SEARCH_FILTER" in settings.model_fields_set:
        return dict(settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER)
    return dict(DEFAULT_SEARCH_FILTER)


def client_from_settings(url: str) -> DICOMwebClient:
    """The DICOMweb client MONAI Label would build for ``--studies URL`` (same auth and prefix settings)."""
    if "googleapis.com" in url:
        from dicomweb_client.ext.gcp.session_utils import create_session_from_gcp_credentials

        return DICOMwebClient(url=url, session=create_session_from_gcp_credentials())
    session = None
    if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
        from dicomweb_client.session_utils import create_session_from_user_pass

        session = create_session_from_user_pass(settings.MONAI_LABEL_DICOMWEB_USERNAME,
                                                settings.MONAI_LABEL_DICOMWEB_PASSWORD)
    return DICOMwebClientX(url=url, session=session, qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
                           wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
                           stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX)


def datastore_from_settings(url: str) -> "UltrasoundDICOMwebDatastore":
    cache_path = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip() or None
    return UltrasoundDICOMwebDatastore(client_from_settings(url.rstrip("/")), search_filter_from_settings(), cache_path)


def _http_errors(method):
    """Datastore endpoints call these methods directly: turn our errors into 4xx answers with a message."""

    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except HTTPException:
            raise
        except (ImageReadError, LabelError) as e:
            raise HTTPException(status_code=422, detail=f"{type(e).__name__}: {e}") from e
        except requests.RequestException as e:
            raise HTTPException(status_code=502, detail=f"the DICOMweb server failed: {e}") from e

    wrapper.__name__, wrapper.__doc__ = method.__name__, method.__doc__
    return wrapper


class UltrasoundDICOMwebDatastore(DICOMWebDatastore):
    def __init__(self, client: DICOMwebClient, search_filter: Optional[Dict[str, Any]] = None,
                 cache_path: Optional[str] = None):
        # whole instances only: frame-by-frame fetching drops the file meta and the calibration we need
        super().__init__(client, search_filter or dict(DEFAULT_SEARCH_FILTER), cache_path, fetch_by_frame=False,
                         convert_to_nifti=False)
        modality = self._search_filter.get("Modality")
        self._modalities = set(modality) if isinstance(modality, (list, tuple)) else {modality} if modality else None

    def description(self) -> str:
        return f"DICOMweb datastore of {self._search_filter} series (DICOM SEG labels): {self.name()}"

    # ---- series lookup ----

    def _series(self, series_uid: str) -> Optional[Dataset]:
        """The QIDO-RS record of one series, or None when the id is not a UID or the server has no such series."""
        if not is_uid(series_uid):
            return None
        found = self._client.search_for_series(search_filters={"SeriesInstanceUID": series_uid})
        found = [Dataset.from_json(s) for s in found]
        found = [s for s in found if str(s.get("SeriesInstanceUID", "")) == series_uid]
        return found[0] if found else None

    @staticmethod
    def _info(series: Dataset) -> Dict[str, Any]:
        info = {"SeriesInstanceUID": str(series.SeriesInstanceUID)}
        for field in SERIES_INFO_FIELDS:
            value = series[field].value if field in series else None
            info[field] = None if value in (None, "") else int(value) if field.startswith("NumberOf") else str(value)
        return info

    def _image_dir(self, series_uid: str) -> str:
        return os.path.join(os.path.realpath(self._datastore.image_path()), series_uid)

    @_http_errors
    def get_image_uri(self, image_id: str) -> str:
        """The series' image file in the cache (downloaded on first use); "" for an unknown series, 422 for a
        non-US one. A file, not the folder: Slicer loads `/datastore/image` answers (and the `path` of a sample)
        as a volume, and `GET /datastore/image` serves files only. A series' image is its first instance
        (`dicom_us.series_instance_file`), the one infer reads."""
        from fetal_head.io.dicom_us import series_instance_file

        image_dir = self._image_dir(image_id) if is_uid(image_id) else ""
        if image_dir and os.path.isdir(image_dir) and os.listdir(image_dir):
            return series_instance_file(image_dir)
        series = self._series(image_id)
        if series is None:
            return ""
        modality = str(series.get("Modality", "")) or "unknown"
        if self._modalities and modality not in self._modalities:
            raise SeriesError(f"series {image_id} has modality {modality}; this datastore serves "
                              f"{'/'.join(sorted(self._modalities))} series only")
        self._download_series(str(series.StudyInstanceUID), image_id, image_dir)
        return series_instance_file(image_dir)

    def _download_series(self, study_uid: str, series_uid: str, image_dir: str):
        """Fetch the stored instances unchanged into a temporary folder, then move it into place (atomic)."""
        os.makedirs(os.path.dirname(image_dir), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{series_uid}.", dir=os.path.dirname(image_dir))
        try:
            instances = self._client.retrieve_series(study_uid, series_uid, media_types=RAW_DICOM)
            if not instances:
                raise SeriesError(f"series {series_uid} has no instances on the DICOMweb server")
            for i, ds in enumerate(instances):
                sop = str(ds.get("SOPInstanceUID", ""))
                ds.save_as(os.path.join(tmp, f"{sop if is_uid(sop) else i}.dcm"), write_like_original=True)
            try:
                os.replace(tmp, image_dir)
            except OSError:  # another request filled it first
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info(f"cached series {series_uid} ({len(instances)} instances) in {image_dir}")

    @_http_errors
    def get_image_info(self, image_id: str) -> Dict[str, Any]:
        series = self._series(image_id)
        if series is None:
            return {}
        info = self._info(series)
        if os.path.isdir(self._image_dir(image_id)):
            info["path"] = self.get_image_uri(image_id)
        return info

    def _clear_query_caches(self):
        for method in (DICOMWebDatastore.list_images, DICOMWebDatastore.get_labeled_images):
            method.cache.clear()

    def json(self):
        """GET /datastore/?output=all: every listed series with its DICOM info, and whether it has a SEG."""
        series = [Dataset.from_json(s) for s in
                  self._client.search_for_series(search_filters=self._search_filter, get_remaining=True)]
        labeled = set(self.get_labeled_images())
        objects = {}
        for s in series:
            uid = str(s.SeriesInstanceUID)
            labels = {DefaultLabelTag.FINAL.value: {"ext": ".dcm", "info": {"format": "DICOM SEG"}}} \
                if uid in labeled else {}
            objects[uid] = {"image": {"ext": "", "info": self._info(s)}, "labels": labels}
        return {"name": self.name(), "description": self.description(), "objects": objects}

    def status(self) -> Dict[str, Any]:
        labeled = self.get_labeled_images()
        return {"total": len(self.list_images()), "completed": len(labeled),
                "label_tags": {DefaultLabelTag.FINAL.value: len(labeled)} if labeled else {}}

    # ---- labels ----

    def _label_png(self, image_id: str, tag: str) -> str:
        return os.path.join(os.path.realpath(self._datastore.label_path(tag)), f"{image_id}.png")

    @_http_errors
    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any],
                   label_id: str = "", force: bool = False) -> str:
        """Store a label for a series. Final labels become a DICOM SEG in the PACS (STOW-RS, a new series); a
        series that has a final label needs ``force`` (the previous cached label is kept in the history)."""
        from fetal_head.io.dicom_us import read_ultrasound, segmentation_from_mask

        label_info = dict(label_info or {})
        force = flag(label_info.pop("force", force))
        label_tag = label_tag or DefaultLabelTag.FINAL.value
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", label_tag):
            raise LabelError(f"label tag {label_tag!r} must be letters, digits, '_' or '-'")
        image_file = self.get_image_uri(image_id)
        if not image_file:
            raise HTTPException(status_code=404, detail=f"image '{image_id}' is not in the datastore")
        frame_index = label_info.get("frame")
        if frame_index is not None and (isinstance(frame_index, bool) or not isinstance(frame_index, int)):
            raise LabelError(f"'frame' must be a whole number (0-based frame index), got {frame_index!r}")
        frame = read_ultrasound(image_file, frame=frame_index)
        mask = read_label(label_filename, frame.pixels.shape)
        saved = {"label_tag": label_tag, "frame_index": frame.frame_index,
                 "ReferencedSOPInstanceUID": frame.sop_instance_uid}
        png = self._label_png(image_id, label_tag)
        if label_tag == DefaultLabelTag.FINAL.value and (os.path.isfile(png) or image_id in self.get_labeled_images()):
            if not force:
                raise HTTPException(status_code=409, detail=f"series {image_id} has a final label; replacing it "
                                                            "needs force=true (the previous one is kept)")
            if os.path.isfile(png):
                history = os.path.join(os.path.dirname(png), HISTORY_DIR, image_id)
                os.makedirs(history, exist_ok=True)
                os.replace(png, os.path.join(history, _stamp() + ".png"))
        if label_tag == DefaultLabelTag.FINAL.value:
            seg = segmentation_from_mask(mask, frame.dataset, frame.frame_index)
            self._client.store_instances([seg])
            self._clear_query_caches()
            saved.update({"SeriesInstanceUID": str(seg.SeriesInstanceUID), "SOPInstanceUID": str(seg.SOPInstanceUID)})
            logger.info(f"stored DICOM SEG {seg.SOPInstanceUID} for series {image_id}")
        os.makedirs(os.path.dirname(png), exist_ok=True)
        write_mask_png(mask, png + ".tmp.png")
        os.replace(png + ".tmp.png", png)
        return image_id

    def _seg_for(self, image_id: str) -> Optional[Dataset]:
        """The newest DICOM SEG on the server that references this series, downloaded; None if there is none."""
        found = []
        for s in self._client.search_for_series(search_filters={"Modality": "SEG"}, get_remaining=True):
            s = Dataset.from_json(s)
            study, series = str(s.StudyInstanceUID), str(s.SeriesInstanceUID)
            for meta in self._client.retrieve_series_metadata(study, series):
                meta = Dataset.from_json(meta)
                refs = meta.get("ReferencedSeriesSequence") or []
                if any(str(r.get("SeriesInstanceUID", "")) == image_id for r in refs):
                    found.append((str(meta.get("ContentDate", "")), str(meta.get("ContentTime", "")), study, series,
                                  str(meta.SOPInstanceUID)))
        if not found:
            return None
        *_, study, series, sop = max(found)
        return self._client.retrieve_instance(study, series, sop)

    @_http_errors
    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """A 0/1 PNG of the series' label; a final label not in the cache is read back from its SEG."""
        image_id = image_id if is_uid(image_id) else label_id
        if not is_uid(image_id) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", label_tag or ""):
            return ""
        png = self._label_png(image_id, label_tag)
        if os.path.isfile(png) or label_tag != DefaultLabelTag.FINAL.value:
            return png if os.path.isfile(png) else ""
        seg = self._seg_for(image_id)
        if seg is None:
            return ""
        from fetal_head.io.dicom_us import mask_from_segmentation

        mask, _ = mask_from_segmentation(seg)
        os.makedirs(os.path.dirname(png), exist_ok=True)
        write_mask_png(mask, png)
        return png

    # ---- writes a client may not do here, and checked info updates ----

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any], *args, **kwargs) -> str:
        raise HTTPException(status_code=405, detail="images come from the DICOMweb server: store them there")

    def remove_image(self, image_id: str, *args, **kwargs) -> None:
        raise HTTPException(status_code=405, detail="this server never deletes from the DICOMweb server")

    def remove_label(self, label_id: str, label_tag: str, force: bool = False) -> None:
        """A cached non-final label can be removed; a final label is a DICOM SEG in the PACS and is never deleted."""
        check_image_id(label_id)
        check_tag(label_tag)
        if label_tag == DefaultLabelTag.FINAL.value:
            raise HTTPException(status_code=409, detail="final labels are DICOM SEGs in the PACS, which this server "
                                                        "never deletes; save a corrected label (force=true) instead")
        png = self._label_png(label_id, label_tag)
        if not os.path.isfile(png):
            raise HTTPException(status_code=404, detail=f"series {label_id} has no '{label_tag}' label")
        os.unlink(png)

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        check_image_id(image_id)
        refuse_provenance_keys(info)
        if image_id not in self._datastore.objects:
            raise HTTPException(status_code=404, detail=f"image '{image_id}' is not in the local cache")
        super().update_image_info(image_id, info)

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        check_image_id(label_id)
        check_tag(label_tag)
        refuse_provenance_keys(info)
        if not self._datastore.label(label_id, label_tag):
            raise HTTPException(status_code=404, detail=f"series {label_id} has no '{label_tag}' label in the cache")
        super().update_label_info(label_id, label_tag, info)

    def datalist(self, full_path=True) -> List[Dict[str, Any]]:
        """Training pairs: each labelled series' cached image file and its final label as a PNG."""
        pairs = []
        for image_id in self.get_labeled_images():
            image, label = self.get_image_uri(image_id), self.get_label_uri(image_id, DefaultLabelTag.FINAL.value)
            if image and label:
                pairs.append({"image": image, "label": label})
        return pairs
