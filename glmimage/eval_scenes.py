"""Judge generated images of synthetic scenes (shared/reference/synthetic-scenes.md, "How a generated image
is judged"). Independent of the model code: anything that maps a prompt to a PIL image can be scored.

    result = check_scene(image, parse_caption(prompt))    # per-object right/wrong, extras, background, word
    scores = score([result, ...])
    report = evaluate(generate_fn, n=100, seed=0, out_dir="eval/")   # report.json + contact_sheet.png

How an image is read:
  1. background = the most common background colour among pixels whose nearest palette colour is one;
  2. each pixel p is explained as a blend of that background B and one object colour C
     (p ~ B + a (C - B), a in [0, 1]); it belongs to C when a >= 0.5 and the blend fits within
     MAX_RESIDUAL, so anti-aliased edges go to the nearer side instead of to a third palette colour;
  3. 8-connected regions of one object colour with area >= MIN_AREA (of min(W, H)^2) are objects, except,
     when a word was asked, regions whose centroid lies in the word's row (they are the word);
  4. shape = nearest prototype in (extent, solidity, centroid height in the box) space, or "unknown";
     size = small/large from the area relative to the shape's area at each size; cell = centroid's cell;
  5. the word: RapidOCR on a 4x upscale of the word's row, whitespace removed, compared exactly (for Latin
     words after mapping l | 1 -> I, 0 -> O and upper-casing: see normalize_read).
"""

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from glmimage.data.scenes import (
    BACKGROUNDS, CELLS, COLOURS, EDIT_KINDS, ROWS, SHAPES, SIZES, STAR_INNER, Scene, caption, parse_caption,
    place_scene, render, sample_edit, sample_edit_scene, sample_scene, word_kind,
)

MAX_RESIDUAL = 60.0  # max RGB distance of a pixel from its background-object blend (else unclassified)
MIN_AREA = 0.0064  # of min(W, H)^2: 0.4 x the area of a small star
OCR_UPSCALE = 4

_BG_NAMES, _COLOUR_NAMES = list(BACKGROUNDS), list(COLOURS)
_BG_RGB = np.array(list(BACKGROUNDS.values()), dtype=np.float32)
_OBJ_RGB = np.array(list(COLOURS.values()), dtype=np.float32)

# shape area / (box side)^2
_STAR_AREA = 5 * STAR_INNER * 0.25 * math.sin(math.radians(36))
AREA_RATIO = {"circle": math.pi / 4, "square": 1.0, "triangle": 3**0.5 / 4, "star": _STAR_AREA}
# Shape features: extent = area / bbox area, solidity = area / convex hull area (hull of the pixel
# corners, so pixelated slanted edges lower it a little), centroid height within the bbox, log(width /
# height) of the bbox. Prototypes: the ideal values, with solidity as measured on 128x128 renders.
_STAR_BBOX_W, _STAR_BBOX_H = 2 * math.sin(math.radians(72)), 1 + math.cos(math.radians(36))  # / outer radius
SHAPE_PROTOTYPES = {
    "circle": (math.pi / 4, 0.965, 0.5, 0.0),
    "square": (1.0, 1.0, 0.5, 0.0),
    "triangle": (0.5, 0.93, 2 / 3, math.log(2 / 3**0.5)),
    "star": (4 * _STAR_AREA / (_STAR_BBOX_W * _STAR_BBOX_H), 0.58, 1 / _STAR_BBOX_H,
             math.log(_STAR_BBOX_W / _STAR_BBOX_H)),
}
MAX_SHAPE_DISTANCE = 0.25
_SIZE_THRESHOLD = math.sqrt(SIZES["small"] * SIZES["large"])


# ----------------------------------------------------------------------------------------------------
# Pixels -> regions


