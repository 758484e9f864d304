"""SDS-CLIP (Chapter 9, Part A, Eq. 9.4): distil a text-to-image model's denoising score into CLIP.

    L = L_CLIP(image, caption) + lam * L_SDS,   L_SDS = ||eps_theta(z_t, t, c) - eps||^2
    z = h_w(f_phi(x)),  c = the *teacher's* own text encoding of the caption

f_phi(x) is the student CLIP's (projected) image embedding, h_w a linear map from it to the
teacher's latent shape (zero-initialised), eps_theta the frozen teacher UNet. Only the student's
LayerNorms (both towers, collected by type) and h_w train (§9.1.3). The gradient of L_SDS reaches
the image tower through z; the text tower learns from L_CLIP alone.

    student = SdsClip(clip_model, pipe.latent_shape)
    losses = finetune(student, tokenize, pipe, batches, lam=1.0, steps=150, seed=0)
"""
import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .conditioning import frozen, sds_loss
from .errors import BadParameter
from .models.clip_students import features
from .zoo.clip import infonce


def layer_norms(model: nn.Module) -> list:
    """Parameters of every ``nn.LayerNorm`` (by type: HF spells one ``pre_layrnorm``)."""
    return [p for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()]


class SdsClip(nn.Module):
    """A copy of a CLIPModel (the student; the original is left alone) plus h_w: embedding -> latent.

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
             lr_h: float = 1e-3, seed: int = 0, pixel_values=lambda x: x * 2 - 1, progress: bool = True) -> list:
    """Fine-tune the student's LayerNorms and h_w on L_CLIP + lam L_SDS (lam = 0: L_CLIP alone).

    batches(rng) -> (images (B, 3, H, W) in [0, 1], captions): the fine-tuning stream (seeded by
    ``seed``); tokenize(captions) -> the student's input ids (B, T). teacher: a
    ``models.diffusion.Text2Image`` whose UNet stays frozen. Returns the per-step losses
    [(L_CLIP, L_SDS)].
    """
    from tqdm.auto import tqdm
    if lam < 0:
        raise BadParameter(f"lam must be >= 0, got {lam}")
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    tower = [p for p in student.clip.parameters() if p.requires_grad]  # LayerNorms (+ also_train)
    opt = torch.optim.AdamW([{"params": tower, "lr": lr_ln}, {"params": student.h_w.parameters(), "lr": lr_h}],
                            weight_decay=0.0)
    teacher.unet.eval()
    device = next(student.parameters()).device
    out = []
    with frozen(teacher.unet):
        for _ in tqdm(range(steps), desc=f"SDS-CLIP (lam={lam})", disable=not progress, leave=False):
            student.train()
            images, captions = batches(rng)
            ids = tokenize(captions).to(device)
            img = features(student.clip.get_image_features(pixel_values=pixel_values(images.to(device))))
            txt = features(student.clip.get_text_features(input_ids=ids))
            logits = student.clip.logit_scale.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
            l_clip = infonce(logits, captions)
            l_sds = torch.zeros(())
            if lam > 0:
                with torch.no_grad():
                    cond = teacher.encode(captions)
                l_sds = sds_loss(teacher, student.latent(img), cond, gen)
            loss = l_clip + lam * l_sds
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append((float(l_clip.detach()), float(l_sds.detach())))
    student.eval()
    return out
