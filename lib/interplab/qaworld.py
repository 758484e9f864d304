"""The procedural extractive-QA world of Chapter 8's tiny profile (spec 5.1), and its tokenizer.

Invented two-token entities ("zor blat") hold facts under four relations whose values come from
disjoint pools of invented single-token words. Three groups of entities:

    mem    240 entities with 2 facts each, memorised in training (closed-book questions)
    ctx    400 entities that never get a fixed fact: open-book questions about them must be copied
    fresh  200 names never seen in training (corruption: they replace a subject)

A prompt is ``context : s_1 ... s_n question : q answer :`` (plus ``hint : s`` or the long-answer
cue ``answer in full :``) and the target is ``v <eos>`` (or the gold sentence). Contexts mix the
answer sentence with filler sentences about the subject, facts of the other relations about other
entities and "answer-value distractors" that put a value of the answer's pool in another role (in
training a random value, so that taking any value of the pool is wrong; in the NQ-tiny test sets
the answer itself, so that string matching cannot find the answer sentence). Every relation has
six training paraphrases and one held out for the NQ-Swap-tiny / NQ-tiny test sets.

No context ever contradicts a memorised fact in training: what the model does when the context
says otherwise is emergent, which is what makes the memory-vs-context experiments meaningful.
"""
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from .toyworld.tokenizer import build_tokenizer

RELATIONS = ("located_in", "owned_by", "language_of", "founded_by")
POOL_SIZES = {"located_in": 40, "owned_by": 40, "language_of": 30, "founded_by": 40}
TEMPLATES = {  # six training paraphrases, then the held-out one (last); the value always ends the fact, so a
    # copy head's key at the value token can see its role (a "{v} owns {e} ." fact looks like a distractor
    # there). With three training paraphrases the held-out one was answered at 0.32-0.39, with six at 0.72
    # (docs/qaworld.md, run v11); the spec has three.
    "located_in": ("{e} is located in {v} .", "{e} lies in {v} .", "{e} can be found in {v} .",
                   "{e} is situated in {v} .", "the home of {e} is {v} .", "you will find {e} in {v} .",
                   "{e} sits in the city of {v} ."),
    "owned_by": ("{e} is owned by {v} .", "the owner of {e} is {v} .", "{e} belongs to {v} .",
                 "{e} is held by {v} .", "{e} is run by {v} .", "the holder of {e} is {v} .",
                 "{e} is a property of {v} ."),
    "language_of": ("{e} speaks {v} .", "the language of {e} is {v} .", "{e} uses {v} .",
                    "the tongue of {e} is {v} .", "at {e} people speak {v} .", "{e} communicates in {v} .",
                    "people at {e} talk in {v} ."),
    "founded_by": ("{e} was founded by {v} .", "the founder of {e} is {v} .", "{e} was started by {v} .",
                   "{e} was created by {v} .", "the creator of {e} is {v} .", "{e} was set up by {v} .",
                   "{e} owes its founding to {v} ."),
}
QUESTIONS = {"located_in": "where is {e} located ?", "owned_by": "who owns {e} ?",
             "language_of": "what language does {e} speak ?", "founded_by": "who founded {e} ?"}
FILLERS = ("{e} attracts many visitors .", "{e} is known for its gardens .", "{e} opened a new hall .",
           "{e} has a long history .", "{e} is quiet in winter .", "{e} hired new staff .",
           "{e} appears in many stories .", "{e} is admired by many .", "{e} was renovated twice .",
           "{e} keeps a small archive .")
