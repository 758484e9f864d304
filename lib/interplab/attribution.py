"""Context attribution for extractive QA: ATTNATTRIB (Algorithm 4, Chapter 8) and its baselines.

A prompt is a string that contains the context at a known character span. The context is split into
sentences (a deterministic regex), every prompt token is mapped to the sentence whose characters it
covers (tokenizer offsets), and an attribution method ranks the sentences:

    ctx = locate_context(tok, prompt, ctx_span)          # context token positions + sentence ids
    res = attn_attrib(model, tok, prompt, ctx_span, head=(4, 3), k=1)
    res.answer_text, res.spans                           # "paris", [(2, 0.91)]

ATTNATTRIB reads one head's attention from the very forward passes that greedily decode the answer
(eager attention, ``output_attentions=True``, KV cache): at step j the query that *predicts* a_j
(the last prompt position for j = 1, else the position where a_{j-1} is fed back) looks at the
context; its arg-max token votes for its sentence with the attention value; a sentence keeps its best
vote. Baselines (same ranking type, ``list[(sentence_idx, score)]`` best first): TF-IDF similarity,
input gradients, random order, and the attention of all heads averaged. Also here: SQuAD-style answer
metrics, Rel-Score (Eq. 11.18), greedy generation and context-aware decoding (CAD).

Model-agnostic: any transformers causal LM whose forward takes ``attention_mask``, ``position_ids``,
``past_key_values`` and ``output_attentions`` (Llama, GPT-2, Phi-3, ...), with a fast tokenizer.
Batched decoding uses left padding with an explicit attention mask and position ids, so a padded
row computes the same numbers as the row alone (up to float rounding).
"""
import re
import string
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import BadParameter, check_choice

Ranking = list  # list[tuple[int, float]]: (sentence index, score), best first

_SENTENCE_END = re.compile(r"[.?!]+(?=\s|$)")


