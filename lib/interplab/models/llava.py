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
from .llms import PHI_2, from_hub


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
# Multi-modal Phi-2 (BAAI/Bunny-v1_0-3B) ships as remote code (model_type "bunny-phi", written for
# transformers 4.x). Its parts are all native transformers classes in LLaVA's arrangement: a SigLIP-SO400M-384
# tower read at hidden_states[-2] with every one of its 729 patch tokens (SigLIP has no CLS), the projector
# Linear(1152, 2560) -> GELU -> Linear(2560, 2560) ("mlp2x_gelu" = LLaVA's linear_1 / act / linear_2), and a
# Phi-2 LM whose blocks are *parallel* (h + self_attn(ln(h)) + mlp(ln(h))), attention output projection
# ``self_attn.dense``, W_proj ``mlp.fc2`` (a Linear with bias). So it is built here as a
# LlavaForConditionalGeneration from config facts (``paper_config("bunny")``) and its checkpoint's tensors
# are renamed into it (``bunny_state_dict``): no remote code, and every LLaVA function of this module
# serves it. Its image placeholder (the id -200 between the separately tokenised prompt halves) becomes an
# added "<image>" token (id 50295, a row of the padded 51200-row embedding that the visual features overwrite):
# a fast tokenizer splits text at added tokens, so the halves are tokenised separately as Bunny does.

PAPER_PROMPT = "USER: <image>\n{question} ASSISTANT:"
TEXT_PROMPT = "USER: {question} ASSISTANT:"     # the text-only LLM (Vicuna-7B-v1.5), subject named
SHORT_ANSWER = " Answer the question using a single word or phrase."


def prompt_template(model) -> str:
    """The chat template of a paper MLLM: LLaVA-1.5's, or Bunny's (Vicuna-style with a system line) for a
    LLaVA whose LM is Phi."""
    text = getattr(getattr(model, "config", None), "text_config", None)
    return PAPER_MLLMS["bunny-v1.0-3b"].template if getattr(text, "model_type", None) == "phi" else PAPER_PROMPT


def paper_prompt(question: str, short: bool = False, image: bool = True, template: str = PAPER_PROMPT) -> str:
    """The llava-hf prompt (spec 2.3; ``template`` = ``prompt_template(model)`` for Bunny); ``short`` appends
    LLaVA-1.5's short-answer VQA instruction; ``image=False`` gives the text-only LLM's prompt."""
    return (template if image else TEXT_PROMPT).format(question=question + (SHORT_ANSWER if short else ""))


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


def padded_processor(image_processor):
    """LLaVA-1.5's own preprocessing (``image_aspect_ratio = "pad"``) from llava-hf's CLIPImageProcessor, which
    only resizes and centre-crops: the same settings in a ``LlavaImageProcessor`` with ``do_pad``, which first pads
    the image to a square with the mean colour (122, 116, 104), as LLaVA-1.5 was trained and evaluated."""
    from transformers import LlavaImageProcessor
    skip = ("image_processor_type", "processor_class", "auto_map")
    return LlavaImageProcessor(**{k: v for k, v in image_processor.to_dict().items() if k not in skip}, do_pad=True)


def padded_image(image_processor, image):
    """The PIL ``image`` as ``image_processor`` frames it before resizing: padded to a square by
    ``BunnyImageProcessor`` (grey) or a ``do_pad`` LLaVA processor (its mean colour), else unchanged."""
    if isinstance(image_processor, BunnyImageProcessor):
        return image_processor.pad_to_square(image)
    if not getattr(image_processor, "do_pad", False) or image.size[0] == image.size[1]:
        return image
    from PIL import Image
    w, h = image.size
    square = Image.new(image.mode, (max(w, h),) * 2, tuple(int(x * 255) for x in image_processor.image_mean))
    square.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return square


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
    template = prompt_template(model)
    prompts = [paper_prompt(q, short, image is not None, template) for q in (question, swap_spans(question, bad))]
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
    ids = tokenizer(_expand_image(model, paper_prompt(question, short, template=prompt_template(model))),
                    return_tensors="pt")["input_ids"]
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
    text: dict = field(default_factory=dict)    # config facts of the LM
    vision: dict = field(default_factory=dict)  # config facts of the tower
    top: dict = field(default_factory=dict)     # LlavaConfig facts outside the two sub-configs
    gated: bool = False
    note: str = ""
    aliases: tuple = ()
    lm_family: str = "llama"                    # "llama" (Vicuna) or "phi" (Phi-2)
    tower: str = "clip"                         # "clip" (CLIPVisionConfig) or "siglip" (SiglipVisionConfig)
    template: str = "USER: <image>\n{question} ASSISTANT:"


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

