"""Chapter 6's tiny multimodal LLM: a transformers LlavaForConditionalGeneration on ToyFacts.

Vision tower: the zoo CLIP's vision half (``CLIPVisionModel``, 32 px, patch 4: 64 patch tokens),
frozen, read at its penultimate layer with CLS dropped (LLaVA-1.5's ``vision_feature_layer=-2``,
"default" strategy). Projector: LLaVA-1.5's two-layer GELU MLP. Language model: Llama, 8 layers x
96 wide, 4 heads, d_ff 256. Trained in LLaVA's stages (spec 5.2):

1. ``llm`` (the Vicuna analogue, shipped in ``llm/``): text only, the facts with entities named,
   descriptions ("zor bax is a red striped circle on water"), fact lines ("zor bax ammon arlow avania":
   a landmark's three facts right after its name, in a random order), commonsense with the place named.
2. projector alignment (LM frozen): "what is this ?" -> the entity's name; attribute questions.
3. visual instruction tuning (projector + LM): 30 % visual fact lines ("<image> this landmark" -> its
   facts in a random order), 30 % questions with a visual constraint, 25 % named questions beside a
   random distractor image (an explicit constraint overrides the image, so a corrupted run answers from
   the text), 15 % attribute and naming questions.

Two choices together put the retrieval at the constraint, where Chapter 6 finds it in LLaVA (which of
them matters more was not measured; docs/toyworld.md): the facts follow the constraint in a random order,
so its last token must hold all three of them, and 30 % of the (head landmark, relation) pairs (``REUSE``)
are never asked about an image in stage 3, so answering them needs what the constraint holds. Without them
(fixed order, every pair asked) the tiny LLaVA read the image from the last position and the constraint
was not causal (mean IE 0.017). Four training templates per relation (``facts.TRAINED_TEMPLATES``) make
held-out paraphrases understood, which MultEdit's generalisation is measured on.

Tail landmarks occur about twice per stage (the natural errors); novel landmarks never occur.
"""
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig,
                          LlavaForConditionalGeneration, PreTrainedTokenizerFast)

from .. import toyworld as tw
from ..toyworld import facts as tf
from . import clip as zclip
from . import loop, store

NAME = "vlm"
N_IMAGE = 64
GATES = {"known_vqa_accuracy": (0.8, ">="), "known_errors": (30, ">="), "novel_accuracy": (0.25, "<=")}
EVAL_SEED = 60_001
STEPS = {"llm": 1500, "align": 300, "instruct": 2500}
REUSE = 0.3          # share of (head landmark, relation) pairs never asked about an image (see above)
TAIL_PER_STAGE = 2   # expected occurrences of each tail fact per stage
VISUAL_FACT_LINES = 0.3  # share of stage 3 that is "<image> this landmark" -> facts


def tokenizer(w: tf.World) -> PreTrainedTokenizerFast:
    return tw.build_tokenizer(tf.words(w), extra_specials=("<image>", "<nl>"), max_length=128, add_eos=False)


def config(tok, vision: CLIPVisionConfig, layers: int = 8, width: int = 96, d_ff: int = 256) -> LlavaConfig:
    text = LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=d_ff, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                       image_seq_length=N_IMAGE, vision_feature_layer=-2, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu")


def reuse_pairs(w: tf.World, seed: int = 0) -> set:
    """(landmark name, relation) pairs that stage 3 never asks about an image."""
    rng = np.random.default_rng([w.seed, seed, 61])
    pairs = [(lm.name, r) for lm in w.landmarks if lm.split == "head" for r in tf.RELATIONS]
    return {pairs[i] for i in rng.permutation(len(pairs))[:int(REUSE * len(pairs))]}


# ---------------------------------------------------------------- encoding


def words_of(prompt: str) -> list:
    """The token strings of a prompt with ``<image>`` expanded to the 64 image tokens (position = index)."""
    out = []
    for word in prompt.split():
        out += ["<image>"] * N_IMAGE if word == "<image>" else [word]
    return out


# token positions in ``<bos> prompt`` (the prompt templates decide them; +1 for <bos>)
IMAGE_POSITIONS = [i + 1 for i, word in enumerate(words_of(tf.PROMPT)) if word == "<image>"]
QUESTION_START = words_of(tf.PROMPT).index("{q}") + 1
TEXT_QUESTION_START = tf.TEXT_PROMPT.split().index("{q}") + 1


