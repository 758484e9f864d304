"""LLaVA-architecture multimodal LMs of Chapter 6: the zoo's tiny LLaVA and LLaVA-1.5 (paper).

    inputs_embeds()   token embeddings with the projector's visual tokens spliced in at the image
                      positions: built once per example, then every clean / corrupted / restored run
                      of a trace starts from it (the vision tower runs once)
    language_logits() the language model + head on given embeddings (what a trace's ``run`` calls)

The paper profile (spec 4): ``paper_config()`` (LLaVA-1.5-7B/13B configs written as facts, no download),
``reduced_config()`` / ``random_model()`` (same module tree and 576-token image geometry, tiny widths),
``load_paper_llava()`` / ``load_paper_bunny()`` (hub or cache; offline they raise ResourceUnavailable naming
the ``hf download`` command), ``paper_prompt()`` and ``paper_prompt_pair()`` (a spec-2.2 record -> a
``tracing.PromptPair`` with token spans from character offsets; also for the text-only Vicuna),
``paper_inputs()`` (one clean prompt; ``attribution.greedy_generate`` answers such embeddings in batches) and
``answer_token()``.

Module paths go through ``interplab.anatomy`` (Composite "llava"), which knows both layouts of
transformers' LlavaForConditionalGeneration (>= 4.52: ``model.language_model``; <= 4.51:
``language_model.model``).
"""
from dataclasses import dataclass, field

import torch

from .. import anatomy
from ..errors import BadParameter
from .llms import from_hub


def _module(model, name: str):
    return model.get_submodule(anatomy.resolve(model, name).path)


@torch.no_grad()
def inputs_embeds(model, input_ids: torch.Tensor, pixel_values: torch.Tensor = None) -> torch.Tensor:
    """(B, T, d) embeddings of ``input_ids`` (B, T) whose image-token rows hold the projected vision
    features of ``pixel_values`` (B, 3, H, W) (one image per row; None: text only)."""
    embeds = _module(model, "language_model.embed")(input_ids)
    if pixel_values is None:
        return embeds
    feats = model.get_image_features(pixel_values=pixel_values)
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats.flatten(0, -2)
    mask = input_ids == model.config.image_token_index
    if int(mask.sum()) != feats.shape[0]:
        raise ValueError(f"{int(mask.sum())} image tokens in input_ids but {feats.shape[0]} visual features")
    return embeds.masked_scatter(mask[..., None], feats.to(embeds.dtype))


def language_logits(model, embeds: torch.Tensor, attention_mask: torch.Tensor = None) -> torch.Tensor:
    """(B, T, V) logits of the language model on embeddings (B, T, d)."""
    return model(inputs_embeds=embeds, attention_mask=attention_mask).logits


# ----------------------------------------------------------------------------------------------------------
# the paper's MLLMs (spec sections 2.1 and 4): LLaVA-1.5 as config facts, reduced random builds, hub loaders
#
# Multi-modal Phi-2 (BAAI/Bunny-v1_0-3B) is remote code (model_type "bunny-phi"): a SigLIP-SO400M-384 tower
# (729 visual tokens), an MLP projector and a Phi-2 LM whose blocks are *parallel*
# (h + self_attn(ln(h)) + mlp(ln(h))), attention output projection ``self_attn.dense``, W_proj ``mlp.fc2``
# (a Linear with bias), layers at ``model.layers``. Its classes live in ``transformers_modules``, so
# anatomy does not detect them: resolve its names with ``family="phi"`` (load_paper_bunny checks that they
# resolve). Its image placeholder is the id -200 spliced between the tokenised prompt halves (BUNNY_PROMPT),
# and the remote code was written for transformers 4.x: under 5.x it may fail to import.

PAPER_PROMPT = "USER: <image>\n{question} ASSISTANT:"
TEXT_PROMPT = "USER: {question} ASSISTANT:"     # the text-only LLM (Vicuna-7B-v1.5), subject named
SHORT_ANSWER = " Answer the question using a single word or phrase."
BUNNY_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the user's questions. USER: <image>\n{question} ASSISTANT:")
BUNNY_IMAGE_TOKEN = -200


def paper_prompt(question: str, short: bool = False, image: bool = True) -> str:
    """The llava-hf prompt (spec 2.3); ``short`` appends LLaVA-1.5's short-answer VQA instruction;
    ``image=False`` gives the text-only LLM's prompt."""
    return (PAPER_PROMPT if image else TEXT_PROMPT).format(question=question + (SHORT_ANSWER if short else ""))


