"""OHIF, as shipped inside monailabel 0.8.5 (served at /ohif/), in a real headless Chromium.

A real Orthanc (DICOMweb) holds ultrasound DICOM made from HC18 test images; a real `monailabel start_server` runs
this app with `--studies <orthanc>/dicom-web`; OHIF reads the PACS through MONAI Label's DICOMweb proxy
(`/proxy/dicom/...`, app-config.js in monailabel's static OHIF build). Chromium is Debian's (`/usr/bin/chromium`),
driven by Playwright's Python package (its wheel carries the driver; no browser is downloaded).

    SAVE_SCREENSHOTS=docs/viewers .venv/bin/python -m pytest tests/test_ohif.py   # also refresh docs/viewers/*.png

What the MONAI Label panel can and cannot do with a 2D ultrasound study is pinned in the last two tests (see
their docstrings and the README section "Using it from 3D Slicer and OHIF").
"""

import io
import os
import shutil
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, test_split

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
INSTALL_HINT = "run `sudo scripts/install_system_deps.sh` (Debian packages chromium, orthanc, orthanc-dicomweb)"
# This machine has no network: without these flags Chromium keeps dialling Google services.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1400, "height": 900}
N_STUDIES = 2
STUDY_DESCRIPTION = "Fetal head HC18"

# Console errors that are not ours and cannot be avoided, matched on the failing resource's URL only:
ALLOWED_ERROR_URLS = (
    # OHIF's index.html loads the Inter font from Google Fonts; the test machine (and many hospital networks) has
    # no internet, so the request fails and OHIF falls back to a local font.
    lambda u: u.scheme == "https" and u.netloc == "fonts.googleapis.com",
    # monailabel 0.8.5's OHIF manifest.json names its icons /assets/... instead of /ohif/assets/...: a 404 for
    # the install icon of the web-app manifest, which nothing on the page uses.
    lambda u: u.path.startswith("/assets/android-chrome-"),
    # The MONAI Label panel asks "is a training running?" when it connects; MONAI Label answers 404 for "no".
    lambda u: u.path == "/train/" and u.query == "check_if_running=true",
)


def save_screenshot(png: Path, name: str):
    """Screenshots go to the test's tmp folder; SAVE_SCREENSHOTS=<dir> also copies them there (e.g. docs/viewers)."""
    target = os.environ.get("SAVE_SCREENSHOTS")
    if target:
        dst = Path(target) if Path(target).is_absolute() else REPO / target
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, dst / name)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, hc18):
    """Orthanc with N_STUDIES ultrasound studies, and the app's server reading it over DICOMweb."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"Chromium not found at {CHROMIUM}: {INSTALL_HINT}")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail("the playwright Python package is missing: `.venv/bin/pip install -e .[test]`")
    from fetal_head.io.dicom_us import write_ultrasound
    from orthanc_server import pacs_with_app_server

    tmp = tmp_path_factory.mktemp("ohif")
    cases = test_split(hc18, "test", N_STUDIES, seed=7)
    files, studies = [], {}
    for case in cases:
        path = tmp / f"{case.image_id}.dcm"
        ds = write_ultrasound(path, np.array(Image.open(case.image_path).convert("L")), case.pixel_size_mm,
                              patient_id=case.image_id, patient_name=f"HC18^{case.image_id}",
                              study_description=STUDY_DESCRIPTION, series_description="fetal head standard plane")
        files.append(path)
        studies[case.image_id] = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), case)
    with pacs_with_app_server(tmp, files) as (orthanc, srv):  # no Orthanc: fails naming the install script
        srv.orthanc, srv.studies, srv.tmp = orthanc, studies, tmp
        yield srv


class Browser:
    """One headless Chromium page that records every console error, page error and failed request."""

    def __init__(self, tmp: Path):
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        self.ctx = self._pw.chromium.launch_persistent_context(
            tempfile.mkdtemp(dir=tmp, prefix="chromium-profile-"), executable_path=CHROMIUM, args=CHROMIUM_ARGS,
            headless=True, viewport=VIEWPORT)
        self.page = self.ctx.new_page()
        self.errors, self.requests = [], []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.on("requestfailed", self._failed)
        self.page.on("response", lambda r: self.requests.append((r.request.method, r.url, r.status)))

    def _console(self, msg):
        if msg.type == "error" and not allowed(msg.location.get("url", "")):
            self.errors.append(f"console.error: {msg.text} ({msg.location.get('url', '')})")

    def _failed(self, req):
        if not allowed(req.url):
            self.errors.append(f"request failed: {req.method} {req.url} ({req.failure})")

    def close(self):
        self.ctx.close()
        self._pw.stop()


def allowed(url: str) -> bool:
    parsed = urlparse(url)
    return any(rule(parsed) for rule in ALLOWED_ERROR_URLS)


@pytest.fixture
def browser(stack):
    b = Browser(stack.tmp)
    yield b
    b.close()


def open_study_list(b: Browser, base: str):
    b.page.goto(f"{base}/ohif/", wait_until="networkidle", timeout=120_000)
    hide_banner(b.page)


def hide_banner(page, wait_ms=5_000):
    """OHIF's "investigational use only" banner covers the bottom of the page until confirmed (it may show late)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    hide = page.get_by_role("button", name="Confirm and Hide")
    try:
        hide.wait_for(state="visible", timeout=wait_ms)
    except PlaywrightTimeout:
        return  # confirmed earlier in this browser profile
    hide.click()
    hide.wait_for(state="hidden", timeout=wait_ms)


