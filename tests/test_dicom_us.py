"""DICOM ultrasound in and out, on real HC18 test-split images written as US DICOM files at test time.

Pixels and calibration must survive every photometric interpretation and transfer syntax we write, the head mask
must survive a DICOM SEG round trip, and every unusable input must fail with a DicomReadError that says why.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import UltrasoundImageStorage, UltrasoundMultiFrameImageStorage

from conftest import REPO, dice, test_split
from fetal_head.io.dicom_us import (
    US_ENCODINGS,
    DicomReadError,
    mask_from_segmentation,
    read_ultrasound,
    segmentation_from_mask,
    write_ultrasound,
)
from fetal_head.io import ImageReadError, read_frame, read_image, to_gray_uint8

PHOTOMETRICS = ["MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422"]


@pytest.fixture(scope="module")
def cases(hc18):
    return test_split(hc18, "test", 3, seed=11)


def with_colour_overlay(gray: np.ndarray) -> np.ndarray:
    """An RGB screen capture: the gray scan plus coloured calipers and a text box, as scanners export them."""
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    rgb[101:104, 150:651] = (255, 220, 0)  # yellow caliper line, odd offsets so 4:2:2 pairs straddle its edges
    rgb[40:75, 17:230] = (30, 90, 255)  # blue annotation box
    rgb[200:400, 399] = (0, 255, 0)  # one-pixel green line: chroma subsampling smears it
    return rgb


@pytest.mark.parametrize("jpeg", [False, True], ids=["uncompressed", "jpeg"])
@pytest.mark.parametrize("photometric", PHOTOMETRICS)
def test_round_trip_pixels_and_pixel_size(tmp_path, cases, photometric, jpeg):
    case = cases[0]
    gray = read_image(case.image_path)
    image = gray if photometric == "MONOCHROME2" else with_colour_overlay(gray)
    path = tmp_path / "us.dcm"
    conforming = (photometric, jpeg) in US_ENCODINGS
    if not conforming:  # the US IODs do not allow it: refused unless asked for, as a test file for the reader
        with pytest.raises(ValueError, match="not a valid US encoding"):
            write_ultrasound(path, image, case.pixel_size_mm, photometric=photometric, jpeg=jpeg)
    write_ultrasound(path, image, case.pixel_size_mm, photometric=photometric, jpeg=jpeg, strict=conforming)

    us = read_ultrasound(path)
    expected = to_gray_uint8(image)
    diff = np.abs(us.pixels.astype(int) - expected)
    assert us.pixels.shape == gray.shape and us.pixels.dtype == np.uint8
    if jpeg:
        assert diff.mean() < 3, diff.mean()
    elif photometric == "YBR_FULL":
        assert diff.max() <= 1  # RGB <-> YCbCr in 8 bits rounds
    elif photometric == "YBR_FULL_422":
        # Each pixel pair shares its chroma: exact (to rounding) where both pixels of a pair are gray or of one
        # colour; only pairs straddling a colour edge (the overlay's borders) differ.
        gray_px = (image[..., 0] == image[..., 1]) & (image[..., 1] == image[..., 2])
        same = (gray_px[:, 0::2] & gray_px[:, 1::2]) | (image[:, 0::2] == image[:, 1::2]).all(-1)
        same = np.repeat(same, 2, axis=1)
        assert diff[same].max() <= 1 and same.mean() > 0.99
    else:
        assert diff.max() == 0
    assert abs(us.pixel_size_mm - case.pixel_size_mm) < 1e-6
    assert us.calibration == "SequenceOfUltrasoundRegions"
    assert (us.frame_index, us.n_frames, us.modality) == (0, 1, "US")

    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == UltrasoundImageStorage and ds.file_meta.MediaStorageSOPClassUID == UltrasoundImageStorage
    assert ds.PhotometricInterpretation == photometric
    assert ds.file_meta.TransferSyntaxUID == ("1.2.840.10008.1.2.4.50" if jpeg else "1.2.840.10008.1.2.1")
    region = ds.SequenceOfUltrasoundRegions[0]
    assert (region.PhysicalUnitsXDirection, region.RegionSpatialFormat, region.RegionDataType) == (3, 1, 1)
    assert (region.RegionLocationMaxX1, region.RegionLocationMaxY1) == (gray.shape[1] - 1, gray.shape[0] - 1)
    assert us.sop_instance_uid == ds.SOPInstanceUID and us.study_instance_uid == ds.StudyInstanceUID


def test_implicit_vr_little_endian(tmp_path, cases):
    gray = read_image(cases[1].image_path)
    write_ultrasound(tmp_path / "implicit.dcm", gray, cases[1].pixel_size_mm, implicit_vr=True)
    assert pydicom.dcmread(tmp_path / "implicit.dcm").file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    assert np.array_equal(read_ultrasound(tmp_path / "implicit.dcm").pixels, gray)


@pytest.mark.parametrize("jpeg", [False, True], ids=["uncompressed", "jpeg"])
def test_multi_frame_frame_selection(tmp_path, cases, jpeg):
    frames = [read_image(c.image_path) for c in cases]
    path = tmp_path / "cine.dcm"
    photometric = "YBR_FULL_422" if jpeg else "MONOCHROME2"
    write_ultrasound(path, None, cases[0].pixel_size_mm, frames=frames, jpeg=jpeg, photometric=photometric)
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == UltrasoundMultiFrameImageStorage and ds.NumberOfFrames == 3

    first = read_ultrasound(path)
    assert (first.frame_index, first.n_frames) == (0, 3)  # default: the first frame
    for k, expected in enumerate(frames):
        us = read_ultrasound(path, frame=k)
        diff = np.abs(us.pixels.astype(int) - expected)
        assert us.frame_index == k
        assert (diff.mean() < 3) if jpeg else (diff.max() == 0)
        assert abs(us.pixel_size_mm - cases[0].pixel_size_mm) < 1e-6

    ds.RepresentativeFrameNumber = 2  # 1-based in DICOM
    ds.save_as(path)
    assert read_ultrasound(path).frame_index == 1


def test_directory_is_one_series_read_by_instance_number(tmp_path, cases):
    series = tmp_path / "series"
    series.mkdir()
    study, uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    for number, case in [(2, cases[0]), (1, cases[1])]:
        write_ultrasound(series / f"{number}_{case.image_id}.dcm", read_image(case.image_path), case.pixel_size_mm,
                         study_uid=study, series_uid=uid, instance_number=number)
    (series / "notes.txt").write_text("not DICOM")
    us = read_ultrasound(series)
    assert np.array_equal(us.pixels, read_image(cases[1].image_path))
    assert us.series_instance_uid == uid and abs(us.pixel_size_mm - cases[1].pixel_size_mm) < 1e-6
    (tmp_path / "empty").mkdir()
    with pytest.raises(DicomReadError, match="no DICOM image found"):
        read_ultrasound(tmp_path / "empty")


def test_monochrome1_and_palette_color(tmp_path, cases):
    gray = read_image(cases[0].image_path)
    write_ultrasound(tmp_path / "m2.dcm", gray, cases[0].pixel_size_mm)

    ds = pydicom.dcmread(tmp_path / "m2.dcm")
    ds.PhotometricInterpretation = "MONOCHROME1"  # white is 0: store the inverse
    ds.PixelData = (255 - gray).tobytes()
    ds.save_as(tmp_path / "m1.dcm")
    assert np.array_equal(read_ultrasound(tmp_path / "m1.dcm").pixels, gray)

    ds = pydicom.dcmread(tmp_path / "m2.dcm")
    ds.PhotometricInterpretation = "PALETTE COLOR"  # a reversed gray palette with 16-bit entries
    lut = ((255 - np.arange(256)) * 257).astype("<u2").tobytes()
    for colour in ("Red", "Green", "Blue"):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        ds[f"{colour}PaletteColorLookupTableDescriptor"].VR = "US"
        setattr(ds, f"{colour}PaletteColorLookupTableData", lut)
    ds.save_as(tmp_path / "palette.dcm")
    assert np.array_equal(read_ultrasound(tmp_path / "palette.dcm").pixels, 255 - gray)


def test_calibration_sources(tmp_path, cases):
    gray = read_image(cases[0].image_path)
    write_ultrasound(tmp_path / "none.dcm", gray, cases[0].pixel_size_mm, calibrate=False)
    us = read_ultrasound(tmp_path / "none.dcm")  # no calibration is not an error
    assert us.pixel_size_mm is None and us.pixel_spacing_mm is None and us.calibration == "none"
    assert "no calibration" in us.calibration_note and "pixels" in us.calibration_note

    ds = pydicom.dcmread(tmp_path / "none.dcm")
    ds.PixelSpacing = [0.2, 0.1]  # rows 0.2 mm apart, columns 0.1 mm: anisotropic
    ds.save_as(tmp_path / "spacing.dcm")
    us = read_ultrasound(tmp_path / "spacing.dcm")
    assert us.calibration == "PixelSpacing" and us.pixel_spacing_mm == (0.1, 0.2)
    assert us.pixel_size_mm is None and "anisotropic" in us.calibration_note

    # A thumbnail region in the corner and the scan region over the centre: the scan region counts.
    write_ultrasound(tmp_path / "regions.dcm", gray, cases[0].pixel_size_mm)
    ds = pydicom.dcmread(tmp_path / "regions.dcm")
    thumb = pydicom.Dataset()
    thumb.update(ds.SequenceOfUltrasoundRegions[0])
    thumb.RegionLocationMaxX1, thumb.RegionLocationMaxY1, thumb.PhysicalDeltaX = 99, 79, 0.5
    ds.SequenceOfUltrasoundRegions = [thumb, ds.SequenceOfUltrasoundRegions[0]]
    ds.PixelSpacing = [1.0, 1.0]  # regions take precedence over PixelSpacing
    ds.save_as(tmp_path / "regions.dcm")
    us = read_ultrasound(tmp_path / "regions.dcm")
    assert us.calibration == "SequenceOfUltrasoundRegions"
    assert abs(us.pixel_size_mm - cases[0].pixel_size_mm) < 1e-6

    pixels, spacing, calibration = read_frame(tmp_path / "regions.dcm")
    assert np.array_equal(pixels, gray) and spacing == us.pixel_spacing_mm
    assert calibration["source"] == "SequenceOfUltrasoundRegions"


def test_read_image_dispatches_dicom(tmp_path, cases):
    gray = read_image(cases[2].image_path)
    write_ultrasound(tmp_path / "noext", gray, cases[2].pixel_size_mm)  # recognised by 'DICM', not the name
    assert np.array_equal(read_image(tmp_path / "noext"), gray)
    png_pixels, png_spacing, png_calibration = read_frame(cases[2].image_path)
    assert np.array_equal(png_pixels, gray) and png_spacing is None and png_calibration is None


@pytest.mark.parametrize("multi_frame", [False, True], ids=["single-frame", "multi-frame"])
def test_segmentation_round_trip(tmp_path, cases, multi_frame):
    masks = [c.load_mask() for c in cases]
    frames = [read_image(c.image_path) for c in cases]
    path = tmp_path / "src.dcm"
    if multi_frame:
        write_ultrasound(path, None, cases[0].pixel_size_mm, frames=frames, jpeg=True)
        k = 2
    else:
        write_ultrasound(path, frames[0], cases[0].pixel_size_mm)
        k = 0
    us = read_ultrasound(path, frame=k)
    for keyword in ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID"):  # as anonymisers leave it
        delattr(us.dataset, keyword)
    seg = segmentation_from_mask(masks[k], us.dataset, frame_index=us.frame_index)
    seg.save_as(tmp_path / "seg.dcm")

    seg_ds = pydicom.dcmread(tmp_path / "seg.dcm")
    assert seg_ds.Modality == "SEG" and (seg_ds.Rows, seg_ds.Columns) == masks[k].shape
    assert seg_ds.StudyInstanceUID == us.study_instance_uid and seg_ds.SeriesInstanceUID != us.series_instance_uid
    assert seg_ds.SegmentSequence[0].SegmentLabel == "Fetal head"
    assert seg_ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "fetal_head SAM"
    ref = seg_ds.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == us.sop_instance_uid
    if multi_frame:
        assert int(ref.ReferencedFrameNumber) == k + 1

    mask, sop_uid = mask_from_segmentation(seg_ds)
    assert sop_uid == us.sop_instance_uid
    assert mask.shape == masks[k].shape and np.array_equal(mask, masks[k])


def _jpeg_ls_file(tmp_path, gray):
    """A file claiming a transfer syntax no installed decoder handles (JPEG-LS needs pylibjpeg or CharLS)."""
    write_ultrasound(tmp_path / "src.dcm", gray, 0.1)
    ds = pydicom.dcmread(tmp_path / "src.dcm")
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.80"
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + b"\0" * 64])
    ds["PixelData"].is_undefined_length = True
    ds.save_as(tmp_path / "jpegls.dcm", write_like_original=False)
    return tmp_path / "jpegls.dcm"


def test_bad_inputs_raise_clear_errors(tmp_path, cases):
    gray = read_image(cases[0].image_path)
    write_ultrasound(tmp_path / "ok.dcm", gray, cases[0].pixel_size_mm)

    ds = pydicom.dcmread(tmp_path / "ok.dcm")
    del ds.PixelData
    ds.save_as(tmp_path / "nopixels.dcm")
    with pytest.raises(DicomReadError, match="no pixel data"):
        read_ultrasound(tmp_path / "nopixels.dcm")

    with pytest.raises(DicomReadError, match=r"unsupported transfer syntax JPEG-LS .*1\.2\.840\.10008\.1\.2\.4\.80"):
        read_ultrasound(_jpeg_ls_file(tmp_path, gray))

    ds = pydicom.dcmread(tmp_path / "ok.dcm")  # JPEG 2000 decodes here (Pillow), but not these bytes
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.90"
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 64])
    ds["PixelData"].is_undefined_length = True
    ds.save_as(tmp_path / "j2k.dcm", write_like_original=False)
    with pytest.raises(DicomReadError, match=r"cannot decode the pixel data \(transfer syntax JPEG 2000"):
        read_ultrasound(tmp_path / "j2k.dcm")

    with pytest.raises(DicomReadError, match=r"frame index 1 is out of range: .* 1 frame\(s\), valid 0\.\.0"):
        read_ultrasound(tmp_path / "ok.dcm", frame=1)
    write_ultrasound(tmp_path / "cine.dcm", None, 0.1, frames=[gray, gray])
    for bad in (2, -1):
        with pytest.raises(DicomReadError, match=r"out of range: .* 2 frame\(s\), valid 0\.\.1"):
            read_ultrasound(tmp_path / "cine.dcm", frame=bad)

    for modality in ("CT", "MR"):
        write_ultrasound(tmp_path / f"{modality}.dcm", gray, 0.1, modality=modality)
        with pytest.raises(DicomReadError, match=f"modality {modality} is not supported: expected US"):
            read_ultrasound(tmp_path / f"{modality}.dcm")
        with pytest.raises(DicomReadError, match="modality"):
            read_image(tmp_path / f"{modality}.dcm")  # the app's read path refuses it too (-> HTTP 422)

    png_named_dcm = tmp_path / "scan.dcm"
    png_named_dcm.write_bytes(open(cases[0].image_path, "rb").read())
    with pytest.raises(DicomReadError, match="not a DICOM file"):
        read_ultrasound(png_named_dcm)
    with pytest.raises(ImageReadError, match="not a DICOM file"):
        read_image(png_named_dcm)
    with pytest.raises(DicomReadError, match="not a DICOM file"):
        read_ultrasound(cases[0].image_path)
    with pytest.raises(ImageReadError, match="single frame"):
        read_frame(cases[0].image_path, frame=3)


def test_infer_task_uses_dicom_calibration_and_frame(tmp_path, cases):
    """The infer task on a DICOM cine: the chosen frame is segmented and HC is in mm from the file's calibration."""
    from fetal_head.segmentation.model_store import ModelSource, ServedModel
    from infers.sam_infer import FetalHeadSamInfer

    frames = [read_image(c.image_path) for c in cases[:2]]
    write_ultrasound(tmp_path / "cine.dcm", None, cases[1].pixel_size_mm, frames=frames, jpeg=True)
    ref = cases[1].load_mask()
    rows, cols = np.nonzero(ref)
    task = FetalHeadSamInfer(ServedModel(ModelSource(model_dir=str(tmp_path / "model"))))
    label_file, result = task({"image": str(tmp_path / "cine.dcm"), "frame": 1,
                               "box": [int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())]})
    try:
        assert result["frame"] == {"index": 1, "count": 2}
        assert result["calibration"]["source"] == "SequenceOfUltrasoundRegions"
        assert result["biometry"]["pixel_size_mm"] == pytest.approx([cases[1].pixel_size_mm] * 2, abs=1e-6)
        # HC18's reference HC of that frame: within 5 % (a wrong unit or a missing calibration is off by 10x or more)
        assert abs(result["biometry"]["hc_mm"] - cases[1].hc_mm) < 0.05 * cases[1].hc_mm
        assert dice(read_image(label_file) > 0, ref) > 0.85
    finally:
        os.remove(label_file)


