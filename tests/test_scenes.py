"""Synthetic scenes (glmimage.data.scenes), the scene checker (glmimage.eval_scenes) and the real-data
readers (glmimage.data.folder). OCR checks need rapidocr + onnxruntime and are skipped without them."""

import io
import json
import random
import tarfile
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from glmimage import eval_scenes as E
from glmimage.data import folder
from glmimage.data import scenes as S


def strip(scene: S.Scene) -> S.Scene:
    """The scene with zero jitter (what a caption or an instruction says)."""
    return replace(scene, objects=tuple(replace(o, jitter=(0.0, 0.0)) for o in scene.objects))


def has_ocr() -> bool:
    try:
        import onnxruntime  # noqa: F401  (imported to see if it is installed)
        import rapidocr  # noqa: F401
    except ImportError:
        return False
    return True


needs_ocr = pytest.mark.skipif(not has_ocr(), reason="needs rapidocr and onnxruntime")


# ----------------------------------------------------------------------------------------------------
# Vocabulary and fonts


def test_word_lists_and_font_coverage():
    assert len(set(S.LATIN_WORDS)) == len(S.LATIN_WORDS) >= 200
    assert all(2 <= len(w) <= 5 and w.isascii() and w.isalpha() and w.isupper() for w in S.LATIN_WORDS)
    assert len(set(S.CHINESE_WORDS)) == len(S.CHINESE_WORDS) >= 50
    assert all(len(w) == 2 and all("\u4e00" <= c <= "\u9fff" for c in w) for w in S.CHINESE_WORDS)
    font = S.load_font(40)
    missing = bytes(font.getmask("\u9f98"))  # a character the subset lacks: drawn as .notdef
    for ch in set("".join(S.CHINESE_WORDS)) | set("ABCDEFGHIJKLMNOPQRSTUVWXYZ"):
        assert bytes(font.getmask(ch)) != missing, f"{ch!r} is not in the vendored font"
    assert S.NUM_LABELS == len(S.LABEL_NAMES) == 37


# ----------------------------------------------------------------------------------------------------
# Sampling and determinism


def test_stream_is_deterministic_and_splits_cleanly():
    def snapshot(stream):
        out = []
        for ex in stream:
            images = [ex[k].tobytes() for k in ("image", "source", "target") if k in ex]
            out.append((ex["index"], ex["kind"], ex.get("caption"), ex.get("instruction"), images))
        return out

    a = snapshot(S.SceneStream(seed=3, length=8))
    assert a == snapshot(S.SceneStream(seed=3, length=8))
    assert a != snapshot(S.SceneStream(seed=4, length=8))
    assert {kind for _, kind, *_ in a} == {"t2i", "edit"}
    halves = snapshot(S.SceneStream(seed=3, length=8, rank=0, world_size=2)) + \
        snapshot(S.SceneStream(seed=3, length=8, rank=1, world_size=2))
    assert sorted(halves, key=lambda x: x[0]) == a
    ex = S.SceneStream(seed=3, size=(64, 96), kinds=("edit",), label_cell_px=16).example(5)
    assert ex["source"].size == ex["target"].size == (64, 96) and ex["labels"].shape == (6, 4)
    assert strip(S.apply_edit(ex["source_scene"], ex["instruction"])) == strip(ex["target_scene"])


def test_sampled_scenes_follow_the_spec():
    rng = random.Random(0)
    words = {"latin": 0, "unseen": 0, "chinese": 0}
    for _ in range(300):
        scene = S.sample_scene(rng, word_p=0.5, unseen_p=0.2)
        assert 1 <= len(scene.objects) <= 3
        for o in scene.objects:
            assert max(abs(o.jitter[0]), abs(o.jitter[1])) <= S.MAX_JITTER
            box = S._object_box(o)
            assert S.MARGIN - 1e-9 <= box[0] and box[1] <= 1 - S.MARGIN + 1e-9
            assert S.MARGIN - 1e-9 <= box[2] and box[3] <= 1 - S.MARGIN + 1e-9
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1:]:
                assert S._apart(S._object_box(a), S._object_box(b), S.GAP - 1e-9)
        if scene.word is not None:
            words[S.word_kind(scene.word.text)] += 1
    assert all(v > 0 for v in words.values())


