"""SDS-CLIP (Chapter 9, Part A, Eq. 9.4): distil a text-to-image model's denoising score into CLIP.

    L = L_CLIP(image, caption) + lam * L_SDS,   L_SDS = ||eps_theta(z_t, t, c) - eps||^2
    z = h_w(f_phi(x)),  c = the *teacher's* own text encoding of the caption

f_phi(x) is the student CLIP's (projected) image embedding, h_w a linear map from it to the
teacher's latent shape (zero-initialised), eps_theta the frozen teacher UNet. Only the student's
LayerNorms (both towers, collected by type) and h_w train (§9.1.3). The gradient of L_SDS reaches
the image tower through z; the text tower learns from L_CLIP alone.

The ablation of §11.8.2 (Eq. 11.19) regresses h_w(f_phi(x)) onto frozen UNet features of the real
image instead, I(x, c) = eps_theta(v_alpha(x), t, c), so nothing back-propagates through the UNet:

    L = L_CLIP + lam * ||h_w(f_phi(x)) - I(x, c)||^2          (objective="features")

    student = SdsClip(clip_model, pipe.latent_shape)
    losses = finetune(student, tokenize, pipe, batches, lam=1.0, steps=150, seed=0)
    student = SdsClip(clip_model, feature_shape(pipe))        # Eq. 11.19's h_w maps to I's shape
    losses = finetune(student, tokenize, pipe, batches, lam=1.0, objective="features")
"""
import copy
from contextlib import ExitStack

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .conditioning import float32_modules, frozen, sds_loss, sds_loss_and_grad
from .errors import BadParameter, check_choice
from .hooks import trace
from .models.clip_students import features, resize_crop
from .zoo.clip import infonce


def layer_norms(model: nn.Module) -> list:
    """Parameters of every ``nn.LayerNorm`` (by type: HF spells one ``pre_layrnorm``)."""
    return [p for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()]


def train_keeping_batch_norms(model: nn.Module) -> nn.Module:
    """``model.train()`` with every BatchNorm left in eval mode: RN50's frozen trunk (open_clip's ModifiedResNet)
    keeps normalising with its pre-trained running statistics, which a training-mode forward would overwrite."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


OBJECTIVES = ("sds", "features")


@torch.no_grad()
def unet_features(pipe, images: torch.Tensor, cond: torch.Tensor, t: int = 200, layer: str | None = None) -> torch.Tensor:
    """I(x, c) of Eq. 11.19: the frozen UNet run on the clean latent v_alpha(x) of images (N, 3, H, W) in
    [0, 1] at timestep ``t`` under cond (N, T, d). ``layer`` None: the UNet's output, as the equation
    writes it; a module path (e.g. "mid_block"): that module's output instead. Images are resized to
    the teacher's side first (a CLIP student's 224 px batch would give SD v1 a latent its UNet cannot
    halve three times). Returns (N, ...) in float32."""
    side = pipe.image_size
    if images.shape[-1] != side or images.shape[-2] != side:
        images = resize_crop(images.float(), side).clamp(0, 1)
    z = pipe.encode_images(images.to(pipe.device))
    steps = torch.full((len(z),), t, device=z.device, dtype=torch.long)
    if layer is None:
        return pipe.denoise(z, steps, cond.to(z)).float()
    with trace(pipe.unet, layer) as seen:
        pipe.denoise(z, steps, cond.to(z))
    return seen[layer].float()


def feature_shape(pipe, t: int = 200, layer: str | None = None) -> tuple:
    """Shape of one image's ``unet_features`` (what h_w maps to under objective="features")."""
    image = torch.zeros(1, 3, pipe.image_size, pipe.image_size)
    with torch.no_grad():
        return tuple(unet_features(pipe, image, pipe.encode([""]), t, layer).shape[1:])