@torch.no_grad()
def prompt_pair(model, ids: torch.Tensor, pixel_values: torch.Tensor, spans: dict, meta: dict, answer: int = None):
    """``tracing.PromptPair`` from the clean and corrupted prompt ids (2, T) of one example.

    The vision tower runs once, on ``pixel_values`` (1, 3, H, W) (None: a text-only LM); the corrupted
    embeddings are the clean ones with the differing token rows re-embedded, so both runs share the image.
    ``last`` is position T - 1; ``answer`` None takes the clean greedy token and keeps its distribution
    (V,) in ``meta["next_token_probs"]``; ``meta["image_positions"]`` lists the visual token positions.
    """
    from ..tracing import PromptPair

    ids = torch.as_tensor(ids, device=next(model.parameters()).device)
    embed = model.get_input_embeddings()
    clean = inputs_embeds(model, ids[:1], pixel_values) if pixel_values is not None else embed(ids[:1])
    corrupted = clean.clone()
    differ = ids[0] != ids[1]
    corrupted[0, differ] = embed(ids[1, differ]).to(clean.dtype)
    last = ids.shape[1] - 1
    if pixel_values is not None:
        meta["image_positions"] = (ids[0] == model.config.image_token_index).nonzero().flatten().tolist()
    if answer is None:
        meta["next_token_probs"] = model(inputs_embeds=clean).logits[0, last].float().softmax(-1)
        answer = int(meta["next_token_probs"].argmax())
    return PromptPair({"inputs_embeds": clean}, {"inputs_embeds": corrupted}, spans, last, answer, meta)


def _token_span(offsets, start: int, end: int) -> list:
    """Positions of the tokens whose character offsets overlap [start, end)."""
    return [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]


def _expand_image(model, prompt: str) -> str:
    return prompt.replace("<image>", "<image>" * n_image_tokens(model.config))


def _pixels(model, image_processor, image) -> torch.Tensor:
    param = next(model.parameters())
    return image_processor(images=image, return_tensors="pt")["pixel_values"].to(param.device, param.dtype)


@torch.no_grad()
def paper_prompt_pair(model, tokenizer, image_processor, record: dict, image, answer: int = None,
                      short: bool = False):
    """``tracing.PromptPair`` of a spec-2.2 record (``interplab.vqa``) for a llava-hf model.

    The prompt is ``paper_prompt`` with ``<image>`` expanded to the model's visual tokens (as LlavaProcessor
    does); the corrupted prompt swaps the record's corruption into ``visual_constraint_span`` (and
    ``text_corruption`` into ``text_constraint_span``). Token spans "constraint" (and "text") come from the
    tokenizer's character offsets; the pair is built by ``prompt_pair`` (one vision pass, (1, T, d) per run).
    ``image`` None: a text-only LM (``model`` a causal LM, ``TEXT_PROMPT``; Fig 6.1's Vicuna on
    ``ConstraintRecord.named()``). ``meta["question_start"]``: the first question position (everything
    before it is shared by both runs, the prefix ``tracing.cached_prefix`` can reuse). BadParameter when
    the corruption changes the token count, since restoring a position then compares different tokens.
    """
    from ..vqa import swap_spans

    question = record["question"]
    bad = [(*record["visual_constraint_span"], record["corruption"])]
    if record.get("text_constraint_span"):
        bad.append((*record["text_constraint_span"], record["text_corruption"]))
    prompts = [paper_prompt(q, short, image is not None) for q in (question, swap_spans(question, bad))]
    if image is not None:
        prompts = [_expand_image(model, p) for p in prompts]
    enc = tokenizer(prompts, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if len(ids[0]) != len(ids[1]):
        raise BadParameter(f"record {record.get('id')!r}: the corruption {record['corruption']!r} changes the prompt "
                           f"from {len(ids[0])} to {len(ids[1])} tokens; MultimodalCausalTrace needs a same-length one")
    q_at = prompts[0].index(question, prompts[0].index("<image>") if image is not None else 0)
    spans = {"constraint": _token_span(offsets[0], q_at + record["visual_constraint_span"][0],
                                       q_at + record["visual_constraint_span"][1])}
    if record.get("text_constraint_span"):
        spans["text"] = _token_span(offsets[0], q_at + record["text_constraint_span"][0],
                                    q_at + record["text_constraint_span"][1])
    question_start = _token_span(offsets[0], q_at, q_at + len(question))[0]
    pixels = _pixels(model, image_processor, image) if image is not None else None
    return prompt_pair(model, ids, pixels, spans, {"record": record, "question_start": question_start}, answer)


@torch.no_grad()
def paper_inputs(model, tokenizer, image_processor, question: str, image, short: bool = False) -> dict:
    """``{"inputs_embeds": (1, T, d)}`` of one clean prompt (paraphrases, specificity questions); the
    answer is predicted at position T - 1."""
    ids = tokenizer(_expand_image(model, paper_prompt(question, short)), return_tensors="pt")["input_ids"]
    return {"inputs_embeds": inputs_embeds(model, ids.to(next(model.parameters()).device),
                                           _pixels(model, image_processor, image))}


def answer_token(tokenizer, prompt: str, answer: str) -> int:
    """The first token of ``answer`` as it follows ``prompt`` (SentencePiece tokenises a word differently
    at the start of a text and after a space, so the answer is tokenised in place)."""
    head = tokenizer(prompt)["input_ids"]
    full = tokenizer(prompt + " " + answer)["input_ids"]
    if full[:len(head)] != head or len(full) == len(head):
        raise BadParameter(f"the answer {answer!r} does not extend the prompt's tokens")
    return full[len(head)]


@dataclass(frozen=True)
class MLLMSpec:
    name: str
    hub_id: str
    size: str               # fp16 weight size, for the download hint
    text: dict = field(default_factory=dict)    # LlamaConfig facts of the LM (empty: not written here)
    vision: dict = field(default_factory=dict)  # CLIPVisionConfig facts of the tower
    top: dict = field(default_factory=dict)     # LlavaConfig facts outside the two sub-configs
    gated: bool = False
    note: str = ""
    aliases: tuple = ()


CLIP_VIT_L14_336 = dict(image_size=336, patch_size=14, hidden_size=1024, num_hidden_layers=24,
                        num_attention_heads=16, intermediate_size=4096, hidden_act="quick_gelu",
                        projection_dim=768, layer_norm_eps=1e-5)
LLAVA_15 = dict(image_token_index=32000, image_seq_length=576, vision_feature_layer=-2,
                vision_feature_select_strategy="default", projector_hidden_act="gelu", pad_token_id=32001,
                tie_word_embeddings=False)
_VICUNA_7B_V15 = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      intermediate_size=11008, vocab_size=32064, rope_theta=10000.0, max_position_embeddings=4096,
                      rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                      hidden_act="silu")

