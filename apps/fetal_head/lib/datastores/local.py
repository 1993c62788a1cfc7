"""The app's datastore for a folder of 2D images: MONAI Label's ``LocalDatastore``, made safe for a hospital network.

What it adds to MONAI Label's local datastore (issue 11, items 1, 2, 3 and 8):

- **Nothing outside the datastore.** Every image id, label tag and file name is checked before it becomes a path
  (ids: letters, digits, ``.``, ``_``, ``-``, not starting with ``.``, no ``..``; tags: letters, digits, ``_``,
  ``-``) and every resolved path must lie inside the datastore folder; anything else is a 400 (an unknown id a 404).
- **The datastore file survives a crash.** ``datastore_v2.json`` is written atomically (temporary file + rename,
  :func:`fetal_head.files.atomic_json`). A damaged or zero-byte file found at start is moved aside to
  ``datastore_v2.json.damaged-<time>`` (logged) and the datastore is rebuilt from the folder.
- **Real final labels are protected.** Replacing or deleting a ``final`` label (or deleting an image that has one)
  needs ``force`` (``?force=true`` on ``PUT/DELETE /datastore/label`` and ``DELETE /datastore/image``, or
  ``{"force": true}`` in a label upload's ``params``); otherwise 409. The previous version is kept in
  ``labels/final/.history/<id>/<time><ext>``: :meth:`FetalHeadDatastore.label_history` lists it,
  :meth:`FetalHeadDatastore.restore_label` puts a version back (``GET /datastore/label/history``,
  ``POST /datastore/label/restore``).
- **Synthetic is the pipeline's mark only.** Clients cannot set the provenance keys (``synthetic``,
  ``provenance``) in image info (422), nor upload an image under the pipeline's ``synthetic_`` id prefix.
- **Labels are validated on upload**: readable, 2D (singleton axes dropped, as Slicer's (1, H, W) NRRD), the
  image's geometry, values {0, 1} or {0, 255}; otherwise 422 and nothing is written.

The routes that carry ``force`` and the history routes are installed by :func:`install_routes` in front of MONAI
Label's own (its endpoints pass no query flags to the datastore).
"""

import json
import logging
import os
import re
import shutil
import time
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional

import numpy as np
from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore, LocalDatastoreModel
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.utils.others.generic import remove_file

from fetal_head.files import atomic_json, atomic_path

logger = logging.getLogger(__name__)

FINAL = DefaultLabelTag.FINAL.value
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
TAG_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
VERSION_PATTERN = re.compile(r"[0-9]{8}T[0-9]{6}\.[0-9]{6}Z(\.[A-Za-z0-9]+)+")
HISTORY_DIR = ".history"
SYNTHETIC_PREFIX = "synthetic_"  # fetal_head.synthesis.store: ids and info keys only the pipeline gives
PROVENANCE_KEYS = ("synthetic", "provenance")
LABEL_SUFFIXES = (".png", ".nrrd", ".nii.gz", ".nii", ".jpg", ".jpeg")
ITK_SUFFIXES = (".nrrd", ".nii.gz", ".nii")


# ---- validation shared with the DICOMweb datastore ----

def check_image_id(image_id: Any) -> str:
    """An image id that can only name a file inside the datastore, or a 400."""
    if not isinstance(image_id, str) or not ID_PATTERN.fullmatch(image_id) or ".." in image_id:
        raise HTTPException(status_code=400, detail=f"invalid image id {str(image_id)[:200]!r}: ids are letters, "
                                                    "digits, '.', '_' or '-' (no path, no '..')")
    return image_id


def check_tag(tag: Any) -> str:
    if not isinstance(tag, str) or not TAG_PATTERN.fullmatch(tag):
        raise HTTPException(status_code=400, detail=f"invalid label tag {str(tag)[:200]!r}: tags are letters, "
                                                    "digits, '_' or '-'")
    return tag


def is_valid_id(image_id: Any) -> bool:
    return isinstance(image_id, str) and bool(ID_PATTERN.fullmatch(image_id)) and ".." not in image_id


def is_valid_tag(tag: Any) -> bool:
    return isinstance(tag, str) and bool(TAG_PATTERN.fullmatch(tag))


def flag(value: Any) -> bool:
    """A boolean request flag as clients send it (true, "true", 1, "1", "yes")."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def refuse_provenance_keys(info: Dict[str, Any]):
    found = [k for k in PROVENANCE_KEYS if k in (info or {})]
    if found:
        raise HTTPException(status_code=422, detail=f"{', '.join(found)}: set only by the synthesis pipeline, "
                                                    "not by clients")


def is_pipeline_synthetic(image_id: str, info: Dict[str, Any]) -> bool:
    """The synthesis pipeline's mark: its id prefix, ``synthetic: true`` and a provenance record."""
    return (image_id.startswith(SYNTHETIC_PREFIX) and info.get("synthetic") is True
            and isinstance(info.get("provenance"), dict))


