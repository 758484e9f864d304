"""Causal tracing: corrupt an input, then restore clean activations site by site, batched.

Built on ``interplab.hooks`` (every read and write is a hook there) and ``interplab.anatomy``
(``trace_grid`` finds a family's MLP / attention / block outputs by name). Two modes:

1. ``corrupt_and_restore``: one pass runs [clean, corrupted] and caches the clean activations of
   the sites that any restoration needs; every restoration is then one row of a corrupted batch
   (``batch_size`` rows a pass) whose listed (site, positions) get the cached clean values.

       res = corrupt_and_restore(model, lambda b: model(**b).logits, {"input_ids": ids},
                                 Noise("transformer.wte", [2, 3], sigma), restorations,
                                 metric=answer_prob)       # res.clean, res.corrupted, res.restored (R,)

2. ``restore_from_row``: for a module that runs many times per generation (a UNet inside a DDIM
   loop, both halves of classifier-free guidance), copy row ``src``'s output into target rows on
   every call, so one batched sampling loop yields clean + corrupted + restored samples, each on
   its own trajectory.

Positions always index dim 1 of a site's first tensor (tokens of (B, T, d)), as in ``hooks``.
Clean and corrupted inputs must have the same shape, so that positions align.
"""
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from . import anatomy, hooks
from .errors import BadParameter, check_choice

# ---------------------------------------------------------------- subject spans and noise


def _ids_list(ids) -> list:
    ids = torch.as_tensor(ids)
    ids = ids[0] if ids.dim() == 2 and ids.shape[0] == 1 else ids
    if ids.dim() != 1:
        raise BadParameter(f"expected one row of token ids, got shape {tuple(ids.shape)}")
    return ids.tolist()


def subject_positions(tokenizer, input_ids_row, span_text: str, occurrence: int = 0) -> list:
    """Token positions of ``span_text`` in one prompt, found by matching token ids.

    input_ids_row: (T,) or (1, T). Tries the span as tokenized alone, then with a leading space
    (BPE vocabularies such as GPT-2's encode a word mid-sentence as " word"). ``occurrence``
    picks among several matches (0 = first, -1 = last). Raises ``BadParameter`` naming the span
    and the decoded prompt when the span is absent.
    """
    row = _ids_list(input_ids_row)
    spans = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in (span_text, " " + span_text)]
    for span in spans:
        starts = [i for i in range(len(row) - len(span) + 1) if span and row[i:i + len(span)] == span]
        if starts:
            return list(range(starts[occurrence], starts[occurrence] + len(span)))
    raise BadParameter(f"subject span {span_text!r} (token ids {spans[0]}) is not in the prompt "
                       f"{tokenizer.decode(row)!r}; check the span's spelling and tokenization")


def noise_scale(embedding, token_ids) -> float:
    """sigma = std over all entries of the embedding vectors of ``token_ids`` (ROME's rule).

    embedding: ``nn.Embedding`` or its weight (V, d). token_ids: any shape; repeats count.
    """
    weight = embedding.weight if isinstance(embedding, nn.Module) else embedding
    ids = torch.as_tensor(token_ids, device=weight.device).reshape(-1)
    return float(weight.detach()[ids].float().std())


