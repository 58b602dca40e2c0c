"""Serving under load: static against continuous batching, in one run, on the serving loop itself
(corematching.apps.serve.continuous.ContinuousBatcher, in process: no HTTP, so the numbers are the scheduler's).

    python benchmarks/bench_serve.py                                   # the full table (a GPU-sized run)
    python benchmarks/bench_serve.py --clients 1 4 --requests 8 --long 16 32 --threads 2   # a small run

Closed-loop clients (1/4/16/32 by default) each send an easy-vqa test image with its question, wait for the
answer, and send the next. Requests are a seeded mix of short answers (4-8 tokens) and long ones (64-256 tokens),
generated to exactly that length (the end token is ignored), with the dense model and with CoreMatching.
  - static: a batch of the waiting requests (up to --max-batch) runs until its longest request ends, and every
    request of it is answered then (today's one `generate` call per batch); the next batch starts after it;
  - continuous: requests join the running batch at the step after their prefill and leave it the step they end.
Per cell: requests/s, generated tokens/s, p50/p95 time to first token, and p50/p95 latency of short and of long
requests. The targets at 16 clients: continuous throughput >= 1.5x static, p95 latency of short requests <= half
of static's; at 1 client no worse. Results go to --output (JSON) and, as a table with the command, to --doc.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image

import corematching as cm
from corematching.apps.serve.continuous import ContinuousBatcher
from corematching.apps.serve.metrics import percentile
from corematching.apps.serve.sequence import Sequence

METHODS = {"dense": lambda: cm.Dense(), "corematching": lambda: cm.CoreMatching(token_budget=0.25)}
SCHEDULES = ("static", "continuous")


def questions(count: int) -> list[tuple[Image.Image, str]]:
    """(image, question) of the first `count` easy-vqa test images."""
    from corematching.zoo import data

    paths = data.image_paths("test")
    grouped = data.by_image(data.questions("test"))
    out = []
    for image_id in sorted(grouped)[:count]:
        image = Image.open(io.BytesIO(Path(paths[image_id]).read_bytes())).convert("RGB")
        out.append((image, grouped[image_id][0].question))
    return out


def encode(model, processor, image, question: str) -> dict:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt").to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return dict(inputs)


def run_cell(model, processor, prompts, method, schedule: str, clients: int, requests: int, args, seed: int) -> dict:
    """`requests` requests from `clients` closed-loop clients; returns the cell's measurements."""
    rng = random.Random(seed)
    plan = []  # (class, max_tokens, prompt) of each request, in sending order
    for index in range(requests):
        short = rng.random() < args.short_share
        low, high = args.short if short else args.long
        plan.append(("short" if short else "long", rng.randint(low, high), prompts[index % len(prompts)]))
    static = schedule == "static"
    batcher = ContinuousBatcher(model, max_batch=args.max_batch, pad_id=processor.tokenizer.pad_token_id or 0,
                                static=static, join_wait_steps=0 if static else args.join_wait_steps)
    done: list[Sequence] = []
    sent = 0

    def send() -> None:
        nonlocal sent
        kind, max_tokens, inputs = plan[sent]
        sent += 1
        sequence = Sequence(inputs=inputs, max_tokens=max_tokens, method=method, tokenizer=processor.tokenizer,
                            tag=kind, on_done=finished)
        batcher.submit(sequence)

    def finished(sequence: Sequence) -> None:  # the client sends its next request at once
        done.append(sequence)
        if sent < requests:
            send()

    started = time.perf_counter()
    for _ in range(min(clients, requests)):
        send()
    batch_sizes = []
    while len(done) < requests:
        batcher.step()
        batch_sizes.append(batcher.metrics()["batch_size"])
    wall = time.perf_counter() - started
    batcher.close()
    tokens = sum(len(s.text.tokens) for s in done)
    row = {"requests": len(done), "wall_s": wall, "requests_per_s": len(done) / wall, "tokens_per_s": tokens / wall,
           "mean_batch": sum(batch_sizes) / max(1, len(batch_sizes)), "prefills": batcher.prefills,
           "join_wait_steps": batcher.join_wait_steps}
    ttft = [s.first_token_at - s.submitted_at for s in done]
    row["ttft_p50_s"], row["ttft_p95_s"] = percentile(ttft, 0.5), percentile(ttft, 0.95)
    for kind in ("short", "long"):
        latency = [s.finished_at - s.submitted_at for s in done if s.tag == kind]
        row[f"{kind}_count"] = len(latency)
        row[f"{kind}_p50_s"], row[f"{kind}_p95_s"] = percentile(latency, 0.5), percentile(latency, 0.95)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| method | schedule | clients | round | requests/s | tokens/s | TTFT p50 / p95 (s) | "
             "short p50 / p95 (s) | long p50 / p95 (s) | mean batch |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['schedule']} | {r['clients']} | {r.get('round', 0)} | {r['requests_per_s']:.2f} "
            f"| {r['tokens_per_s']:.1f} | {r['ttft_p50_s']:.2f} / {r['ttft_p95_s']:.2f} "
            f"| {r['short_p50_s']:.2f} / {r['short_p95_s']:.2f} | {r['long_p50_s']:.2f} / {r['long_p95_s']:.2f} "
            f"| {r['mean_batch']:.1f} |")
    return "\n".join(lines)