PAPER_MLLMS: dict[str, MLLMSpec] = {s.name: s for s in [
    MLLMSpec("llava-1.5-7b", "llava-hf/llava-1.5-7b-hf", "14 GB", _VICUNA_7B_V15, CLIP_VIT_L14_336, LLAVA_15,
             note="LM = Vicuna-7B-v1.5 with 64 extra vocabulary rows (<image> = 32000, <pad> = 32001)",
             aliases=("llava", "llava-7b", "llava-1.5")),
    MLLMSpec("llava-1.5-13b", "llava-hf/llava-1.5-13b-hf", "27 GB",
             {**_VICUNA_7B_V15, "hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40,
              "num_key_value_heads": 40, "intermediate_size": 13824}, CLIP_VIT_L14_336, LLAVA_15,
             note="LM = Vicuna-13B-v1.5", aliases=("llava-13b",)),
    MLLMSpec("bunny-v1.0-3b", "BAAI/Bunny-v1_0-3B", "~6.5 GB",
             note="multi-modal Phi-2: remote code (trust_remote_code), SigLIP-SO400M-384, 729 visual tokens",
             aliases=("bunny", "bunny-3b")),
]}


def resolve(name: str) -> str:
    """Canonical key of PAPER_MLLMS for a name, alias or hub id."""
    key = name.lower()
    for k, s in PAPER_MLLMS.items():
        if key in (k, s.hub_id.lower(), *s.aliases):
            return k
    raise BadParameter(f"unknown Chapter 6 model {name!r}; use one of {', '.join(map(repr, PAPER_MLLMS))}")


def _llava_spec(name: str) -> MLLMSpec:
    spec = PAPER_MLLMS[resolve(name)]
    if not spec.text:
        raise BadParameter(f"{spec.name} is not a LlavaForConditionalGeneration; load it with load_paper_bunny()")
    return spec


def n_image_tokens(config) -> int:
    """Visual tokens per image of a LlavaConfig: (image_size / patch_size)^2 (+1 CLS with strategy "full")."""
    v = config.vision_config
    return (v.image_size // v.patch_size) ** 2 + (config.vision_feature_select_strategy == "full")


def _llava_config(text: dict, vision: dict, top: dict):
    from transformers import CLIPVisionConfig, LlavaConfig

    from .llms import _make_config
    return LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=_make_config("llama", text), **top,
                       architectures=["LlavaForConditionalGeneration"])


