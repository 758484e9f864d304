"""Chapter 6 paper profile: LLaVA-1.5 and Bunny-v1.0-3B configs as facts, reduced random builds with the real module
trees and image geometry (576 / 729 tokens), Bunny's checkpoint names, the prompts and the offline errors."""
import pytest
import torch

from interplab import anatomy, hooks
from interplab.errors import BadParameter, ResourceUnavailable
from interplab.models import llava

IMAGE = 32000


@pytest.fixture(scope="module")
def model():
    return llava.random_model("llava-1.5-7b", seed=0)


def _ids(n_image: int = 576, n_text: int = 9, seed: int = 0) -> torch.Tensor:
    """(1, 1 + n_image + n_text) processor-free ids: BOS, the expanded <image> run, random text."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, IMAGE, (1, n_text), generator=g)
    return torch.cat([torch.tensor([[1]]), torch.full((1, n_image), IMAGE), text], dim=1)


def test_llava_7b_config_facts():
    c = llava.paper_config("llava-hf/llava-1.5-7b-hf")
    t, v = c.text_config, c.vision_config
    assert (t.num_hidden_layers, t.hidden_size, t.num_attention_heads, t.num_key_value_heads) == (32, 4096, 32, 32)
    assert (t.intermediate_size, t.vocab_size, t.rms_norm_eps, t.max_position_embeddings) == (11008, 32064, 1e-5, 4096)
    assert (v.image_size, v.patch_size, v.hidden_size, v.num_hidden_layers) == (336, 14, 1024, 24)
    assert v.num_attention_heads == 16
    assert (v.intermediate_size, v.hidden_act, v.projection_dim) == (4096, "quick_gelu", 768)
    assert c.image_token_index == IMAGE and c.image_seq_length == 576 == (336 // 14) ** 2 == llava.n_image_tokens(c)
    assert (c.vision_feature_layer, c.vision_feature_select_strategy, c.projector_hidden_act) == (-2, "default", "gelu")


def test_llava_13b_config_facts():
    t = llava.paper_config("llava-1.5-13b").text_config
    assert (t.num_hidden_layers, t.hidden_size, t.num_attention_heads, t.intermediate_size) == (40, 5120, 40, 13824)


@pytest.mark.parametrize("name, billions", [("llava-1.5-7b", 7.06), ("llava-1.5-13b", 13.35)])
def test_paper_config_parameter_count(name, billions):
    """The published sizes follow from the facts (built on the meta device: no memory)."""
    from transformers import LlavaForConditionalGeneration
    with torch.device("meta"):
        m = LlavaForConditionalGeneration(llava.paper_config(name))
    n = sum(p.numel() for p in m.parameters()) / 1e9
    assert abs(n - billions) / billions < 0.005, n


def test_unknown_model_names_the_known_ones():
    with pytest.raises(BadParameter, match="unknown Chapter 6 model"):
        llava.reduced_config("llava-2")


def test_bunny_config_facts_and_size():
    """Bunny-v1.0-3B as a LLaVA: SigLIP-SO400M-384 read at layer -2 with all 729 patches, Phi-2 (2.78 B)."""
    from transformers import LlavaForConditionalGeneration
    c = llava.paper_config("BAAI/Bunny-v1_0-3B")
    t, v = c.text_config, c.vision_config
    assert (t.model_type, t.num_hidden_layers, t.hidden_size, t.intermediate_size, t.vocab_size) == ("phi", 32, 2560, 10240, 51200)
    assert t.rope_parameters["partial_rotary_factor"] == 0.4 and t.hidden_act == "gelu_new"
    assert (v.model_type, v.image_size, v.patch_size, v.hidden_size, v.num_hidden_layers) == ("siglip_vision_model", 384, 14, 1152, 27)
    assert llava.n_image_tokens(c) == 729 == c.image_seq_length and c.vision_feature_select_strategy == "full"
    with torch.device("meta"):
        m = LlavaForConditionalGeneration(c)
    lm = sum(p.numel() for n, p in m.named_parameters() if n.startswith(("model.language_model.", "lm_head.")))
    assert abs(lm - 2.7797e9) / 2.7797e9 < 0.005, lm     # Phi-2's 2,779,683,840
    proj = sum(p.numel() for n, p in m.named_parameters() if "multi_modal_projector" in n)
    assert proj == 1152 * 2560 + 2560 + 2560 * 2560 + 2560   # "mlp2x_gelu"


def _as_bunny_checkpoint(state: dict) -> dict:
    """Our LLaVA-layout tensors under the names Bunny's remote code stores (written out independently of
    llava.BUNNY_RENAMES): model.{embed_tokens,layers,final_layernorm}, model.mm_projector.{0,2},
    model.vision_tower.vision_tower.vision_model.*, lm_head."""
    out = {}
    for k, v in state.items():
        if k.startswith("model.language_model."):
            out["model." + k[len("model.language_model."):]] = v
        elif k.startswith("model.multi_modal_projector.linear_"):
            i = {"1": "0", "2": "2"}[k[len("model.multi_modal_projector.linear_")]]
            out[f"model.mm_projector.{i}." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("model.vision_tower."):
            rest = k[len("model.vision_tower."):]
            out["model.vision_tower.vision_tower.vision_model." + rest.removeprefix("vision_model.")] = v
        else:
            out[k] = v
    return out


def test_bunny_checkpoint_names_load_into_the_llava_layout():
    bunny = llava.random_model("bunny", seed=0)
    state = bunny.state_dict()
    assert any(k.startswith("model.language_model.layers.0.mlp.fc2") for k in state)
    converted = llava.bunny_state_dict(_as_bunny_checkpoint(state), state.keys())
    assert converted.keys() == state.keys() and all(torch.equal(converted[k], state[k]) for k in state)
    fresh = llava.random_model("bunny", seed=1)
    fresh.load_state_dict(converted, strict=True)
    with pytest.raises(BadParameter, match="no place"):
        llava.bunny_state_dict({"vision_resampler.weight": torch.zeros(1)}, state.keys())


def test_bunny_prompt_splices_729_patches_and_the_phi_anatomy_resolves():
    import numpy as np
    from PIL import Image
    bunny = llava.random_model("bunny", seed=0)
    tok = _word_tokenizer()
    bunny.config.image_token_index = tok.convert_tokens_to_ids("<image>")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    pixels = llava.BunnyImageProcessor()(image)["pixel_values"]
    assert pixels.shape == (1, 3, 384, 384)
    assert llava.BunnyImageProcessor.pad_to_square(image).size == (400, 400)
    prompt = llava.paper_prompt("which city ?", template=llava.prompt_template(bunny))
    assert prompt.startswith("A chat between") and prompt.endswith("USER: <image>\nwhich city ? ASSISTANT:")
    emb = llava.paper_inputs(bunny, tok, llava.BunnyImageProcessor(), "which city ?", image)["inputs_embeds"]
    n_text = len(tok(prompt)["input_ids"]) - 1
    assert emb.shape == (1, n_text + 729, bunny.config.text_config.hidden_size)
    assert anatomy.resolve(bunny, "language_model.layer[1].mlp.neurons").path == "model.language_model.layers.1.mlp.fc2"
    assert anatomy.resolve(bunny, "language_model.layer[1].attn.out").path == "model.language_model.layers.1.self_attn.dense"
    assert torch.isfinite(bunny(inputs_embeds=emb).logits).all()


def test_reduced_model_keeps_the_module_tree(model):
    real, c = llava.paper_config(), model.config
    t = c.text_config
    assert t.num_hidden_layers == anatomy.n_layers(model, "language_model") == 4
    assert t.num_attention_heads == real.text_config.num_attention_heads
    assert (c.image_token_index, t.vocab_size, llava.n_image_tokens(c)) == (IMAGE, 32064, 576)
    assert model.config._attn_implementation == "eager" and not model.training
    for i in range(t.num_hidden_layers):
        layer = f"model.language_model.layers.{i}"
        assert anatomy.resolve(model, f"language_model.layer[{i}].mlp") == (f"{layer}.mlp", "output")
        assert anatomy.resolve(model, f"language_model.layer[{i}].attn").path == f"{layer}.self_attn"
        site = anatomy.resolve(model, f"language_model.layer[{i}].mlp.neurons")
        assert site == (f"{layer}.mlp.down_proj", "input")
        w = model.get_submodule(site.path).weight
        assert w.shape == (t.hidden_size, t.intermediate_size)
        assert w.shape[1] / w.shape[0] == real.text_config.intermediate_size / real.text_config.hidden_size
    assert anatomy.resolve(model, "projector") == ("model.multi_modal_projector", "output")
    assert anatomy.resolve(model, "head") == ("lm_head", "output")
    assert anatomy.resolve(model, "vision_encoder.layer[0]").path == "model.vision_tower.encoder.layers.0"


def test_576_visual_tokens_and_embeds_reproduce_the_forward(model):
    ids, pixels = _ids(), torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pixels).logits
        assert model.model.vision_tower(pixels).last_hidden_state.shape[1] == 577  # CLS + 24 x 24 patches
    embeds = llava.inputs_embeds(model, ids, pixels)
    assert embeds.shape == (1, ids.shape[1], model.config.text_config.hidden_size)
    neurons = anatomy.resolve(model, "language_model.layer[1].mlp.neurons")
    with torch.no_grad(), hooks.trace(model, neurons.path, at=neurons.at) as tr:
        logits = llava.language_logits(model, embeds)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)
    assert tr[neurons.path].shape == (1, ids.shape[1], model.config.text_config.intermediate_size)
    with pytest.raises(ValueError, match="575 image tokens in input_ids but 576 visual features"):
        llava.inputs_embeds(model, _ids(n_image=575), pixels)


@pytest.fixture(scope="module")
def phi():
    from transformers import PhiConfig, PhiForCausalLM
    torch.manual_seed(0)
    cfg = PhiConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=64, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    return PhiForCausalLM._from_config(cfg, attn_implementation="eager").eval()


def test_phi_family_paths(phi):
    assert anatomy.detect(phi).name == "phi" and anatomy.n_layers(phi) == 2
    assert anatomy.resolve(phi, "layer[0].mlp.neurons") == ("model.layers.0.mlp.fc2", "input")
    assert anatomy.resolve(phi, "layer[0].attn.out") == ("model.layers.0.self_attn.dense", "output")
    assert anatomy.resolve(phi, "layer[1].mlp").path == "model.layers.1.mlp"
    assert anatomy.resolve(phi, "layer[0].norm1") == anatomy.resolve(phi, "layer[0].norm2") \
        == ("model.layers.0.input_layernorm", "output")
    assert anatomy.resolve(phi, "final_norm").path == "model.final_layernorm"
    assert anatomy.resolve(phi.model, "layer[0].mlp.out").path == "layers.0.mlp.fc2"
    assert phi.model.layers[0].mlp.fc2.bias is not None
    assert anatomy.head_slice(phi, 0, 3).dims == slice(24, 32)


def test_phi_block_is_parallel(phi):
    """block(h) = h + attn(ln(h)) + mlp(ln(h)): the block's two named outputs sum to its update."""
    sites = {n: anatomy.resolve(phi, f"layer[0]{n}") for n in ("", ".attn", ".mlp")}
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad(), hooks.trace(phi, sites[""].path, at="input") as before, \
            hooks.trace(phi, [s.path for s in sites.values()]) as after:
        phi(ids)
    h = before[sites[""].path]
    update = after[sites[".attn"].path] + after[sites[".mlp"].path]
    torch.testing.assert_close(after[sites[""].path], h + update, atol=1e-6, rtol=0)


