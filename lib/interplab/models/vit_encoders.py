"""The image encoders of Chapter 7's paper profile (RepDecompose): hub names as facts, one loader.

    build(name, pretrained=False)   the architecture (random weights: tests, timing)
    load(name, device)              pretrained weights from the hub; offline: a clear error
    ENCODERS, ALIGN_TARGET          the analysed models and the COMPALIGN target (spec ch07 section 4)

timm models decompose as they are; open_clip models are returned whole (``encode_image`` is the
representation), so ``interplab.decomposition.decompose`` reads ``model.visual``.
"""
from dataclasses import dataclass

import torch.nn as nn

from ..errors import check_choice, resource_unavailable


@dataclass(frozen=True)
class Encoder:
    library: str     # "timm" or "open_clip"
    model: str       # timm architecture / open_clip model name
    tag: str         # timm pretrained tag / open_clip pretrained tag
    head: str        # what classifies ImageNet in Fig. 7.2


ENCODERS = {
    "deit": Encoder("timm", "deit_base_patch16_224", "fb_in1k", "own ImageNet head"),
    "dino": Encoder("timm", "vit_base_patch16_224", "dino", "linear head trained on ImageNet train"),
    "dinov2": Encoder("timm", "vit_base_patch14_dinov2", "lvd142m", "linear head trained on ImageNet train"),
    "swin": Encoder("timm", "swin_base_patch4_window7_224", "ms_in22k_ft_in1k", "own ImageNet head"),
    "maxvit": Encoder("timm", "maxvit_small_tf_224", "in1k", "own ImageNet head"),
    "clip": Encoder("open_clip", "ViT-B-16", "laion2b_s34b_b88k", "zero-shot (class names x templates)"),
}
ALIGN_TARGET = Encoder("open_clip", "ViT-L-14", "laion2b_s32b_b82k", "COMPALIGN target and text encoder")


def _spec(name: str) -> Encoder:
    if name == "align_target":
        return ALIGN_TARGET
    check_choice("encoder", name, tuple(ENCODERS) + ("align_target",))
    return ENCODERS[name]


def build(name: str, pretrained: bool = False, **kw) -> nn.Module:
    """Encoder ``name`` (a key of ENCODERS or "align_target") in eval mode; random weights unless
    ``pretrained``. ``kw`` reaches timm.create_model (e.g. img_size=98 for a fast test)."""
    e = _spec(name)
    if e.library == "open_clip":
        import open_clip
        return open_clip.create_model(e.model, pretrained=e.tag if pretrained else None, **kw).eval()
    import timm
    return timm.create_model(f"{e.model}.{e.tag}", pretrained=pretrained, **kw).eval()


def load(name: str, device="cpu", **kw) -> nn.Module:
    """Pretrained encoder ``name`` from the hub (timm: Hugging Face; open_clip: its own tags); ``kw``
    as for ``build`` (DINOv2 at img_size=224: timm interpolates its 37 x 37 position embeddings)."""
    e = _spec(name)
    try:
        return build(name, pretrained=True, **kw).to(device)
    except Exception as err:  # hub offline / no network: every library words it differently
        raise resource_unavailable(f"encoder {name!r} ({type(err).__name__})",
                                   f"run on a machine with hub access to fetch {e.library} {e.model} "
                                   f"'{e.tag}'") from None