SIGLIP_SO400M_384 = dict(image_size=384, patch_size=14, hidden_size=1152, num_hidden_layers=27,
                         num_attention_heads=16, intermediate_size=4304, hidden_act="gelu_pytorch_tanh",
                         layer_norm_eps=1e-6)
BUNNY_IMAGE_ID = 50295   # the added "<image>" token: the first id after Phi-2's 50295 tokenizer entries
BUNNY = dict(image_token_index=BUNNY_IMAGE_ID, image_seq_length=729, vision_feature_layer=-2,
             vision_feature_select_strategy="full", projector_hidden_act="gelu", tie_word_embeddings=False)

PAPER_MLLMS: dict[str, MLLMSpec] = {s.name: s for s in [
    MLLMSpec("llava-1.5-7b", "llava-hf/llava-1.5-7b-hf", "14 GB", _VICUNA_7B_V15, CLIP_VIT_L14_336, LLAVA_15,
             note="LM = Vicuna-7B-v1.5 with 64 extra vocabulary rows (<image> = 32000, <pad> = 32001)",
             aliases=("llava", "llava-7b", "llava-1.5")),
    MLLMSpec("llava-1.5-13b", "llava-hf/llava-1.5-13b-hf", "27 GB",
             {**_VICUNA_7B_V15, "hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40,
              "num_key_value_heads": 40, "intermediate_size": 13824}, CLIP_VIT_L14_336, LLAVA_15,
             note="LM = Vicuna-13B-v1.5", aliases=("llava-13b",)),
    MLLMSpec("bunny-v1.0-3b", "BAAI/Bunny-v1_0-3B", "~6.5 GB", PHI_2, SIGLIP_SO400M_384, BUNNY,
             note="multi-modal Phi-2: SigLIP-SO400M-384 (729 visual tokens) + Phi-2, rebuilt as a "
                  "LlavaForConditionalGeneration from its checkpoint (no remote code)",
             aliases=("bunny", "bunny-3b"), lm_family="phi", tower="siglip",
             template=("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                       "helpful, detailed, and polite answers to the user's questions. USER: <image>\n{question} "
                       "ASSISTANT:")),
]}


def resolve(name: str) -> str:
    """Canonical key of PAPER_MLLMS for a name, alias or hub id."""
    key = name.lower()
    for k, s in PAPER_MLLMS.items():
        if key in (k, s.hub_id.lower(), *s.aliases):
            return k
    raise BadParameter(f"unknown Chapter 6 model {name!r}; use one of {', '.join(map(repr, PAPER_MLLMS))}")


def _llava_spec(name: str) -> MLLMSpec:
    return PAPER_MLLMS[resolve(name)]


