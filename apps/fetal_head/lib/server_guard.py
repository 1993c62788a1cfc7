"""The app's own ``POST /infer/{model}`` and ``POST /train/{model}`` (and ``POST /train/``) routes, installed over
MONAI Label 0.8.5's ones when the server starts (``FetalHeadApp.on_init_complete``).

Why: MONAI Label's endpoints are ``async def`` functions that call the app synchronously, so one inference or a
``run_sync`` training freezes the event loop (``/info/`` included); they parse ``params`` with a bare
``json.loads`` (500 on bad JSON), merge every params key into the request (so a client can name a server file as
``image`` or inject an ``image_array``), answer 500 for a request without an image, and leave the upload's temp
file behind whenever the request fails. Here, the same API (same query, form and answer) with:

- 404 for an unknown model, 422 with a message for malformed or non-object ``params``, reserved keys in
  ``params`` (``image``, ``image_array``, ``session``, ``model``, ``file``; ``label`` only as a name, as 3D Slicer
  sends ``"label": "fetal_head"``, never a path) and a request without image;
- uploads written to this process's own folder, known to the request that wrote them only (a thread-local
  set that ``main._is_uploaded_file`` consults) and deleted on every path, error or not;
- the work in a bounded worker pool (``--conf infer_workers``, default 2; training ``run_sync`` in its own
  one-slot pool), so the event loop keeps answering;
- train options validated with the trainer's own parser (``validate_request``) before any job starts: 422.
"""

# no `from __future__ import annotations`: FastAPI resolves the endpoints' annotations at run time

import json
import logging
import os
import pathlib
import shutil
import tempfile
import threading
from typing import Callable, Optional, Set

from fastapi import Depends, File, Form, HTTPException, UploadFile
from fastapi.background import BackgroundTasks
from fastapi.routing import APIRoute

logger = logging.getLogger(__name__)

RESERVED_PARAMS = ("image", "image_array", "session", "model", "file")
_local = threading.local()
_upload_dir: Optional[str] = None


def current_uploads() -> Set[str]:
    """Real paths of the files the request running in this thread uploaded (empty elsewhere)."""
    return getattr(_local, "uploads", set())


def upload_dir() -> str:
    """This process's upload folder (created on first use; stale ones of dead processes are removed)."""
    global _upload_dir
    if _upload_dir is None:
        base = tempfile.gettempdir()
        for name in os.listdir(base):
            if name.startswith("fetal_head_uploads_"):
                try:
                    pid = int(name.split("_")[3])
                    os.kill(pid, 0)
                except ProcessLookupError:
                    shutil.rmtree(os.path.join(base, name), ignore_errors=True)
                except (ValueError, IndexError, PermissionError, OSError):
                    pass
        _upload_dir = tempfile.mkdtemp(prefix=f"fetal_head_uploads_{os.getpid()}_")
    return _upload_dir


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        logger.warning(f"could not remove upload {path}: {e}")


def _suffix(filename: Optional[str]) -> str:
    suffixes = "".join(pathlib.Path(filename).suffixes) if filename else ".nii.gz"
    # only a plain suffix (what the readers dispatch on); never a path part
    return "".join(ch for ch in suffixes if ch.isalnum() or ch == ".")[:16] or ".bin"


def _save(upload: UploadFile, saved: list) -> str:
    fd, path = tempfile.mkstemp(suffix=_suffix(upload.filename), dir=upload_dir())
    saved.append(path)
    with os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(upload.file, out, 1 << 20)
    return path


def parse_params(params) -> dict:
    """The ``params`` form field as a JSON object; 422 with a message otherwise."""
    if params is None or params == "":
        return {}
    try:
        p = json.loads(params)
    except (ValueError, RecursionError) as e:
        raise HTTPException(status_code=422, detail=f"'params' is not valid JSON: {e}") from None
    if not isinstance(p, dict):
        raise HTTPException(status_code=422, detail=f"'params' must be a JSON object, got {type(p).__name__}")
    reserved = sorted(k for k in p if k in RESERVED_PARAMS)
    label = p.get("label")
    if label is not None and not (isinstance(label, str) and "/" not in label and "\\" not in label):
        reserved.append("label (other than a label name, as 3D Slicer sends it)")
    if reserved:
        raise HTTPException(status_code=422, detail=f"'params' may not set {reserved}: the image comes from the "
                                                    "'image' query parameter (a datastore id) or the uploaded file")
    return p


def _run_infer(instance, run_inference, background_tasks, model, image, session_id, p, file, label, output):
    saved: list = []
    _local.uploads = set()
    try:
        if file is not None:
            image = _save(file, saved)
            _local.uploads.add(os.path.realpath(image))
        if label is not None:
            label_path = _save(label, saved)
            if label_path.endswith(".bin"):  # OHIF scribbles: converted against the reference image
                from monailabel.datastore.utils.convert import binary_to_image

                label_path = binary_to_image(instance.datastore().get_image_uri(image), label_path)
                saved.append(label_path)
            p = {**p, "label": label_path}
        # MONAI Label's own request building and answer, with the file already saved (no second temp file)
        return run_inference(background_tasks, model, image, session_id, json.dumps(p), None, None, output)
    finally:
        _local.uploads = set()
        for path in saved:
            _remove(path)