# ----------------------------------------------------------------------------------------------------
# Rendering


@pytest.mark.parametrize("size", [(128, 128), (64, 96), (96, 64), (256, 160)])
def test_render_exact_palette_at_region_centres(size):
    width, height = size
    rng = random.Random(1)
    for _ in range(10):
        scene = S.sample_scene(rng, word_p=0.5)
        image = S.render(scene, width, height)
        assert image.size == (width, height) and image.mode == "RGB"
        px = np.asarray(image)
        bg = S.BACKGROUNDS[scene.background]
        for y, x in ((0, 0), (0, width - 1), (height - 1, 0), (height - 1, width - 1)):
            assert tuple(px[y, x]) == bg
        for o in scene.objects:
            cx, cy, b = S._object_pixels(o, width, height)
            assert tuple(px[int(cy), int(cx)]) == S.COLOURS[o.colour], o
            if o.shape == "square":  # whole interior exact
                inner = px[int(cy - b / 2) + 1:int(cy + b / 2) - 1, int(cx - b / 2) + 1:int(cx + b / 2) - 1]
                assert (inner == S.COLOURS[o.colour]).all()
        # every pixel is the background, an element colour, or a blend on an edge
        palette = {bg} | {S.COLOURS[o.colour] for o in scene.objects}
        if scene.word is not None:
            palette.add(S.COLOURS[scene.word.colour])
        colours, counts = np.unique(px.reshape(-1, 3), axis=0, return_counts=True)
        exact = sum(c for col, c in zip(map(tuple, colours), counts) if col in palette)
        assert exact / (width * height) > 0.9


def test_render_sizes_scale_and_bad_sizes_are_rejected():
    scene = S.Scene("white", (S.SceneObject("red", "square", "large", "center"),))
    for side in (64, 128, 256):
        area = (np.asarray(S.render(scene, side, side)) == S.COLOURS["red"]).all(-1).sum()
        assert abs(area - (0.36 * side) ** 2) < 4 * 0.36 * side  # within one pixel ring
    with pytest.raises(ValueError, match="96 or 128"):
        S.render(scene, 100, 128)
    with pytest.raises(ValueError, match="nearest valid: 32"):
        S.render(scene, 128, 20)


def test_label_map_marks_objects_and_text():
    scene = S.Scene("cream", (S.SceneObject("blue", "square", "large", "top left", (0.03, 0.03)),
                              S.SceneObject("green", "circle", "large", "bottom right", (-0.03, -0.03))),
                    S.Word("HELLO", "red", "middle"))
    labels = S.label_map(scene, 128, 128, cell_px=16)
    assert labels.shape == (8, 8) and labels.dtype == torch.long
    assert labels[1, 1] == S.object_label("blue", "square")
    assert labels[6, 6] == S.object_label("green", "circle")
    assert labels[3:5, 3:5].eq(S.TEXT_LABEL).any()
    assert labels[0, 7] == list(S.BACKGROUNDS).index("cream")
    with pytest.raises(ValueError):
        S.label_map(scene, 128, 128, cell_px=24)


# ----------------------------------------------------------------------------------------------------
# Captions and edits


def test_caption_parse_round_trip():
    rng = random.Random(2)
    for _ in range(300):
        scene = S.sample_scene(rng, word_p=0.5, unseen_p=0.2, black_word_p=0.5)
        text = S.caption(scene)
        assert S.parse_caption(text) == strip(scene), text
        paraphrase = S.caption(scene, random.Random(0), paraphrase_p=1.0)
        assert scene.background in paraphrase and all(o.colour in paraphrase for o in scene.objects)
    example = ("a large red circle at the top left and a small blue square at the bottom right, "
               "with the word 'SUN' written at the middle, on a white background.")
    scene = S.parse_caption(example)
    assert S.caption(scene) == example and scene.word == S.Word("SUN", "black", "middle")
    assert S.parse_caption(example.replace("'SUN'", "\u300cSUN\u300d")) == scene
    assert S.parse_caption("a small black star in the center, with the word \u201c\u4f60\u597d\u201d written in pink "
                           "at the top, on a light gray background").word == S.Word("\u4f60\u597d", "pink", "top")
    for bad in ("a red circle, on a white background.", "a large red circle at the top left",
                "a large red circle at the top left, with the word 'SUN\u300d written at the middle, on a white background."):
        with pytest.raises(ValueError):
            S.parse_caption(bad)


