"""Low-rank adapters on unmodified models, and GORS's reward-weighted fine-tuning through them.

    lora = LoRA(model, rank=4)              rank-r adapters (down, up) for the Linear layers inside every
                                            attention module of ``model`` (LoRA, Hu et al. 2022)
    with lora.attached(model): ...          those layers compute W x + b + scale * up(down(x)), by forward hooks
    lora.merge(model)                       the same, written into the weights (a plain model again)
    adapters, losses = gors_finetune(pipe, prompts, latents, rewards)
                                            GORS (Huang et al. 2023, T2I-CompBench; Table 9.2's baseline):
                                            the denoising loss of the model's own well-rated samples, each
                                            weighted by its reward, through adapters on the UNet's and the
                                            text encoder's attention layers
    with adapters.attached(pipe): pipe.sample(pipe.encode(prompts))

``up`` starts at zero, so attaching a fresh adapter changes nothing bit for bit.
"""
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .errors import BadParameter


def attention_linears(model: nn.Module) -> list:
    """Paths of the ``nn.Linear`` layers inside every module whose class name ends in "Attention"
    (diffusers' ``Attention``: to_q, to_k, to_v, to_out.0; transformers' ``CLIPAttention``: q_proj,
    k_proj, v_proj, out_proj; ``T5Attention``: q, k, v, o), the layers the GORS release adapts."""
    paths = []
    for name, module in model.named_modules():
        if type(module).__name__.endswith("Attention"):
            paths += [f"{name}.{sub}" for sub, m in module.named_modules() if sub and isinstance(m, nn.Linear)]
    return list(dict.fromkeys(paths))   # a Linear inside nested attention modules once, first-seen order


