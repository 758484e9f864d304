"""The toy world: procedural 32 x 32 scenes with planted ground truth (see docs/toyworld.md).

    attributes  the attribute tables (shapes, colours, textures, sizes, slots, backgrounds)
    render      Obj, Scene -> image and exact masks
    entities    artists, mascots, emblems, actions, landmarks: the planted knowledge
    captions    the caption grammar and (scene, caption) samplers
    tokenizer   the offline word-level tokenizer
    datasets    ToyNet and ToyBirds, the labelled image sets of Chapter 7
"""
from .attributes import BACKGROUNDS, COLOURS, SHAPES, SIZES, SLOTS, TEXTURES
from .captions import (COMPOSITION_CATEGORIES, FAMILIES, PRETRAIN_MIX, PROBE_ATTRIBUTES, Example, Palette, Probe,
                       composition_prompts, composition_scenes, phrase, sample, sample_mix, trace_probes, words)
from .datasets import TOYNET_CLASSES, toybirds, toybirds_swapped, toynet
from .entities import ACTION_SIZES, ACTIONS, ARTISTS, EMBLEMS, MASCOTS, STALE_EMBLEMS, landmarks
from .render import Obj, Scene, render, render_batch
from .tokenizer import build_tokenizer, clip_tokenizer, encode

__all__ = ["BACKGROUNDS", "COLOURS", "SHAPES", "SIZES", "SLOTS", "TEXTURES", "FAMILIES", "PRETRAIN_MIX", "Example",
           "Palette", "phrase", "sample", "sample_mix", "words", "ACTION_SIZES", "ACTIONS", "ARTISTS", "EMBLEMS",
           "MASCOTS", "STALE_EMBLEMS", "landmarks", "Obj", "Scene", "render", "render_batch", "build_tokenizer",
           "clip_tokenizer", "encode"]
__all__ += ["TOYNET_CLASSES", "toybirds", "toybirds_swapped", "toynet", "PROBE_ATTRIBUTES", "Probe", "trace_probes"]
__all__ += ["COMPOSITION_CATEGORIES", "composition_prompts", "composition_scenes"]