VALUE_DISTRACTORS = {  # a value of the relation's pool in a non-answer role, alone or beside the subject
    "located_in": ("{v} hosts a yearly festival .", "{e} sent a delegation to {v} ."),
    "owned_by": ("{v} reported record profits .", "{e} signed a deal with {v} ."),
    "language_of": ("{v} has a rich grammar .", "{e} offers courses in {v} ."),
    "founded_by": ("{v} enjoys long walks .", "{e} gave an award to {v} ."),
}
DASH = "—"
GROUP_SIZES = {"mem": 240, "ctx": 400, "fresh": 200}
MIN_SENTENCES, MAX_SENTENCES = 3, 14  # test contexts; training also has 1-2 sentences (RoPE does not extrapolate)
TRAIN_MIN_SENTENCES = 1
# Copy-heavy: with the spec's 30/30/15/15/10 and half of the open items on memorised entities (which
# memory answers too), a first run memorised 87 % of the facts by step 2000 but copied from a
# 1-sentence context only 14 % of the time (from a hint, 67 %); see docs/qaworld.md.
# "redacted": open-book items about ctx entities whose answer slot holds the dash, target the dash. A
# redacted answer is copied when nothing is memorised, so the copy heads learn to read the slot whatever it
# holds, and on a memorised entity memory has to beat the dash they read (run v19 in docs/qaworld.md: the
# head that reads the slot on D_memory-tiny went from 0.01-0.04 to 0.65 of its attention). Relative weights.
TRAIN_MIX = {"closed": 0.25, "open": 0.40, "dash": 0.15, "hint": 0.10, "long": 0.10, "redacted": 0.08}
# every training context with >= 2 sentences puts 1-2 values of the answer's pool in other roles: with 0-1
# the model also learned to emit "the value of the asked pool in the context", a second route beside
# the copy head that made the head circuit redundant (docs/qaworld.md, runs v8-v10)
TRAIN_VALUE_DISTRACTORS = (1, 2)
P_MEM_OPEN = 0.25  # open-book items (open, hint, long) about memorised entities; the rest must be copied

_ONSETS = "b d f g k l m n p r s t v z br dr gr kr pl sl st tr".split()
_VOWELS = "a e i o u".split()
_CODAS = ["", "n", "r", "l", "s", "m", "k", "x"]


def _syllable(rng) -> str:
    return _ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))] + _CODAS[rng.integers(len(_CODAS))]


@dataclass(frozen=True)
class World:
    """Entities by group, value pools by relation, and the memorised facts {(entity, relation): value}."""
    entities: dict
    pools: dict
    facts: dict
    seed: int

    def relations_of(self, entity: str) -> list[str]:
        return [r for r in RELATIONS if (entity, r) in self.facts]

    def words(self) -> list[str]:
        out = []
        sentences = [*(t for ts in TEMPLATES.values() for t in ts), *QUESTIONS.values(), *FILLERS,
                     *(t for ts in VALUE_DISTRACTORS.values() for t in ts)]
        for t in sentences + ["context : question : hint : answer : answer in full :"]:
            out += [w for w in t.split() if w not in ("{e}", "{v}")]
        out += [w for names in self.entities.values() for n in names for w in n.split()]
        out += [v for pool in self.pools.values() for v in pool] + [DASH]
        return list(dict.fromkeys(out))


@lru_cache(maxsize=4)
def world(seed: int = 0) -> World:
    """The world of ``seed``: names and values are invented words, unique across groups and pools."""
    rng = np.random.default_rng([seed, 8])
    firsts = sorted({_syllable(rng) for _ in range(400)})[:40]
    seconds = sorted({_syllable(rng) + _syllable(rng)[-2:] for _ in range(400)} - set(firsts))[:40]
    names = [f"{a} {b}" for a in firsts for b in seconds]
    names = [names[i] for i in rng.permutation(len(names))]
    entities, start = {}, 0
    for group, n in GROUP_SIZES.items():
        entities[group], start = tuple(names[start:start + n]), start + n
    used = set(firsts) | set(seconds) | {w for ts in TEMPLATES.values() for t in ts for w in t.split()}
    pools = {}
    for rel, n in POOL_SIZES.items():
        vals = []
        while len(vals) < n:
            w = _syllable(rng) + _syllable(rng) + ("a" if rel == "language_of" else "")
            if w not in used:
                used.add(w)
                vals.append(w)
        pools[rel] = tuple(vals)
    facts = {}
    for e in entities["mem"]:
        for rel in rng.permutation(RELATIONS)[:2]:
            facts[(e, str(rel))] = str(pools[str(rel)][rng.integers(POOL_SIZES[str(rel)])])
    return World(entities, pools, facts, seed)


def tokenizer(w: World = None, max_length: int = 256):
    """Word-level tokenizer over the world's words: ``tok(prompt)`` is <bos> + words (no <eos>: the
    model continues the prompt), padded with <pad> (id 0)."""
    return build_tokenizer((w or world()).words(), max_length=max_length, add_eos=False)


