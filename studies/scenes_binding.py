"""Does `scenes-smollm2` bind the asked shape to its colour? A probe, not a benchmark.

    python studies/scenes_binding.py [--scenes 60]

Scenes with at least two objects of unique shapes and different colours (seed 99, not a training seed) are
asked "What color is the <shape>?" about each of two such objects. A model that binds answers each question with
its own object's colour; a model that reads the image but not the question's object answers the same colour for
both. Prints: answers right, answers naming a colour present in the scene, pairs whose answer changes with the
asked shape, and how often the answer is the colour of the largest or the leftmost object.
"""

import argparse
import collections

import torch

import corematching as cm
from corematching.vqa import answer_batch
from corematching.zoo import scenes

PROBE_SEED = 99


def area(obj: scenes.SceneObject) -> int:
    x0, y0, x1, y1 = obj.box
    return (x1 - x0) * (y1 - y0)


def probe_pairs(count: int) -> list[tuple[scenes.Scene, scenes.SceneObject, scenes.SceneObject]]:
    pairs, index = [], 0
    while len(pairs) < count:
        scene = scenes.scene(PROBE_SEED, index)
        index += 1
        unique = [o for o in scene.objects if sum(p.shape == o.shape for p in scene.objects) == 1]
        if len(unique) >= 2 and unique[0].color != unique[1].color:
            pairs.append((scene, unique[0], unique[1]))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, processor = cm.load_model("scenes-smollm2")
    pairs = probe_pairs(args.scenes)
    asked = [(scene, obj) for scene, first, second in pairs for obj in (first, second)]
    answers = []
    for start in range(0, len(asked), 16):
        chunk = asked[start : start + 16]
        questions = [f"What color is the {obj.shape}?" for _, obj in chunk]
        answers += answer_batch(model, processor, [scene.image for scene, _ in chunk], questions, None)[0]
    n = len(answers)
    right = sum(answer == obj.color for answer, (_, obj) in zip(answers, asked))
    present = sum(answer in {o.color for o in scene.objects} for answer, (scene, _) in zip(answers, asked))
    changes = sum(answers[2 * k] != answers[2 * k + 1] for k in range(len(pairs)))
    largest = sum(a == max(s.objects, key=area).color for a, (s, _) in zip(answers, asked))
    leftmost = sum(a == min(s.objects, key=lambda o: o.box[0]).color for a, (s, _) in zip(answers, asked))
    print(f"{len(pairs)} scenes, 2 questions each: right {right}/{n}; colour present in the scene {present}/{n}; "
          f"answer changes with the asked shape {changes}/{len(pairs)}; colour of the largest object "
          f"{largest}/{n}, of the leftmost {leftmost}/{n}")
    print("answers:", collections.Counter(answers).most_common())


if __name__ == "__main__":
    main()