def test_paper_prompt():
    assert llava.paper_prompt("What is this?") == "USER: <image>\nWhat is this? ASSISTANT:"
    assert llava.paper_prompt("What is this?", short=True) == \
        "USER: <image>\nWhat is this? Answer the question using a single word or phrase. ASSISTANT:"


@pytest.mark.parametrize("load, hub_id", [(lambda d: llava.load_paper_llava("llava-1.5-7b", cache_dir=d),
                                           "llava-hf/llava-1.5-7b-hf"),
                                          (lambda d: llava.load_paper_bunny(cache_dir=d), "BAAI/Bunny-v1_0-3B")])
def test_offline_loaders_name_the_download(load, hub_id, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ResourceUnavailable, match=f"hf download {hub_id}"):
        load(tmp_path)


def _word_tokenizer():
    """A word-level fast tokenizer with llava-hf's ids for <s>, </s> and <image> (built offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    words = "USER ASSISTANT : ? \n which city is this landmark the eiffel tower big ben in country".split(" ")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: 10 + i for i, w in enumerate(dict.fromkeys(words))}, "<image>": IMAGE}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.Split(" ", "removed"),
                                               pre_tokenizers.Punctuation()])
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])  # BOS, as Llama
    t.add_special_tokens(["<image>"])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_llava_15_pads_images_to_a_square_with_the_mean_colour_before_clip_preprocessing(monkeypatch):
    """LLaVA-1.5's image_aspect_ratio "pad": expand2square with the CLIP mean as (122, 116, 104), centred, then
    llava-hf's CLIP transform (shortest edge 336, centre crop), which alone would crop a non-square image."""
    import numpy as np
    from PIL import Image
    from transformers import CLIPImageProcessor
    clip = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    padded = llava.padded_processor(clip)
    for h, w in ((200, 300), (310, 150)):
        image = Image.fromarray(np.random.default_rng(h).integers(0, 255, (h, w, 3), dtype=np.uint8))
        square = Image.new("RGB", (max(h, w),) * 2, (122, 116, 104))
        square.paste(image, ((max(h, w) - w) // 2, (max(h, w) - h) // 2))
        want = clip(images=square, return_tensors="pt")["pixel_values"]
        got = padded(images=image, return_tensors="pt")["pixel_values"]
        assert got.shape == (1, 3, 336, 336)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        assert not torch.allclose(clip(images=image, return_tensors="pt")["pixel_values"], want)
        assert np.array_equal(np.asarray(llava.padded_image(padded, image)), np.asarray(square))
    assert llava.padded_image(clip, image) is image
    assert llava.padded_image(llava.BunnyImageProcessor(), image).size == (310, 310)
    from types import SimpleNamespace   # the loader swaps llava-hf's processor for the padding one
    monkeypatch.setattr(llava, "from_hub", lambda spec, load, cache_dir=None: (
        torch.nn.Identity(), SimpleNamespace(tokenizer=SimpleNamespace(), image_processor=clip)))
    loaded = llava.load_paper_llava(device="cpu")[1].image_processor
    assert loaded.do_pad and loaded.to_dict() == padded.to_dict()


def test_paper_prompt_pair_finds_the_constraint_from_character_spans(model):
    import numpy as np
    from PIL import Image
    from transformers import CLIPImageProcessor

    from interplab import vqa
    tok = _word_tokenizer()
    processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    q = "which city is this landmark in the country ?"
    rec = vqa.check_record(dict(id="k1", dataset="known", question=q, visual_constraint="this landmark",
                                visual_constraint_span=[14, 27], answers=["paris"], corruption="big ben",
                                text_constraint="the country", text_constraint_span=[31, 42],
                                text_corruption="eiffel tower", image_path="x.jpg"))
    pair = llava.paper_prompt_pair(model, tok, processor, rec, image)
    words = lambda span: tok.convert_ids_to_tokens([int(tok(  # noqa: E731
        llava.paper_prompt(q).replace("<image>", "<image>" * 576))["input_ids"][p]) for p in span])
    assert words(pair.spans["constraint"]) == ["this", "landmark"] and words(pair.spans["text"]) == ["the", "country"]
    assert pair.meta["question_start"] == 1 + 2 + 576 + 1 and pair.last == pair.meta["question_start"] + len(q.split()) + 1
    clean, bad = pair.clean["inputs_embeds"], pair.corrupted["inputs_embeds"]
    assert clean.shape == bad.shape == (1, pair.last + 1, model.config.text_config.hidden_size)
    differs = (clean != bad).any(-1)[0].nonzero().flatten().tolist()
    assert differs == pair.spans["constraint"] + pair.spans["text"]  # the image and every other token are shared
    logits = model(inputs_embeds=clean).logits[0, pair.last]
    assert pair.answer == int(logits.argmax())
    with pytest.raises(BadParameter, match="same-length"):
        llava.paper_prompt_pair(model, tok, processor, {**rec, "corruption": "eiffel"}, image)


def test_text_only_pair_names_the_subject_and_corrupts_it_in_place():
    """Fig 6.1's Vicuna trace: the record's subject in place of the visual constraint, no image."""
    from interplab import vqa
    from interplab.models import llms
    tok = _word_tokenizer()
    q = "which city is this landmark in ?"
    rec = vqa.ConstraintRecord.from_json(dict(
        id="k1", dataset="known", question=q, visual_constraint="this landmark", visual_constraint_span=[14, 27],
        answers=["paris"], corruption="big ben", subject="eiffel tower", subject_corruption="big ben",
        image_path="x.jpg"))
    llm = llms.random_model("vicuna-7b-v1.5")
    pair = llava.paper_prompt_pair(llm, tok, None, rec.named(), None)
    ids = tok(llava.paper_prompt("which city is eiffel tower in ?", image=False))["input_ids"]
    assert tok.convert_ids_to_tokens([ids[p] for p in pair.spans["constraint"]]) == ["eiffel", "tower"]
    assert "image_positions" not in pair.meta and pair.meta["question_start"] == 1 + 2  # <s> USER :
    differs = (pair.clean["inputs_embeds"] != pair.corrupted["inputs_embeds"]).any(-1)[0].nonzero().flatten()
    assert differs.tolist() == pair.spans["constraint"]
    with pytest.raises(BadParameter, match="subject"):
        vqa.ConstraintRecord.from_json({**rec.raw, "subject": None, "subject_corruption": None}).named()
    with pytest.raises(BadParameter, match="come together"):
        vqa.check_record({k: v for k, v in rec.raw.items() if k != "subject_corruption"})


def test_greedy_generate_answers_embedded_prompts_batched_like_single_ones(model):
    """attribution.greedy_generate on LLaVA's spliced embeddings: left-padded batches equal each prompt alone."""
    import numpy as np
    from PIL import Image
    from transformers import CLIPImageProcessor

    from interplab import attribution
    tok = _word_tokenizer()
    processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    inputs = [llava.paper_inputs(model, tok, processor, q, image)["inputs_embeds"]
              for q in ("which city ?", "this landmark is in which country ?")]
    assert inputs[0].shape[1] < inputs[1].shape[1]
    run = lambda xs, stop=(): [g.ids for g in attribution.greedy_generate(  # noqa: E731
        model, tok, xs, max_new_tokens=4, stop_ids=list(stop), stop_on_newline=False)]
    alone = [run([x])[0] for x in inputs]
    assert run(inputs) == alone and all(len(a) == 4 for a in alone)
    first = model(inputs_embeds=inputs[0]).logits[0, -1].argmax()
    assert alone[0][0] == int(first)
    assert run(inputs[1:], stop=[alone[1][1]])[0] == alone[1][:1]


def test_answer_token_is_the_answer_tokenised_after_the_prompt():
    tok = _word_tokenizer()
    prompt = llava.paper_prompt("which city ?")
    assert llava.answer_token(tok, prompt, "paris") == tok.convert_tokens_to_ids("paris")


def test_load_paper_bunny_builds_from_a_bunny_snapshot(tmp_path, monkeypatch):
    """The loader end to end on a fake snapshot: Bunny-named tensors of a reduced build in two shards, a tokenizer,
    strict loading of every tensor, the "<image>" id written into the config."""
    import huggingface_hub
    from safetensors.torch import save_file
    reduced = llava.reduced_config("bunny", n_layers=2)
    source = llava.random_model("bunny", n_layers=2, seed=3)
    tensors = {k: v.contiguous() for k, v in _as_bunny_checkpoint(source.state_dict()).items()}
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[:len(names) // 2]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({k: tensors[k] for k in names[len(names) // 2:]}, tmp_path / "model-00002-of-00002.safetensors")
    tok = _word_tokenizer()
    tok.save_pretrained(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(tmp_path))
    monkeypatch.setattr(llava, "from_hub", lambda spec, load, cache_dir=None: load(cache_dir))
    model, processor = llava.load_paper_bunny(device="cpu", dtype=torch.float32, config=reduced)
    assert model.config.image_token_index == processor.tokenizer.convert_tokens_to_ids("<image>")
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items())
    assert isinstance(processor.image_processor, llava.BunnyImageProcessor)
