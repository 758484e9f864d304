"""ToyFacts: the visual question answering world of Chapter 6 (MultimodalCausalTrace, MultEdit).

Three datasets, named after the dissertation's, built on the world's landmarks and two new tables:

- ToyKnown (Multimodal Known): "this landmark is located in which city ?" about an image of a
  landmark (its unique conjunction of background, shape, colour, texture). Visual constraint
  "this landmark"; corrupted by another landmark's two-token name.
- ToyMovies: "name a movie directed by this director ?" about a portrait (a large head and a small
  hat above it); directors have three single-token movies, one per year. Multi-constraint: "... in
  year 2006 ?" (textual constraint "2006", corrupted by another year).
- ToyOKVQA (commonsense): "what is this object used for ?" (shape -> use), "what animal lives in
  this place ?" (background -> animal); multi-constraint "which fruit grows in this place in
  <country> ?" (background x country -> fruit).

Every word is one token of the word-level tokenizer, so a phrase's token positions are its word
positions in the prompt. A visual constraint and its corruption always have the same length.
Prompts: ``user : <image> <nl> {question} reply :`` (the vision tokens replace ``<image>``);
text-only (the LLM counterpart): ``user : {question} reply :`` with the entity named.
"""
from dataclasses import dataclass, field, replace

import numpy as np

from .attributes import BACKGROUNDS, COLOURS, SHAPES, SLOTS
from .entities import BUILDERS, CITIES, COUNTRIES, SYLLABLES, Landmark, landmarks
from .render import Obj, Scene

RELATIONS = ("city", "country", "builder")
# per relation: [0] the main template, [1:TRAINED_TEMPLATES] paraphrases used in training, the rest held out.
# Several trained constructions make the relation word, not one sentence frame, what names the relation, so a
# held-out paraphrase is understood (with two frames the tiny LLaVA answered them at 0.19-0.97 by relation).
TRAINED_TEMPLATES = 4
LANDMARK_TEMPLATES = {
    "city": ("{e} is located in which city ?", "which city is {e} located in ?", "what city is {e} in ?",
             "{e} is in what city ?", "in which city is {e} ?", "{e} stands in which city ?"),
    "country": ("{e} belongs to which country ?", "which country does {e} belong to ?", "what country is {e} in ?",
                "{e} is in what country ?", "in which country is {e} ?", "{e} is part of which country ?"),
    "builder": ("{e} was built by ?", "who built {e} ?", "{e} was created by ?", "who created {e} ?",
                "{e} was made by ?", "who made {e} ?"),
}
MOVIE_TEMPLATES = ("name a movie directed by {e} ?", "which movie did {e} direct ?",
                   "give a movie made by {e} ?", "name a film by {e} ?")
MOVIE_YEAR_TEMPLATE = "name a movie directed by {e} in year {y} ?"
USE_TEMPLATES = ("what is {e} used for ?", "what do people use {e} for ?")
ANIMAL_TEMPLATES = ("what animal lives in {e} ?", "which animal is found in {e} ?")
FRUIT_TEMPLATE = "which fruit grows in {e} in {c} ?"
ATTRIBUTE_QUESTIONS = {"colour": "what colour is the object ?", "shape": "what shape is the object ?",
                       "background": "what is the background ?"}
VISUAL = {"landmark": "this landmark", "director": "this director", "object": "this object", "place": "this place"}

YEARS = ("1994", "2006", "2010")
USES = dict(zip(SHAPES[:6], ("rolling", "storage", "signs", "medicine", "decoration", "jewelry")))
ANIMALS = dict(zip(BACKGROUNDS, ("bat", "fish", "duck", "cow", "deer", "camel", "bear")))
FRUITS = ("apple", "banana", "cherry", "date", "fig", "grape", "kiwi", "lemon", "mango", "melon", "olive", "pear")
MOVIE_SYLLABLES = ("lor", "ven", "tash", "orm", "quae", "bim", "sul", "dak")
DIRECTOR_SYLLABLES = ("abe", "cor", "dru", "ena", "fil", "gro", "hes", "jun")
PROMPT = "user : <image> <nl> {q} reply :"
TEXT_PROMPT = "user : {q} reply :"


@dataclass(frozen=True)
class Director:
    name: str                              # first and last name, e.g. "abe fil"
    head: tuple                            # (shape, colour) of the large head
    hat: tuple                             # (shape, colour) of the small hat
    movies: dict                           # year -> single-token title
    split: str = "head"


