"""Synthetic scenes: the procedurally rendered data the small model is trained and judged on.

Implements shared/reference/synthetic-scenes.md: a canvas split into a 3x3 grid, 1-3 filled objects
(colour, shape, size, cell) on one of 4 background colours, and at most one quoted word (Latin A-Z or
two Chinese characters) written in one row. Everything here is a pure function of its arguments and an
explicit `random.Random`, so a seed gives the same scenes, captions, edits and pixels everywhere.

    scene = sample_scene(random.Random(0))
    image = render(scene, 128, 128)          # PIL RGB, exact palette colours, anti-aliased edges
    text = caption(scene)                    # canonical grammar; caption(scene, rng) may paraphrase
    parse_caption(text)                      # -> Scene (zero jitter), for what a prompt asks
    instruction, target = sample_edit(random.Random(1), scene)   # one of EDIT_KINDS
    labels = label_map(scene, 128, 128, cell_px=16)            # (8, 8) LongTensor, ids in LABEL_NAMES

Geometry is kept in canvas fractions: a cell is 1/3 of the width and height, an object's box side is a
fraction of min(width, height) (0.22 small, 0.36 large) and its jitter a fraction of width / height.
On top of the spec, the sampler keeps every object inside the canvas and apart from the other objects and
from the word's band (1% margin, 2% gap), so a scene never has occluded or merged shapes. A large box is
bigger than a cell (0.36 > 1/3), so large objects in corner/edge cells are always jittered inwards, and two
large objects never sit in neighbouring cells.
"""

import functools
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import IterableDataset, get_worker_info

# ----------------------------------------------------------------------------------------------------
# Vocabulary (exact values from the spec)

