"""The procedural scenes dataset: answers on hand-built scenes, masks, determinism, train/eval disjointness."""

import json
import random

import numpy as np
import pytest

from corematching.zoo import scenes
from corematching.zoo.scenes import SceneObject


def obj(shape, color, x, y, w=20, h=None):
    return SceneObject(shape, color, (x, y, x + w, y + (h if h is not None else w)))


def asked(scene, kind, seeds=range(40)):
    """Every (question, answer, object indices) the generator produces for `kind` over many draws."""
    out = set()
    for seed in seeds:
        result = scenes.question_about(scene, kind, random.Random(seed))
        if result is not None:
            question, answer, indices = result
            out.add((question, answer, tuple(indices)))
    return out


# red circle (left, top), blue square (right, top), green triangle (middle, bottom), blue circle (far right, bottom)
SCENE = scenes.render([
    obj("circle", "red", 5, 5),
    obj("square", "blue", 60, 8),
    obj("triangle", "green", 40, 80),
    obj("circle", "blue", 100, 90),
])


def test_colour_and_shape_questions_only_about_unique_objects():
    colour = asked(SCENE, "color")
    # the circle occurs twice: never asked; square and triangle are unique
    assert colour == {("what color is the square?", "blue", (1,)), ("what color is the triangle?", "green", (2,))}
    shape = asked(SCENE, "shape")
    # blue occurs twice: never asked
    assert shape == {("what shape is the red object?", "circle", (0,)),
                     ("what shape is the green object?", "triangle", (2,))}


def test_counts():
    counts = {q: a for q, a, _ in asked(SCENE, "count_shape", range(200))}
    assert counts == {"how many circles are there?": "2", "how many squares are there?": "1",
                      "how many triangles are there?": "1", "how many rectangles are there?": "0",
                      "how many crosses are there?": "0"}
    assert asked(SCENE, "count_all") == {("how many objects are there?", "4", (0, 1, 2, 3))}


def test_exists_answers_match_the_scene_and_are_balanced():
    yes = no = 0
    for seed in range(400):
        question, answer, indices = scenes.question_about(SCENE, "exists", random.Random(seed))
        color, shape = question[len("is there a "):-1].split()
        present = any(o.color == color and o.shape == shape for o in SCENE.objects)
        assert answer == ("yes" if present else "no")
        yes += answer == "yes"
        no += answer == "no"
    assert 160 < yes < 240 and 160 < no < 240


def test_spatial_questions_have_exactly_one_answer():
    # left of the square (centre x 70): only the red circle (x 15); the triangle (x 50) is also left -> not asked
    # above the triangle (centre y 90): the red circle and the blue square are both above -> not asked
    left = asked(SCENE, "left_of")
    for question, _, _ in left:
        assert question != "what color is the object left of the square?"
    assert ("what color is the object left of the triangle?", "red", (0, 2)) in left
    # above the square: the red circle's centre is 3 px higher, inside the ambiguity margin -> not asked
    assert asked(SCENE, "above") == set()

    row = scenes.render([obj("circle", "red", 5, 50), obj("square", "blue", 50, 50), obj("cross", "teal", 95, 50)])
    assert asked(row, "left_of") == {("what color is the object left of the square?", "red", (0, 1))}
    assert asked(row, "above") == set()  # all centres on one line: nothing is above anything

    column = scenes.render([obj("triangle", "yellow", 50, 5), obj("circle", "brown", 52, 60)])
    assert asked(column, "above") == {("what color is the object above the circle?", "yellow", (0, 1))}
    # centres 2 px apart horizontally: inside the ambiguity margin, so no left-of question
    assert asked(column, "left_of") == set()


def test_masks_cover_exactly_the_objects_asked_about():
    for item in scenes.sample(150, seed=5):
        assert item.mask.shape == (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE) and item.mask.dtype == bool
        object_map = item.scene.object_map
        covered = set(np.unique(object_map[item.mask]).tolist())
        assert -1 not in covered
        if item.kind == "count_all":
            assert covered == set(range(len(item.scene.objects)))
        if item.kind in ("color", "shape"):
            assert len(covered) == 1
            (k,) = covered
            assert item.answer in (item.scene.objects[k].color, item.scene.objects[k].shape)
        if item.kind in ("left_of", "above"):
            assert len(covered) == 2 and item.answer in {item.scene.objects[k].color for k in covered}
        if item.kind == "count_shape":
            assert len(covered) == int(item.answer)
        # every covered object is covered completely
        for k in covered:
            assert item.mask[object_map == k].all()