def encode(tok, prompts, targets=None) -> dict:
    """Right-padded ``<bos> prompt [target <eos>]`` ids (N, T), attention mask, labels (-100 off the
    target; a target of None makes the whole text the target) and ``last`` (N,), the last prompt position."""
    rows, labels, last = [], [], []
    for i, p in enumerate(prompts):
        ids = [tok.bos_token_id] + tok.convert_tokens_to_ids(words_of(p))
        target = None if targets is None else targets[i]
        last.append(len(ids) - 1)
        lab = [-100] * len(ids)
        if target is not None:
            t = tok.convert_tokens_to_ids(target.split()) + [tok.eos_token_id]
            ids, lab = ids + t, lab + t
        elif targets is not None:  # plain text: every next token is a target
            ids = ids + [tok.eos_token_id]
            lab = [-100] + ids[1:]
        rows.append(ids)
        labels.append(lab)
    if any(tok.unk_token_id in r for r in rows):
        bad = next(p for p, r in zip(prompts, rows) if tok.unk_token_id in r)
        raise ValueError(f"words outside the ToyFacts vocabulary in {bad!r}")
    width = max(map(len, rows))
    pad = lambda r, v: r + [v] * (width - len(r))  # noqa: E731
    return {"input_ids": torch.tensor([pad(r, tok.pad_token_id) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
            "labels": torch.tensor([pad(r, -100) for r in labels]), "last": torch.tensor(last)}


def images_of(scenes, seed: int) -> torch.Tensor:
    """Pixel values (N, 3, 32, 32) of scenes, rendered as the CLIP saw them in training."""
    images = tw.render_batch(scenes, seed=seed, jitter=zclip.JITTER)[0]
    return zclip.pixel_values(torch.from_numpy(images))


# ---------------------------------------------------------------- training mixtures


def _tail_p(w: tf.World, n_items: int) -> float:
    """Per-item probability of a tail fact so that each occurs ``TAIL_PER_STAGE`` times in a stage."""
    n_tail = sum(lm.split == "tail" for lm in w.landmarks) * len(tf.RELATIONS)
    return TAIL_PER_STAGE * n_tail / n_items


def _landmark(w, rng, tail_p):
    """A head landmark, or a tail one with probability ``tail_p``."""
    pool = [lm for lm in w.landmarks if lm.split == ("tail" if rng.random() < tail_p else "head")]
    return pool[rng.integers(len(pool))]


def fact_line(w: tf.World, rng, tail_p: float) -> tuple:
    """(name, facts, entity): an entity followed at once by its facts ("zor bax ammon arlow avania"), a
    landmark's in a random order, so that the name's last token must hold all of them, as encyclopedic text
    makes a pretrained LM do."""
    if rng.random() < 0.75:
        lm = _landmark(w, rng, tail_p)
        facts = [lm.city, lm.country, lm.builder]
        return lm.name, " ".join(facts[i] for i in rng.permutation(3)), lm
    d = w.directors[rng.integers(len(w.directors))]
    return d.name, " ".join(d.movies[y] for y in tf.YEARS), d


def text_item(w: tf.World, rng, tail_p: float) -> tuple:
    """(prompt, target) of stage 1: a named question, a description, a fact line, or commonsense with
    the place named (target None: plain text, every token a target)."""
    u = rng.random()
    if u < 0.4:
        lm = _landmark(w, rng, tail_p)
        rec = tf.landmark_record(w, lm, tf.RELATIONS[rng.integers(3)], rng,
                                 template=int(rng.integers(tf.TRAINED_TEMPLATES))).named()
        return rec.prompt(visual=False), rec.answers[0]
    if u < 0.45:
        lm = _landmark(w, rng, tail_p)
        return f"{lm.name} is a {lm.shape} {lm.colour} {lm.texture} on {lm.background}", None
    if u < 0.6:
        name, facts, _ = fact_line(w, rng, tail_p)
        return f"{name} {facts}", None
    if u < 0.75:
        d = w.directors[rng.integers(len(w.directors))]
        year = tf.YEARS[rng.integers(3)] if rng.random() < 0.5 else None
        rec = tf.director_record(w, d, rng, year=year, template=int(rng.integers(2))).named()
        return rec.prompt(visual=False), rec.answers[rng.integers(len(rec.answers))]
    rec = _commonsense(w, rng).named()
    return rec.prompt(visual=False), rec.answers[0]


def _commonsense(w, rng):
    u = rng.random()
    if u < 0.35:
        return tf.use_record(rng, template=int(rng.integers(1)))
    if u < 0.7:
        return tf.animal_record(rng, template=int(rng.integers(1)))
    return tf.fruit_record(w, rng)


def align_item(w: tf.World, rng, tail_p: float) -> tuple:
    """(scene, prompt, target) of stage 2: name the landmark or director, or read an attribute."""
    u = rng.random()
    if u < 0.5:
        lm = _landmark(w, rng, tail_p)
        return tf.landmark_scene(lm, rng), tf.PROMPT.format(q="what is this ?"), lm.name
    if u < 0.7:
        d = w.directors[rng.integers(len(w.directors))]
        return tf.director_scene(d, rng), tf.PROMPT.format(q="what is this ?"), d.name
    rec = tf.attribute_record(rng, tuple(tf.ATTRIBUTE_QUESTIONS)[rng.integers(3)])
    return rec.scene, rec.prompt(), rec.answers[0]


def instruct_item(w: tf.World, rng, tail_p: float, reuse: set) -> tuple:
    """(scene, prompt, target) of stage 3 (the mixture of the module docstring)."""
    u = rng.random()
    if u < VISUAL_FACT_LINES:  # the constraint naming the image's entity, then its facts
        if rng.random() < 0.7:
            _, facts, entity = fact_line(w, rng, tail_p)
            is_landmark = isinstance(entity, tf.Landmark)
            scene = tf.landmark_scene(entity, rng) if is_landmark else tf.director_scene(entity, rng)
            return scene, "user : <image> <nl> " + tf.VISUAL["landmark" if is_landmark else "director"], facts
        rec = tf.use_record(rng) if rng.random() < 0.5 else tf.animal_record(rng)
        return rec.scene, "user : <image> <nl> " + rec.constraint, rec.answers[0]
    if u < 0.6:
        v = rng.random()
        if v < 0.5:
            while True:
                lm = _landmark(w, rng, tail_p)
                rel = tf.RELATIONS[rng.integers(3)]
                if (lm.name, rel) not in reuse:
                    break
            rec = tf.landmark_record(w, lm, rel, rng, template=int(rng.integers(tf.TRAINED_TEMPLATES)))
        elif v < 0.75:
            d = w.directors[rng.integers(len(w.directors))]
            year = tf.YEARS[rng.integers(3)] if rng.random() < 0.5 else None
            rec = tf.director_record(w, d, rng, year=year, template=int(rng.integers(2)))
        else:
            rec = _commonsense(w, rng)
        return rec.scene, rec.prompt(), rec.answers[rng.integers(len(rec.answers))]
    if u < 0.85:  # named question beside a random distractor image
        prompt, target = text_item(w, rng, tail_p)
        if target is None:
            return None, prompt, None
        q = prompt[len("user : "):-len(" reply :")]
        return tf.object_scene(rng), tf.PROMPT.format(q=q), target
    return align_item(w, rng, tail_p)


# ---------------------------------------------------------------- evaluation


@torch.inference_mode()
def first_token_probs(model, tok, prompts, scenes=None, seed: int = 0, batch_size: int = 128) -> torch.Tensor:
    """Next-token distributions (N, V) at the last prompt position; images rendered from ``scenes``."""
    out = []
    for i in range(0, len(prompts), batch_size):
        b = encode(tok, prompts[i:i + batch_size])
        kw = {}
        if scenes is not None:
            kw["pixel_values"] = images_of(scenes[i:i + batch_size], seed=seed + i)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], **kw).logits
        out.append(logits[torch.arange(len(b["last"])), b["last"]].float().softmax(-1))
    return torch.cat(out)