BACKGROUNDS = {
    "white": (255, 255, 255),
    "light gray": (225, 225, 225),
    "light blue": (205, 225, 245),
    "cream": (250, 240, 210),
}
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 160, 70),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 40),
    "orange": (245, 135, 30),
    "purple": (140, 60, 180),
    "pink": (240, 120, 180),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 0.22, "large": 0.36}  # side of the square box the shape fits in, / min(width, height)
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
ROWS = ("top", "middle", "bottom")
WHERE = {  # canonical "where" phrase of each cell
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
EDIT_KINDS = ("colour", "background", "move", "remove", "add", "word")
WORD_KINDS = ("latin", "unseen", "chinese")  # list word, uppercase string not in the list, Chinese word

MAX_JITTER = 0.04  # of the canvas side
STAR_INNER = 0.45  # inner radius / outer radius
TEXT_CAP_HEIGHT = 0.45  # of the row height; Chinese uses the same font size as Latin
TEXT_MAX_WIDTH = 0.9  # of the canvas width; wider words are scaled down
MARGIN = 0.01  # objects stay this far inside the canvas
GAP = 0.02  # ...and this far from each other
TEXT_BAND = 0.1  # half-height of the band around the word's row centre kept free of objects
SIZE_MULTIPLE = 32

CELL_POS = {cell: (i % 3, i // 3) for i, cell in enumerate(CELLS)}  # (column, row)

# ----------------------------------------------------------------------------------------------------
# Words: 264 uppercase Latin words of 2-5 letters, 70 common two-character Chinese words.

LATIN_WORDS = tuple("""
AT BE BY DO GO HE HI IF IN IS IT ME MY NO OF OK ON OR SO TO UP US WE
ACE ACT ADD AGE AIR ALL ANT ARM ART ASK BAG BAT BED BEE BIG BOX BOY BUS CAB CAN CAP CAR CAT COW CUP
DAY DOG DRY EAR EAT EGG END EYE FAN FAR FIX FLY FOX FUN GAS GEM HAT HEN HOT ICE INK JAM JET JOY KEY
KID LAB LEG LID MAP MIX MUD NET NEW NUT OAK OIL OWL PAN PEN PET PIE PIG POT RED RUN SEA SKY SUN TEA
TOP TOY VAN WAX WEB WIN YES ZIP ZOO
AREA BABY BAKE BALL BAND BANK BELL BIKE BIRD BLUE BOAT BOOK CAKE CALM CAMP CITY COAT CODE COLD COOK
CORN DARK DATA DEER DESK DOOR DUCK EAST EASY FARM FAST FILM FIRE FISH FLAG FOOD FROG GAME GIFT GOAL
GOLD GOOD HAND HILL HOME HOPE IDEA JAZZ KING KITE LAKE LAMP LEAF LION LOVE MILK MOON NEST NOTE OPEN
PARK PINK PLAY RAIN ROAD ROCK ROOF ROSE SAFE SALE SAND SHIP SHOP SNOW SOFA SOUP STAR SWIM TAXI TIME
TREE WAVE WIND WOLF WOOD YARD ZERO ZONE
APPLE BEACH BERRY BREAD BRICK CANDY CHAIR CLOCK CLOUD CROWN DANCE DREAM EAGLE EARTH FIELD FRUIT GHOST
GLASS GRAPE GREEN HAPPY HEART HORSE HOUSE JUICE LEMON LIGHT MAGIC MANGO MAPLE MONEY MOUSE MUSIC NIGHT
OCEAN OLIVE PAPER PARTY PEACE PEARL PIANO PIZZA PLANE PLANT QUEEN QUIET RADIO RIVER ROBOT SALAD SHEEP
SHELL SMILE SNAKE SPACE SPOON STONE STORM SUGAR TABLE TIGER TOAST TOWER TRAIN TRUCK WATER WHALE WORLD
ZEBRA
""".split())

CHINESE_WORDS = tuple("""
中国 北京 上海 天气 太阳 月亮 星星 花园 学校 老师 学生 朋友 家庭 工作 时间 今天 明天 音乐 电影 图书
咖啡 米饭 面包 水果 苹果 西瓜 大海 山水 森林 春天 夏天 秋天 冬天 东方 南方 西方 北方 快乐 幸福 和平
自由 希望 梦想 生活 世界 城市 公园 医院 银行 商店 电话 手机 电脑 汽车 火车 飞机 小猫 小狗 熊猫 老虎
欢迎 你好 谢谢 再见 早安 晚安 出口 入口 开心 美丽
""".split())

_LATIN_SET = frozenset(LATIN_WORDS)
_LATIN_RE = re.compile(r"[A-Z]{2,5}")
_CHINESE_RE = re.compile(r"[\u4e00-\u9fff]{2}")

FONT_PATH = Path(__file__).resolve().parent.parent / "assets" / "NotoSansCJKsc-Bold-subset.otf"

# ----------------------------------------------------------------------------------------------------
# Region labels for the tokenizer's semantic supervision (label_map):
#   0..3    background colour, in BACKGROUNDS order
#   4..35   object: 4 + 4 * colour index (COLOURS order) + shape index (SHAPES order)
#   36      text (any colour, either script)

NUM_BACKGROUND_LABELS = len(BACKGROUNDS)
TEXT_LABEL = NUM_BACKGROUND_LABELS + len(COLOURS) * len(SHAPES)
NUM_LABELS = TEXT_LABEL + 1
LABEL_NAMES = (
    tuple(f"background {bg}" for bg in BACKGROUNDS)
    + tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)
    + ("text",)
)


def object_label(colour: str, shape: str) -> int:
    return NUM_BACKGROUND_LABELS + list(COLOURS).index(colour) * len(SHAPES) + SHAPES.index(shape)


# ----------------------------------------------------------------------------------------------------
# Scene description


def _check_choice(name: str, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(map(repr, choices))}")


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str
    cell: str
    jitter: tuple[float, float] = (0.0, 0.0)  # (dx, dy) as fractions of the canvas width / height

    def __post_init__(self):
        _check_choice("colour", self.colour, tuple(COLOURS))
        _check_choice("shape", self.shape, SHAPES)
        _check_choice("size", self.size, tuple(SIZES))
        _check_choice("cell", self.cell, CELLS)
        dx, dy = self.jitter
        object.__setattr__(self, "jitter", (float(dx), float(dy)))
        if max(abs(dx), abs(dy)) > MAX_JITTER + 1e-9:
            raise ValueError(f"jitter {self.jitter} exceeds {MAX_JITTER} of the canvas side")

    @property
    def row(self) -> str:
        return ROWS[CELL_POS[self.cell][1]]


@dataclass(frozen=True)
class Word:
    text: str
    colour: str = "black"
    row: str = "middle"

    def __post_init__(self):
        _check_choice("word colour", self.colour, tuple(COLOURS))
        _check_choice("row", self.row, ROWS)
        if not (_LATIN_RE.fullmatch(self.text) or _CHINESE_RE.fullmatch(self.text)):
            raise ValueError(
                f"word {self.text!r} must be 2-5 uppercase letters A-Z or 2 Chinese characters"
            )

    @property
    def script(self) -> str:
        """'latin' or 'chinese'."""
        return "latin" if _LATIN_RE.fullmatch(self.text) else "chinese"


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]
    word: Word | None = None

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(self.objects))
        _check_choice("background", self.background, tuple(BACKGROUNDS))
        if not 1 <= len(self.objects) <= 3:
            raise ValueError(f"a scene has 1 to 3 objects, got {len(self.objects)}")
        if len({o.cell for o in self.objects}) != len(self.objects):
            raise ValueError("objects must sit in distinct cells")
        if len({(o.colour, o.shape) for o in self.objects}) != len(self.objects):
            raise ValueError("objects must have distinct (colour, shape) pairs")
        if self.word is not None and any(o.row == self.word.row for o in self.objects):
            raise ValueError(f"no object may sit in the word's row ({self.word.row!r})")

    def find(self, colour: str, shape: str) -> SceneObject | None:
        return next((o for o in self.objects if (o.colour, o.shape) == (colour, shape)), None)


def word_kind(text: str) -> str:
    """Which evaluation split a word falls in: 'latin' (in LATIN_WORDS), 'unseen' or 'chinese'."""
    if _CHINESE_RE.fullmatch(text):
        return "chinese"
    return "latin" if text in _LATIN_SET else "unseen"


# ----------------------------------------------------------------------------------------------------
# Geometry in canvas fractions (square canvas: the tightest case, so a layout valid there is valid on any
# width/height multiple of 32)


