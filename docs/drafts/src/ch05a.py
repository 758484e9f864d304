# %% [markdown]
# # Chapter 5, part I — Causal tracing in text-to-image models and DIFF-QUICKFIX
#
# Where does a text-to-image model keep what it knows about style, objects, colours and actions? **Causal
# tracing** (§5.2) corrupts the caption's subject tokens with Gaussian noise (3σ of the token embeddings, ROME's
# rule), then restores *one* clean activation — a UNet layer at every denoising step, or one text-encoder state —
# and asks whether the generated image obeys the caption again. The dissertation finds knowledge *distributed*
# across the UNet but *localised* in the text encoder at a single state: the first self-attention layer at the
# last subject token. **DIFF-QUICKFIX** (§5.4) exploits that state: a closed-form least-squares update of layer
# 0's attention output projection maps a concept's keys onto a replacement's values, removing styles and objects
# or updating facts in well under a second.
#
# The library does the work: `interplab.tracing` (corruption, batched restoration in both halves of
# classifier-free guidance, text-state tracing), `interplab.editing` (closed-form key→value edit, DIFF-QUICKFIX
# rows), `interplab.erasure` (the fine-tuning baselines), `interplab.anatomy` (the UNet's traced layers in
# forward order).
#
# **`tiny` profile.** The zoo's text-to-image model (`t2i_action`: the zoo's `t2i`, a diffusers
# `UNet2DConditionModel` with SD-v1's four-level topology, 44 traced layers, 10 cross-attentions, on its own copy
# of the zoo's CLIP text tower, fine-tuned with the UNet as docs/toyworld.md explains) draws 32×32 scenes; "style"
# is texture named by invented two-token artists ("kel varo" = ribbed), mascots are invented objects, emblems are
# invented facts (docs/toyworld.md). An action is what a verb does to its subject's look: in "a photo of a
# circle floating" floating / drifting draw the object small, resting / wandering large. The t2i draws no place
# from words, so the world's first meaning of these verbs (a half of the image) could not be traced; `t2i_action`
# is the t2i taught the size meaning (LoRA on the UNet's attention and the verbs' token-embedding rows, zoo card),
# its cross-attentions each reading the empty caption a quarter of the time while it trained, so that no single
# layer's reading of the caption is indispensable (docs/toyworld.md). The
# zoo's attribute oracle plays the human rater; the zoo's CLIP (never edited) gives the tiny CLIP-Score. **`paper`** runs Stable Diffusion v1.4 with
# CLIP ViT-L/14-336 scores and the dissertation's probe set.

# %% tags=["parameters"]
profile = "tiny"
seed = 0
device = "auto"
out_dir = None
model_id = "CompVis/stable-diffusion-v1-4"   # paper profile
text_encoder_source = "pipeline"   # paper: "pipeline" (SD's own CLIP-L/14 text tower) or "clip-l-336" (the release)
attributes = None            # None: tiny the four the toy world draws (objects, style, color, action); paper Table 11.2's six
n_prompts_per_attribute = None  # probe captions traced per attribute (UNet and text encoder); None: tiny 12, paper 50 (spec)
n_validation = None           # further captions per attribute that calibrate the CLIP-Score threshold; None: tiny 2, paper 10 (§5.2.5)
threshold_ratings = {}        # paper: {attribute: [filled copies of threshold_study/<attribute>/human_study.csv, one per rater]}
num_inference_steps = None    # None: the model's sampler (tiny: 10 stochastic-DDIM steps; SD: 50 DDIM)
guidance_scale = None         # None: tiny 4.0, SD 7.5 (diffusers form; Eq. 5.3's alpha = w - 1)
noise_mult = 3.0              # nu: noise = nu * sigma * N(0, I) on the subject's token embeddings
edit_lambda = 0.01            # DIFF-QUICKFIX's regulariser (Eq. 5.9)
key_positions = "subject_and_after"  # DIFF-QUICKFIX rows: "subject_and_after" (release) or "subject" (Eq. 5.8)
bias_mode = "exact"           # "exact": v = W' k_v (Eq. 5.8); "as_released": v includes the bias
preserve_weight = None        # weight of rows that keep the layer's outputs on ordinary captions (None: tiny 1, paper 0 as released)
n_preserve_prompts = 256      # ordinary captions (tiny: the training grammar; paper: COCO objects in places) for those rows
n_edit_prompts = None         # evaluation prompts per edited concept; None: tiny 8, paper 10 (Concept-Ablation's eval files)
n_edit_seeds = None           # seeds per evaluation prompt; None: tiny 4 (32 images per concept), paper 5 (seeds 0-4)
run_baselines = True          # the two fine-tuning erasers of Fig 5.4b
baseline_steps = None         # None: tiny 100 at lr 1e-3; paper the releases' (ESD-x 1000 at 1e-5, Concept-Ablation 200 at 8e-6)

# %%
import contextlib
import time
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

import interplab
from interplab import anatomy, editing, erasure, hooks, human_study, prompts, tracing
from interplab import toyworld as tw
from interplab.models import load as load_zoo
from interplab.models.diffusion import ClipScore, StableDiffusion
from interplab.zoo import clip as zc
from interplab.zoo import oracle as zo
from interplab.zoo import store
from interplab.zoo import t2i as zt

attributes = interplab.by_profile(attributes, profile, ["objects", "style", "color", "action"],
                                  ["objects", "style", "color", "action", "viewpoint", "count"])
# tiny: the most captions that keep the chapter within 300 s on 2 cores (spec: scale them to the budget); with 4 the
# hard claims moved with a few images (docs/drafts/STATUS.md)
n_prompts_per_attribute = interplab.by_profile(n_prompts_per_attribute, profile, 12, 50)
n_validation = interplab.by_profile(n_validation, profile, 2, 10)
n_edit_prompts = interplab.by_profile(n_edit_prompts, profile, 8, 10)
n_edit_seeds = interplab.by_profile(n_edit_seeds, profile, 4, 5)  # tiny 1 (8 images) read the fact update in steps of 1/8
# the dissertation traces viewpoint and count but leaves them out of its findings (generations unreliable)
headline = [a for a in attributes if a not in ("viewpoint", "count")]
ch = interplab.start("ch05a_causal_tracing", profile=profile, seed=seed, device=device, out_dir=out_dir,
                     params=dict(model_id=model_id, text_encoder_source=text_encoder_source, attributes=attributes,
                                 n_prompts_per_attribute=n_prompts_per_attribute,
                                 n_validation=n_validation, num_inference_steps=num_inference_steps,
                                 guidance_scale=guidance_scale, noise_mult=noise_mult, edit_lambda=edit_lambda,
                                 bias_mode=bias_mode, n_edit_prompts=n_edit_prompts, n_edit_seeds=n_edit_seeds,
                                 run_baselines=run_baselines, baseline_steps=baseline_steps,
                                 threshold_ratings=threshold_ratings))
