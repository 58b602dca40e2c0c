"""lmms-eval: the `corematching` model runs a local easy-vqa task end to end and answers as corematching does."""

import glob
import importlib.util
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
from PIL import Image

import corematching as cm
from corematching import vqa
from corematching.apps.integrations import lmms_eval_task

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("lmms_eval") is None,
    reason="lmms-eval is not installed (`make test` installs it; or pip install 'corematching[lmms]')",
)

QUESTIONS = 6


def test_entry_point_registers_the_model():
    from lmms_eval.models import MODEL_REGISTRY_V2

    names = [ep.name for ep in entry_points().select(group="lmms_eval.models")]
    assert "corematching" in names, "reinstall the package (pip install -e .) to register its entry points"
    assert MODEL_REGISTRY_V2.resolve("corematching").class_path.endswith("lmms_eval_model.CoreMatchingLMM")


def test_model_args_build_the_method():
    from corematching.apps.integrations.lmms_eval_model import build_method

    assert build_method("corematching", budget=64, prune_layer=2) == cm.CoreMatching(token_budget=64, prune_layer=2)
    assert build_method("random", budget="0.25", seed="3") == cm.RandomTokens(token_budget=0.25, seed=3)
    assert build_method("dense") == cm.Dense()
    with pytest.raises(ValueError, match="Dense does not take token_budget"):
        build_method("dense", budget=8)


def test_local_task_end_to_end(tmp_path):
    task_dir = lmms_eval_task.write_task(tmp_path / "tasks", QUESTIONS)
    docs = [json.loads(line) for line in (task_dir / "questions.jsonl").read_text().splitlines()]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache")}
    result = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "corematching",
         "--model_args", "pretrained=evqa-smollm2,method=corematching,budget=16",
         "--tasks", lmms_eval_task.TASK, "--include_path", str(tmp_path / "tasks"), "--batch_size", "2",
         "--output_path", str(tmp_path / "out"), "--log_samples"],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [results_file] = glob.glob(str(tmp_path / "out" / "*" / "*_results.json"))
    [samples_file] = glob.glob(str(tmp_path / "out" / "*" / f"*_samples_{lmms_eval_task.TASK}.jsonl"))
    samples = sorted((json.loads(line) for line in open(samples_file)), key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(QUESTIONS))

    # the same answers as corematching's own batched answering with the same method
    model, processor = cm.load_model("evqa-smollm2")
    method = cm.CoreMatching(token_budget=16)
    images = [Image.open(doc["image"]) for doc in docs]
    ours = vqa.answer_batch(model, processor, images, [doc["question"] for doc in docs], method).texts
    theirs = [s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"]
              for s in samples]
    assert theirs == ours
    accuracy = sum(a == doc["answer"] for a, doc in zip(ours, docs)) / QUESTIONS
    reported = json.load(open(results_file))["results"][lmms_eval_task.TASK]["exact_match,none"]
    assert reported == pytest.approx(accuracy)