def _changed(source: S.Scene, target: S.Scene):
    a = {(o.colour, o.shape, o.size, o.cell) for o in source.objects}
    b = {(o.colour, o.shape, o.size, o.cell) for o in target.objects}
    return a - b, b - a


@pytest.mark.parametrize("kind", S.EDIT_KINDS)
def test_edit_changes_only_what_it_names(kind):
    rng = random.Random(S.EDIT_KINDS.index(kind))
    for _ in range(25):
        source = S.sample_edit_scene(rng, kind)
        instruction, target = S.sample_edit(rng, source, kind)
        assert S.parse_edit(instruction)[0] == kind
        assert strip(S.apply_edit(source, instruction, random.Random(0))) == strip(target)
        gone, new = _changed(source, target)
        if kind in ("background", "word"):
            assert not gone and not new and target.objects == source.objects
        if kind == "background":
            assert target.background != source.background and target.word == source.word
            assert instruction == f"change the background to {target.background}"
        else:
            assert target.background == source.background
        if kind == "word":
            assert target.word.text != source.word.text
            assert (target.word.colour, target.word.row) == (source.word.colour, source.word.row)
            assert instruction == f"change the word to '{target.word.text}'"
        elif kind != "background":
            assert target.word == source.word
        if kind == "colour":
            ((c0, s0, z0, cell0),), ((c1, s1, z1, cell1),) = gone, new
            assert (s0, z0, cell0) == (s1, z1, cell1) and c0 != c1
            assert instruction == f"make the {c0} {s0} {c1}"
        if kind == "move":
            ((c0, s0, z0, cell0),), ((c1, s1, z1, cell1),) = gone, new
            assert (c0, s0, z0) == (c1, s1, z1) and cell0 != cell1
            assert instruction == f"move the {c0} {s0} to the {cell1}"
        if kind == "remove":
            ((c0, s0, _, _),) = gone
            assert not new and instruction == f"remove the {c0} {s0}"
        if kind == "add":
            ((c1, s1, z1, cell1),) = new
            assert not gone and instruction == f"add a {z1} {c1} {s1} {S.WHERE[cell1]}"
        for o in target.objects:  # untouched objects keep even their jitter
            if (o.colour, o.shape, o.size, o.cell) not in new:
                assert o in source.objects
        assert S.render(source).tobytes() != S.render(target).tobytes()
    with pytest.raises(ValueError):
        S.apply_edit(S.Scene("white", (S.SceneObject("red", "star", "small", "center"),)), "remove the blue star")


# ----------------------------------------------------------------------------------------------------
# Checker


def _gt_scores(n: int, size, seed: int, word_p: float, ocr: bool):
    rng = random.Random(seed)
    results = []
    for _ in range(n):
        scene = S.sample_scene(rng, word_p=word_p, unseen_p=0.3)
        results.append(E.check_scene(S.render(scene, *size), scene, ocr=ocr))
    return E.score(results)


def test_checker_on_ground_truth_shapes():
    scores = _gt_scores(100, (128, 128), seed=10, word_p=0.3, ocr=False)
    assert scores["object_accuracy"] >= 0.99 and scores["scene_exact"] >= 0.99
    assert scores["background_accuracy"] == 1.0 and scores["extra_objects_per_image"] == 0
    assert min(scores["attribute_accuracy"].values()) >= 0.99 and scores["objects_found"] >= 0.99
    assert min([*scores["object_accuracy_by_shape"].values(), *scores["object_accuracy_by_size"].values()]) >= 0.97
    for size in ((64, 96), (256, 256)):
        scores = _gt_scores(20, size, seed=11, word_p=0.3, ocr=False)
        assert scores["object_accuracy"] >= 0.95 and scores["extra_objects_per_image"] == 0, size