if ch.tiny:
    # t2i_action: the t2i with the action verbs drawn as sizes (LoRA on the UNet, the verbs' embedding rows; the t2i
    # draws no place from words, so the world's place-meaning of a verb could not be traced: docs/drafts/STATUS.md)
    pipe, oracle = load_zoo("t2i_action"), load_zoo("oracle")
    clip_model, clip_tok = load_zoo("clip")  # the CLIP-Score model: a separate copy, never edited
    clip_score = ClipScore(lambda x: zc.embed_images(clip_model, x), lambda t: zc.embed_text(clip_model, clip_tok, t))
else:
    pipe = StableDiffusion.from_pretrained(model_id, device=ch.device)  # ResourceUnavailable offline
    clip_score = ClipScore.from_pretrained(device=ch.device)            # CLIP ViT-L/14-336, as the release
    if text_encoder_source == "clip-l-336":
        # The dissertation calls the edited encoder "CLIP-ViT-L/336px"; the release notebook swaps the text tower of
        # openai/clip-vit-large-patch14-336 into the pipeline before editing. SD-v1.4 was trained with the
        # ViT-L/14 (224 px) tower, so the default edits the pipeline's own encoder; this option reproduces the release.
        from transformers import CLIPTextModel
        pipe.text_model = CLIPTextModel.from_pretrained("openai/clip-vit-large-patch14-336").to(ch.device).eval()
text = pipe.text_model
EMBED = ("text_model." if hasattr(text, "text_model") else "") + "embeddings.token_embedding"
sampler = {k: v for k, v in dict(steps=num_inference_steps, guidance=guidance_scale).items() if v is not None}
render_batch = 128 if ch.tiny else 16  # images per sampling loop where rows are independent


def show(ax, image, title=""):
    ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_title(title, fontsize=7)
    ax.axis("off")

# %% [markdown]
# ## The zoo model's gates (acceptance check 6)
#
# Tracing reads the oracle on generated images, so it is only meaningful where the model draws what it is
# asked for. The card's gates were measured when the model was shipped; the fidelity is re-measured here on
# fresh prompts, with the sampler this notebook uses.

# %%
if ch.tiny:
    card = store.read_card("t2i_action")
    fidelity = zt.fidelity(pipe, oracle, n=120, seed=seed + 40_000, **sampler)
    print("card gates:", {k: round(v["value"], 3) for k, v in card["gates"].items()})
    print("re-measured:", {k: round(v, 3) for k, v in fidelity.items()})
    ch.claim("zoo_gates", "the zoo t2i draws the prompted colour, shape and texture (oracle fidelity >= gate)",
             dissertation="n/a (SD-v1.4)", reproduced=min(fidelity[f"single_{k}"] for k in ("colour", "shape", "texture")),
             threshold=zt.GATE, op=">=")

# %% [markdown]
# ## The probe set (Table 11.2) and the corruption
#
# Per attribute, probe captions with the span tracing corrupts; `n_validation` more per attribute calibrate the
# CLIP-Score threshold (§5.2.5) and stay out of the statistics. tiny: the world's own templates; paper: the
# dissertation's rules (§11.4.1, `interplab.prompts`). σ is the standard deviation of the token-embedding entries
# of every subject token in the probe set (ROME's rule).

# %%
if ch.tiny:
    probes = {a: tw.trace_probes(a, n_prompts_per_attribute + n_validation, seed, action="size") for a in attributes}
    validation = {a: p[n_prompts_per_attribute:] for a, p in probes.items()}
    probes = {a: p[:n_prompts_per_attribute] for a, p in probes.items()}
else:
    split = {a: prompts.ch5_validation(prompts.ch5_probes(a), n=n_validation, seed=seed) for a in attributes}
    validation = {a: v for a, (v, _) in split.items()}
    probes = {a: rest[:n_prompts_per_attribute] for a, (_, rest) in split.items()}
ids_of, subject_of = {}, {}
for probe in [p for ps in list(probes.values()) + list(validation.values()) for p in ps]:
    ids_of[probe.caption] = pipe.tokenize([probe.caption]).to(text.device)  # the text encoder's device (paper: GPU)
    subject_of[probe.caption] = tracing.subject_positions(pipe.tokenizer, ids_of[probe.caption][0], probe.subject)
subject_ids = torch.cat([ids_of[c][0, s] for c, s in subject_of.items()])
sigma = tracing.noise_scale(text.get_input_embeddings(), subject_ids)
table = pd.DataFrame([dict(attribute=a, captions=len(probes[a]), validation=len(validation[a]),
                           examples=" | ".join(p.caption for p in probes[a][:3]), subject=probes[a][0].subject)
                      for a in attributes])
ch.table(table, "table11_2_probe_set")
print(table.to_string(index=False))
TABLE_11_2 = {"objects": "168 (161 unique)", "style": "560", "color": "560", "action": "56", "viewpoint": "96", "count": "96"}
ch.compare(f"Table 11.2 probe captions ({' / '.join(attributes)})",
           dissertation=" / ".join(TABLE_11_2[a] for a in attributes),
           reproduced=" / ".join(str(len(probes[a])) for a in attributes), note=f"{n_prompts_per_attribute} traced per attribute")
print(f"sigma = {sigma:.4f} (std of the subject tokens' embedding entries), noise = {noise_mult} sigma")


# Each caption's subject gets its own noise draw (its clean, corrupted and restored runs share it), as ROME
# draws fresh noise per prompt: one draw shared by every caption made a seed's whole corrupted column one sample
# of the noise, and whether a shape survived its corruption was that sample's luck.
noise_seed_of = {c: seed * 100_003 + i for i, c in enumerate(ids_of)}


def corruption(caption, nu=noise_mult):
    return tracing.Noise(EMBED, subject_of[caption], sigma, nu=nu, seed=noise_seed_of[caption])


def best_worst(r):
    """Indices of the highest and lowest restoration score (nan: the corruption did no damage)."""
    r = np.nan_to_num(np.asarray(r, float), nan=0.0)
    return int(r.argmax()), int(r.argmin())


def rate(images, probe):
    """Per image: tiny, the oracle's verdict (does it show what the caption asks for?); paper, CLIP-Score."""
    if ch.tiny:
        return zo.agreement(oracle, images, [probe.wanted] * len(images)).astype(float)
    return clip_score(images, [probe.caption] * len(images)).numpy()

