"""The one training loop every zoo model uses: seeded per step, resumable, with a progress bar.

Each step draws its batch from ``np.random.default_rng([seed, step])`` and its torch noise from a
generator seeded the same way, so a run interrupted at step k and resumed gives the same weights
as an uninterrupted one.
"""
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from . import store


def step_rngs(seed: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    return np.random.default_rng([seed, step]), torch.Generator().manual_seed(seed * 1_000_003 + step)


def train(name: str, modules: dict, opt: torch.optim.Optimizer, step_fn, steps: int, seed: int,
          sched=None, save_every: int = 250, log_every: int = 50, resume: bool = True) -> dict:
    """Run ``step_fn(rng, gen, step) -> float loss`` (it must call backward) for ``steps`` steps.

    modules: name -> nn.Module whose state is checkpointed with the optimizer every
    ``save_every`` steps under build/zoo/NAME/. Returns {"wall_time_s", "cpu_time_s", "losses"}: the
    CPU time of this process is what the budget counts (wall time grows when other jobs share the cores).
    """
    start, elapsed, cpu, losses = 0, 0.0, 0.0, []
    state = store.load_state(name) if resume else None
    if state is not None and state["step"] <= steps:
        for k, m in modules.items():
            m.load_state_dict(state["modules"][k])
        opt.load_state_dict(state["opt"])
        if sched is not None:
            sched.load_state_dict(state["sched"])
        start, elapsed, cpu, losses = state["step"], state["elapsed"], state.get("cpu", 0.0), state["losses"]
    t0, c0 = time.perf_counter(), time.process_time()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"train {name}", mininterval=5)
    for step in bar:
        rng, gen = step_rngs(seed, step)
        opt.zero_grad(set_to_none=True)
        loss = step_fn(rng, gen, step)
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(float(loss))
        if (step + 1) % log_every == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-log_every:]):.4f}")
        if (step + 1) % save_every == 0 or step + 1 == steps:  # the last one lets a run be extended
            store.save_state(name, step=step + 1, elapsed=elapsed + time.perf_counter() - t0,
                             cpu=cpu + time.process_time() - c0, losses=losses,
                             modules={k: m.state_dict() for k, m in modules.items()}, opt=opt.state_dict(),
                             sched=sched.state_dict() if sched is not None else None)
    return {"wall_time_s": elapsed + time.perf_counter() - t0, "cpu_time_s": cpu + time.process_time() - c0,
            "losses": losses}


def finished(name: str) -> None:
    """Drop the resumable state once the checkpoint is shipped."""
    store.state_path(name).unlink(missing_ok=True)


def ship(name: str, run: dict, *, seed: int, steps: int, gates: dict, extra: dict | None = None) -> dict:
    """Once a model's files are written to its zoo folder: its card, with ``train``'s wall and CPU times from
    ``run``, and the resumable state dropped. Returns the card."""
    card = store.write_card(name, seed=seed, steps=steps, wall_time_s=run["wall_time_s"], cpu_time_s=run["cpu_time_s"],
                            gates=gates, extra=extra)
    finished(name)
    return card


class EMA:
    """Exponential moving average of a module's parameters (the weights diffusion models ship)."""

    def __init__(self, module: torch.nn.Module, decay: float = 0.999):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # warm-up: early averages forget the random init
        for k, v in module.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self):
        return self.shadow

    def load_state_dict(self, state):
        self.shadow = {k: v.clone() for k, v in state.items()}
