"""Int8Linear on a CPU: the int8 kernel (`_weight_int8pack_mm`, bf16 activations) against converting the weight for a
GEMM, by rows per call; and whether a row's result depends on how many rows come with it. Int8Linear takes the kernel
up to 16 rows (decode, a speculative verify, a small batch).

    python benchmarks/int8_rows.py --out benchmarks/results/int8-rows-cpu.json
"""
from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from glmimage.bench import write_report
from glmimage.quantize import Int8Linear

SHAPES = [(512, 768), (512, 3072), (1536, 512), (4096, 4608), (4096, 27392)]   # medium AR / official AR linears


def us(fn, n: int) -> float:
    for _ in range(5):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,4,5,9,16,32")
    ap.add_argument("--n", type=int, default=50, help="timed calls per point")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = [int(r) for r in args.rows.split(",")]
    report = {"device": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "results": []}
    for i, o in SHAPES:
        q = Int8Linear.from_linear(torch.nn.Linear(i, o))
        x = torch.randn(max(rows), i)
        alone = torch.cat([torch.ops.aten._weight_int8pack_mm(x[j:j + 1].bfloat16(), q.weight, q.scales.bfloat16())
                           for j in range(max(rows))])
        for m in rows:
            xm = x[:m]
            kernel = us(lambda: torch.ops.aten._weight_int8pack_mm(xm.bfloat16(), q.weight, q.scales.bfloat16()),
                        args.n)
            convert = us(lambda: F.linear(xm, q.weight.float()) * q.scales, max(args.n // 10, 3))
            same = torch.equal(torch.ops.aten._weight_int8pack_mm(xm.bfloat16(), q.weight, q.scales.bfloat16()),
                               alone[:m])
            r = {"shape": [o, i], "rows": m, "kernel_us": round(kernel, 1), "convert_gemm_us": round(convert, 1),
                 "rows_as_alone": same}
            report["results"].append(r)
            print(r, flush=True)
    write_report(report, args.out)


if __name__ == "__main__":
    main()
