"""The model zoo: tiny models trained on the toy world, shipped in data/zoo/NAME/ with a card.

    store    checkpoint files, card.json (command, seed, steps, wall time, gates, sha256), verify
    loop     the seeded, resumable training loop and EMA
    oracle   the attribute oracle (the measuring instrument for generated images)
    clip     the tiny CLIP (text tower conditions the text-to-image model)
    t2i      the text-to-image diffusion model (the Stable Diffusion analogue)
    t2i_ft   t2i fine-tuned on a shifted look (the OpenJourney analogue; LoRA merged at load)
    t2i_action  t2i taught to draw an action (a verb sets the object's size) for Chapter 5 part I
    t2i_t5   t2i read through a bidirectional T5 trained with UNet LoRA (the DeepFloyd IF analogue)
    vits     Chapter 7's tiny ViTs on ToyNet: vit (DeiT-toy), vit_ssl (SimCLR), swin (Swin-toy)
    qa_lm    Chapter 8's tiny Llama trained on the extractive-QA world (interplab.qaworld)
    vlm      Chapter 6's tiny LLaVA (zoo CLIP vision tower, Llama LM) on ToyFacts (toyworld.facts)

Train one with ``python -m interplab.zoo train NAME``; load one with ``interplab.models.load(NAME)``.
"""
# zoo name -> the module of this package that trains and loads it (in training order: t2i needs clip)
MODELS = {"oracle": "oracle", "clip": "clip", "t2i": "t2i", "t2i_ft": "t2i_ft", "t2i_action": "t2i_action",
          "t2i_t5": "t2i_t5", "vit": "vits", "vit_ssl": "vits", "swin": "vits", "qa_lm": "qa_lm", "vlm": "vlm"}
# Training budgets: issue 3's models share 240 CPU-minutes (2 hours on 2 cores); the chapter models below
# have their own wall-clock budget in minutes on 2 cores (their issues or specs set it: Chapter 5 part I's spec
# gives its text-to-image models "an overnight CPU run", Part II's spec takes its models from there;
# t2i_action and t2i_t5 take a quarter of an hour of it each).
SHARED_BUDGET = ("oracle", "clip", "t2i", "t2i_ft", "vit", "vit_ssl", "swin")
SHARED_BUDGET_CPU_MIN = 240
OWN_BUDGET_WALL_MIN = {"qa_lm": 30, "vlm": 30, "t2i_action": 15, "t2i_t5": 15}
