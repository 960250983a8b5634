"""Print, per zoo model: build time, parameter counts (total and per part) and the CPU eval forward time at batch 1
and the model's crop size (median of --repeats after one warm-up). Figures only; nothing is asserted.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_models.py [--models NAME ...] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from knetlab.models import count_parameters, create_model
from knetlab.models.zoo import SEMANTIC_MODELS as MODELS  # the semantic rows: this bench times crop-size forwards


def bench(name: str, repeats: int) -> dict:
    torch.manual_seed(0)
    start = time.perf_counter()
    model = create_model(name).eval()
    build_s = time.perf_counter() - start
    counts = count_parameters(model)
    crop = MODELS[name].crop_size
    images = torch.randn(1, 3, crop, crop)
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            model(images)
            times.append(time.perf_counter() - start)
    return {"name": name, "build_s": build_s, "counts": counts, "crop": crop, "forward_s": statistics.median(times[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), help="zoo names (default: all semantic)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, batch 1, eval, median of {args.repeats}")
    print(f"{'model':56} {'build s':>8} {'params':>12} {'backbone':>11} {'gen. head':>11} {'update x3':>10} "
          f"{'aux':>9} {'crop':>5} {'forward s':>9}")
    for name in args.models:
        r = bench(name, args.repeats)
        c = r["counts"]
        updates = sum(v for k, v in c.items() if k.startswith("kernel_update_head."))
        print(f"{name:56} {r['build_s']:8.2f} {c['total']:12,} {c['backbone']:11,} {c['kernel_generate_head']:11,} "
              f"{updates:10,} {c.get('auxiliary_head', 0):9,} {r['crop']:5} {r['forward_s']:9.2f}", flush=True)


if __name__ == "__main__":
    main()