# ---------------------------------------------------------------- sentences and token mapping


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the sentences of ``text``, leading/trailing whitespace excluded.

    A sentence ends at a run of ``.?!`` followed by whitespace or the end of the text (so "3.5" and
    "e.g.x" do not split); trailing text without final punctuation is one more sentence.
    """
    spans, start = [], 0
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    for end in ends + [len(text)]:
        chunk = text[start:end]
        lead = len(chunk) - len(chunk.lstrip())
        stripped = chunk.strip()
        if stripped:
            spans.append((start + lead, start + lead + len(stripped)))
        start = end
    return spans


def token_sentences(offsets, sentences, ctx_char_range) -> np.ndarray:
    """Sentence index (or -1) of every token, shape (T,).

    offsets: (T, 2) character spans of the tokens in the prompt (``return_offsets_mapping``);
    sentences: (S, 2) character spans in the same prompt; ctx_char_range: (start, end) of the context.
    A token belongs to the sentence it shares the most characters with (ties: the earlier one), so a
    whitespace-merged token such as " Paris" at a boundary goes to the sentence holding "Paris".
    Tokens covering no sentence character (special tokens, pure whitespace, the rest of the prompt)
    get -1.
    """
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    if len(sentences) == 0 or len(off) == 0:
        return np.full(len(off), -1, dtype=np.int64)
    sen = np.asarray(sentences, dtype=np.int64).reshape(-1, 2)
    lo, hi = ctx_char_range
    s = np.clip(off[:, :1], lo, hi)                                   # (T, 1) clipped to the context
    e = np.clip(off[:, 1:], lo, hi)
    overlap = np.minimum(e, sen[None, :, 1]) - np.maximum(s, sen[None, :, 0])   # (T, S)
    best = overlap.argmax(axis=1)                                     # first maximum = earlier sentence
    return np.where(overlap.max(axis=1) > 0, best, -1)


@dataclass
class ContextTokens:
    """A tokenised prompt and where its context sentences are.

    input_ids: (T,) prompt token ids; positions: (N,) token positions covering context characters;
    sentence_ids: (N,) their sentence index; sentences: (S,) character spans in the prompt;
    texts: (S,) the sentence strings.
    """
    input_ids: list
    positions: torch.Tensor
    sentence_ids: torch.Tensor
    sentences: list
    texts: list


def locate_context(tokenizer, prompt: str, ctx_span: tuple[int, int],
                   add_special_tokens: bool = True) -> ContextTokens:
    """Tokenise ``prompt`` and map the tokens of ``prompt[ctx_span[0]:ctx_span[1]]`` to sentences."""
    lo, hi = ctx_span
    if not 0 <= lo <= hi <= len(prompt):
        raise BadParameter(f"ctx_span {ctx_span} is outside the prompt of {len(prompt)} characters")
    enc = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=add_special_tokens)
    sentences = [(lo + a, lo + b) for a, b in split_sentences(prompt[lo:hi])]
    sid = token_sentences(enc["offset_mapping"], sentences, (lo, hi))
    pos = np.nonzero(sid >= 0)[0]
    return ContextTokens(list(enc["input_ids"]), torch.as_tensor(pos, dtype=torch.long),
                         torch.as_tensor(sid[pos], dtype=torch.long), sentences,
                         [prompt[a:b] for a, b in sentences])


def remove_sentences(prompt: str, ctx_span: tuple[int, int], drop) -> tuple[str, tuple[int, int]]:
    """The prompt with context sentences ``drop`` (indices) deleted, and the new context span.

    Each dropped sentence takes the whitespace after it, so the neighbours stay single-spaced.
    """
    lo, hi = ctx_span
    ctx = prompt[lo:hi]
    spans = split_sentences(ctx)
    if not spans:
        return prompt, (lo, hi)
    drop = set(int(i) for i in drop)
    starts = [a for a, _ in spans] + [len(ctx)]
    # a sentence travels with the whitespace after it; the context's own tail whitespace is kept
    body = "".join(ctx[starts[i]:starts[i + 1]] for i in range(len(spans)) if i not in drop)
    new_ctx = ctx[:starts[0]] + body.rstrip() + ctx[len(ctx.rstrip()):]
    return prompt[:lo] + new_ctx + prompt[hi:], (lo, lo + len(new_ctx))


# ---------------------------------------------------------------- attention rows -> ranked sentences


def rank_sentences(rows: torch.Tensor, positions: torch.Tensor, sentence_ids: torch.Tensor,
                   skip=None) -> tuple[Ranking, list]:
    """The core of Algorithm 4 on ready-made attention rows (pure; no model).

    rows: (J, T) attention of the query predicting answer token j over the prompt keys;
    positions: (N,) context token positions in [0, T); sentence_ids: (N,) their sentences;
    skip: (J,) bool, steps left out of the ranking (punctuation answers); if every step is skipped,
    all steps are used rather than returning nothing.
    Returns ``ranking`` = [(sentence, best value)] sorted by value (ties: lower index) and
    ``per_step`` = [(argmax token position, its weight)] for every step, skipped ones included.
    The values are the raw attention weights (not renormalised over the context): Algorithm 4 keeps
    max p with p = A_j[ctx positions].
    """
    rows = torch.as_tensor(rows, dtype=torch.float32)
    rows = rows.reshape(-1, rows.shape[-1])
    if len(positions) == 0:
        return [], [(-1, 0.0)] * rows.shape[0]
    ctx = rows[:, positions]                                          # (J, N)
    val, arg = ctx.max(dim=1)                                         # (J,)
    per_step = [(int(positions[a]), float(v)) for a, v in zip(arg, val)]
    use = torch.ones(len(val), dtype=torch.bool) if skip is None else ~torch.as_tensor(skip, dtype=torch.bool)
    if not use.any():
        use = torch.ones_like(use)
    best: dict[int, float] = {}
    for j in torch.nonzero(use).flatten().tolist():
        s, v = int(sentence_ids[arg[j]]), float(val[j])
        best[s] = max(best.get(s, float("-inf")), v)
    return _sorted(best), per_step


def pad_ranking(ranking: Ranking, rows: torch.Tensor, positions: torch.Tensor, sentence_ids: torch.Tensor,
                n_sentences: int, skip=None) -> Ranking:
    """ATTNATTRIB's ranking made total, so that its top-k has k sentences like every baseline's.

    ``ranking`` (``rank_sentences``' voted sentences, in their order) comes first; every sentence that got no
    vote follows, ordered by the head's best attention weight on any of its tokens over the ranked steps (the
    same steps and raw weights as the votes; ``skip`` as in ``rank_sentences``), ties and sentences without
    attention (no steps, no tokens) by position. The appended entries carry that weight as their score.
    """
    seen = {s for s, _ in ranking}
    rows = torch.as_tensor(rows, dtype=torch.float32)
    rows = rows.reshape(-1, rows.shape[-1]) if rows.numel() else rows.reshape(0, 0)
    best: dict[int, float] = {s: 0.0 for s in range(n_sentences) if s not in seen}
    if len(rows) and len(positions):
        use = torch.ones(len(rows), dtype=torch.bool) if skip is None else ~torch.as_tensor(skip, dtype=torch.bool)
        if not use.any():
            use = torch.ones_like(use)
        peak = rows[use][:, positions].max(dim=0).values                  # (N,) best weight of each context token
        for s, v in zip(sentence_ids.tolist(), peak.tolist()):
            if s in best:
                best[s] = max(best[s], v)
    return list(ranking) + _sorted(best)


def _sorted(scores: dict) -> Ranking:
    return sorted(scores.items(), key=lambda sv: (-sv[1], sv[0]))


def is_punctuation_token(tokenizer, token_id: int) -> bool:
    """Whether a token is special, whitespace or only punctuation (skipped when ranking).

    Unicode punctuation counts, so the tiny world's dash "—" answer is skipped too; an answer made
    only of such tokens falls back to ranking all steps (see ``rank_sentences``).
    """
    if token_id in set(tokenizer.all_special_ids):
        return True
    text = tokenizer.decode([token_id]).strip()
    return all(unicodedata.category(c).startswith("P") for c in text)


def _skip_mask(tokenizer, answer_ids) -> torch.Tensor:
    return torch.tensor([is_punctuation_token(tokenizer, t) for t in answer_ids], dtype=torch.bool)


# ---------------------------------------------------------------- greedy decoding core


@contextmanager
def eager_attention(model):
    """Switch ``model`` to eager attention (the only kernel returning weights) and restore it after."""
    old = getattr(model.config, "_attn_implementation", "eager")
    if old != "eager":
        model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        if old != "eager":
            model.set_attn_implementation(old)


@dataclass
class Generation:
    """A greedy answer: ids (stop token excluded) and decoded text."""
    ids: list
    text: str


@dataclass
class AttribResult:
    """ATTNATTRIB output. spans: top-k [(sentence, value)]; ranking: all voted sentences (Algorithm 4: may be
    fewer than k); per_step: [(context token position, attention)] of each answer step, aligned with answer_ids;
    full_ranking: every context sentence, the voted ones first (``pad_ranking``): score ATTNATTRIB from
    ``full_ranking[:k]`` where baselines, whose rankings are total, are scored at the same k."""
    answer_ids: list
    answer_text: str
    spans: Ranking
    per_step: list
    ranking: Ranking = field(default_factory=list)
    full_ranking: Ranking = field(default_factory=list)


def _device(model):
    return next(model.parameters()).device


def _pad_id(tokenizer):
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if t is not None:
            return t
    return 0


def default_stop_ids(model, tokenizer) -> set:
    """EOS ids of the tokenizer and of the model's generation config."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return {int(i) for i in ids if i is not None}


