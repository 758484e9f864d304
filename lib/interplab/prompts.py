"""Prompt sets of the paper profile's text-to-image chapters, built from the dissertation's rules.

    ch5_probes(attribute)     the causal-tracing probe captions of §11.4.1 (Table 11.2), deterministic order
    ch5_validation(probes)    the 10 captions per attribute that calibrate the CLIP-Score threshold
    EDIT_CONCEPTS             DIFF-QUICKFIX's concepts (Concept-Ablation's styles and objects, the fact)
    ordinary_captions(...)    captions naming none of the edited concepts (an editor's preservation rows)

The tiny profile's counterparts come from the toy world (``toyworld.trace_probes``). Evaluation
prompts of the edits are authored here from the concept names (the Concept-Ablation prompt files
are not bundled): ``EVAL_PROMPTS_RECONSTRUCTED`` says so to every caller that reports them.
"""
import numpy as np

from .errors import check_choice
from .toyworld.captions import Probe

COCO = ("person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
        "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
        "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
        "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
        "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
        "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
        "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
        "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
        "hair drier", "toothbrush")
# §11.4.1: 24 objects ("tv" listed twice, so 23 unique), 7 locations
OBJECTS = ("dog", "cat", "bicycle", "oven", "tv", "bowl", "banana", "bottle", "cup", "fork", "knife", "apple",
           "sandwich", "pizza", "bed", "tv", "laptop", "microwave", "book", "clock", "vase", "toothbrush", "donut",
           "handbag")
LOCATIONS = ("beach", "forest", "city", "kitchen", "mountain", "park", "room")
STYLES = ("monet", "pablo picasso", "salvador dali", "van gogh", "baroque", "leonardo da vinci", "michelangelo")
COLORS = ("blue", "red", "yellow", "brown", "black", "pink", "green")
ANIMALS = ("bear", "cat", "deer", "dog", "giraffe", "goat", "horse", "lion", "monkey", "mouse", "ostrich", "sheep",
           "tiger", "wolf")
ACTIONS = ("eating", "running", "sitting", "sprinting")
VIEWPOINTS = ("front", "back", "top", "bottom")
COUNTS = (2, 4, 6, 8)
ATTRIBUTES = ("objects", "style", "color", "action", "viewpoint", "count")


def _article(word: str) -> str:
    return "An" if word[0] in "aeiou" else "A"


def style_captions(style: str) -> list:
    """§11.4.1's style template over the COCO objects: "A <object> in the style of <style>" (80 captions)."""
    return [f"{_article(o)} {o} in the style of {style}" for o in COCO]


def ch5_probes(attribute: str, keep_duplicate_tv: bool = False) -> list:
    """Probe captions of one attribute (§11.4.1) with the subject span that tracing corrupts."""
    check_choice("attribute", attribute, ATTRIBUTES)
    objects = OBJECTS if keep_duplicate_tv else tuple(dict.fromkeys(OBJECTS))
    if attribute == "objects":
        rows = [(f"A photo of {o} in {loc}.", o) for o in objects for loc in LOCATIONS]
    elif attribute == "style":
        by_style = {s: style_captions(s) for s in STYLES}
        rows = [(by_style[s][i], s) for i in range(len(COCO)) for s in STYLES]
    elif attribute == "color":
        rows = [(f"{_article(c)} {c} {o}", c) for o in COCO for c in COLORS]
    elif attribute == "action":
        rows = [(f"{_article(a)} {a} {v}", v) for a in ANIMALS for v in ACTIONS]
    elif attribute == "viewpoint":
        rows = [(f"{_article(o)} {o} from the {v}", v) for o in objects for v in VIEWPOINTS]
    else:
        rows = [(f"A photo of {n} {o}s in a room.", str(n)) for o in objects for n in COUNTS]
    return [Probe(caption, subject, {}, attribute) for caption, subject in rows]


def ch5_validation(probes: list, n: int = 10, seed: int = 0) -> tuple:
    """(validation, rest): the first ``n`` captions under a fixed shuffle calibrate the threshold."""
    order = np.random.default_rng(seed).permutation(len(probes))
    return [probes[i] for i in order[:n]], [probes[i] for i in order[n:]]


# DIFF-QUICKFIX concepts: kind -> [(concept, replacement)] (Concept-Ablation's anchors; the release's fact)
EDIT_CONCEPTS = {
    "style": [("van gogh", "painting"), ("monet", "painting"), ("greg rutkowski", "painting"), ("salvador dali", "painting")],
    "object": [("snoopy", "dog"), ("r2d2", "robot"), ("nemo", "fish"), ("grumpy cat", "cat")],
    "fact": [("the President of the United States", "Joe Biden"), ("the British Monarch", "King Charles")],
}
EVAL_PROMPTS_RECONSTRUCTED = True  # edit_eval_prompts are authored here, not Concept-Ablation's files
EDIT_TEMPLATES = ("{x}", "A photo of {x}", "An image of {x}", "A picture of {x}")  # the release's augmentation
FACT_STALE = {"the President of the United States": "Donald Trump", "the British Monarch": "Queen Elizabeth"}


def edit_eval_prompts(concept: str, kind: str) -> list:
    """Ten evaluation prompts per concept (reconstructed, not Concept-Ablation's files)."""
    check_choice("kind", kind, tuple(EDIT_CONCEPTS))
    if kind == "style":
        subjects = ("a starry night", "a wheat field", "a portrait of a woman", "a harbour at dusk", "a bowl of fruit",
                    "a bridge over a river", "a village street", "sunflowers in a vase", "a mountain landscape",
                    "a cafe at night")
        return [f"{s} in the style of {concept}" for s in subjects]
    if kind == "object":
        scenes = ("on a beach", "in a park", "in a kitchen", "in the snow", "on a table", "in a city street",
                  "in a forest", "on a sofa", "at night", "in the rain")
        return [f"a photo of {concept} {s}" for s in scenes]
    frames = ("a photo of {x}", "a portrait of {x}", "{x} giving a speech", "{x} waving to a crowd",
              "a painting of {x}", "{x} at a press conference", "{x} shaking hands", "a close-up of {x}",
              "{x} in an office", "{x} walking outside")
    return [f.format(x=concept) for f in frames]


def ordinary_captions(n: int, exclude_words, rng, tiny: bool) -> list:
    """n captions that contain none of ``exclude_words``: what an edit should leave alone. tiny: the
    toy world's training mix of captions; paper: COCO objects in the §11.4.1 locations."""
    if tiny:
        from .toyworld import captions
        pool = [e.caption for e in captions.sample_mix(rng, 2 * n)]
    else:
        pool = [f"a photo of {_article(o).lower()} {o} in the {p}" for o in COCO for p in LOCATIONS]
    exclude = set(exclude_words)
    keep = [t for t in pool if t and not exclude & set(t.split())]
    return [keep[i] for i in rng.permutation(len(keep))[:n]]
