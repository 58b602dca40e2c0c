"""The shipped model: it loads offline and answers real easy-vqa test questions; eval resumes losslessly."""

import json

import pytest
import torch
from family_checks import _assert_same, _snapshot
from PIL import Image

import corematching as cm
from corematching import vqa
from corematching.apps import evaluate
from corematching.zoo import data


@pytest.fixture(scope="module")
def bundled():
    return cm.load_model("evqa-smollm2")


def fixed_questions(count: int = 24):
    """The first `count` questions of the documented evaluation set test-2000 (a seeded sample of the test
    split): fixed, not chosen by the model's answers."""
    return evaluate.eval_questions("test-2000")[:count]


def test_bundled_model_answers_test_questions(bundled):
    model, processor = bundled
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    items = fixed_questions()
    paths = data.image_paths("test")
    images = [Image.open(paths[q.image_id]) for q in items]
    answers = vqa.answer_batch(model, processor, images, [q.question for q in items]).texts
    correct = sum(a == q.answer for a, q in zip(answers, items))
    # the majority answer ("yes") gets 8 of these right; the shipped weights must do far better
    assert correct >= 20, list(zip([q.question for q in items], answers, [q.answer for q in items]))
    # the one-call helper gives the same answers as the batched path
    for image, q, batched in list(zip(images, items, answers))[:3]:
        assert cm.answer(model, processor, image, q.question) == batched


def test_answer_under_a_method_restores_the_model(bundled, monkeypatch):
    """cm.answer under a method that removes tokens and decodes with core neurons: inside, the session has
    replaced FFN forwards, added hooks and switched generate()'s compilation off (checked, so that the comparison
    can fail); after it, the same weights, modules, attributes, hooks, generation settings and logits."""
    model, processor = bundled
    q = fixed_questions()[0]
    image = Image.open(data.image_paths("test")[q.image_id])
    method = cm.CoreMatching(token_budget=16, neuron_layers=[2, 3])
    inside, before = {}, {}
    real_generate = model.generate

    def generate_and_look(*args, **kwargs):
        if before:  # the call under the method
            now = _snapshot(model)
            inside.update(changed=[key for key in ("attributes", "hooks") if now[key] != before[key]],
                          compile_off=model.generation_config.disable_compile)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", generate_and_look)
    cm.answer(model, processor, image, q.question)  # transformers adds its own hooks lazily on a first call
    inputs = processor(images=[image], text=vqa.prompts_for(processor, [q.question]), return_tensors="pt")
    settings = model.generation_config.to_dict()
    with torch.no_grad():
        dense_logits = model(**inputs).logits
    before.update(_snapshot(model))
    text = cm.answer(model, processor, image, q.question, method=method)
    assert isinstance(text, str) and text
    assert inside == {"changed": ["attributes", "hooks"], "compile_off": True}
    _assert_same(model, before)
    assert model.generation_config.to_dict() == settings
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, dense_logits)


def test_eval_resumes_without_loss_or_duplicates(bundled, tmp_path, monkeypatch):
    model, processor = bundled
    items = evaluate.eval_questions("test-2000")[:6]
    method = cm.UniformTokens(token_budget=16)
    reference = evaluate.run_eval(model, processor, method, items, tmp_path / "full.jsonl", batch_size=2,
                                  progress=False)

    # interrupt after the second batch
    calls = {"n": 0}
    real = evaluate.answer_batch

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "answer_batch", flaky)
    output = tmp_path / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        evaluate.run_eval(model, processor, method, items, output, batch_size=2, progress=False)
    assert len(output.read_text().splitlines()) == 1 + 4
    with output.open("a") as sink:  # a torn line, as a kill during a write leaves
        sink.write('{"index": 4, "pred')
    monkeypatch.setattr(evaluate, "answer_batch", real)
    resumed = evaluate.run_eval(model, processor, method, items, output, batch_size=2, progress=False)

    rows = [json.loads(line) for line in output.read_text().splitlines()][1:]
    assert sorted(r["index"] for r in rows) == list(range(6))
    full_rows = {r["index"]: r for r in map(json.loads, (tmp_path / "full.jsonl").read_text().splitlines()[1:])}
    assert all(full_rows[r["index"]]["prediction"] == r["prediction"] for r in rows)
    assert resumed.answered == reference.answered == 6 and resumed.accuracy == reference.accuracy


def test_eval_refuses_to_mix_settings(bundled, tmp_path):
    model, processor = bundled
    items = evaluate.eval_questions("test-2000")[:2]
    output = tmp_path / "a.jsonl"
    evaluate.run_eval(model, processor, cm.UniformTokens(token_budget=16), items, output, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        evaluate.run_eval(model, processor, cm.UniformTokens(token_budget=8), items, output, progress=False)


def test_eval_refuses_to_mix_weights(bundled, tmp_path):
    """The bundled model records its weights' digest; a resumed run with other weights is refused, and a file
    written before runs recorded weights still resumes."""
    model, processor = bundled
    assert model._corematching_weights.startswith("evqa-smollm2@")
    items = evaluate.eval_questions("test-2000")[:2]
    output = tmp_path / "a.jsonl"
    evaluate.run_eval(model, processor, None, items[:1], output, progress=False)
    digest = model._corematching_weights
    try:
        model._corematching_weights = "evqa-smollm2@000000000000"
        with pytest.raises(ValueError, match="other settings"):
            evaluate.run_eval(model, processor, None, items[:1], output, progress=False)
    finally:
        model._corematching_weights = digest
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps({"settings": {"method": "Dense", "questions": 2}}) + "\n")
    assert evaluate.run_eval(model, processor, None, items, old, progress=False).answered == 2


def test_object_patches_follow_the_shape():
    image = Image.new("RGB", (64, 64), (250, 250, 250))
    for x in range(16, 32):
        for y in range(8, 24):
            image.putpixel((x, y), (200, 0, 0))
    mask = evaluate.object_patches(image, (8, 8)).view(8, 8)
    expected = [(r, c) for r in (1, 2) for c in (2, 3)]
    assert sorted(map(tuple, mask.nonzero().tolist())) == expected


def test_answer_rejects_bad_images(bundled):
    model, processor = bundled
    with pytest.raises(TypeError):
        vqa.answer(model, processor, "not an image", "what?")
