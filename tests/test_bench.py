"""The benchmark harness: FLOP counts against a hand count, methods by name, and `corematching bench` end to end."""

import json
import math

import pytest
import torch
from tiny_llava import build_pixels, build_prompt
from torch.utils.flop_counter import FlopCounterMode

import corematching as cm
from corematching import flops
from corematching.apps import bench, cli, method_spec

# ---------------------------------------------------------------------------------------------- FLOPs by hand

# The tiny LLaVA (tests/tiny_llava.py): language model hidden 64, 4 heads x 16 (q 64 wide), 2 KV heads (k, v 32
# wide), FFN 96 (SwiGLU), 4 layers, vocabulary 128; CLIP tower width 32, FFN 64, 2 layers, 24x24 images in
# 4x4 patches (36 patches + CLS), projector 32 -> 64 -> 64.
PROJECTIONS = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64  # q, k, v, o multiply-adds per token
FFN = 3 * 64 * 96  # gate, up, down
LM_HEAD = 64 * 128


def hand_layer(tokens, keys, ffn_width=96):
    return 2 * (tokens * PROJECTIONS + 2 * keys * 64 + tokens * 3 * 64 * ffn_width)


def hand_vision():
    patch = 36 * (3 * 4 * 4) * 32
    layer = 37 * (4 * 32 * 32 + 2 * 32 * 64) + 2 * 37 * 37 * 32  # linear maps; scores and values over 37 keys
    projector = 36 * (32 * 64 + 64 * 64)
    return 2 * (patch + 2 * layer + projector)


def single(seed=0):
    prompt = build_prompt(3, 5, seed)  # 1 + 3 + 36 + 5 = 45 tokens
    return {"input_ids": prompt[None], "attention_mask": torch.ones(1, len(prompt), dtype=torch.long),
            "pixel_values": build_pixels(1, seed)}