def ratios(rows: list[dict]) -> str:
    """Continuous against static per method and client count: throughput ratio and short p95 ratio, each the
    median of the per-round ratios (with the range when there are several rounds)."""
    lines = ["| method | clients | rounds | throughput continuous / static | short p95 continuous / static |",
             "|---|---:|---:|---:|---:|"]
    cells = {(r["method"], r["clients"], r.get("round", 0), r["schedule"]): r for r in rows}
    pairs: dict[tuple, list[tuple[float, float]]] = {}
    for (method, clients, round_index, schedule), cont in cells.items():
        static = cells.get((method, clients, round_index, "static"))
        if schedule != "continuous" or static is None:
            continue
        short = cont["short_p95_s"] / static["short_p95_s"] if static["short_p95_s"] > 0 else float("nan")
        pairs.setdefault((method, clients), []).append((cont["tokens_per_s"] / static["tokens_per_s"], short))
    for (method, clients), values in pairs.items():
        speed, short = ([v[i] for v in values] for i in (0, 1))
        lines.append(f"| {method} | {clients} | {len(values)} | {spread(speed, 'x')} | {spread(short, '')} |")
    return "\n".join(lines)


def spread(values: list[float], unit: str) -> str:
    """The median, and the range in brackets when there are several values."""
    text = f"{statistics.median(values):.2f}{unit}"
    return text if len(values) == 1 else f"{text} ({min(values):.2f}-{max(values):.2f})"


def plot(rows: list[dict], path: Path) -> None:
    """Throughput and p95 latency of short requests against clients, static against continuous, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (speed, latency) = plt.subplots(1, 2, figsize=(10, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        for schedule, style in (("static", "--"), ("continuous", "-")):
            cells = [r for r in rows if r["method"] == method and r["schedule"] == schedule]
            clients = sorted({r["clients"] for r in cells})
            if not clients:
                continue
            label = f"{method}, {schedule}"
            for axes, key in ((speed, "tokens_per_s"), (latency, "short_p95_s")):  # the median over rounds
                medians = [statistics.median(r[key] for r in cells if r["clients"] == c) for c in clients]
                axes.plot(clients, medians, style, marker="o", label=label)
    for axes, title in ((speed, "throughput (generated tokens/s)"), (latency, "short requests: p95 latency (s)")):
        axes.set_xscale("log", base=2)
        axes.set_xlabel("closed-loop clients")
        axes.set_title(title)
        axes.grid(alpha=0.3)
    speed.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="evqa-smollm2")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--requests", type=int, nargs="+", default=[64],
                        help="requests per cell: one count for every client count, or one per --clients entry")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every cell this many times (the schedules' order alternates per round)")
    parser.add_argument("--short", type=int, nargs=2, default=[4, 8], help="short answers: min and max tokens")
    parser.add_argument("--long", type=int, nargs=2, default=[64, 256], help="long answers: min and max tokens")
    parser.add_argument("--short-share", type=float, default=0.5)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--join-wait-steps", type=int, default=0,
                        help="continuous: decode steps an arrival may wait for others to share its prefill")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/serve_load.json"))
    parser.add_argument("--doc", default="docs/serving-load.md", help="the page the table is for ('' for none)")
    parser.add_argument("--plot", type=Path, default=None, help="draw the results as a PNG here")
    parser.add_argument("--plot-only", action="store_true", help="only draw --plot from the rows in --output")
    args = parser.parse_args()
    if args.plot_only:
        if args.plot is None:
            parser.error("--plot-only needs --plot PATH")
        plot(json.loads(args.output.read_text()), args.plot)
        return
    requests_per_cell = args.requests if len(args.requests) > 1 else args.requests * len(args.clients)
    if len(requests_per_cell) != len(args.clients):
        parser.error(f"--requests takes one count or one per client count ({len(args.clients)}), "
                     f"not {len(args.requests)}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = cm.load_model(args.model, device=args.device)
    prompts = [encode(model, processor, image, question) for image, question in questions(16)]
    rows = []
    with torch.no_grad():
        for name in args.methods:  # warm-up: one request per schedule
            for schedule in SCHEDULES:
                run_cell(model, processor, prompts, METHODS[name](), schedule, 1, 1, args, seed=0)
        for clients, requests in zip(args.clients, requests_per_cell):
            for round_index in range(args.rounds):
                for name in args.methods:
                    order = SCHEDULES if round_index % 2 == 0 else SCHEDULES[::-1]
                    for schedule in order:  # the same seeded plan for both schedules
                        row = run_cell(model, processor, prompts, METHODS[name](), schedule, clients, requests,
                                       args, seed=clients)
                        row.update(method=name, schedule=schedule, clients=clients, round=round_index)
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(rows, indent=1) + "\n")
    device = str(next(model.parameters()).device)
    command = "python " + " ".join(sys.argv)
    text = (f"{table(rows)}\n\n{ratios(rows)}\n\n`{command}` on {device} ({torch.get_num_threads()} threads, "
            f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the end)\n")
    print("\n" + text)
    if args.plot:
        plot(rows, args.plot)
    if args.doc:
        print(f"(paste into {args.doc}; rows in {args.output})")


if __name__ == "__main__":
    main()
