"""A short run of the server's fault and load test (benchmarks/serve_fault.py): concurrent clients mixing good
requests with hostile ones and disconnects, over three rounds. Every good request gets its answer alone, every
hostile one a 4xx of its kind, nothing is lost, never a 5xx, the queue drains, resident memory stays flat."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import serve_fault  # noqa: E402


@pytest.mark.parametrize("batching", ["static", "continuous"])
def test_the_server_holds_under_a_mix_of_good_and_hostile_clients(batching):
    figures = serve_fault.run(rounds=3, per_kind=1, good_per_round=2, clients=6, goods=2, max_seconds=420,
                              rss_tolerance_mib=64, progress=lambda line: None, batching=batching)
    report = serve_fault.table(figures)
    assert figures["lost"] == 0 and figures["server_errors"] == 0 and figures["leaks"] == 0, report
    assert figures["wrong_answers"] == [], report
    assert all(figures["expected_status"][kind] == figures["sent"][kind] for kind in serve_fault.EXPECTED), report
    assert [r["unfinished_after"] for r in figures["rounds"]] == [0, 0, 0], report
    assert figures["server_log_tracebacks"] == 0, report
    assert figures["passed"], report
