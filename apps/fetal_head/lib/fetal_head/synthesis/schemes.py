"""Generator schemes: one class per way of generating an image-mask pair, as diffusers has one pipeline per
method. A scheme is the only place that knows how the clean sample x0 is built from a real pair, what the UNet
sees besides the noisy sample, and how a denoised sample splits back into an image and a mask.

- :class:`MaskConditioned` (``"mask_conditioned"``, the default): the UNet denoises the image only and sees the
  mask as a second input channel (in_channels=2, out_channels=1). Masks come from the head shape model. The mask
  channel of an *unconditional* sample (an unlabelled image, or a labelled one whose condition was dropped, as
  classifier-free guidance trains) is the null condition, all zeros: real masks are in {-1, 1}, so zero is a value
  no real condition takes. The same UNet then predicts both the conditional and the unconditional noise, and
  sampling can use guidance (``eps_u + w (eps_c - eps_u)``).
- :class:`Joint` (``"joint"``, the paper's scheme): one UNet denoises 3 channels (image, image, mask); every
  sample is a pair and the mask is whatever the model draws (it has to pass QC). It has no condition, so it
  cannot learn from unlabelled images.

The scheme's name is what configs and checkpoints store; :func:`scheme_for` returns the object for a name or a
config, so old checkpoints keep loading.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch


class Scheme:
    name: str = ""
    in_channels: int = 0
    out_channels: int = 0
    draws_masks_from_shape_model: bool = False  # sampling needs the checkpoint's shape model
    conditional: bool = False  # has a condition that can be dropped (unlabelled images, guidance)

    def model_input(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The clean sample x0 the diffusion runs on, from a real (image, mask) batch in [-1, 1]."""
        raise NotImplementedError

    def unet_input(self, noisy: torch.Tensor, cond: Optional[torch.Tensor]) -> torch.Tensor:
        """What the UNet sees: the noisy sample, with the condition where the scheme has one."""
        return noisy

    def null_condition(self, like: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"the {self.name} scheme has no condition to drop")

    def split_output(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(image (N, 1, S, S), mask logits (N, 1, S, S) or None when the mask is the condition)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class MaskConditioned(Scheme):
    name = "mask_conditioned"
    in_channels = 2
    out_channels = 1
    draws_masks_from_shape_model = True
    conditional = True

    def model_input(self, image, mask):
        return image

    def unet_input(self, noisy, cond):
        if cond is None:
            raise ValueError("the mask-conditioned scheme needs a mask (or the null condition)")
        return torch.cat([noisy, cond.to(noisy.dtype)], 1)

    def null_condition(self, like):
        return torch.zeros_like(like)

    def split_output(self, x):
        return x[:, :1], None


class Joint(Scheme):
    name = "joint"
    in_channels = 3
    out_channels = 3

    def model_input(self, image, mask):
        return torch.cat([image, image, mask], 1)

    def split_output(self, x):
        # the two image channels averaged; the mask channel as logits around the midpoint of {-1, 1}
        return x[:, :2].mean(1, keepdim=True), x[:, 2:3]


SCHEME_CLASSES: Dict[str, type] = {cls.name: cls for cls in (MaskConditioned, Joint)}
SCHEMES = tuple(SCHEME_CLASSES)
DEFAULT_SCHEME = MaskConditioned.name


def scheme_for(config_or_name) -> Scheme:
    """The scheme object of a config (anything with a ``scheme`` attribute) or of a scheme name."""
    name = config_or_name if isinstance(config_or_name, str) else config_or_name.scheme
    if name not in SCHEME_CLASSES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {name!r}")
    return SCHEME_CLASSES[name]()