def test_sample_answers_agree_with_the_drawn_objects():
    for item in scenes.sample(200, seed=6):
        objects = item.scene.objects
        assert 2 <= len(objects) <= 5 and len(item.answer.split()) == 1
        if item.kind == "count_all":
            assert item.answer == str(len(objects))
        if item.kind == "count_shape":
            shape = next(s for s in scenes.SHAPES if scenes.PLURALS[s] in item.question)
            assert item.answer == str(sum(o.shape == shape for o in objects))
        for o in objects:
            w, h = o.box[2] - o.box[0], o.box[3] - o.box[1]
            assert scenes.MIN_SIZE - 5 <= min(w, h) and max(w, h) <= scenes.MAX_SIZE


def test_sample_is_deterministic_and_prefix_stable():
    a, b = scenes.sample(12, seed=3), scenes.sample(20, seed=3)
    for x, y in zip(a, b):
        assert x.question == y.question and x.answer == y.answer
        assert x.image.tobytes() == y.image.tobytes() and (x.mask == y.mask).all()
    other = scenes.sample(12, seed=4)
    assert [x.image.tobytes() for x in a] != [x.image.tobytes() for x in other]


def test_evaluation_images_are_not_training_images():
    eval_digests = {scenes.image_digest(item.image) for item in scenes.sample(scenes.EVAL_SIZE, scenes.EVAL_SEED)}
    assert len(eval_digests) == scenes.EVAL_SIZE
    train_digests = {scenes.image_digest(scenes.scene(scenes.TRAIN_SEED, i).image) for i in range(2000)}
    assert not eval_digests & train_digests


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="n must be"):
        scenes.sample(-1, seed=0)
    with pytest.raises(ValueError, match="seed must be"):
        scenes.sample(3, seed="a")
    with pytest.raises(ValueError, match="overlap"):
        scenes.render([obj("circle", "red", 5, 5), obj("square", "blue", 10, 10)])
    with pytest.raises(ValueError, match="kind must be"):
        scenes.question_about(SCENE, "size", random.Random(0))


# ----------------------------------------------------------------------------- the shipped model


@pytest.fixture(scope="module")
def scenes_model():
    import corematching as cm

    return cm.load_model("scenes-smollm2")


def fixed_scenes():
    """Hand-built scenes and questions with their true answers."""
    two = scenes.render([obj("circle", "red", 10, 50, 24), obj("square", "blue", 80, 50, 24)])
    three = scenes.render([obj("triangle", "yellow", 54, 8, 26), obj("cross", "green", 10, 80, 24),
                           obj("rectangle", "black", 80, 96, 30, 16)])
    four = scenes.render([obj("circle", "blue", 8, 10, 22), obj("square", "teal", 60, 12, 26),
                          obj("triangle", "gray", 64, 74, 30), obj("circle", "brown", 10, 90, 18)])
    return [
        (two, "what color is the circle?", "red"),
        (two, "what shape is the blue object?", "square"),
        (two, "how many objects are there?", "2"),
        (two, "is there a red circle?", "yes"),
        (two, "is there a blue circle?", "no"),
        (two, "what color is the object left of the square?", "red"),
        (three, "what color is the cross?", "green"),
        (three, "what shape is the yellow object?", "triangle"),
        (three, "how many objects are there?", "3"),
        (three, "how many crosses are there?", "1"),
        (three, "what color is the object above the cross?", "yellow"),
        (three, "what color is the object left of the triangle?", "green"),
        (four, "what color is the square?", "teal"),
        (four, "what shape is the brown object?", "circle"),
        (four, "how many objects are there?", "4"),
        (four, "how many circles are there?", "2"),
        (four, "is there a gray triangle?", "yes"),
        (four, "is there a teal circle?", "no"),
        (four, "what color is the object above the square?", "blue"),
    ]


def test_fixed_scenes_are_questions_the_dataset_asks():
    for scene, question, answer in fixed_scenes():
        produced = {(q, a) for kind in scenes.KINDS for q, a, _ in asked(scene, kind, range(300))}
        assert (question, answer) in produced, question


