"""Class metadata of the datasets the official Mask2Former checkpoints were trained on.

Each constant is a tuple of `Category` in the official contiguous order used by detectron2 / Mask2Former,
i.e. position ``k`` in the tuple is class logit ``k`` of a model trained on that dataset (the extra
"no object" logit is not listed). ``id`` is the dataset's own category id (COCO ids 1..200, Cityscapes
label ids, ADE20K SceneParsing ids 0..149), which is not the same as the position in general.

Sources (transcribed, then cross-checked against each other):
- COCO: detectron2 ``builtin_meta.py`` ``COCO_CATEGORIES`` (= panopticapi's ``panoptic_coco_categories.json``).
- Cityscapes: detectron2 ``CITYSCAPES_CATEGORIES`` (train ids 0..18), as cityscapesScripts' ``labels.py``.
- ADE20K: detectron2 ``ADE20K_SEM_SEG_CATEGORIES``; things from Mask2Former's ``register_ade20k_panoptic.py``
  (100 things, 50 stuff: the Instance100 classes of ``ade20k_instance_catid_mapping.txt``); names verbatim,
  trailing space of ``"window "`` included. Mapillary Vistas: Mask2Former's ``register_mapillary_vistas.py``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Category:
    """One class: dataset category id, display name, and whether it is a countable "thing"."""

    id: int
    name: str
    isthing: bool


def names(cats: tuple[Category, ...]) -> tuple[str, ...]:
    """Class names in logit order."""
    return tuple(c.name for c in cats)


def thing_flags(cats: tuple[Category, ...]) -> tuple[bool, ...]:
    """Per-class thing flags in logit order."""
    return tuple(c.isthing for c in cats)


def category_ids(cats: tuple[Category, ...]) -> tuple[int, ...]:
    """Dataset category ids in logit order (contiguous index -> dataset id)."""
    return tuple(c.id for c in cats)


# COCO panoptic (133 classes: 80 things, then 53 stuff). Used by the COCO panoptic and
# COCO semantic (panoptic-derived) Mask2Former models.
COCO_PANOPTIC: tuple[Category, ...] = (
    Category(1, "person", True),
    Category(2, "bicycle", True),
    Category(3, "car", True),
    Category(4, "motorcycle", True),
    Category(5, "airplane", True),
    Category(6, "bus", True),
    Category(7, "train", True),
    Category(8, "truck", True),
    Category(9, "boat", True),
    Category(10, "traffic light", True),
    Category(11, "fire hydrant", True),
    Category(13, "stop sign", True),
    Category(14, "parking meter", True),
    Category(15, "bench", True),
    Category(16, "bird", True),
    Category(17, "cat", True),
    Category(18, "dog", True),
    Category(19, "horse", True),
    Category(20, "sheep", True),
    Category(21, "cow", True),
    Category(22, "elephant", True),
    Category(23, "bear", True),
    Category(24, "zebra", True),
    Category(25, "giraffe", True),
    Category(27, "backpack", True),
    Category(28, "umbrella", True),
    Category(31, "handbag", True),
    Category(32, "tie", True),
    Category(33, "suitcase", True),
    Category(34, "frisbee", True),
    Category(35, "skis", True),
    Category(36, "snowboard", True),
    Category(37, "sports ball", True),
    Category(38, "kite", True),
    Category(39, "baseball bat", True),
    Category(40, "baseball glove", True),
    Category(41, "skateboard", True),
    Category(42, "surfboard", True),
    Category(43, "tennis racket", True),
    Category(44, "bottle", True),
    Category(46, "wine glass", True),
    Category(47, "cup", True),
    Category(48, "fork", True),
    Category(49, "knife", True),
    Category(50, "spoon", True),
    Category(51, "bowl", True),
    Category(52, "banana", True),
    Category(53, "apple", True),
    Category(54, "sandwich", True),
    Category(55, "orange", True),
    Category(56, "broccoli", True),
    Category(57, "carrot", True),
    Category(58, "hot dog", True),
    Category(59, "pizza", True),
    Category(60, "donut", True),
    Category(61, "cake", True),
    Category(62, "chair", True),
    Category(63, "couch", True),
    Category(64, "potted plant", True),
    Category(65, "bed", True),
    Category(67, "dining table", True),
    Category(70, "toilet", True),
    Category(72, "tv", True),
    Category(73, "laptop", True),
    Category(74, "mouse", True),
    Category(75, "remote", True),
    Category(76, "keyboard", True),
    Category(77, "cell phone", True),
    Category(78, "microwave", True),
    Category(79, "oven", True),
    Category(80, "toaster", True),
    Category(81, "sink", True),
    Category(82, "refrigerator", True),
    Category(84, "book", True),
    Category(85, "clock", True),
    Category(86, "vase", True),
    Category(87, "scissors", True),
    Category(88, "teddy bear", True),
    Category(89, "hair drier", True),
    Category(90, "toothbrush", True),
    Category(92, "banner", False),
    Category(93, "blanket", False),
    Category(95, "bridge", False),
    Category(100, "cardboard", False),
    Category(107, "counter", False),
    Category(109, "curtain", False),
    Category(112, "door-stuff", False),
    Category(118, "floor-wood", False),
    Category(119, "flower", False),
    Category(122, "fruit", False),
    Category(125, "gravel", False),
    Category(128, "house", False),
    Category(130, "light", False),
    Category(133, "mirror-stuff", False),
    Category(138, "net", False),
    Category(141, "pillow", False),
    Category(144, "platform", False),
    Category(145, "playingfield", False),
    Category(147, "railroad", False),
    Category(148, "river", False),
    Category(149, "road", False),
    Category(151, "roof", False),
    Category(154, "sand", False),
    Category(155, "sea", False),
    Category(156, "shelf", False),
    Category(159, "snow", False),
    Category(161, "stairs", False),
    Category(166, "tent", False),
    Category(168, "towel", False),
    Category(171, "wall-brick", False),
    Category(175, "wall-stone", False),
    Category(176, "wall-tile", False),
    Category(177, "wall-wood", False),
    Category(178, "water-other", False),
    Category(180, "window-blind", False),
    Category(181, "window-other", False),
    Category(184, "tree-merged", False),
    Category(185, "fence-merged", False),
    Category(186, "ceiling-merged", False),
    Category(187, "sky-other-merged", False),
    Category(188, "cabinet-merged", False),
    Category(189, "table-merged", False),
    Category(190, "floor-other-merged", False),
    Category(191, "pavement-merged", False),
    Category(192, "mountain-merged", False),
    Category(193, "grass-merged", False),
    Category(194, "dirt-merged", False),
    Category(195, "paper-merged", False),
    Category(196, "food-other-merged", False),
    Category(197, "building-other-merged", False),
    Category(198, "rock-merged", False),
    Category(199, "wall-other-merged", False),
    Category(200, "rug-merged", False),
)

# COCO instance segmentation: the 80 thing classes of COCO_PANOPTIC, same order and ids.
COCO_INSTANCE: tuple[Category, ...] = tuple(c for c in COCO_PANOPTIC if c.isthing)

# ADE20K panoptic (150 SceneParsing classes, ids 0..149): 100 things, 50 stuff, as in Mask2Former's
# ADE20K panoptic / instance metadata.
ADE20K_150_PANOPTIC: tuple[Category, ...] = (
    Category(0, "wall", False),
    Category(1, "building", False),
    Category(2, "sky", False),
    Category(3, "floor", False),
    Category(4, "tree", False),
    Category(5, "ceiling", False),
    Category(6, "road, route", False),
    Category(7, "bed", True),
    Category(8, "window ", True),
    Category(9, "grass", False),
    Category(10, "cabinet", True),
    Category(11, "sidewalk, pavement", False),
    Category(12, "person", True),
    Category(13, "earth, ground", False),
    Category(14, "door", True),
    Category(15, "table", True),
    Category(16, "mountain, mount", False),
    Category(17, "plant", False),
    Category(18, "curtain", True),
    Category(19, "chair", True),
    Category(20, "car", True),
    Category(21, "water", False),
    Category(22, "painting, picture", True),
    Category(23, "sofa", True),
    Category(24, "shelf", True),
    Category(25, "house", False),
    Category(26, "sea", False),
    Category(27, "mirror", True),
    Category(28, "rug", False),
    Category(29, "field", False),
    Category(30, "armchair", True),
    Category(31, "seat", True),
    Category(32, "fence", True),
    Category(33, "desk", True),
    Category(34, "rock, stone", False),
    Category(35, "wardrobe, closet, press", True),
    Category(36, "lamp", True),
    Category(37, "tub", True),
    Category(38, "rail", True),
    Category(39, "cushion", True),
    Category(40, "base, pedestal, stand", False),
    Category(41, "box", True),
    Category(42, "column, pillar", True),
    Category(43, "signboard, sign", True),
    Category(44, "chest of drawers, chest, bureau, dresser", True),
    Category(45, "counter", True),
    Category(46, "sand", False),
    Category(47, "sink", True),
    Category(48, "skyscraper", False),
    Category(49, "fireplace", True),
    Category(50, "refrigerator, icebox", True),
    Category(51, "grandstand, covered stand", False),
    Category(52, "path", False),
    Category(53, "stairs", True),
    Category(54, "runway", False),
    Category(55, "case, display case, showcase, vitrine", True),
    Category(56, "pool table, billiard table, snooker table", True),
    Category(57, "pillow", True),
    Category(58, "screen door, screen", True),
    Category(59, "stairway, staircase", False),
    Category(60, "river", False),
    Category(61, "bridge, span", False),
    Category(62, "bookcase", True),
    Category(63, "blind, screen", False),
    Category(64, "coffee table", True),
    Category(65, "toilet, can, commode, crapper, pot, potty, stool, throne", True),
    Category(66, "flower", True),
    Category(67, "book", True),
    Category(68, "hill", False),
    Category(69, "bench", True),
    Category(70, "countertop", True),
    Category(71, "stove", True),
    Category(72, "palm, palm tree", True),
    Category(73, "kitchen island", True),
    Category(74, "computer", True),
    Category(75, "swivel chair", True),
    Category(76, "boat", True),
    Category(77, "bar", False),
    Category(78, "arcade machine", True),
    Category(79, "hovel, hut, hutch, shack, shanty", False),
    Category(80, "bus", True),
    Category(81, "towel", True),
    Category(82, "light", True),
    Category(83, "truck", True),
    Category(84, "tower", False),
    Category(85, "chandelier", True),
    Category(86, "awning, sunshade, sunblind", True),
    Category(87, "street lamp", True),
    Category(88, "booth", True),
    Category(89, "tv", True),
    Category(90, "plane", True),
    Category(91, "dirt track", False),
    Category(92, "clothes", True),
    Category(93, "pole", True),
    Category(94, "land, ground, soil", False),
    Category(95, "bannister, banister, balustrade, balusters, handrail", True),
    Category(96, "escalator, moving staircase, moving stairway", False),
    Category(97, "ottoman, pouf, pouffe, puff, hassock", True),
    Category(98, "bottle", True),
    Category(99, "buffet, counter, sideboard", False),
    Category(100, "poster, posting, placard, notice, bill, card", False),
    Category(101, "stage", False),
    Category(102, "van", True),
    Category(103, "ship", True),
    Category(104, "fountain", True),
    Category(105, "conveyer belt, conveyor belt, conveyer, conveyor, transporter", False),
    Category(106, "canopy", False),
    Category(107, "washer, automatic washer, washing machine", True),
    Category(108, "plaything, toy", True),
    Category(109, "pool", False),
    Category(110, "stool", True),
    Category(111, "barrel, cask", True),
    Category(112, "basket, handbasket", True),
    Category(113, "falls", False),
    Category(114, "tent", False),
    Category(115, "bag", True),
    Category(116, "minibike, motorbike", True),
    Category(117, "cradle", False),
    Category(118, "oven", True),
    Category(119, "ball", True),
    Category(120, "food, solid food", True),
    Category(121, "step, stair", True),
    Category(122, "tank, storage tank", False),
    Category(123, "trade name", True),
    Category(124, "microwave", True),
    Category(125, "pot", True),
    Category(126, "animal", True),
    Category(127, "bicycle", True),
    Category(128, "lake", False),
    Category(129, "dishwasher", True),
    Category(130, "screen", True),
    Category(131, "blanket, cover", False),
    Category(132, "sculpture", True),
    Category(133, "hood, exhaust hood", True),
    Category(134, "sconce", True),
    Category(135, "vase", True),
    Category(136, "traffic light", True),
    Category(137, "tray", True),
    Category(138, "trash can", True),
    Category(139, "fan", True),
    Category(140, "pier", False),
    Category(141, "crt screen", False),
    Category(142, "plate", True),
    Category(143, "monitor", True),
    Category(144, "bulletin board", True),
    Category(145, "shower", False),
    Category(146, "radiator", True),
    Category(147, "glass, drinking glass", True),
    Category(148, "clock", True),
    Category(149, "flag", True),
)

# ADE20K semantic segmentation: same 150 classes and order, all treated as stuff.
ADE20K_150: tuple[Category, ...] = tuple(Category(c.id, c.name, False) for c in ADE20K_150_PANOPTIC)

# ADE20K instance: the 100 things of the 150, in their order, ids 1-100 (the Instance100 classes of
# Mask2Former's ade20k_instance_catid_mapping.txt, position for position; tests/test_categories.py checks it).
ADE20K_100: tuple[Category, ...] = tuple(
    Category(i, c.name, True) for i, c in enumerate((c for c in ADE20K_150_PANOPTIC if c.isthing), start=1)
)

# Cityscapes: the 19 train classes (trainId 0..18) with their Cityscapes label ids; person..bicycle are things.
CITYSCAPES_19: tuple[Category, ...] = (
    Category(7, "road", False),
    Category(8, "sidewalk", False),
    Category(11, "building", False),
    Category(12, "wall", False),
    Category(13, "fence", False),
    Category(17, "pole", False),
    Category(19, "traffic light", False),
    Category(20, "traffic sign", False),
    Category(21, "vegetation", False),
    Category(22, "terrain", False),
    Category(23, "sky", False),
    Category(24, "person", True),
    Category(25, "rider", True),
    Category(26, "car", True),
    Category(27, "truck", True),
    Category(28, "bus", True),
    Category(31, "train", True),
    Category(32, "motorcycle", True),
    Category(33, "bicycle", True),
)
# Cityscapes' instance task: its 8 thing classes, in the order of the 19 (detectron2's Cityscapes instance metadata).
CITYSCAPES_8: tuple[Category, ...] = tuple(c for c in CITYSCAPES_19 if c.isthing)

# Mapillary Vistas v1.2: the 65 evaluated classes (ids 1-65), things as its "instances" flags say.
# fmt: off
_MAPILLARY_NAMES = (
    "Bird", "Ground Animal", "Curb", "Fence", "Guard Rail", "Barrier", "Wall", "Bike Lane", "Crosswalk - Plain",
    "Curb Cut", "Parking", "Pedestrian Area", "Rail Track", "Road", "Service Lane", "Sidewalk", "Bridge",
    "Building", "Tunnel", "Person", "Bicyclist", "Motorcyclist", "Other Rider", "Lane Marking - Crosswalk",
    "Lane Marking - General", "Mountain", "Sand", "Sky", "Snow", "Terrain", "Vegetation", "Water", "Banner",
    "Bench", "Bike Rack", "Billboard", "Catch Basin", "CCTV Camera", "Fire Hydrant", "Junction Box", "Mailbox",
    "Manhole", "Phone Booth", "Pothole", "Street Light", "Pole", "Traffic Sign Frame", "Utility Pole",
    "Traffic Light", "Traffic Sign (Back)", "Traffic Sign (Front)", "Trash Can", "Bicycle", "Boat", "Bus", "Car",
    "Caravan", "Motorcycle", "On Rails", "Other Vehicle", "Trailer", "Truck", "Wheeled Slow", "Car Mount",
    "Ego Vehicle",
)
_MAPILLARY_THINGS = frozenset({
    1, 2, 9, 20, 21, 22, 23, 24, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 45, 46, 47, 48, 49, 50, 51, 52, 53,
    54, 55, 56, 57, 58, 60, 61, 62, 63,
})
# fmt: on
MAPILLARY_65: tuple[Category, ...] = tuple(
    Category(i, name, i in _MAPILLARY_THINGS) for i, name in enumerate(_MAPILLARY_NAMES, start=1)
)
