"""interplab.attribution: sentence bookkeeping, ATTNATTRIB, baselines, metrics and decoding.

ATTNATTRIB's core is checked on hand-made attention tensors (unit check 4 of the Chapter 8 spec);
on a random tiny Llama, the attention it reads while decoding is compared with a separate
teacher-forced forward pass at the query that predicts each answer token.
"""
import numpy as np
import pytest
import torch

from interplab import attribution as at
from interplab.models import tiny_random

WORDS = ("context : question : answer zor blat mek dul is in paris rome owns acme attracts many "
         "visitors where ? . who").split()
CONTEXT = "zor blat is in paris . mek dul owns acme . zor blat attracts many visitors ."
PROMPT = f"<bos> context : {CONTEXT} question : where is zor blat ? answer :"
SPAN = (PROMPT.index(CONTEXT), PROMPT.index(CONTEXT) + len(CONTEXT))


@pytest.fixture(scope="module")
def tok():
    """A word-level tokenizer like the tiny world's: WordLevel + Whitespace, <pad>/<bos>/<eos> = 0/1/2."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def llama():
    return tiny_random.llama()


def test_split_sentences_is_a_regex_on_final_punctuation():
    text = "  It costs 3.5 euros. Really?  Yes!\nno end"
    spans = at.split_sentences(text)
    assert [text[a:b] for a, b in spans] == ["It costs 3.5 euros.", "Really?", "Yes!", "no end"]
    assert [CONTEXT[a:b] for a, b in at.split_sentences(CONTEXT)] == [
        "zor blat is in paris .", "mek dul owns acme .", "zor blat attracts many visitors ."]


def test_whitespace_merged_tokens_go_to_the_sentence_of_their_characters():
    # "A b. C d." with SentencePiece-like tokens: "A", " b", ".", " C", " d", "." and a pure space
    offsets = [(0, 0), (0, 1), (1, 3), (3, 4), (4, 6), (6, 8), (8, 9), (9, 10)]
    text = "A b. C d. "
    sents = at.split_sentences(text)
    assert sents == [(0, 4), (5, 9)]
    assert at.token_sentences(offsets, sents, (0, 10)).tolist() == [-1, 0, 0, 0, 1, 1, 1, -1]
    # clipping to the context range: a token outside it belongs to no sentence
    assert at.token_sentences(offsets, sents, (5, 10)).tolist()[:4] == [-1, -1, -1, -1]


def test_locate_context_on_a_word_level_prompt(tok):
    ctx = at.locate_context(tok, PROMPT, SPAN)
    words = tok.convert_ids_to_tokens(ctx.input_ids)
    assert words[:3] == ["<bos>", "context", ":"]
    got = {int(p): int(s) for p, s in zip(ctx.positions, ctx.sentence_ids)}
    # context tokens start after "<bos> context :" and each "." closes its own sentence
    assert sorted(got) == list(range(3, 3 + len(CONTEXT.split())))
    assert [got[p] for p in sorted(got)] == [0] * 6 + [1] * 5 + [2] * 6
    assert ctx.texts[1] == "mek dul owns acme ."
    assert all(words[p] != "question" for p in got)


def test_rank_sentences_returns_the_sentence_of_the_argmax_token():
    # unit check 4: 8 prompt keys, context = positions 2..7 in sentences [0, 0, 1, 1, 2, 2]
    positions = torch.arange(2, 8)
    sent = torch.tensor([0, 0, 1, 1, 2, 2])
    rows = torch.tensor([[0.5, 0.0, 0.05, 0.05, 0.1, 0.25, 0.03, 0.02],   # argmax ctx pos 5 -> s1
                         [0.1, 0.0, 0.4, 0.1, 0.1, 0.1, 0.1, 0.1],       # pos 2 -> s0, 0.4
                         [0.0, 0.0, 0.1, 0.1, 0.1, 0.3, 0.2, 0.2]])      # pos 5 -> s1, 0.3
    ranking, per_step = at.rank_sentences(rows, positions, sent)
    assert [s for s, _ in ranking] == [0, 1]
    assert [v for _, v in ranking] == pytest.approx([0.4, 0.3])           # s1 keeps its max, 0.3
    assert [p for p, _ in per_step] == [5, 2, 5]
    assert [v for _, v in per_step] == pytest.approx([0.25, 0.4, 0.3])
    # the BOS sink (0.5 at position 0) is outside the context and never wins
    assert at.rank_sentences(rows[:1], positions, sent)[0][0][0] == 1


def test_rank_sentences_skips_punctuation_steps_but_falls_back_when_all_are():
    positions, sent = torch.arange(4), torch.tensor([0, 1, 2, 3])
    rows = torch.tensor([[0.1, 0.1, 0.1, 0.7],      # "." step pointing at sentence 3
                         [0.1, 0.6, 0.2, 0.1]])     # the word step pointing at sentence 1
    ranking, per_step = at.rank_sentences(rows, positions, sent, skip=[True, False])
    assert [s for s, _ in ranking] == [1]
    assert len(per_step) == 2                        # skipped steps still reported
    ranking, _ = at.rank_sentences(rows, positions, sent, skip=[True, True])
    assert [s for s, _ in ranking] == [3, 1]


def test_pad_ranking_appends_the_unvoted_sentences_by_attention_then_position():
    """ATTNATTRIB's top-k must hold k sentences, like every baseline's (HotpotQA is scored at k = 2)."""
    positions, sent = torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 1, 1, 2, 3])
    rows = torch.tensor([[0.0, 0.1, 0.5, 0.05, 0.2, 0.0],
                         [0.0, 0.3, 0.1, 0.05, 0.4, 0.0],
                         [0.0, 0.0, 0.0, 0.90, 0.0, 0.0]])   # step 2 is skipped (punctuation)
    skip = [False, False, True]
    ranking, _ = at.rank_sentences(rows, positions, sent, skip)
    assert [s for s, _ in ranking] == [1, 2]
    full = at.pad_ranking(ranking, rows, positions, sent, 5, skip)
    assert full[:2] == ranking and [s for s, _ in full] == [1, 2, 0, 3, 4]   # 0: 0.3; 3 and 4: no attention
    assert full[2][1] == pytest.approx(0.3) and full[3:] == [(3, 0.0), (4, 0.0)]
    assert at.pad_ranking([], torch.zeros(0, 6), positions, sent, 3) == [(0, 0.0), (1, 0.0), (2, 0.0)]


def test_punctuation_tokens(tok):
    ids = tok.convert_tokens_to_ids([".", "?", "paris", "<eos>"])
    assert [at.is_punctuation_token(tok, i) for i in ids] == [True, True, False, True]


@pytest.mark.parametrize("head", [(1, 2), "mean"])
def test_attn_attrib_reads_the_predicting_query_of_the_decoding_passes(llama, tok, head):
    res = at.attn_attrib(llama, tok, PROMPT, SPAN, head=head, max_new_tokens=4, k=2, stop_ids=[])
    ctx = at.locate_context(tok, PROMPT, SPAN)
    assert len(res.answer_ids) == 4 and len(res.per_step) == 4
    assert 1 <= len(res.spans) <= 2 and all(0 <= s < len(ctx.sentences) for s, _ in res.spans)
    assert res.spans == res.ranking[:2]
    assert res.full_ranking[:len(res.ranking)] == res.ranking
    assert sorted(s for s, _ in res.full_ranking) == list(range(len(ctx.sentences)))
    # the same answer teacher-forced in one full pass: query T-1+j predicts answer token j
    att = at.answer_attention(llama, ctx.input_ids, res.answer_ids)          # (L, H, J, T)
    rows = att.mean(dim=(0, 1)) if head == "mean" else att[head[0], head[1]]
    val, arg = rows[:, ctx.positions].max(dim=1)
    assert [p for p, _ in res.per_step] == ctx.positions[arg].tolist()
    assert torch.allclose(torch.tensor([v for _, v in res.per_step]), val, atol=1e-5)
    if head == "mean":
        mean = at.mean_attention_attrib(llama, tok, PROMPT, SPAN, res.answer_ids)
        assert [s for s, _ in mean[:len(res.ranking)]] == [s for s, _ in res.ranking]
        assert [v for _, v in mean[:len(res.ranking)]] == pytest.approx([v for _, v in res.ranking])


def test_batched_left_padding_matches_single_prompts(llama, tok):
    short_ctx = "mek dul owns acme . zor blat is in rome ."
    short = f"<bos> context : {short_ctx} question : who owns acme ? answer :"
    prompts = [PROMPT, short]
    spans = [SPAN, (short.index(short_ctx), short.index(short_ctx) + len(short_ctx))]
    batch = at.attn_attrib_batch(llama, tok, prompts, spans, (0, 1), max_new_tokens=3, stop_ids=[],
                                 progress=False)
    for b, p, s in zip(batch, prompts, spans):
        one = at.attn_attrib(llama, tok, p, s, (0, 1), max_new_tokens=3, stop_ids=[])
        assert b.answer_ids == one.answer_ids
        assert [x for x, _ in b.per_step] == [x for x, _ in one.per_step]
        assert np.allclose([v for _, v in b.per_step], [v for _, v in one.per_step], atol=1e-5)
    gens = at.greedy_generate(llama, tok, prompts, max_new_tokens=3, stop_ids=[])
    assert [g.ids for g in gens] == [b.answer_ids for b in batch]


def test_attn_attrib_restores_the_attention_implementation(llama, tok):
    llama.set_attn_implementation("sdpa")
    try:
        res = at.attn_attrib(llama, tok, PROMPT, SPAN, head=(0, 0), max_new_tokens=2, stop_ids=[])
        assert len(res.per_step) == 2
        assert llama.config._attn_implementation == "sdpa"
    finally:
        llama.set_attn_implementation("eager")


def test_cad_with_alpha_zero_is_greedy(llama, tok):
    no_ctx = "<bos> question : where is zor blat ? answer :"
    greedy = at.greedy_generate(llama, tok, [PROMPT], max_new_tokens=5, stop_ids=[])[0]
    assert at.cad_generate(llama, tok, PROMPT, no_ctx, alpha=0.0, max_new_tokens=5, stop_ids=[]).ids \
        == greedy.ids
    assert len(at.cad_generate(llama, tok, PROMPT, no_ctx, alpha=0.5, max_new_tokens=5, stop_ids=[]).ids) == 5


def test_rel_score_and_sentence_removal(llama, tok):
    response = tok.convert_tokens_to_ids(["paris"])
    assert at.rel_score(llama, tok, PROMPT, PROMPT, response) == 0.0
    ablated, span = at.remove_sentences(PROMPT, SPAN, [0])
    assert ablated[span[0]:span[1]] == "mek dul owns acme . zor blat attracts many visitors ."
    assert ablated.endswith(" question : where is zor blat ? answer :")
    last, span = at.remove_sentences(PROMPT, SPAN, [2])
    assert last[span[0]:span[1]] == "zor blat is in paris . mek dul owns acme ."
    assert at.rel_score(llama, tok, PROMPT, ablated, response) > 0


def test_baselines_rank_every_sentence(llama, tok):
    ctx = at.locate_context(tok, PROMPT, SPAN)
    answer = tok.convert_tokens_to_ids(["paris", "."])
    tfidf = at.tfidf_attrib(ctx.texts, "where is zor blat ?", "paris")
    assert tfidf[0][0] == 0 and sorted(s for s, _ in tfidf) == [0, 1, 2]
    rand = at.random_attrib(3, 0)
    assert sorted(s for s, _ in rand) == [0, 1, 2] and rand == at.random_attrib(3, 0)
    for method in ("grad_norm", "grad_x_input"):
        grad = at.gradient_attrib(llama, tok, PROMPT, SPAN, answer, method=method)
        assert sorted(s for s, _ in grad) == [0, 1, 2]
        assert all(v >= 0 for _, v in grad) and grad[0][1] > 0
    mean = at.mean_attention_attrib(llama, tok, PROMPT, SPAN, answer)
    assert sorted(s for s, _ in mean) == [0, 1, 2]


def test_gradient_norm_ranks_the_sentence_of_the_argmax_token(llama, tok):
    # brute force: the max gradient norm over the context tokens for the one answer token
    ctx = at.locate_context(tok, PROMPT, SPAN)
    answer = tok.convert_tokens_to_ids(["paris"])
    ids = torch.tensor([ctx.input_ids + answer])
    emb = llama.get_input_embeddings()(ids).detach().requires_grad_(True)
    nll = -torch.log_softmax(llama(inputs_embeds=emb).logits[0, len(ctx.input_ids) - 1], -1)[answer[0]]
    (g,) = torch.autograd.grad(nll, emb)
    norms = g[0, ctx.positions].norm(dim=-1)
    top = at.gradient_attrib(llama, tok, PROMPT, SPAN, answer)[0]
    assert top[0] == int(ctx.sentence_ids[norms.argmax()])
    assert top[1] == pytest.approx(float(norms.max()), rel=1e-5)


def test_answer_metrics():
    assert at.normalize_answer("The  Eiffel-Tower, in PARIS!") == "eiffeltower in paris"
    assert at.qa_correct("It is in Paris .", "paris")
    assert not at.qa_correct("It is in Parisville", "paris")
    assert at.qa_correct("answer : —", "—") and not at.qa_correct("answer : rome", "—")
    assert at.attribution_correct([(2, 0.9), (0, 0.1)], 2)
    assert not at.attribution_correct([(2, 0.9), (0, 0.1)], 0)
    assert at.attribution_correct([2, 0], 0, k=2)
    assert at.sentence_f1([(1, 0.5), (3, 0.2)], [1, 2]) == pytest.approx(0.5)


def test_quotes_map_to_the_sentence_of_highest_token_f1():
    sentences = ["Zor blat is in Paris.", "Mek dul owns Acme.", "Zor blat attracts many visitors."]
    assert at.token_f1("the Eiffel tower", "Eiffel Tower!") == 1.0 and at.token_f1("a b", "c") == 0.0
    assert at.token_f1("zor blat is in rome", "zor blat is in paris") == pytest.approx(2 * 4 / 10)
    assert at.quoted_sentence("\"zor blat is located in paris\"", sentences)[0][0] == 0
    assert at.quoted_sentence("Acme is owned by mek dul", sentences)[0][0] == 1
    assert [s for s, _ in at.quoted_sentence("nothing matches", sentences)] == [0, 1, 2]  # ties keep order


def test_self_attribution_replies_are_split_at_the_evidence_marker():
    assert at.split_self_attribution("Answer: Paris Evidence: Zor blat is in Paris.") == ("Paris", "Zor blat is in Paris.")
    assert at.split_self_attribution("Paris\nevidence : It is in Paris.") == ("Paris", "It is in Paris.")
    assert at.split_self_attribution("Paris, because it is in Paris.") == ("Paris, because it is in Paris.",) * 2


def test_prompted_baselines_rank_the_quoted_sentence(monkeypatch):
    sentences = ["Zor blat is in Paris.", "Mek dul owns Acme."]
    replies = iter([["Answer: Acme Evidence: Mek dul owns Acme."], ["The sentence is: zor blat is in paris"]])
    monkeypatch.setattr(at, "greedy_generate", lambda *a, **k: [at.Generation([], t) for t in next(replies)])
    (answer, ranking), = at.self_attribution(None, None, ["prompt"], [sentences])
    assert answer == "Acme" and ranking[0][0] == 1
    assert at.iterative_attribution(None, None, ["prompt"], [sentences])[0][0][0] == 0


def test_sentence_embeddings_ignore_padding_and_rank_the_answer_sentence_first(tok):
    from transformers import MPNetConfig, MPNetModel
    torch.manual_seed(0)
    enc = MPNetModel(MPNetConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=64, pad_token_id=tok.pad_token_id)).eval()
    texts = ["zor blat is in paris .", "mek dul owns acme .", "paris"]
    batch = at.embed_sentences(enc, tok, texts)
    alone = torch.cat([at.embed_sentences(enc, tok, [t]) for t in texts])
    assert batch.shape == (3, 16) and torch.allclose(batch.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert torch.allclose(batch, alone, atol=1e-5)
    ranking = at.similarity_attrib(enc, tok, ["mek dul owns acme .", "paris", "zor blat is in paris ."], "paris")
    assert ranking[0][0] == 1 and ranking[0][1] == pytest.approx(1.0, abs=1e-5)