@dataclass(frozen=True)
class World:
    landmarks: tuple
    directors: tuple
    fruit: dict                            # (background, country) -> fruit
    seed: int


def directors(seed: int = 11, n: int = 16) -> tuple:
    """16 directors with distinct (head, hat) signatures and three movies each (titles unique)."""
    rng = np.random.default_rng(seed)
    half = len(DIRECTOR_SYLLABLES) // 2  # first x last names: a director is known at the last token
    names = [f"{a} {b}" for a in DIRECTOR_SYLLABLES[:half] for b in DIRECTOR_SYLLABLES[half:]]
    names = [names[i] for i in rng.permutation(len(names))[:n]]
    titles = [f"{a}{b}" for a in MOVIE_SYLLABLES for b in MOVIE_SYLLABLES if a != b]
    titles = [titles[i] for i in rng.permutation(len(titles))[:3 * n]]
    sigs = []  # a list, not a set: a set's order follows the per-process string hash
    while len(sigs) < n:
        s = tuple(str(x) for x in (rng.choice(SHAPES[:6]), rng.choice(COLOURS[:6]),
                                   rng.choice(SHAPES[:6]), rng.choice(COLOURS[:6])))
        if s[1] != s[3] and s not in sigs:
            sigs.append(s)
    return tuple(Director(names[i], sigs[i][:2], sigs[i][2:], dict(zip(YEARS, titles[3 * i:3 * i + 3])))
                 for i in range(n))


def world(seed: int = 7) -> World:
    """The fixed ToyFacts world (the landmark table is the one every chapter sees)."""
    rng = np.random.default_rng([seed, 6])
    fruit = {(b, c): str(rng.choice(FRUITS)) for b in BACKGROUNDS for c in COUNTRIES}
    return World(tuple(landmarks(seed)), directors(), fruit, seed)


def words(w: World) -> list:
    """Every word a ToyFacts prompt or answer can contain (the tokenizer's vocabulary)."""
    texts = [PROMPT, *ATTRIBUTE_QUESTIONS.values(), MOVIE_YEAR_TEMPLATE, FRUIT_TEMPLATE, "what is this ?",
             "{e} is a {s} {c} {t} on {b}", "{e} wears a {c} {s} hat"]
    for group in (*LANDMARK_TEMPLATES.values(), MOVIE_TEMPLATES, USE_TEMPLATES, ANIMAL_TEMPLATES):
        texts += list(group)
    out = [t for text in texts for t in text.split() if not t.startswith("{") and t != "<image>" and t != "<nl>"]
    out += [s for s in SYLLABLES + DIRECTOR_SYLLABLES]
    out += list(CITIES) + list(COUNTRIES) + list(BUILDERS) + list(YEARS) + list(FRUITS)
    out += list(USES.values()) + list(ANIMALS.values()) + list(SHAPES) + list(COLOURS) + list(BACKGROUNDS)
    out += ["plain", "striped", "dotted", "the", "this"] + [v for d in w.directors for v in d.movies.values()]
    out += [x for v in VISUAL.values() for x in v.split()]
    return list(dict.fromkeys(out))


# ---------------------------------------------------------------- scenes


def landmark_scene(lm: Landmark, rng) -> Scene:
    """One large object of the landmark's shape, colour and texture in a random slot on its background."""
    return Scene((Obj(lm.shape, lm.colour, lm.texture, "large", SLOTS[rng.integers(4)]),), lm.background)


def director_scene(d: Director, rng) -> Scene:
    """A portrait: the large head in a bottom slot, the small hat above it, on the dark background."""
    side = ("left", "right")[rng.integers(2)]
    return Scene((Obj(d.head[0], d.head[1], "plain", "large", f"bottom {side}"),
                  Obj(d.hat[0], d.hat[1], "plain", "small", f"top {side}")), "dark")