@dataclass(frozen=True)
class Noise:
    """Gaussian corruption: ``nu * sigma * eps`` added to a site (the token embedding's output).

    eps (p, d) ~ N(0, I) depends only on ``seed`` and the shape, so every corrupted row of every
    batch gets the same draw (paired design: one tensor per prompt and seed). ``at="input"`` of
    the first block serves models run from ``inputs_embeds``, where the embedding never runs.
    """
    path: str
    positions: Sequence[int]
    sigma: float
    nu: float = 3.0
    seed: int = 0
    at: str = "output"

    def draw(self, width: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
        """The noise added at ``positions``, (p, width)."""
        gen = torch.Generator().manual_seed(self.seed)  # CPU generator: same draw on every device
        eps = torch.randn(len(self.positions), width, generator=gen, dtype=torch.float32)
        return (self.nu * self.sigma * eps).to(dtype=dtype, device=device)

    def apply(self, model: nn.Module, rows=None):
        """Context manager adding the noise to ``rows`` (None = all) via ``hooks.add``."""
        def delta(region):  # region (k, p, d): the drawn (p, d) broadcasts over rows
            return self.draw(region.shape[-1], region.dtype, region.device)
        return hooks.add(model, {self.path: delta}, at=self.at, batch=rows, positions=list(self.positions))


@dataclass(frozen=True)
class Substitute:
    """Token-substitution corruption: ``ids`` replace the tokens at ``positions`` (same count)."""
    positions: Sequence[int]
    ids: Sequence[int]
    key: str = "input_ids"  # where the ids live when inputs are a mapping

    def apply(self, inputs):
        if len(self.positions) != len(self.ids):
            raise BadParameter(f"Substitute needs as many ids as positions, got {len(self.ids)} ids "
                               f"for positions {list(self.positions)}")
        ids = inputs[self.key] if isinstance(inputs, Mapping) else inputs
        new = ids.clone()
        new[:, list(self.positions)] = torch.as_tensor(list(self.ids), dtype=ids.dtype, device=ids.device)
        return {**inputs, self.key: new} if isinstance(inputs, Mapping) else new


# ---------------------------------------------------------------- batching inputs


def _map(inputs, fn):
    """Apply ``fn`` to the tensor (or every tensor value of a mapping) of a batch."""
    if torch.is_tensor(inputs):
        return fn(inputs)
    if isinstance(inputs, Mapping):
        return {k: fn(v) if torch.is_tensor(v) else v for k, v in inputs.items()}
    raise BadParameter(f"inputs must be a tensor or a mapping of tensors, got {type(inputs).__name__}")


def _repeat(inputs, k: int):
    """k copies of a one-row batch (copies, not views: a model may write into its inputs)."""
    def repeat(x):
        if x.shape[0] != 1:
            raise BadParameter(f"give one example (batch dim 1), got a tensor of shape {tuple(x.shape)}")
        return x.repeat(k, *[1] * (x.dim() - 1))
    return _map(inputs, repeat)


def _cat(a, b):
    if torch.is_tensor(a):
        return torch.cat([a, b])
    return {k: torch.cat([v, b[k]]) if torch.is_tensor(v) else v for k, v in a.items()}


def _seq_len(inputs) -> int:
    x = inputs if torch.is_tensor(inputs) else inputs.get("input_ids", next(
        v for v in inputs.values() if torch.is_tensor(v)))
    return x.shape[1]


def _split_corruption(inputs, corruption):
    """(corrupted inputs, [Noise]) from one spec, a list of specs, or the corrupted inputs themselves."""
    specs = list(corruption) if isinstance(corruption, (list, tuple)) else [corruption]
    corrupted, noises = inputs, []
    for spec in specs:
        if isinstance(spec, Noise):
            noises.append(spec)
        elif isinstance(spec, Substitute):
            corrupted = spec.apply(corrupted)
        else:  # the corrupted input itself (a tensor or mapping shaped like ``inputs``)
            corrupted = spec
    pairs = [(inputs, corrupted)] if torch.is_tensor(inputs) else [(v, corrupted[k]) for k, v in inputs.items()
                                                                  if torch.is_tensor(v)]
    if any(a.shape != b.shape for a, b in pairs):  # positions must mean the same token in both runs
        raise BadParameter(f"corrupted inputs must have the clean inputs' shapes, got "
                           f"{[tuple(b.shape) for _, b in pairs]} for {[tuple(a.shape) for a, _ in pairs]}")
    return corrupted, noises


# ---------------------------------------------------------------- the engine


def _site(site) -> tuple:
    """(normalised path, at) of a path string, an ``anatomy.Site`` or a (path, at) pair."""
    path, at = (site, "output") if isinstance(site, str) else tuple(site)
    return hooks.normalize(path), at


@dataclass
class TraceResult:
    """Metric of the clean row (*), the corrupted row (*) and each restoration (R, *) or grid (L, P, *)."""
    clean: torch.Tensor
    corrupted: torch.Tensor
    restored: torch.Tensor
    labels: dict = field(default_factory=dict)  # e.g. layers, positions, kind, window

    @property
    def effect(self) -> torch.Tensor:
        """Indirect effect: restored - corrupted, shaped like ``restored``."""
        return self.restored - self.corrupted

    @property
    def normalized(self) -> torch.Tensor:
        """(restored - corrupted) / (clean - corrupted): 0 = no recovery, 1 = full."""
        return self.effect / (self.clean - self.corrupted)


def _restore_fn(clean: torch.Tensor, wanted: list):
    """fn for ``hooks.edit``: rows listed in ``wanted`` as (row, positions) get ``clean`` there.

    One ``torch.where`` with a (B,) or (B, T) mask copies the values exactly, whatever mix of
    position sets the rows of a batch restore.
    """
    def fn(h):
        per_token = any(pos is not None for _, pos in wanted)
        mask = torch.zeros(h.shape[:2] if per_token else h.shape[:1], dtype=torch.bool, device=h.device)
        for row, pos in wanted:
            if per_token:
                mask[row, slice(None) if pos is None else torch.as_tensor(pos, device=h.device)] = True
            else:
                mask[row] = True
        mask = mask.reshape(*mask.shape, *[1] * (h.dim() - mask.dim()))
        return torch.where(mask, clean.to(h.device, h.dtype), h)
    return fn


@contextmanager
def _restoring(model, chunk, cache):
    """Restore the cached clean values for the restorations of one batch (row j = chunk[j])."""
    by_site = {}
    for row, restoration in enumerate(chunk):
        for site, pos in restoration:
            by_site.setdefault(_site(site), []).append((row, [pos] if isinstance(pos, int) else pos))
    with ExitStack() as stack:
        for (path, at), wanted in by_site.items():
            stack.enter_context(hooks.edit(model, path, _restore_fn(cache[path, at], wanted), at=at))
        yield


def corrupt_and_restore(model: nn.Module, run: Callable, inputs, corruption, restorations: Sequence,
                        metric: Callable, batch_size: int = 32) -> TraceResult:
    """Score the clean input, the corrupted input and the corrupted input with each restoration.

    inputs: one example, a tensor (1, T) or a mapping of such tensors (``model(**inputs)`` style).
    run(batch) -> outputs of k rows. metric(outputs) -> (k, *) scores (e.g. answer probability).
    corruption: ``Noise``, ``Substitute``, the corrupted inputs themselves, or a list of these.
    restorations: R items, each a list of (site, positions) pairs; site = module path,
        ``anatomy.Site`` or (path, at); positions = None (all), an int or a list of ints. A window
        of layers is several pairs; ``[]`` restores nothing.
    Passes: 1 for [clean, corrupted] (caching the needed sites of the clean row), then
    ceil(R / batch_size) for the restorations. Returns ``TraceResult`` with ``restored`` (R, *).
    """
    corrupted, noises = _split_corruption(inputs, corruption)
    sites = sorted({_site(s) for r in restorations for s, _ in r})
    with torch.inference_mode():
        with ExitStack() as stack:
            traces = {at: stack.enter_context(hooks.trace(model, [p for p, a in sites if a == at], at=at))
                      for at in {a for _, a in sites}}
            for noise in noises:  # row 0 is clean, row 1 corrupted
                stack.enter_context(noise.apply(model, rows=[1]))
            base = metric(run(_cat(_repeat(inputs, 1), _repeat(corrupted, 1))))
        cache = {(p, a): traces[a][p][:1] for p, a in sites}  # (1, T, ...) of the clean row
        scores = []
        for i in range(0, len(restorations), batch_size):
            chunk = restorations[i:i + batch_size]
            # noise is entered last, so it runs first on a shared site and restoring can overwrite it
            with _restoring(model, chunk, cache), ExitStack() as stack:
                for noise in noises:
                    stack.enter_context(noise.apply(model))
                scores.append(metric(run(_repeat(corrupted, len(chunk)))).detach().cpu())
    base = base.detach().cpu()
    restored = torch.cat(scores) if scores else base[:0]
    return TraceResult(base[0], base[1], restored)


# ---------------------------------------------------------------- layer x position grids

KINDS = {"layer": "", "mlp": ".mlp", "attn": ".attn"}


def window(layer: int, size: int, n_layers: int, align: str = "center") -> range:
    """Layers restored together for ``layer``, clipped to [0, n_layers).

    ``"center"`` (ROME, MultimodalCausalTrace): [layer - size//2, layer - size//2 + size).
    ``"start"`` (LocoGen's windows): [layer, layer + size). Edge windows are shorter.
    """
    check_choice("align", align, ("center", "start"))
    start = layer - size // 2 if align == "center" else layer
    return range(max(0, start), min(n_layers, start + size))


def layer_sites(model: nn.Module, kind: str = "mlp", tower: str = None, family: str = None) -> list:
    """Hook sites of the ``kind`` ("layer" | "mlp" | "attn") output of every layer, in order."""
    check_choice("kind", kind, tuple(KINDS))
    prefix = f"{tower}." if tower else ""
    return [anatomy.resolve(model, f"{prefix}layer[{i}]{KINDS[kind]}", family)
            for i in range(anatomy.n_layers(model, tower, family))]


def trace_grid(model: nn.Module, run: Callable, inputs, corruption, metric: Callable, kind: str = "mlp",
               positions: Sequence = None, window_size: int = 1, align: str = "center", tower: str = None,
               family: str = None, batch_size: int = 32) -> TraceResult:
    """Restore ``kind`` outputs of a window of layers at one position (or group), for every pair.

    positions: P entries, each an int or a list of ints restored jointly (e.g. every image
    token); default every position 0..T-1. Cell (l, p) restores ``window(l, window_size, L,
    align)`` at positions[p]. Returns ``TraceResult`` with ``restored`` (L, P, *) and labels.
    """
    sites = layer_sites(model, kind, tower, family)
    n = len(sites)
    positions = list(range(_seq_len(inputs))) if positions is None else list(positions)
    restorations = [[(sites[j], pos) for j in window(layer, window_size, n, align)]
                    for layer in range(n) for pos in positions]
    res = corrupt_and_restore(model, run, inputs, corruption, restorations, metric, batch_size)
    res.restored = res.restored.reshape(n, len(positions), *res.restored.shape[1:])
    res.labels = dict(kind=kind, window=window_size, align=align, layers=list(range(n)),
                      positions=positions, paths=[s.path for s in sites])
    return res


# ---------------------------------------------------------------- restore from a reference row


def _row_pairs(batch: int, rows, src: int, cfg: bool, branches: str):
    """(target rows, source rows) of the module batch for sample indices ``rows`` <- ``src``."""
    if not cfg:
        return list(rows), [src] * len(rows)
    if batch % 2:
        raise BadParameter(f"cfg=True expects a batch [uncond..., cond...] of even size, got {batch}")
    n = batch // 2
    offsets = {"both": (0, n), "cond": (n,), "uncond": (0,)}[branches]
    return [o + r for o in offsets for r in rows], [o + src for o in offsets for _ in rows]


@contextmanager
def restore_from_row(model: nn.Module, plan: Mapping, src: int = 0, cfg: bool = False,
                     restore_branches: str = "both", positions=None):
    """On every call of each site's module, copy row ``src``'s output into that site's target rows.

    plan: {site: target sample indices}; site = path, ``anatomy.Site`` or (path, at). Rows are
    samples: with ``cfg=True`` the module batch is [uncond of samples 0..N-1, cond of samples
    0..N-1] (diffusers' ``torch.cat([uncond, cond])``), and ``restore_branches`` picks which
    half is restored: "both" (Eq. 5.5), "cond" or "uncond". positions: None (whole row) or the
    dim-1 indices to copy. ``src`` itself is never edited, so it stays the clean reference.
    """
    check_choice("restore_branches", restore_branches, ("both", "cond", "uncond"))

    def copier(rows):
        def fn(h):
            if max(rows) >= (h.shape[0] // 2 if cfg else h.shape[0]):
                raise BadParameter(f"target rows {rows} out of range for a batch of {h.shape[0]} (cfg={cfg})")
            tgt, srcs = (torch.as_tensor(x, device=h.device)
                         for x in _row_pairs(h.shape[0], rows, src, cfg, restore_branches))
            if positions is None:
                return h.index_put((tgt,), h[srcs])
            pos = torch.as_tensor(positions, device=h.device)
            return h.index_put((tgt[:, None], pos[None]), h[srcs[:, None], pos[None]])
        return fn

    with ExitStack() as stack:
        for site, rows in plan.items():
            rows = [rows] if isinstance(rows, int) else list(rows)
            if not rows:
                continue
            if src in rows:
                raise BadParameter(f"row {src} is the reference row; it cannot also be a target")
            path, at = _site(site)
            stack.enter_context(hooks.edit(model, path, copier(rows), at=at))
        yield


# ---------------------------------------------------------------- text-to-image pipelines (Chapter 5)


def _token_embedding(text_model: nn.Module) -> str:
    """Path of a CLIP or T5 text tower's token embedding (before CLIP's position embeddings)."""
    embed = anatomy.resolve(text_model, "embed").path
    return f"{embed}.token_embedding" if hasattr(text_model.get_submodule(embed), "token_embedding") else embed


def span_sigma(text_model: nn.Module, tokenizer, prompts_and_spans) -> float:
    """ROME's sigma over a probe set: the std of the token embeddings of every subject token of the
    (prompt, span) pairs (repeats count), for ``subject_noise(sigma=...)``."""
    ids = []
    for prompt, span in prompts_and_spans:
        row = tokenizer([prompt], return_tensors="pt").input_ids[0]
        ids.append(row[subject_positions(tokenizer, row, span)])
    return noise_scale(text_model.get_submodule(_token_embedding(text_model)), torch.cat(ids))


def subject_noise(text_model: nn.Module, tokenizer, input_ids: torch.Tensor, span: str, nu: float = 3.0,
                  seed: int = 0, sigma: float | None = None) -> "Noise":
    """ROME's corruption of ``span`` in one prompt's ids (1, T): Gaussian noise (nu x sigma) on the
    token-embedding output of a CLIP or T5 text tower at the span's positions. sigma: the probe set's
    (``span_sigma``, ROME's rule); None: that of this span's own tokens."""
    path = _token_embedding(text_model)
    subject = subject_positions(tokenizer, input_ids[0], span)
    if sigma is None:
        sigma = noise_scale(text_model.get_submodule(path), input_ids[0, subject])
    return Noise(path, subject, sigma, nu=nu, seed=seed)


def trace_text_states(text_model: nn.Module, input_ids: torch.Tensor, corruption, restorations: Sequence = (),
                      batch_size: int = 32, states: Callable | None = None,
                      inputs: Callable | None = None) -> torch.Tensor:
    """Conditionings (2 + R, T, d): the clean and corrupted text-encoder outputs, then one per restoration.

    input_ids (1, T); corruption a ``Noise`` on the token embedding (or any ``corrupt_and_restore``
    corruption); restorations as in ``corrupt_and_restore``, e.g. ``[[(site, [p])]]`` restores one
    (module, position) state. The UNet then renders each row (Eq. 5.7): see ``sample_rows``.
    ``states`` (output with hidden states -> (rows, ...)) picks what the UNet reads instead of
    ``last_hidden_state`` (SD-XL: the penultimate layer; see ``trace_sdxl_text_states``). ``inputs``
    (ids (rows, T) -> the encoder's keyword arguments): the pipeline's ``text_inputs`` (IF: T5 with its
    padding mask); default the ids alone.
    """
    inputs = inputs or (lambda ids: {"input_ids": ids})
    input_ids = input_ids.to(next(text_model.parameters()).device)  # tokenizers return CPU ids; the tower may not be
    def hidden(h):
        if states is not None:
            return states(h)
        return h.last_hidden_state if hasattr(h, "last_hidden_state") else h
    res = corrupt_and_restore(text_model, lambda ids: text_model(**inputs(ids), output_hidden_states=states is not None),
                              input_ids, corruption, list(restorations), hidden, batch_size)
    return torch.cat([res.clean[None], res.corrupted[None], res.restored])


def trace_sdxl_text_states(pipe, prompt: str, span: str, restorations: Sequence = (),
                           restorations_2: Sequence = (), nu: float = 3.0, seed: int = 0, sigmas: tuple = (None, None)) -> tuple:
    """SD-XL's text tracing (§5.7): the subject's token embeddings corrupted in *both* towers, one
    state restored at a time in either; the conditioning of each row rebuilt as the pipeline builds it.

    restorations / restorations_2: lists of (site, positions) pairs in the first / second tower (as
    in ``corrupt_and_restore``). Returns (conds (2 + R1 + R2, T, d1 + d2), added) with rows clean,
    corrupted, then R1 rows (tower 1 restored, tower 2 corrupted), then R2 rows (the reverse), and
    ``added`` = {"text_embeds": (rows, p) from the second tower, "time_ids": (rows, 6)} for ``sample_rows``.
    sigmas: each tower's noise scale (``span_sigma`` over the probe set); None: the span's own.
    """
    towers = []
    for model, tok, rest, sigma in ((pipe.text_model, pipe.tokenizer, restorations, sigmas[0]),
                                    (pipe.text_model_2, pipe.tokenizer_2, restorations_2, sigmas[1])):
        ids = tok([prompt], padding="max_length", truncation=True, max_length=tok.model_max_length,
                  return_tensors="pt").input_ids.to(model.device)
        noise = subject_noise(model, tok, ids, span, nu, seed, sigma=sigma)
        second = model is pipe.text_model_2
        T = ids.shape[1]

        def pack(out, second=second):  # tower 2 also carries its pooled projection, flattened behind the states
            h = out.hidden_states[-2].flatten(1)
            return torch.cat([h, out.text_embeds], dim=1) if second else h
        rows = trace_text_states(model, ids, noise, rest, states=pack)
        towers.append((rows, T))
    (one, T), (two, _) = towers
    r1, r2 = len(restorations), len(restorations_2)
    first = torch.cat([one[:2 + r1], one[1:2].expand(r2, -1)])                     # tower 2's rows: tower 1 corrupted
    second = torch.cat([two[:2], two[1:2].expand(r1, -1), two[2:]])
    d2 = pipe.text_model_2.config.hidden_size
    conds = torch.cat([first.view(len(first), T, -1), second[:, :T * d2].view(len(second), T, d2)], dim=-1)
    pooled = second[:, T * d2:]
    return conds, {"text_embeds": pooled, "time_ids": pipe.time_ids(len(conds)).to(pooled)}


def sample_rows(pipe, conds: torch.Tensor, seed: int = 0, batch_size: int = 64, added: dict | None = None,
                **sampler) -> torch.Tensor:
    """Images (N, 3, H, W) of conditionings (N, T, d) that all ride one noise draw (z_T and step noise);
    ``added`` (SD-XL's pooled text and time ids, N rows each) is sliced with them."""
    noise = pipe.draw_noise(1, seed)
    return torch.cat([pipe.sample(conds[i:i + batch_size], seed=seed, noise=noise, batch_size=batch_size,
                                  added=None if added is None else {k: v[i:i + batch_size] for k, v in added.items()},
                                  **sampler)
                      for i in range(0, len(conds), batch_size)])


def trace_unet_layers(pipe, clean: torch.Tensor, corrupted: torch.Tensor, layers: Sequence, seed: int = 0,
                      batch_size: int = 16, restore_branches: str = "both", added: dict | None = None,
                      **sampler) -> torch.Tensor:
    """Images (2 + L, 3, H, W): clean, corrupted, then the corrupted caption with UNet layer j restored.

    clean, corrupted: conditionings (1, T, d). layers: L items, each a module path or a list of paths
    restored together in one sample (a resolution level, every cross-attention, ...). Each batch runs
    [clean, corrupted, restored...] through one sampling loop; at every UNet call item j's outputs in
    sample 2 + j are overwritten by the clean sample's (both CFG halves unless ``restore_branches`` says
    otherwise, Eq. 5.5).
    Every sample keeps its own latent trajectory and all share one noise draw, so the clean row
    is recomputed per batch (identical each time). ``batch_size`` layers per sampling loop.
    ``added``: SD-XL's pooled text and time ids of the clean and the corrupted caption (2 rows each).
    """
    noise, out = pipe.draw_noise(1, seed), []
    for i in range(0, len(layers), batch_size):
        chunk = list(layers[i:i + batch_size])
        conds = torch.cat([clean, corrupted.expand(1 + len(chunk), -1, -1)])
        plan = {}
        for j, item in enumerate(chunk):
            for layer in ([item] if isinstance(item, str) else item):
                plan.setdefault(layer, []).append(2 + j)
        rows = None if added is None else {k: torch.cat([v[:1], v[1:2].expand(1 + len(chunk), *v.shape[1:])])
                                           for k, v in added.items()}
        with restore_from_row(pipe.unet, plan, src=0, cfg=True, restore_branches=restore_branches):
            images = pipe.sample(conds, seed=seed, noise=noise, batch_size=len(conds), added=rows, **sampler)
        out.append(images if not out else images[2:])
    return torch.cat(out)


def restoration_score(clean, corrupted, restored, eps: float = 1e-9):
    """R = (restored - corrupted) / (clean - corrupted), the fraction of the corruption's damage a
    restoration undoes. clean, corrupted (...) and restored (..., L): scores averaged over captions.
    nan where the corruption did no damage (clean <= corrupted): there is nothing to restore.

    R is rounded to 12 decimals: averaged 0 / 1 verdicts make it a ratio of counts, and float rounding
    of the means must not decide a threshold such as R >= 0.5 (of 12 captions, 11 clean, 5 corrupted and
    8 restored undo exactly half the damage, which float means would read as 0.49999999999999994)."""
    corrupted = torch.as_tensor(corrupted, dtype=torch.float64)[..., None]
    gap = torch.as_tensor(clean, dtype=torch.float64)[..., None] - corrupted
    r = torch.round((torch.as_tensor(restored, dtype=torch.float64) - corrupted) / gap, decimals=12)
    return torch.where(gap > eps, r, torch.full_like(r, float("nan")))


# ---------------------------------------------------------------- token roles (ROME's aggregation)

ROLES = ("prefix", "first subject", "middle subject", "last subject", "first subsequent", "further", "last")


def token_roles(positions: Sequence[int], subject: Sequence[int], last: int) -> list:
    """ROME's role of each traced position relative to a subject (constraint) span.

    positions: the P traced positions (ints); subject: the span's positions; last: the prompt's last
    position. A one-token subject is "last subject". Returns P role names from ``ROLES``.
    """
    subject = list(subject)
    roles = []
    for p in positions:
        if p == last:
            roles.append("last")
        elif p < subject[0]:
            roles.append("prefix")
        elif p == subject[-1]:
            roles.append("last subject")
        elif p == subject[0]:
            roles.append("first subject")
        elif p < subject[-1]:
            roles.append("middle subject")
        elif p == subject[-1] + 1:
            roles.append("first subsequent")
        else:
            roles.append("further")
    return roles


def by_role(grid: torch.Tensor, roles: Sequence[str], order: Sequence[str] = ROLES) -> torch.Tensor:
    """(L, R) mean over the positions of each role of a (L, P) grid; NaN where a role is absent."""
    cols = []
    for role in order:
        idx = [i for i, r in enumerate(roles) if r == role]
        cols.append(grid[:, idx].mean(1) if idx else torch.full((grid.shape[0],), float("nan")))
    return torch.stack(cols, 1)


# ---------------------------------------------------------------- traces of many prompt pairs


@dataclass
class PromptPair:
    """One clean / corrupted pair of a trace, the same length, as the model's inputs (mappings of
    (1, T, ...) tensors); ``spans``: named position lists (e.g. the constraint); ``last``: the
    position that predicts the answer; ``answer``: the token id whose probability is the metric."""
    clean: dict
    corrupted: dict
    spans: dict
    last: int
    answer: int
    meta: dict = field(default_factory=dict)


def answer_probability(last: int, answer: int) -> Callable:
    """metric(logits (B, T, V)) -> (B,) softmax probability of ``answer`` at position ``last``."""
    return lambda logits: logits[:, last].float().softmax(-1)[:, answer]


def trace_pairs(model: nn.Module, run, pairs: Sequence[PromptPair], kind: str = "mlp",
                window_size: int = 1, positions: Callable = None, tower: str = None, batch_size: int = 64,
                progress: bool = True) -> list:
    """``trace_grid`` of each pair: a list of ``TraceResult`` whose ``restored`` is (L, P).

    run: one callable, or one per pair (e.g. the runs of ``cached_prefix``). positions(pair) -> the
    P positions (ints or lists restored jointly) to trace; default every position from the first
    span's start to ``last``.
    """
    from tqdm.auto import tqdm
    runs = run if isinstance(run, Sequence) else [run] * len(pairs)
    out = []
    for pair, run_one in tqdm(list(zip(pairs, runs)), desc=f"trace {kind} w{window_size}", disable=not progress,
                              mininterval=5):
        pos = positions(pair) if positions else list(range(min(min(s) for s in pair.spans.values()), pair.last + 1))
        out.append(trace_grid(model, run_one, pair.clean, pair.corrupted, answer_probability(pair.last, pair.answer),
                              kind, pos, window_size, tower=tower, batch_size=batch_size))
    return out


def effective_pairs(run: Callable, pairs: Sequence[PromptPair], min_clean: float) -> tuple:
    """(kept pairs, (N, 2) probabilities): the pairs worth tracing, P_clean(answer) >= ``min_clean`` and
    the corruption lowering it (spec 2.4 step 2); each pair's meta gets ``p_clean`` and ``p_corr``."""
    p = pair_probabilities(run, pairs)
    for pair, (clean, corrupted) in zip(pairs, p.tolist()):
        pair.meta.update(p_clean=clean, p_corr=corrupted)
    keep = (p[:, 0] >= min_clean) & (p[:, 1] < p[:, 0])
    return [pair for pair, k in zip(pairs, keep.tolist()) if k], p


@torch.inference_mode()
def pair_probabilities(run: Callable, pairs: Sequence[PromptPair]) -> torch.Tensor:
    """(N, 2) probability of each pair's answer on its clean and its corrupted input (one pass each)."""
    out = []
    for pair in pairs:
        logits = run(_cat(pair.clean, pair.corrupted))
        out.append(answer_probability(pair.last, pair.answer)(logits).cpu())
    return torch.stack(out)


def cached_prefix(model: nn.Module, pair: PromptPair, start: int) -> tuple:
    """(suffix pair, run): trace a pair from position ``start`` on, its shared prefix run once.

    The clean and corrupted inputs must agree before ``start`` (e.g. the image tokens and chat prefix
    of a question whose constraint is corrupted), so the prefix's keys and values are the same for
    every restored row: they are computed once and every batch continues them (a transformers
    ``DynamicCache`` per call, expanded to the batch). Positions of the returned pair (spans, last)
    are relative to ``start``; restoring a prefix position is not possible (its effect is 0 exactly).
    run(batch of suffix inputs) -> logits (B, T - start, V).
    """
    from transformers import DynamicCache
    for key, value in pair.clean.items():
        if not torch.equal(value[:, :start], pair.corrupted[key][:, :start]):
            raise BadParameter(f"clean and corrupted '{key}' differ before position {start}; no shared prefix")
    with torch.no_grad():
        past = model(**{k: v[:, :start] for k, v in pair.clean.items()}, use_cache=True).past_key_values
    layers = [(layer.keys, layer.values) for layer in past.layers]

    def run(batch):
        rows = next(iter(batch.values())).shape[0]
        cache = DynamicCache()
        for i, (k, v) in enumerate(layers):
            cache.update(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1), i)
        return model(**batch, past_key_values=cache, use_cache=True).logits

    suffix = PromptPair({k: v[:, start:] for k, v in pair.clean.items()},
                        {k: v[:, start:] for k, v in pair.corrupted.items()},
                        {name: [p - start for p in span] for name, span in pair.spans.items()}, pair.last - start,
                        pair.answer, {**pair.meta, "offset": start})
    return suffix, run
