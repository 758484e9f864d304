"""Chapter 8 language models: paper configs as facts, their same-structure miniatures, offline errors,
the QA prompt, SmolLM2 (only when its wheel and cache exist) and the committed SmolLM2 probe sets."""
import importlib.util
import json
import re
import time

import pytest
import torch

from interplab import qa_probes
from interplab.errors import InterplabError, ResourceUnavailable
from interplab.models import llms

PAPER = ["vicuna-7b", "llama-3-8b", "phi-3", "llama-3-70b"]

# (layers, query heads, kv heads, hidden, intermediate, vocab, rope theta, max positions) of the released configs
FACTS = {
    "vicuna-7b": (32, 32, 32, 4096, 11008, 32000, 10000.0, 2048),
    "llama-3-8b": (32, 32, 8, 4096, 14336, 128256, 500000.0, 8192),
    "phi-3": (32, 32, 32, 3072, 8192, 32064, 10000.0, 4096),
    "llama-3-70b": (80, 64, 8, 8192, 28672, 128256, 500000.0, 8192),
    "smollm2-135m": (30, 9, 3, 576, 1536, 49152, 100000.0, 8192),
}


@pytest.mark.parametrize("name", list(FACTS))
def test_paper_config_facts(name):
    cfg = llms.paper_config(name)
    got = (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size,
           cfg.intermediate_size, cfg.vocab_size, cfg.rope_parameters["rope_theta"], cfg.max_position_embeddings)
    assert got == FACTS[name]
    assert cfg.hidden_size // cfg.num_attention_heads == {"smollm2-135m": 64, "phi-3": 96}.get(name, 128)


@pytest.mark.parametrize("name, billions", [("vicuna-7b", 6.74), ("llama-3-8b", 8.03), ("phi-3", 3.82),
                                            ("smollm2-135m", 0.1345)])
