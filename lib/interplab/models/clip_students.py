"""The CLIP students of Chapter 9's paper profile (SDS-CLIP: Table 9.1, Tables 11.5 / 11.6, CoCa of §11.8.10).

    build(name, layers=None)   the architecture with random weights (tests, timing); ``layers`` keeps
                               that many blocks per tower at full width
    load(name, device)         pretrained weights by hub id; offline: ResourceUnavailable with the fix
    tokenizer(name)            the student's tokenizer (OpenAI's BPE, built offline when the hub is absent)
    pixels(images, size)       [0, 1] images (N, 3, S, S) -> CLIP-normalised pixel_values (N, 3, size, size)
    read_image(image, size)    a PIL image or file -> (3, size, size) as the released evaluation transforms
    embed_images / embed_texts unit embeddings of any student (and of the zoo's CLIPModel)

transformers' ``CLIPModel`` serves the four OpenAI ViTs. open_clip models (RN50, the LAION
ViT-B/16s and CoCa, whose contrastive towers are used and whose caption decoder is not) are wrapped by ``OpenClipStudent``, which offers the four things ``distillation.SdsClip``
reads: ``get_image_features``, ``get_text_features``, ``logit_scale``, ``config.projection_dim``.
Architectures are facts from the released configs, so tests build them without the hub.
"""
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import check_choice, resource_unavailable

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Student:
    library: str            # "transformers" or "open_clip"
    model: str              # hub id (transformers) or open_clip architecture
    tag: str = ""           # open_clip pretrained tag
    image_size: int = 224
    also_train: tuple = ()  # submodules trained beside the LayerNorms (RN50's trunk has none)


STUDENTS = {
    "ViT-B/16": Student("transformers", "openai/clip-vit-base-patch16"),
    "ViT-B/32": Student("transformers", "openai/clip-vit-base-patch32"),
    "ViT-L/14": Student("transformers", "openai/clip-vit-large-patch14"),
    "ViT-L/14-336": Student("transformers", "openai/clip-vit-large-patch14-336", image_size=336),
    # the spec's choice for a BatchNorm trunk: text LayerNorms plus the attention pool
    "RN50": Student("open_clip", "RN50", "openai", also_train=("model.visual.attnpool",)),
    "ViT-B/16 LAION-400M": Student("open_clip", "ViT-B-16", "laion400m_e32"),    # Table 11.5
    "ViT-B/16 LAION-2B": Student("open_clip", "ViT-B-16", "laion2b_s34b_b88k"),  # Table 11.6
    # §11.8.10's Open-CoCa "pre-trained on 2B image-text pairs"; the dissertation does not name the size
    "CoCa ViT-B/32 LAION-2B": Student("open_clip", "coca_ViT-B-32", "laion2b_s13b_b90k"),
}

# OpenAI CLIP configs (transformers): vision (width, layers, heads, patch), text (width, layers, heads), projection
_OPENAI = {
    "openai/clip-vit-base-patch16": ((768, 12, 12, 16), (512, 12, 8), 512),
    "openai/clip-vit-base-patch32": ((768, 12, 12, 32), (512, 12, 8), 512),
    "openai/clip-vit-large-patch14": ((1024, 24, 16, 14), (768, 12, 12), 768),
    "openai/clip-vit-large-patch14-336": ((1024, 24, 16, 14), (768, 12, 12), 768),
}


