"""Acting on a text-to-image model's conditioning: scoring captions with it, reshaping it
(Chapter 9), and feeding a different one to chosen cross-attention layers (Chapter 5, part II).

    diffusion_score(pipe, images, conds)   Eq. 9.1: d(x, c) = E_{t, eps} ||eps_theta(z_t, t, c) - eps||^2,
                                           the same (t, eps) draws for every caption (paired estimator)
    sds_loss(pipe, z, cond, gen)           Eq. 9.3: the same error for a "latent image" z that a student
                                           produced, differentiable in z (the UNet stays frozen)
    fit_conditioning(pipe, conds, latents) that error of real renders minimised over c itself
                                           (c*, §9.2.5) or over a CLP / WiCLP module
    WindowProjection(d, s)                 CLP (s = 0) / WiCLP: c'_i = W^T [c_{i-s}; ...; c_{i+s}] + b,
                                           initialised at the identity
    SWITCH-OFF                             ``pipe.sample(c, switch=(tau, c_late))``: the projected conditioning
                                           at noisy steps (t >= tau) only
    cross_attention_maps(pipe, cond, layer)   what each pixel of a cross-attention layer reads (Fig 9.8)
    composed(pipe, prompts)                Composable Diffusion's AND (Table 9.2's baseline): one conditioning
                                           per conjunct, (N, K, T, d), for ``pipe.sample``
    structured_values / sample_structured  Structured Diffusion (Table 9.2's baseline): keys read the prompt,
                                           values the mean of the prompt and its noun-phrase-aligned encodings

    altered_cross_attention(unet, plan, alt)   LocoGen's altered model (§5.8.1): the cross-attention
                                           layers of ``plan`` read ``alt`` in the conditional rows
    sample_windows(pipe, cond, alt, windows)   Alg. 2's images for one prompt pair, every window in
                                           one sampling loop
    sample_window_pairs(...)               the same for many pairs, several pairs per sampling loop
    neuron_zscores / ablated_neurons       §5.10: rank the outputs of ``to_k`` / ``to_v`` by how
                                           much a concept moves them, and silence the top ones

``pipe`` is any ``models.diffusion.Text2Image`` (the zoo's toy model or Stable Diffusion).
"""
import itertools
from collections.abc import Mapping, Sequence
from contextlib import ExitStack, contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import anatomy, hooks
from .errors import BadParameter


