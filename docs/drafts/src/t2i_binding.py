"""Where the zoo t2i loses attribute binding (docs/drafts/STATUS.md, ch09, 2026-12-06).

1. ``probe``: does the frozen text tower keep each object's colour at its own noun? Logistic probes on the
   final states of "a C1 T1 S1 and a C2 T2 S2" (noun 1 -> C1, noun 2 -> C2 and C1, EOS -> both).
2. ``finetune``: with the tower frozen, does more two-object data teach the UNet to read it? The UNet
   (all weights, or rank-``lora`` adapters on its attention) trained on a pair-heavy mix, ``t2i.fidelity``
   every ``eval_every`` steps. Nothing is saved or shipped.
3. ``bindtune``: the twelfth session's longer run, resumable (build/zoo/t2i_bind/state.pt, the zoo's training
   loop): rank-16 LoRA on the UNet's attention, 85 % pairs, lr 1e-3, batch 32, ``--steps`` in all; prints
   ``t2i.fidelity`` (n = 200) before and after. Nothing is shipped.
4. ``claims``: Chapter 9's failing hard claims, the draft's recipe, on the shipped t2i or (``--state``) on
   bindtune's adapters: baseline VQA on the held-out prompts and single-object prompts, c* (12 colour prompts,
   lr 1e-2 and 1e-3), CLP / WiCLP (colour; best 1 of 8 own samples of 400 train prompts, 250 steps).
5. ``splice``: is the leakage what breaks the binding? For held-out "a C1 S1 and a C2 S2" the tower's causal
   states at "a C1 S1" see nothing else; every later state also sees C1. The spliced conditioning keeps
   positions 0-3 and takes the rest from "a plain S1 and a C2 S2" (same length, no C1 after position 3).
   VQA of the same noise under c and under the splice (shipped t2i, or ``--state``).
6. ``dscore``: Fig 9.1's diffusion score (the draft's recipe: 20 paired draws, 120 Winoground-tiny items, object
   kind; 150 ARO-tiny attribution items) on the shipped t2i or (``--state``) bindtune's: does a UNet that binds
   better score binding better?
7. ``sds``: Table 9.1's claim `sds_helps` with that teacher, the draft's recipe: lambda from {0.1, 1, 10} on the
   validation copy, then FT L_CLIP and FT + L_SDS (150 steps, batch 16) with 3 seeds, Winoground-tiny text score on
   the test copy (120 items). ``sds-reach``: how far the SDS term moves the student: the parameter distance between
   the lambda = 0 run and the lambda = 0.1 / 10 runs (same seed, same batches), beside the distance from vanilla.

    OMP_NUM_THREADS=1 python docs/drafts/src/t2i_binding.py probe
    OMP_NUM_THREADS=1 python docs/drafts/src/t2i_binding.py finetune --steps 3000 --pair 0.8 --ema 0.998 --n-eval 400
    OMP_NUM_THREADS=2 python docs/drafts/src/t2i_binding.py bindtune --steps 4500
    OMP_NUM_THREADS=2 python docs/drafts/src/t2i_binding.py claims --state
"""
import argparse
import contextlib
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from interplab import conditioning
from interplab import toyworld as tw
from interplab.lora import LoRA
from interplab.zoo import loop, store
from interplab.zoo import oracle as zo
from interplab.zoo import t2i as base
from interplab.zoo.oracle import load as load_oracle

BIND_RANK, BIND_MIX = 16, {"single": 0.15, "pair": 0.85}


@torch.no_grad()
def probe(encode=None, n: int = 3000, n_train: int = 2000, seed: int = 0) -> dict:
    """Held-out accuracy of a linear read-out of a colour from one token's final state (chance 1/8).
    encode(captions) -> final token states (n, T, d); default: the shipped t2i's text tower."""
    if encode is None:
        model = base.load()
        encode = lambda caps: model.text_model(input_ids=model.tokenize(caps)).last_hidden_state  # noqa: E731
    rng = np.random.default_rng(seed)
    captions, c1, c2 = [], [], []
    for _ in range(n):
        a = tw.captions.random_object(rng, base.DARK, "top left")
        b = tw.captions.random_object(rng, base.DARK, "top right")
        captions.append(f"{tw.phrase(a, ('colour', 'texture', 'shape'))} and {tw.phrase(b, ('colour', 'texture', 'shape'))}")
        c1.append(a.colour)
        c2.append(b.colour)
    states = encode(captions).numpy()   # (n, T, d)
    # token 0 is BOS, then "a C1 T1 S1 and a C2 T2 S2", then EOS: noun 1 at 4, noun 2 at 9, EOS at 10
    reads = {"noun 1 -> colour 1": (4, c1), "noun 2 -> colour 2": (9, c2), "noun 2 -> colour 1": (9, c1),
             "EOS -> colour 1": (10, c1), "EOS -> colour 2": (10, c2)}
    out = {}
    for name, (pos, y) in reads.items():
        clf = LogisticRegression(max_iter=2000).fit(states[:n_train, pos], y[:n_train])
        out[name] = round(float(clf.score(states[n_train:, pos], y[n_train:])), 3)
    return out