def patient_cell(page, image_id):
    # OHIF shows the DICOM PN "HC18^531_HC" as "HC18, 531_HC"
    return page.get_by_text(f"HC18, {image_id}", exact=True).first


def canvas_gray(page) -> np.ndarray:
    """What the cornerstone viewport shows, as gray pixels (a screenshot of the canvas element's box)."""
    canvas = page.locator("canvas.cornerstone-canvas").first
    return np.array(Image.open(io.BytesIO(canvas.screenshot())).convert("L")).astype(np.float32)


def centred(src: np.ndarray, shape, scale: float) -> np.ndarray:
    """The source image scaled by `scale` and centred in a black viewport of `shape` (cropped if larger)."""
    h, w = shape
    sw, sh = max(1, round(src.shape[1] * scale)), max(1, round(src.shape[0] * scale))
    img = np.array(Image.fromarray(src).resize((sw, sh), Image.BILINEAR), np.float32)
    out = np.zeros(shape, np.float32)
    y0, x0 = (h - sh) // 2, (w - sw) // 2
    ys, xs = max(0, -y0), max(0, -x0)
    out[max(0, y0):max(0, y0) + min(h, sh), max(0, x0):max(0, x0) + min(w, sw)] = img[ys:ys + h, xs:xs + w]
    return out


def best_fit_correlation(shown: np.ndarray, src: np.ndarray) -> float:
    """Pixel correlation of the viewport with the source image, centred, over the zoom levels a viewer may pick
    (cornerstone fits the image with a margin that depends on its version); the best one counts."""
    fit = min(shown.shape[1] / src.shape[1], shown.shape[0] / src.shape[0])
    return max(float(np.corrcoef(shown.ravel(), centred(src, shown.shape, fit * f).ravel())[0, 1])
               for f in np.linspace(0.7, 1.1, 41))


def wait_for_image(page, case, timeout=90):
    """Poll the viewport until it shows the case's image (the frame arrives by WADO-RS after the canvas exists)."""
    src = np.array(Image.open(case.image_path).convert("L"))
    deadline, corr, shown = time.time() + timeout, -1.0, None
    while time.time() < deadline:
        shown = canvas_gray(page)
        if shown.std() > 10:
            corr = best_fit_correlation(shown, src)
            if corr > 0.8:
                break
        time.sleep(1)
    return shown, corr


def colour_fraction(page) -> float:
    """Share of viewport pixels that are clearly coloured: the ultrasound is gray, a drawn segmentation is not."""
    canvas = page.locator("canvas.cornerstone-canvas").first
    rgb = np.array(Image.open(io.BytesIO(canvas.screenshot())).convert("RGB")).astype(np.int16)
    return float(np.mean(np.abs(rgb - rgb.mean(-1, keepdims=True)).max(-1) > 30))