class _Stopper:
    """Decides whether a generated token ends the answer: a stop id, or (optionally) a newline."""

    def __init__(self, tokenizer, stop_ids, newline: bool):
        self.tokenizer, self.ids, self.newline, self.seen = tokenizer, set(stop_ids), newline, {}

    def __call__(self, t: int) -> bool:
        if t in self.ids:
            return True
        if not self.newline:
            return False
        if t not in self.seen:
            self.seen[t] = "\n" in self.tokenizer.decode([t])
        return self.seen[t]


def _is_embeds(seq) -> bool:
    return torch.is_tensor(seq) and seq.is_floating_point()


def _left_pad(seqs, pad_id, device):
    """The first step's inputs for left-padded sequences ({"input_ids": (B, T)} for id lists,
    {"inputs_embeds": (B, T, d)} for (T_i, d) embeddings, zero rows as padding), the mask and
    position ids (B, T), and each row's pad count (B,)."""
    T = max(len(s) for s in seqs)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        mask[b, T - len(s):] = 1
    if _is_embeds(seqs[0]):
        first = {"inputs_embeds": torch.stack([torch.cat([s.new_zeros(T - len(s), s.shape[-1]), s]) for s in seqs])}
    else:
        ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, T - len(s):] = torch.as_tensor(s, dtype=torch.long)
        first = {"input_ids": ids.to(device)}
    # positions count real tokens only, so a padded row sees the same rotary/absolute positions
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    pads = [T - len(s) for s in seqs]
    return first, mask.to(device), pos.to(device), pads