def test_paper_config_parameter_count(name, billions):
    """The published model sizes follow from the configs (built on the meta device: no memory)."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(llms.paper_config(name))
    n = sum(p.numel() for p in model.parameters()) / 1e9  # tied SmolLM2 embeddings count once
    assert abs(n - billions) / billions < 0.005, n


@pytest.mark.parametrize("name", PAPER + ["smollm2-135m"])
def test_reduced_model_has_chapter8_module_paths(name):
    real = llms.paper_config(name)
    model = llms.random_model(name, num_layers=2)
    cfg = model.config
    assert cfg.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert cfg.num_attention_heads == real.num_attention_heads
    assert cfg.num_key_value_heads == real.num_key_value_heads
    group = real.num_attention_heads // real.num_key_value_heads
    assert cfg.num_attention_heads // cfg.num_key_value_heads == group
    d_head = cfg.hidden_size // cfg.num_attention_heads
    for layer in model.model.layers:
        attn = layer.self_attn
        assert isinstance(attn.o_proj, torch.nn.Linear) and attn.o_proj.bias is None
        assert attn.o_proj.in_features == cfg.num_attention_heads * d_head
        assert isinstance(layer.mlp.down_proj, torch.nn.Linear)
        if name.startswith("phi"):
            assert attn.qkv_proj.out_features == (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d_head
            assert hasattr(layer.mlp, "gate_up_proj") and not hasattr(attn, "q_proj")
        else:
            assert attn.k_proj.out_features == cfg.num_key_value_heads * d_head
            assert not hasattr(attn, "qkv_proj")
    assert type(model.model.norm).__name__.endswith("RMSNorm")
    assert model.lm_head.out_features == cfg.vocab_size
    ids = torch.randint(3, cfg.vocab_size, (2, 7))
    with torch.inference_mode():
        out = model(ids, output_attentions=True)
    assert out.logits.shape == (2, 7, cfg.vocab_size)
    assert out.attentions[0].shape == (2, cfg.num_attention_heads, 7, 7)  # per query head, eager


def test_reduced_config_can_shrink_heads_keeping_gqa():
    cfg = llms.reduced_config("llama-3-70b", num_heads=16)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (16, 2)
    with pytest.raises(InterplabError):
        llms.reduced_config("llama-3-8b", num_heads=6)  # not a multiple of the group size 4


def test_names_aliases_and_hub_ids_resolve():
    assert llms.resolve("meta-llama/Meta-Llama-3-8B-Instruct") == "llama-3-8b"
    assert llms.resolve("Llama-70B") == "llama-3-70b"
    assert llms.PAPER_LLMS["vicuna-7b"].hub_id == "lmsys/vicuna-7b-v1.3"   # the text's 2048-token limit
    assert llms.PAPER_LLMS["phi-3"].hub_id == "microsoft/Phi-3-mini-4k-instruct"
    with pytest.raises(InterplabError):
        llms.resolve("gpt-5")


@pytest.mark.parametrize("name", PAPER)
def test_offline_paper_model_names_the_download(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ResourceUnavailable) as err:
        llms.load_paper_llm(name, device="cpu", cache_dir=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and f"hf download {llms.PAPER_LLMS[name].hub_id}" in msg
    assert time.perf_counter() - t0 < 5


# ---------------------------------------------------------------------------------------------------------
# prompts, with tokenizers that need no download

LLAMA3_TEMPLATE = (  # Meta-Llama-3-*-Instruct's chat template
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
    "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
NO_SYSTEM_TEMPLATE = (  # Phi-3's first release: system messages are silently dropped
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{'<|user|>\n' + message['content']"
    " + '<|end|>\n' + '<|assistant|>\n'}}{% elif message['role'] == 'assistant' %}{{message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}")


def _toy_tokenizer(template):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.WordLevel({"[UNK]": 0, "<s>": 1, "</s>": 2}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    tok.chat_template = template
    return tok


CONTEXT = "The Space Needle is a tower. The Space Needle is located in New York."
QUESTION = "Where is the Space Needle located?"


@pytest.mark.parametrize("template, ends", [(llms.VICUNA_CHAT_TEMPLATE, " ASSISTANT:"),
                                            (LLAMA3_TEMPLATE, "assistant<|end_header_id|>\n\n"),
                                            (NO_SYSTEM_TEMPLATE, "<|assistant|>\n"), (None, "Answer:")])
def test_qa_prompt_context_span(template, ends):
    tok = _toy_tokenizer(template)
    prompt, (a, b) = llms.qa_prompt(tok, CONTEXT, QUESTION)
    assert prompt[a:b] == CONTEXT
    assert llms.QA_INSTRUCTION in prompt and f"Question: {QUESTION}" in prompt
    assert prompt.endswith(ends)


VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
                 "detailed, and polite answers to the user's questions.")


def test_vicuna_prompt_keeps_fastchat_system_prompt_and_ends_with_the_assistant_header():
    """FastChat's vicuna_v1.1: "{system} USER: {msg} ASSISTANT:"; the instruction opens the user turn (spec 2.2)."""
    tok = _toy_tokenizer(llms.VICUNA_CHAT_TEMPLATE)
    prompt, (a, b) = llms.qa_prompt(tok, CONTEXT, QUESTION)
    assert prompt == (f"{VICUNA_SYSTEM} USER: {llms.QA_INSTRUCTION}\nContext: {CONTEXT}\nQuestion: {QUESTION}"
                      " ASSISTANT:")
    assert prompt[a:b] == CONTEXT
    assert llms.closed_book_prompt(tok, QUESTION) == (f"{VICUNA_SYSTEM} USER: {llms.CLOSED_BOOK_INSTRUCTION}\n"
                                                      f"Question: {QUESTION} ASSISTANT:")
    assert llms.self_attribution_prompt(tok, CONTEXT, QUESTION).startswith(
        f"{VICUNA_SYSTEM} USER: {llms.SELF_ATTRIBUTION_INSTRUCTION}\nContext: ")


def _sentencepiece_llama_tokenizer(tmp_path):
    """A Llama tokenizer from a tokenizer.model alone, as lmsys/vicuna-7b-v1.3 ships it (no tokenizer.json):
    transformers converts it with sentencepiece + protobuf (pinned in pyproject.toml)."""
    import io

    import sentencepiece as spm
    from transformers import AutoTokenizer
    words = ["A chat between a curious user and an artificial intelligence assistant.", "USER: ASSISTANT: Answer",
             "Context: The Space Needle is a tower located in Seattle.", "Question: Where is the Space Needle?"]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(words * 20), model_writer=model, vocab_size=80,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
                                   minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": False}))
    return AutoTokenizer.from_pretrained(tmp_path)