def test_files_pass_the_dicom3tools_validator(tmp_path, cases):
    """Every conforming encoding, the cine and the SEG pass David Clunie's IOD validator without errors."""
    if not shutil.which("dciodvfy"):
        pytest.fail("dciodvfy not found: run scripts/install_system_deps.sh (Debian package dicom3tools)")
    gray = read_image(cases[0].image_path)
    paths = []
    for photometric, jpeg in sorted(US_ENCODINGS):
        paths.append(tmp_path / f"{photometric}_{jpeg}.dcm")
        image = gray if photometric == "MONOCHROME2" else with_colour_overlay(gray)
        write_ultrasound(paths[-1], image, cases[0].pixel_size_mm, photometric=photometric, jpeg=jpeg)
    paths.append(tmp_path / "cine.dcm")
    write_ultrasound(paths[-1], None, 0.1, frames=[gray, gray], jpeg=True, photometric="YBR_FULL_422")
    us = read_ultrasound(paths[-1], frame=1)
    paths.append(tmp_path / "seg.dcm")
    segmentation_from_mask(cases[0].load_mask(), us.dataset, frame_index=1).save_as(paths[-1])
    for path in paths:
        report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True).stderr
        assert "Error" not in report, f"{path.name}: {report}"


def test_png_to_dicom_script_on_sample_data(tmp_path):
    """scripts/png_to_dicom.py on the shipped HC18-layout sample datastore: calibrated files and reference SEGs."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import png_to_dicom
    finally:
        sys.path.pop(0)
    from fetal_head.io.hc18 import read_cases

    png_to_dicom.main([str(REPO / "apps/fetal_head/sample_data"), str(tmp_path), "--jpeg", "--seg"])
    cases = read_cases(str(REPO / "apps/fetal_head/sample_data"))
    studies = set()
    for case in cases:
        us = read_ultrasound(tmp_path / f"{case.image_id}.dcm")
        studies.add(us.study_instance_uid)
        assert abs(us.pixel_size_mm - case.pixel_size_mm) < 1e-6
        assert np.abs(us.pixels.astype(int) - read_image(case.image_path)).mean() < 3
        if case.mask_path:
            mask, sop_uid = mask_from_segmentation(pydicom.dcmread(tmp_path / f"{case.image_id}_seg.dcm"))
            assert sop_uid == us.sop_instance_uid and np.array_equal(mask, case.load_mask())
    assert len(studies) == len(cases) == 6  # one study per image