class SdsClip(nn.Module):
    """A copy of a CLIPModel (the student; the original is left alone) plus h_w: embedding -> latent
    (or, for Eq. 11.19, embedding -> ``feature_shape``).

    ``also_train``: paths of submodules of ``clip`` trained beside the LayerNorms (a ResNet image
    tower has none; ``models.clip_students.STUDENTS[name].also_train`` says which).
    """

    def __init__(self, clip: nn.Module, latent_shape: tuple, also_train: tuple = ()):
        super().__init__()
        self.clip = copy.deepcopy(clip)
        self.latent_shape = tuple(latent_shape)
        self.h_w = nn.Linear(self.clip.config.projection_dim, int(np.prod(latent_shape)))
        nn.init.zeros_(self.h_w.weight)
        nn.init.zeros_(self.h_w.bias)
        for p in self.clip.parameters():
            p.requires_grad_(False)
        for p in layer_norms(self.clip):
            p.requires_grad_(True)
        for path in also_train:
            self.clip.get_submodule(path).requires_grad_(True)

    def trainable(self) -> list:
        return [p for p in self.parameters() if p.requires_grad]

    def latent(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(N, projection_dim) -> (N, *latent_shape)."""
        return self.h_w(image_embeds).view(len(image_embeds), *self.latent_shape)


def finetune(student: SdsClip, tokenize, teacher, batches, lam: float, steps: int = 150, lr_ln: float = 5e-4,
             lr_h: float = 1e-3, seed: int = 0, pixel_values=lambda x: x * 2 - 1, progress: bool = True,
             objective: str = "sds", feature_t: int = 200, feature_layer: str | None = None,
             sds_chunk: int | None = None) -> list:
    """Fine-tune the student's LayerNorms and h_w on L_CLIP + lam L_SDS (lam = 0: L_CLIP alone), or with
    objective="features" on Eq. 11.19's L_CLIP + lam ||h_w(f_phi(x)) - I(x, c)||^2, I = ``unet_features``
    at ``feature_t`` / ``feature_layer`` (the student's h_w must map to ``feature_shape``).

    batches(rng) -> (images (B, 3, H, W) in [0, 1], captions): the fine-tuning stream (seeded by
    ``seed``); tokenize(captions) -> the student's input ids (B, T). LayerNorms (and ``also_train``) learn
    at ``lr_ln``, h_w at ``lr_h`` (the tiny spec's 5e-4 / 1e-3; §11.8.5 gives one rate, 5e-5). teacher: a
    ``models.diffusion.Text2Image`` whose UNet stays frozen. Returns the per-step losses
    [(L_CLIP, L_SDS or the feature loss)].

    The student trains in train mode except its BatchNorms (``train_keeping_batch_norms``). With L_SDS
    (lam > 0, objective "sds") a half-precision teacher UNet (SD in fp16) is held in float32 for the whole
    fine-tune (``conditioning.float32_modules``; its weights come back bit for bit): the SDS gradient
    (lam 2 / numel, ~4e-9 at lam 1e-3) would underflow to zero in fp16. The feature objective never
    back-propagates through the UNet and runs it in its own dtype. sds_chunk: back-propagate L_SDS through
    the UNet that many rows at a time (``conditioning.sds_loss_and_grad``; same draws, same gradient up to
    rounding): SD-v1 in float32 needs about 2 GB per row for it, so batch 32 in one piece is over 70 GB.
    """
    from tqdm.auto import tqdm
    if lam < 0:
        raise BadParameter(f"lam must be >= 0, got {lam}")
    check_choice("objective", objective, OBJECTIVES)
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    tower = [p for p in student.clip.parameters() if p.requires_grad]  # LayerNorms (+ also_train)
    opt = torch.optim.AdamW([{"params": tower, "lr": lr_ln}, {"params": student.h_w.parameters(), "lr": lr_h}],
                            weight_decay=0.0)
    teacher.unet.eval()
    device = next(student.parameters()).device
    out = []
    with ExitStack() as stack:
        stack.enter_context(frozen(teacher.unet))
        if lam > 0 and objective == "sds":
            stack.enter_context(float32_modules(teacher.unet))
        for _ in tqdm(range(steps), desc=f"{'SDS-CLIP' if objective == 'sds' else 'UNet features'} (lam={lam})",
                      disable=not progress, leave=False):
            train_keeping_batch_norms(student)
            images, captions = batches(rng)
            ids = tokenize(captions).to(device)
            img = features(student.clip.get_image_features(pixel_values=pixel_values(images.to(device))))
            txt = features(student.clip.get_text_features(input_ids=ids))
            logits = student.clip.logit_scale.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
            l_clip = infonce(logits, captions)
            l_sds, z_grad = torch.zeros(()), None
            if lam > 0:
                with torch.no_grad():
                    cond = teacher.encode(captions)
                if objective == "sds" and sds_chunk and sds_chunk < len(img):
                    z = student.latent(img)
                    l_sds, z_grad = sds_loss_and_grad(teacher, z, cond, gen, sds_chunk)
                elif objective == "sds":
                    l_sds = sds_loss(teacher, student.latent(img), cond, gen)
                else:
                    target = unet_features(teacher, images, cond, feature_t, feature_layer).to(img)
                    l_sds = F.mse_loss(student.latent(img), target)
            opt.zero_grad()
            if z_grad is None:
                (l_clip + lam * l_sds).backward()
            else:   # L_SDS's gradient enters at z, the student's output, beside L_CLIP's
                torch.autograd.backward([l_clip, z], [None, lam * z_grad.to(z)])
            opt.step()
            out.append((float(l_clip.detach()), float(l_sds.detach())))
    student.eval()
    return out
