"""Recommendation latency for one user over 10k, 100k and 1M items: exact top-k (`torch.topk` over every
item's score, what `recommend(search="exact")` does) against FAISS (an exact IndexFlatIP, what
search="faiss" builds, and an approximate HNSW index), with the recall@20 of each index against the
exact top 20.  Item embeddings are random (unit directions and a bias column, as the two-tower model's);
with --run, a trained recommender's whole `recommend` call is timed too (user tower included).

    python bench/recommend_latency.py [--sizes 10000 100000 1000000] [--queries 200] [--run RUN]

Prints p50 and p95 in milliseconds, the ratio exact / FAISS, and the machine's fp32 matmul rate.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from glimpse.hardware import matmul_gflops

K = 20


def percentiles(times: list[float]) -> tuple[float, float]:
    ms = np.array(times) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 95))


def timed(fn, queries) -> tuple[list[float], list]:
    times, out = [], []
    for q in queries:
        t = time.perf_counter()
        out.append(fn(q))
        times.append(time.perf_counter() - t)
    return times, out


def random_items(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)
    return torch.cat([v, 0.5 * torch.randn(n, 1, generator=g)], dim=1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--ef-search", type=int, default=256, help="HNSW's search breadth (recall against speed)")
    p.add_argument("--hnsw-max", type=int, default=100_000, help="build HNSW indexes up to this many items (slow to build)")
    p.add_argument("--run", help="also time a trained recommender's recommend() on its own catalogue")
    a = p.parse_args()
    print(f"fp32 matmul: {matmul_gflops():.1f} GFLOP/s, torch threads {torch.get_num_threads()}")
    import faiss  # after torch (faiss' OpenMP runtime clashes with torch's when it is loaded first)

    print(f"{'items':>9} {'method':>12} {'p50 ms':>8} {'p95 ms':>8} {'recall@20':>10} {'exact/this p50':>15}")
    for n in a.sizes:
        items = random_items(n, a.dim)
        g = torch.Generator().manual_seed(1)
        users = torch.cat([10 * torch.nn.functional.normalize(torch.randn(a.queries, a.dim, generator=g), dim=-1),
                           torch.ones(a.queries, 1)], dim=1)

        def exact(u, items=items):
            return (items @ u).topk(K).indices.numpy()

        t_exact, ref = timed(exact, users)
        p50_exact, p95_exact = percentiles(t_exact)
        print(f"{n:>9} {'torch.topk':>12} {p50_exact:>8.2f} {p95_exact:>8.2f} {1.0:>10.3f} {1.0:>15.2f}")
        table = np.ascontiguousarray(items.numpy(), dtype=np.float32)
        flat = faiss.IndexFlatIP(table.shape[1])
        flat.add(table)
        indexes = [("faiss flat", flat)]
        if n <= a.hnsw_max:
            hnsw = faiss.IndexHNSWFlat(table.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efSearch = a.ef_search
            t = time.perf_counter()
            hnsw.add(table)
            build = time.perf_counter() - t
            indexes.append(("faiss hnsw", hnsw))
        for name, index in indexes:
            times, got = timed(lambda u, index=index: index.search(u.numpy()[None].astype(np.float32), K)[1][0], users)
            recall = np.mean([len(set(x) & set(r)) / K for x, r in zip(got, ref)])
            p50, p95 = percentiles(times)
            print(f"{n:>9} {name:>12} {p50:>8.2f} {p95:>8.2f} {recall:>10.3f} {p50_exact / p50:>15.2f}")
        if n <= a.hnsw_max:
            print(f"{'':>9} (hnsw built in {build:.1f} s, M=32, efSearch={a.ef_search})")
    if a.run:
        import glimpse

        pipe = glimpse.load(a.run)
        shop = pipe.shop
        histories = [[shop.item_ids[i] for i in shop.history(u, "test")] for u in range(min(a.queries, len(shop.train)))]
        pipe.recommend([histories[0]], K)  # item embeddings computed once, as a server does
        for search in ("exact", "faiss"):
            times, _ = timed(lambda h, search=search: pipe.recommend([h], K, search=search), histories)
            p50, p95 = percentiles(times)
            print(f"run {a.run}: recommend(search={search}) over {len(shop.item_ids)} items, user tower "
                  f"included: p50 {p50:.2f} ms, p95 {p95:.2f} ms")


if __name__ == "__main__":
    main()