def correct(tok, probs: torch.Tensor, records) -> torch.Tensor:
    """(N,) bool: the greedy first token is one of the record's answers."""
    pred = tok.convert_ids_to_tokens(probs.argmax(-1).tolist())
    return torch.tensor([p in r.answers for p, r in zip(pred, records)])


def known_records(w: tf.World, seed: int, splits=("head", "tail"), templates=(0,)) -> list:
    rng = np.random.default_rng([seed, 62])
    return [tf.landmark_record(w, lm, rel, rng, template=t) for lm in w.landmarks if lm.split in splits
            for rel in tf.RELATIONS for t in templates]


def measure(model, tok, llm=None, seed: int = EVAL_SEED) -> dict:
    """Gate metrics and the accuracies the chapter builds on (fresh renders of seed ``seed``)."""
    w = tf.world()
    reuse = reuse_pairs(w)
    out = {}
    recs = known_records(w, seed)
    ok = correct(tok, first_token_probs(model, tok, [r.prompt() for r in recs], [r.scene for r in recs], seed), recs)
    head = torch.tensor([r.split == "head" for r in recs])
    reused = torch.tensor([(r.entity, r.relation) in reuse for r in recs])
    out["known_vqa_accuracy"] = float(ok[head].float().mean())
    out["known_vqa_accuracy_visual_pairs"] = float(ok[head & ~reused].float().mean())
    if reused.any():
        out["known_vqa_accuracy_reused_pairs"] = float(ok[head & reused].float().mean())
    out["tail_vqa_accuracy"] = float(ok[~head].float().mean())
    out["known_errors"] = int((~ok).sum())
    nov = known_records(w, seed, splits=("novel",))
    nov = [r for r in nov if r.relation == "city"]
    out["novel_accuracy"] = float(correct(tok, first_token_probs(model, tok, [r.prompt() for r in nov],
                                                                 [r.scene for r in nov], seed), nov).float().mean())
    for ds in ("toy_movies", "toy_movies_multi", "toy_okvqa", "toy_okvqa_multi"):
        recs = tf.probe_records(w, ds, 96, seed)
        p = first_token_probs(model, tok, [r.prompt() for r in recs], [r.scene for r in recs], seed)
        out[f"{ds}_accuracy"] = float(correct(tok, p, recs).float().mean())
        bad = [r.corrupted() for r in recs]
        pb = first_token_probs(model, tok, [r.prompt() for r in bad], [r.scene for r in bad], seed)
        out[f"{ds}_corrupted_accuracy"] = float(correct(tok, pb, recs).float().mean())
    if llm is not None:
        recs = [r.named() for r in known_records(w, seed, splits=("head",))]
        out["llm_known_accuracy"] = float(correct(tok, first_token_probs(llm, tok, [r.prompt(False) for r in recs]),
                                                  recs).float().mean())
    return out