@needs_ocr
def test_checker_on_ground_truth_words():
    rng = random.Random(12)
    results = []
    for kind in S.WORD_KINDS * 3:
        scene = S.sample_scene(rng, word=kind, black_word_p=0.3)
        results.append(E.check_scene(S.render(scene), scene))
    scores = E.score(results)
    for kind in S.WORD_KINDS:
        assert scores["word"][kind]["n"] == 3 and scores["word"][kind]["exact"] == 1.0, scores["word"]
    assert scores["scene_exact"] == 1.0


@pytest.mark.slow
@needs_ocr
def test_checker_on_ground_truth_large():
    scores = _gt_scores(150, (128, 128), seed=13, word_p=0.6, ocr=True)
    assert scores["object_accuracy"] >= 0.99 and scores["scene_exact"] >= 0.99, scores
    assert all(v["exact"] >= 0.97 for v in scores["word"].values()), scores["word"]
    scores = _gt_scores(30, (512, 512), seed=14, word_p=0.5, ocr=True)
    assert scores["object_accuracy"] >= 0.99 and scores["scene_exact"] >= 0.97, scores


def _perturb(rng: random.Random, scene: S.Scene, how: str) -> S.Scene:
    objects = list(scene.objects)
    i = rng.randrange(len(objects))
    o = objects[i]
    pairs = {(p.colour, p.shape) for p in objects}
    if how == "colour":
        objects[i] = replace(o, colour=rng.choice([c for c in S.COLOURS if c != o.colour and (c, o.shape) not in pairs]))
    elif how == "shape":
        objects[i] = replace(o, shape=rng.choice([s for s in S.SHAPES if s != o.shape and (o.colour, s) not in pairs]))
    elif how == "size":
        objects[i] = replace(o, size="small" if o.size == "large" else "large")
    elif how == "move":
        others = objects[:i] + objects[i + 1:]
        for cell in rng.sample(S._free_cells(scene), len(S._free_cells(scene))):
            moved = S._place(rng, replace(o, cell=cell), others, scene.word)
            if moved is not None:
                objects[i] = moved
                break
        else:
            return None
    elif how == "missing":
        del objects[i]
    elif how == "background":
        return replace(scene, background=rng.choice([b for b in S.BACKGROUNDS if b != scene.background]))
    try:
        return S.place_scene(replace(scene, objects=tuple(objects)), rng) if how == "size" else \
            replace(scene, objects=tuple(objects))
    except ValueError:
        return None


@pytest.mark.parametrize("how", ["colour", "shape", "size", "move", "missing", "background"])
def test_checker_rejects_perturbed_scenes(how):
    rng = random.Random(20)
    results = []
    while len(results) < 15:
        scene = S.sample_scene(rng, n_objects=rng.randint(2, 3), word=None)
        wrong = _perturb(rng, scene, how)
        if wrong is None:
            continue
        result = E.check_scene(S.render(wrong), scene, ocr=False)
        results.append(result)
        assert not result["exact"], (how, scene, wrong)
        if how == "background":
            assert not result["background_right"] and all(o["right"] for o in result["objects"])
        else:
            assert sum(not o["right"] for o in result["objects"]) == 1, (how, result)
    # the breakdown puts the blame on the attribute that was changed, and only there
    scores = E.score(results)
    attribute = {"shape": "shape", "size": "size", "move": "cell"}.get(how)
    for k, v in scores["attribute_accuracy"].items():
        assert (v < 1.0) if k == attribute else (v == 1.0 or how in ("colour", "missing")), (how, scores)
    assert (scores["objects_found"] < 1.0) == (how in ("colour", "missing")), (how, scores)


@needs_ocr
def test_checker_rejects_wrong_word():
    rng = random.Random(21)
    for kind in S.WORD_KINDS:
        scene = S.sample_scene(rng, word=kind)
        other = replace(scene, word=replace(scene.word, text=S.sample_word(rng, kind, exclude=scene.word.text)))
        result = E.check_scene(S.render(other), scene)
        assert result["word_right"] is False and not result["exact"] and result["word_distance"] > 0
        assert all(o["right"] for o in result["objects"])