def object_scene(rng, shape: str = None, background: str = None) -> Scene:
    """A single object of random attributes (or the given shape / background), no planted prior."""
    shape = shape or SHAPES[rng.integers(6)]
    background = background or BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    obj = Obj(shape, COLOURS[rng.integers(6)], ("plain", "striped", "dotted")[rng.integers(3)],
              ("small", "large")[rng.integers(2)], SLOTS[rng.integers(4)])
    return Scene((obj,), background)


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class Record:
    """One probe question (spec 2.2). ``constraint``: the visual constraint phrase in ``question``;
    ``corruption``: the same-length phrase that replaces it; ``text_constraint`` and
    ``text_corruption`` for multi-constraint questions; ``answers``: every correct answer."""
    dataset: str
    question: str
    constraint: str
    corruption: str
    answers: tuple
    scene: Scene | None = None
    entity: str = ""                       # landmark / director name, shape or background
    relation: str = ""
    text_constraint: str | None = None
    text_corruption: str | None = None
    paraphrases: tuple = ()
    split: str = "head"
    meta: dict = field(default_factory=dict, compare=False)

    def prompt(self, visual: bool = True) -> str:
        return (PROMPT if visual else TEXT_PROMPT).format(q=self.question)

    def corrupted(self) -> "Record":
        """The record with its visual constraint replaced (and its textual one, if any)."""
        q = swap_phrase(self.question, self.constraint, self.corruption)
        if self.text_constraint:
            q = swap_phrase(q, self.text_constraint, self.text_corruption)
        return replace(self, question=q)

    def to_json(self, index: int = 0) -> dict:
        """The record in Chapter 6's shared schema (spec 2.2; ``interplab.vqa.check_record``)."""
        def span(phrase):
            start = f" {self.question} ".index(f" {phrase} ")
            return [start, start + len(phrase)]
        out = {"id": f"{self.dataset}-{index}", "dataset": self.dataset, "question": self.question,
               "visual_constraint": self.constraint, "visual_constraint_span": span(self.constraint),
               "answers": list(self.answers), "corruption": self.corruption, "paraphrases": list(self.paraphrases),
               "split": self.split, "text_constraint": self.text_constraint, "text_corruption": self.text_corruption,
               "text_constraint_span": span(self.text_constraint) if self.text_constraint else None,
               "image_spec": {"background": self.scene.background, "objects": [vars(o) for o in self.scene.objects]}}
        return out

    def named(self) -> "Record":
        """The LLM counterpart's question: the constraint replaced by the entity's own name."""
        return replace(self, question=swap_phrase(self.question, self.constraint, self.entity))


def swap_phrase(question: str, old: str, new: str) -> str:
    words, span = question.split(), old.split()
    for i in range(len(words) - len(span) + 1):
        if words[i:i + len(span)] == span:
            return " ".join(words[:i] + new.split() + words[i + len(span):])
    raise ValueError(f"{old!r} is not in {question!r}")


def span_positions(prompt_words: list, phrase: str, start: int = 0) -> list:
    """Token positions of ``phrase`` in a word-tokenized prompt (first match at or after ``start``)."""
    span = phrase.split()
    for i in range(start, len(prompt_words) - len(span) + 1):
        if prompt_words[i:i + len(span)] == span:
            return list(range(i, i + len(span)))
    raise ValueError(f"{phrase!r} is not in {' '.join(prompt_words)!r}")


def _other(rng, values, avoid):
    pool = [v for v in values if v not in avoid]
    return pool[rng.integers(len(pool))]


def landmark_record(w: World, lm: Landmark, relation: str, rng, template: int = 0) -> Record:
    """A ToyKnown question; the corruption is another known landmark whose answer differs."""
    others = [o for o in w.landmarks if o.split != "novel" and getattr(o, relation) != getattr(lm, relation)]
    other = others[rng.integers(len(others))]
    tpls = LANDMARK_TEMPLATES[relation]
    return Record("toy_known", tpls[template].format(e=VISUAL["landmark"]), VISUAL["landmark"], other.name,
                  (getattr(lm, relation),), landmark_scene(lm, rng), lm.name, relation,
                  paraphrases=tuple(t.format(e=VISUAL["landmark"]) for t in tpls[TRAINED_TEMPLATES:]), split=lm.split)


def director_record(w: World, d: Director, rng, year: str = None, template: int = 0) -> Record:
    """A ToyMovies question (multi-constraint with ``year``: the answer is that year's movie)."""
    other = w.directors[_other(rng, range(len(w.directors)), [w.directors.index(d)])]
    if year is None:
        return Record("toy_movies", MOVIE_TEMPLATES[template].format(e=VISUAL["director"]), VISUAL["director"],
                      other.name, tuple(d.movies.values()), director_scene(d, rng), d.name, "movie",
                      paraphrases=tuple(t.format(e=VISUAL["director"]) for t in MOVIE_TEMPLATES[2:]), split=d.split)
    return Record("toy_movies_multi", MOVIE_YEAR_TEMPLATE.format(e=VISUAL["director"], y=year), VISUAL["director"],
                  other.name, (d.movies[year],), director_scene(d, rng), d.name, "movie", text_constraint=year,
                  text_corruption=_other(rng, YEARS, [year]), split=d.split)