def _shape_extent(shape: str) -> tuple[float, float, float, float]:
    """(x_lo, x_hi, y_lo, y_hi) of a shape around its box centre, in units of the box side."""
    if shape == "triangle":
        h = 3**0.5 / 2
        return (-0.5, 0.5, -h / 2, h / 2)
    if shape == "star":
        sin72 = np.sin(np.radians(72))
        return (-0.5 * sin72, 0.5 * sin72, -0.5, 0.5 * np.cos(np.radians(36)))
    return (-0.5, 0.5, -0.5, 0.5)


def _cell_centre(cell: str) -> tuple[float, float]:
    col, row = CELL_POS[cell]
    return (col + 0.5) / 3, (row + 0.5) / 3


def _object_box(obj: SceneObject) -> tuple[float, float, float, float]:
    cx, cy = _cell_centre(obj.cell)
    b = SIZES[obj.size]
    x_lo, x_hi, y_lo, y_hi = _shape_extent(obj.shape)
    cx, cy = cx + obj.jitter[0], cy + obj.jitter[1]
    return (cx + b * x_lo, cx + b * x_hi, cy + b * y_lo, cy + b * y_hi)


def _text_box(word: Word) -> tuple[float, float, float, float]:
    cy = (ROWS.index(word.row) + 0.5) / 3
    return (0.0, 1.0, cy - TEXT_BAND, cy + TEXT_BAND)


def _apart(a, b, gap: float) -> bool:
    return a[1] + gap <= b[0] or b[1] + gap <= a[0] or a[3] + gap <= b[2] or b[3] + gap <= a[2]


def _jitter_range(obj: SceneObject) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """Per-axis jitter interval that keeps the object inside the canvas, or None if there is none."""
    cx, cy = _cell_centre(obj.cell)
    b = SIZES[obj.size]
    x_lo, x_hi, y_lo, y_hi = _shape_extent(obj.shape)
    rx = (max(-MAX_JITTER, MARGIN - cx - b * x_lo), min(MAX_JITTER, 1 - MARGIN - cx - b * x_hi))
    ry = (max(-MAX_JITTER, MARGIN - cy - b * y_lo), min(MAX_JITTER, 1 - MARGIN - cy - b * y_hi))
    if rx[0] > rx[1] or ry[0] > ry[1]:
        return None
    return rx, ry


def _fits(obj: SceneObject, others, word: Word | None) -> bool:
    box = _object_box(obj)
    if word is not None and not _apart(box, _text_box(word), GAP / 2):
        return False
    return all(_apart(box, _object_box(o), GAP) for o in others)


def _place(rng: random.Random | None, obj: SceneObject, others, word: Word | None, tries: int = 64):
    """`obj` with a jitter that keeps it inside the canvas and apart from `others` and the word, or None.

    With rng=None the jitter closest to zero is tried first (deterministic placement)."""
    ranges = _jitter_range(obj)
    if ranges is None:
        return None
    (x0, x1), (y0, y1) = ranges
    if rng is None:
        candidate = replace(obj, jitter=(min(max(0.0, x0), x1), min(max(0.0, y0), y1)))
        if _fits(candidate, others, word):
            return candidate
        rng = random.Random(0)
    for _ in range(tries):
        candidate = replace(obj, jitter=(rng.uniform(x0, x1), rng.uniform(y0, y1)))
        if _fits(candidate, others, word):
            return candidate
    return None


def place_scene(scene: Scene, rng: random.Random | None = None) -> Scene:
    """The same scene with fresh jitter for every object (e.g. for a scene from parse_caption).

    Raises ValueError when no valid layout is found (e.g. two large objects in neighbouring cells)."""
    fallback = rng or random.Random(0)
    for attempt in range(200):  # greedy, object by object; start over when an early choice blocks a later one
        placed = []
        for obj in scene.objects:
            new = _place(rng if attempt == 0 else fallback, obj, placed, scene.word, tries=16)
            if new is None:
                break
            placed.append(new)
        else:
            return replace(scene, objects=tuple(placed))
    raise ValueError(f"no room for {caption(scene)!r}")


# ----------------------------------------------------------------------------------------------------
# Sampling


def _as_rng(rng) -> random.Random:
    return rng if isinstance(rng, random.Random) else random.Random(rng)


def sample_word(rng: random.Random, kind: str = "latin", exclude: str | None = None) -> str:
    """A word of the given kind: 'latin' (from LATIN_WORDS), 'unseen' (random A-Z string not in the list)
    or 'chinese' (from CHINESE_WORDS)."""
    _check_choice("word kind", kind, WORD_KINDS)
    while True:
        if kind == "latin":
            text = rng.choice(LATIN_WORDS)
        elif kind == "chinese":
            text = rng.choice(CHINESE_WORDS)
        else:
            text = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(rng.randint(2, 5)))
            if text in _LATIN_SET:
                continue
        if text != exclude:
            return text