def predicted_noise(sched, out: torch.Tensor, zt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The UNet's output as a noise prediction: itself for epsilon models; for v-prediction
    eps = sqrt(abar_t) v + sqrt(1 - abar_t) z_t; for rectified flow (SD3, velocity eps - x0)
    eps = z_t + (1 - s) v. The dissertation's errors are in eps."""
    if sched.config.prediction_type == "epsilon":
        return out
    if sched.config.prediction_type == "flow":
        return zt + (1 - sched.sigma(t, zt)) * out
    if sched.config.prediction_type != "v_prediction":
        raise BadParameter(f"prediction_type {sched.config.prediction_type!r} is not supported")
    abar = sched.alphas_cumprod.to(zt.device)[t].view(-1, *[1] * (zt.dim() - 1)).to(zt.dtype)
    return abar.sqrt() * out + (1 - abar).sqrt() * zt


def sds_loss(pipe, z: torch.Tensor, cond: torch.Tensor, gen: torch.Generator, added: dict | None = None,
             t: torch.Tensor | None = None, eps: torch.Tensor | None = None) -> torch.Tensor:
    """||eps_theta(z_t, t, c) - eps||^2 averaged over the batch, t ~ U{0..T-1}: z (N, *latent_shape)
    from the student (gradients flow through the frozen UNet into z), cond (N, T, d); ``added``: the
    denoiser's extra inputs of these rows, {name: (N, ...)} (SD-XL, PixArt, SD3); ``t`` (N,) and ``eps``
    (N, *latent_shape) given instead of drawn from ``gen`` (``sds_loss_and_grad``'s chunks).

    Computed in float32: z, cond and ``added`` are cast to float32, and the denoiser must be float32 while
    the loss is built *and* back-propagated. A half-precision one (SD loaded in fp16) is refused: in fp16
    the gradient entering the UNet (2 / numel, times SDS-CLIP's lambda 1e-3: ~4e-9) underflows to zero
    and nothing trains. Hold ``float32_modules(pipe.unet)`` around the forward and the backward (the
    library's loops, ``fit_conditioning``, ``fit_text_encoder`` and ``distillation.finetune``, do, once
    per fit); the weights come back bit for bit after. A float32 pipeline (the tiny profile) runs as is."""
    if not _float32(pipe.unet):
        raise BadParameter(f"{type(pipe).__name__}'s denoiser is not float32: a backward pass through a "
                           "half-precision UNet underflows; build and back-propagate the loss inside "
                           "conditioning.float32_modules(pipe.unet)")
    z = z.float()
    sched = pipe.training_scheduler()
    if t is None:
        t, eps = _sds_draws(sched, z, gen)
    zt = sched.add_noise(z, eps.to(z), t)
    if added is not None:
        added = {k: v.to(z) for k, v in added.items()}
    out = pipe.noise_prediction(pipe.denoise(zt, t, cond.to(z), added))
    return F.mse_loss(predicted_noise(sched, out.to(z), zt, t), eps)


def _sds_draws(sched, z: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """t (N,) ~ U{0..T-1} and eps like z: one place, so that chunked and whole-batch SDS draw alike."""
    t = torch.randint(0, sched.config.num_train_timesteps, (len(z),), generator=gen).to(z.device)
    return t, torch.randn(z.shape, generator=gen).to(z)


def sds_loss_and_grad(pipe, z: torch.Tensor, cond: torch.Tensor, gen: torch.Generator, chunk: int,
                      added: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(``sds_loss``, its gradient with respect to z (N, *latent_shape)) with the UNet back-propagated ``chunk``
    rows at a time, so that one chunk's activations are alive instead of the batch's (SD-v1's UNet in float32
    keeps about 2 GB per 64 x 64 latent for its backward pass: ``benchmarks/mem_sds_clip.py``). The t and eps
    draws are those of one ``sds_loss`` call on the whole batch; the loss and gradient equal its up to rounding."""
    z = z.detach().float()
    t, eps = _sds_draws(pipe.training_scheduler(), z, gen)
    loss, grad = z.new_zeros(()), torch.zeros_like(z)
    for start in range(0, len(z), chunk):
        part = slice(start, start + chunk)
        zc = z[part].clone().requires_grad_(True)
        sub = None if added is None else {k: v[part] for k, v in added.items()}
        term = sds_loss(pipe, zc, cond[part], gen, sub, t=t[part], eps=eps[part]) * (len(zc) / len(z))
        (grad[part],) = torch.autograd.grad(term, zc)
        loss = loss + term.detach()
    return loss, grad


def _float32(module: nn.Module) -> bool:
    """Whether every floating-point parameter of ``module`` is float32."""
    return all(p.dtype == torch.float32 for p in module.parameters() if p.is_floating_point())


@torch.no_grad()
def diffusion_score(pipe, images: torch.Tensor, conds: torch.Tensor, n: int = 50, seed: int = 0,
                    batch_size: int = 256) -> torch.Tensor:
    """d (N, C): denoising error of each image (N, 3, H, W) under each conditioning (C, T, d).

    Lower is a better match (Eq. 9.2 picks argmin_c). Timesteps: a stratified grid of ``n`` points
    over [0, T) (one random offset per stratum, drawn from ``seed``), the same grid for every image;
    the noise eps is drawn per image and shared by every caption of that image (the paired estimator:
    images of one call do not share eps). Errors are in noise space whatever the UNet predicts, squared
    and averaged in float32 (a half-precision UNet's outputs are upcast first: fp16 rounding, ~1e-4, is
    the size of the gaps between captions).
    """
    sched = pipe.training_scheduler()
    x0 = pipe.encode_images(images.to(pipe.device))
    N, C = len(x0), len(conds)
    gen = torch.Generator().manual_seed(seed)
    T = sched.config.num_train_timesteps
    grid = (torch.arange(n) * T) // n + torch.randint(0, max(1, T // n), (n,), generator=gen)
    out = torch.zeros(N, C)
    for i in range(N):
        eps = torch.randn(n, *x0.shape[1:], generator=gen).to(x0)
        t = grid.to(x0.device)
        zt = sched.add_noise(x0[i:i + 1].expand(n, *x0.shape[1:]), eps, t)
        # every caption against the same n draws, all in one batch of C x n rows
        z_all, t_all, eps_all = zt.repeat(C, 1, 1, 1), t.repeat(C), eps.repeat(C, 1, 1, 1)
        cond = conds.to(x0).repeat_interleave(n, dim=0)
        pred = torch.cat([pipe.noise_prediction(pipe.denoise(z_all[k:k + batch_size], t_all[k:k + batch_size],
                                                             cond[k:k + batch_size]))
                          for k in range(0, C * n, batch_size)])
        err = (predicted_noise(sched, pred, z_all, t_all).float() - eps_all.float()) ** 2
        out[i] = err.view(C, -1).mean(1).cpu()
    return out


@contextmanager
def float32_modules(*modules: nn.Module):
    """Inside the block every floating-point parameter and buffer of ``modules`` is float32; after it, each
    gets its own dtype back (fp16 / bf16 -> fp32 -> back is exact: the weights return bit for bit). How the
    library trains *through* a half-precision denoiser: backward passes run in float32, where the small
    gradients of a denoising loss do not underflow. Run the backward inside the block too (autograd keeps
    the float32 weights it saw). A no-op for float32 modules (the tiny profile). Memory: the weights in
    float32 (SD v1.4's UNet: 3.4 GB instead of 1.7) while the block lasts, and float32 activations."""
    saved = []
    for t in itertools.chain.from_iterable(itertools.chain(m.parameters(), m.buffers()) for m in modules):
        if t.is_floating_point() and t.dtype != torch.float32:
            saved.append((t, t.dtype))
            t.data = t.data.float()
    try:
        yield modules
    finally:
        for t, dtype in saved:
            t.data = t.data.to(dtype)


@contextmanager
def frozen(module: nn.Module):
    """Inside the block, ``module``'s trainable parameters take no gradient (gradients still flow
    *through* it, e.g. into a conditioning or a student's latent); they are trainable again after."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p in params:
            p.requires_grad_(True)


def _fit(pipe, params: list, condition, latents: torch.Tensor, steps: int, lr: float, batch_size: int, seed: int,
         weight_decay: float, progress: bool, desc: str, added: dict | None = None) -> list:
    """AdamW on ``params``: each step draws ``batch_size`` (prompt i, image r) pairs of latents (P, R, ...)
    and lowers the frozen UNet's denoising error of image r under ``condition(i)`` (B, T, d) and the
    prompts' extra inputs ``added`` {name: (P, ...)}. Forward and backward run in float32: a half-precision
    UNet is upcast for the whole fit (``float32_modules``, restored bit for bit after), half-precision latents
    are cast by ``sds_loss``; ``params`` should be float32."""
    from tqdm.auto import tqdm
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    losses = []
    with frozen(pipe.unet), float32_modules(pipe.unet):
        for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
            i = torch.randint(0, len(latents), (batch_size,), generator=gen)
            r = torch.randint(0, latents.shape[1], (batch_size,), generator=gen)
            extra = None if added is None else {k: v[i] for k, v in added.items()}
            loss = sds_loss(pipe, latents[i, r].to(pipe.device), condition(i), gen, extra)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return losses


def fit_conditioning(pipe, conds: torch.Tensor, latents: torch.Tensor, transform: nn.Module | None = None,
                     steps: int = 120, lr: float = 1e-2, batch_size: int = 16, seed: int = 0,
                     weight_decay: float = 0.0, progress: bool = True, added: dict | None = None):
    """Fit a conditioning to real images by their denoising error (Eq. 9.1), the UNet frozen.

    conds (P, T, d): the prompts' conditionings c; latents (P, R, *latent_shape): R encoded
    renders of each prompt. ``transform`` None: optimise c itself (§9.2.5's c*; returns (P, T, d));
    a module (CLP / WiCLP): train it on every c (returns the module). Each Adam(W) step draws
    ``batch_size`` (prompt, render) pairs; losses are ``sds_loss``'s. ``added`` {name: (P, ...)}: the
    prompts' extra denoiser inputs, kept fixed (SD-XL's pooled text, PixArt's mask, SD3's pooled
    projections; ``pipe.added_conditions(prompts)``). Returns (result, losses).
    """
    conds = conds.detach().to(pipe.device, torch.float32)   # c* and the projections train in float32
    if transform is None:
        target = conds.clone().requires_grad_(True)
        losses = _fit(pipe, [target], lambda i: target[i], latents, steps, lr, batch_size, seed, weight_decay,
                      progress, "fit conditioning", added)
        return target.detach(), losses
    target = transform.to(pipe.device).train()
    losses = _fit(pipe, list(target.parameters()), lambda i: target(conds[i]), latents, steps, lr, batch_size, seed,
                  weight_decay, progress, "fit conditioning", added)
    return target.eval(), losses


def fit_text_encoder(pipe, prompts, latents: torch.Tensor, last_layers: int | None = None,
                     transform: nn.Module | None = None, steps: int = 120, lr: float = 1e-5, batch_size: int = 16,
                     seed: int = 0, weight_decay: float = 0.0, progress: bool = True):
    """§9.2.8's alternatives to a projection: fine-tune a copy of the text encoder (every parameter, or
    its ``last_layers`` blocks and final norm), optionally with a projection ``transform`` on top trained
    jointly, on the same denoising objective as ``fit_conditioning``. ``pipe`` is left unchanged.

    prompts: P strings; latents (P, R, *latent_shape). Returns (TunedEncoder, losses).
    """
    import copy
    text = copy.deepcopy(pipe.text_model).float().train()   # trained in float32 (a no-op for SD's fp32 tower)
    for p in text.parameters():
        p.requires_grad_(last_layers is None)
    if last_layers is not None:
        blocks = anatomy.items(text, "layer")
        for path in blocks[len(blocks) - last_layers:] + [anatomy.resolve(text, "final_norm").path]:
            text.get_submodule(path).requires_grad_(True)
    params = [p for p in text.parameters() if p.requires_grad]
    if transform is not None:
        transform = transform.to(pipe.device).train()
        params += list(transform.parameters())
    ids = pipe.tokenize(prompts).to(pipe.device)

    def condition(i):
        c = text(input_ids=ids[i]).last_hidden_state
        return c if transform is None else transform(c)
    losses = _fit(pipe, params, condition, latents, steps, lr, batch_size, seed, weight_decay, progress,
                  "fine-tune text encoder")
    return TunedEncoder(text, transform, pipe.tokenize).eval(), losses


class TunedEncoder(nn.Module):
    """A fine-tuned copy of a pipeline's text encoder (and the projection trained with it):
    ``encoder(prompts)`` -> the conditioning (N, T, d) to sample with."""

    def __init__(self, text: nn.Module, transform: nn.Module | None, tokenize):
        super().__init__()
        self.text, self.transform, self.tokenize = text, transform, tokenize

    @torch.no_grad()
    def forward(self, prompts) -> torch.Tensor:
        device = next(self.text.parameters()).device
        c = self.text(input_ids=self.tokenize(prompts).to(device)).last_hidden_state
        return c if self.transform is None else self.transform(c)


class WindowProjection(nn.Module):
    """WiCLP: each token's new embedding is a linear map of itself and its ``s`` neighbours on each
    side (zero-padded at the ends); ``s = 0`` is CLP. Starts at the identity (centre block I, others
    0, bias 0), so an untrained projection leaves generation unchanged bit for bit."""

    def __init__(self, d: int, s: int = 1):
        super().__init__()
        if s < 0:
            raise BadParameter(f"window half-width s must be >= 0, got {s}")
        self.s = s
        self.linear = nn.Linear((2 * s + 1) * d, d)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.weight[:, s * d:(s + 1) * d] = torch.eye(d)
            self.linear.bias.zero_()

    def window(self, c: torch.Tensor) -> torch.Tensor:
        """(N, T, d) -> (N, T, (2s + 1) d): token i's neighbours i - s .. i + s, concatenated in order."""
        T = c.shape[1]
        padded = F.pad(c, (0, 0, self.s, self.s))
        return torch.cat([padded[:, k:k + T] for k in range(2 * self.s + 1)], dim=-1)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        if self.s == 0:  # the identity init must be exact: skip the concatenation
            return self.linear(c)
        return self.linear(self.window(c))


def composed(pipe, prompts, sep: str = " and ") -> torch.Tensor:
    """Composable Diffusion's conjunction (Liu et al. 2022; Table 9.2's "Composable"): each prompt split at
    ``sep`` into its K conjuncts, one conditioning each, (N, K, T, d) for ``pipe.sample`` (which then
    guides with ``sum_k (eps_k - eps_u)``). Prompts with fewer conjuncts than the longest are padded with
    the unconditional conditioning, whose guidance term is zero."""
    parts = [[p.strip() for p in prompt.split(sep)] for prompt in prompts]
    k = max(len(p) for p in parts)
    if any(not all(p) for p in parts):
        raise BadParameter(f"an empty conjunct in {prompts!r}")
    cond = pipe.encode([p for row in parts for p in row])
    uncond = pipe.uncond_conditioning().to(cond)
    out, i = [], 0
    for row in parts:
        out.append(torch.cat([cond[i:i + len(row)], uncond.expand(k - len(row), -1, -1)]))
        i += len(row)
    return torch.stack(out)


def _span_of(ids: list, part: list) -> int:
    """Start of the token list ``part`` inside ``ids``; BadParameter when it is not there."""
    for i in range(len(ids) - len(part) + 1):
        if ids[i:i + len(part)] == part:
            return i
    raise BadParameter(f"phrase tokens {part} not found in prompt tokens {ids}")


@torch.no_grad()
def structured_values(pipe, prompts, sep: str = " and ") -> tuple:
    """Structured Diffusion (Feng et al. 2023; Table 9.2's "Structured"): (c, c_bar), each (N, T, d).

    Keys read the prompt's states c; values read c_bar, the mean of c and, per noun phrase (the prompt split at
    ``sep``), c with that phrase's tokens replaced by the phrase's own encoding, aligned where its tokens sit
    in the prompt. ``to_v`` is affine, so the mean of the value sequences is ``to_v`` of this mean of states.
    """
    c = pipe.encode(prompts)
    ids = pipe.tokenize(prompts).tolist()
    phrases = [[p.strip() for p in prompt.split(sep)] for prompt in prompts]
    flat = [p for row in phrases for p in row]
    encoded, phrase_ids = pipe.encode(flat), pipe.tokenize(flat).tolist()   # one pass for every phrase
    eos = pipe.tokenizer.eos_token_id
    c_bar, j = [], 0
    for row, prompt_ids in enumerate(ids):
        aligned = [c[row]]
        for _ in phrases[row]:
            words = phrase_ids[j][1:phrase_ids[j].index(eos, 1)]          # between BOS and the first EOS
            at = _span_of(prompt_ids, words)
            seq = c[row].clone()
            seq[at:at + len(words)] = encoded[j, 1:1 + len(words)]
            aligned.append(seq)
            j += 1
        c_bar.append(torch.stack(aligned).mean(0))
    return c, torch.stack(c_bar)


def sample_structured(pipe, c: torch.Tensor, c_bar: torch.Tensor, seed: int = 0, batch_size: int = 256,
                      **sampler) -> torch.Tensor:
    """Images (N, 3, H, W) whose cross-attention layers take keys from c (N, T, d) and values from c_bar
    (``structured_values``), in the conditional CFG rows; ``batch_size`` rows per sampling call (the chunk
    from row i samples with seed ``seed + i``)."""
    if getattr(pipe.unet, "encoder_hid_proj", None) is not None:
        raise BadParameter("Structured Diffusion swaps to_v's input: a UNet that projects its text first (IF) is not supported")
    paths = [f"{p}.to_v" for p in anatomy.items(pipe.unet, "xattn")]
    out = []
    for i in range(0, len(c), batch_size):
        values = c_bar[i:i + batch_size].to(pipe.device, pipe.unet.dtype)

        def swap(h):
            if len(h) != 2 * len(values):
                raise BadParameter(f"to_v saw a batch of {len(h)} rows; Structured Diffusion expects [uncond, cond] "
                                   f"of {len(values)} each")
            return torch.cat([h[:len(values)], values.to(h.dtype)])

        with ExitStack() as stack:
            for path in paths:
                stack.enter_context(hooks.edit(pipe.unet, path, swap, at="input"))
            out.append(pipe.sample(c[i:i + batch_size], seed=seed + i, batch_size=batch_size, **sampler))
    return torch.cat(out)


def attention_probs(module, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """(N, HW, T): a diffusers cross-attention module's weights, averaged over heads, recomputed from its
    own q / k projections for pixels x (N, HW, c) and tokens ctx (N, T, d) (differentiable in both)."""
    heads = module.heads
    q = module.to_q(x).unflatten(-1, (heads, -1)).transpose(1, 2)   # (N, heads, HW, dh)
    k = module.to_k(ctx).unflatten(-1, (heads, -1)).transpose(1, 2)  # (N, heads, T, dh)
    return (q @ k.transpose(-1, -2) * module.scale).softmax(-1).mean(1)


def cross_attention_maps(pipe, cond: torch.Tensor, layer, seed: int = 0, **sampler) -> tuple:
    """(maps (N, T, h, w), images (N, 3, H, W)): how much each pixel of cross-attention ``layer``
    (index or path, or a list of them at one resolution: averaged) attends to each text token while
    ``cond`` (N, T, d) is sampled, averaged over heads and denoising steps, from the conditional CFG
    rows, and the images that sampling drew. Recomputed from the layers' own q / k projections
    (diffusers' processors do not return the weights); Fig 9.8's maps (SD: the 16 x 16 layers)."""
    paths = xattn_paths(pipe.unet, layer)
    totals = {}

    def recorder(path):
        def record(module, args, kwargs):
            x, ctx = (args[0] if args else kwargs["hidden_states"]), kwargs["encoder_hidden_states"]
            n = x.shape[0] // 2
            probs = attention_probs(module, x[n:], ctx[n:])                # the conditional rows
            total, calls = totals.get(path, (0, 0))
            totals[path] = (total + probs, calls + 1)
        return record

    handles = [pipe.unet.get_submodule(p).register_forward_pre_hook(recorder(p), with_kwargs=True) for p in paths]
    try:
        images = pipe.sample(cond, seed=seed, **sampler)
    finally:
        for h in handles:
            h.remove()
    maps = [total / calls for total, calls in totals.values()]                 # each (N, HW, T)
    if len({m.shape[1] for m in maps}) > 1:
        raise BadParameter(f"layers {paths} have different resolutions; average maps of one resolution only")
    mean = torch.stack(maps).mean(0)
    side = int(round(mean.shape[1] ** 0.5))
    return mean.transpose(1, 2).reshape(len(cond), -1, side, side).float().cpu(), images


# ---------------------------------------------------------------- LocoGen: altered inputs per layer (§5.8)


def xattn_paths(unet, layers) -> list:
    """Paths of cross-attention ``layers``: one index or path, or a list of them (``_xattn_path`` each)."""
    return [_xattn_path(unet, one) for one in (layers if isinstance(layers, (list, tuple)) else [layers])]


def _xattn_path(unet, layer) -> str:
    """A cross-attention module's path from its index in forward order (or the path itself)."""
    if isinstance(layer, str):
        return layer
    paths = anatomy.items(unet, "xattn")
    if not 0 <= layer < len(paths):
        raise BadParameter(f"cross-attention index {layer} out of range: the UNet has {len(paths)}")
    return paths[layer]


def _cond_rows(h: torch.Tensor, rows, cfg: bool) -> torch.Tensor:
    """Batch indices of sample ``rows`` in the conditional half ([uncond..., cond...]) or the batch."""
    n = h.shape[0] // 2 if cfg else h.shape[0]
    if cfg and h.shape[0] % 2:
        raise BadParameter(f"cfg=True expects a batch [uncond..., cond...] of even size, got {h.shape[0]}")
    if max(rows) >= n:
        raise BadParameter(f"sample rows {list(rows)} out of range for {n} samples (cfg={cfg})")
    return torch.as_tensor(list(rows), device=h.device) + (n if cfg else 0)


@contextmanager
def altered_cross_attention(unet: nn.Module, plan: Mapping, alt: torch.Tensor, cfg: bool = True):
    """LocoGen's altered model: on every UNet call, the cross-attention layers of ``plan`` read
    ``alt`` instead of their own text conditioning, in the sample rows ``plan`` names.

    plan: {cross-attention index (forward order, ``anatomy.items(unet, "xattn")``) or path: sample
    rows}. alt (N, T, d): the alternative conditioning c' = TE(T') of each sample row (or (1, T, d)
    for all). With ``cfg`` the module batch is [uncond..., cond...] and only the conditional half
    is altered, as the release does; queries and every other layer are untouched. The swap happens
    at the attention's ``encoder_hidden_states``, so keys and values both see c' through whatever
    the layer applies to it (biases, IF's ``norm_cross``). A UNet that projects the text before its
    blocks (IF's ``encoder_hid_proj``) gets c' projected the same way; what it reads elsewhere (IF's
    and SD-XL's text-time embeddings) stays that of T.
    """
    proj = getattr(unet, "encoder_hid_proj", None)
    if proj is not None:
        with torch.no_grad():
            alt = proj(alt.to(next(proj.parameters())))

    def swap(rows):
        def fn(h):
            idx = _cond_rows(h, rows, cfg)
            src = alt.to(h.device, h.dtype)
            src = src.expand(len(idx), -1, -1) if len(src) == 1 else src[idx - (h.shape[0] // 2 if cfg else 0)]
            return h.index_put((idx,), src)
        return fn

    with ExitStack() as stack:
        for layer, rows in plan.items():
            rows = [rows] if isinstance(rows, int) else list(rows)
            if rows:
                stack.enter_context(hooks.edit(unet, _xattn_path(unet, layer), swap(rows),
                                               at="input:encoder_hidden_states"))
        yield


def adjacent_windows(n_layers: int, m: int) -> list:
    """All n_layers - m + 1 windows of m adjacent layers (Alg. 2 as the prose states it; the last
    window is included and none is clipped)."""
    if not 1 <= m <= n_layers:
        raise BadParameter(f"window size m must be in 1..{n_layers}, got {m}")
    return [list(range(j, j + m)) for j in range(n_layers - m + 1)]


def _window_plan(n_x: int, windows: Sequence, offset: int = 0) -> dict:
    """Alg. 2's rows of one prompt pair starting at row ``offset``, as ``altered_cross_attention``'s plan
    {layer: rows}: row offset + 1 reads T' at every layer, row offset + 2 + w at window w's layers."""
    plan = {i: [offset + 1] for i in range(n_x)}
    for w, layers in enumerate(windows):
        for i in layers:
            plan[i].append(offset + 2 + w)
    return plan


def sample_windows(pipe, cond: torch.Tensor, alt: torch.Tensor, windows: Sequence, seed: int = 0,
                   batch_size: int | None = None, **sampler) -> torch.Tensor:
    """Images (2 + W, 3, H, W) of one prompt pair (Alg. 2): the clean image of T, the image whose
    every cross-attention layer reads T' (= generating from T'), then one per window of layers
    reading T'. cond, alt (1, T, d): TE(T), TE(T'). All rows share one noise draw, so differences
    between rows are the windows' alone. One sampling loop renders ``batch_size`` rows (None: all);
    with more windows than fit, each loop renders the clean and all-altered rows again beside its
    share of windows (same noise, so the same images) and keeps them once."""
    n_x = anatomy.n_xattn(pipe.unet)
    per_loop = len(windows) if batch_size is None else batch_size - 2
    if per_loop < 1:
        raise BadParameter(f"batch_size must leave room for a window beside the 2 reference rows, got {batch_size}")
    out = []
    for start in range(0, max(len(windows), 1), per_loop):
        chunk = windows[start:start + per_loop]
        plan = _window_plan(n_x, chunk)
        rows = 2 + len(chunk)
        with altered_cross_attention(pipe.unet, plan, alt):
            images = pipe.sample(cond.expand(rows, -1, -1), seed=seed, noise=pipe.draw_noise(1, seed),
                                 batch_size=rows, **sampler)
        out.append(images if not out else images[2:])
    return torch.cat(out)


def sample_window_pairs(pipe, conds: torch.Tensor, alts: torch.Tensor, windows: Sequence, seeds: Sequence[int],
                        batch_size: int = 128, added: Sequence[dict] | None = None, **sampler) -> torch.Tensor:
    """``sample_windows`` for P prompt pairs, as many pairs per sampling loop as ``batch_size`` rows hold:
    images (P, 2 + W, 3, H, W), pair p's rows on seed ``seeds[p]``'s one noise draw, so each pair's images
    equal its own ``sample_windows`` up to float rounding. conds, alts (P, T, d); added: per pair, SD-XL's
    {name: (1, ...)} of T. A pair wider than ``batch_size`` (or IF with stage II, whose upscaler pairs rows
    by call) falls back to ``sample_windows`` one pair at a time."""
    if not len(conds) == len(alts) == len(seeds) or (added is not None and len(added) != len(conds)):
        raise BadParameter(f"sample_window_pairs needs as many alts, seeds (and added) as conds, got {len(conds)} "
                           f"conds, {len(alts)} alts, {len(seeds)} seeds")
    n_x, rows = anatomy.n_xattn(pipe.unet), 2 + len(windows)
    per_loop = batch_size // rows
    if per_loop < 2 or getattr(pipe, "stage_2", None) is not None:
        return torch.stack([sample_windows(pipe, conds[p:p + 1], alts[p:p + 1], windows, seed=seeds[p],
                                           batch_size=min(batch_size, rows), **sampler,
                                           **({} if added is None else {"added": added[p]})) for p in range(len(conds))])
    out = []
    for start in range(0, len(conds), per_loop):
        pairs = range(start, min(start + per_loop, len(conds)))
        plan = {i: [] for i in range(n_x)}
        for q in range(len(pairs)):
            for i, r in _window_plan(n_x, windows, offset=q * rows).items():
                plan[i] += r
        alt = alts[list(pairs)].repeat_interleave(rows, 0)
        extra = {} if added is None else {"added": {k: torch.cat([added[p][k].expand(rows, *added[p][k].shape[1:])
                                                                   for p in pairs]) for k in added[0]}}
        with altered_cross_attention(pipe.unet, plan, alt):
            images = pipe.sample_seeded([conds[p:p + 1].expand(rows, -1, -1) for p in pairs], [seeds[p] for p in pairs],
                                        shared=True, batch_size=batch_size, **extra, **sampler)
        out += images
    return torch.stack(out)


def select_window(scores: Mapping, clean: float, altered: float, threshold: float = 0.8,
                  lower_is_success: bool = True) -> dict:
    """LocoGen's choice of (m, j): the smallest m whose best window moves the score by at least
    ``threshold`` x (clean - altered) (the all-layer change), its best j otherwise the best overall.

    scores: {m: (M - m + 1,) mean score per window start}; clean / altered: the score with no layer /
    every layer reading T'. ``lower_is_success``: removal (style, objects); False for facts, where
    the score of the updated fact should rise. Returns m, j, the window's change and whether it met
    the threshold.
    """
    sign = 1.0 if lower_is_success else -1.0
    full = sign * (clean - altered)
    best = None
    for m in sorted(scores):
        a = np.asarray(scores[m], float)
        j = int(np.argmin(sign * a))
        change = sign * (clean - a[j])
        found = dict(m=m, j=j, change=float(change), full_change=float(full),
                     met=bool(full > 0 and change >= threshold * full))
        if found["met"]:
            return found
        if best is None or change > best["change"]:
            best = found
    return best


# ---------------------------------------------------------------- neurons of the text projections (§5.10)


def neuron_zscores(with_concept: torch.Tensor, without: torch.Tensor) -> torch.Tensor:
    """(d',) Welch-type statistic per output coordinate, population std (the release's):
    (mean_a - mean_b) / sqrt(std_a^2 / N1 + std_b^2 / N2). with_concept (N1, d'), without (N2, d'):
    activations of ``to_k`` / ``to_v`` for prompts with and without the concept."""
    a, b = with_concept.double(), without.double()
    se = (a.var(0, unbiased=False) / len(a) + b.var(0, unbiased=False) / len(b)).sqrt()
    return ((a.mean(0) - b.mean(0)) / se.clamp_min(1e-12)).float()


@contextmanager
def ablated_neurons(unet: nn.Module, plan: Mapping, value=0.0, cfg: bool = True, rows=None):
    """Set chosen output coordinates of linear maps (``to_k`` / ``to_v`` of cross-attention layers)
    on every call, at every token position, in the conditional rows only (``cfg``).

    plan: {path: coordinate indices}; value: a number (0: the text's "dropout") or {path: (d',)}
    replacement values (the release's mean over prompts without the concept). rows: sample rows
    to touch (None: all).
    """
    def silence(path, idx):
        def fn(h):
            n = h.shape[0] // 2 if cfg else h.shape[0]
            batch = _cond_rows(h, range(n) if rows is None else rows, cfg)
            fill = value[path] if isinstance(value, Mapping) else torch.full((h.shape[-1],), float(value))
            fill = fill.to(h.device, h.dtype)[idx]
            picked = h[batch]  # (rows, T, d'): a copy
            picked[..., idx.to(h.device)] = fill
            return h.index_put((batch,), picked)
        return fn

    with ExitStack() as stack:
        for path, idx in plan.items():
            idx = torch.as_tensor(idx, dtype=torch.long)
            stack.enter_context(hooks.edit(unet, path, silence(path, idx)))
        yield