def test_a_tokenizer_model_without_tokenizer_json_converts_offline(tmp_path):
    tok = _sentencepiece_llama_tokenizer(tmp_path)
    assert not (tmp_path / "tokenizer.json").exists() and tok.bos_token_id == 1
    tok.chat_template = llms.VICUNA_CHAT_TEMPLATE
    prompt, (a, b) = llms.qa_prompt(tok, CONTEXT, QUESTION)
    assert prompt.endswith(" ASSISTANT:") and llms.add_special_tokens(tok, prompt)   # the tokenizer adds <s>
    ids = llms.encode(tok, prompt).input_ids[0].tolist()
    assert ids.count(1) == 1 and ids[0] == 1 and llms.prompt_length(tok, prompt) == len(ids)


def test_from_hub_reraises_errors_of_downloaded_files_and_names_missing_downloads(monkeypatch):
    """A cached checkpoint whose tokenizer cannot be converted is not an undownloaded one."""
    spec = llms.PAPER_LLMS["vicuna-7b"]
    monkeypatch.setattr(llms, "_offline", lambda hub_id, cache_dir: False)

    def load(cache_dir):  # what transformers says when sentencepiece is missing (it falls back to tiktoken)
        raise ValueError("`tiktoken` is required to read a `tiktoken` file. Install it with `pip install tiktoken`.")

    monkeypatch.setattr(llms, "_cached", lambda hub_id, cache_dir: True)
    with pytest.raises(ValueError, match="tiktoken") as err:
        llms.from_hub(spec, load)
    assert not isinstance(err.value, ResourceUnavailable)
    assert any("sentencepiece and protobuf" in n for n in getattr(err.value, "__notes__", []))
    monkeypatch.setattr(llms, "_cached", lambda hub_id, cache_dir: False)
    with pytest.raises(ResourceUnavailable, match="hf download lmsys/vicuna-7b-v1.3"):
        llms.from_hub(spec, load)

    def gone(cache_dir):  # hub errors (gated, not found, offline) are OSErrors: always the download hint
        raise OSError("not found")
    monkeypatch.setattr(llms, "_cached", lambda hub_id, cache_dir: True)
    with pytest.raises(ResourceUnavailable, match="hf download"):
        llms.from_hub(spec, gone)


def test_cached_reads_the_hf_cache(tmp_path):
    assert not llms._cached("lmsys/vicuna-7b-v1.3", str(tmp_path))
    snap = tmp_path / "models--lmsys--vicuna-7b-v1.3"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("abc")
    (snap / "snapshots" / "abc").mkdir(parents=True)
    (snap / "snapshots" / "abc" / "tokenizer_config.json").write_text("{}")
    assert llms._cached("lmsys/vicuna-7b-v1.3", str(tmp_path))


def test_fit_context_cuts_whole_sentences_from_the_end_never_the_question():
    tok = _toy_tokenizer(llms.VICUNA_CHAT_TEMPLATE)
    context = " ".join(f"Sentence {i} says something ." for i in range(20))

    def render(c):
        return llms.qa_prompt(tok, c, QUESTION)[0]

    full = llms.prompt_length(tok, render(context))
    assert llms.fit_context(tok, context, render, full) == (context, False)
    cut, was_cut = llms.fit_context(tok, context, render, full - 10)
    assert was_cut and context.startswith(cut) and cut.endswith("something .")
    assert llms.prompt_length(tok, render(cut)) <= full - 10 < llms.prompt_length(tok, render(cut + " Sentence"))
    assert QUESTION in render(cut)
    one = "a b c d e f g h i j ."                        # a single sentence too long: words go
    short, was_cut = llms.fit_context(tok, one, render, llms.prompt_length(tok, render("a b c")))
    assert was_cut and short == "a b c"