def label_suffix(filename: str) -> str:
    name = os.path.basename(filename).lower()
    for s in LABEL_SUFFIXES:
        if name.endswith(s):
            return s
    raise HTTPException(status_code=422, detail=f"label file type of {os.path.basename(filename)!r} not accepted: "
                                                f"use one of {', '.join(LABEL_SUFFIXES)}")


def validate_label(label_file: str, image_file: str) -> np.ndarray:
    """The uploaded label as a (H, W) array, or a 422 saying why it cannot be this image's label."""
    from fetal_head.io import read_image

    if not os.path.isfile(label_file) or os.path.getsize(label_file) == 0:
        raise HTTPException(status_code=422, detail="the label file is empty")
    try:
        if label_file.lower().endswith(ITK_SUFFIXES):
            import itk

            a = np.asarray(itk.array_from_image(itk.imread(label_file)))
        else:
            from PIL import Image

            with Image.open(label_file) as im:
                a = np.asarray(im)
    except Exception as e:  # PIL and itk raise many types for a corrupt file
        raise HTTPException(status_code=422, detail=f"the label file is not a readable image "
                                                    f"({type(e).__name__}: {e})") from e
    a = np.squeeze(a) if a.ndim > 2 else a  # Slicer's (1, H, W) labelmap, (H, W, 1)
    if a.ndim != 2:
        raise HTTPException(status_code=422, detail=f"the label must be a 2D single-channel mask, got shape "
                                                    f"{tuple(a.shape)}")
    try:
        shape = read_image(image_file).shape
    except Exception as e:
        raise HTTPException(status_code=422, detail=f"the image of this label cannot be read "
                                                    f"({type(e).__name__}: {e})") from e
    if tuple(a.shape) != tuple(shape):
        raise HTTPException(status_code=422, detail=f"the label is {a.shape[0]}x{a.shape[1]} but the image is "
                                                    f"{shape[0]}x{shape[1]} (rows x columns)")
    values = set(np.unique(a).tolist())
    if not (values <= {0, 1} or values <= {0, 255}):
        shown = sorted(values)[:8]
        raise HTTPException(status_code=422, detail=f"label values must be {{0, 1}} or {{0, 255}}, got {shown}"
                                                    f"{' ...' if len(values) > 8 else ''}")
    return a


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