def classify_pixels(image: Image.Image) -> tuple[np.ndarray, str]:
    """(labels (H, W) int: object colour index 0..7, -1 background, -2 unclassified; background name)."""
    rgb = np.asarray(image.convert("RGB"))
    h, w, _ = rgb.shape
    packed = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    colours, inverse, counts = np.unique(packed.ravel(), return_inverse=True, return_counts=True)
    # work on the distinct colours, laid out (k, U) so reductions run over the short first axis
    x = np.stack([(colours >> 16) & 255, (colours >> 8) & 255, colours & 255]).astype(np.float32)  # (3, U)
    d_bg = ((x[None] - _BG_RGB[:, :, None]) ** 2).sum(1)  # (4, U) squared distances
    d_obj = ((x[None] - _OBJ_RGB[:, :, None]) ** 2).sum(1)  # (8, U)
    is_bg = d_bg.min(0) < d_obj.min(0)
    votes = np.bincount(d_bg.argmin(0)[is_bg], weights=counts[is_bg], minlength=len(_BG_RGB))
    bg = int(votes.argmax()) if votes.any() else int(np.median(d_bg[:, inverse], axis=1).argmin())
    direction = (_OBJ_RGB - _BG_RGB[bg])[:, :, None]  # (8, 3, 1)
    v = x - _BG_RGB[bg][:, None]  # (3, U)
    alpha = np.clip((v[None] * direction).sum(1) / (direction**2).sum(1), 0, 1)  # (8, U)
    residual = ((v[None] - alpha[:, None] * direction) ** 2).sum(1)  # (8, U)
    best = residual.argmin(0)
    r = np.sqrt(np.take_along_axis(residual, best[None], 0)[0])
    a = np.take_along_axis(alpha, best[None], 0)[0]
    other_bg = np.sqrt(np.delete(d_bg, bg, axis=0).min(0)) < r  # closer to another background colour
    labels = np.where(a >= 0.5, best, -1)
    labels[other_bg] = -1
    labels[(r > MAX_RESIDUAL) & ~other_bg] = -2
    return labels[inverse].reshape(h, w), _BG_NAMES[bg]