@pytest.mark.parametrize("template", [llms.VICUNA_CHAT_TEMPLATE, LLAMA3_TEMPLATE, NO_SYSTEM_TEMPLATE, None])
def test_attribution_prompts_keep_their_instruction_context_and_answer(template):
    tok = _toy_tokenizer(template)
    self_attr = llms.self_attribution_prompt(tok, CONTEXT, QUESTION)
    assert llms.SELF_ATTRIBUTION_INSTRUCTION in self_attr and f"Context: {CONTEXT}\nQuestion: {QUESTION}" in self_attr
    evidence = llms.evidence_prompt(tok, CONTEXT, QUESTION, "New York")
    assert llms.EVIDENCE_INSTRUCTION in evidence and evidence.index(CONTEXT) < evidence.index("Answer: New York")


def test_offline_sentence_encoder_names_the_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ResourceUnavailable, match="hf download sentence-transformers/all-mpnet-base-v2"):
        llms.load_sentence_encoder("cpu", cache_dir=tmp_path)


def test_one_bos_whether_the_tokenizer_or_the_template_writes_it():
    from tokenizers import processors
    tok = _toy_tokenizer(llms.VICUNA_CHAT_TEMPLATE)
    prompt, _ = llms.qa_prompt(tok, CONTEXT, QUESTION)
    assert not llms.add_special_tokens(tok, prompt)  # this tokenizer adds no BOS
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert llms.add_special_tokens(tok, prompt)       # Vicuna's adds <s> and its template does not write it
    assert not llms.add_special_tokens(tok, "<s>" + prompt)  # Llama-3's template writes it itself
    for p in (prompt, "<s>" + prompt):
        ids = tok(p, add_special_tokens=llms.add_special_tokens(tok, p)).input_ids
        assert ids.count(1) == 1 and ids == llms.encode(tok, p).input_ids[0].tolist()


# ---------------------------------------------------------------------------------------------------------
# SmolLM2 (the wheel, and for the model test its cache: never the 30 s first dequantisation in a test)

HAS_WHEEL = importlib.util.find_spec(llms.SMOLLM2_PACKAGE) is not None
needs_wheel = pytest.mark.skipif(not HAS_WHEEL, reason=f"SmolLM2 wheel absent: {llms.SMOLLM2_PIP}")


def _cache_ready():
    try:
        return llms._cache_is_valid(llms.smollm2_cache_dir(), llms.smollm2_gguf())
    except ResourceUnavailable:
        return False


def test_smollm2_missing_wheel_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(llms.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ResourceUnavailable, match=re.escape(llms.SMOLLM2_PIP)):
        llms.smollm2()


def test_cache_lives_outside_the_tracked_tree(monkeypatch, tmp_path):
    from interplab import paths
    monkeypatch.delenv("INTERPLAB_CACHE", raising=False)
    assert llms.smollm2_cache_dir().is_relative_to(paths.BUILD)
    assert "build/" in (paths.ROOT / ".gitignore").read_text().split()
    monkeypatch.setenv("INTERPLAB_CACHE", str(tmp_path))
    assert llms.smollm2_cache_dir().parent == tmp_path


@needs_wheel
@pytest.mark.skipif(not _cache_ready(), reason="no SmolLM2 cache yet; `python -c 'from interplab.models import "
                                               "llms; llms.smollm2()'` builds it once (~30 s)")
def test_smollm2_from_cache_reproduces_probe_answers():
    t0 = time.perf_counter()
    model, tok = llms.smollm2()
    assert time.perf_counter() - t0 < 5
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size) == (30, 9, 3, 576)
    assert model.model.layers[0].self_attn.o_proj.in_features == 576
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    probes = qa_probes.load_probes()
    rows = sorted(probes["D_copy"] + probes["D_memory"], key=lambda r: -r["p_clean"])[:4]
    prompts = [llms.qa_prompt(tok, r["context"], r["question"], answer_prefix=probes["meta"]["answer_prefix"])[0]
               for r in rows]
    enc = llms.encode(tok, prompts)
    with torch.inference_mode():
        logits = model(**enc).logits[:, -1]
    assert logits.argmax(-1).tolist() == [r["answer_token_id"] for r in rows]