# The shipped weights answer 9 of the 19 hand-built questions above right (their dense accuracy on the evaluation
# set is far from the target; see the README). These are those 9, chosen after training: the test guards that
# the trained tensors load, merge and answer as shipped, not the model's accuracy.
ANSWERED_RIGHT = {2, 3, 5, 6, 8, 9, 10, 14, 18}


def test_scenes_model_answers_fixed_scenes(scenes_model):
    import corematching as cm
    from corematching import vqa

    model, processor = scenes_model
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.vision_config.image_size == 128 and model.config.vision_config.patch_size == 16
    cases = [case for k, case in enumerate(fixed_scenes()) if k in ANSWERED_RIGHT]
    answers = vqa.answer_batch(model, processor, [s.image for s, _, _ in cases], [q for _, q, _ in cases]).texts
    wrong = [(q, a, truth) for (_, q, truth), a in zip(cases, answers) if a != truth]
    assert not wrong, wrong
    scene, question, truth = cases[0]
    assert cm.answer(model, processor, scene.image, question) == truth


# ----------------------------------------------------------------------------- evaluation sets and runs


def test_scene_eval_sets_are_the_documented_samples():
    from corematching.apps import evaluate

    assert evaluate.default_set("scenes-smollm2") == "scenes"
    assert evaluate.default_set("evqa-smollm2") == "test-2000"
    fixed = evaluate.eval_questions("scenes")
    assert len(fixed) == 700
    assert [(i.question, i.answer) for i in fixed[:5]] == [(i.question, i.answer) for i in scenes.sample(5, 1)]
    fresh = evaluate.eval_questions("scenes:7:20")
    assert [(i.question, i.answer) for i in fresh] == [(i.question, i.answer) for i in scenes.sample(20, 7)]
    assert len(evaluate.eval_questions("scenes:7")) == 700
    for bad in ("scenes:", "scenes:x", "scenes:1:0", "scenes:1:2:3", "scenes:-1", "scene"):
        with pytest.raises(ValueError, match="eval set|scenes eval set"):
            evaluate.eval_questions(bad)


def patch_recall(mask: np.ndarray, kept: list[int]) -> float | None:
    """Share of the 16x16 patches with at least a quarter of their pixels in `mask` whose index is in `kept`."""
    covered = [row * 8 + col for row in range(8) for col in range(8)
               if mask[16 * row : 16 * row + 16, 16 * col : 16 * col + 16].sum() >= 64]
    return sum(k in kept for k in covered) / len(covered) if covered else None


def test_eval_on_scenes_records_kinds_and_the_queried_objects_recall(scenes_model, tmp_path):
    import corematching as cm
    from corematching.apps import evaluate

    model, processor = scenes_model
    items = evaluate.eval_questions("scenes:5:6")
    output = tmp_path / "scenes.jsonl"
    summary = evaluate.run_eval(model, processor, cm.RandomTokens(token_budget=8), items, output, batch_size=4,
                                progress=False, settings_extra={"set": "scenes:5:6"})
    rows = [json.loads(line) for line in output.read_text().splitlines()][1:]
    assert summary.answered == 6 and summary.settings["set"] == "scenes:5:6"
    recalls = []
    for row in rows:
        item = items[row["index"]]
        assert row["kind"] == item.kind and row["answer"] == item.answer and len(row["kept_patches"]) == 8
        expected = patch_recall(item.mask, row["kept_patches"])
        assert row.get("object_recall") == expected
        recalls += [expected] if expected is not None else []
    assert summary.object_recall == pytest.approx(sum(recalls) / len(recalls))
    kinds = {item.kind for item in items}
    assert set(summary.per_kind) == kinds and sum(n for _, n in summary.per_kind.values()) == 6


def test_the_eval_command_measures_scenes_smollm2_on_scene_questions(tmp_path, capsys):
    from corematching.apps import cli

    output = tmp_path / "dense.jsonl"
    assert cli.main(["eval", "--model", "scenes-smollm2", "--method", "dense", "--limit", "3", "--output",
                     str(output)]) == 0
    header, *rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert header["settings"]["set"] == "scenes" and len(rows) == 3
    assert [row["question"] for row in rows] == [item.question for item in scenes.sample(3, scenes.EVAL_SEED)]
    assert "question kind" in capsys.readouterr().out
