"""Peak memory of streaming exact pairwise attention at n = m = 65,536, d = 8, float32.

Run:  python benchmarks/exact_memory.py [--n 65536] [--d 8]

Reports the process's peak resident set size (ru_maxrss) before and after the call, and the time.
The exact backend streams over key blocks with online softmax, so its working set is
O(n * block), never O(n * m) (which would be 16 GiB here).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import tensorattn as ta
from tensorattn.bench.measure import process_peak_rss_mib as peak_rss_mib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=65536)
    parser.add_argument("--d", type=int, default=8)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    q, k, v = (torch.from_numpy(rng.uniform(-1, 1, (args.n, args.d)).astype(np.float32)) for _ in range(3))
    ta.attention(q[:64], k[:256], v[:256], backend="exact")  # warm up imports and caches
    before = peak_rss_mib()
    t0 = time.perf_counter()
    out = ta.attention(q, k, v, backend="exact", scale=1 / args.d)
    elapsed = time.perf_counter() - t0
    after = peak_rss_mib()
    dense = args.n * args.n * 4 / 2**20
    print(json.dumps({
        "n": args.n, "d": args.d, "dtype": "float32", "threads": torch.get_num_threads(),
        "peak_rss_before_mib": round(before, 1), "peak_rss_after_mib": round(after, 1),
        "dense_score_matrix_mib": round(dense, 1), "seconds": round(elapsed, 2),
        "finite": bool(torch.isfinite(out).all()),
    }, indent=2))


if __name__ == "__main__":
    main()