def use_record(rng, shape: str = None, template: int = 0) -> Record:
    scene = object_scene(rng, shape=shape)
    shape = scene.objects[0].shape
    other = _other(rng, list(USES), [shape])
    return Record("toy_okvqa", USE_TEMPLATES[template].format(e=VISUAL["object"]), VISUAL["object"], f"the {other}",
                  (USES[shape],), scene, f"the {shape}", "use",
                  paraphrases=tuple(t.format(e=VISUAL["object"]) for t in USE_TEMPLATES[1:]))


def animal_record(rng, background: str = None, template: int = 0) -> Record:
    scene = object_scene(rng, background=background)
    bg = scene.background
    other = _other(rng, BACKGROUNDS, [bg])
    return Record("toy_okvqa", ANIMAL_TEMPLATES[template].format(e=VISUAL["place"]), VISUAL["place"], f"the {other}",
                  (ANIMALS[bg],), scene, f"the {bg}", "animal",
                  paraphrases=tuple(t.format(e=VISUAL["place"]) for t in ANIMAL_TEMPLATES[1:]))


def fruit_record(w: World, rng, background: str = None, country: str = None) -> Record:
    """ToyOKVQA-multi: the fruit of (background, country); the textual corruption changes the fruit."""
    scene = object_scene(rng, background=background)
    bg = scene.background
    country = country or COUNTRIES[rng.integers(len(COUNTRIES))]
    other_bg = _other(rng, [b for b in BACKGROUNDS if w.fruit[b, country] != w.fruit[bg, country]] or BACKGROUNDS, [bg])
    other_c = _other(rng, [c for c in COUNTRIES if w.fruit[bg, c] != w.fruit[bg, country]] or COUNTRIES, [country])
    return Record("toy_okvqa_multi", FRUIT_TEMPLATE.format(e=VISUAL["place"], c=country), VISUAL["place"],
                  f"the {other_bg}", (w.fruit[bg, country],), scene, f"the {bg}", "fruit", text_constraint=country,
                  text_corruption=other_c)


def attribute_record(rng, attribute: str) -> Record:
    """'what colour is the object ?' about a single-object scene (no constraint to corrupt)."""
    scene = object_scene(rng)
    obj = scene.objects[0]
    answer = {"colour": obj.colour, "shape": obj.shape, "background": scene.background}[attribute]
    return Record("toy_attribute", ATTRIBUTE_QUESTIONS[attribute], "", "", (answer,), scene, relation=attribute)


def probe_records(w: World, dataset: str, n: int, seed: int, splits=("head",), template: int = 0) -> list:
    """n probe records of one dataset (toy_known, toy_movies, toy_okvqa, toy_okvqa_multi,
    toy_movies_multi), cycling over its entities so that each appears about equally often."""
    rng = np.random.default_rng([seed, 60])
    out = []
    lms = [lm for lm in w.landmarks if lm.split in splits]
    for i in range(n):
        if dataset == "toy_known":
            # the relation turns with every record and shifts on each pass, so any n mixes all three and
            # no (landmark, relation) repeats before 3 passes
            out.append(landmark_record(w, lms[i % len(lms)], RELATIONS[(i + i // len(lms)) % 3], rng, template))
        elif dataset == "toy_movies":
            out.append(director_record(w, w.directors[i % len(w.directors)], rng, template=template))
        elif dataset == "toy_movies_multi":
            out.append(director_record(w, w.directors[i % len(w.directors)], rng, year=YEARS[(i // 16) % 3]))
        elif dataset == "toy_okvqa":
            out.append(use_record(rng, SHAPES[i % 6]) if i % 2 == 0 else animal_record(rng, BACKGROUNDS[i % 7]))
        elif dataset == "toy_okvqa_multi":
            out.append(fruit_record(w, rng, BACKGROUNDS[i % 7]))
        else:
            raise ValueError(f"unknown dataset {dataset!r}")
    return out