def _read_rows(attentions, head, n_keys: int) -> torch.Tensor:
    """Rows of the newest query over the first n_keys keys, (B, n_keys).

    attentions: per layer (B, H, q, K); head (layer, h) picks one query head (GQA: query-head
    index); head "mean" averages all heads of all layers.
    """
    if head == "mean":
        return torch.stack([a[:, :, -1, :n_keys] for a in attentions]).float().mean(dim=(0, 2))
    layer, h = head
    return attentions[layer][:, h, -1, :n_keys].float()


@torch.no_grad()
def _decode(model, seqs, max_new_tokens: int, stop, pad_id: int, head=None):
    """Greedy decoding of a left-padded batch with KV cache.

    seqs: B prompt id lists, or B (T_b, d) prompt embeddings (a multimodal LM's spliced image tokens; the
    answer tokens are then fed back as ids). Returns per row the answer ids (stop token excluded) and, when
    ``head`` is given, the (J, T_b) attention rows over that row's own prompt keys for the queries
    predicting each answer token, read from the same forward passes.
    """
    x, mask, pos, pads = _left_pad(seqs, pad_id, _device(model))
    T = mask.shape[1]
    answers = [[] for _ in seqs]
    rows = [[] for _ in seqs]
    done = [False] * len(seqs)
    past = None
    for _ in range(max_new_tokens):
        out = model(**x, attention_mask=mask, position_ids=pos, past_key_values=past,
                    use_cache=True, output_attentions=head is not None)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1)                            # (B,)
        got = _read_rows(out.attentions, head, T).cpu() if head is not None else None
        for b, t in enumerate(nxt.tolist()):
            if done[b]:
                continue
            if stop(t):
                done[b] = True
                continue
            answers[b].append(t)
            if got is not None:
                rows[b].append(got[b, pads[b]:])                      # drop the left padding keys
        if all(done):
            break
        x = {"input_ids": nxt[:, None]}
        mask = torch.cat([mask, mask.new_ones(len(seqs), 1)], dim=1)
        pos = pos[:, -1:] + 1
    if head is None:
        return answers, None
    return answers, [torch.stack(r) if r else torch.zeros(0, T - p) for r, p in zip(rows, pads)]


