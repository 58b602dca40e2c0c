"""Load on `corematching serve` (bounded, 127.0.0.1 only): requests/s and p50/p95 latency at 1, 4 and 16
concurrent clients, dense vs CoreMatching (chosen per request with the extension field), batching on vs off.

    python benchmarks/bench_serve_http.py                         # the README's table and plot
    python benchmarks/bench_serve_http.py --requests 16 --rounds 1 --concurrency 1 4

Each client sends easy-vqa test questions (one image each) through the official `openai` client and waits for
the answer before sending the next (closed loop). One server per batching setting, both started on free loopback
ports; every cell sends the same `--requests` questions, after a warm-up, in `--rounds` interleaved rounds
(alternating order) so that a change of machine load shows in every cell alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

from corematching.apps.serve.examples import test_images
from corematching.apps.serve.process import ServerProcess

METHODS = {"dense": {"method": "dense"}, "corematching": {"method": "corematching", "token_budget": 0.25}}
BATCHING = {"on": ["--batching", "static", "--max-batch-size", "16", "--max-wait-ms", "20"],
            "off": ["--batching", "static", "--max-batch-size", "1"],
            "continuous": ["--batching", "continuous", "--max-batch-size", "16"]}  # "on": static batching
STYLES = {"on": "-", "off": "--", "continuous": ":"}
COMMON = ["--no-prompt-cache", "--max-queue", "64"]  # every cell repeats the same questions: no cache hits


def workload(count: int) -> list[tuple[str, str, str]]:
    """(image data URL, question, answer) for the first `count` test questions, one per image."""
    return [(item["url"], item["question"], item["answer"]) for item in test_images(count)]


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    rank = share * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def run_cell(client, items, method: dict, concurrency: int, max_tokens: int) -> dict:
    queue = list(items)
    lock = threading.Lock()
    latencies, batch_sizes, kept, correct = [], [], [], 0

    def client_loop(_):
        nonlocal correct
        while True:
            with lock:
                if not queue:
                    return
                url, question, answer = queue.pop()
            started = time.perf_counter()
            reply = client.chat.completions.create(
                model="evqa-smollm2", max_tokens=max_tokens, extra_body={"corematching": method},
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                       {"type": "text", "text": question}]}])
            elapsed = time.perf_counter() - started
            usage = reply.usage.model_dump()
            with lock:
                latencies.append(elapsed)
                batch_sizes.append(usage["batch_size"])
                kept.append(usage["visual_tokens_kept"])
                correct += reply.choices[0].message.content == answer

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client_loop, range(concurrency)))
    wall = time.perf_counter() - started
    return {
        "latencies": latencies,
        "wall_s": wall,
        "requests_per_s": len(latencies) / wall,
        "mean_batch": statistics.mean(batch_sizes),
        "visual_tokens_kept": statistics.mean(kept),
        "accuracy": correct / len(latencies),
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for method in METHODS:
        for batching, style in STYLES.items():
            cells = [r for r in rows if r["method"] == method and r["batching"] == batching]
            if not cells:
                continue
            x = [r["concurrency"] for r in cells]
            label = f"{method}, batching {batching}"
            left.plot(x, [r["requests_per_s"] for r in cells], style, marker="o", label=label)
            right.plot(x, [r["p95_s"] for r in cells], style, marker="o", label=label)
    for axis, title in ((left, "throughput (requests/s)"), (right, "p95 latency (s)")):
        axis.set_xscale("log", base=2)
        clients = sorted({r["concurrency"] for r in rows})
        axis.set_xticks(clients, [str(c) for c in clients])
        axis.set_xlabel("concurrent clients")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    left.legend(fontsize=8)
    figure.suptitle("corematching serve, evqa-smollm2, CPU fp32")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def merge(parts: list[dict]) -> dict:
    """One cell from its rounds: the median round's requests/s (and the range), latencies pooled."""
    latencies = [x for part in parts for x in part["latencies"]]
    rates = [part["requests_per_s"] for part in parts]
    return {
        "requests": len(latencies),
        "requests_per_s": statistics.median(rates),
        "requests_per_s_min": min(rates),
        "requests_per_s_max": max(rates),
        "p50_s": percentile(latencies, 0.5),
        "p95_s": percentile(latencies, 0.95),
        "mean_batch": statistics.mean(part["mean_batch"] for part in parts),
        "visual_tokens_kept": statistics.mean(part["visual_tokens_kept"] for part in parts),
        "accuracy": statistics.mean(part["accuracy"] for part in parts),
        "load_average_1min": max(part["load_average_1min"] for part in parts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=24, help="requests per cell and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all cells, in alternating order")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each server")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/serve.json"))
    parser.add_argument("--plot", type=Path, default=Path("benchmarks/results/serve.png"))
    parser.add_argument("--batching", nargs="+", choices=list(BATCHING), default=["on", "off"],
                        help="server settings to compare: on (static batches), off (one request at a time), "
                             "continuous (serve --batching continuous)")
    args = parser.parse_args()
    items = workload(args.requests)
    servers = {batching: ServerProcess([*flags, *COMMON, "--threads", str(args.threads)])
               for batching, flags in BATCHING.items() if batching in args.batching}
    try:
        clients = {}
        for batching, server in servers.items():  # both up at once; an idle server costs no CPU
            server.start()
            clients[batching] = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0,
                                              timeout=600)
            for method in METHODS.values():  # warm-up
                run_cell(clients[batching], items[:4], method, 1, args.max_tokens)
        cells = [(c, m, b) for c in args.concurrency for m in METHODS for b in args.batching]
        parts: dict[tuple, list] = {cell: [] for cell in cells}
        for round_index in range(args.rounds):  # interleaved, so that a change in machine load hits every cell
            for cell in cells if round_index % 2 == 0 else reversed(cells):
                concurrency, name, batching = cell
                part = run_cell(clients[batching], items, METHODS[name], concurrency, args.max_tokens)
                part["load_average_1min"] = os.getloadavg()[0]
                parts[cell].append(part)
                print(json.dumps({"round": round_index, "method": name, "batching": batching,
                                  "concurrency": concurrency, **{k: v for k, v in part.items() if k != "latencies"}}),
                      flush=True)
    finally:
        for server in servers.values():
            server.stop()
    rows = [{"method": m, "batching": b, "concurrency": c, **merge(parts[(c, m, b)])} for c, m, b in cells]
    rows.sort(key=lambda r: (r["method"], r["batching"] == "off", r["concurrency"]))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, args.plot)
    print("\n| method | batching | clients | requests/s (median of rounds) | range over rounds | p50 latency (s) | "
          "p95 latency (s) | mean batch | visual tokens kept | accuracy |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['batching']} | {r['concurrency']} | {r['requests_per_s']:.2f} | "
              f"{r['requests_per_s_min']:.2f}-{r['requests_per_s_max']:.2f} | {r['p50_s']:.3f} | {r['p95_s']:.3f} | "
              f"{r['mean_batch']:.1f} | {r['visual_tokens_kept']:.0f} | {r['accuracy']:.0%} |")
    loads = [r["load_average_1min"] for r in rows]
    print(f"\nCPU load average (1 min) during the cells: up to {max(loads):.1f} on {os.cpu_count()} cores")
    print(f"plot: {args.plot}\nrows: {args.output}")


if __name__ == "__main__":
    main()