def test_flops_of_corematching_equal_a_hand_count(tiny_llava, one_thread):
    model = tiny_llava()
    method = cm.CoreMatching(prune_layer=1, token_budget=9, beta=0.5, neuron_layers=[2, 3])
    _, record = bench.timed_generate(model, method, single(), new_tokens=3)
    assert len(record.kept_positions[0]) == 45 - 36 + 9
    assert {layer: len(n) for layer, n in record.core_neurons.items()} == {2: 48, 3: 48}

    counted = flops.sample_flops(flops.model_shapes(model), record, prompt_length=45, images=1, new_tokens=3)

    # prefill: layers 0-1 see 45 tokens, layers 2-3 the 18 kept; causal attention; LM head on the last token
    prefill = 2 * hand_layer(45, 45 * 46 // 2) + 2 * hand_layer(18, 18 * 19 // 2) + 2 * LM_HEAD
    assert counted.prefill == prefill
    assert counted.vision == hand_vision()
    # decode steps 1 and 2 (the first new token comes from the prefill): one query, the prompt tokens present
    # at the layer plus the generated ones; layers 2-3 compute 48 of 96 neurons
    steps = [2 * hand_layer(1, 45 + s) + 2 * hand_layer(1, 18 + s, ffn_width=48) + 2 * LM_HEAD for s in (1, 2)]
    assert counted.decode_per_token == sum(steps) / 2
    assert counted.prefill_total == prefill + hand_vision()


def test_dense_flops_match_torch_flop_counter(tiny_llava):
    """An independent count: torch's FlopCounterMode on the eager model, which computes the full (not causal)
    score matrix, so it counts the masked half of the scores and values too."""
    model = tiny_llava(attn="eager")
    inputs = single()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs, logits_to_keep=1)
    shapes = flops.model_shapes(model)
    ours = flops.vision_flops(shapes.vision, 1) + flops.prefill_flops(shapes, [45] * 4)
    masked_half = 4 * 2 * 2 * 64 * (45 * 45 - 45 * 46 // 2)
    assert counter.get_total_flops() == ours + masked_half


def test_flops_follow_what_was_kept(tiny_llava, one_thread):
    model = tiny_llava()
    shapes = flops.model_shapes(model)
    counts = {}
    for name, method in [("dense", cm.Dense()), ("random", cm.RandomTokens(token_budget=0.25, prune_layer=2)),
                         ("adaptive", cm.CoreMatching(token_budget=None, prune_layer=0))]:
        _, record = bench.timed_generate(model, method, single(1), new_tokens=2)
        counts[name] = bench.count_sample(shapes, record, single(1), new_tokens=2)
        counts[name]["kept"] = len(record.kept_positions[0])
    assert counts["dense"]["kept_visual_tokens"] == 36 and counts["dense"]["prefill_language_model"] == (
        4 * hand_layer(45, 45 * 46 // 2) + 2 * LM_HEAD)
    assert counts["random"]["kept_visual_tokens"] == 9
    assert counts["random"]["prefill_language_model"] == (
        3 * hand_layer(45, 45 * 46 // 2) + hand_layer(18, 18 * 19 // 2) + 2 * LM_HEAD)
    kept = counts["adaptive"]["kept"]
    assert counts["adaptive"]["prefill_language_model"] == (
        hand_layer(45, 45 * 46 // 2) + 3 * hand_layer(kept, kept * (kept + 1) // 2) + 2 * LM_HEAD)


# ---------------------------------------------------------------------------------------------- methods by name


def test_method_specs_build_public_methods():
    assert method_spec.build("dense") == cm.Dense()
    assert method_spec.build("corematching:token_budget=8,neuron_layers=[3, 4],match=all") == cm.CoreMatching(
        token_budget=8, neuron_layers=[3, 4], match="all")
    assert method_spec.build("random:token_budget=0.5,seed=3") == cm.RandomTokens(token_budget=0.5, seed=3)
    assert method_spec.build("uniformtokens:token_budget=4") == cm.UniformTokens(token_budget=4)
    assert method_spec.build("corematching:token_budget=None").token_budget is None
    assert method_spec.build("corematching", token_budget=3, beta=0.5) == cm.CoreMatching(token_budget=3, beta=0.5)
    assert method_spec.build("corematching:beta=0.3", beta=0.5).beta == 0.3  # the spec wins


def test_every_exported_method_has_a_name():
    exported = {name for name in cm.__all__
                if isinstance(getattr(cm, name), type) and issubclass(getattr(cm, name), cm.methods.SparsityMethod)
                and name != "SparsityMethod"}
    names = method_spec.method_classes()
    assert {cls.__name__ for cls in names.values()} == exported
    for name in exported:
        assert names[name.lower()] is getattr(cm, name)


def test_user_method_by_module_path(tmp_path, monkeypatch):
    (tmp_path / "my_methods.py").write_text(
        "from dataclasses import dataclass\n"
        "import corematching as cm\n"
        "from corematching.methods import SparsityMethod\n"
        "@dataclass\n"
        "class KeepAll(SparsityMethod):\n"
        "    token_budget: int = 4\n"
        "class NotAMethod:\n"
        "    pass\n"
        "class Plain(SparsityMethod):\n"
        "    def __init__(self, token_budget=64, seed=0):\n"
        "        self.token_budget, self.seed = token_budget, seed\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    method = method_spec.build("my_methods:KeepAll:token_budget=7")
    assert type(method).__name__ == "KeepAll" and method.token_budget == 7
    assert method_spec.expand("my_methods:KeepAll;dense", [2, 0.5]) == [
        "my_methods:KeepAll:token_budget=2", "my_methods:KeepAll:token_budget=0.5", "dense"]
    plain = method_spec.build("my_methods:Plain:token_budget=8")  # a plain class: fields from its __init__
    assert (plain.token_budget, plain.seed) == (8, 0)
    assert method_spec.expand("my_methods:Plain", [0.5]) == ["my_methods:Plain:token_budget=0.5"]
    with pytest.raises(ValueError, match=r"Plain does not take beta \(it takes seed, token_budget\)"):
        method_spec.build("my_methods:Plain:beta=0.5")
    from corematching.apps.evaluate import method_settings
    assert method_settings(plain) == {"method": "Plain", "token_budget": 8, "seed": 0}
    with pytest.raises(ValueError, match="not a corematching method"):
        method_spec.build("my_methods:NotAMethod")
    with pytest.raises(ValueError, match="has no 'Missing'"):
        method_spec.build("my_methods:Missing")


@pytest.mark.parametrize("spec, message", [
    ("fastest", "unknown method 'fastest'"),
    ("corematching:bogus=1", "CoreMatching does not take bogus"),
    ("corematching:rho=1.5", "rho must be"),
    ("corematching:0.25", "method field must be name=value"),
    ("corematching:token_budget=1,token_budget=2", "given twice"),
    ("corematching:neuron_layers=[1,2", "unbalanced"),
    ("no_such_module_x:Class", "cannot import method module"),
])
def test_bad_method_specs_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        method_spec.build(spec)


def test_budgets_expand_only_methods_with_a_token_budget():
    specs = method_spec.expand("dense; corematching:beta=0.5 ;random:token_budget=3", [0.5, 0.125])
    assert specs == ["dense", "corematching:beta=0.5,token_budget=0.5", "corematching:beta=0.5,token_budget=0.125",
                     "random:token_budget=3"]
    assert method_spec.describe(method_spec.build(specs[2])) == "CoreMatching 12.5%"


def test_specs_of_methods_without_a_token_budget():
    assert method_spec.build("pdrop:schedule=((2, 0.25),)") == cm.PDrop(schedule=((2, 0.25),))
    assert method_spec.expand("visionzip:dominant=13,contextual=3;teal", [0.5]) == [
        "visionzip:dominant=13,contextual=3", "teal"]  # no token_budget field: not repeated
    assert method_spec.describe(cm.VisionZip(dominant=13, contextual=3), kept_share=16 / 64) == "VisionZip 25%"
    assert method_spec.describe(cm.TEAL(sparsity=0.5), kept_share=1.0) == "TEAL sparsity=0.5"


def test_cli_method_accepts_a_spec(tmp_path):
    args = cli.make_parser("eval").parse_args(["--output", "x", "--method", "uniformtokens:token_budget=4"])
    assert cli.build_method(args) == cm.UniformTokens(token_budget=4)
    args = cli.make_parser("eval").parse_args(["--output", "x", "--method", "randomtokens", "--budget", "3"])
    assert cli.build_method(args) == cm.RandomTokens(token_budget=3)


# ---------------------------------------------------------------------------------------------- report pieces


def test_accuracy_intervals_come_from_the_number_of_questions():
    narrow = {"accuracy": 0.9, "answered": 2000}
    wide = {"accuracy": 0.9, "answered": 20}
    acc, low, high = bench.interval_points(narrow)
    assert acc == pytest.approx(90.0) and 88.5 < low < 90.0 < high < 91.5  # about +-1.3 points
    _, low_w, high_w = bench.interval_points(wide)
    assert low_w < 75 and high_w > 97  # 18 of 20
    assert bench.intervals_overlap(narrow, {"accuracy": 0.88, "answered": 20})
    assert not bench.intervals_overlap(narrow, {"accuracy": 0.80, "answered": 2000})


# ---------------------------------------------------------------------------------------------- end to end


def test_bench_end_to_end_and_resume(tmp_path, capsys, one_thread):
    output = tmp_path / "bench.jsonl"
    common = ["bench", "--questions", "4", "--timing-prompts", "1", "--reps", "1", "--new-tokens", "3",
              "--batch-size", "4", "--output", str(output), "--no-progress"]
    assert cli.main(common + ["--methods", "dense;random", "--budgets", "0.125"]) == 0
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["spec"] for r in records] == ["dense", "random:token_budget=0.125"]
    dense, random = records
    assert dense["flops"]["kept_visual_tokens"] == 64 and random["flops"]["kept_visual_tokens"] == 8
    assert random["flops"]["prefill"] < dense["flops"]["prefill"]
    assert random["flops"]["vision"] == dense["flops"]["vision"] > 0
    for record in records:
        assert record["answered"] == 4 and 0 <= record["accuracy"] <= 1
        assert all(value > 0 and math.isfinite(value) for value in record["times"].values())
        assert record["memory"]["peak_bytes"] > 0
    assert dense["object_recall"] == 1.0 and 0 <= random["object_recall"] < 1
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert (tmp_path / "bench-answers" / "random_token_budget=0.125.jsonl").exists()

    # a rerun measures only what is missing; other bench settings are refused
    capsys.readouterr()
    assert cli.main(common + ["--methods", "dense;random", "--budgets", "0.125"]) == 0
    assert "loading" not in capsys.readouterr().out
    assert len(output.read_text().splitlines()) == 2
    other = [arg if arg != "3" else "5" for arg in common]  # --new-tokens 5
    assert cli.main(other + ["--methods", "dense"]) == 2
    assert "other bench settings" in capsys.readouterr().err


def test_measured_vision_flops_equal_the_hand_count(tiny_llava):
    model = tiny_llava()
    assert flops.measured_vision_flops(model, single(), model.model.language_model) == hand_vision()


def test_vision_flops_of_tiled_images_are_measured(one_thread):
    """LLaVA-NeXT: the shapes cannot tell how many tiles an image takes; the dense pass is counted instead, and
    equals torch's count of the eager model's image-feature call alone (tower over every tile, projector)."""
    import test_family_llava_next as next_family

    model, eager = next_family.model_of("next"), next_family.model_of("next", "eager")
    assert flops.model_shapes(model).vision is None
    counts = []
    for size in [(20, 20), (40, 20)]:
        s = next_family.sample("next", [size], 2, 3, seed=1)
        inputs = next_family.batch("next", [s])
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            eager.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
        measured = flops.measured_vision_flops(model, inputs, model.model.language_model)
        assert measured == counter.get_total_flops() > 0
        counts.append(measured)
    tiles = [next_family.patches_of(size) for size in [(20, 20), (40, 20)]]
    assert tiles[0] != tiles[1] and (counts[0] < counts[1]) == (tiles[0] < tiles[1])  # follows the tile count


def test_gpu_check_runs_its_checks_with_tiny_widths(tmp_path, one_thread):
    """benchmarks/gpu_check.py, the script run when a GPU is lent, runs here with --tiny on the CPU: its batch
    invariance and in-place checks hold, its timing table has the three methods, and its offloaded comparison
    really offloads: dense streams the FFN originals at every forward, CoreMatching once, then decodes from
    resident slices."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    output = tmp_path / "gpu_check.md"
    assert gpu_check.main(["--tiny", "--device", "cpu", "--output", str(output), "--new-tokens", "3",
                           "--reps", "1", "--offload-reps", "1"]) == 0
    text, offloaded = output.read_text().split("## FFN originals offloaded to CPU memory, core slices on the device")
    assert "| 0 | 602 | yes |" in text and "| FFN weights bit for bit the same after the session | yes |" in text
    assert "| same tokens, in place and copy | yes |" in text
    rows = [line for line in text.splitlines() if line.startswith("| dense") or line.startswith("| CoreMatching")]
    assert [row.split(" | ")[1] for row in rows] == ["576/576", "64/576", "64/576"]
    from corematching.plan import parse_bytes

    cells = [line.strip("| ").split(" | ") for line in offloaded.splitlines() if line.startswith("| ")][1:]
    assert [row[0] for row in cells] == ["dense (offloaded)", "CoreMatching, beta 0.4", "CoreMatching, beta 0.2"]
    # rows after the header; columns 7-9: host->device bytes, FFN originals streamed by the hooks, core slices resident
    assert cells[0][9] == "-"  # dense decodes from nothing resident but the streamed originals
    host, streamed = ([parse_bytes(row[column]) for row in cells] for column in (7, 8))
    slices = [parse_bytes(row[9]) for row in cells[1:]]
    # 3 new tokens: dense brings every offloaded FFN in at each of 3 forwards, CoreMatching at its prefill only
    assert streamed[1] > 0 and all(math.isclose(streamed[0], 3 * value, rel_tol=0.01) for value in streamed[1:])
    assert 0 < slices[1] < slices[0]  # beta 0.2 keeps fewer core neurons than 0.4
    assert host[0] == streamed[0] and all(h > s for h, s in zip(host[1:], streamed[1:]))  # + the slices read