# %% [markdown]
# ## UNet causal tracing (§5.2.3, Fig 5.2)
#
# For every probe caption one sampling loop runs [clean, corrupted, corrupted + layer j restored, ...]: at every
# DDIM step layer j's output in its sample is overwritten by the clean sample's, in both CFG halves (Eq. 5.5);
# every sample keeps its own trajectory and all share one noise draw. The restoration score of layer j is
# R = (acc_restored − acc_corrupted) / (acc_clean − acc_corrupted), with the oracle's accuracy on the probed
# attribute averaged over the attribute's captions; layer j is causal iff R ≥ 0.5 (spec §2.6).

# %%
layers = anatomy.items(pipe.unet, "layer")
labels = [anatomy.unet_layer_label(p) for p in layers]
group = np.array([lab.split("-")[0] for lab in labels])
layer_kind = np.array([lab.split("-")[-2] if "attn" not in lab else lab.split("-")[-3] + "-attn" for lab in labels])
print(f"{len(layers)} traced UNet layers ({(layer_kind == 'resnet').sum()} resnets, {(layer_kind == 'cross-attn').sum()} "
      f"cross-attentions) vs the dissertation's 70 (22 resnets, 16 cross-attentions) for SD-v1.4")


def trace_unet(probe_list):
    """Images (C, 2 + L, 3, 32, 32), hits and CLIP-Scores (C, 2 + L) for C captions."""
    images, hits, scores = [], [], []
    for p in tqdm(probe_list, desc="UNet tracing", leave=False):
        conds = tracing.trace_text_states(text, ids_of[p.caption], corruption(p.caption))
        imgs = tracing.trace_unet_layers(pipe, conds[:1], conds[1:2], layers, seed=seed, batch_size=len(layers), **sampler)
        images.append(imgs)
        hits.append(rate(imgs, p))
        scores.append(clip_score(imgs, [p.caption] * len(imgs)).numpy())
    return torch.stack(images), np.stack(hits), np.stack(scores)


start_t = time.perf_counter()
unet_trace = {a: trace_unet(probes[a]) for a in tqdm(attributes, desc="attributes")}
per_image = (time.perf_counter() - start_t) / sum(len(probes[a]) * (2 + len(layers)) for a in attributes)
print(f"UNet tracing: {time.perf_counter() - start_t:.0f} s, {per_image * 1000:.0f} ms per generated image")
acc = {a: h.mean(0) for a, (_, h, _) in unet_trace.items()}              # (2 + L,)
R_unet = {a: tracing.restoration_score(acc[a][0], acc[a][1], acc[a][2:]).numpy() for a in attributes}
print(pd.DataFrame({a: dict(clean=acc[a][0], corrupted=acc[a][1], causal_layers=int((R_unet[a] >= 0.5).sum()))
                    for a in attributes}).round(3).to_string())

# %%
fig = plt.figure(figsize=(13, 2.2 + 1.1 * len(attributes)))
grid = fig.add_gridspec(len(attributes), 2, width_ratios=[3.2, 1], wspace=0.05, hspace=0.6)
bounds = [i for i in range(1, len(layers)) if group[i] != group[i - 1]]
for r, a in enumerate(attributes):
    ax = fig.add_subplot(grid[r, 0])
    ax.imshow(R_unet[a][None], cmap="magma", vmin=0, vmax=1, aspect="auto")
    for b in bounds:
        ax.axvline(b - 0.5, color="white", lw=1.5)
    ax.set_yticks([])
    ax.set_title(f"{a}: restoration score R per UNet layer (down | mid | up)", fontsize=8, loc="left")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(labels if r == len(attributes) - 1 else [], rotation=90, fontsize=5)
    best, worst = best_worst(R_unet[a])
    sub = grid[r, 1].subgridspec(1, 4, wspace=0.05)
    imgs = unet_trace[a][0][0]
    for c, (img, t) in enumerate([(imgs[0], "clean"), (imgs[1], "corrupted"), (imgs[2 + best], labels[best]),
                                  (imgs[2 + worst], labels[worst])]):
        show(fig.add_subplot(sub[0, c]), img, t)
fig.suptitle(f"Fig 5.2 analogue: knowledge in the tiny UNet (first caption: '{probes[attributes[0]][0].caption}' ...)",
             fontsize=9)
ch.figure(fig, "fig5_2_unet_tracing")

unet_table = pd.DataFrame({"layer": labels, **{a: R_unet[a] for a in attributes}})
ch.table(unet_table, "fig5_2_unet_restoration_scores")
gaps = {a: float(acc[a][0] - acc[a][1]) for a in headline}
# paper scores are CLIP-Scores, whose effects are hundredths (the dissertation's fact edit: 0.05 / 0.07), so the
# paper forms of the claims ask for the direction the dissertation reports, not the tiny oracle's margins
ch.claim("corruption_works", "3-sigma noise on the subject tokens breaks the attribute for every attribute: "
         + ("acc_clean - acc_corr >= 0.4" if ch.tiny else "CLIP-Score clean > corrupted"),
         dissertation="n/a (qualitative, Fig 5.2)", reproduced=min(gaps.values()),
         threshold=0.4 if ch.tiny else 0.0, op=">=" if ch.tiny else ">", note=str({a: round(g, 2) for a, g in gaps.items()}))
spread = {a: (int((R_unet[a] >= 0.5).sum()), sorted(map(str, set(group[R_unet[a] >= 0.5])))) for a in headline}
ch.claim("unet_distributed", "UNet knowledge is distributed: for every attribute >= 3 layers with R >= 0.5, in >= 2 "
         "of {down, mid, up}", dissertation="distributed (Fig 5.2)", reproduced=str(spread),
         holds=all(n >= 3 and len(g) >= 2 for n, g in spread.values()))
pairs = [(a, b) for i, a in enumerate(headline) for b in headline[i + 1:]]
differs = [(a, b) for a, b in pairs if (((R_unet[a] >= 0.5) & (R_unet[b] < 0.3)) | ((R_unet[b] >= 0.5) & (R_unet[a] < 0.3))).any()]
ch.claim("unet_attribute_dependent", "causal layers depend on the attribute: >= 2 of the attribute pairs have a layer "
         "causal for one (R >= 0.5) and clearly not for the other (R < 0.3)", dissertation="differs per attribute (Fig 5.2)",
         reproduced=len(differs), threshold=2, op=">=", note=str(differs))
xattn_mean = float(np.nanmean([R_unet[a][layer_kind == "cross-attn"] for a in headline]))
resnet_mean = float(np.nanmean([R_unet[a][layer_kind == "resnet"] for a in headline]))
ch.claim("xattn_not_where_knowledge_sits", "mean R over cross-attention layers < mean R over resnets",
         dissertation="cross-attention layers mostly not causal", reproduced=f"{xattn_mean:.3f} vs {resnet_mean:.3f}",
         holds=xattn_mean < resnet_mean)