def _batches(n: int, lengths, batch_size: int):
    """Index batches of similar length (sorted), so left padding wastes little."""
    order = sorted(range(n), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def _progress(it, total, desc, progress):
    if not progress:
        return it
    from tqdm.auto import tqdm
    return tqdm(it, total=total, desc=desc, unit="batch")


def _encode(tokenizer, prompt, add_special_tokens):
    if _is_embeds(prompt):
        return prompt.reshape(-1, prompt.shape[-1])   # (1, T, d) or (T, d) -> (T, d)
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
    return [int(t) for t in prompt]


def greedy_generate(model, tokenizer, prompts, max_new_tokens: int = 32, stop_ids=None,
                    stop_on_newline: bool = True, batch_size: int = 16,
                    add_special_tokens: bool = True, progress: bool = False) -> list[Generation]:
    """Greedy answers for prompts (strings, id lists or (T, d) / (1, T, d) input embeddings), batched with
    left padding.

    Batches group prompts of similar length; results come back in input order. stop_ids default to
    the EOS ids; a token whose text contains a newline also stops when ``stop_on_newline``.
    """
    seqs = [_encode(tokenizer, p, add_special_tokens) for p in prompts]
    stop = _Stopper(tokenizer, default_stop_ids(model, tokenizer) if stop_ids is None else stop_ids,
                    stop_on_newline)
    out = [None] * len(seqs)
    batches = _batches(len(seqs), [len(s) for s in seqs], batch_size)
    for idx in _progress(batches, len(batches), "generate", progress):
        answers, _ = _decode(model, [seqs[i] for i in idx], max_new_tokens, stop, _pad_id(tokenizer))
        for i, a in zip(idx, answers):
            out[i] = Generation(a, tokenizer.decode(a))
    return out


# ---------------------------------------------------------------- ATTNATTRIB


def attn_attrib_batch(model, tokenizer, prompts, ctx_spans, head, max_new_tokens: int = 32, k: int = 1,
                      stop_ids=None, stop_on_newline: bool = True, batch_size: int = 16,
                      add_special_tokens: bool = True, progress: bool = True) -> list[AttribResult]:
    """ATTNATTRIB (Algorithm 4) for many prompts: greedy answers and their top-k context sentences.

    head: (layer, query head), or "mean" for the all-heads average (the ablation baseline, read from
    the same decoding passes). The attention comes from the decoding forward passes themselves;
    the model runs in eager attention for the call and its implementation is restored afterwards.
    """
    if head != "mean" and (len(head) != 2):
        raise BadParameter(f"head must be (layer, head) or 'mean', got {head!r}")
    ctxs = [locate_context(tokenizer, p, s, add_special_tokens) for p, s in zip(prompts, ctx_spans)]
    stop = _Stopper(tokenizer, default_stop_ids(model, tokenizer) if stop_ids is None else stop_ids,
                    stop_on_newline)
    out = [None] * len(ctxs)
    batches = _batches(len(ctxs), [len(c.input_ids) for c in ctxs], batch_size)
    with eager_attention(model):
        for idx in _progress(batches, len(batches), "attnattrib", progress):
            answers, rows = _decode(model, [ctxs[i].input_ids for i in idx], max_new_tokens, stop,
                                    _pad_id(tokenizer), head=head)
            for i, a, r in zip(idx, answers, rows):
                skip = _skip_mask(tokenizer, a)
                ranking, per_step = rank_sentences(r, ctxs[i].positions, ctxs[i].sentence_ids, skip)
                full = pad_ranking(ranking, r, ctxs[i].positions, ctxs[i].sentence_ids, len(ctxs[i].sentences), skip)
                out[i] = AttribResult(a, tokenizer.decode(a), ranking[:k], per_step, ranking, full)
    return out


def attn_attrib(model, tokenizer, prompt: str, ctx_span, head, max_new_tokens: int = 32, k: int = 1,
                stop_ids=None, stop_on_newline: bool = True, add_special_tokens: bool = True) -> AttribResult:
    """ATTNATTRIB for one prompt; see ``attn_attrib_batch``."""
    return attn_attrib_batch(model, tokenizer, [prompt], [ctx_span], head, max_new_tokens, k, stop_ids,
                             stop_on_newline, 1, add_special_tokens, progress=False)[0]


# ---------------------------------------------------------------- baselines


def _prompt_and_answer(tokenizer, prompt, ctx_span, answer_ids, add_special_tokens):
    ctx = locate_context(tokenizer, prompt, ctx_span, add_special_tokens)
    answer_ids = [int(t) for t in answer_ids]
    if not answer_ids:
        raise BadParameter("answer_ids is empty: there is no answer to attribute")
    return ctx, answer_ids


@torch.no_grad()
def answer_attention(model, input_ids, answer_ids) -> torch.Tensor:
    """Teacher-forced attention of the queries predicting each answer token, (L, H, J, T).

    One forward pass over prompt + answer (T prompt tokens, J answer tokens); query T-1+j predicts
    answer token j. In eager attention for the call.
    """
    ids = torch.as_tensor(list(input_ids) + list(answer_ids), device=_device(model))[None]
    T, J = len(input_ids), len(answer_ids)
    with eager_attention(model):
        att = model(input_ids=ids, output_attentions=True).attentions
    return torch.stack([a[0, :, T - 1:T - 1 + J, :T] for a in att]).float().cpu()


def mean_attention_attrib(model, tokenizer, prompt: str, ctx_span, answer_ids,
                          add_special_tokens: bool = True) -> Ranking:
    """Baseline: Algorithm 4 on the attention of all heads of all layers averaged, (same answer)."""
    ctx, answer_ids = _prompt_and_answer(tokenizer, prompt, ctx_span, answer_ids, add_special_tokens)
    rows = answer_attention(model, ctx.input_ids, answer_ids).mean(dim=(0, 1))     # (J, T)
    ranking, _ = rank_sentences(rows, ctx.positions, ctx.sentence_ids, _skip_mask(tokenizer, answer_ids))
    return _complete(ranking, len(ctx.sentences))


def _complete(ranking: Ranking, n_sentences: int) -> Ranking:
    """Append the sentences that got no vote (score 0, index order) so every ranking is total."""
    seen = {s for s, _ in ranking}
    return list(ranking) + [(s, 0.0) for s in range(n_sentences) if s not in seen]


def gradient_attrib(model, tokenizer, prompt: str, ctx_span, answer_ids, method: str = "grad_norm",
                    add_special_tokens: bool = True) -> Ranking:
    """Baseline: input-gradient saliency of the context tokens for the teacher-forced answer.

    method "grad_norm" (spec §2.10): for each answer token j (punctuation skipped as in ATTNATTRIB),
    g_j = d(-log p(a_j)) / d(embeddings); token score = max_j ||g_j[t]||_2; a sentence scores the max
    of its tokens, so top-1 is the sentence of the arg-max token. One backward per answer token.
    method "grad_x_input" (Yin & Neubig's gradient x input): g = d log p(answer) / d(embeddings);
    token score = |g[t] . e[t]|; a sentence scores the sum over its tokens. One backward.
    """
    check_choice("method", method, ("grad_norm", "grad_x_input"))
    ctx, answer_ids = _prompt_and_answer(tokenizer, prompt, ctx_span, answer_ids, add_special_tokens)
    ids = torch.as_tensor(ctx.input_ids + answer_ids, device=_device(model))[None]
    T, J = len(ctx.input_ids), len(answer_ids)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)    # (1, T+J, d)
    logp = torch.log_softmax(model(inputs_embeds=emb).logits[0, T - 1:T - 1 + J].float(), dim=-1)
    tok_logp = logp[torch.arange(J), torch.as_tensor(answer_ids, device=logp.device)]   # (J,)
    pos = ctx.positions.to(emb.device)
    if method == "grad_x_input":
        (g,) = torch.autograd.grad(tok_logp.sum(), emb)
        score = (g[0, pos] * emb[0, pos]).sum(-1).abs().detach().cpu()     # (N,)
        sums: dict[int, float] = {}
        for s, v in zip(ctx.sentence_ids.tolist(), score.tolist()):
            sums[s] = sums.get(s, 0.0) + v
        return _complete(_sorted(sums), len(ctx.sentences))
    steps = torch.nonzero(~_skip_mask(tokenizer, answer_ids)).flatten().tolist() or list(range(J))
    score = torch.zeros(len(pos))
    for n, j in enumerate(steps):
        (g,) = torch.autograd.grad(-tok_logp[j], emb, retain_graph=n + 1 < len(steps))
        score = torch.maximum(score, g[0, pos].norm(dim=-1).cpu())
    best: dict[int, float] = {}
    for s, v in zip(ctx.sentence_ids.tolist(), score.tolist()):
        best[s] = max(best.get(s, 0.0), v)
    return _complete(_sorted(best), len(ctx.sentences))


