"""ARO's word-order test (Yuksekgonul et al. 2023; Chapter 9, §11.8.4): a caption against four
re-orderings of its own words; a model passes an item when it scores the true caption above all four.

    shuffle_nouns_and_adjectives           nouns trade places with nouns, adjectives with adjectives
    shuffle_all_but_nouns_and_adjectives   every other word trades places with the other such words
    shuffle_within_trigrams                the words inside each consecutive trigram are shuffled
    shuffle_trigrams                       the trigrams are shuffled as units

A caption arrives tagged: [(word, tag)] with tag "NOUN", "ADJ" or anything else. The paper profile tags
with spaCy (``compositional.aro_order``), the toy world with its grammar (``toyworld.binding.aro_order``).
A draw that reproduces the caption is drawn again (up to ``tries`` times): the release keeps such
draws, which a scorer can then only tie.
"""
import numpy as np
import torch

PERTURBATIONS = ("shuffle_nouns_and_adjectives", "shuffle_all_but_nouns_and_adjectives",
                 "shuffle_within_trigrams", "shuffle_trigrams")


def _permute_at(words: list, idx: list, rng) -> list:
    out = list(words)
    for i, j in zip(idx, rng.permutation(idx)):
        out[i] = words[j]
    return out


def _trigrams(words: list) -> list:
    return [words[i:i + 3] for i in range(0, len(words), 3)]


def perturb(tagged: list, kind: str, rng) -> str:
    """One re-ordering of a tagged caption [(word, tag)] as a string."""
    words = [w for w, _ in tagged]
    nouns = [i for i, (_, t) in enumerate(tagged) if t == "NOUN"]
    adjectives = [i for i, (_, t) in enumerate(tagged) if t == "ADJ"]
    if kind == "shuffle_nouns_and_adjectives":
        words = _permute_at(_permute_at(words, nouns, rng), adjectives, rng)
    elif kind == "shuffle_all_but_nouns_and_adjectives":
        words = _permute_at(words, [i for i in range(len(words)) if i not in nouns + adjectives], rng)
    elif kind == "shuffle_within_trigrams":
        words = [w for tri in _trigrams(words) for w in rng.permutation(tri)]
    elif kind == "shuffle_trigrams":
        tris = _trigrams(words)
        words = [w for k in rng.permutation(len(tris)) for w in tris[k]]
    else:
        raise ValueError(f"unknown perturbation {kind!r}; choose from {', '.join(PERTURBATIONS)}")
    return " ".join(words)


def options(tagged: list, rng, tries: int = 10) -> list:
    """[true caption, its four re-orderings] for a tagged caption; the true one first."""
    true = " ".join(w for w, _ in tagged)
    out = [true]
    for kind in PERTURBATIONS:
        for _ in range(tries):
            text = perturb(tagged, kind, rng)
            if text != true:
                break
        out.append(text)
    return out


def order_accuracy(scores) -> float:
    """Share of items whose true caption (column 0) scores strictly above every other option.

    scores (N, 5): higher = better match (pass -d for a diffusion score)."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    return float((scores[:, :1] > scores[:, 1:]).all(1).double().mean())


def tagged_by(nouns, adjectives):
    """A tagger for a closed vocabulary: caption -> [(word, tag)], words split on spaces."""
    nouns, adjectives = set(nouns), set(adjectives)
    return lambda caption: [(w, "NOUN" if w in nouns else "ADJ" if w in adjectives else "X") for w in caption.split()]


def word_ends(tokenizer, words) -> list:
    """Each word's last sub-token position when ``tokenizer`` encodes the space-joined words, counted as in the
    encoded sequence (after a BOS where it adds one; it must end every sequence with one EOS: CLIP's BPE, T5's
    SentencePiece, the toy world's word-level tokenizer)."""
    return [len(tokenizer(" ".join(words[:k + 1])).input_ids) - 2 for k in range(len(words))]


def order_items(captions, tagger, seed: int = 0) -> list:
    """Each caption's five options (``options``), seeded per call."""
    rng = np.random.default_rng(seed)
    return [options(tagger(c), rng) for c in captions]