# %% [markdown]
# ### How much noise hides a subject? (a calibration the dissertation does not report)
#
# The claims corrupt with ROME's ν = 3 (spec: keep it). How strong that is depends on the model's embedding
# geometry, so the same captions are sampled with the subject's noise at several ν (each caption on the noise draw
# its tracing uses): the attribute's accuracy should fall from its clean level towards chance as ν grows. The
# column at the claims' ν repeats the tracing's corrupted accuracy (same conditioning and noise, another batch).

# %%
nu_grid = [1.0, 2.0, 3.0, 5.0, 8.0, 13.0]
noisy = [tracing.trace_text_states(text, ids_of[p.caption], corruption(p.caption, nu))[1:2]
         for a in attributes for p in probes[a] for nu in nu_grid]            # (captions x nu) corrupted rows
calibration_images = tracing.sample_rows(pipe, torch.cat(noisy), seed=seed, batch_size=render_batch, **sampler)
calibration_images = calibration_images.unflatten(0, (-1, len(nu_grid)))
flat = [(a, p) for a in attributes for p in probes[a]]
calibration = {a: np.mean([rate(calibration_images[i], p) for i, (b, p) in enumerate(flat) if b == a], 0)
               for a in attributes}
calibration_table = pd.DataFrame({a: dict(clean=acc[a][0], traced_corrupted=acc[a][1],
                                          **{f"nu={nu:g}": v for nu, v in zip(nu_grid, calibration[a])})
                                  for a in attributes}).T
ch.table(calibration_table.reset_index(names="attribute"), "noise_calibration")
print(calibration_table.round(3).to_string())
fig, ax = plt.subplots(figsize=(5.5, 3.2))
for a in attributes:
    ax.plot(nu_grid, calibration[a], marker="o", label=a)
ax.axvline(noise_mult, color="grey", ls=":", lw=1)
ax.set(xscale="log", xlabel="noise multiplier ν (noise = ν σ N(0, I) on the subject's token embeddings)",
       ylabel="attribute drawn" if ch.tiny else "CLIP-Score", title="How much noise hides the subject (dotted: the claims' ν)")
ax.set_xticks(nu_grid, [f"{nu:g}" for nu in nu_grid])
ax.legend(fontsize=7)
ch.figure(fig, "noise_calibration")

# %% [markdown]
# ### The CLIP-Score threshold (§5.2.5)
#
# The dissertation calibrates a CLIP-Score cut with human ratings of 10 validation captions: the causal layers of
# the validation set are those whose images were faithful for *every* caption, and τ is the smallest mean
# CLIP-Score among them. Here the oracle rates. Is τ's causal set on the probe captions the one R finds?

# %%
agree, stand_in = {}, []
for a in attributes:
    v_images, v_hits, v_scores = trace_unet(validation[a])
    if ch.tiny:
        verdicts = v_hits[:, 2:] > 0.5                     # the oracle's yes / no per image
    else:
        # every (caption, restored layer) image goes out for rating next to the caption's clean image
        C, L = v_scores.shape[0], v_scores.shape[1] - 2
        human_study.export(ch.out_dir / "threshold_study" / a, v_images[:, :1].expand(-1, L, -1, -1, -1).flatten(0, 1),
                           v_images[:, 2:].flatten(0, 1), [p.caption for p in validation[a] for _ in range(L)],
                           labels * C, "Is the right image (layer {attribute} restored) as faithful to the prompt as "
                           "the left one?")
        if threshold_ratings.get(a):
            verdicts = human_study.read(threshold_ratings[a])["per_pair"].reshape(C, L) * 2 > len(threshold_ratings[a])
        else:  # a stand-in verdict, labelled: CLIP-Score at least halfway from the corrupted image's to the clean one's
            stand_in.append(a)
            verdicts = v_scores[:, 2:] >= (v_scores[:, :1] + v_scores[:, 1:2]) / 2
    faithful = verdicts.all(0)
    probe_scores = unet_trace[a][2].mean(0)[2:]
    if faithful.any():
        tau = float(v_scores[:, 2:].mean(0)[faithful].min())
        by_tau, by_r = probe_scores >= tau, R_unet[a] >= 0.5
        agree[a] = float((by_tau == by_r).mean())
        print(f"{a}: tau = {tau:.3f} from {faithful.sum()} faithful validation layers; CLIP-Score-causal "
              f"{by_tau.sum()} layers, R-causal {by_r.sum()}, agreement {agree[a]:.2f}")
    else:
        print(f"{a}: no layer faithful for every validation caption; no threshold")
ch.compare("CLIP-Score threshold vs the rater's causal set (agreement over layers)", dissertation="human-calibrated tau",
           reproduced={a: round(v, 2) for a, v in agree.items()},
           note=f"automatic stand-in for the human raters ({', '.join(stand_in)}): faithful = CLIP-Score at least "
                "halfway from the corrupted to the clean image's; rate threshold_study/ and pass threshold_ratings"
                if stand_in else "")

# %% [markdown]
# ## Text-encoder causal tracing (§5.2.4, Fig 5.3)
#
# A state is (module ∈ {self-attention, MLP}, layer, position); restoring it means running the corrupted text
# encoder with that module's output at that position replaced by the clean run's, and letting the unchanged UNet
# draw from the result (Eq. 5.7). Positions: the last subject token and the first EOS. The dissertation: exactly
# one causal state in CLIP-L, self-attention of layer 0 at the last subject token.

# %%
n_text = anatomy.n_layers(text)
sites = {k: tracing.layer_sites(text, k) for k in ("attn", "mlp")}
eos_id = pipe.tokenizer.eos_token_id
state_names = [(pos, k, l) for pos in ("last subject", "first EOS") for k in ("attn", "mlp") for l in range(n_text)]


def trace_text(probe_list):
    """Images (C, 2 + S, 3, 32, 32) and hits (C, 2 + S) for the S states of ``state_names``; every caption's rows
    ride the same noise draw, so all captions are sampled in one batched loop."""
    conds = []
    for p in probe_list:
        ids = ids_of[p.caption]
        where = {"last subject": subject_of[p.caption][-1], "first EOS": ids[0].tolist().index(eos_id, 1)}
        restorations = [[(sites[k][l], [where[pos]])] for pos, k, l in state_names]
        conds.append(tracing.trace_text_states(text, ids, corruption(p.caption), restorations))
    images = tracing.sample_rows(pipe, torch.cat(conds), seed=seed, batch_size=render_batch, **sampler)
    images = images.unflatten(0, (len(probe_list), -1))
    return images, np.stack([rate(imgs, p) for imgs, p in zip(images, probe_list)])


text_trace = {a: trace_text(probes[a]) for a in tqdm(attributes, desc="attributes")}
R_text = {}
for a, (_, h) in text_trace.items():
    m = h.mean(0)
    R_text[a] = tracing.restoration_score(m[0], m[1], m[2:]).numpy().reshape(2, 2, n_text)  # (position, module, layer)