def test_checker_counts_extra_objects_and_edit_success():
    source = S.Scene("white", (S.SceneObject("red", "circle", "small", "top left", (0.02, 0.02)),
                               S.SceneObject("blue", "star", "large", "bottom right", (-0.03, -0.03))))
    target = S.apply_edit(source, "remove the red circle")
    assert E.check_edit(S.render(target), source, target, "remove")["edit_success"]
    failed = E.check_edit(S.render(source), source, target, "remove")  # nothing removed
    assert not failed["change_ok"] and not failed["edit_success"] and len(failed["extra"]) == 1
    recoloured = S.apply_edit(source, "make the blue star green")
    result = E.check_edit(S.render(source), source, recoloured, "colour")
    assert not result["change_ok"] and result["objects"][0]["right"]


def test_ocr_missing_gives_a_clear_error(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "rapidocr", None)
    monkeypatch.setattr(E, "_OCR", None)
    with pytest.raises(ImportError, match="pip install 'rapidocr==3.10.0' onnxruntime"):
        E.read_text(Image.new("RGB", (128, 128), "white"))


@needs_ocr
def test_evaluate_writes_report_and_contact_sheet(tmp_path):
    targets = {instruction: target for _, _, instruction, target in E.edit_cases(6, seed=5)}

    def edit_fn(instruction, source, seed, truth):
        return S.render(S.place_scene(strip(targets[instruction]), random.Random(seed)))

    report = E.evaluate(E.ground_truth_generate_fn(128), n=5, seed=5, out_dir=tmp_path, edit_fn=edit_fn, n_edit=6)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["scores"] == report["scores"]
    assert report["scores"]["scene_exact"] == 1.0 and report["scores"]["edit_success"] == 1.0
    assert [s["category"] for s in saved["samples"][:5]] == list(E.T2I_CATEGORIES)
    sheet = Image.open(tmp_path / "contact_sheet.png")
    assert sheet.width > 128 and sheet.height >= 128

    # a paired comparison of the report with itself, then with a copy where B lost one scene and one edit
    from glmimage.cli import main
    from glmimage.eval_compare import compare, load_samples
    same = compare(load_samples([tmp_path]), load_samples([tmp_path / "report.json"]))
    assert same["n_paired"] == 11 and same["object_accuracy"]["diff_ci95"] == (0.0, 0.0)
    assert same["scene_exact"] == {"n": 5, "a": 5, "b": 5, "a_only": 0, "b_only": 0, "p": 1.0}
    worse = json.loads(json.dumps(saved))
    worse["samples"][0]["exact"] = False
    worse["samples"][0]["objects"][0]["right"] = False
    worse["samples"][7]["edit_success"] = False
    (tmp_path / "worse").mkdir()
    (tmp_path / "worse" / "report.json").write_text(json.dumps(worse))
    out = tmp_path / "cmp.json"
    main(["eval", "compare", "--a", str(tmp_path), "--b", str(tmp_path / "worse"), "--out", str(out)])
    r = json.loads(out.read_text())
    assert (r["scene_exact"]["a_only"], r["scene_exact"]["b_only"], r["edit_success"]["b"]) == (1, 0, 5)
    assert r["object_accuracy"]["diff"] < 0 and r["object_accuracy"]["diff_ci95"][0] < 0


def test_oracle_tokens_eval_decodes_ground_truth_ids(tmp_path, monkeypatch):
    """--oracle-tokens: the AR never runs; the decoder gets the tokenizer's ids of the ground-truth render (for an
    edit: of its target, decoded against its source)."""
    from glmimage.pipeline import Pipeline
    from glmimage.train import evaluate as TE

    seen = []
    real_call = Pipeline.__call__

    def spy(self, prompt, *a, prior_token_ids=None, image=None, **k):
        seen.append((prompt, prior_token_ids, image))
        return real_call(self, prompt, *a, prior_token_ids=prior_token_ids, image=image, **k)

    monkeypatch.setattr(Pipeline, "__call__", spy)
    monkeypatch.setattr(Pipeline, "prior_tokens", lambda *a, **k: pytest.fail("the AR ran"))
    TE.main(["--n", "2", "--n-edit", "1", "--steps", "1", "--oracle-tokens", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "report.json").read_text())
    kind, source, instruction, target = E.edit_cases(1, 1234)[0]
    assert [x["category"] for x in report["samples"]] == ["single", "multi", f"edit_{kind}"]
    assert len(seen) == 4 and all(g is not None and g.shape == (8, 8) for _, g, _ in seen)  # timing + 2 + 1 edit
    pipe = Pipeline.from_pretrained()
    prompt, ids, image = seen[-1]
    assert prompt == instruction and np.array_equal(np.asarray(image), np.asarray(S.render(source)))
    assert torch.equal(ids, pipe.encode_references([S.render(target)])[0])