@dataclass
class Item:
    """One QA example. ``sentences``: the context; ``gold``: index of the sentence that holds the
    answer (None without context); ``answer``: the value the item expects; ``memorised``: the
    entity's memorised value for the relation, if any."""
    prompt: str
    target: str
    answer: str
    subject: str
    relation: str
    question: str
    sentences: list = field(default_factory=list)
    gold: int | None = None
    memorised: str | None = None
    mode: str = "open"
    meta: dict = field(default_factory=dict)

    @property
    def context(self) -> str:
        return " ".join(self.sentences)

    @property
    def ctx_span(self) -> tuple[int, int]:
        """Character span of the context inside ``prompt`` (what attribution methods take)."""
        if not self.sentences:
            return (0, 0)
        lo = len("context : ")
        return lo, lo + len(self.context)

    def token_layout(self, length: int):
        """Masks over the tokens ``<bos> + prompt.split()`` padded to ``length``: context (T,) bool,
        sentence index (T,) long (-1 outside the context), gold sentence (T,) bool."""
        import torch
        sid = torch.full((length,), -1, dtype=torch.long)
        pos = 3  # <bos> context :
        for i, s in enumerate(self.sentences):
            n = len(s.split())
            sid[pos:pos + n] = i
            pos += n
        gold = sid == (self.gold if self.gold is not None else -2)
        return sid >= 0, sid, gold


def make_prompt(sentences, question: str, hint: str | None = None, long: bool = False) -> str:
    ctx = f"context : {' '.join(sentences)} " if sentences else ""
    cue = "answer in full :" if long else "answer :"
    return f"{ctx}question : {question} " + (f"hint : {hint} " if hint else "") + cue


def _pick(rng, seq):
    return seq[rng.integers(len(seq))]


def swap_word(sentence: str, old: str, new: str) -> str:
    """Replace the whole word ``old`` (a single-token value or the dash) by ``new``."""
    words = sentence.split()
    if old not in words:
        raise ValueError(f"{old!r} is not a word of {sentence!r}")
    return " ".join(new if x == old else x for x in words)


def make_context(w: World, rng, subject: str, relation: str, value: str, n: int, held_out: bool = False,
                 value_distractors: int = 0, answer_value: bool = False) -> tuple[list[str], int]:
    """n sentences: the answer sentence, fillers about the subject, facts of the other relations about
    other entities and ``value_distractors`` sentences that put a value of the answer's pool in
    another role ("{v} hosts a yearly festival .", "{e} sent a delegation to {v} ."): a random value
    (training: the answer is not just any value of the pool), or with ``answer_value`` the answer
    itself (the spec's NQ-tiny sets: string matching cannot tell the answer sentence).

    The spec also puts same-relation facts about other entities into contexts; finding the answer
    then needs binding the question's two-token subject to its sentence, which a 6-layer model did
    not learn in 1500-3000 copy-only steps under four recipes (docs/qaworld.md), so the relation
    and the sentence's role (fact vs value distractor) identify the answer sentence here."""
    templates = TEMPLATES[relation][-1:] if held_out else TEMPLATES[relation][:-1]
    answer = _pick(rng, templates).format(e=subject, v=value)
    others = []
    for _ in range(value_distractors):
        v = value if answer_value else _pick(rng, w.pools[relation])
        others.append(_pick(rng, VALUE_DISTRACTORS[relation]).format(e=subject, v=v))
    while len(others) < n - 1:
        if rng.random() < 0.5:
            others.append(_pick(rng, FILLERS).format(e=subject))
        else:  # a fact of another relation about another entity (never the subject): see the docstring
            other = _pick(rng, w.entities["ctx"] if rng.random() < 0.5 else w.entities["mem"])
            if other == subject:
                continue
            rel = _pick(rng, [r for r in RELATIONS if r != relation])
            others.append(_pick(rng, TEMPLATES[rel][:-1]).format(e=other, v=_pick(rng, w.pools[rel])))
    gold = int(rng.integers(n))
    others = [others[i] for i in rng.permutation(len(others))]
    return others[:gold] + [answer] + others[gold:], gold


def _fact(w: World, rng, group: str) -> tuple[str, str, str | None]:
    """(subject, relation, memorised value or None) drawn from a group."""
    if group == "mem":
        subject, relation = list(w.facts)[rng.integers(len(w.facts))]
        return subject, relation, w.facts[(subject, relation)]
    return _pick(rng, w.entities[group]), _pick(rng, RELATIONS), None


