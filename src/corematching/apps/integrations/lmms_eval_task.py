"""A local lmms-eval task of easy-vqa questions, written to disk (no dataset download).

    python -m corematching.apps.integrations.lmms_eval_task DIR [--questions 50] [--set test-2000]
    python -m lmms_eval --model corematching --model_args pretrained=evqa-smollm2,method=corematching,budget=16 \
        --tasks easyvqa_local --include_path DIR --batch_size 1

writes DIR/easyvqa_local/: the questions as JSON lines (image paths into the installed easy-vqa package), the
task's YAML in lmms-eval's format (loaded with the `json` dataset builder) and its utils.py (the image, the
prompt, exact-match scoring).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TASK = "easyvqa_local"

TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {questions}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 8
  temperature: 0
  do_sample: false
  until:
    - "\\n"
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

TASK_UTILS = '''\
"""easy-vqa questions for lmms-eval: one image, one short answer, exact match."""

from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    prediction = results[0].strip().lower()
    return {"exact_match": float(prediction == doc["answer"].strip().lower())}
'''


def write_task(directory: Path, questions: int = 50, eval_set: str = "test-2000") -> Path:
    """Write the task into directory/easyvqa_local/ and return that folder."""
    from ...zoo import data
    from ..evaluate import eval_questions

    if questions < 1:
        raise ValueError(f"questions must be >= 1, got {questions}")
    if eval_set not in ("test-2000", "test"):
        raise ValueError(f"the lmms-eval task holds easy-vqa questions: set must be test-2000 or test, "
                         f"got {eval_set!r}")
    folder = Path(directory) / TASK
    folder.mkdir(parents=True, exist_ok=True)
    paths = data.image_paths("test")
    lines = []
    for index, item in enumerate(eval_questions(eval_set)[:questions]):
        lines.append(json.dumps({"question_id": index, "image": str(Path(paths[item.image_id]).resolve()),
                                 "question": item.question, "answer": item.answer}))
    questions_file = folder / "questions.jsonl"
    questions_file.write_text("\n".join(lines) + "\n")
    questions = json.dumps(str(questions_file.resolve()))
    (folder / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, questions=questions))
    (folder / "utils.py").write_text(TASK_UTILS)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", help="where to write the task (pass it to lmms-eval's --include_path)")
    parser.add_argument("--questions", type=int, default=50)
    parser.add_argument("--set", default="test-2000")
    args = parser.parse_args(argv)
    folder = write_task(Path(args.directory), args.questions, args.set)
    print(f"lmms-eval task {TASK!r} ({args.questions} questions): {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