def install(fastapi_app, instance, infer_workers: int = 2) -> None:
    """Replace MONAI Label's infer and train POST routes of ``fastapi_app`` with the guarded ones."""
    import anyio
    from monailabel.config import RBAC_ADMIN, RBAC_USER, settings
    from monailabel.endpoints import infer as infer_ep
    from monailabel.endpoints import train as train_ep
    from monailabel.endpoints.user.auth import RBAC, User

    infer_limiter = anyio.CapacityLimiter(max(1, int(infer_workers)))
    train_limiter = anyio.CapacityLimiter(1)
    prefix = settings.MONAI_LABEL_API_STR

    async def api_run_inference(
        background_tasks: BackgroundTasks,
        model: str,
        image: str = "",
        session_id: str = "",
        params: str = Form("{}"),
        file: UploadFile = File(None),
        label: UploadFile = File(None),
        output: Optional[infer_ep.ResultType] = None,
        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
    ):
        if model not in instance._infers:
            raise HTTPException(status_code=404, detail=f"model '{model}' not found; available: "
                                                        f"{sorted(instance._infers)}")
        p = parse_params(params)
        if file is None and not image and not session_id:
            raise HTTPException(status_code=422, detail="no image: give an 'image' id or upload a 'file'")
        return await anyio.to_thread.run_sync(
            _run_infer, instance, infer_ep.run_inference, background_tasks, model, image, session_id, p, file,
            label, output, limiter=infer_limiter)

    def validate_train(model: str, params: Optional[dict]) -> None:
        trainers = instance._trainers
        if model not in trainers:
            raise HTTPException(status_code=404, detail=f"train task '{model}' not found; available: {sorted(trainers)}")
        if params is not None and not isinstance(params, dict):
            raise HTTPException(status_code=422, detail="the train options must be a JSON object")
        validate = getattr(trainers[model], "validate_request", None)
        if validate is None:
            return
        config = instance.info().get("config", {}).get("train", {})
        try:
            validate({"model": model, **config, **(params or {})})
        except (TypeError, ValueError) as e:
            raise HTTPException(status_code=422, detail=str(e)) from None

    async def api_run_model(
        model: str,
        params: Optional[dict] = None,
        run_sync: Optional[bool] = False,
        enqueue: Optional[bool] = False,
        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN)),
    ):
        validate_train(model, params)
        limiter = train_limiter if run_sync else infer_limiter
        return await anyio.to_thread.run_sync(train_ep.run_model, model, params, run_sync, enqueue, limiter=limiter)

    async def api_run(
        params: Optional[dict] = None,
        run_sync: Optional[bool] = False,
        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN)),
    ):
        for model in instance._trainers:
            validate_train(model, (params or {}).get(model) if isinstance(params, dict) else params)
        limiter = train_limiter if run_sync else infer_limiter
        return await anyio.to_thread.run_sync(train_ep.run, params, run_sync, limiter=limiter)

    _replace(fastapi_app, f"{prefix}/infer/{{model}}", "POST", api_run_inference,
             f"{RBAC_USER}Run Inference for supported model", ["Infer"], infer_ep.router.responses)
    _replace(fastapi_app, f"{prefix}/train/{{model}}", "POST", api_run_model,
             f"{RBAC_ADMIN} Run Training Task for specific model", ["Train"], None)
    _replace(fastapi_app, f"{prefix}/train/", "POST", api_run, f"{RBAC_ADMIN}Run All Training Tasks", ["Train"], None,
             include_in_schema=False)
    logger.info(f"guarded infer/train routes installed ({infer_workers} infer worker(s))")


def _replace(fastapi_app, path: str, method: str, endpoint: Callable, summary: str, tags, responses,
             include_in_schema: bool = True) -> None:
    """Put our route first, so it matches before MONAI Label's (FastAPI >= 0.1xx keeps included routers as
    opaque ``_IncludedRouter`` entries, so theirs cannot be found and swapped; plain ``APIRoute`` ones are
    removed)."""
    routes = fastapi_app.router.routes
    fastapi_app.router.add_api_route(path, endpoint, methods=[method], summary=summary, tags=tags,
                                     responses=responses, include_in_schema=include_in_schema)
    new = routes.pop()
    for i in reversed([i for i, r in enumerate(routes)
                       if isinstance(r, APIRoute) and r.path == path and method in r.methods]):
        del routes[i]
    routes.insert(0, new)
    fastapi_app.openapi_schema = None