def n_image_tokens(config) -> int:
    """Visual tokens per image of a LlavaConfig: (image_size / patch_size)^2, +1 for a CLIP tower's CLS
    with strategy "full" (SigLIP has none)."""
    v = config.vision_config
    cls = config.vision_feature_select_strategy == "full" and v.model_type == "clip_vision_model"
    return (v.image_size // v.patch_size) ** 2 + cls


def _llava_config(spec: MLLMSpec, text: dict, vision: dict):
    from transformers import CLIPVisionConfig, LlavaConfig, SiglipVisionConfig

    from .llms import _make_config
    tower = {"clip": CLIPVisionConfig, "siglip": SiglipVisionConfig}[spec.tower]
    text_config = _make_config(spec.lm_family, text)
    return LlavaConfig(vision_config=tower(**vision), text_config=text_config, **spec.top,
                       architectures=["LlavaForConditionalGeneration"])


def paper_config(name: str = "llava-1.5-7b"):
    """The released LlavaConfig of LLaVA-1.5 (7b / 13b), or Bunny-v1.0-3B's as a LLaVA, from the facts above
    (no download)."""
    spec = _llava_spec(name)
    return _llava_config(spec, spec.text, spec.vision)


def reduced_config(name: str = "llava-1.5-7b", n_layers: int = 4, num_heads: int = None, head_dim: int = None,
                   vision_width: int = 32, vision_layers: int = 2, vision_heads: int = 2):
    """A miniature LLaVA-1.5: same module tree, ids, vocabulary and image geometry, tiny widths.

    The tower keeps its image geometry (LLaVA-1.5: 336 px / patch 14, 576 visual tokens at layer -2, CLS
    dropped; Bunny: 384 px, 729). LM: ``n_layers`` layers, ``num_heads`` (default the real count) heads of
    ``head_dim`` (default 4; Phi 10); hidden = num_heads * head_dim and the MLP keeps the real ratio.
    """
    spec = _llava_spec(name)
    head_dim = head_dim or (10 if spec.lm_family == "phi" else 4)   # Phi-2 rotates 40 %: an even 4 of 10
    t, n = spec.text, num_heads or spec.text["num_attention_heads"]
    hidden = n * head_dim
    text = dict(t, hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=n, num_key_value_heads=n,
                head_dim=head_dim, intermediate_size=round(hidden * t["intermediate_size"] / t["hidden_size"]))
    vision = dict(spec.vision, hidden_size=vision_width, num_hidden_layers=vision_layers,
                  num_attention_heads=vision_heads, intermediate_size=4 * vision_width)
    if spec.tower == "clip":
        vision["projection_dim"] = vision_width
    return _llava_config(spec, text, vision)


def random_model(name: str = "llava-1.5-7b", seed: int = 0, **reduce):
    """Random-weight reduced LLaVA-1.5 (LlavaForConditionalGeneration, eager attention, eval mode)."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    return LlavaForConditionalGeneration._from_config(reduced_config(name, **reduce),
                                                      attn_implementation="eager").eval()


def load_paper_llava(name: str = "llava-1.5-7b", device="cuda", dtype: torch.dtype = torch.float16,
                     attn_implementation: str = "eager", cache_dir=None):
    """LLaVA-1.5 -> (LlavaForConditionalGeneration in eval mode, processor with left padding).

    ``pixel_values`` from the processor are (B, 3, 336, 336), images padded to squares first (``padded_processor``);
    each ``<image>`` in the prompt expands to 576 image-token ids. Raises ResourceUnavailable with the download command when offline and uncached.
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
    processor.image_processor = padded_processor(processor.image_processor)
    return model.eval(), processor


# Bunny-v1.0-3B's tensor names -> this module's LlavaForConditionalGeneration (first match wins)
BUNNY_RENAMES = (("model.vision_tower.vision_tower.vision_model.", "model.vision_tower.vision_model."),
                 ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
                 ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
                 ("model.", "model.language_model."),
                 ("lm_head.", "lm_head."))


def bunny_state_dict(tensors: dict, target_keys) -> dict:
    """Bunny's checkpoint tensors renamed to the keys ``target_keys`` of ``paper_config("bunny")``'s model.
    transformers 5 keeps SigLIP's layers directly under ``vision_tower`` (4.x: ``vision_tower.vision_model``);
    both are matched. BadParameter for a tensor no rename covers."""
    target_keys, out = set(target_keys), {}
    for key, value in tensors.items():
        old, new = next(((o, n) for o, n in BUNNY_RENAMES if key.startswith(o)), (None, None))
        if old is None:
            raise BadParameter(f"Bunny checkpoint tensor {key!r} has no place in the LLaVA layout")
        name = new + key[len(old):]
        flat = name.replace("vision_tower.vision_model.", "vision_tower.", 1)
        out[flat if name not in target_keys and flat in target_keys else name] = value
    return out


class BunnyImageProcessor:
    """Bunny's preprocessing: pad to a square with the mean grey (its ``image_aspect_ratio = "pad"``), then
    SigLIP's 384 px bicubic resize and normalisation with mean = std = 0.5."""

    def __init__(self, size: int = 384):
        from transformers import SiglipImageProcessor
        self.siglip = SiglipImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3,
                                           image_std=[0.5] * 3)

    @staticmethod
    def pad_to_square(image):
        from PIL import Image
        w, h = image.size
        if w == h:
            return image
        square = Image.new(image.mode, (max(w, h),) * 2, (127,) * len(image.getbands()))
        square.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
        return square

    def __call__(self, images, return_tensors="pt"):
        images = images if isinstance(images, (list, tuple)) else [images]
        return self.siglip(images=[self.pad_to_square(im.convert("RGB")) for im in images], return_tensors=return_tensors)