def train_item(w: World, rng, max_sentences: int = MAX_SENTENCES) -> Item:
    """One example of the training mixture (TRAIN_MIX); contexts always agree with memory and have
    TRAIN_MIN_SENTENCES..``max_sentences`` sentences."""
    modes, weights = list(TRAIN_MIX), np.array(list(TRAIN_MIX.values()))
    mode = modes[rng.choice(len(modes), p=weights / weights.sum())]
    if mode == "redacted":
        group = "ctx"
    else:
        group = "mem" if mode in ("closed", "dash") or rng.random() < P_MEM_OPEN else "ctx"
    subject, relation, memorised = _fact(w, rng, group)
    value = memorised or _pick(rng, w.pools[relation])
    q = QUESTIONS[relation].format(e=subject)
    if mode == "closed":
        return Item(make_prompt([], q), value, value, subject, relation, q, memorised=memorised, mode=mode)
    n = int(rng.integers(TRAIN_MIN_SENTENCES, max_sentences + 1))
    sents, gold = make_context(w, rng, subject, relation, value, n, value_distractors=_train_distractors(rng, n))
    if mode in ("dash", "redacted"):
        sents[gold] = swap_word(sents[gold], value, DASH)
    hint = sents[gold] if mode == "hint" else None
    long = mode == "long"
    answer = DASH if mode == "redacted" else value
    target = sents[gold] if long else answer
    return Item(make_prompt(sents, q, hint, long), target, answer, subject, relation, q, sents, gold, memorised, mode)


def _train_distractors(rng, n: int) -> int:
    lo, hi = TRAIN_VALUE_DISTRACTORS
    return min(n - 1, int(rng.integers(lo, hi + 1)))


def copy_item(w: World, rng, max_sentences: int = MAX_SENTENCES) -> Item:
    """An open-book training item about a ctx entity (nothing to recall: the value must be copied)."""
    n = int(rng.integers(TRAIN_MIN_SENTENCES, max_sentences + 1))
    return probe_item(w, rng, "ctx", n=(n, n), value_distractors=_train_distractors(rng, n))


def probe_item(w: World, rng, group: str = "mem", substitute: str | None = None, held_out: bool = False,
               n: tuple = (MIN_SENTENCES, MAX_SENTENCES), value_distractors: int = 0, long: bool = False,
               answer_value: bool = False) -> Item:
    """A test item. ``substitute``: None (context states the true/memorised value), "copy" (another
    value of the same pool, the D_copy / NQ-Swap conflict) or "dash" (the D_memory slot); the
    distractors as in ``make_context``."""
    subject, relation, memorised = _fact(w, rng, group)
    value = memorised or _pick(rng, w.pools[relation])
    if substitute == "copy":
        value = _pick(rng, [v for v in w.pools[relation] if v != memorised])
    k = int(rng.integers(n[0], n[1] + 1))
    sents, gold = make_context(w, rng, subject, relation, value, k, held_out, value_distractors, answer_value)
    if substitute == "dash":
        sents[gold] = swap_word(sents[gold], value, DASH)
        value = memorised
    q = QUESTIONS[relation].format(e=subject)
    target = sents[gold] if long else value
    return Item(make_prompt(sents, q, long=long), target, value, subject, relation, q, sents, gold, memorised,
                "long" if long else (substitute or "open"))


def probe_set(n: int, seed: int, **kw) -> list[Item]:
    rng = np.random.default_rng([seed, 9])
    return [probe_item(world(), rng, **kw) for _ in range(n)]


def corrupt(w: World, item: Item, rng) -> Item:
    """The corrupted twin (spec 5.3): the subject becomes a never-seen name in question and context,
    and the context's answer token a value from a different pool."""
    fresh = _pick(rng, w.entities["fresh"])
    other = _pick(rng, [r for r in RELATIONS if r != item.relation])
    sents = [s.replace(item.subject, fresh) for s in item.sentences]
    if item.gold is not None:
        slot = DASH if item.mode == "dash" else item.answer
        sents[item.gold] = swap_word(sents[item.gold], slot, _pick(rng, w.pools[other]))
    q = item.question.replace(item.subject, fresh)
    return Item(make_prompt(sents, q), item.target, item.answer, fresh, item.relation, q, sents, item.gold,
                None, "corrupt", {"of": item.subject})


def with_hint(item: Item, sentence: str | None) -> Item:
    """The same question with ``hint : sentence`` inserted (Fig 8.6: steering toward the context)."""
    out = Item(**{**item.__dict__, "prompt": make_prompt(item.sentences, item.question, sentence)})
    out.meta = {**item.meta, "hint": sentence}
    return out