class FetalHeadDatastore(LocalDatastore):
    def __init__(self, datastore_path: str, **kwargs):
        self._recover_damaged_file(os.path.join(datastore_path, kwargs.get("datastore_config", "datastore_v2.json")))
        self._root = os.path.realpath(datastore_path)
        super().__init__(datastore_path, **kwargs)

    # ---- the datastore file ----

    @staticmethod
    def _recover_damaged_file(config: str):
        """A damaged datastore file (a kill mid-write of an older version) is kept aside; the folder is rescanned."""
        if not os.path.exists(config):
            return
        try:
            with open(config) as f:
                LocalDatastoreModel.model_validate_json(f.read())
            return
        except Exception as e:  # empty, truncated, not JSON, wrong schema
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        aside = f"{config}.damaged-{_stamp()}"
        os.replace(config, aside)
        logger.error(f"datastore file {config} is damaged ({reason}); kept as {aside}; rebuilding the datastore "
                     "from the folder (image and label info not in the files, such as pixel sizes, is lost)")

    def _update_datastore_file(self, lock=True):
        def write():
            self._ignore_event_config = True
            atomic_json(self._datastore.model_dump(exclude={"base_path"}), self._datastore_config_path, indent=2,
                        default=str)
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()

    # ---- paths ----

    def _inside(self, path: str) -> str:
        real = os.path.realpath(path)
        if real != self._root and not real.startswith(self._root + os.sep):
            raise HTTPException(status_code=400, detail="the request resolves outside the datastore")
        return real

    def _image_file(self, image_id: str, ext: str) -> str:
        return self._inside(os.path.join(self._datastore.image_path(), check_image_id(image_id) + ext))

    def _label_file(self, image_id: str, tag: str, ext: str) -> str:
        return self._inside(os.path.join(self._datastore.label_path(check_tag(tag)), check_image_id(image_id) + ext))

    def _history_dir(self, image_id: str, tag: str = FINAL) -> str:
        return self._inside(os.path.join(self._datastore.label_path(check_tag(tag)), HISTORY_DIR,
                                         check_image_id(image_id)))

    def _object(self, image_id: str) -> ImageLabelModel:
        obj = self._datastore.objects.get(check_image_id(image_id))
        if not obj:
            raise HTTPException(status_code=404, detail=f"image '{image_id}' is not in the datastore")
        return obj

    # ---- reads: an invalid id or tag is simply not there ----

    def get_image_uri(self, image_id: str) -> str:
        return super().get_image_uri(image_id) if is_valid_id(image_id) else ""

    def get_image_info(self, image_id: str) -> Dict[str, Any]:
        return super().get_image_info(image_id) if is_valid_id(image_id) else {}

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        return super().get_label_uri(label_id, label_tag) if is_valid_id(label_id) and is_valid_tag(label_tag) else ""

    def get_label_info(self, label_id: str, label_tag: str) -> Dict[str, Any]:
        ok = is_valid_id(label_id) and is_valid_tag(label_tag)
        return super().get_label_info(label_id, label_tag) if ok else {}

    # ---- images ----

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any], force: bool = False) -> str:
        image_info = dict(image_info or {})
        force = flag(image_info.pop("force", force))
        auto_id, ext = self._to_id(os.path.basename(image_filename))
        image_id = check_image_id(image_id or auto_id)
        allowed = [e.replace("*", "") for e in self._extensions]
        if ext.lower() not in allowed:
            raise HTTPException(status_code=422, detail=f"image type {ext!r} not accepted: use {', '.join(allowed)}")
        if image_id.startswith(SYNTHETIC_PREFIX) or any(k in image_info for k in PROVENANCE_KEYS):
            if not is_pipeline_synthetic(image_id, image_info):
                raise HTTPException(status_code=422, detail=f"ids starting with {SYNTHETIC_PREFIX!r} and the keys "
                                                            f"{PROVENANCE_KEYS} belong to the synthesis pipeline")
        dest = self._image_file(image_id, ext)
        with FileLock(self._lock_file):
            old = self._datastore.objects.get(image_id)
            if old is not None:
                if not force:
                    raise HTTPException(status_code=409, detail=f"image '{image_id}' exists; add force=true to "
                                                                "replace it")
                if old.labels.get(FINAL):
                    raise HTTPException(status_code=409, detail=f"image '{image_id}' has a final label: delete the "
                                                                "image first (DELETE /datastore/image, force=true)")
            with atomic_path(dest) as tmp:
                shutil.copyfile(image_filename, tmp)
            if old is not None and old.image.ext != ext:
                remove_file(self._image_file(image_id, old.image.ext))
            image_info.update({"ts": int(time.time()), "name": image_id + ext})
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=image_info, ext=ext))
            self._update_datastore_file(lock=False)
        logger.info(f"added image {image_id} ({image_id + ext})")
        return image_id

    def remove_image(self, image_id: str, force: bool = False) -> None:
        obj = self._object(image_id)
        if obj.labels.get(FINAL) and not force and not is_pipeline_synthetic(image_id, obj.image.info):
            raise HTTPException(status_code=409, detail=f"image '{image_id}' has a final label; deleting it needs "
                                                        "force=true (the label is kept in its history)")
        for tag in list(obj.labels):
            self.remove_label(image_id, tag, force=True)
        remove_file(self._image_file(image_id, obj.image.ext))
        logger.info(f"removed image {image_id}")
        if not self._auto_reload:
            self.refresh()

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        obj = self._object(image_id)
        refuse_provenance_keys(info)
        obj.image.info.update(info)
        self._update_datastore_file()

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        check_tag(label_tag)
        obj = self._object(label_id)
        if not obj.labels.get(label_tag):
            raise HTTPException(status_code=404, detail=f"image '{label_id}' has no '{label_tag}' label")
        refuse_provenance_keys(info)
        obj.labels[label_tag].info.update(info)
        self._update_datastore_file()

    # ---- labels ----

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any],
                   force: bool = False) -> str:
        label_info = dict(label_info or {})
        force = flag(label_info.pop("force", force))
        label_tag = check_tag(label_tag or FINAL)
        obj = self._object(image_id)
        if not is_pipeline_synthetic(image_id, obj.image.info):
            for k in PROVENANCE_KEYS:
                label_info.pop(k, None)
        ext = label_suffix(label_filename)
        validate_label(label_filename, self._image_file(image_id, obj.image.ext))
        dest = self._label_file(image_id, label_tag, ext)
        with FileLock(self._lock_file):
            old = obj.labels.get(label_tag)
            if old is not None and label_tag == FINAL:
                if not force:
                    raise HTTPException(status_code=409, detail=f"image '{image_id}' has a final label; replacing "
                                                                "it needs force=true (the current one is kept in its "
                                                                "history)")
                self._to_history(image_id, label_tag, old.ext)
            elif old is not None and old.ext != ext:
                remove_file(self._label_file(image_id, label_tag, old.ext))
            with atomic_path(dest) as tmp:
                shutil.copyfile(label_filename, tmp)
            label_info.update({"ts": int(time.time()), "name": image_id + ext})
            obj.labels[label_tag] = DataModel(info=label_info, ext=ext)
            self._update_datastore_file(lock=False)
        logger.info(f"saved label {label_tag} of {image_id}{' (forced; previous kept in history)' if old else ''}")
        return image_id

    def remove_label(self, label_id: str, label_tag: str, force: bool = False) -> None:
        check_tag(label_tag)
        obj = self._object(label_id)
        label = obj.labels.get(label_tag)
        if not label:
            raise HTTPException(status_code=404, detail=f"image '{label_id}' has no '{label_tag}' label")
        if label_tag == FINAL and is_pipeline_synthetic(label_id, obj.image.info):
            remove_file(self._label_file(label_id, label_tag, label.ext))  # purge: no history for generated pairs
        elif label_tag == FINAL:
            if not force:
                raise HTTPException(status_code=409, detail=f"deleting the final label of '{label_id}' needs "
                                                            "force=true (it is then kept in its history)")
            self._to_history(label_id, label_tag, label.ext)
        else:
            remove_file(self._label_file(label_id, label_tag, label.ext))
        logger.info(f"removed label {label_tag} of {label_id}")
        if not self._auto_reload:
            self.refresh()

    # ---- label history ----

    def _to_history(self, image_id: str, tag: str, ext: str) -> Optional[str]:
        """Move the current label file into the history (the caller writes the new one, or none)."""
        src = self._label_file(image_id, tag, ext)
        if not os.path.isfile(src):
            return None
        folder = self._history_dir(image_id, tag)
        os.makedirs(folder, exist_ok=True)
        dst = os.path.join(folder, _stamp() + ext)
        os.replace(src, dst)
        logger.info(f"kept the previous {tag} label of {image_id} as {dst}")
        return os.path.basename(dst)

    def label_history(self, image_id: str, tag: str = FINAL) -> List[Dict[str, Any]]:
        """Earlier versions of a label, oldest first: ``{version, path, size}``."""
        folder = self._history_dir(image_id, tag)
        if not os.path.isdir(folder):
            return []
        return [{"version": v, "path": os.path.join(folder, v), "size": os.path.getsize(os.path.join(folder, v))}
                for v in sorted(os.listdir(folder)) if VERSION_PATTERN.fullmatch(v)]

    def restore_label(self, image_id: str, version: str, tag: str = FINAL) -> str:
        """Make a history version the current label again; the current one (if any) goes to the history."""
        obj = self._object(image_id)
        if not isinstance(version, str) or not VERSION_PATTERN.fullmatch(version):
            raise HTTPException(status_code=400, detail=f"invalid version {str(version)[:100]!r}")
        src = self._inside(os.path.join(self._history_dir(image_id, tag), version))
        if not os.path.isfile(src):
            raise HTTPException(status_code=404, detail=f"no version {version} of the {tag} label of '{image_id}'")
        ext = label_suffix(version)
        with FileLock(self._lock_file):
            old = obj.labels.get(tag)
            if old is not None:
                self._to_history(image_id, tag, old.ext)
            os.replace(src, self._label_file(image_id, tag, ext))
            obj.labels[tag] = DataModel(info={"ts": int(time.time()), "name": image_id + ext,
                                              "restored_from": version}, ext=ext)
            self._update_datastore_file(lock=False)
        logger.info(f"restored the {tag} label of {image_id} from {version}")
        return image_id


