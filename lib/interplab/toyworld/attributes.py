"""The attribute tables of the toy world: one vocabulary every chapter draws from.

Chapters use subsets (Chapter 7 and 9 use the first six shapes and colours and three
textures, as their specs say); the renderer and the oracle always know all of them.
"""

SHAPES = ("circle", "square", "triangle", "cross", "star", "diamond", "heart", "ring")
COLOURS = ("red", "green", "blue", "yellow", "purple", "cyan", "orange", "white")
# texture = the stand-in for artistic style; drawn as a darker pattern inside the object
TEXTURES = ("plain", "striped", "dotted", "ribbed", "slanted", "checked", "gridded", "ringed")
SIZES = ("small", "large")
BACKGROUNDS = ("dark", "water", "lake", "grass", "forest", "sand", "snow")
# quadrant slots; an object's slot is its position attribute
SLOTS = ("top left", "top right", "bottom left", "bottom right")

RGB = {
    "red": (0.90, 0.12, 0.12), "green": (0.10, 0.80, 0.20), "blue": (0.15, 0.30, 1.00),
    "yellow": (0.98, 0.92, 0.10), "purple": (0.62, 0.18, 0.85), "cyan": (0.10, 0.90, 0.95),
    "orange": (1.00, 0.55, 0.05), "white": (0.97, 0.97, 0.97),
}
RADIUS = {"small": 4.6, "large": 7.2, "tiny": 3.0}  # tiny: uncaptioned distractors only
SLOT_CENTRES = {"top left": (8.0, 8.0), "top right": (24.0, 8.0), "bottom left": (8.0, 24.0),
                "bottom right": (24.0, 24.0)}  # (x, y) in pixels of a 32 x 32 image
SIZE = 32

# Planted co-occurrence prior (Chapter 7's "natural statistics", the Waterbirds analogue):
# water-family shapes appear on water-family backgrounds, land-family shapes on land.
WATER_SHAPES = ("circle", "diamond", "star")
LAND_SHAPES = ("square", "triangle", "cross")
WATER_BACKGROUNDS = ("water", "lake")
LAND_BACKGROUNDS = ("grass", "forest")
SPURIOUS = 0.7  # P(family background | family shape) in every sampler unless a caller says otherwise
