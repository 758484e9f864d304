"""Sampling-time guidance on the latents: Attend-and-Excite (Chefer et al. 2023), a baseline of Table 9.2, and
SynGen (Rassin et al. 2023), one of §9.2.6's generators of CLP / WiCLP's training images.

    attend_and_excite(pipe, cond, subjects, eos, layers)   images sampled so that every subject token
        wins some pixel of the chosen cross-attention layers: before each of the first denoising
        steps the latents move down the gradient of max_s (1 - max_pixels A_s), where A_s is subject
        s's attention map (tokens between BOS and EOS, x100, softmax; Gaussian-smoothed)
    excite_loss(maps, subjects, eos)                        that loss per image, from attention maps
    excite_loss_at(pipe, x, t, cond, subjects, eos, layers) the same from latents (one conditional UNet pass)

    syngen(pipe, cond, pairs, layers)                     images sampled so that each modifier's attention
        map overlaps its noun's and stays apart from the prompt's other modifiers and nouns
    syngen_loss(maps, pairs)                              that loss per image, from attention maps
    modifier_pairs(tokenizer, tagged)                     (modifier, noun) token positions of a tagged prompt

``pipe`` is any ``models.diffusion.Text2Image``; the layers are cross-attention indices or paths
(SD: the 16 x 16 layers, as the releases).
"""
import numpy as np
import torch
import torch.nn.functional as F

from . import word_order
from .conditioning import attention_probs, xattn_paths
from .errors import BadParameter