def finetune(steps: int, pair: float, lr: float, lora: int, ema_decay: float, eval_every: int, n_eval: int,
             batch_size: int = 32, seed: int = 0) -> None:
    oracle, model = load_oracle(), base.load()
    model.text_model.requires_grad_(False)
    mix = {"single": 1 - pair, "pair": pair}
    if lora:
        model.unet.requires_grad_(False)
        adapters = LoRA(model.unet, lora, seed=seed)
        opt = torch.optim.AdamW(adapters.parameters(), lr=lr, weight_decay=0.0)
        attached = lambda: adapters.attached(model.unet)  # noqa: E731
    else:
        opt = torch.optim.AdamW(model.unet.parameters(), lr=lr, weight_decay=0.01)
        attached = contextlib.nullcontext
    ema = loop.EMA(model.unet, decay=ema_decay) if ema_decay and not lora else None
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)

    def evaluate(step):
        model.unet.eval()
        live = None
        if ema is not None and step:
            live = {k: v.clone() for k, v in model.unet.state_dict().items()}
            model.unet.load_state_dict(ema.state_dict())
        with attached():
            fid = base.fidelity(model, oracle, n=n_eval)
        if live is not None:
            model.unet.load_state_dict(live)
        print(step, {k: round(v, 3) for k, v in fid.items()}, flush=True)

    evaluate(0)
    t0 = time.process_time()
    for i in range(1, steps + 1):
        model.unet.train()
        ex, images = base.render(rng, batch_size, jitter=base.UNET_JITTER, mix=mix)
        captions = [e.caption if rng.random() >= 0.1 else "" for e in ex]   # caption dropout, as t2i
        with torch.no_grad():
            cond = model.text_model(input_ids=model.tokenize(captions)).last_hidden_state
        with attached():
            loss = base.diffusion_loss(model, images, cond, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update(model.unet, i)
        if i % 100 == 0:
            print(f"step {i} loss {loss.item():.4f} {time.process_time() - t0:.0f} CPU-s", flush=True)
        if i % eval_every == 0:
            evaluate(i)


def bindtune(steps: int, batch_size: int = 32, seed: int = 0, lr: float = 1e-3, eval_n: int = 200) -> None:
    """Rank-16 LoRA adapters on the t2i's UNet attention, trained with t2i's loss on BIND_MIX (caption dropout
    0.1, tower frozen) by the zoo's resumable loop; a second call with more steps extends the run."""
    oracle, model = load_oracle(), base.load()
    model.unet.requires_grad_(False)
    model.text_model.requires_grad_(False)
    torch.manual_seed(seed)
    adapters = LoRA(model.unet, BIND_RANK, seed=seed)
    opt = torch.optim.AdamW(adapters.parameters(), lr=lr, weight_decay=0.0)

    before = base.fidelity(model, oracle, n=eval_n)
    run = loop.train("t2i_bind", {"lora": adapters}, opt, base.lora_step(model, adapters, batch_size, BIND_MIX), steps, seed)
    adapters.merge(model.unet)
    after = base.fidelity(model, oracle, n=eval_n)
    print({"t2i": before, "tuned": after, "wall_time_s": run["wall_time_s"], "cpu_time_s": run["cpu_time_s"]})


def load_pipe(state: bool):
    """The shipped t2i, or (state) the t2i with bindtune's saved adapters merged."""
    pipe = base.load()
    if state:
        saved = store.load_state("t2i_bind")
        adapters = LoRA(pipe.unet, BIND_RANK)
        adapters.load_state_dict(saved["modules"]["lora"])
        adapters.merge(pipe.unet)
        print("bindtune's adapters after", saved["step"], "steps")
    return pipe


@torch.no_grad()
def splice(state: bool, seed: int = 0, n: int = 8, n_prompts: int = 48) -> None:
    oracle, pipe = load_oracle(), load_pipe(state)
    items = tw.composition_prompts("colour", "test", n_prompts, seed + 9700, pal=base.DARK)
    neutral = [f"a plain {p[0]['shape']} and a {p[1]['colour']} {p[1]['shape']}" for _, _, p in items]
    c = pipe.encode([cap for cap, _, _ in items])
    spliced = torch.cat([c[:, :4], pipe.encode(neutral)[:, 4:]], dim=1)
    phrases = [p for _, _, p in items for _ in range(n)]
    for name, cond in (("c", c), ("spliced", spliced)):
        scores = zo.phrase_score(oracle, pipe.sample(cond.repeat_interleave(n, 0), seed=seed), phrases)
        print(f"{name}: VQA {scores.mean():.3f} +- {scores.std() / np.sqrt(len(scores)):.3f} ({len(items)} prompts x {n})", flush=True)


@torch.no_grad()
def dscore(state: bool, seed: int = 0, samples: int = 20) -> None:
    from interplab.toyworld import binding
    pipe = load_pipe(state)
    wino, aro = binding.winoground(120, seed + 9100), binding.aro(150, seed + 9200, "attribution")
    objects = [i for i, k in enumerate(wino["kind"]) if k == "object"]
    D = torch.stack([conditioning.diffusion_score(pipe, wino["images"][i], pipe.encode(list(wino["captions"][i])),
                                                  n=samples, seed=seed + i) for i in objects])   # (n, 2 images, 2 captions)
    d = torch.cat([conditioning.diffusion_score(pipe, aro["images"][i:i + 1], pipe.encode([aro["true"][i], aro["false"][i]]),
                                                n=samples, seed=seed + i) for i in range(len(aro["true"]))])
    print(f"Winoground-tiny object text score {binding.winoground_scores(-D)['text']:.3f} ({len(objects)} items), "
          f"ARO-tiny attribution {float((d[:, 0] < d[:, 1]).float().mean()):.3f} ({len(aro['true'])} items)")


def sds_student(pipe, clip_model, clip_tok, lam: float, seed: int):
    """The zoo CLIP fine-tuned as ch09's Table 9.1 does (LayerNorms and h_w, 150 steps at batch 16), teacher ``pipe``."""
    from interplab import distillation
    from interplab.zoo import clip as zc
    student = distillation.SdsClip(clip_model, pipe.latent_shape)
    distillation.finetune(student, lambda caps: tw.encode(clip_tok, caps)[0], pipe, lambda rng: zc.batch(rng, 16),
                          lam=lam, steps=150, seed=seed, progress=False)
    return student.clip


def sds(state: bool, seed: int = 0) -> None:
    from interplab.toyworld import binding
    from interplab.zoo import clip as zc
    pipe = load_pipe(state)
    clip_model, clip_tok = zc.load()

    def text_score(model, wino):
        n = len(wino["captions"])
        im = zc.embed_images(model, wino["images"].view(-1, 3, 32, 32)).view(n, 2, -1)
        tx = zc.embed_text(model, clip_tok, [c for pair in wino["captions"] for c in pair]).view(n, 2, -1)
        return binding.winoground_scores(torch.einsum("nid,njd->nij", im, tx))["text"]

    def finetuned(lam, ft_seed):
        return sds_student(pipe, clip_model, clip_tok, lam, ft_seed)

    test, val = binding.winoground(120, seed + 9100), binding.winoground(120, seed + 9300)
    grid = {lam: text_score(finetuned(lam, seed), val) for lam in (0.1, 1.0, 10.0)}
    lam_star = max(grid, key=grid.get)
    ft = [text_score(finetuned(0.0, seed + 100 + s_), test) for s_ in range(3)]
    with_sds = [text_score(finetuned(lam_star, seed + 100 + s_), test) for s_ in range(3)]
    print(f"validation per lambda {grid} -> {lam_star}; Winoground-tiny text: vanilla {text_score(clip_model, test):.3f}, "
          f"FT L_CLIP {np.mean(ft):.3f} {ft}, FT + SDS {np.mean(with_sds):.3f} {with_sds}")


def sds_reach(state: bool, seed: int = 100) -> None:
    from interplab.zoo import clip as zc
    pipe = load_pipe(state)
    clip_model, clip_tok = zc.load()
    vanilla = {k: p.detach() for k, p in clip_model.named_parameters()}
    tuned = {}
    for lam in (0.0, 0.1, 10.0):
        tuned[lam] = {k: p.detach() for k, p in sds_student(pipe, clip_model, clip_tok, lam, seed).named_parameters()}

    def distance(a, b):
        return sum(float((a[k] - b[k]).norm()) ** 2 for k in vanilla) ** 0.5

    for lam in (0.1, 10.0):
        print(f"lambda {lam}: moved {distance(tuned[lam], vanilla):.4f} from vanilla, {distance(tuned[lam], tuned[0.0]):.5f} "
              f"from the lambda = 0 run")


def claims(state: bool, seed: int = 0, n: int = 4) -> None:
    oracle, pipe = load_oracle(), load_pipe(state)

    def vqa(conds, items, k=n):
        with torch.no_grad():
            images = pipe.sample(conds.repeat_interleave(k, 0), seed=seed)
        return float(zo.phrase_score(oracle, images, [p for _, _, p in items for _ in range(k)]).mean())

    test = {c: tw.composition_prompts(c, "test", 24, seed + 9700, pal=base.DARK) for c in ("colour", "texture", "size")}
    rng = np.random.default_rng(seed + 9800)
    singles = [tw.captions.random_object(rng, base.DARK, "top left") for _ in range(48)]
    single = [(f"a {o.colour} {o.shape}", None, [{"shape": o.shape, "colour": o.colour}]) for o in singles]
    print("baseline", {c: round(vqa(pipe.encode([x[0] for x in it]), it), 3) for c, it in test.items()},
          "single", round(vqa(pipe.encode([x[0] for x in single]), single, 1), 3), flush=True)
    items = test["colour"][:12]
    pool = torch.stack([pipe.encode_images(torch.from_numpy(tw.render_batch(
        tw.composition_scenes(p, "colour", 8, seed + 50 + i, pal=base.DARK), seed=seed + i, noise=0.0)[0]))
        for i, (_, _, p) in enumerate(items)])
    c0 = pipe.encode([x[0] for x in items])
    for lr in (1e-2, 1e-3):
        c_star, losses = conditioning.fit_conditioning(pipe, c0, pool, steps=120, lr=lr, batch_size=24, seed=seed, progress=False)
        print(f"c* at lr {lr}: VQA c {vqa(c0, items):.3f} -> c* {vqa(c_star, items):.3f}; "
              f"denoising loss {np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f}", flush=True)
    train = tw.composition_prompts("colour", "train", 400, seed + 9900, pal=base.DARK)
    conds = pipe.encode([x[0] for x in train])
    with torch.no_grad():
        images = pipe.sample(conds.repeat_interleave(8, 0), seed=seed + 1)
    rating = torch.from_numpy(zo.phrase_score(oracle, images, [p for _, _, p in train for _ in range(8)])).float()
    best = (rating.view(len(train), 8).topk(1, dim=1).indices + 8 * torch.arange(len(train))[:, None]).flatten()
    latents = pipe.encode_images(images[best]).view(len(train), 1, *pipe.latent_shape)
    test_conds = pipe.encode([x[0] for x in test["colour"]])
    row = {"own samples' mean rating": round(float(rating.mean()), 3), "kept": round(float(rating[best].mean()), 3),
           "baseline": round(vqa(test_conds, test["colour"]), 3)}
    for name, s in (("CLP", 0), ("WiCLP", 1)):
        proj, _ = conditioning.fit_conditioning(pipe, conds, latents, transform=conditioning.WindowProjection(conds.shape[-1], s),
                                                steps=250, lr=1e-3, batch_size=16, seed=seed, progress=False)
        with torch.no_grad():
            row[name] = round(vqa(proj(test_conds), test["colour"]), 3)
    print("colour", row)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("probe", "finetune", "bindtune", "claims", "splice", "dscore", "sds", "sds-reach"))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--pair", type=float, default=0.6, help="share of two-object captions (the rest: single objects)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--lora", type=int, default=0, help="adapter rank (0: fine-tune every UNet weight)")
    parser.add_argument("--ema", type=float, default=0.0, help="EMA decay of the evaluated weights (0: the live weights)")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--n-eval", type=int, default=200, help="t2i.fidelity's n: n single prompts, n / 4 pairs")
    parser.add_argument("--state", action="store_true", help="claims, splice, dscore, sds, sds-reach: on bindtune's adapters (else the shipped t2i)")
    args = parser.parse_args()
    if args.what == "probe":
        print(probe())
    elif args.what == "bindtune":
        bindtune(args.steps, eval_n=args.n_eval)
    elif args.what == "claims":
        claims(args.state)
    elif args.what == "splice":
        splice(args.state)
    elif args.what == "dscore":
        dscore(args.state)
    elif args.what == "sds":
        sds(args.state)
    elif args.what == "sds-reach":
        sds_reach(args.state)
    else:
        finetune(args.steps, args.pair, args.lr, args.lora, args.ema, args.eval_every, args.n_eval)