# ---- routes that carry `force`, and the history routes ----

def install_routes(datastore_of) -> bool:
    """Put the datastore routes that read ``force`` (and the history routes) in front of MONAI Label's own.

    Only inside a running server (``monailabel.app`` imported); ``datastore_of()`` gives the app's datastore.
    Returns whether the routes were installed.
    """
    import sys

    server = sys.modules.get("monailabel.app")
    if server is None or getattr(server.app.state, "fetal_head_routes", False):
        return False
    from fastapi import APIRouter, BackgroundTasks, Depends, File, Form, UploadFile
    from monailabel.config import settings
    from monailabel.endpoints import datastore as endpoints
    from monailabel.endpoints.user.auth import RBAC, User

    admin, annotator, user_role = (settings.MONAI_LABEL_AUTH_ROLE_ADMIN, settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR,
                                   settings.MONAI_LABEL_AUTH_ROLE_USER)
    router = APIRouter(prefix="/datastore", tags=["Datastore"])

    def params_json(params: str) -> Dict[str, Any]:
        try:
            p = json.loads(params) if params else {}
        except ValueError as e:
            raise HTTPException(status_code=422, detail=f"params is not valid JSON: {e}") from e
        if not isinstance(p, dict):
            raise HTTPException(status_code=422, detail="params must be a JSON object")
        return p

    @router.put("/image", summary="Upload new Image (force=true replaces an existing one)")
    async def put_image(background_tasks: BackgroundTasks, image: Optional[str] = None, params: str = Form("{}"),
                        file: UploadFile = File(...), force: bool = False,
                        user: User = Depends(RBAC(annotator))):
        p = params_json(params)
        refuse_provenance_keys(p)
        name = image or os.path.basename(file.filename or "")
        if name.startswith(SYNTHETIC_PREFIX):
            raise HTTPException(status_code=422, detail=f"ids starting with {SYNTHETIC_PREFIX!r} belong to the "
                                                        "synthesis pipeline")
        if image is not None:
            check_image_id(image)
        p["force"] = force or flag(p.get("force", False))
        return endpoints.add_image(background_tasks, image, json.dumps(p), file, user.username)

    @router.delete("/image", summary="Remove Image and its labels (force=true if it has a final label)")
    async def delete_image(id: str, force: bool = False, user: User = Depends(RBAC(admin))):
        datastore_of().remove_image(id, force=force)
        return {}

    @router.put("/label", summary="Save Label (force=true replaces a final label; the old one goes to history)")
    async def put_label(background_tasks: BackgroundTasks, image: str, params: str = Form("{}"),
                        tag: str = FINAL, label: UploadFile = File(...), force: bool = False,
                        user: User = Depends(RBAC(annotator))):
        check_image_id(image)
        check_tag(tag or FINAL)
        p = params_json(params)
        p["force"] = force or flag(p.get("force", False))
        return endpoints.save_label(background_tasks, image, json.dumps(p), tag, label, user.username)

    @router.delete("/label", summary="Remove Label (force=true for a final label; it goes to history)")
    async def delete_label(id: str, tag: str, force: bool = False, user: User = Depends(RBAC(admin))):
        datastore_of().remove_label(id, tag, force=force)
        return {}

    @router.put("/image/info", summary="Update Image Info (not the synthesis pipeline's keys)")
    async def put_image_info(image: str, info: str = Form("{}"), user: User = Depends(RBAC(annotator))):
        i = params_json(info)
        i["user"] = user.username
        return datastore_of().update_image_info(image, i)

    @router.get("/label/history", summary="Earlier versions of a label")
    async def label_history(label: str, tag: str = FINAL, user: User = Depends(RBAC(user_role))):
        ds = datastore_of()
        if not hasattr(ds, "label_history"):
            raise HTTPException(status_code=404, detail="this datastore keeps no label history")
        return [{k: v for k, v in h.items() if k != "path"} for h in ds.label_history(label, tag)]

    @router.post("/label/restore", summary="Make an earlier version of a label the current one")
    async def restore_label(label: str, version: str, tag: str = FINAL, user: User = Depends(RBAC(admin))):
        ds = datastore_of()
        if not hasattr(ds, "restore_label"):
            raise HTTPException(status_code=404, detail="this datastore keeps no label history")
        return {"image": ds.restore_label(label, version, tag), "tag": tag, "restored": version}

    prefix = settings.MONAI_LABEL_API_STR
    for route in router.routes:
        for method in route.methods:
            _replace_route(server.app, prefix + route.path, method, route.endpoint, route.summary)
    server.app.state.fetal_head_routes = True
    logger.info(f"installed {len(router.routes)} datastore routes (force flags, label history)")
    return True


def _replace_route(fastapi_app, path: str, method: str, endpoint, summary: str):
    """Our route at the place of MONAI Label's route of the same path and method, or first."""
    from fastapi.routing import APIRoute

    routes = fastapi_app.router.routes
    old = [i for i, r in enumerate(routes) if isinstance(r, APIRoute) and r.path == path and method in r.methods]
    fastapi_app.router.add_api_route(path, endpoint, methods=[method], summary=summary, tags=["Datastore"])
    new = routes.pop()
    if old:
        routes[old[0]] = new
        for i in reversed(old[1:]):
            del routes[i]
    else:  # FastAPI >= 0.1xx keeps included routers as one wrapper route each: go in front of them
        routes.insert(0, new)
    fastapi_app.openapi_schema = None