def paper_config(name: str = "llava-1.5-7b"):
    """The released LlavaConfig of LLaVA-1.5 (7b / 13b), from the facts above (no download)."""
    spec = _llava_spec(name)
    return _llava_config(spec.text, spec.vision, spec.top)


def reduced_config(name: str = "llava-1.5-7b", n_layers: int = 4, num_heads: int = None, head_dim: int = 4,
                   vision_width: int = 32, vision_layers: int = 2, vision_heads: int = 2):
    """A miniature LLaVA-1.5: same module tree, ids, vocabulary and image geometry, tiny widths.

    The tower keeps 336 px / patch 14, so an image still gives 576 visual tokens (features taken at layer -2,
    CLS dropped). LM: ``n_layers`` layers, ``num_heads`` (default the real count) heads of ``head_dim``;
    hidden = num_heads * head_dim and the MLP keeps the real intermediate/hidden ratio.
    """
    spec = _llava_spec(name)
    t, n = spec.text, num_heads or spec.text["num_attention_heads"]
    hidden = n * head_dim
    text = dict(t, hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=n, num_key_value_heads=n,
                head_dim=head_dim, intermediate_size=round(hidden * t["intermediate_size"] / t["hidden_size"]))
    vision = dict(spec.vision, hidden_size=vision_width, num_hidden_layers=vision_layers,
                  num_attention_heads=vision_heads, intermediate_size=4 * vision_width, projection_dim=vision_width)
    return _llava_config(text, vision, spec.top)


def random_model(name: str = "llava-1.5-7b", seed: int = 0, **reduce):
    """Random-weight reduced LLaVA-1.5 (LlavaForConditionalGeneration, eager attention, eval mode)."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    return LlavaForConditionalGeneration._from_config(reduced_config(name, **reduce),
                                                      attn_implementation="eager").eval()


def load_paper_llava(name: str = "llava-1.5-7b", device="cuda", dtype: torch.dtype = torch.float16,
                     attn_implementation: str = "eager", cache_dir=None):
    """LLaVA-1.5 -> (LlavaForConditionalGeneration in eval mode, processor with left padding).

    ``pixel_values`` from the processor are (B, 3, 336, 336); each ``<image>`` in the prompt expands to
    576 image-token ids. Raises ResourceUnavailable with the download command when offline and uncached.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    spec = _llava_spec(name)

    def load(cache):
        processor = AutoProcessor.from_pretrained(spec.hub_id, cache_dir=cache)
        model = LlavaForConditionalGeneration.from_pretrained(
            spec.hub_id, dtype=dtype, device_map=str(device), attn_implementation=attn_implementation,
            cache_dir=cache)
        return model, processor

    model, processor = from_hub(spec, load, cache_dir)
    processor.tokenizer.padding_side = "left"
    return model.eval(), processor


def load_paper_bunny(device="cuda", dtype: torch.dtype = torch.float16, attn_implementation: str = "eager",
                     cache_dir=None):
    """Multi-modal Phi-2 (BAAI/Bunny-v1_0-3B, remote code) -> (model in eval mode, tokenizer).

    Images go through ``model.process_images([pil], model.config)`` -> (B, 3, 384, 384), passed as
    ``images=``; the prompt's image placeholder is BUNNY_IMAGE_TOKEN (see the note above this section).
    Raises anatomy.UnsupportedModel when the LM's blocks are not at the Phi paths anatomy's "phi" family names.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = PAPER_MLLMS["bunny-v1.0-3b"]

    def load(cache):
        tok = AutoTokenizer.from_pretrained(spec.hub_id, trust_remote_code=True, cache_dir=cache)
        model = AutoModelForCausalLM.from_pretrained(
            spec.hub_id, dtype=dtype, device_map=str(device), attn_implementation=attn_implementation,
            trust_remote_code=True, cache_dir=cache)
        return model, tok

    model, tok = from_hub(spec, load, cache_dir)
    try:
        fc2 = model.get_submodule(anatomy.resolve(model, "layer[0].mlp.neurons", family="phi").path)
        anatomy.resolve(model, "layer[0].attn.out", family="phi")
    except anatomy.UnknownComponent as e:
        raise anatomy.UnsupportedModel(f"{spec.hub_id}: its LM is not laid out as Phi ({e})") from e
    if fc2.bias is None:
        raise anatomy.UnsupportedModel(f"{spec.hub_id}: mlp.fc2 has no bias; not the Phi-2 LM this chapter edits")
    return model.eval(), tok