def sample_scene(
    rng,
    n_objects: int | None = None,
    word: str | None = "random",
    word_p: float = 0.4,
    chinese_p: float = 0.3,
    unseen_p: float = 0.0,
    black_word_p: float = 0.6,
) -> Scene:
    """A random scene.

    n_objects: 1, 2, 3 or None (uniform). word: 'random' (a word with probability word_p; Chinese with
    probability chinese_p, else an unseen uppercase string with probability unseen_p, else a list word),
    None (no word) or one of WORD_KINDS. The word is black with probability black_word_p."""
    rng = _as_rng(rng)
    if n_objects is not None and n_objects not in (1, 2, 3):
        raise ValueError(f"n_objects must be 1, 2, 3 or None, got {n_objects!r}")
    if word is not None and word != "random":
        _check_choice("word", word, ("random", None) + WORD_KINDS)
    for _ in range(1000):
        n = n_objects or rng.randint(1, 3)
        kind = word
        if word == "random":
            kind = None
            if rng.random() < word_p:
                r = rng.random()
                kind = "chinese" if r < chinese_p else "unseen" if r < chinese_p + unseen_p else "latin"
        w = None
        if kind is not None:
            colour = "black" if rng.random() < black_word_p else rng.choice(list(COLOURS))
            w = Word(sample_word(rng, kind), colour, rng.choice(ROWS))
        cells = [c for c in CELLS if w is None or ROWS[CELL_POS[c][1]] != w.row]
        pairs = rng.sample([(c, s) for c in COLOURS for s in SHAPES], n)
        placed = []
        for cell, (colour, shape) in zip(rng.sample(cells, n), pairs):
            obj = _place(rng, SceneObject(colour, shape, rng.choice(list(SIZES)), cell), placed, w)
            if obj is None:
                break
            placed.append(obj)
        if len(placed) == n:
            return Scene(rng.choice(list(BACKGROUNDS)), tuple(placed), w)
    raise RuntimeError("could not sample a scene")  # unreachable in practice


# ----------------------------------------------------------------------------------------------------
# Rendering


def check_size(width: int, height: int):
    """Raise ValueError unless width and height are positive multiples of 32, naming the nearest valid."""
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, (int, np.integer)) or v < SIZE_MULTIPLE or v % SIZE_MULTIPLE:
            try:
                lo = max(SIZE_MULTIPLE, int(v) // SIZE_MULTIPLE * SIZE_MULTIPLE)
                nearest = f"{lo} or {lo + SIZE_MULTIPLE}" if lo < v else f"{lo}"
            except (TypeError, ValueError):
                nearest = "128"
            raise ValueError(f"{name} must be a positive multiple of {SIZE_MULTIPLE}, got {v!r}; nearest valid: {nearest}")


@functools.lru_cache(maxsize=64)
def load_font(size: int) -> ImageFont.FreeTypeFont:
    """The vendored font (Noto Sans CJK SC Bold subset: ASCII + the CHINESE_WORDS characters) at `size` px."""
    return ImageFont.truetype(str(FONT_PATH), size)


@functools.lru_cache(maxsize=1)
def _font_info() -> tuple[float, frozenset]:
    """(cap height / font size, set of covered characters) of the vendored font."""
    font = load_font(1000)
    _, top, _, bottom = font.getbbox("H", anchor="ls")
    covered = frozenset(chr(i) for i in range(0x20, 0x7F)) | frozenset("".join(CHINESE_WORDS))
    return (bottom - top) / 1000, covered


def _polygon(shape: str, cx: float, cy: float, b: float) -> list[tuple[float, float]]:
    """Vertices of a shape of box side b centred at (cx, cy), in pixels (y down)."""
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 192, endpoint=False)
        return list(zip(cx + b / 2 * np.cos(t), cy + b / 2 * np.sin(t)))
    if shape == "square":
        return [(cx - b / 2, cy - b / 2), (cx + b / 2, cy - b / 2), (cx + b / 2, cy + b / 2), (cx - b / 2, cy + b / 2)]
    if shape == "triangle":
        h = b * 3**0.5 / 2
        return [(cx, cy - h / 2), (cx + b / 2, cy + h / 2), (cx - b / 2, cy + h / 2)]
    # star: five points, one up; inner radius STAR_INNER of the outer
    angles = np.radians(-90 + 36 * np.arange(10))
    radii = np.where(np.arange(10) % 2 == 0, b / 2, b / 2 * STAR_INNER)
    return list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles)))


def _object_pixels(obj: SceneObject, width: int, height: int) -> tuple[float, float, float]:
    """(cx, cy, box side) in pixels; the centre is clamped so the shape stays inside the canvas."""
    b = SIZES[obj.size] * min(width, height)
    cx0, cy0 = _cell_centre(obj.cell)
    cx, cy = (cx0 + obj.jitter[0]) * width, (cy0 + obj.jitter[1]) * height
    x_lo, x_hi, y_lo, y_hi = _shape_extent(obj.shape)
    cx = min(max(cx, MARGIN * width - b * x_lo), width * (1 - MARGIN) - b * x_hi)
    cy = min(max(cy, MARGIN * height - b * y_lo), height * (1 - MARGIN) - b * y_hi)
    return cx, cy, b


