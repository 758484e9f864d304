"""Fine-tuning baselines that erase a concept from a text-to-image UNet (Chapter 5, Fig 5.4b).

Both train only the cross-attention key and value projections (``attn2.to_k``, ``attn2.to_v``),
the parameter group of ESD-x and of Concept-Ablation's default, against a frozen copy of the UNet:

    ESD-x (Gandikota et al. 2023):  eps(x_t, c) -> eps*(x_t, "") - eta (eps*(x_t, c) - eps*(x_t, ""))
    Concept-Ablation, model-based (Kumari et al. 2023):  eps(x_t, c) -> eps*(x_t, c_anchor)

where eps* is the frozen UNet (its own parameterisation: for a v-prediction UNet the same linear
targets in v), and x_t noises images the model itself generated (of the concept for
ESD, of the anchor for Concept-Ablation). ``erase`` returns the trained weights as a reversible
``Erasure`` with its wall time, so it can be compared with a closed-form edit's.
"""
import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import anatomy, hooks
from .errors import BadParameter, check_choice


@dataclass
class Erasure:
    """New weights of the cross-attention K/V projections; ``apply`` / ``revert`` swap them in and out."""
    weights: dict
    wall_time_s: float
    losses: list

    def apply(self, unet):
        saved = {p: hooks.get_module(unet, p).weight.detach().clone() for p in self.weights}
        with torch.no_grad():
            for p, w in self.weights.items():
                hooks.get_module(unet, p).weight.copy_(w)
        return saved

    @staticmethod
    def revert(unet, saved):
        with torch.no_grad():
            for p, w in saved.items():
                hooks.get_module(unet, p).weight.copy_(w)


def kv_paths(unet) -> list:
    """Module paths of every cross-attention's to_k and to_v."""
    return [anatomy.resolve(unet, f"xattn[{i}].{p}").path for i in range(anatomy.n_xattn(unet)) for p in ("to_k", "to_v")]


# the releases' settings on one GPU (spec §2.8): ESD-x 1000 iterations at lr 1e-5 (one image each); Concept-Ablation
# 100 steps at batch 4 on 2 GPUs, i.e. 200 on one, at its scaled lr 2e-6 x batch 4, on 200 anchor images
RELEASE = {"esd_x": dict(steps=1000, lr=1e-5, batch_size=1),
           "concept_ablation": dict(steps=200, lr=8e-6, batch_size=4, n_images=200)}


def erase(pipe, method: str, concept: str, anchor: str = "", steps: int = 100, lr: float = 1e-3,
          batch_size: int = 8, eta: float = 1.0, n_images: int = 16, seed: int = 0) -> Erasure:
    """Fine-tune a copy of ``pipe.unet``'s cross-attention K/V to forget ``concept``; the pipe is unchanged.

    method: "esd_x" or "concept_ablation" (needs ``anchor``, e.g. "a painting of a red star").
    The defaults suit the tiny UNet; ``**RELEASE[method]`` gives the releases' settings. The copy trains in
    float32 whatever the pipe's dtype (Adam's state underflows in fp16); ``apply`` casts the weights back.
    The wall time covers generating the training images and the optimisation.
    """
    check_choice("method", method, ("esd_x", "concept_ablation"))
    if method == "concept_ablation" and not anchor:
        raise BadParameter("concept_ablation needs an anchor prompt (e.g. 'painting' for a style)")
    start = time.perf_counter()
    source = concept if method == "esd_x" else anchor
    gen = torch.Generator().manual_seed(seed)
    images = pipe.generate([source] * n_images, seed=seed)
    x0 = pipe.encode_images(images).float()
    c, u, a = (pipe.encode([p]).float() if p is not None else None for p in (concept, "", anchor or None))
    frozen = pipe.unet
    dtype = next(frozen.parameters()).dtype
    student = copy.deepcopy(frozen).float().train()
    paths = kv_paths(student)
    params = [hooks.get_module(student, p).weight for p in paths]
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    scheduler = pipe.training_scheduler()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x0), (batch_size,), generator=gen)
        noise = torch.randn(x0[idx].shape, generator=gen).to(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=gen).to(x0.device)
        xt = scheduler.add_noise(x0[idx], noise, t)
        with torch.no_grad():
            if method == "esd_x":  # both frozen branches in one pass, [uncond, cond] as in CFG
                e_u, e_c = frozen(torch.cat([xt, xt]).to(dtype), torch.cat([t, t]), encoder_hidden_states=torch.cat(
                    [u.expand(batch_size, -1, -1), c.expand(batch_size, -1, -1)]).to(dtype)).sample.float().chunk(2)
                target = e_u - eta * (e_c - e_u)
            else:
                target = frozen(xt.to(dtype), t, encoder_hidden_states=a.expand(batch_size, -1, -1).to(dtype)).sample.float()
        loss = F.mse_loss(student(xt, t, encoder_hidden_states=c.expand(batch_size, -1, -1)).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    weights = {p: hooks.get_module(student, p).weight.detach().clone() for p in paths}
    return Erasure(weights, time.perf_counter() - start, losses)