@needs_wheel
def test_smollm2_chat_prompt_and_offsets():
    cache = llms.smollm2_cache_dir()
    if not (cache / "tokenizer.json").exists():
        pytest.skip("no SmolLM2 cache yet")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(cache)
    prompt, (a, b) = llms.qa_prompt(tok, CONTEXT, QUESTION, answer_prefix="Answer:")
    assert prompt.startswith("<|im_start|>system\n" + llms.QA_INSTRUCTION + "<|im_end|>")
    assert prompt.endswith("<|im_start|>assistant\nAnswer:") and prompt[a:b] == CONTEXT
    enc = llms.encode(tok, [prompt, "short"], return_offsets=True)
    ids, offs = enc.input_ids[0], enc.offset_mapping[0]
    assert ids[0].item() == tok.convert_tokens_to_ids("<|im_start|>")  # no extra BOS for SmolLM2
    inside = [i for i, (s, e) in enumerate(offs.tolist()) if e > a and s < b]  # " The" starts at the space
    assert tok.decode(ids[inside[0]:inside[-1] + 1]).strip() == CONTEXT
    assert enc.attention_mask[1, 0] == 0  # left padding


# ---------------------------------------------------------------------------------------------------------
# the committed probe sets

def _word(s):
    return re.compile(r"(?<!\w)" + re.escape(s) + r"(?!\w)", re.IGNORECASE)


def test_probe_sets_are_well_formed():
    probes = json.loads(qa_probes.PROBES_PATH.read_text())
    meta = probes["meta"]
    assert meta["instruction"] == llms.QA_INSTRUCTION
    ids = [r["id"] for k in ("D_copy", "D_memory") for r in probes[k]]
    assert len(ids) == len(set(ids))
    for kind in ("D_copy", "D_memory"):
        rows = probes[kind]
        assert len(rows) == meta["counts"][kind]["corruption_lowers_p"] >= 50
        for r in rows:
            a, b = r["value_span"]
            assert r["context"][a:b] == r["value"]
            assert r["context_original"][a:a + len(r["answer"])] == r["answer"]  # the slot held the answer
            assert r["context"][:a] == r["context_original"][:a]
            assert not _word(r["answer"]).search(r["context"])
            if kind == "D_copy":
                assert r["target"] == r["value"] != r["answer"] and r["value"] != qa_probes.DASH
            else:
                assert r["value"] == qa_probes.DASH and r["target"] == r["answer"]
            assert r["subject"] in r["question"] and not _word(r["subject"]).search(r["corrupt_question"])
            assert _word(r["corrupt_subject"]).search(r["corrupt_context"])
            assert not _word(r["subject"]).search(r["corrupt_context"])
            assert not _word(r["target"]).search(r["corrupt_context"])
            assert r["p_corrupt"] < r["p_clean"]
            assert isinstance(r["answer_token_id"], int) and r["answer_token_text"].startswith(" ")
            assert any(t.lower().startswith(r["answer_token_text"].strip().lower())
                       for t in [r["target"], *r["target_aliases"]])
            starts = [s for s, _ in r["sentence_spans"]]
            s, e = r["sentence_spans"][r["fact_sentence"]]
            assert s <= a < b <= e and 2 <= len(starts) <= 5


def test_probe_facts_are_data():
    assert len(qa_probes.FACTS) >= 200
    assert len({f.id for f in qa_probes.FACTS}) == len(qa_probes.FACTS)
    pools = qa_probes.pools()
    for f in qa_probes.FACTS:
        assert f.answer in pools[f.answer_type] and "{s}" not in f.question


def test_phi2_is_the_language_model_of_multimodal_phi2():
    """Chapter 6's text-only counterpart of Bunny-v1.0-3B: the same Phi-2 facts, a parallel block with fc2 biased."""
    from interplab import anatomy
    from interplab.models import llava
    phi, bunny = llms.paper_config("phi-2"), llava.paper_config("bunny").text_config
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                "hidden_act", "rope_parameters"):
        assert getattr(phi, key) == getattr(bunny, key), key
    model = llms.random_model("phi-2", num_layers=2)
    fc2 = model.get_submodule(anatomy.resolve(model, "layer[1].mlp.neurons").path)
    assert fc2.bias is not None and anatomy.resolve(model, "layer[1].attn.out").path == "model.layers.1.self_attn.dense"
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 256)