def _smooth(maps: torch.Tensor, sigma: float = 0.5, size: int = 3) -> torch.Tensor:
    """(N, S, h, w) -> the same, each map convolved with a size x size Gaussian (reflect padding)."""
    r = torch.arange(size, dtype=maps.dtype, device=maps.device) - size // 2
    g = torch.exp(-r ** 2 / (2 * sigma ** 2))
    kernel = (g[:, None] * g[None]) / (g.sum() ** 2)
    n, s, h, w = maps.shape
    x = F.pad(maps.reshape(n * s, 1, h, w), (size // 2,) * 4, mode="reflect")
    return F.conv2d(x, kernel[None, None]).reshape(n, s, h, w)


def excite_loss(maps: torch.Tensor, subjects: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """(N,): max over subjects of 1 - the peak of its smoothed attention map.

    maps (N, HW, T): cross-attention weights; subjects (N, S) token positions; eos (N,) each prompt's EOS
    position. As the release: only the tokens strictly between BOS and EOS compete (x100, softmax).
    """
    n, hw, _ = maps.shape
    side = int(round(hw ** 0.5))
    losses = []
    for i in range(n):
        text = (100 * maps[i, :, 1:int(eos[i])]).softmax(-1)                   # (HW, tokens)
        sub = text[:, subjects[i] - 1].T.reshape(1, -1, side, side)            # (1, S, h, w)
        peak = _smooth(sub).flatten(2).max(-1).values                          # (1, S)
        losses.append((1 - peak).max())
    return torch.stack(losses)


def excite_loss_at(pipe, x: torch.Tensor, t, cond: torch.Tensor, subjects, eos, layers) -> torch.Tensor:
    """(N,) ``excite_loss`` of latents x (N, *latent_shape) at timestep t: one conditional UNet pass
    (cond (N, T, d)), the maps of ``layers`` (one resolution) averaged; differentiable in x."""
    return excite_loss(_maps_at(pipe, x, t, cond, layers), torch.as_tensor(subjects), torch.as_tensor(eos))


def _maps_at(pipe, x, t, cond, layers) -> torch.Tensor:
    """Cross-attention weights (N, HW, T) of ``layers`` (one resolution) averaged, from one conditional UNet pass
    on latents x at timestep t; differentiable in x."""
    paths = xattn_paths(pipe.unet, layers)
    maps = []

    def record(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        maps.append(attention_probs(module, h, kwargs["encoder_hidden_states"]))

    handles = [pipe.unet.get_submodule(p).register_forward_pre_hook(record, with_kwargs=True) for p in paths]
    try:
        pipe.denoise(x, t, cond)
    finally:
        for h in handles:
            h.remove()
    if len({m.shape[1] for m in maps}) > 1:
        raise BadParameter(f"layers {paths} have different resolutions")
    return torch.stack(maps).mean(0).float()


def _sym_kl(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    p, q = p + eps, q + eps
    return 0.5 * ((p * (p / q).log()).sum() + (q * (q / p).log()).sum())


def syngen_loss(maps: torch.Tensor, pairs) -> torch.Tensor:
    """(N,) SynGen's L_pos + L_neg from cross-attention weights maps (N, HW, T), each token's map normalised over
    the pixels: sum over (modifier, noun) pairs of the symmetric KL between their maps, minus, per pair, the mean
    over the prompt's other paired tokens u of (dist(A_m, A_u) + dist(A_n, A_u)) / 2. pairs: per image a list of
    (modifier position, noun position)."""
    losses = []
    for i, image_pairs in enumerate(pairs):
        A = maps[i] / maps[i].sum(0, keepdim=True)                                   # (HW, T): distributions
        content = sorted({p for pair in image_pairs for p in pair})
        loss = maps.new_zeros(())
        for m, n in image_pairs:
            loss = loss + _sym_kl(A[:, m], A[:, n])
            others = [u for u in content if u not in (m, n)]
            if others:
                loss = loss - sum(0.5 * (_sym_kl(A[:, m], A[:, u]) + _sym_kl(A[:, n], A[:, u])) for u in others) / len(others)
        losses.append(loss)
    return torch.stack(losses)


def modifier_pairs(tokenizer, tagged) -> list:
    """(modifier, noun) token positions of a prompt given as [(word, tag)] (tags as ``word_order``'s taggers give
    them): every adjective, and every noun directly before another noun, modifies the next noun; positions are
    each word's last sub-token (``word_order.word_ends``)."""
    last = word_order.word_ends(tokenizer, [w for w, _ in tagged])
    pairs = []
    for k, (_, tag) in enumerate(tagged):
        modifies = tag == "ADJ" or (tag == "NOUN" and k + 1 < len(tagged) and tagged[k + 1][1] == "NOUN")
        head = next((j for j in range(k + 1, len(tagged)) if tagged[j][1] == "NOUN"), None)
        if modifies and head is not None:
            pairs.append((last[k], last[head]))
    return pairs


def syngen(pipe, cond: torch.Tensor, pairs, layers, seed: int = 0, steps: int = None, scale: float = 20.0,
           alter_share: float = 0.5, **sampler) -> torch.Tensor:
    """Images (N, 3, H, W) for conditionings cond (N, T, d) with SynGen's latent updates: one step down the gradient
    of ``syngen_loss`` before each of the first ``alter_share`` of the steps (release: 25 of 50, step size 20).
    pairs: per row a list of (modifier, noun) token positions (``modifier_pairs``); a row without pairs is sampled
    plainly. Other keyword arguments go to ``pipe.sample``."""
    if len(pairs) != len(cond):
        raise BadParameter(f"{len(pairs)} pair lists for {len(cond)} conditionings")
    steps = pipe.sampler["steps"] if steps is None else steps
    n_alter = int(round(alter_share * steps))
    paths = xattn_paths(pipe.unet, layers)
    cond = cond.detach().to(pipe.device, pipe.unet.dtype)

    def update(x, t, k, rows):
        rows = list(range(len(cond))[rows])   # ``sample`` passes the batch's rows as a slice
        if k >= n_alter or not any(pairs[r] for r in rows):
            return x
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            loss = syngen_loss(_maps_at(pipe, x, t, cond[rows], paths), [pairs[r] for r in rows])
            (grad,) = torch.autograd.grad(loss.sum(), x)
        return (x - scale * grad).detach()

    return pipe.sample(cond, seed=seed, steps=steps, latent_update=update, **sampler)


class SynGen:
    """A generator with SynGen's updates on ``pipe``: ``generate(prompts, seed)`` as a pipeline's (§9.2.6's third
    source of CLP / WiCLP's images). tagger: prompt -> [(word, tag)] (paper: ``compositional.spacy_tagger()``,
    tiny: the toy grammar's); layers: the cross-attentions whose maps it aligns (SD: the 16 x 16 ones)."""

    def __init__(self, pipe, tagger, layers, batch_size: int = 8):
        self.pipe, self.tagger, self.layers, self.batch_size = pipe, tagger, list(layers), batch_size

    @property
    def image_size(self) -> int:
        return self.pipe.image_size

    def generate(self, prompts, seed: int = 0, **kw) -> torch.Tensor:
        prompts = list(prompts)
        pairs = [modifier_pairs(self.pipe.tokenizer, self.tagger(p)) for p in prompts]
        kw.setdefault("batch_size", self.batch_size)   # every row back-propagates through the UNet
        return syngen(self.pipe, self.pipe.encode(prompts), pairs, self.layers, seed=seed, **kw)


def attend_and_excite(pipe, cond: torch.Tensor, subjects, eos, layers, seed: int = 0, steps: int = None,
                      scale: float = 20.0, alter_share: float = 0.5,
                      refine_at: dict | None = None, max_refine: int = 20, **sampler) -> torch.Tensor:
    """Images (N, 3, H, W) for conditionings cond (N, T, d), Attend-and-Excite's latent updates in the first
    ``alter_share`` of the steps (release: 25 of 50), step size ``scale * sqrt(linspace(1, 0.5))``.

    subjects (N, S): token positions to excite (the nouns); eos (N,): EOS positions. ``refine_at``:
    {share of the steps: target peak}, where updates repeat (at most ``max_refine``) until every loss
    is below 1 - target (release, for 50 steps: {0: 0.05, 10: 0.5, 20: 0.8}, the default as shares).
    Other keyword arguments go to ``pipe.sample``.
    """
    subjects, eos = torch.as_tensor(subjects).long(), torch.as_tensor(eos).long()
    if subjects.dim() != 2 or len(subjects) != len(cond) or len(eos) != len(cond):
        raise BadParameter(f"subjects (N, S) and eos (N,) must have one row per conditioning; got "
                           f"{tuple(subjects.shape)}, {tuple(eos.shape)} for N = {len(cond)}")
    if not ((subjects >= 1) & (subjects < eos[:, None])).all():
        raise BadParameter("every subject position must lie strictly between BOS and EOS")
    steps = pipe.sampler["steps"] if steps is None else steps
    n_alter = int(round(alter_share * steps))
    refine = {int(round(share * steps)): target for share, target in (refine_at or {0: 0.05, 0.2: 0.5, 0.4: 0.8}).items()}
    step_size = scale * np.sqrt(np.linspace(1.0, 0.5, steps))
    paths = xattn_paths(pipe.unet, layers)
    cond = cond.detach().to(pipe.device, pipe.unet.dtype)

    def loss_of(x, t, rows):
        return excite_loss_at(pipe, x, t, cond[rows], subjects[rows], eos[rows], paths)

    def descend(x, loss, k):
        (grad,) = torch.autograd.grad(loss.sum(), x)
        return (x - step_size[k] * grad).detach().requires_grad_(True)

    def update(x, t, k, rows):
        """The release's order: refine (at the refinement steps) until the target, then one more step."""
        if k >= n_alter:
            return x
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            loss = loss_of(x, t, rows)
            for _ in range(max_refine if k in refine else 0):
                if bool((loss < 1 - refine[k]).all()):
                    break
                x = descend(x, loss, k)
                loss = loss_of(x, t, rows)
            return descend(x, loss, k).detach()

    return pipe.sample(cond, seed=seed, steps=steps, latent_update=update, **sampler)