def _text_layout(word: Word, width: int, height: int, ss: int):
    """(font, (x, y) of the text origin) in supersampled pixels, ink centred on the row centre."""
    cap_ratio, covered = _font_info()
    missing = [ch for ch in word.text if ch not in covered]
    if missing:
        raise ValueError(f"characters {''.join(missing)!r} are not in the vendored font (see glmimage/assets/README.md)")
    size = max(1, round(TEXT_CAP_HEIGHT * height / 3 / cap_ratio * ss))
    font = load_font(size)
    left, top, right, bottom = font.getbbox(word.text)
    if right - left > TEXT_MAX_WIDTH * width * ss:
        size = max(1, int(size * TEXT_MAX_WIDTH * width * ss / (right - left)))
        font = load_font(size)
        left, top, right, bottom = font.getbbox(word.text)
    row_centre = (ROWS.index(word.row) + 0.5) / 3 * height * ss
    return font, (width * ss / 2 - (left + right) / 2, row_centre - (top + bottom) / 2)


def _masks(scene: Scene, width: int, height: int, ss: int = 4):
    """[(label id, rgb, alpha (H, W) float32)] for every object and the word, anti-aliased by drawing at
    ss x resolution and box-averaging down (interior alpha is exactly 1)."""
    out = []
    for obj in scene.objects:
        im = Image.new("L", (width * ss, height * ss), 0)
        cx, cy, b = _object_pixels(obj, width, height)
        ImageDraw.Draw(im).polygon([(x * ss, y * ss) for x, y in _polygon(obj.shape, cx, cy, b)], fill=255)
        alpha = np.asarray(im.reduce(ss), dtype=np.float32) / 255
        out.append((object_label(obj.colour, obj.shape), COLOURS[obj.colour], alpha))
    if scene.word is not None:
        im = Image.new("L", (width * ss, height * ss), 0)
        font, xy = _text_layout(scene.word, width, height, ss)
        ImageDraw.Draw(im).text(xy, scene.word.text, fill=255, font=font)
        alpha = np.asarray(im.reduce(ss), dtype=np.float32) / 255
        out.append((TEXT_LABEL, COLOURS[scene.word.colour], alpha))
    return out


def render(scene: Scene, width: int = 128, height: int = 128, supersample: int = 4) -> Image.Image:
    """The scene as an RGB PIL image; width and height must be multiples of 32."""
    check_size(width, height)
    canvas = np.empty((height, width, 3), dtype=np.float32)
    canvas[:] = BACKGROUNDS[scene.background]
    for _, rgb, alpha in _masks(scene, width, height, supersample):
        canvas += (np.asarray(rgb, dtype=np.float32) - canvas) * alpha[..., None]
    return Image.fromarray(np.rint(canvas).astype(np.uint8), "RGB")


def label_map(scene: Scene, width: int, height: int, cell_px: int, min_cover: float = 0.25) -> torch.Tensor:
    """(height // cell_px, width // cell_px) LongTensor of region labels (ids: LABEL_NAMES).

    A grid cell takes the object or text label covering the largest part of it when that part is at least
    min_cover of the cell, else the background's label."""
    check_size(width, height)
    if cell_px < 1 or width % cell_px or height % cell_px:
        raise ValueError(f"cell_px must divide width {width} and height {height}, got {cell_px}")
    h, w = height // cell_px, width // cell_px
    labels = np.full((h, w), list(BACKGROUNDS).index(scene.background), dtype=np.int64)
    best = np.full((h, w), min_cover, dtype=np.float32)
    for label, _, alpha in _masks(scene, width, height):
        cover = alpha.reshape(h, cell_px, w, cell_px).mean(axis=(1, 3))
        take = cover >= best
        labels[take], best[take] = label, cover[take]
    return torch.from_numpy(labels)


# ----------------------------------------------------------------------------------------------------
# Captions


def describe_object(obj: SceneObject) -> str:
    return f"a {obj.size} {obj.colour} {obj.shape} {WHERE[obj.cell]}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene, rng: random.Random | None = None, paraphrase_p: float = 0.5) -> str:
    """The canonical caption, or with an rng a paraphrase (with probability paraphrase_p) that keeps
    every fact of the scene."""
    if rng is None or rng.random() >= paraphrase_p:
        text = _join([describe_object(o) for o in scene.objects])
        if scene.word is not None:
            w = scene.word
            colour = "" if w.colour == "black" else f" in {w.colour}"
            text += f", with the word '{w.text}' written{colour} at the {w.row}"
        return text + f", on a {scene.background} background."
    return _paraphrase(scene, rng)


_WHERE_ALT = {
    "top left": ("at the top left", "in the top left corner", "in the upper left", "at the top-left"),
    "top": ("at the top", "at the top center", "in the upper middle", "along the top"),
    "top right": ("at the top right", "in the top right corner", "in the upper right", "at the top-right"),
    "left": ("on the left", "at the left", "in the middle left", "on the left side"),
    "center": ("in the center", "in the middle", "at the centre", "in the centre"),
    "right": ("on the right", "at the right", "in the middle right", "on the right side"),
    "bottom left": ("at the bottom left", "in the bottom left corner", "in the lower left", "at the bottom-left"),
    "bottom": ("at the bottom", "at the bottom center", "in the lower middle", "along the bottom"),
    "bottom right": ("at the bottom right", "in the bottom right corner", "in the lower right", "at the bottom-right"),
}
_QUOTES = (("'", "'"), ('"', '"'), ("\u201c", "\u201d"), ("\u300c", "\u300d"))