def test_study_list_shows_the_orthanc_studies(stack, browser):
    page = browser.page
    open_study_list(browser, stack.url)
    for image_id in stack.studies:
        patient_cell(page, image_id).wait_for(timeout=60_000)
        assert page.get_by_text(image_id, exact=True).count() >= 1  # the MRN column (PatientID)
    body = page.inner_text("body")
    assert f"{N_STUDIES}\nStudies" in body or f"{N_STUDIES} Studies" in " ".join(body.split())
    # the list came from Orthanc through MONAI Label's DICOMweb proxy
    qido = [r for r in browser.requests if urlparse(r[1]).path == "/proxy/dicom/qido/studies"]
    assert qido and all(status == 200 for _, _, status in qido), qido
    png = stack.tmp / "ohif_study_list.png"
    page.screenshot(path=str(png))
    save_screenshot(png, "ohif_study_list.png")
    assert browser.errors == []


def test_viewer_renders_the_ultrasound_image(stack, browser):
    page = browser.page
    image_id, (study_uid, series_uid, case) = next(iter(stack.studies.items()))
    open_study_list(browser, stack.url)
    with page.expect_response(lambda r: f"/proxy/dicom/qido/studies/{study_uid}/series" in r.url):
        patient_cell(page, image_id).click()
    page.get_by_role("button", name="Basic Viewer").click()
    page.wait_for_url(f"**/ohif/viewer?StudyInstanceUIDs={study_uid}*", timeout=60_000)
    page.locator("canvas.cornerstone-canvas").first.wait_for(timeout=60_000)
    hide_banner(page)
    shown, corr = wait_for_image(page, case)
    page.get_by_text("Patient", exact=True).first.click()  # the header's patient box: name and ID of this image
    patient_cell(page, image_id).wait_for(timeout=10_000)
    png = stack.tmp / "ohif_viewer.png"
    page.screenshot(path=str(png))
    print(f"viewport {shown.shape[1]}x{shown.shape[0]}: mean {shown.mean():.1f}, std {shown.std():.1f}, "
          f"non-black {np.mean(shown > 20):.2f}; best correlation with the HC18 image {corr:.3f}")
    # the canvas shows *this* ultrasound image (not a blank or another picture): its pixels follow the source's
    assert shown.std() > 10 and np.mean(shown > 20) > 0.2
    assert corr > 0.8
    save_screenshot(png, "ohif_viewer.png")
    # the pixels came from Orthanc by WADO-RS through the proxy
    wado = [r for r in browser.requests if r[1].startswith(f"{stack.url}/proxy/dicom/wado/studies/{study_uid}")]
    assert wado and all(status == 200 for _, _, status in wado), wado
    assert browser.errors == []



def decode_label(body: bytes, tmp: Path) -> np.ndarray:
    """The infer answer's label: NRRD (what the panel asks for with result_extension) read with ITK, else a PNG."""
    if not body.startswith(b"NRRD"):
        return np.array(Image.open(io.BytesIO(body)))
    import itk

    path = tmp / "ohif_answer.nrrd"
    path.write_bytes(body)
    return np.squeeze(np.asarray(itk.array_from_image(itk.imread(str(path)))))