def tfidf_attrib(context_sentences, question: str, answer_text: str) -> Ranking:
    """Baseline: TF-IDF cosine between each sentence and "question answer" (stand-in for all-mpnet).

    The vocabulary and IDF are fitted on the sentences plus the query; every word counts, single
    characters included (the tiny world's words are short). Ties keep sentence order.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    query = f"{question} {answer_text}".strip()
    vec = TfidfVectorizer(token_pattern=r"(?u)\b\w+\b", lowercase=True)
    try:
        X = vec.fit_transform(list(context_sentences) + [query])      # rows are L2-normalised
    except ValueError:                                                 # no word anywhere
        return [(i, 0.0) for i in range(len(context_sentences))]
    sims = (X[:-1] @ X[-1].T).toarray().ravel()
    return _sorted({i: float(v) for i, v in enumerate(sims)})


def token_f1(a: str, b: str) -> float:
    """SQuAD token F1 between two texts after ``normalize_answer``."""
    x, y = normalize_answer(a).split(), normalize_answer(b).split()
    common = sum(min(x.count(w), y.count(w)) for w in set(x))
    return 0.0 if common == 0 else 2 * common / (len(x) + len(y))


def quoted_sentence(quote: str, context_sentences) -> Ranking:
    """Rank the sentences by token F1 with a free-form quote (how a prompted baseline's citation is
    mapped to the context, §8.4.2). Ties keep sentence order."""
    return _sorted({i: token_f1(quote, s) for i, s in enumerate(context_sentences)})


_EVIDENCE = re.compile(r"\bevidence\s*:", re.IGNORECASE)
_ANSWER = re.compile(r"^\s*answer\s*:", re.IGNORECASE)


def split_self_attribution(reply: str) -> tuple[str, str]:
    """(answer, evidence) of a reply in the form "Answer: ... Evidence: ..."; without the marker the
    whole reply serves as both (small models often skip the format)."""
    parts = _EVIDENCE.split(reply, maxsplit=1)
    answer = _ANSWER.sub("", parts[0]).strip()
    return (answer, parts[1].strip()) if len(parts) == 2 else (answer, reply.strip())


def _replies(model, tokenizer, prompts, max_new_tokens, batch_size, add_special_tokens, progress) -> list:
    """Greedy free-form replies (newlines allowed: a quoted sentence may follow one)."""
    return [g.text for g in greedy_generate(model, tokenizer, prompts, max_new_tokens, stop_on_newline=False,
                                            batch_size=batch_size, add_special_tokens=add_special_tokens,
                                            progress=progress)]


def self_attribution(model, tokenizer, prompts, context_sentences, max_new_tokens: int = 96, batch_size: int = 16,
                     add_special_tokens: bool = True, progress: bool = False) -> list:
    """Self-Attribution baseline: one prompt asks for the answer and a quoted supporting sentence
    (``llms.self_attribution_prompt``). prompts: N strings; context_sentences: N lists of sentences.
    Returns N (answer text, Ranking of the sentences by token F1 with the quote)."""
    out = []
    for reply, sentences in zip(_replies(model, tokenizer, prompts, max_new_tokens, batch_size, add_special_tokens,
                                         progress), context_sentences):
        answer, evidence = split_self_attribution(reply)
        out.append((answer, quoted_sentence(evidence, sentences)))
    return out


def iterative_attribution(model, tokenizer, prompts, context_sentences, max_new_tokens: int = 64,
                          batch_size: int = 16, add_special_tokens: bool = True, progress: bool = False) -> list:
    """Iterative Prompting baseline: the answer is generated first; ``prompts`` (N strings) already
    hold it and ask which context sentence supports it (``llms.evidence_prompt``). Returns N Rankings
    of the sentences by token F1 with the generated quote."""
    replies = _replies(model, tokenizer, prompts, max_new_tokens, batch_size, add_special_tokens, progress)
    return [quoted_sentence(reply, sentences) for reply, sentences in zip(replies, context_sentences)]


@torch.no_grad()
def embed_sentences(encoder, tokenizer, texts, batch_size: int = 64, max_length: int = 384) -> torch.Tensor:
    """(N, d) unit-norm sentence embeddings: the encoder's last hidden states mean-pooled over the
    non-padding tokens, then L2-normalised (sentence-transformers' all-mpnet-base-v2 recipe)."""
    out = []
    device = _device(encoder)
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt").to(device)
        h = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state.float()
        mask = batch["attention_mask"][..., None].to(h.dtype)
        out.append(torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1).cpu())
    return torch.cat(out)