class OpenClipStudent(nn.Module):
    """An open_clip CLIP behind the CLIPModel calls SDS-CLIP makes (input_ids are open_clip tokens)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = SimpleNamespace(projection_dim=int(model.visual.output_dim))

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised pixels -> unnormalised image embeddings (N, projection_dim)."""
        return self.model.encode_image(pixel_values, normalize=False)  # CoCa normalises by default

    def get_text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(N, 77) open_clip token ids -> unnormalised text embeddings (N, projection_dim)."""
        return self.model.encode_text(input_ids, normalize=False)


def _student(name: str) -> Student:
    check_choice("student", name, tuple(STUDENTS))
    return STUDENTS[name]


def _clip_config(model_id: str, layers: int | None):
    from transformers import CLIPConfig
    (vw, vl, vh, patch), (tw, tl, th), proj = _OPENAI[model_id]
    size = 336 if model_id.endswith("-336") else 224
    vision = dict(hidden_size=vw, intermediate_size=4 * vw, num_hidden_layers=layers or vl, num_attention_heads=vh,
                  patch_size=patch, image_size=size, hidden_act="quick_gelu", projection_dim=proj)
    text = dict(vocab_size=49408, hidden_size=tw, intermediate_size=4 * tw, num_hidden_layers=layers or tl,
                num_attention_heads=th, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=proj,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj)


def build(name: str, layers: int | None = None, seed: int = 0) -> nn.Module:
    """Student ``name`` with random weights in eval mode; ``layers`` blocks per tower (None: all)."""
    s = _student(name)
    torch.manual_seed(seed)
    if s.library == "transformers":
        from transformers import CLIPModel
        return CLIPModel(_clip_config(s.model, layers)).eval()
    import open_clip
    from open_clip.coca_model import CoCa
    from open_clip.model import CLIP, CustomTextCLIP
    cfg = dict(open_clip.get_model_config(s.model))
    if layers:  # a ModifiedResNet counts blocks per stage, a ViT blocks
        resnet = isinstance(cfg["vision_cfg"]["layers"], (list, tuple))
        cfg["vision_cfg"] = dict(cfg["vision_cfg"], layers=(1, 1, 1, 1) if resnet else layers)
        for tower in ("text_cfg", "multimodal_cfg"):
            if tower in cfg:
                cfg[tower] = dict(cfg[tower], layers=layers)
    cls = CoCa if "multimodal_cfg" in cfg else CustomTextCLIP if cfg.pop("custom_text", False) else CLIP
    cfg.pop("custom_text", None)
    return OpenClipStudent(cls(**cfg).eval()).eval()


def load(name: str, device="cuda") -> nn.Module:
    """Pretrained student ``name`` in eval mode on ``device``."""
    s = _student(name)
    try:
        if s.library == "transformers":
            from transformers import CLIPModel
            return CLIPModel.from_pretrained(s.model).to(device).eval()
        import open_clip
        return OpenClipStudent(open_clip.create_model(s.model, pretrained=s.tag)).to(device).eval()
    except Exception as err:  # hub offline: every library words it differently
        where = s.model if s.library == "transformers" else f"open_clip {s.model} '{s.tag}'"
        raise resource_unavailable(f"CLIP student {name!r} ({type(err).__name__})",
                                   f"fetch {where} on a machine with hub access and set HF_HOME") from None


def tokenizer(name: str, context_length: int = 77):
    """A callable captions -> input ids (N, context_length) for student ``name``; no hub needed."""
    s = _student(name)
    if s.library == "open_clip":
        import open_clip
        tok = open_clip.get_tokenizer(s.model)
        return lambda captions: tok(list(captions))
    from .diffusion import clip_bpe_tokenizer
    tok = clip_bpe_tokenizer(context_length)  # OpenAI's BPE: the same vocabulary as the hub tokenizer
    return lambda captions: tok(list(captions), padding="max_length", truncation=True, max_length=context_length,
                                return_tensors="pt").input_ids


def resize_crop(images: torch.Tensor, size: int, crop_pct: float = 1.0) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 3, size, size): bicubic, antialiased resize of the short side to ``size / crop_pct``,
    then the centre crop (CLIP's preprocessing geometry at crop_pct 1; timm's crop_pct, e.g. 0.9; differentiable)."""
    h, w = images.shape[-2:]
    short = round(size / crop_pct)
    scale = short / min(h, w)
    if scale != 1:
        images = F.interpolate(images, size=(max(short, round(h * scale)), max(short, round(w * scale))),
                               mode="bicubic", align_corners=False, antialias=True)
    h, w = images.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top:top + size, left:left + size]


def read_image(image, size: int, crop_pct: float = 1.0, interpolation: str = "bicubic") -> torch.Tensor:
    """A PIL image (or its path) -> (3, size, size) in [0, 1], as timm's and open_clip's evaluation
    transforms make it: PIL's bicubic resize of the short side to floor(size / crop_pct) (torchvision's
    ``Resize``), then torchvision's ``CenterCrop`` (torchvision's own classifiers resize bilinearly:
    ``interpolation="bilinear"``). Decoded files take this path; ``resize_crop`` is its differentiable
    tensor twin (torch's bicubic kernel is not PIL's, so the two differ). transformers' CLIPImageProcessor
    floors the crop offset where torchvision rounds it: for some sizes its crop sits 1 px higher or further left."""
    import math

    from PIL import Image
    from torchvision.transforms import functional as TF
    img = Image.open(image) if not isinstance(image, Image.Image) else image
    img = TF.resize(img.convert("RGB"), math.floor(size / crop_pct), interpolation=TF.InterpolationMode(interpolation))
    return TF.to_tensor(TF.center_crop(img, size))


def pixels(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """[0, 1] images (N, 3, H, W) -> (N, 3, size, size): ``resize_crop`` then CLIP's normalisation."""
    images = resize_crop(images, size)
    mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def features(out) -> torch.Tensor:
    """``get_image_features`` / ``get_text_features`` output as a tensor (N, projection_dim)."""
    return out if torch.is_tensor(out) else out.pooler_output  # transformers 4.x / 5.x


@torch.inference_mode()
def embed_images(model: nn.Module, images: torch.Tensor, size: int = 224, batch_size: int = 64) -> torch.Tensor:
    """Unit image embeddings (N, projection_dim) of [0, 1] images (N, 3, H, W)."""
    device = next(model.parameters()).device
    out = [features(model.get_image_features(pixel_values=pixels(images[i:i + batch_size].to(device), size)))
           for i in range(0, len(images), batch_size)]
    return F.normalize(torch.cat(out).float(), dim=-1).cpu()


@torch.inference_mode()
def embed_texts(model: nn.Module, tokenize, captions, batch_size: int = 256) -> torch.Tensor:
    """Unit text embeddings (N, projection_dim) of N captions; ``tokenize`` from ``tokenizer(name)``."""
    device = next(model.parameters()).device
    captions = list(captions)
    out = [features(model.get_text_features(input_ids=tokenize(captions[i:i + batch_size]).to(device)))
           for i in range(0, len(captions), batch_size)]
    return F.normalize(torch.cat(out).float(), dim=-1).cpu()