def _runs(mask: np.ndarray):
    """Horizontal runs of True: arrays (y, x0, x1) with x1 exclusive, sorted by y then x0."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)
    ys, x0 = np.nonzero(d == 1)
    _, x1 = np.nonzero(d == -1)
    return ys, x0, x1


def connected_components(mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """8-connected components of a boolean mask, each as its runs (y, x0, x1)."""
    ys, x0, x1 = _runs(mask)
    n = len(ys)
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_start = np.searchsorted(ys, np.arange(mask.shape[0] + 1))
    for y in range(1, mask.shape[0]):
        a, a_end = row_start[y - 1], row_start[y]  # runs of the row above
        b, b_end = row_start[y], row_start[y + 1]
        while a < a_end and b < b_end:
            if x0[a] <= x1[b] and x0[b] <= x1[a]:  # overlap or diagonal touch (8-connectivity)
                ra, rb = find(a), find(b)
                if ra != rb:
                    parent[ra] = rb
            if x1[a] < x1[b]:
                a += 1
            else:
                b += 1
    roots = np.array([find(i) for i in range(n)], dtype=np.int64)
    return [(ys[roots == r], x0[roots == r], x1[roots == r]) for r in np.unique(roots)]


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of (N, 2) points (monotone chain + shoelace)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return 0.0

    def half(seq):
        out = []
        for p in seq:
            while len(out) >= 2 and (out[-1][0] - out[-2][0]) * (p[1] - out[-2][1]) - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0]) <= 0:
                out.pop()
            out.append(p)
        return out

    hull = half(pts)[:-1] + half(reversed(pts))[:-1]
    xs, ys = np.array(hull, dtype=np.float64).T
    return 0.5 * abs(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1)))


@dataclass
class Detection:
    colour: str
    shape: str  # one of SHAPES or "unknown"
    size: str
    cell: str
    area: int
    centroid: tuple[float, float]  # (x, y) in pixels
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1), exclusive ends
    extent: float
    solidity: float


def _describe_region(colour: str, runs, width: int, height: int) -> Detection:
    ys, x0, x1 = runs
    lengths = (x1 - x0).astype(np.float64)
    area = float(lengths.sum())
    cx = float(((x0 + x1) / 2 * lengths).sum() / area)
    cy = float(((ys + 0.5) * lengths).sum() / area)
    bx0, bx1, by0, by1 = int(x0.min()), int(x1.max()), int(ys.min()), int(ys.max()) + 1
    bw, bh = bx1 - bx0, by1 - by0
    corners = np.concatenate([np.stack([x0, ys], 1), np.stack([x1, ys], 1),
                              np.stack([x0, ys + 1], 1), np.stack([x1, ys + 1], 1)])
    extent = area / (bw * bh)
    solidity = area / max(_hull_area(corners), 1.0)
    features = np.array([extent, solidity, (cy - by0) / bh, math.log(bw / bh)])
    distances = {s: float(np.linalg.norm(features - np.array(p))) for s, p in SHAPE_PROTOTYPES.items()}
    shape = min(distances, key=distances.get)
    if distances[shape] > MAX_SHAPE_DISTANCE:
        shape = "unknown"
    side = min(width, height)
    if shape == "unknown":
        rel = max(bw, bh) / side
    else:
        rel = math.sqrt(area / AREA_RATIO[shape]) / side
    col = min(max(int(cx / width * 3), 0), 2)
    row = min(max(int(cy / height * 3), 0), 2)
    return Detection(colour, shape, "large" if rel > _SIZE_THRESHOLD else "small", CELLS[row * 3 + col],
                     int(area), (round(cx, 2), round(cy, 2)), (bx0, by0, bx1, by1), round(extent, 3),
                     round(solidity, 3))


def detect(image: Image.Image, word_row: str | None = None) -> tuple[str, list[Detection]]:
    """(background name, objects found); regions centred in word_row are left out as text."""
    labels, background = classify_pixels(image)
    height, width = labels.shape
    min_area = MIN_AREA * min(width, height) ** 2
    found = []
    for ci, colour in enumerate(_COLOUR_NAMES):
        mask = labels == ci
        if mask.sum() < min_area:
            continue
        for runs in connected_components(mask):
            if (runs[2] - runs[1]).sum() < min_area:
                continue
            det = _describe_region(colour, runs, width, height)
            if word_row is not None and ROWS[min(int(det.centroid[1] / height * 3), 2)] == word_row:
                continue
            found.append(det)
    return background, found


# ----------------------------------------------------------------------------------------------------
# OCR


_OCR = None


def _ocr():
    global _OCR
    if _OCR is None:
        try:
            from rapidocr import RapidOCR
        except ImportError as e:
            raise ImportError(
                "reading words needs RapidOCR: pip install 'rapidocr==3.10.0' onnxruntime"
            ) from e
        # limit_type "max": the detector's default ("min" side up to 736) blows a 512x192 row band up to
        # 1962x736 and is ~8x slower, with no gain on these words. No angle classifier: words are always
        # upright, and it reads point-symmetric words upside down ('NOX' -> 'XON').
        _OCR = RapidOCR(params={"Global.log_level": "error", "Det.limit_type": "max", "Global.use_cls": False})
    return _OCR


def read_text(image: Image.Image, row: str | None = None, upscale: int = OCR_UPSCALE) -> str:
    """Text read by RapidOCR on an upscaled copy of the image (or of one row band), whitespace removed."""
    image = image.convert("RGB")
    if row is not None:
        w, h = image.size
        i = ROWS.index(row)
        top, bottom = max(0, round((i / 3 - 0.04) * h)), min(h, round(((i + 1) / 3 + 0.04) * h))
        image = image.crop((0, top, w, bottom))
    image = image.resize((image.width * upscale, image.height * upscale), Image.LANCZOS)
    out = _ocr()(image)
    if out.txts is None:
        return ""
    order = np.argsort([np.asarray(box)[:, 0].min() for box in out.boxes])
    return "".join("".join(out.txts[i].split()) for i in order)


_LATIN_LOOKALIKES = str.maketrans({"l": "I", "|": "I", "1": "I", "0": "O"})


def normalize_read(read: str, asked: str) -> str:
    """OCR text as compared with the asked word: for a Latin word (A-Z only), the glyphs a sans-serif
    uppercase alphabet cannot tell apart are mapped into it (l | 1 -> I, 0 -> O) and case is ignored."""
    if asked.isascii():
        return read.translate(_LATIN_LOOKALIKES).upper()
    return read


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


# ----------------------------------------------------------------------------------------------------
# Judging one image


def _object_dict(o) -> dict:
    return {"colour": o.colour, "shape": o.shape, "size": o.size, "cell": o.cell}


def check_scene(image: Image.Image, scene: Scene, ocr: bool = True) -> dict:
    """How well an image shows a scene: per asked object right/wrong, extra objects, background, word."""
    word = scene.word
    background, found = detect(image, word.row if word is not None else None)
    # pair asked objects with found ones: same colour, then best agreement (shape, cell, size)
    pairs = []
    for i, o in enumerate(scene.objects):
        for j, d in enumerate(found):
            if d.colour == o.colour:
                agree = 4 * (d.shape == o.shape) + 2 * (d.cell == o.cell) + (d.size == o.size)
                pairs.append((-agree, i, j))
    match, used = {}, set()
    for _, i, j in sorted(pairs):
        if i not in match and j not in used:
            match[i] = j
            used.add(j)
    objects = []
    for i, o in enumerate(scene.objects):
        d = found[match[i]] if i in match else None
        right = d is not None and (d.shape, d.size, d.cell) == (o.shape, o.size, o.cell)
        objects.append({"asked": _object_dict(o), "found": _object_dict(d) if d else None, "right": right})
    extra = [_object_dict(d) for j, d in enumerate(found) if j not in used]
    result = {
        "objects": objects,
        "extra": extra,
        "background": scene.background,
        "background_found": background,
        "background_right": background == scene.background,
        "word": None,
    }
    exact = all(o["right"] for o in objects) and not extra and result["background_right"]
    if word is not None:
        result.update(word=word.text, word_kind=word_kind(word.text))
        if ocr:
            raw = read_text(image, word.row)
            read = normalize_read(raw, word.text)
            dist = edit_distance(read, word.text)
            result.update(word_read=read, word_read_raw=raw, word_right=read == word.text, word_distance=dist,
                          word_ned=min(1.0, dist / len(word.text)))
            exact = exact and read == word.text
    result["exact"] = exact
    return result


def _plain(o) -> tuple:
    return (o.colour, o.shape, o.size, o.cell)


def check_edit(image: Image.Image, source: Scene, target: Scene, kind: str) -> dict:
    """check_scene against the target, plus whether the named change happened (change_ok) and the rest of
    the scene stayed as it was (rest_ok); edit_success = both."""
    result = check_scene(image, target)
    before = {_plain(o) for o in source.objects}
    changed = [i for i, o in enumerate(target.objects) if _plain(o) not in before]
    kept = [i for i in range(len(target.objects)) if i not in changed]
    objs = result["objects"]
    word_ok = result.get("word_right", True) is not False
    if kind == "background":
        change_ok = result["background_right"]
    elif kind == "word":
        change_ok = word_ok
    elif kind == "remove":
        gone = next(o for o in source.objects if target.find(o.colour, o.shape) is None)
        change_ok = not any((e["colour"], e["shape"]) == (gone.colour, gone.shape) for e in result["extra"])
    else:  # colour, move, add
        change_ok = bool(changed) and all(objs[i]["right"] for i in changed)
    rest_ok = (all(objs[i]["right"] for i in kept) and not result["extra"]
               and (kind == "background" or result["background_right"])
               and (kind == "word" or word_ok))
    result.update(edit_kind=kind, change_ok=change_ok, rest_ok=rest_ok, edit_success=change_ok and rest_ok)
    return result


# ----------------------------------------------------------------------------------------------------
# Scores


def _mean(values) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 4) if values else None


def object_breakdown(objects: list[dict]) -> dict:
    """What goes wrong with the asked objects: the share found at all (an object of the asked colour paired with
    it), each attribute's accuracy over all asked objects (a missing object is wrong in every one), and the object
    accuracy per asked shape and per asked size."""
    def right(o, key):
        return o["found"] is not None and o["found"][key] == o["asked"][key]
    return {
        "objects_found": _mean(o["found"] is not None for o in objects),
        "attribute_accuracy": {k: _mean(right(o, k) for o in objects) for k in ("shape", "size", "cell")},
        "object_accuracy_by_shape": {sh: _mean(o["right"] for o in objects if o["asked"]["shape"] == sh)
                                     for sh in SHAPES},
        "object_accuracy_by_size": {sz: _mean(o["right"] for o in objects if o["asked"]["size"] == sz)
                                    for sz in SIZES},
    }


def score(results: list[dict]) -> dict:
    """Aggregate check_scene / check_edit results. Text-to-image results (no 'edit_kind') give object,
    scene-exact, background and word scores; edit results give edit success overall and per kind."""
    t2i = [r for r in results if "edit_kind" not in r]
    edits = [r for r in results if "edit_kind" in r]
    out = {
        "n_t2i": len(t2i),
        "object_accuracy": _mean(o["right"] for r in t2i for o in r["objects"]),
        "scene_exact": _mean(r["exact"] for r in t2i),
        "background_accuracy": _mean(r["background_right"] for r in t2i),
        "extra_objects_per_image": _mean(len(r["extra"]) for r in t2i),
        **object_breakdown([o for r in t2i for o in r["objects"]]),
        "word": {},
    }
    for kind in ("latin", "unseen", "chinese"):
        rs = [r for r in t2i if r.get("word_kind") == kind and "word_right" in r]
        out["word"][kind] = {"n": len(rs), "exact": _mean(r["word_right"] for r in rs),
                             "ned": _mean(r["word_ned"] for r in rs)}
    out["n_edit"] = len(edits)
    out["edit_success"] = _mean(r["edit_success"] for r in edits)
    out["edit"] = {}
    for kind in EDIT_KINDS:
        rs = [r for r in edits if r["edit_kind"] == kind]
        out["edit"][kind] = {"n": len(rs), "success": _mean(r["edit_success"] for r in rs),
                             "change_ok": _mean(r["change_ok"] for r in rs), "rest_ok": _mean(r["rest_ok"] for r in rs)}
    return out


# ----------------------------------------------------------------------------------------------------
# Full evaluation

T2I_CATEGORIES = ("single", "multi", "word_latin", "word_unseen", "word_chinese")


def eval_scene(category: str, rng: random.Random) -> Scene:
    """A fresh prompt scene of an evaluation category (T2I_CATEGORIES)."""
    if category == "single":
        return sample_scene(rng, n_objects=1, word=None)
    if category == "multi":
        return sample_scene(rng, n_objects=rng.randint(2, 3), word=None)
    if category in ("word_latin", "word_unseen", "word_chinese"):
        return sample_scene(rng, word=category.removeprefix("word_"))
    raise ValueError(f"unknown category {category!r}; valid: {', '.join(T2I_CATEGORIES)}")


def t2i_cases(n: int, seed: int) -> list[tuple[str, Scene]]:
    """The n (category, scene) prompts evaluate() asks for, cycling over T2I_CATEGORIES."""
    cases = []
    for i in range(n):
        category = T2I_CATEGORIES[i % len(T2I_CATEGORIES)]
        cases.append((category, eval_scene(category, random.Random(f"glmimage-eval:{seed}:t2i:{i}"))))
    return cases


def edit_cases(n: int, seed: int) -> list[tuple[str, Scene, str, Scene]]:
    """The n (kind, source, instruction, target) edits evaluate() asks for, cycling over EDIT_KINDS."""
    cases = []
    for j in range(n):
        kind = EDIT_KINDS[j % len(EDIT_KINDS)]
        rng = random.Random(f"glmimage-eval:{seed}:edit:{j}")
        source = sample_edit_scene(rng, kind)
        instruction, target = sample_edit(rng, source, kind)
        cases.append((kind, source, instruction, target))
    return cases


def ground_truth_generate_fn(size: int = 128):
    """A generate_fn that renders the canonical prompt itself (to check the evaluation end to end)."""
    def generate(prompt: str, seed: int) -> Image.Image:
        return render(place_scene(parse_caption(prompt), random.Random(seed)), size, size)
    return generate


def contact_sheet(images: list[Image.Image], ok: list[bool], tile: int = 128, cols: int = 10) -> Image.Image:
    """Grid of images, each framed green (exactly right) or red."""
    rows = max(1, math.ceil(len(images) / cols))
    pad = 4
    sheet = Image.new("RGB", (cols * (tile + pad), rows * (tile + pad)), (80, 80, 80))
    draw = ImageDraw.Draw(sheet)
    for k, (im, good) in enumerate(zip(images, ok)):
        x, y = (k % cols) * (tile + pad), (k // cols) * (tile + pad)
        draw.rectangle([x, y, x + tile + pad - 1, y + tile + pad - 1], fill=(40, 170, 60) if good else (200, 40, 40))
        sheet.paste(im.convert("RGB").resize((tile, tile)), (x + pad // 2, y + pad // 2))
    return sheet


def evaluate(generate_fn, n: int, seed: int, out_dir, size: int = 128, edit_fn=None, n_edit: int | None = None,
             max_sheet: int = 200) -> dict:
    """Score a model on n fresh text-to-image prompts (cycling over T2I_CATEGORIES) and, with edit_fn, on
    n_edit (default n) edits cycling over EDIT_KINDS. Writes report.json and contact_sheet.png.

    generate_fn(prompt: str, seed: int) -> PIL.Image; edit_fn(instruction: str, source: PIL.Image, seed: int,
    truth: PIL.Image) -> PIL.Image, where source is the rendered source scene at `size` and truth the rendered
    target (what a right edit looks like; only a ceiling measurement may read it)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, samples, sheet, sheet_ok = [], [], [], []
    for i, (category, scene) in enumerate(t2i_cases(n, seed)):
        prompt = caption(scene)
        image = generate_fn(prompt, seed + i).convert("RGB")
        r = check_scene(image, scene)
        results.append(r)
        samples.append({"category": category, "prompt": prompt, "seed": seed + i, **r})
        sheet.append(image)
        sheet_ok.append(r["exact"])
    if edit_fn is not None:
        for j, (kind, source, instruction, target) in enumerate(edit_cases(n if n_edit is None else n_edit, seed)):
            image = edit_fn(instruction, render(source, size, size), seed + j, render(target, size, size))
            image = image.convert("RGB")
            r = check_edit(image, source, target, kind)
            results.append(r)
            samples.append({"category": f"edit_{kind}", "source_caption": caption(source), "instruction": instruction,
                            "target_caption": caption(target), "seed": seed + j, **r})
            sheet.append(image)
            sheet_ok.append(r["edit_success"])
    report = {"n": n, "seed": seed, "size": size, "scores": score(results), "samples": samples}
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    if sheet:
        contact_sheet(sheet[:max_sheet], sheet_ok[:max_sheet], tile=size).save(out_dir / "contact_sheet.png")
    return report