@pytest.mark.parametrize("flag, expected, keep", [
    ([], (None, None, None), None), (["--temperature", "0"], (0.0, None, None), None),
    (["--guidance", "2.5", "--guidance-interval", "0", "0.8"], (None, 2.5, [0.0, 0.8]), None),
    (["--keep-unchanged"], (None, None, None), True), (["--no-keep-unchanged"], (None, None, None), False)])
def test_eval_sampling_flags_reach_every_generation(tmp_path, monkeypatch, flag, expected, keep):
    """--temperature, --guidance and --guidance-interval override the model's defaults for prompts and edits alike,
    --keep-unchanged / --no-keep-unchanged for edits; without them the pipeline gets None (its own defaults)."""
    from glmimage.pipeline import Pipeline
    from glmimage.train import evaluate as TE

    seen, real_call = [], Pipeline.__call__

    def spy(self, *a, **k):
        seen.append((k["temperature"], k["guidance_scale"], k["guidance_interval"], k.get("keep_unchanged")))
        return real_call(self, *a, **k)

    monkeypatch.setattr(Pipeline, "__call__", spy)
    TE.main(["--n", "1", "--n-edit", "1", "--steps", "1", "--out", str(tmp_path), *flag])
    assert seen == [(*expected, None)] * 2 + [(*expected, keep)]      # timing + 1 prompt + 1 edit


def test_vae_roundtrip_eval_scores_ground_truth_through_the_vae(tmp_path, monkeypatch):
    """--vae-roundtrip: neither the AR nor the DiT runs; prompts and edit targets are rendered, encoded, decoded."""
    from glmimage.pipeline import Pipeline
    from glmimage.train import evaluate as TE

    monkeypatch.setattr(Pipeline, "__call__", lambda *a, **k: pytest.fail("the pipeline ran"))
    TE.main(["--n", "1", "--n-edit", "2", "--vae-roundtrip", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "report.json").read_text())
    assert [x["category"] for x in report["samples"]][1:] == [f"edit_{k}" for k, *_ in E.edit_cases(2, 1234)]
    assert report["scores"]["n_edit"] == 2


# ----------------------------------------------------------------------------------------------------
# Real data readers