fig, axes = plt.subplots(1, len(attributes), figsize=(3.2 * len(attributes), 2.8), sharey=True)
for ax, a in zip(np.atleast_1d(axes), attributes):
    for i, pos in enumerate(("last subject", "first EOS")):
        for j, (k, style) in enumerate((("attn", "-o"), ("mlp", "--s"))):
            ax.plot(range(n_text), R_text[a][i, j], style, ms=4, label=f"{'self-attn' if k == 'attn' else 'MLP'}, {pos}")
    ax.axhline(0.5, color="gray", ls=":", lw=1)
    ax.set(title=a, xlabel="text-encoder layer", ylim=(-0.3, 1.15))
np.atleast_1d(axes)[0].set_ylabel("restoration score R")
np.atleast_1d(axes)[-1].legend(fontsize=6)
fig.suptitle("Fig 5.3 analogue: restoring one text-encoder state", fontsize=9)
ch.figure(fig, "fig5_3_text_encoder_tracing")

n_causal_text = {a: int((R_text[a] >= 0.5).sum()) for a in attributes}
n_causal_unet = {a: int((R_unet[a] >= 0.5).sum()) for a in attributes}
ch.claim("text_encoder_localised", "text encoder is localised: <= 2 of its traced states reach R >= 0.5 while the UNet has "
         ">= 3 such layers, for every attribute", dissertation="1 causal state vs many UNet layers",
         reproduced=f"text {n_causal_text} vs UNet {n_causal_unet}",
         holds=all(n_causal_text[a] <= 2 and n_causal_unet[a] >= 3 for a in headline))
top = {}
for a in headline:
    r = np.nan_to_num(R_text[a], nan=-np.inf)
    top[a] = (float(r[..., 0].max()), float(r[..., 1:].max()))
layer0 = [a for a, (r0, r1) in top.items() if r0 >= r1 + 0.15]
ch.claim("layer0_concentration", "the strongest text state is a layer-0 state, >= 0.15 above every deeper state, for "
         ">= 3 of the 4 attributes", dissertation="self-attn-0 only", reproduced=len(layer0), threshold=3, op=">=",
         note=str({a: (round(x, 2), round(y, 2)) for a, (x, y) in top.items()}))
exact = {a: float(R_text[a][0, 0, 0]) for a in attributes}
ch.compare("R of (self-attn, layer 0, last subject token) — the dissertation's one causal state (observation)",
           dissertation=">= threshold for every attribute", reproduced={a: round(v, 2) for a, v in exact.items()})
with torch.inference_mode(), hooks.trace(text, [sites["attn"][0].path]) as seen:
    text(input_ids=torch.cat([ids_of[p.caption] for p in probes["style"]]))
attn0 = torch.stack([seen[sites["attn"][0].path][i, subject_of[p.caption]].norm(dim=-1).mean()
                     for i, p in enumerate(probes["style"])]).mean()
noise_norm = noise_mult * sigma * text.config.hidden_size ** 0.5
print(f"||attn_0 output|| / ||noise|| at the style subject tokens: {attn0 / noise_norm:.2f} "
      f"(the spec's pilot: ~1.7; CLIP-L's first attention presumably dominates far more)")

# %% [markdown]
# ## Fig 5.1: restoring a causal state makes the corrupted model obey the caption
#
# One style caption: clean, corrupted, the best and the worst UNet layer restored, and the text encoder's
# self-attention at layer 0, last subject token, restored.

# %%
a = "style" if "style" in attributes else attributes[0]
u_imgs, t_imgs = unet_trace[a][0][0], text_trace[a][0][0]
best, worst = best_worst(R_unet[a])
panels = [(u_imgs[0], "clean"), (u_imgs[1], "corrupted"), (u_imgs[2 + best], f"UNet {labels[best]} restored"),
          (u_imgs[2 + worst], f"UNet {labels[worst]} restored"), (t_imgs[2], "text self-attn-0 @ subject restored")]
fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.6))
for ax, (img, t) in zip(axes, panels):
    show(ax, img, t)
fig.suptitle(f"Fig 5.1 analogue: '{probes[a][0].caption}'", fontsize=9)
ch.figure(fig, "fig5_1_restoration_example")

# %% [markdown]
# ## DIFF-QUICKFIX (§5.4, Eqs. 5.8–5.9)
#
# A concept c_k and its replacement c_v, each placed in four templates (tiny: style "kel varo" → "painting",
# mascot "blorp" → "star", the stale fact "the emblem of zubria" → "a blue heart"; paper: Concept-Ablation's styles
# and objects, "the President of the United States" → "Joe Biden"). Keys: the input of a text layer's attention
# output projection at the last subject token and every EOS after it, for the c_k prompts; values: W' times the
# same input for the c_v prompts (bias excluded, `bias_mode="exact"`). The update
# W = (λW' + Σ v kᵀ)(λI + Σ k kᵀ)⁻¹ is one linear solve (`interplab.editing`). Whether a concept is still drawn
# is read by the oracle in tiny (the style's texture, the mascot's shape, colour and texture, the emblem's look)
# and by CLIP-Score against the concept's phrase in paper.

# %%
@dataclass
class Concept:
    kind: str            # "style" | "object" | "fact"
    name: str            # c_k, e.g. "kel varo"
    replacement: str     # c_v, e.g. "painting"
    prompts: list        # evaluation prompts (images are paired across edits by prompt index)
    wanted: object       # tiny: what the oracle must see; paper: the phrase CLIP-Score reads
    new: object = None   # facts: what the updated fact looks like


