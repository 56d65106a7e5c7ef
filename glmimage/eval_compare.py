"""Paired comparison of scene-evaluation reports: is model B better than model A on the same prompts, or is it noise?

    glmimage eval compare --a runs/eval/v5-777 runs/eval/v5-4242 --b runs/eval/v6-777 runs/eval/v6-4242
    glmimage eval compare --a runs/eval/v6-1234                 # one side: each score with its 95% interval

`glmimage eval scenes` draws its prompts and edits from the seed alone (eval_scenes.t2i_cases / edit_cases), so two
models evaluated with the same --seed see the same prompts, and a report's samples pair up one to one. Pairing is
what makes a small difference measurable: most prompts are right (or wrong) for both models, and only the ones where
they differ carry information. Several reports per side are pooled (each sample keyed by its category, seed and
text, so different seeds never pair with each other); only the samples present on both sides are compared.

Statistics (all exact or seeded, so a rerun prints the same numbers):
  * a yes/no score per sample (scene exactly right, word read back, edit succeeded): the two counts, the samples
    only A got right (a_only) and only B got right (b_only), and McNemar's exact two-sided p-value, the binomial
    probability of a split at least as uneven as a_only : b_only if both models were equally good; one side alone:
    a Wilson 95% interval;
  * object accuracy (objects right over objects asked, pooled over prompts): the difference B - A with a 95%
    interval from a paired bootstrap over prompts (objects of one image are not independent, so prompts are
    resampled, not objects); one side alone: the same bootstrap.
"""
from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

YES_NO = {  # score -> (which samples it covers, the sample's field)
    "scene_exact": (lambda s: not s["category"].startswith("edit_"), "exact"),
    "scene_exact_single": (lambda s: s["category"] == "single", "exact"),
    "scene_exact_multi": (lambda s: s["category"] == "multi", "exact"),
    "word_latin": (lambda s: s["category"] == "word_latin", "word_right"),
    "word_unseen": (lambda s: s["category"] == "word_unseen", "word_right"),
    "word_chinese": (lambda s: s["category"] == "word_chinese", "word_right"),
    "edit_success": (lambda s: s["category"].startswith("edit_"), "edit_success"),
}
BOOTSTRAP = 10000


def sample_key(s: dict) -> tuple:
    """What identifies a prompt (or an edit) across runs: its category, seed and text."""
    text = s.get("prompt") or (s.get("source_caption"), s.get("instruction"))
    return s["category"], s["seed"], text


def load_samples(paths: list[str | Path]) -> dict[tuple, dict]:
    """report.json files (or the folders holding them) -> their samples by sample_key, pooled."""
    samples: dict[tuple, dict] = {}
    for p in paths:
        p = Path(p)
        p = p / "report.json" if p.is_dir() else p
        if not p.exists():
            raise ValueError(f"no report at {p} (give a report.json or the folder `glmimage eval scenes` wrote)")
        for s in json.loads(p.read_text())["samples"]:
            k = sample_key(s)
            if k in samples:
                raise ValueError(f"{p}: the sample {k} appears twice on one side (the same report given twice?)")
            samples[k] = s
    return samples


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float] | None:
    """Wilson score interval of k successes in n trials (95% by default); None when n = 0."""
    if n == 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_p(a_only: int, b_only: int) -> float:
    """McNemar's exact two-sided p-value: P(a split at least this uneven | each discordant pair a fair coin)."""
    n, k = a_only + b_only, min(a_only, b_only)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def bootstrap_interval(stats: list[tuple[float, ...]], fn, seed: int = 0, n: int = BOOTSTRAP) -> tuple[float, float]:
    """95% percentile interval of fn(sum of each column) over `n` resamples (with replacement) of the rows."""
    rng = random.Random(seed)
    m = len(stats)
    values = []
    for _ in range(n):
        rows = [stats[rng.randrange(m)] for _ in range(m)]
        values.append(fn(*(sum(col) for col in zip(*rows))))
    values.sort()
    return values[int(0.025 * n)], values[int(0.975 * n) - 1]


def _objects(s: dict) -> tuple[int, int]:
    return sum(o["right"] for o in s["objects"]), len(s["objects"])


