"""Benchmarks for the project (not collected by pytest: the name does not start with test_).

    python tests/benchmark.py metrics            # retrieval_metrics on an ICFG-PEDES-sized problem
    python tests/benchmark.py metrics --irra     # the same, plus IRRA's ranking method (~7 GB)

Every measurement runs in a fresh process, so that its peak memory is its own: the peak resident
size after the call minus the resident size just before it, i.e. what the call needed beyond the
similarity matrix and its inputs. Linux only (reads /proc/self/status).
"""

import argparse
import concurrent.futures
import json
import multiprocessing
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import evaluate  # noqa: E402  (needs the repository root on the path first)

# -----------------------------------------------------------------------------
# metrics: the ranking of ICFG-PEDES's test split (19,848 captions x 14,993 images, 1,000 ids)


def build_retrieval_problem(queries, gallery, identities, dim, seed):
    """Random unit features with random identities; similarity = text @ image.T in fp32."""
    generator = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(queries, dim, generator=generator), dim=1)       # [Q, D]
    image = F.normalize(torch.randn(gallery, dim, generator=generator), dim=1)      # [G, D]
    query_pids = torch.randint(identities, (queries,), generator=generator)         # [Q]
    gallery_pids = torch.randint(identities, (gallery,), generator=generator)       # [G]
    return text @ image.T, query_pids, gallery_pids                                 # [Q, G]


def irra_style_metrics(similarity, query_pids, gallery_pids):
    """IRRA's ranking method, re-written from its description (SPEC 2.4) for comparison only:
    sort every row of the whole matrix, mark the matches, then a Python loop over queries. Like
    the original it fails on a query without any relevant gallery item."""
    order = similarity.argsort(dim=1, descending=True)                             # [Q, G]
    matches = gallery_pids[order] == query_pids[:, None]                           # [Q, G]
    matches_so_far = matches.cumsum(1)                                             # [Q, G]
    recall = {k: (matches_so_far[:, k - 1] > 0).float().mean().item() * 100 for k in (1, 5, 10)}
    average_precisions, inverse_negative_penalties = [], []
    for query_matches, query_matches_so_far in zip(matches, matches_so_far):
        matched_ranks = query_matches.nonzero().squeeze(1)                         # 0-based
        precisions = query_matches_so_far[matched_ranks] / (matched_ranks + 1.0)
        average_precisions.append(precisions.mean().item())
        inverse_negative_penalties.append(precisions[-1].item())
    return {"R1": recall[1], "R5": recall[5], "R10": recall[10],
            "mAP": 100 * sum(average_precisions) / len(average_precisions),
            "mINP": 100 * sum(inverse_negative_penalties) / len(inverse_negative_penalties),
            "num_queries": len(average_precisions), "num_skipped": 0}


def resident_mb():
    """Current resident set size of this process, in MB (Linux)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def measure_metrics(method, args):
    """Runs in a fresh process: build the problem, then time one call of `method`."""
    problem = build_retrieval_problem(args.queries, args.gallery, args.identities, args.dim, args.seed)
    before_mb = resident_mb()
    start = time.perf_counter()
    if method == "irra":
        result = irra_style_metrics(*problem)
    else:
        result = evaluate.retrieval_metrics(*problem, chunk_size=args.chunk_size)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024            # KB on Linux
    # The peak may predate the call (building the problem); then this over-reports, never under.
    return {"method": method, "seconds": round(seconds, 2),
            "peak_extra_mb": round(max(0.0, peak_mb - before_mb)), "threads": torch.get_num_threads(),
            **{key: round(value, 4) if isinstance(value, float) else value for key, value in result.items()}}


def run_metrics(args):
    methods = ["chunked"] + (["irra"] if args.irra else [])
    results = []
    for method in methods:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            results.append(pool.submit(measure_metrics, method, args).result())
    matrix_mb = args.queries * args.gallery * 4 / 2**20
    print(f"problem: {args.queries} queries x {args.gallery} gallery, {args.identities} identities, "
          f"similarity matrix {matrix_mb:.0f} MB, chunk size {args.chunk_size}")
    columns = ["method", "seconds", "peak_extra_mb", "R1", "R5", "R10", "mAP", "mINP", "num_skipped"]
    print("  ".join(f"{column:>13}" for column in columns))
    for result in results:
        print("  ".join(f"{result[column]:>13}" for column in columns))
    print(json.dumps({"benchmark": "metrics", "queries": args.queries, "gallery": args.gallery,
                      "identities": args.identities, "chunk_size": args.chunk_size, "results": results}))


# -----------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    metrics = commands.add_parser("metrics", help="time retrieval_metrics and measure its peak memory")
    metrics.add_argument("--queries", type=int, default=19848)
    metrics.add_argument("--gallery", type=int, default=14993)
    metrics.add_argument("--identities", type=int, default=1000)
    metrics.add_argument("--dim", type=int, default=512)
    metrics.add_argument("--chunk-size", type=int, default=1024, help="queries per chunk")
    metrics.add_argument("--seed", type=int, default=0)
    metrics.add_argument("--irra", action="store_true",
                         help="also time IRRA's method (full argsort + Python loop; ~25 s, ~7 GB)")
    metrics.set_defaults(run=run_metrics)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