def _paraphrase(scene: Scene, rng: random.Random) -> str:
    objects = list(scene.objects)
    rng.shuffle(objects)
    phrases = []
    for o in objects:
        where = rng.choice(_WHERE_ALT[o.cell])
        forms = [f"a {o.size} {o.colour} {o.shape} {where}", f"one {o.size} {o.colour} {o.shape} {where}",
                 f"a {o.colour} {o.shape} ({o.size}) {where}"]
        if len(objects) == 1:
            forms.append(f"{where}, a {o.size} {o.colour} {o.shape}")
        phrases.append(rng.choice(forms))
    text = _join(phrases)
    if scene.word is not None:
        w = scene.word
        q0, q1 = rng.choice(_QUOTES)
        colour = f" in {w.colour}" if w.colour != "black" or rng.random() < 0.3 else ""
        row = w.row
        text += rng.choice((
            f", with the word {q0}{w.text}{q1} written{colour} at the {row}",
            f", and the text {q0}{w.text}{q1}{colour} across the {row} row",
            f", plus the word {q0}{w.text}{q1}{colour} in the {row} row",
        ))
    bg = scene.background
    form = rng.randrange(3)
    if form == 0:
        return f"{text}, on a {bg} background."
    if form == 1:
        return f"{text}, against a plain {bg} background"
    return f"a {bg} background with {text}."


def _alts(names) -> str:
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


_OBJ = rf"a ({_alts(SIZES)}) ({_alts(COLOURS)}) ({_alts(SHAPES)}) ({_alts(WHERE.values())})"
_OBJECTS_RE = re.compile(rf"({_OBJ})(?:, ({_OBJ}) and ({_OBJ})| and ({_OBJ}))?")
_QUOTE_OPEN = "'\"\u201c\u300c"
_QUOTE_PAIRS = {"'": "'", '"': '"', "\u201c": "\u201d", "\u300c": "\u300d"}
_CAPTION_RE = re.compile(
    rf"(?P<objects>.+?)"
    rf"(?:, with the word (?P<q0>[{_QUOTE_OPEN}])(?P<word>[^'\"\u201d\u300d]+)(?P<q1>['\"\u201d\u300d]) written"
    rf"(?: in (?P<wcolour>{_alts(COLOURS)}))? at the (?P<row>{_alts(ROWS)}))?"
    rf", on an? (?P<bg>{_alts(BACKGROUNDS)}) background\.?"
)
_CELL_OF_WHERE = {v: k for k, v in WHERE.items()}


def _parse_object(text: str) -> SceneObject:
    m = re.fullmatch(_OBJ, text)
    size, colour, shape, where = m.groups()
    return SceneObject(colour, shape, size, _CELL_OF_WHERE[where])


def _match_quotes(q0: str, q1: str, text: str):
    if _QUOTE_PAIRS[q0] != q1:
        raise ValueError(f"mismatched quotes {q0}...{q1} in {text!r}")


def parse_caption(text: str) -> Scene:
    """The scene a canonical caption asks for (zero jitter; place_scene gives it a layout).

    Raises ValueError if the caption is not in the canonical grammar or describes an invalid scene."""
    clean = " ".join(text.strip().split())
    m = _CAPTION_RE.fullmatch(clean)
    if m is None:
        raise ValueError(f"not a canonical scene caption: {text!r}")
    om = _OBJECTS_RE.fullmatch(m["objects"])
    if om is None:
        raise ValueError(f"cannot parse the objects of {text!r}")
    parts = [g for g in (om.group(1), om.group(6), om.group(11), om.group(16)) if g]
    objects = tuple(_parse_object(p) for p in parts)
    word = None
    if m["word"] is not None:
        _match_quotes(m["q0"], m["q1"], text)
        word = Word(m["word"], m["wcolour"] or "black", m["row"])
    return Scene(m["bg"], objects, word)


# ----------------------------------------------------------------------------------------------------
# Edits


def edit_instruction(kind: str, **args) -> str:
    """Canonical instruction text of an edit (see EDIT_KINDS)."""
    _check_choice("edit kind", kind, EDIT_KINDS)
    if kind == "colour":
        return f"make the {args['colour']} {args['shape']} {args['new_colour']}"
    if kind == "background":
        return f"change the background to {args['background']}"
    if kind == "move":
        return f"move the {args['colour']} {args['shape']} to the {args['cell']}"
    if kind == "remove":
        return f"remove the {args['colour']} {args['shape']}"
    if kind == "add":
        return f"add a {args['size']} {args['colour']} {args['shape']} {WHERE[args['cell']]}"
    return f"change the word to '{args['text']}'"