def load_paper_bunny(device="cuda", dtype: torch.dtype = torch.float16, attn_implementation: str = "eager",
                     cache_dir=None, config=None):
    """Multi-modal Phi-2 (BAAI/Bunny-v1_0-3B) -> (LlavaForConditionalGeneration in eval mode, processor with
    ``.tokenizer`` and ``.image_processor``), rebuilt natively from its checkpoint (see the note above
    ``PAPER_PROMPT``); no remote code. The tokenizer gets the "<image>" token; images are padded to squares
    and resized to 384 px (``BunnyImageProcessor``). If the checkpoint holds no SigLIP weights they are read
    from google/siglip-so400m-patch14-384. ResourceUnavailable offline without the files. ``config``: the
    LlavaConfig to build (default ``paper_config("bunny")``; tests pass a reduced one).
    """
    from pathlib import Path
    from types import SimpleNamespace

    from huggingface_hub import snapshot_download
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlavaForConditionalGeneration, SiglipVisionModel

    spec = PAPER_MLLMS["bunny-v1.0-3b"]

    def load(cache):
        root = snapshot_download(spec.hub_id, cache_dir=cache, allow_patterns=["*.json", "*.safetensors", "*.txt"])
        tok = AutoTokenizer.from_pretrained(root)
        tensors = {}
        for f in sorted(Path(root).glob("*.safetensors")):
            tensors.update(load_file(f))
        return tok, tensors

    tok, tensors = from_hub(spec, load, cache_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    config = config or paper_config("bunny")
    config.image_token_index = tok.convert_tokens_to_ids("<image>")
    if config.image_token_index >= config.text_config.vocab_size:
        raise BadParameter(f"<image> got id {config.image_token_index}, outside Phi-2's {config.text_config.vocab_size} rows")
    with torch.device(device):   # built where it runs (non-persistent buffers such as RoPE's are not in the file)
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    state = bunny_state_dict(tensors, model.state_dict().keys())
    if not any(k.startswith("model.vision_tower.") for k in state):
        tower = from_hub(MLLMSpec("siglip-so400m-384", "google/siglip-so400m-patch14-384", "0.9 GB"),
                         lambda cache: SiglipVisionModel.from_pretrained("google/siglip-so400m-patch14-384",
                                                                         cache_dir=cache), cache_dir)
        state.update(bunny_state_dict({f"model.vision_tower.vision_tower.{k}": v for k, v in tower.state_dict().items()},
                                      model.state_dict().keys()))
    model.load_state_dict(state, strict=True)
    model.eval()
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, SimpleNamespace(tokenizer=tok, image_processor=BunnyImageProcessor())