def summarize(samples: dict[tuple, dict]) -> dict:
    """One side alone: each score with its 95% interval."""
    out = {}
    t2i = [s for s in samples.values() if not s["category"].startswith("edit_") and s["objects"]]
    if t2i:
        stats = [_objects(s) for s in t2i]
        right, asked = (sum(c) for c in zip(*stats))
        out["object_accuracy"] = {"value": right / asked, "right": right, "asked": asked,
                                  "ci95": bootstrap_interval(stats, lambda r, n: r / n)}
    for name, (covers, field) in YES_NO.items():
        ys = [bool(s[field]) for s in samples.values() if covers(s) and field in s]
        if ys:
            out[name] = {"value": sum(ys) / len(ys), "yes": sum(ys), "n": len(ys), "ci95": wilson(sum(ys), len(ys))}
    return out


def compare(a: dict[tuple, dict], b: dict[tuple, dict]) -> dict:
    """Paired scores of B against A over the samples both hold (see the module docstring)."""
    keys = [k for k in a if k in b]
    if not keys:
        raise ValueError("the two sides share no sample: evaluate both models with the same --seed (and --n / "
                         "--n-edit covering the same prompts)")
    out = {"n_paired": len(keys), "a_only_samples": len(a) - len(keys), "b_only_samples": len(b) - len(keys)}
    t2i = [k for k in keys if not k[0].startswith("edit_") and a[k]["objects"]]
    if t2i:
        stats = [(*_objects(a[k]), _objects(b[k])[0]) for k in t2i]              # (A right, asked, B right)
        ra, asked, rb = (sum(c) for c in zip(*stats))
        out["object_accuracy"] = {"a": ra / asked, "b": rb / asked, "asked": asked, "diff": (rb - ra) / asked,
                                  "diff_ci95": bootstrap_interval(stats, lambda x, n, y: (y - x) / n)}
    for name, (covers, field) in YES_NO.items():
        pairs = [(bool(a[k][field]), bool(b[k][field])) for k in keys if covers(a[k]) and field in a[k]
                 and field in b[k]]
        if not pairs:
            continue
        a_only = sum(x and not y for x, y in pairs)
        b_only = sum(y and not x for x, y in pairs)
        out[name] = {"n": len(pairs), "a": sum(x for x, _ in pairs), "b": sum(y for _, y in pairs),
                     "a_only": a_only, "b_only": b_only, "p": mcnemar_p(a_only, b_only)}
    return out


def _table(result: dict, paired: bool) -> str:
    rows = []
    for name, r in result.items():
        if not isinstance(r, dict):
            continue
        if paired and name == "object_accuracy":
            lo, hi = r["diff_ci95"]
            rows.append(f"{name:20s} A {r['a']:.1%}  B {r['b']:.1%}  B-A {r['diff']:+.1%} [{lo:+.1%}, {hi:+.1%}]  "
                        f"({r['asked']} objects)")
        elif paired:
            rows.append(f"{name:20s} A {r['a']}/{r['n']}  B {r['b']}/{r['n']}  only A {r['a_only']}, only B "
                        f"{r['b_only']}  p = {r['p']:.3g}")
        else:
            lo, hi = r["ci95"]
            n = r.get("asked", r.get("n"))
            rows.append(f"{name:20s} {r['value']:.1%} [{lo:.1%}, {hi:.1%}]  (n = {n})")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="glmimage eval compare", description=__doc__.split("\n")[0])
    ap.add_argument("--a", nargs="+", required=True, metavar="REPORT", help="report.json files or their folders")
    ap.add_argument("--b", nargs="+", default=None, metavar="REPORT", help="the other model's, same seeds")
    ap.add_argument("--out", default=None, help="also write the result here as JSON")
    args = ap.parse_args(argv)
    try:
        a = load_samples(args.a)
        result = summarize(a) if args.b is None else compare(a, load_samples(args.b))
    except ValueError as e:
        ap.exit(2, f"glmimage eval compare: error: {e}\n")
    if args.out:
        Path(args.out).write_text(json.dumps({"a": args.a, "b": args.b, **result}, indent=1))
    print(_table(result, args.b is not None))
    return result


if __name__ == "__main__":
    main()