_CS = rf"({_alts(COLOURS)}) ({_alts(SHAPES)})"
_EDIT_RES = {
    "colour": re.compile(rf"make the {_CS} ({_alts(COLOURS)})"),
    "background": re.compile(rf"change the background to ({_alts(BACKGROUNDS)})"),
    "move": re.compile(rf"move the {_CS} to the ({_alts(CELLS)})"),
    "remove": re.compile(rf"remove the {_CS}"),
    "add": re.compile(rf"add a ({_alts(SIZES)}) {_CS} ({_alts(WHERE.values())})"),
    "word": re.compile(rf"change the word to ([{_QUOTE_OPEN}])([^'\"\u201d\u300d]+)(['\"\u201d\u300d])"),
}


def parse_edit(instruction: str) -> tuple[str, dict]:
    """(kind, arguments) of a canonical edit instruction; ValueError if it is not one."""
    clean = " ".join(instruction.strip().split()).rstrip(".")
    for kind, pattern in _EDIT_RES.items():
        m = pattern.fullmatch(clean)
        if m is None:
            continue
        g = m.groups()
        if kind == "colour":
            return kind, {"colour": g[0], "shape": g[1], "new_colour": g[2]}
        if kind == "background":
            return kind, {"background": g[0]}
        if kind == "move":
            return kind, {"colour": g[0], "shape": g[1], "cell": g[2]}
        if kind == "remove":
            return kind, {"colour": g[0], "shape": g[1]}
        if kind == "add":
            return kind, {"size": g[0], "colour": g[1], "shape": g[2], "cell": _CELL_OF_WHERE[g[3]]}
        _match_quotes(g[0], g[2], instruction)
        return kind, {"text": g[1]}
    raise ValueError(f"not a canonical edit instruction: {instruction!r}; kinds: {', '.join(EDIT_KINDS)}")


def _target(scene: Scene, colour: str, shape: str) -> SceneObject:
    obj = scene.find(colour, shape)
    if obj is None:
        raise ValueError(f"the scene has no {colour} {shape}")
    return obj


def apply_edit(scene: Scene, instruction: str, rng: random.Random | None = None) -> Scene:
    """The scene after a canonical edit instruction; only what it names changes. A moved or added object
    gets a jitter from rng (None: the smallest that fits). ValueError if the edit does not apply."""
    kind, a = parse_edit(instruction)
    objects = list(scene.objects)
    if kind == "background":
        return replace(scene, background=a["background"])
    if kind == "word":
        if scene.word is None:
            raise ValueError("the scene has no word to change")
        return replace(scene, word=replace(scene.word, text=a["text"]))
    if kind == "add":
        new = SceneObject(a["colour"], a["shape"], a["size"], a["cell"])
        placed = _place(rng, new, objects, scene.word)
        if placed is None:
            raise ValueError(f"no room to {instruction!r}")
        return replace(scene, objects=tuple(objects + [placed]))
    obj = _target(scene, a["colour"], a["shape"])
    i = objects.index(obj)
    if kind == "colour":
        objects[i] = replace(obj, colour=a["new_colour"])
    elif kind == "remove":
        del objects[i]
    else:  # move
        others = objects[:i] + objects[i + 1:]
        placed = _place(rng, replace(obj, cell=a["cell"], jitter=(0.0, 0.0)), others, scene.word)
        if placed is None:
            raise ValueError(f"no room to {instruction!r}")
        objects[i] = placed
    return replace(scene, objects=tuple(objects))


def _free_cells(scene: Scene) -> list[str]:
    used = {o.cell for o in scene.objects}
    return [c for c in CELLS if c not in used and (scene.word is None or ROWS[CELL_POS[c][1]] != scene.word.row)]


def edit_kinds_for(scene: Scene) -> list[str]:
    """The edit kinds that can apply to a scene (move/add also need room, checked when sampling)."""
    kinds = ["colour", "background"]
    if _free_cells(scene):
        kinds.append("move")
    if len(scene.objects) >= 2:
        kinds.append("remove")
    if len(scene.objects) <= 2 and _free_cells(scene):
        kinds.append("add")
    if scene.word is not None:
        kinds.append("word")
    return kinds


def sample_edit(rng, scene: Scene, kind: str | None = None) -> tuple[str, Scene]:
    """(canonical instruction, target scene) for a random edit of `scene` (of `kind` if given).

    Raises ValueError if the requested kind cannot apply to this scene."""
    rng = _as_rng(rng)
    if kind is not None:
        _check_choice("edit kind", kind, EDIT_KINDS)
    kinds = edit_kinds_for(scene) if kind is None else [kind]
    rng.shuffle(kinds)
    for k in kinds:
        for instruction in _edit_candidates(rng, scene, k):
            try:
                return instruction, apply_edit(scene, instruction, rng)
            except ValueError:
                continue
    raise ValueError(f"edit kind {kind!r} cannot apply to this scene; possible: {edit_kinds_for(scene)}")