def similarity_attrib(encoder, tokenizer, context_sentences, answer_text: str) -> Ranking:
    """Sentence-similarity baseline: cosine between the generated answer's embedding and each
    sentence's (``embed_sentences``); the dissertation's encoder is all-mpnet-base-v2."""
    emb = embed_sentences(encoder, tokenizer, [answer_text] + list(context_sentences))
    return _sorted({i: float(v) for i, v in enumerate(emb[1:] @ emb[0])})


def random_attrib(n_sentences: int, rng) -> Ranking:
    """Baseline: a uniformly random order (rng: numpy Generator or seed); scores are 1/rank."""
    rng = np.random.default_rng(rng)
    return [(int(s), 1.0 / (r + 1)) for r, s in enumerate(rng.permutation(n_sentences))]


# ---------------------------------------------------------------- metrics


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop ASCII punctuation and articles, collapse whitespace."""
    text = text.lower()
    text = "".join(c for c in text if c not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def qa_correct(generation: str, gold: str) -> bool:
    """Normalised gold contained in normalised generation (as whole words).

    A gold that normalises to nothing (e.g. "."), would be contained in anything, so it is compared
    lowercased and stripped instead. The tiny world's "—" survives normalisation (not ASCII).
    """
    g = normalize_answer(gold)
    if not g:
        g, gen = gold.strip().lower(), generation.lower()
        return bool(g) and g in gen
    return f" {g} " in f" {normalize_answer(generation)} "


def _top(ranking, k: int) -> list:
    return [r[0] if isinstance(r, (tuple, list)) else int(r) for r in list(ranking)[:k]]


def attribution_correct(top_sentences, gold_sentence: int, k: int = 1) -> bool:
    """Gold sentence among the first k of a ranking ([(idx, score)] or [idx]); k=1 is exact match."""
    return int(gold_sentence) in _top(top_sentences, k)


def sentence_f1(predicted, gold) -> float:
    """Set F1 between predicted sentence indices (a ranking's top-k) and gold supporting sentences."""
    p, g = set(_top(predicted, len(predicted))), set(int(x) for x in gold)
    hit = len(p & g)
    return 0.0 if hit == 0 else 2 * hit / (len(p) + len(g))


@torch.no_grad()
def sequence_logprob(model, tokenizer, prompt, response_ids, add_special_tokens: bool = True) -> float:
    """sum_j log p(r_j | prompt, r_<j), teacher-forced, in float32."""
    p = _encode(tokenizer, prompt, add_special_tokens)
    r = [int(t) for t in response_ids]
    ids = torch.as_tensor(p + r, device=_device(model))[None]
    logits = model(input_ids=ids).logits[0, len(p) - 1:len(p) - 1 + len(r)].float()
    logp = torch.log_softmax(logits, dim=-1)
    return float(logp[torch.arange(len(r)), torch.as_tensor(r, device=logp.device)].sum())


def rel_score(model, tokenizer, prompt_orig, prompt_ablated, response_ids,
              add_special_tokens: bool = True) -> float:
    """Rel-Score (Eq. 11.18) = |(log p(R|C_orig) - log p(R|C_abl)) / log p(R|C_abl)|; higher = the
    removed sentences mattered more. inf if log p(R|C_abl) == 0."""
    lo = sequence_logprob(model, tokenizer, prompt_orig, response_ids, add_special_tokens)
    la = sequence_logprob(model, tokenizer, prompt_ablated, response_ids, add_special_tokens)
    if la == 0.0:
        return 0.0 if lo == 0.0 else float("inf")
    return abs((lo - la) / la)


# ---------------------------------------------------------------- context-aware decoding


@torch.no_grad()
def cad_generate(model, tokenizer, prompt_with_ctx, prompt_without_ctx, alpha: float = 0.5,
                 max_new_tokens: int = 32, stop_ids=None, stop_on_newline: bool = True,
                 add_special_tokens: bool = True) -> Generation:
    """Context-aware decoding (Shi et al.): greedy on (1+alpha) z(y|C,q) - alpha z(y|q).

    Two KV-cached streams (with and without the context) advance on the same chosen token; one
    prompt at a time. alpha = 0 is plain greedy decoding.
    """
    dev = _device(model)
    stop = _Stopper(tokenizer, default_stop_ids(model, tokenizer) if stop_ids is None else stop_ids,
                    stop_on_newline)
    streams = [torch.as_tensor(_encode(tokenizer, p, add_special_tokens), device=dev)[None]
               for p in (prompt_with_ctx, prompt_without_ctx)]
    pasts, answer = [None, None], []
    for _ in range(max_new_tokens):
        logits = []
        for i, x in enumerate(streams):
            out = model(input_ids=x, past_key_values=pasts[i], use_cache=True)
            pasts[i] = out.past_key_values
            logits.append(out.logits[0, -1].float())
        t = int(((1 + alpha) * logits[0] - alpha * logits[1]).argmax())
        if stop(t):
            break
        answer.append(t)
        streams = [torch.tensor([[t]], device=dev)] * 2
    return Generation(answer, tokenizer.decode(answer))