def _png(colour, size=(48, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def test_image_text_folder(tmp_path):
    for i in range(8):
        (tmp_path / f"img{i}.png").write_bytes(_png((i * 30, 0, 0)))
        (tmp_path / f"img{i}.txt").write_text(f"caption {i}\n")
    (tmp_path / "orphan.png").write_bytes(_png((0, 0, 0)))
    data = folder.ImageTextFolder(tmp_path, size=32, seed=1)
    assert len(data) == 8 and data.missing_captions == 1
    first = [ex["caption"] for ex in data]
    assert first == [ex["caption"] for ex in folder.ImageTextFolder(tmp_path, size=32, seed=1)]
    assert sorted(first) == [f"caption {i}" for i in range(8)]
    data.set_epoch(1)
    assert [ex["caption"] for ex in data] != first
    ex = data[0]
    assert ex["image"].size == (32, 32) and ex["image"].mode == "RGB" and ex["key"] == "img0"
    wide = folder.ImageTextFolder(tmp_path, size=(64, 32), shuffle=False)[3]["image"]
    assert wide.size == (64, 32) and wide.getpixel((0, 0)) == (90, 0, 0)
    assert folder.ImageTextFolder(tmp_path)[0]["image"].size == (48, 32)  # size=None: as stored
    with pytest.raises(ValueError):
        folder.ImageTextFolder(tmp_path / "nothing", size=32)


def test_webdataset_shards(tmp_path):
    for s in range(2):
        with tarfile.open(tmp_path / f"shard-{s:02d}.tar", "w") as tar:
            for i in range(5):
                for ext, data in (("png", _png((s * 100, i * 40, 0))), ("txt", f"s{s} i{i}".encode())):
                    info = tarfile.TarInfo(f"s{s}_{i}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    pattern = str(tmp_path / "shard-{00..01}.tar")
    assert folder.expand_shards(pattern) == [str(tmp_path / "shard-00.tar"), str(tmp_path / "shard-01.tar")]
    data = folder.WebDatasetShards(pattern, size=32, seed=0, shuffle_buffer=4)
    captions = [ex["caption"] for ex in data]
    assert sorted(captions) == sorted(f"s{s} i{i}" for s in range(2) for i in range(5))
    assert captions == [ex["caption"] for ex in folder.WebDatasetShards(pattern, size=32, seed=0, shuffle_buffer=4)]
    ex = next(iter(data))
    assert ex["image"].size == (32, 32)
    split = [[ex["caption"] for ex in folder.WebDatasetShards(str(tmp_path / "*.tar"), 32, rank=r, world_size=2)]
             for r in range(2)]
    assert sorted(split[0] + split[1]) == sorted(captions) and not set(split[0]) & set(split[1])
    split = [[ex["caption"] for ex in folder.WebDatasetShards(pattern, 32, rank=r, world_size=3)] for r in range(3)]
    assert sorted(sum(split, [])) == sorted(captions)  # fewer shards than readers: split over samples


def test_compare_statistics_and_pairing(tmp_path):
    """Wilson intervals, McNemar's exact p, the prompt-level bootstrap, and pairing by category, seed and text."""
    from glmimage.eval_compare import compare, load_samples, mcnemar_p, summarize, wilson
    assert wilson(7, 10) == pytest.approx((0.3968, 0.8922), abs=1e-4) and wilson(0, 0) is None
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert mcnemar_p(0, 6) == 2 / 2 ** 6 and mcnemar_p(5, 5) == 1.0 and mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(3, 14) == pytest.approx(2 * sum(__import__("math").comb(17, i) for i in range(4)) / 2 ** 17)

    def report(path, seed, exact):
        samples = [{"category": "single", "prompt": f"scene {i}", "seed": seed + i, "exact": e,
                    "objects": [{"right": e}, {"right": True}]} for i, e in enumerate(exact)]
        samples.append({"category": "edit_move", "instruction": "move it", "source_caption": "x", "seed": seed,
                        "edit_success": True, "objects": []})
        path.mkdir()
        (path / "report.json").write_text(json.dumps({"samples": samples}))
        return path

    a = report(tmp_path / "a", 0, [True, False] * 5)
    b = report(tmp_path / "b", 0, [True] * 10)
    r = compare(load_samples([a]), load_samples([b]))
    assert r["scene_exact_single"] == {"n": 10, "a": 5, "b": 10, "a_only": 0, "b_only": 5, "p": 0.0625}
    assert r["object_accuracy"]["diff"] == 0.25 and 0 < r["object_accuracy"]["diff_ci95"][0] <= 0.25
    assert r["edit_success"]["p"] == 1.0 and r["n_paired"] == 11
    assert compare(load_samples([a]), load_samples([b])) == r                   # seeded: the same numbers
    one = summarize(load_samples([a]))
    assert one["scene_exact"]["ci95"] == wilson(5, 10) and one["object_accuracy"]["value"] == 0.75
    other_seed = report(tmp_path / "c", 100, [True] * 10)
    with pytest.raises(ValueError, match="share no sample"):
        compare(load_samples([a]), load_samples([other_seed]))
    pooled = compare(load_samples([a, other_seed]), load_samples([b, other_seed]))
    assert pooled["n_paired"] == 22 and pooled["scene_exact"]["a"] == 15
    with pytest.raises(ValueError, match="twice"):
        load_samples([a, a])
    with pytest.raises(ValueError, match="no report"):
        load_samples([tmp_path / "missing"])