class LoRA(nn.Module):
    """Rank-``rank`` adapters for the Linear layers ``paths`` of a model (default: ``attention_linears``).

    For a layer W (out, in): down (rank, in) ~ N(0, 1 / rank^2), up (out, rank) = 0, so its output
    becomes W x + b + scale * up down x once ``attached``. Parameters live on the layers' devices in
    float32; the hook computes in the input's dtype (fp16 UNets on GPU).
    """

    def __init__(self, model: nn.Module, rank: int = 4, scale: float = 1.0, paths: list | None = None, seed: int = 0):
        super().__init__()
        self.paths = list(attention_linears(model) if paths is None else paths)
        if not self.paths:
            raise BadParameter(f"{type(model).__name__} has no attention Linear layers to adapt; pass paths=")
        if rank < 1:
            raise BadParameter(f"rank must be >= 1, got {rank}")
        gen = torch.Generator().manual_seed(seed)
        self.rank, self.scale = rank, scale
        self.down, self.up = nn.ParameterList(), nn.ParameterList()
        for path in self.paths:
            layer = model.get_submodule(path)
            if not isinstance(layer, nn.Linear):
                raise BadParameter(f"{path} is a {type(layer).__name__}, not an nn.Linear")
            device = layer.weight.device
            self.down.append(nn.Parameter((torch.randn(rank, layer.in_features, generator=gen) / rank).to(device)))
            self.up.append(nn.Parameter(torch.zeros(layer.out_features, rank, device=device)))

    def delta(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """scale * up_k down_k x for x (..., in) -> (..., out)."""
        return self.scale * F.linear(F.linear(x, self.down[k].to(x.dtype)), self.up[k].to(x.dtype))

    @contextmanager
    def attached(self, model: nn.Module):
        """Inside the block, every adapted layer of ``model`` adds its low-rank term; gradients reach the
        adapters (and not the model, if its parameters are frozen)."""
        handles = []
        try:
            for k, path in enumerate(self.paths):
                hook = (lambda k: lambda module, args, out: out + self.delta(k, args[0]))(k)
                handles.append(model.get_submodule(path).register_forward_hook(hook))
            yield model
        finally:
            for h in handles:
                h.remove()


    @torch.no_grad()
    def merge(self, model: nn.Module) -> nn.Module:
        """Add each adapter into its layer's weight, W <- W + scale * up down, so that ``model`` alone
        computes what it computed ``attached``: a plain model of the same architecture. Returns ``model``."""
        for k, path in enumerate(self.paths):
            layer = model.get_submodule(path)
            layer.weight += (self.scale * self.up[k] @ self.down[k]).to(layer.weight)
        return model


class PipelineAdapters(nn.Module):
    """LoRA on a text-to-image pipeline's UNet and (optionally) its text encoder."""

    def __init__(self, unet: LoRA, text: LoRA | None = None):
        super().__init__()
        self.unet, self.text = unet, text

    @contextmanager
    def attached(self, pipe):
        """``pipe.encode`` and ``pipe.sample`` run the adapted model inside the block."""
        with ExitStack() as stack:
            stack.enter_context(self.unet.attached(pipe.unet))
            if self.text is not None:
                stack.enter_context(self.text.attached(pipe.text_model))
            yield pipe


# the GORS release (T2I-CompBench, GORS_finetune): SD v2 base, rank 4, AdamW, 15000 steps at batch 16
GORS = dict(rank=4, lr=1e-4, text_lr=5e-6, weight_decay=1e-2, max_grad_norm=1.0, batch_size=16, steps=15000)
# its reward thresholds on BLIP-VQA for the template prompts (the first 560 of each train split)
GORS_THRESHOLDS = {"color": 0.92, "shape": 0.85, "texture": 0.9}


def denoising_target(sched, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to output for z_t = add_noise(x0, eps, t): eps, v for v-prediction, or the
    velocity eps - x0 for rectified flow (SD3)."""
    kind = sched.config.prediction_type
    if kind == "epsilon":
        return eps
    if kind == "flow":
        return eps - x0
    if kind == "v_prediction":
        return sched.get_velocity(x0, eps, t)
    raise BadParameter(f"prediction_type {kind!r} is not supported")


def gors_finetune(pipe, prompts, latents: torch.Tensor, rewards, steps: int = GORS["steps"],
                  batch_size: int = GORS["batch_size"], lr: float = GORS["lr"], text_lr: float = GORS["text_lr"],
                  rank: int = GORS["rank"], weight_decay: float = GORS["weight_decay"],
                  max_grad_norm: float = GORS["max_grad_norm"], train_text: bool = True, seed: int = 0,
                  progress: bool = True):
    """GORS: fine-tune LoRA adapters of ``pipe`` on its own selected samples, each sample's denoising
    loss weighted by its reward, sum_i r_i ||f(z_t, t, c_i) - target||^2 / B, in the UNet's own
    prediction space (the release's loss). ``pipe`` itself is not changed.

    prompts: N strings; latents (N, *latent_shape): the selected images, encoded; rewards (N,): their
    scores (the release keeps those above ``GORS_THRESHOLDS``). The UNet's adapters train at ``lr``,
    the text encoder's at ``text_lr`` (``train_text`` False: no text adapters). Returns
    (PipelineAdapters, per-step losses).

    Forward and backward run in float32: a half-precision UNet (and, with ``train_text``, text encoder) is
    held in float32 for the whole fine-tune (``conditioning.float32_modules``; the weights come back bit for
    bit), where the release trains fp32 weights under fp16 autocast with a GradScaler. A plain fp16 backward
    would underflow the denoising loss's small gradients. Float32 pipelines (the tiny profile) are untouched.
    """
    from tqdm.auto import tqdm
    from .conditioning import float32_modules, frozen
    rewards = torch.as_tensor(rewards, dtype=torch.float32).flatten()
    if not (len(prompts) == len(latents) == len(rewards)):
        raise BadParameter(f"prompts, latents and rewards differ in length: {len(prompts)}, {len(latents)}, "
                           f"{len(rewards)}")
    if len(prompts) == 0:
        raise BadParameter("no samples to fine-tune on (did any pass the reward threshold?)")
    adapters = PipelineAdapters(LoRA(pipe.unet, rank, seed=seed),
                                LoRA(pipe.text_model, rank, seed=seed + 1) if train_text else None)
    groups = [{"params": list(adapters.unet.parameters()), "lr": lr}]
    if train_text:
        groups.append({"params": list(adapters.text.parameters()), "lr": text_lr})
    opt = torch.optim.AdamW(groups, weight_decay=weight_decay)
    sched = pipe.training_scheduler()
    ids = pipe.tokenize(prompts)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    upcast = (pipe.unet, pipe.text_model) if train_text else (pipe.unet,)
    with frozen(pipe.unet), frozen(pipe.text_model), float32_modules(*upcast), adapters.attached(pipe):
        pipe.unet.train()
        for _ in tqdm(range(steps), desc="GORS", disable=not progress, leave=False):
            i = torch.randint(0, len(latents), (batch_size,), generator=gen)
            x0 = latents[i].to(pipe.device, torch.float32)
            eps = torch.randn(x0.shape, generator=gen).to(x0)
            t = torch.randint(0, sched.config.num_train_timesteps, (batch_size,), generator=gen).to(x0.device)
            zt = sched.add_noise(x0, eps, t)
            cond = pipe.text_model(input_ids=ids[i].to(pipe.text_model.device)).last_hidden_state
            out = pipe.noise_prediction(pipe.denoise(zt, t, cond.to(zt))).float()
            per_sample = ((out - denoising_target(sched, x0, eps, t)) ** 2).flatten(1).mean(1)
            loss = (rewards[i].to(per_sample.device) * per_sample).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(adapters.parameters(), max_grad_norm)
            opt.step()
            losses.append(float(loss.detach()))
        pipe.unet.eval()
    return adapters.eval(), losses