@pytest.fixture(scope="module")
def panel(stack):
    """The MONAI Label mode of OHIF on one ultrasound study, its panel connected to our server, Auto-Segmentation run.

    The study list's "MONAI Label" button is disabled for this study: the mode accepts only studies with CT or MR
    (`isValidMode` in monailabel 0.8.5's OHIF build). The mode still opens from its URL; its MPR hanging protocol
    shows nothing for a single 2D frame (not reconstructable into a volume), so the URL also names OHIF's default
    protocol: /ohif/monai-label?StudyInstanceUIDs=<uid>&hangingprotocolId=default (documented in the README).
    """
    b = Browser(stack.tmp)
    page = b.page
    image_id, (study_uid, series_uid, case) = next(iter(stack.studies.items()))
    state = {"case": case, "series_uid": series_uid, "console": []}
    page.on("console", lambda m: state["console"].append(f"{m.type}: {m.text}"))
    try:
        open_study_list(b, stack.url)
        with page.expect_response(lambda r: f"/proxy/dicom/qido/studies/{study_uid}/series" in r.url):
            patient_cell(page, image_id).click()  # expands the row: series list and the modes' buttons
        state["mode_button_disabled"] = page.get_by_role("button", name="MONAI Label").is_disabled()
        page.goto(f"{stack.url}/ohif/monai-label?StudyInstanceUIDs={study_uid}&hangingprotocolId=default",
                  wait_until="networkidle", timeout=120_000)
        hide_banner(page)
        state["shown"], state["corr"] = wait_for_image(page, case)
        state["colour_before"] = colour_fraction(page)
        page.fill("#monailabelServerURL", f"{stack.url}/")
        page.locator("#monailabelServerURL").locator("xpath=../..").locator("button").click()  # the refresh button
        auto = page.locator("select", has=page.locator("option", has_text="fetal_head_auto")).first
        auto.wait_for(timeout=30_000)  # the Auto-Segmentation section, open by default
        state["auto_models"] = [t.strip() for t in auto.locator("option").all_inner_texts()]
        state["panel_text"] = page.locator("body").inner_text()
        with page.expect_response(lambda r: "/infer/" in r.url, timeout=300_000) as infer:
            page.locator("button:text-is('Run'):visible").first.click()
        resp = infer.value
        state["infer_url"], state["infer_status"] = resp.url, resp.status
        state["infer_body"] = resp.body()
        state["infer_form"] = resp.request.post_data_buffer
        time.sleep(5)  # let the panel handle the answer (it would draw the labelmap now)
        state["colour_after"] = colour_fraction(page)
        png = stack.tmp / "ohif_monai_label_panel.png"
        page.screenshot(path=str(png))
        state["screenshot"] = png
        yield b, state
    finally:
        b.close()


def test_monai_label_panel_lists_our_models_and_runs_inference_on_the_pacs_image(stack, panel):
    """What works from OHIF's MONAI Label panel on a 2D ultrasound study: connecting, listing our models and
    running Auto-Segmentation, which the server answers by reading the series from Orthanc."""
    b, st = panel
    assert st["mode_button_disabled"]  # see the fixture's docstring: why the URL is typed in
    assert st["corr"] > 0.8  # the image is shown in the MONAI Label mode too
    assert "fetal_head_auto" in st["auto_models"]
    assert "fetal_head_sam" in st["panel_text"] and "fetal_head" in st["panel_text"]
    info = [r for r in b.requests if urlparse(r[1]).path == "/info/"]
    assert info and info[-1][2] == 200
    # the panel asked our server to segment the series by its SeriesInstanceUID; the server fetched it by DICOMweb
    url = urlparse(st["infer_url"])
    assert url.path == "/infer/fetal_head_auto" and f"image={st['series_uid']}" in url.query
    assert st["infer_status"] == 200, st["infer_body"][:500]
    mask = decode_label(st["infer_body"], stack.tmp)
    ref = st["case"].load_mask()
    from conftest import dice

    d = dice(mask, ref)
    print(f"OHIF panel Auto-Segmentation: answer {len(st['infer_body'])} bytes, mask {mask.shape}, Dice {d:.3f}")
    assert mask.shape == ref.shape
    assert d > 0.8
    save_screenshot(st["screenshot"], "ohif_monai_label_panel.png")
    assert b.errors == []


@pytest.mark.xfail(strict=True, reason=(
    "monailabel 0.8.5's OHIF panel cannot draw a 2D result: it reads the answer as NRRD (which this app now answers) "
    "and writes it only into a labelmap *volume* (updateView -> segmentationService.getLabelmapVolume), while OHIF "
    "makes a stack labelmap for a single ultrasound frame, so the panel logs 'Volume Object is NOT In Cache'"))
def test_monai_label_panel_draws_the_head(panel):
    b, st = panel
    print("\n".join(line for line in st["console"] if "UpdateView" in line or "Volume" in line or "NRRD" in line))
    assert st["colour_after"] - st["colour_before"] > 0.03