eos_id = pipe.tokenizer.eos_token_id
rng = np.random.default_rng(seed)
toy_objects = [(tw.COLOURS[i % 8], tw.SHAPES[j % 8]) for i, j in zip(rng.permutation(64) // 8, rng.permutation(64))]


def toy_concept(kind, name):
    if kind == "style":
        prompts_ = [f"a {c} {s} in the style of {name}" if i % 2 == 0 else f"{name} style painting of a {c} {s}"
                    for i, (c, s) in enumerate(toy_objects[:n_edit_prompts])]
        return Concept(kind, name, "painting", prompts_, {"texture": tw.ARTISTS[name]})
    if kind == "object":
        shape, colour, texture = tw.MASCOTS[name]
        return Concept(kind, name, shape, [f"a photo of a {name}"] * n_edit_prompts,
                       dict(shape=shape, colour=colour, texture=texture))
    shape, colour = tw.EMBLEMS[name]
    new_shape, new_colour = tw.STALE_EMBLEMS[name]
    return Concept(kind, f"the emblem of {name}", f"a {new_colour} {new_shape}", [f"the emblem of {name}"] * n_edit_prompts,
                   dict(shape=shape, colour=colour), dict(shape=new_shape, colour=new_colour))


def paper_concept(kind, name):
    replacement = dict(prompts.EDIT_CONCEPTS[kind])[name]
    evals = prompts.edit_eval_prompts(name, kind)[:n_edit_prompts]
    if kind == "fact":
        return Concept(kind, name, replacement, evals, prompts.FACT_STALE[name], replacement)
    return Concept(kind, name, replacement, evals, name)


if ch.tiny:
    KINDS = {"style": list(tw.ARTISTS), "object": list(tw.MASCOTS), "fact": list(tw.STALE_EMBLEMS)}
    KINDS["style"] = [a for a in KINDS["style"] if tw.ARTISTS[a] != "plain"]  # "plain" cannot be removed
    make = toy_concept
    TEMPLATES = ["{x}", "a photo of {x}", "a painting of {x}", "the style of {x}"]
    chance = {"style": 1 / len(tw.TEXTURES), "object": 1 / (len(tw.TEXTURES) * len(tw.SHAPES) * len(tw.COLOURS))}
else:
    KINDS = {k: [c for c, _ in v] for k, v in prompts.EDIT_CONCEPTS.items()}
    make = paper_concept
    TEMPLATES = list(prompts.EDIT_TEMPLATES)
    chance = {"style": 0.0, "object": 0.0}
EDITED = [make(k, KINDS[k][0]) for k in ("style", "object", "fact")]
if preserve_weight is None:
    # the tiny tower's layer 0 is 64 wide and an edit has 71-83 rows: without preservation rows K^T K is
    # full rank and lambda = 0.01 lets the edit rewrite every direction (docs/drafts/STATUS.md)
    preserve_weight = 1.0 if ch.tiny else 0.0


def rows(concepts, layer):
    """Stacked DIFF-QUICKFIX keys / values of several concepts at text layer ``layer``."""
    path = anatomy.resolve(text, f"layer[{layer}].attn.out").path
    K, V = [], []
    for c in concepts:
        k_ids = pipe.tokenize([t.format(x=c.name) for t in TEMPLATES]).to(text.device)
        v_ids = pipe.tokenize([t.format(x=c.replacement) for t in TEMPLATES]).to(text.device)
        k, v = editing.quickfix_rows(text, path, lambda i: text(input_ids=i), k_ids, v_ids, eos_id, bias_mode,
                                       positions=key_positions)
        K.append(k)
        V.append(v)
    return path, torch.cat(K), torch.cat(V)


def ordinary_captions():
    """n_preserve_prompts captions that name none of the concepts this notebook edits (never an evaluation
    prompt): tiny, the training grammar's mix; paper, COCO objects in places."""
    edited = [name.split()[-1] for names in KINDS.values() for name in names]
    return prompts.ordinary_captions(n_preserve_prompts, edited, np.random.default_rng(seed + 1), ch.tiny)


_preserved = {}  # layer -> ((K_p, V_p), read seconds): read once per layer, like MEMIT's key statistics


def preservation(layer):
    if layer not in _preserved:
        path = anatomy.resolve(text, f"layer[{layer}].attn.out").path
        ids = pipe.tokenize(ordinary_captions()).to(text.device)
        start = time.perf_counter()
        rows_ = editing.preservation_rows(text, path, lambda i: text(input_ids=i), ids)
        _preserved[layer] = rows_, time.perf_counter() - start
    return _preserved[layer][0]


def quickfix(concepts, layer=0):
    """The edit; n_rows counts the concepts' key rows (the preservation rows are read once per layer)."""
    path, K, V = rows(concepts, layer)
    preserve = preservation(layer) if preserve_weight > 0 else None
    e = editing.compute_edit(text, path, K, V, lam=edit_lambda, preserve=preserve,
                               preserve_weight=preserve_weight if preserve is not None else 1.0)
    e.n_rows, e.n_preserve = len(K), 0 if preserve is None else len(preserve[0])
    return e


def render(jobs, desc="rendering"):
    """Images of each job (concept, edit or None, n): its first n prompts under each of the n_edit_seeds seeds
    (paper: 0-4, the spec's), seed-major, all jobs in few batched sampling loops. DIFF-QUICKFIX edits only the text
    encoder, so each job's conditionings (and CFG's empty prompt) are encoded under its edit and one unchanged UNet
    (whatever it is at the call: the erasers change it) samples them all, every image on the noise it would get
    alone."""
    chunks, rows = [[]], 0  # (job, conditioning, uncond, seed) blocks, at most render_batch images per sampling loop
    for i, (c, e, n) in enumerate(jobs):
        with editing.apply_edit(text, e) if e is not None else contextlib.nullcontext():
            cond, uncond = pipe.encode(c.prompts[:n]), pipe.uncond_conditioning()
        for s in range(n_edit_seeds):
            if rows + len(cond) > render_batch and chunks[-1]:
                chunks, rows = chunks + [[]], 0
            chunks[-1].append((i, cond, uncond, seed + s))
            rows += len(cond)
    images = [[] for _ in jobs]
    for chunk in tqdm([x for x in chunks if x], desc=desc, leave=False):
        drawn = pipe.sample_seeded([b[1] for b in chunk], [b[3] for b in chunk], unconds=[b[2] for b in chunk],
                                   batch_size=render_batch, **sampler)
        for (i, *_), im in zip(chunk, drawn):
            images[i].append(im)
    return [torch.cat(ims) for ims in images]


def score(c, images, wanted=None, soft=False):
    """How much images of c's prompts show ``wanted`` (default c.wanted): tiny, the oracle's agreement
    (probability mass with ``soft``); paper, mean CLIP-Score with the phrase."""
    wanted = c.wanted if wanted is None else wanted
    if ch.tiny:
        return float(np.mean(zo.agreement(oracle, images, [wanted] * len(images), soft)))
    return float(clip_score(images, [wanted] * len(images)).mean())


base = dict(zip([c.kind for c in EDITED], render([(c, None, None) for c in EDITED], "unedited")))
before = {c.kind: score(c, base[c.kind]) for c in EDITED}
layer_edits = {(c.kind, layer): (c, quickfix([c], layer)) for layer in range(n_text) for c in EDITED}
edited = dict(zip(layer_edits, render([(c, e, None) for c, e in layer_edits.values()], "Fig 5.4a: each layer's edits")))
after = {k: score(c, edited[k]) for k, (c, _) in layer_edits.items()}
edit_stats = pd.DataFrame([dict(concept=c.name, layer=layer, rows=e.n_rows, preserve_rows=e.n_preserve,
                                relative_change=e.relative_change, residual=e.residual, wall_time_s=e.wall_time_s)
                           for (_, layer), (c, e) in layer_edits.items()])
n_params = text.config.hidden_size ** 2
K0 = rows(EDITED[:1], 0)[1]  # lambda's scale relative to the keys (one forward pass)
print(f"edited weight: {n_params:,} parameters = {100 * n_params / sum(p.numel() for p in pipe.unet.parameters()):.2f} % "
      f"of the UNet's (dissertation: 0.07 % for CLIP-L vs SD-v1.4); lambda / trace(K^T K) at layer 0: "
      f"{edit_lambda / float((K0 ** 2).sum()):.1e}")
print(edit_stats[edit_stats.layer == 0].round(4).to_string(index=False))

fig, ax = plt.subplots(figsize=(6.5, 3))
width = 0.25
for j, c in enumerate(EDITED):
    ax.bar(np.arange(n_text) + (j - 1) * width, [after[c.kind, l] for l in range(n_text)], width, label=f"{c.kind} ({c.name})")
    ax.axhline(before[c.kind], color=f"C{j}", ls=":", lw=1)
ax.set(xlabel="text-encoder layer edited", ylabel="concept still drawn" if ch.tiny else "CLIP-Score with the concept",
       title="Fig 5.4a analogue: DIFF-QUICKFIX at each layer (dotted: unedited)")
ax.legend(fontsize=7)
ch.figure(fig, "fig5_4a_edit_layer")

# %%
drop = {(k, l): before[k] - after[k, l] for k in before for l in range(n_text)}
if ch.tiny:
    shown = {k: before[k] >= 0.5 for k in chance}  # an edit can only remove what the model draws
    removes = {k: shown[k] and drop[k, 0] >= 0.5 * (before[k] - chance[k]) for k in chance}
else:  # CLIP-Score has no chance level: the layer-0 edit must lower the concept's score
    removes = {k: drop[k, 0] > 0 for k in chance}
deeper = {k: max(drop[k, l] for l in range(1, n_text)) for k in chance}
ch.claim("quickfix_layer0_removes", "DIFF-QUICKFIX at layer 0 lowers the concept's "
         + ("accuracy by >= half of (original - chance), from >= 0.5 before," if ch.tiny else "CLIP-Score")
         + " for style and object (mascot); edits at layers >= 1 achieve at most half of the layer-0 drop",
         dissertation="layer 0 works, layers 1-11 do not (Fig 5.4a)",
         reproduced={k: f"before {before[k]:.2f}, layer 0 {after[k, 0]:.2f}, best deeper drop {deeper[k]:.2f}" for k in chance},
         holds=all(removes[k] and deeper[k] <= 0.5 * drop[k, 0] for k in chance))
fact_c = EDITED[2]
fact_images = (base["fact"], edited["fact", 0])  # before and after the layer-0 edit
fact = {"stale": tuple(score(fact_c, im, soft=True) for im in fact_images),
        "new": tuple(score(fact_c, im, fact_c.new, soft=True) for im in fact_images)}
ch.compare("fact update: stale / new fact before -> after", dissertation="CLIP-Score Trump 0.28 -> 0.23, Biden 0.22 -> 0.29",
           reproduced=f"stale {fact['stale'][0]:.2f} -> {fact['stale'][1]:.2f}, new {fact['new'][0]:.2f} -> {fact['new'][1]:.2f}",
           note="tiny: oracle probability, not CLIP-Score" if ch.tiny else "")
stale_drop, new_rise = fact["stale"][0] - fact["stale"][1], fact["new"][1] - fact["new"][0]
ch.claim("quickfix_fact_update", "fact update: the stale fact's " + ("probability drops by >= 0.3 and the new one's rises "
         "by >= 0.3" if ch.tiny else "CLIP-Score drops and the new one's rises"),
         dissertation="0.28 -> 0.23 / 0.22 -> 0.29 (CLIP-Score)", reproduced=f"{stale_drop:.2f} / {new_rise:.2f}",
         holds=stale_drop >= 0.3 and new_rise >= 0.3 if ch.tiny else stale_drop > 0 and new_rise > 0)

# %% [markdown]
# ### Specificity: removing one concept leaves the others (§5.4.3)
#
# tiny: the other artists share first names with the edited one ("kel varo" vs "kel brisk"), so only the last
# subject token tells them apart; the other mascots are single tokens.

# %%
special = {}
for c in EDITED[:2]:
    e = layer_edits[c.kind, 0][1]
    others = [make(c.kind, name) for name in KINDS[c.kind] if name != c.name]
    n = max(2, n_edit_prompts // len(others))
    images = render([(o, None, n) for o in others] + [(o, e, n) for o in others], f"specificity: {c.kind}")
    scores = [score(o, im) for o, im in zip(others + others, images)]
    special[c.kind] = (np.mean(scores[:len(others)]), np.mean(scores[len(others):]))
own_drop = {k: before[k] - after[k, 0] for k in special}
ch.claim("quickfix_specific", "specificity: the other artists' / objects' " + (
         "accuracy stays >= 0.9 x its pre-edit value (>= 0.5)" if ch.tiny else
         "CLIP-Score drops by less than half the edited concept's own drop"),
         dissertation="removing Van Gogh does not harm Monet", reproduced={k: f"{a:.2f} -> {b:.2f}" for k, (a, b) in special.items()},
         holds=all(a >= 0.5 and b >= 0.9 * a for a, b in special.values()) if ch.tiny else
         all(a - b < 0.5 * own_drop[k] for k, (a, b) in special.items()))

# %% [markdown]
# ### Fig 5.4c: ten concepts in one solve
#
# tiny: four artists, the four mascots and the two stale emblems; paper: Concept-Ablation's eight concepts and
# the two facts. Their rows are stacked into one update.

# %%
MULTI = [make(k, n) for k, names in KINDS.items() for n in names[:4]][:10]
joint = quickfix(MULTI, 0)
n_multi = max(2, n_edit_prompts // 2)
images = render([(c, e, n_multi) for c in MULTI for e in (None, quickfix([c], 0), joint)], "Fig 5.4c")
columns = ("original", "single", "multi")
multi = pd.DataFrame([dict(concept=c.name, **{k: score(c, images[3 * i + j]) for j, k in enumerate(columns)})
                      for i, c in enumerate(MULTI)])
ch.table(multi, "fig5_4c_multi_concept")
fig, ax = plt.subplots(figsize=(8, 2.8))
multi.set_index("concept").plot.bar(ax=ax, width=0.8)
ax.set(ylabel="concept drawn", title=f"Fig 5.4c analogue: single- vs {len(MULTI)}-concept DIFF-QUICKFIX")
ch.figure(fig, "fig5_4c_multi_concept")
single_drop, multi_drop = float((multi.original - multi.single).mean()), float((multi.original - multi.multi).mean())
min_single = 0.2 if ch.tiny else 0.0  # paper: CLIP-Score units
ch.claim("quickfix_multi_concept", f"{len(MULTI)} concepts edited at once: mean drop >= 0.8 x the mean single-edit drop "
         f"(single edits must remove: drop > {min_single})", dissertation="multi ~ single < original (Fig 5.4c)",
         reproduced=f"{multi_drop:.2f} vs {single_drop:.2f}", holds=single_drop > min_single and multi_drop >= 0.8 * single_drop)

# %% [markdown]
# ### Fig 5.4b: DIFF-QUICKFIX vs fine-tuning erasers, and their cost
#
# Two baselines re-implemented in `interplab.erasure`: ESD-x (negative-guidance fine-tuning of the
# cross-attention keys/values) and Concept-Ablation (model-based: the concept's noise prediction is pulled to the
# anchor's), `baseline_steps` Adam steps each on the model's own images. Their wall time includes generating those
# images; DIFF-QUICKFIX's includes reading its keys and values (tiny's preservation rows are read once per layer and
# serve every edit of it; that one-time read is printed separately).

# %%
style_c = EDITED[0]
t0 = time.perf_counter()
dqf = quickfix([style_c], 0)
dqf_total = time.perf_counter() - t0
methods = {"original": (before["style"], 0.0), "DIFF-QUICKFIX": (after["style", 0], dqf_total)}
concept_prompt = f"{style_c.name} style painting of a star" if ch.tiny else style_c.name
anchor_prompt = "a painting of a star" if ch.tiny else style_c.replacement
if run_baselines:
    for method, label in (("concept_ablation", "Concept-Ablation"), ("esd_x", "ESD-x")):
        settings = dict(steps=baseline_steps or 100) if ch.tiny else {**erasure.RELEASE[method], **(
            dict(steps=baseline_steps) if baseline_steps else {})}
        er = erasure.erase(pipe, method, concept_prompt, anchor=anchor_prompt, seed=seed, **settings)
        saved = er.apply(pipe.unet)
        try:
            methods[label] = (score(style_c, render([(style_c, None, None)], label)[0]), er.wall_time_s)
        finally:
            erasure.Erasure.revert(pipe.unet, saved)
fig, ax = plt.subplots(figsize=(5.5, 2.8))
names = list(methods)
ax.bar(names, [methods[n][0] for n in names], color=["gray"] + [f"C{i}" for i in range(len(names) - 1)])
for i, n in enumerate(names[1:], 1):
    ax.text(i, methods[n][0] + 0.02, f"{methods[n][1]:.3g} s", ha="center", fontsize=7)
ax.axhline(chance["style"], color="gray", ls=":", lw=1)
ax.set(ylabel=f"'{style_c.name}' drawn", title="Fig 5.4b analogue: removing a style (dotted: chance)")
ch.figure(fig, "fig5_4b_baselines")
print({n: f"drawn {a:.2f}, {t:.4f} s" for n, (a, t) in methods.items()})
if run_baselines:
    ch.compare(f"Fig 5.4b: '{style_c.name}' still drawn after each eraser", dissertation="DIFF-QUICKFIX comparable to the "
               "fine-tuning erasers (CLIP-Score)", reproduced={n: round(a, 2) for n, (a, _) in methods.items()},
               note=f"tiny erasers: {baseline_steps or 100} Adam steps at lr 1e-3 (spec)" if ch.tiny else "")
print(f"DIFF-QUICKFIX: solve {dqf.wall_time_s * 1000:.2f} ms, with reading keys/values {dqf_total * 1000:.1f} ms"
      + (f"; once per layer: reading {dqf.n_preserve} preservation rows {_preserved[0][1] * 1000:.1f} ms"
         if dqf.n_preserve else ""))
if run_baselines:
    fastest = min(t for n, (_, t) in methods.items() if n not in ("original", "DIFF-QUICKFIX"))
    ch.compare("edit time vs fine-tuning", dissertation="< 1 s, ~1000x faster than [78, 126]",
               reproduced=f"{dqf_total:.3f} s; {fastest / dqf_total:.0f}x faster than the faster baseline")
    ch.claim("quickfix_speed", "an edit (keys, values and solve) takes < 1 s and is >= 100x faster than each fine-tuning baseline",
             dissertation="< 1 s, ~1000x", reproduced=f"{dqf_total:.3f} s, {fastest / dqf_total:.0f}x",
             holds=dqf_total < 1 and fastest / dqf_total >= 100)

# %% [markdown]
# ## Fig 5.5 / Fig 11.5: generations before and after DIFF-QUICKFIX
#
# Same noise before and after (images are paired by prompt index).

# %%
n_cols = min(4, min(len(c.prompts) for c in EDITED))
fig, axes = plt.subplots(2 * len(EDITED), n_cols, figsize=(1.6 * n_cols, 3.4 * len(EDITED)), squeeze=False)
for r, c in enumerate(EDITED):
    ps = c.prompts[:n_cols]
    before_img, after_img = base[c.kind][:n_cols], edited[c.kind, 0][:n_cols]  # seed's images, before and after
    for j in range(n_cols):
        show(axes[2 * r, j], before_img[j], ps[j] if j == 0 else "")
        show(axes[2 * r + 1, j], after_img[j], f"edited: {c.name} -> {c.replacement}" if j == 0 else "")
fig.suptitle("Fig 5.5 / 11.5 analogue: before (upper row) and after (lower row) each edit", fontsize=9)
ch.figure(fig, "fig5_5_before_after")

# %% [markdown]
# ## Figs 11.3 / 11.4: the best object-restoring ResNet layer
#
# The dissertation shows "down-1-resnet-1" restoring objects (1-based, i.e. `down_blocks.0.resnets.0`, or 0-based
# `down_blocks.1.resnets.1`: the label is ambiguous). Here: the resnet with the highest R for objects, on every
# object probe caption.

# %%
resnets = [i for i, k in enumerate(layer_kind) if k == "resnet"]
best_resnet = resnets[int(np.nanargmax(np.nan_to_num(R_unet["objects"][resnets], nan=-1)))] if "objects" in attributes else resnets[0]
imgs = unet_trace["objects"][0] if "objects" in attributes else unet_trace[attributes[0]][0]
fig, axes = plt.subplots(3, len(imgs), figsize=(1.6 * len(imgs) + 1, 5), squeeze=False)
for c in range(len(imgs)):
    for r, (row, t) in enumerate(((0, "original"), (1, "corrupted"), (2 + best_resnet, f"{labels[best_resnet]} restored"))):
        show(axes[r, c], imgs[c, row], (probes["objects"][c].caption + "\n" if r == 0 else "") + t)
fig.suptitle(f"Figs 11.3/11.4 analogue: restoring {layers[best_resnet]} (R = {R_unet['objects'][best_resnet]:.2f})", fontsize=9)
ch.figure(fig, "fig11_3_best_object_resnet")

# %%
ch.finish()
