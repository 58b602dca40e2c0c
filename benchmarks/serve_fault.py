"""Fault and load test of `corematching serve` (127.0.0.1 only, bounded in count and time, stops by itself).

    python benchmarks/serve_fault.py                                   # the figures of docs/serving-security.md
    python benchmarks/serve_fault.py --rounds 3 --per-kind 2 --clients 6 --output runs/fault.json

One server (the bundled model, an API key, a small body limit, an allowed image directory, prompt cache on)
on a free loopback port. First every good request is sent alone, one after the other: its answer is the
reference. Then `--rounds` rounds, each a shuffled mix sent by `--clients` concurrent clients: good requests
(plain, streamed, and with a chunked body; under several methods) and hostile ones: malformed JSON, bodies over
the limit (declared or chunked without a length), bad images, forbidden or unknown fields (a file path, a module
name), NUL bytes in a path, missing or wrong API keys, a foreign Host header, a body that stops arriving (408
after `--body-timeout`), clients that disconnect mid-stream or before their answer. After each round the queue
must drain to empty and the server's resident memory is sampled. It passes when every good request got its
reference answer, every hostile one a 4xx of its kind, no answer was lost, no status was 5xx, and the resident
memory of the last round is within `--rss-tolerance-mib` of the first.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import random
import socket
import sys
import tempfile
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

from corematching.apps.serve.examples import test_images
from corematching.apps.serve.process import ServerProcess

MODEL = "evqa-smollm2"
KEY = "fault-test-key"
BODY_LIMIT = 256 * 1024
SECRET = "SECRET-MARKER-91c2"
METHODS = [None, {"method": "dense"}, {"method": "random", "token_budget": 8, "seed": 3},
           {"method": "uniform", "token_budget": 8}]
GOOD_KINDS = ("good", "good_stream", "good_chunked")
DISCONNECT_KINDS = ("disconnect_mid_stream", "disconnect_before_answer")
EXPECTED = {  # hostile kind -> the statuses it may get
    "malformed_json": {400}, "oversized_declared": {413}, "oversized_chunked": {413}, "bad_image": {400},
    "forbidden_field": {400}, "nul_path": {400}, "wrong_key": {401}, "foreign_host": {400}, "slow_body": {408},
}
BODY_TIMEOUT_S = 2


class Harness:
    def __init__(self, server: ServerProcess, goods: list[dict], secret_path: Path, timeout_s: float):
        self.server, self.goods, self.secret_path, self.timeout_s = server, goods, secret_path, timeout_s

    # ------------------------------------------------------------------------------------------ transport

    def request(self, body: bytes, headers: dict | None = None, key: str | None = KEY, method="POST",
                path="/v1/chat/completions") -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=self.timeout_s)
        try:
            sent = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}),
                    **(headers or {})}
            connection.request(method, path, body=body, headers=sent)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def raw(self, head: bytes, chunks, read_reply=True) -> tuple[int, bytes]:
        """Send a request head and body pieces on a raw socket; the status and body of the reply."""
        with socket.create_connection(("127.0.0.1", self.server.port), timeout=self.timeout_s) as sock:
            sock.sendall(head)
            reply = b""
            sock.settimeout(0.02)
            try:
                for piece in chunks:
                    sock.sendall(piece)
                    try:
                        reply += sock.recv(65536)
                        if reply:
                            break  # answered before the body ended (413): stop sending
                    except socket.timeout:
                        pass
            except (BrokenPipeError, ConnectionResetError):
                pass
            sock.settimeout(self.timeout_s)
            while True:
                try:
                    piece = sock.recv(65536)
                except ConnectionResetError:
                    break
                if not piece:
                    break
                reply += piece
        status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else 0
        return status, reply.partition(b"\r\n\r\n")[2]

    def head(self, chunked=True, key=KEY) -> bytes:
        return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + key.encode()
                + b"\r\nContent-Type: application/json\r\nConnection: close\r\n"
                + (b"Transfer-Encoding: chunked\r\n" if chunked else b"") + b"\r\n")

    # ------------------------------------------------------------------------------------------ bodies

    def good_body(self, index: int, stream=False) -> bytes:
        good = self.goods[index]
        body = {"model": MODEL, "max_tokens": 8, "stream": stream,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": good["url"]}},
                                                          {"type": "text", "text": good["question"]}]}]}
        method = METHODS[index % len(METHODS)]
        if method is not None:
            body["corematching"] = method
        return json.dumps(body).encode()

    def answer_of(self, status: int, payload: bytes, stream: bool) -> str | None:
        if status != 200:
            return None
        if not stream:
            return json.loads(payload)["choices"][0]["message"]["content"]
        text, done = "", False
        for line in payload.decode().splitlines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                for choice in event.get("choices", []):
                    text += choice["delta"].get("content") or ""
        return text if done else None

    # ------------------------------------------------------------------------------------------ kinds

    def send(self, kind: str, variant: int) -> tuple[object, str | None]:
        """(status, or 'disconnected' for a deliberate disconnect; the answer of a good request)."""
        n = len(self.goods)
        if kind == "good":
            status, payload = self.request(self.good_body(variant % n))
            return status, self.answer_of(status, payload, False)
        if kind == "good_stream":
            status, payload = self.request(self.good_body(variant % n, stream=True))
            return status, self.answer_of(status, payload, True)
        if kind == "good_chunked":
            body = self.good_body(variant % n)
            pieces = [b"%x\r\n%s\r\n" % (len(body[k:k + 4096]), body[k:k + 4096]) for k in range(0, len(body), 4096)]
            status, payload = self.raw(self.head(), [*pieces, b"0\r\n\r\n"])
            return status, self.answer_of(status, payload, False)
        if kind == "malformed_json":
            bodies = [b"{not json", b'{"model": "\xff\xfe"}', b'{"model": "evqa-smollm2", "temperature": NaN}',
                      b"[" * 50000 + b"]" * 50000, b'{"max_tokens": ' + b"9" * 5000 + b"}", b'{"a": 1e999}',
                      b'{"model": "evqa-smollm2", "messages": [{"role": "user", "content": "\\ud800"}]}']
            return self.request(bodies[variant % len(bodies)])[0], None
        if kind == "oversized_declared":
            return self.request(b"{}", headers={"Content-Length": str(10**9)})[0], None
        if kind == "oversized_chunked":
            piece = b"4000\r\n" + b" " * 0x4000 + b"\r\n"
            return self.raw(self.head(), (piece for _ in range(4 * BODY_LIMIT // 0x4000)))[0], None
        if kind == "bad_image":
            urls = ["data:image/png;base64,aGVsbG8=", "data:image/png;base64,@@@", "data:image/png,raw",
                    "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + os.urandom(512)).decode(),
                    "https://example.com/cat.png", "../outside.png", "missing.png"]
            body = {"model": MODEL, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": urls[variant % len(urls)]}},
                {"type": "text", "text": "what shape?"}]}]}
            return self.request(json.dumps(body).encode())[0], None
        if kind == "forbidden_field":
            fields = [{"corematching": {"neuron_budgets": str(self.secret_path)}},
                      {"corematching": {"method": "corematching", "neuron_budgets": "/dev/zero"}},
                      {"corematching": {"method": "os:system"}}, {"corematching": {"__class__": "x"}},
                      {"corematching": {"prune_layer": 10**6}}, {"functions": [{"name": "f"}]}]
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields[variant % len(fields)]}
            status, payload = self.request(json.dumps(body).encode())
            return (status if SECRET.encode() not in payload else "leaked"), None
        if kind == "nul_path":
            body = {"model": MODEL, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "shape\x00.png"}}, {"type": "text", "text": "what?"}]}]}
            return self.request(json.dumps(body).encode())[0], None
        if kind == "wrong_key":
            key = [None, "wrong", KEY[:-1]][variant % 3]
            return self.request(self.good_body(0), key=key)[0], None
        if kind == "foreign_host":
            return self.request(self.good_body(0), headers={"Host": "rebound.example"})[0], None
        if kind == "slow_body":  # announces a body, sends a part, then nothing: 408 after --body-timeout
            head = self.head(chunked=False).replace(b"\r\n\r\n", b"\r\nContent-Length: 500\r\n\r\n")
            return self.raw(head, [b'{"model": "evqa-smollm2", '])[0], None
        if kind == "disconnect_mid_stream":
            body = json.dumps({"model": MODEL, "stream": True, "max_tokens": 64, "ignore_eos": True,
                               "messages": [{"role": "user", "content": "Tell a long story."}]}).encode()
            with socket.create_connection(("127.0.0.1", self.server.port), timeout=self.timeout_s) as sock:
                sock.sendall(self.head(chunked=False).replace(b"\r\n\r\n", b"\r\nContent-Length: %d\r\n\r\n"
                                                                 % len(body)) + body)
                sock.recv(4096)  # the headers and the first event
            return "disconnected", None
        if kind == "disconnect_before_answer":
            body = self.good_body(variant % n)
            with socket.create_connection(("127.0.0.1", self.server.port), timeout=self.timeout_s) as sock:
                sock.sendall(self.head(chunked=False).replace(b"\r\n\r\n", b"\r\nContent-Length: %d\r\n\r\n"
                                                                 % len(body)) + body)
            return "disconnected", None
        raise ValueError(f"unknown kind {kind}")


def resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def wait_for_empty_queue(server: ServerProcess, deadline: float) -> int:
    while True:
        unfinished = server.get("/health")["unfinished_requests"]
        if unfinished == 0 or time.monotonic() > deadline:
            return unfinished
        time.sleep(0.2)


def run(rounds: int = 3, per_kind: int = 4, good_per_round: int = 8, clients: int = 12, goods: int = 4,
        max_seconds: float = 900.0, rss_tolerance_mib: float = 64.0, seed: int = 0, progress=print,
        batching: str = "static") -> dict:
    """Run the fault test; returns the figures (see the module docstring) with "passed"."""
    started = time.monotonic()
    deadline = started + max_seconds
    workdir = Path(tempfile.mkdtemp(prefix="corematching-fault-"))
    allowed = workdir / "images"
    allowed.mkdir()
    secret = workdir / "secret.json"
    secret.write_text(json.dumps([0.5, SECRET]))
    items = test_images(goods)
    (allowed / "shape.png").write_bytes(base64.b64decode(items[0]["url"].split(",", 1)[1]))
    arguments = ["--api-key", KEY, "--max-body-bytes", str(BODY_LIMIT), "--allowed-image-dir", str(allowed),
                 "--body-timeout", str(BODY_TIMEOUT_S),
                 "--max-batch-size", "4", "--max-wait-ms", "20", "--max-queue", str(4 * clients), "--threads", "1",
                 "--batching", batching]
    server = ServerProcess(arguments).start()
    figures = {"rounds": [], "sent": Counter(), "expected_status": Counter(), "statuses": defaultdict(Counter),
               "wrong_answers": [], "lost": 0, "server_errors": 0, "leaks": 0, "batching": batching}
    try:
        harness = Harness(server, items, secret, timeout_s=max(30.0, max_seconds / 4))
        reference = {}
        for index in range(goods):  # each good request alone: its reference answer
            status, payload = harness.request(harness.good_body(index))
            reference[index] = harness.answer_of(status, payload, False)
        progress(f"references: {reference}")
        kinds = [kind for kind in GOOD_KINDS for _ in range(good_per_round)]
        kinds += [kind for kind in [*EXPECTED, *DISCONNECT_KINDS] for _ in range(per_kind)]
        shuffler = random.Random(seed)
        for number in range(rounds):
            plan = [(kind, variant) for variant, kind in enumerate(kinds)]
            shuffler.shuffle(plan)
            round_started = time.monotonic()
            with ThreadPoolExecutor(clients) as pool:
                futures = {pool.submit(harness.send, kind, variant): (kind, variant) for kind, variant in plan}
                done, not_done = wait(futures, timeout=max(1.0, deadline - time.monotonic()))
                for future in not_done:
                    future.cancel()
            for future in futures:
                kind, variant = futures[future]
                figures["sent"][kind] += 1
                if future not in done or future.exception() is not None:
                    figures["lost"] += 1
                    figures["statuses"][kind]["lost"] += 1
                    continue
                status, answer = future.result()
                figures["statuses"][kind][status] += 1
                if status == "leaked":
                    figures["leaks"] += 1
                elif isinstance(status, int) and status >= 500:
                    figures["server_errors"] += 1
                if kind in GOOD_KINDS and (status != 200 or answer != reference[variant % goods]):
                    figures["wrong_answers"].append((kind, variant, status, answer))
                if kind in EXPECTED and status in EXPECTED[kind]:
                    figures["expected_status"][kind] += 1
            unfinished = wait_for_empty_queue(server, min(deadline, time.monotonic() + 120))
            rss = resident_bytes(server.process.pid)
            figures["rounds"].append({"round": number + 1, "requests": len(plan), "seconds":
                                      round(time.monotonic() - round_started, 1), "unfinished_after": unfinished,
                                      "rss_mib": round(rss / 2**20, 1)})
            progress(f"round {number + 1}: {len(plan)} requests in {figures['rounds'][-1]['seconds']} s, "
                     f"queue {unfinished}, RSS {rss / 2**20:.1f} MiB")
            if time.monotonic() > deadline:
                progress("time is up: stopping")
                break
        log = server.log()
        figures["server_log_tracebacks"] = log.count("Traceback")
        if "Traceback" in log:  # the first one, for the report
            figures["first_traceback"] = log[log.index("Traceback"):][:4000]
    finally:
        server.stop()
    rss = [r["rss_mib"] for r in figures["rounds"]]
    hostile_ok = all(figures["expected_status"][kind] == figures["sent"][kind] for kind in EXPECTED)
    figures["rss_growth_mib"] = round(rss[-1] - rss[0], 1) if rss else None
    figures["passed"] = bool(
        len(figures["rounds"]) == rounds and not figures["wrong_answers"] and figures["lost"] == 0
        and figures["server_errors"] == 0 and figures["leaks"] == 0 and hostile_ok
        and all(r["unfinished_after"] == 0 for r in figures["rounds"])
        and figures["rss_growth_mib"] is not None and figures["rss_growth_mib"] <= rss_tolerance_mib)
    figures["seconds"] = round(time.monotonic() - started, 1)
    figures["statuses"] = {kind: {str(k): v for k, v in counts.items()} for kind, counts in figures["statuses"].items()}
    return figures


def table(figures: dict) -> str:
    lines = ["| kind | sent | answers (status: count) |", "|---|---:|---|"]
    for kind in [*GOOD_KINDS, *EXPECTED, *DISCONNECT_KINDS]:
        sent = figures["sent"][kind]
        answers = ", ".join(f"{status}: {count}" for status, count in sorted(figures["statuses"][kind].items()))
        lines.append(f"| {kind} | {sent} | {answers} |")
    lines += ["", "| round | requests | seconds | queue after | server RSS (MiB) |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['round']} | {r['requests']} | {r['seconds']} | {r['unfinished_after']} | {r['rss_mib']} |"
              for r in figures["rounds"]]
    lines.append(f"\nlost {figures['lost']}, 5xx {figures['server_errors']}, wrong good answers "
                 f"{len(figures['wrong_answers'])}, leaks {figures['leaks']}, RSS growth {figures['rss_growth_mib']} "
                 f"MiB, tracebacks in the server log {figures.get('server_log_tracebacks')}: "
                 f"{'PASSED' if figures['passed'] else 'FAILED'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-kind", type=int, default=4, help="requests of each hostile kind per round")
    parser.add_argument("--good", type=int, default=8, help="requests of each good kind per round")
    parser.add_argument("--clients", type=int, default=12, help="concurrent clients")
    parser.add_argument("--images", type=int, default=4, help="distinct good requests (easy-vqa test images)")
    parser.add_argument("--max-seconds", type=float, default=900.0, help="the whole run stops after this")
    parser.add_argument("--rss-tolerance-mib", type=float, default=64.0)
    parser.add_argument("--batching", choices=["static", "continuous"], default="static",
                        help="the server's batching (serve --batching)")
    parser.add_argument("--output", type=Path, default=None, help="JSON file of the figures")
    args = parser.parse_args(argv)
    figures = run(args.rounds, args.per_kind, args.good, args.clients, args.images, args.max_seconds,
                  args.rss_tolerance_mib, batching=args.batching)
    print(table(figures))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(figures, indent=1, default=str))
    return 0 if figures["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