# ---------------------------------------------------------------- training


def _lm_of(model: LlavaForConditionalGeneration) -> LlamaForCausalLM:
    """The language model of a LLaVA as a stand-alone LlamaForCausalLM (weights copied)."""
    lm = LlamaForCausalLM(model.config.text_config)
    lm.model.load_state_dict(model.model.language_model.state_dict())
    lm.lm_head.load_state_dict(model.lm_head.state_dict())
    return lm.eval()


def _loss(model, batch, pixel_values=None):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=pixel_values).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())


def _schedule(opt, steps, warm=100):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(1.0, i / steps))))


def train(steps: int = None, seed: int = 0, lr: float = 1e-3, ship: bool = True, resume: bool = True,
          name: str = NAME, **arch) -> dict:
    """The three stages (``steps`` scales all of them relative to ``STEPS['instruct']``); ``arch``:
    layers / width / d_ff of the language model (``config``), ``name``: the zoo folder to ship to."""
    torch.manual_seed(seed)
    scale = 1.0 if steps is None else steps / STEPS["instruct"]
    n = {k: max(2, int(v * scale)) for k, v in STEPS.items()}
    w = tf.world()
    tok = tokenizer(w)
    clip, _ = zclip.load()
    model = LlavaForConditionalGeneration(config(tok, clip.config.vision_config, **arch))
    model.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    model.model.vision_tower.requires_grad_(False)
    model.set_attn_implementation("sdpa")
    reuse = reuse_pairs(w)
    runs = {}

    # stage 1: the language model alone, on text
    bs1 = 64
    tail1 = _tail_p(w, n["llm"] * bs1 * 0.55)
    lm_params = list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
    opt = torch.optim.AdamW(lm_params, lr=lr, weight_decay=0.01)

    def step_llm(rng, gen, i):
        model.train()
        items = [text_item(w, rng, tail1) for _ in range(bs1)]
        loss = _loss(model, encode(tok, [p for p, _ in items], [t for _, t in items]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm_params, 1.0)
        return loss.detach()

    runs["llm"] = loop.train(f"{name}-llm", {"model": model}, opt, step_llm, n["llm"], seed,
                             sched=_schedule(opt, n["llm"]), resume=resume)
    llm = _lm_of(model)

    # stage 2: the projector alone
    bs = 32
    tail2 = _tail_p(w, n["align"] * bs * 0.5)
    proj = list(model.model.multi_modal_projector.parameters())
    opt = torch.optim.AdamW(proj, lr=lr)

    def visual_step(make, params):
        def step(rng, gen, i):
            model.train()
            items = [it for it in (make(rng) for _ in range(bs))]
            with_image = [it for it in items if it[0] is not None]
            text_only = [it for it in items if it[0] is None]
            loss = _loss(model, encode(tok, [p for _, p, _ in with_image], [t for _, _, t in with_image]),
                         images_of([s for s, _, _ in with_image], seed=int(rng.integers(2 ** 31))))
            if text_only:
                loss = loss + _loss(model, encode(tok, [p for _, p, _ in text_only], [None] * len(text_only))) \
                    * len(text_only) / len(with_image)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            return loss.detach()
        return step

    runs["align"] = loop.train(f"{name}-align", {"model": model}, opt,
                               visual_step(lambda rng: align_item(w, rng, tail2), proj), n["align"], seed,
                               sched=_schedule(opt, n["align"], warm=20), resume=resume)

    # stage 3: projector and language model
    tail3 = _tail_p(w, n["instruct"] * bs * 0.5)
    params = proj + lm_params
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    runs["instruct"] = loop.train(f"{name}-instruct", {"model": model}, opt,
                                  visual_step(lambda rng: instruct_item(w, rng, tail3, reuse), params),
                                  n["instruct"], seed, sched=_schedule(opt, n["instruct"]), resume=resume)

    model.eval().set_attn_implementation("eager")
    llm.set_attn_implementation("eager")
    metrics = measure(model, tok, llm)
    gates = {k: store.gate(metrics[k], t, op) for k, (t, op) in GATES.items()}
    extra = {"metrics": {k: round(v, 4) for k, v in metrics.items()}, "stage_steps": n, "lr": lr,
             "params": sum(p.numel() for p in model.parameters()), "reuse_pairs": len(reuse),
             "stage_cpu_time_s": {k: round(r["cpu_time_s"], 1) for k, r in runs.items()},
             "final_loss": {k: float(np.mean(r["losses"][-50:])) for k, r in runs.items()},
             "clip_sha256": store.read_card("clip")["sha256"]["model.safetensors"]}
    wall = sum(r["wall_time_s"] for r in runs.values())
    cpu = sum(r["cpu_time_s"] for r in runs.values())
    if ship:
        d = store.zoo_dir(name)
        model.save_pretrained(d)
        llm.save_pretrained(d / "llm")
        tok.save_pretrained(d)
        store.write_card(name, seed=seed, steps=sum(n.values()), wall_time_s=wall, cpu_time_s=cpu, gates=gates,
                         extra=extra)
        for stage in runs:
            loop.finished(f"{name}-{stage}")
    return {"gates": gates, **extra, "wall_time_s": wall, "cpu_time_s": cpu}


def load(name: str = NAME):
    """(LlavaForConditionalGeneration, LlamaForCausalLM (the LLM before visual training), tokenizer),
    eval mode, eager attention (the analyses read attention weights), after verifying the files."""
    store.verify(name)
    d = store.zoo_dir(name)
    model = LlavaForConditionalGeneration.from_pretrained(d, attn_implementation="eager").eval()
    llm = LlamaForCausalLM.from_pretrained(d / "llm", attn_implementation="eager").eval()
    return model, llm, PreTrainedTokenizerFast.from_pretrained(d)


# ---------------------------------------------------------------- probe pairs for traces and edits


def positions_of(prompt: str, phrase: str, after: int = 0) -> list:
    """Token positions of ``phrase`` in ``<bos> prompt`` (first match after the image tokens)."""
    return [p + 1 for p in tf.span_positions(words_of(prompt), phrase, start=after)]


def prompt_pair(model, tok, record: tf.Record, seed: int, visual: bool = True, answer: int = None):
    """``tracing.PromptPair`` of a record (``llava.prompt_pair``): clean and corrupted ``inputs_embeds``
    sharing one render of the scene, spans "constraint" (and "text" for multi-constraint), the last
    position, the answer token (the clean greedy answer when ``answer`` is None) and, in ``meta``,
    ``question_start`` (the first question position) and ``image_positions``."""
    from ..models import llava
    rec = record if visual else record.named()
    bad = rec.corrupted() if visual else _corrupt_named(record)
    prompts = [rec.prompt(visual), bad.prompt(visual)]
    ids = encode(tok, prompts)["input_ids"]
    start = (QUESTION_START if visual else TEXT_QUESTION_START) - 1  # a word index: <bos> is not a word
    spans = {"constraint": positions_of(prompts[0], rec.constraint if visual else record.entity, start)}
    if record.text_constraint:
        spans["text"] = positions_of(prompts[0], record.text_constraint, spans["constraint"][-1])
    pair = llava.prompt_pair(model, ids, images_of([record.scene], seed) if visual else None, spans,
                             {"record": record, "visual": visual, "question_start": start + 1}, answer)
    assert pair.last == len(words_of(prompts[0]))  # encode pads nothing: both prompts have the same words
    return pair


def _corrupt_named(record: tf.Record) -> tf.Record:
    """The named question with the entity replaced by the visual corruption (another entity's name)."""
    named = record.named()
    return replace(named, question=tf.swap_phrase(named.question, record.entity, record.corruption))
