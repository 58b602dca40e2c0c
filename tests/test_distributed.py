"""Evaluation across processes: shards answer each question once, resumes with another process count lose and
duplicate nothing, and a 2-process torchrun run gives the single-process answers."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from corematching.apps import cli, distributed, evaluate
from corematching.apps.distributed import Shard
from corematching.vqa import BatchAnswers

VENV_BIN = Path(sys.executable).parent


def read_answers(path: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    return {row["index"]: row for row in rows}


def all_rows(output: Path) -> list[dict]:
    return [row for path in distributed.result_files(output) for row in read_answers(path).values()]


# ---------------------------------------------------------------------------------------------- sharding logic


class FixedShard(Shard):
    """A rank that receives `pending` as if rank 0 had sent it, so ranks can be run one after another here."""

    def __init__(self, rank, world_size, pending):
        super().__init__(rank, world_size)
        self.pending = pending

    def broadcast(self, value):
        return self.pending

    def barrier(self):
        pass


@pytest.fixture
def fake_answers(monkeypatch):
    """answer_batch replaced by a fast, deterministic stand-in; records which questions were asked."""
    asked = []

    def answer_batch(model, processor, images, questions, method, max_new_tokens):
        asked.extend(questions)
        return BatchAnswers([question.split()[-1] for question in questions], None, None)

    monkeypatch.setattr(evaluate, "answer_batch", answer_batch)
    return asked


FAKE_MODEL = SimpleNamespace(config=SimpleNamespace(image_token_id=1, vision_config=SimpleNamespace(
    image_size=64, patch_size=8)))


def run_ranks(items, output, world_size):
    """One distributed run, its ranks one after another (the list of pending questions fixed at the start)."""
    settings = {**evaluate.method_settings(None), "questions": len(items)}
    done = evaluate.answered_indices(output, settings)
    pending = [k for k in range(len(items)) if k not in done]
    for rank in range(world_size):
        evaluate.run_eval(FAKE_MODEL, None, None, items, output, batch_size=2, progress=False,
                          shard=FixedShard(rank, world_size, pending))


def test_resume_with_other_process_counts_loses_and_duplicates_nothing(tmp_path, fake_answers):
    items = evaluate.eval_questions("test-2000")[:23]
    output = tmp_path / "answers.jsonl"
    run_ranks(items[:], output, 2)
    assert sorted(r["index"] for r in all_rows(output)) == list(range(23))
    rank_files = {"answers.jsonl.rank0-of-2", "answers.jsonl.rank1-of-2"}
    assert {p.name for p in distributed.result_files(output)} == rank_files
    assert sorted(read_answers(tmp_path / "answers.jsonl.rank0-of-2")) == list(range(0, 23, 2))

    # interrupt: rank 1 lost its last 4 answers and tore the line after them; rank 0 lost 3
    for name, keep in (("answers.jsonl.rank1-of-2", 1 + 7), ("answers.jsonl.rank0-of-2", 1 + 9)):
        path = tmp_path / name
        lines = path.read_text().splitlines()
        path.write_text("".join(line + "\n" for line in lines[:keep]) + (lines[keep][:20] if "rank1" in name else ""))
    fake_answers.clear()
    run_ranks(items, output, 3)  # resumed with 3 processes
    assert len(fake_answers) == 7  # only the lost ones were asked again
    indices = sorted(r["index"] for r in all_rows(output))
    assert indices == list(range(23))
    summary = evaluate.summarize(output)
    assert summary.answered == 23 and summary.accuracy == pytest.approx(
        sum(q.question.split()[-1] == q.answer for q in items) / 23)

    # and once more on one process: nothing left to do
    fake_answers.clear()
    evaluate.run_eval(FAKE_MODEL, None, None, items, output, batch_size=2, progress=False)
    assert fake_answers == [] and evaluate.summarize(output).answered == 23


def test_summary_refuses_mixed_settings(tmp_path, fake_answers):
    items = evaluate.eval_questions("test-2000")[:4]
    output = tmp_path / "answers.jsonl"
    run_ranks(items, output, 2)
    other = {**evaluate.method_settings(None), "questions": 5}
    (tmp_path / "answers.jsonl.rank0-of-3").write_text(json.dumps({"settings": other}) + "\n")
    with pytest.raises(ValueError, match="rank0-of-3 holds"):
        evaluate.summarize(output)


def test_shard_from_env(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    shard = distributed.shard_from_env()
    assert (shard.rank, shard.world_size, shard.local_rank, shard.is_main) == (1, 3, 1, False)
    assert shard.result_file(Path("runs/a.jsonl")) == Path("runs/a.jsonl.rank1-of-3")
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ValueError, match="RANK=3 and WORLD_SIZE=3"):
        distributed.shard_from_env()


# ---------------------------------------------------------------------------------------------- torchrun


@pytest.mark.skipif(not (VENV_BIN / "torchrun").exists(), reason="torchrun is not installed next to python")
def test_torchrun_two_processes_resume_a_single_process_run(tmp_path, capsys, one_thread):
    common = ["eval", "--method", "random", "--budget", "8", "--limit", "8", "--batch-size", "4"]
    single = tmp_path / "single.jsonl"
    assert cli.main(common + ["--output", str(single)]) == 0
    reference = read_answers(single)
    capsys.readouterr()

    # an interrupted single-process run: 3 answers and a torn line; two processes finish it
    output = tmp_path / "resumed.jsonl"
    lines = single.read_text().splitlines()
    output.write_text("".join(line + "\n" for line in lines[:4]) + lines[4][:25])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [str(VENV_BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "corematching"] + common
        + ["--output", str(output)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    files = {path.name: read_answers(path) for path in distributed.result_files(output)}
    assert sorted(files) == ["resumed.jsonl", "resumed.jsonl.rank0-of-2", "resumed.jsonl.rank1-of-2"]
    assert sorted(files["resumed.jsonl"]) == [0, 1, 2]
    assert sorted(files["resumed.jsonl.rank0-of-2"]) == [3, 5, 7]
    assert sorted(files["resumed.jsonl.rank1-of-2"]) == [4, 6]
    merged = {k: row for rows in files.values() for k, row in rows.items()}
    assert merged == reference  # same answers, same kept patches
    accuracy = sum(row["correct"] for row in reference.values()) / 8
    assert f"| 8 | {accuracy:.4f} |" in result.stdout
    assert result.stdout.count("| RandomTokens |") == 1  # only rank 0 reports


def test_a_method_with_tuple_fields_resumes(tmp_path, fake_answers):
    from dataclasses import dataclass

    from corematching.methods import SparsityMethod

    @dataclass
    class Staged(SparsityMethod):
        schedule: tuple = ((2, 0.5),)

    items = evaluate.eval_questions("test-2000")[:4]
    output = tmp_path / "answers.jsonl"
    evaluate.run_eval(FAKE_MODEL, None, Staged(), items[:], output, batch_size=2, progress=False)
    lines = output.read_text().splitlines()
    output.write_text("\n".join(lines[:3]) + "\n")  # interrupted after 2 answers
    fake_answers.clear()
    summary = evaluate.run_eval(FAKE_MODEL, None, Staged(), items, output, batch_size=2, progress=False)
    assert len(fake_answers) == 2 and summary.answered == 4
    assert summary.settings == {"method": "Staged", "schedule": [[2, 0.5]], "questions": 4}