def _edit_candidates(rng: random.Random, scene: Scene, kind: str):
    """Instructions of one kind to try, in random order."""
    objects = list(scene.objects)
    rng.shuffle(objects)
    pairs = {(o.colour, o.shape) for o in scene.objects}
    if kind == "background":
        yield edit_instruction(kind, background=rng.choice([b for b in BACKGROUNDS if b != scene.background]))
    elif kind == "word":
        if scene.word is not None:
            new_kind = "chinese" if rng.random() < 0.3 else "latin"
            yield edit_instruction(kind, text=sample_word(rng, new_kind, exclude=scene.word.text))
    elif kind == "colour":
        for o in objects:
            new = [c for c in COLOURS if c != o.colour and (c, o.shape) not in pairs]
            if new:
                yield edit_instruction(kind, colour=o.colour, shape=o.shape, new_colour=rng.choice(new))
    elif kind == "remove":
        if len(objects) >= 2:
            yield edit_instruction(kind, colour=objects[0].colour, shape=objects[0].shape)
    elif kind == "move":
        cells = _free_cells(scene)
        rng.shuffle(cells)
        for o in objects:
            for cell in cells:
                yield edit_instruction(kind, colour=o.colour, shape=o.shape, cell=cell)
    elif kind == "add" and len(objects) <= 2:
        cells = _free_cells(scene)
        rng.shuffle(cells)
        free = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in pairs]
        size = rng.choice(list(SIZES))
        colour, shape = rng.choice(free)
        for s in (size, "small"):
            for cell in cells:
                yield edit_instruction(kind, size=s, colour=colour, shape=shape, cell=cell)


def sample_edit_scene(rng, kind: str, **scene_kwargs) -> Scene:
    """A random scene that the given edit kind can apply to (e.g. with a word for 'word')."""
    rng = _as_rng(rng)
    _check_choice("edit kind", kind, EDIT_KINDS)
    if kind == "word":
        scene_kwargs["word"] = "chinese" if rng.random() < scene_kwargs.pop("chinese_p", 0.3) else "latin"
    if kind == "remove":
        scene_kwargs.setdefault("n_objects", rng.randint(2, 3))
    if kind == "add":
        scene_kwargs.setdefault("n_objects", rng.randint(1, 2))
    while True:
        scene = sample_scene(rng, **scene_kwargs)
        if kind in edit_kinds_for(scene):
            return scene


# ----------------------------------------------------------------------------------------------------
# Streamed dataset


class SceneStream(IterableDataset):
    """An endless (or `length`-long) deterministic stream of rendered examples; nothing is stored.

    Example i depends only on (seed, i): splitting over DataLoader workers and over ranks (rank,
    world_size) gives the same examples as a single process. Yields dicts:
      t2i:  {"kind": "t2i", "index", "image", "caption", "scene"} (+ "labels" if label_cell_px)
      edit: {"kind": "edit", "index", "edit", "source", "instruction", "target", "source_scene",
             "target_scene", "source_caption", "target_caption"} (+ "labels" of the target)
    `kinds` picks uniformly between "t2i" and "edit" per example; edits cycle uniformly over EDIT_KINDS."""

    def __init__(
        self,
        seed: int,
        size: int | tuple[int, int] = 128,
        kinds: tuple[str, ...] = ("t2i", "edit"),
        length: int | None = None,
        start: int = 0,
        paraphrase_p: float = 0.5,
        word_p: float = 0.4,
        chinese_p: float = 0.3,
        unseen_p: float = 0.0,
        label_cell_px: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__()
        self.width, self.height = (size, size) if isinstance(size, int) else size
        check_size(self.width, self.height)
        if not kinds or any(k not in ("t2i", "edit") for k in kinds):
            raise ValueError(f"kinds must be a non-empty subset of ('t2i', 'edit'), got {kinds!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.seed, self.kinds, self.length, self.start = seed, tuple(kinds), length, start
        self.paraphrase_p, self.label_cell_px = paraphrase_p, label_cell_px
        self.scene_kwargs = dict(word_p=word_p, chinese_p=chinese_p, unseen_p=unseen_p)
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        info = get_worker_info()
        n_workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        step = self.world_size * n_workers
        i = self.start + self.rank * n_workers + worker
        while self.length is None or i < self.start + self.length:
            yield self.example(i)
            i += step

    def example(self, index: int) -> dict:
        rng = random.Random(f"glmimage-scenes:{self.seed}:{index}")
        kind = rng.choice(self.kinds)
        w, h = self.width, self.height
        if kind == "t2i":
            scene = sample_scene(rng, **self.scene_kwargs)
            out = {"kind": "t2i", "index": index, "image": render(scene, w, h),
                   "caption": caption(scene, rng, self.paraphrase_p), "scene": scene}
        else:
            edit = EDIT_KINDS[rng.randrange(len(EDIT_KINDS))]
            source = sample_edit_scene(rng, edit, **self.scene_kwargs)
            instruction, scene = sample_edit(rng, source, edit)
            out = {"kind": "edit", "index": index, "edit": edit, "source": render(source, w, h),
                   "instruction": instruction, "target": render(scene, w, h), "source_scene": source,
                   "target_scene": scene, "source_caption": caption(source, rng, self.paraphrase_p),
                   "target_caption": caption(scene, rng, self.paraphrase_p)}
        if self.label_cell_px:
            out["labels"] = label_map(scene, w, h, self.label_cell_px)
        return out
