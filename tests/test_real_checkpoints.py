"""Every family on its real checkpoint's geometry and processor (tests/real_checkpoints.py: tiny widths, random
weights, saved and loaded like a downloaded checkpoint): `cm.load_model`, `cm.answer` with the default method, the
one-question CLI, `corematching eval`, `corematching bench` and the server's worker run and give well-formed
results, and every image of a batch of two sizes keeps what the budget says, counted on the adapter's layout."""

import json
import math

import pytest
import real_checkpoints
import torch
from PIL import Image

import corematching as cm
from corematching import layout
from corematching.apps import cli
from corematching.vqa import answer_batch

FAMILIES = sorted(real_checkpoints.FAMILIES)
_LOADED = {}


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    """Factory: the saved checkpoint folder of a family (built once per session)."""
    folders = {}

    def make(name: str):
        if name not in folders:
            folders[name] = real_checkpoints.save(name, tmp_path_factory.mktemp(name))
        return folders[name]

    return make


@pytest.fixture
def loaded(checkpoint_dir):
    def make(name: str):
        if name not in _LOADED:
            _LOADED[name] = cm.load_model(str(checkpoint_dir(name)), device="cpu")
        return _LOADED[name]

    return make


def pictures():
    """Two pictures of different sizes and shapes (a square and a wide one), each with a coloured object."""
    square = Image.new("RGB", (64, 64), (240, 240, 240))
    square.paste((200, 30, 30), (16, 16, 40, 40))
    wide = Image.new("RGB", (160, 80), (20, 20, 20))
    wide.paste((30, 200, 30), (100, 10, 150, 70))
    return square, wide


@pytest.mark.parametrize("name", FAMILIES)
def test_loads_like_a_checkpoint_and_answers(name, loaded, one_thread):
    model, processor = loaded(name)
    assert type(model).__name__ == real_checkpoints.FAMILIES[name].model_class
    square, _ = pictures()
    dense = cm.answer(model, processor, square, "What colour is the square?", max_new_tokens=3)
    sparse = cm.answer(model, processor, square, "What colour is the square?", method=cm.CoreMatching(),
                       max_new_tokens=3)
    assert isinstance(dense, str) and isinstance(sparse, str)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_image_of_a_batch_keeps_its_budget(name, loaded, one_thread):
    model, processor = loaded(name)
    budget = 0.25
    result = answer_batch(model, processor, list(pictures()), ["What is it?", "What colour is the object?"],
                          cm.CoreMatching(token_budget=budget), max_new_tokens=2)
    images = layout.prompt_images(model, result.inputs)
    counts = [[image.positions.numel() for image in sample] for sample in images]
    assert all(len(sample) == 1 for sample in counts), counts
    assert counts[0][0] != counts[1][0] or name in SAME_TOKENS_FOR_EVERY_SIZE, counts
    for row, sample in enumerate(images):
        visual = int(result.record.visual_mask[row].sum())
        assert visual == sum(image.positions.numel() for image in sample)  # the layout covers the visual tokens
        for image in sample:
            kept = layout.kept_in(image.positions, result.record.kept_positions[row])
            assert len(kept) == math.ceil(budget * image.positions.numel()), (row, counts)
        whole = [view for image in sample for view in image.views if view.region == layout.WHOLE]
        assert whole and all(view.grid[0] * view.grid[1] == view.positions.numel() for view in whole)


SAME_TOKENS_FOR_EVERY_SIZE = {"llava-1.5", "gemma3"}  # every picture becomes one square (336 px: 576, 896 px: 256)


@pytest.mark.parametrize("name", FAMILIES)
def test_cli_eval_and_bench_run_on_the_checkpoint(name, checkpoint_dir, tmp_path, capsys, one_thread):
    folder = str(checkpoint_dir(name))
    picture = tmp_path / "wide.png"
    pictures()[1].save(picture)
    code = cli.main(["--image", str(picture), "--question", "What colour is the object?", "--model", folder,
                     "--max-new-tokens", "2", "--out", str(tmp_path / "pictures"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert list((tmp_path / "pictures").glob("*.png")), out  # the kept patches drawn over the picture

    answers = tmp_path / "eval.jsonl"
    code = cli.main(["eval", "--model", folder, "--limit", "2", "--batch-size", "2", "--output", str(answers),
                     "--device", "cpu"])
    assert code == 0, capsys.readouterr()
    rows = [json.loads(line) for line in answers.read_text().splitlines()[1:]]
    assert len(rows) == 2
    for row in rows:
        assert isinstance(row["prediction"], str)
        assert len(row["kept_patches"]) == math.ceil(0.25 * row["n_visual"]) == sum(row["kept_per_image"])
        assert 0 <= row.get("object_recall", 0) <= 1

    records = tmp_path / "bench.jsonl"
    code = cli.main(["bench", "--model", folder, "--methods", "dense;corematching", "--questions", "0",
                     "--timing-prompts", "1", "--reps", "1", "--new-tokens", "2", "--batch-size", "2",
                     "--output", str(records), "--device", "cpu", "--no-progress"])
    assert code == 0, capsys.readouterr()
    bench = [json.loads(line) for line in records.read_text().splitlines()]
    assert [record["method"] for record in bench] == ["Dense", "CoreMatching"]
    dense, sparse = bench
    assert sparse["flops"]["kept_visual_tokens"] < dense["flops"]["kept_visual_tokens"]
    assert sparse["flops"]["prefill"] < dense["flops"]["prefill"]


@pytest.mark.parametrize("name", FAMILIES)
def test_the_server_worker_answers_a_batch_of_two_requests(name, loaded, one_thread):
    """Two requests (pictures of two sizes) in one batch of the server's worker: each gets its answer, its visual
    tokens and kept tokens in `usage`, and its kept patches per image, counted on the adapter's layout."""
    import asyncio

    from corematching.apps.serve.images import LoadedImage
    from corematching.apps.serve.jobs import Job
    from corematching.apps.serve.protocol import ChatRequest
    from corematching.apps.serve.worker import ModelWorker

    model, processor = loaded(name)
    worker = ModelWorker(model, processor)
    loop = asyncio.new_event_loop()
    jobs, method = [], cm.CoreMatching(token_budget=8)
    for number, picture in enumerate(pictures()):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
        request = ChatRequest(messages=messages, images=[LoadedImage(picture, f"picture-{number}")], max_tokens=2,
                              temperature=0.0, top_p=1.0, seed=None, stop=[], stream=False, include_usage=True,
                              method=method, ignore_eos=True)
        prompt = worker.prompt_text(messages)
        jobs.append(Job(request, prompt, worker.encode_request(prompt, [picture]), loop))  # encoded on arrival
    worker.run(jobs)

    async def done(job):
        while True:
            kind, payload = await job.events.get()
            assert kind != "error", payload
            if kind == "done":
                return payload

    outcomes = [loop.run_until_complete(done(job)) for job in jobs]
    worker.close()
    loop.close()
    alone = answer_batch(model, processor, list(pictures()), ["What is it?"] * 2, None, max_new_tokens=1)
    expected_visual = [sum(image.positions.numel() for image in sample)
                       for sample in layout.prompt_images(model, alone.inputs)]
    for outcome, visual in zip(outcomes, expected_visual):
        assert isinstance(outcome.text, str) and outcome.usage.completion_tokens == 2
        assert outcome.usage.batch_size == 2
        kept = min(8, visual)  # a 64 px picture is 4 tokens to Qwen-VL (one per 28 x 28 pixels, 56 px at least)
        assert outcome.usage.visual_tokens == visual and outcome.usage.visual_tokens_kept == kept
        assert [len(patches) for patches in outcome.kept_patches] == [kept]
        assert outcome.grid == worker.adapter.image_grid


# ----------------------------------------------------------------------------------------------- loading


def test_load_model_passes_from_pretrained_options_through(checkpoint_dir, tmp_path, monkeypatch, one_thread):
    import transformers

    folder = str(checkpoint_dir("llava-1.5"))
    model, _ = cm.load_model(folder, device="cpu", attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    received = {}
    original = transformers.AutoModelForImageTextToText.from_pretrained

    def spy(*args, **kwargs):
        received.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", spy)
    options = {"device_map": "cpu", "max_memory": {"cpu": "2GiB"}, "offload_folder": str(tmp_path / "offload"),
               "local_files_only": True}
    model, _ = cm.load_model(folder, dtype=torch.bfloat16, **options)
    assert received == {"dtype": torch.bfloat16, **options}
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    with cm.sparsify(model, cm.CoreMatching()):  # what sparsify needs survives the options
        pass


@pytest.mark.skipif(real_checkpoints.torchvision_missing() is None, reason="torchvision imports: AutoProcessor is used")
def test_without_torchvision_a_processor_has_images_only_and_refuses_videos(loaded, tmp_path, caplog):
    """Qwen2-VL's processor without torchvision: built under its own class name from the saved files, with a log
    line saying why; a video is refused naming torchvision; saved again it is the checkpoint's processor (no video
    processor in its files) and loads again."""
    import numpy as np

    _LOADED.pop("qwen2-vl", None)
    with caplog.at_level("WARNING", logger="corematching.processors"):
        _, processor = loaded("qwen2-vl")
    assert "building its Qwen2VLProcessor without a video processor" in caplog.text
    assert type(processor).__name__ == "Qwen2VLProcessor"
    video = np.zeros((4, 64, 64, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="videos need a video processor.*torchvision"):
        processor(text=["<|vision_start|><|video_pad|><|vision_end|>What happens?"], videos=[video],
                  return_tensors="pt")
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == "Qwen2VLProcessor" and "video_processor" not in saved
    from corematching.processors import load_processor

    again = load_processor(str(tmp_path))
    square, _ = pictures()
    prompt = "<|vision_start|><|image_pad|><|vision_end|>What?"
    first, second = (each(images=[square], text=[prompt], return_tensors="pt") for each in (processor, again))
    assert torch.equal(first["input_ids"], second["input_ids"])
    assert torch.equal(first["pixel_values"], second["pixel_values"])


def test_load_model_refuses_remote_code_and_unknown_options(checkpoint_dir):
    folder = str(checkpoint_dir("llava-1.5"))
    with pytest.raises(ValueError, match="trust_remote_code=True is not supported"):
        cm.load_model(folder, trust_remote_code=True)
    with pytest.raises(TypeError, match="unexpected options torch_dtyp"):
        cm.load_model(folder, torch_dtyp=torch.float16)
    with pytest.raises(ValueError, match="bundled model built in place"):
        cm.load_model("evqa-smollm2", device_map="auto")


# ----------------------------------------------------------------------------------------------- object recall


def test_a_mask_is_laid_over_a_grid_that_does_not_divide_it():
    from corematching.apps.evaluate import covered_patches

    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[:32, :32] = True  # the top-left quarter: 12 x 12 of LLaVA-1.5's 24 x 24 patches
    covered = covered_patches(mask, (24, 24)).view(24, 24)
    assert covered[:12, :12].all() and covered.sum() == 144
    one_pixel = torch.zeros(3, 3)
    one_pixel[0, 0] = 1  # a 2 x 2 grid over 3 x 3 pixels: the first cell holds 1 of its 2.25 pixels
    assert torch.allclose(layout.cell_coverage(one_pixel, (2, 2)), torch.tensor([[1 / 2.25, 0], [0, 0]]))


def test_object_recall_maps_the_mask_onto_every_tile_and_the_global_view(loaded):
    """Idefics3 splits a square picture into 4 x 4 tiles plus a global view (13 x 13 tokens each). An object in the
    top-left 19 x 19 pixels of a 64 px picture (tiles of 16 px, tokens of 16 / 13 px; global tokens of 64 / 13 px)
    fills tile 0 (169 patches), 3 columns of tile 1, 3 rows of tile 4 (the third 0.44 covered: a patch counts from
    a quarter), 8 of tile 5's top-left 3 x 3 (not the corner, 0.44 x 0.44 covered) and 4 x 4 patches of the global
    view."""
    from corematching.apps.evaluate import object_recall
    from corematching.vqa import prompts_for

    model, processor = loaded("idefics3")
    picture = Image.new("RGB", (64, 64))
    inputs = processor(images=[[picture]], text=prompts_for(processor, ["Where?"]), return_tensors="pt")
    images = layout.prompt_images(model, inputs)[0]
    assert [view.grid for view in images[0].views] == [(13, 13)] * 17
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[:19, :19] = True
    covered = 169 + 39 + 39 + 8 + 16
    assert object_recall(images, images[0].positions, mask) == 1.0
    assert object_recall(images, images[0].views[0].positions, mask) == pytest.approx(169 / covered)
    corner = images[0].views[-1].positions.view(13, 13)[:4, :4].flatten()  # the global view's top-left patches
    assert object_recall(images, corner, mask) == pytest.approx(16 / covered)
    right = images[0].views[1].positions.view(13, 13)[:, :3].flatten()  # tile 1's left columns
    assert object_recall(images, right, mask) == pytest.approx(39 / covered)


def test_tiles_follow_the_shape_of_the_picture():
    assert layout.tile_arrangement(16, 1.0) == (4, 4)
    assert layout.tile_arrangement(8, 2.0) == (2, 4)  # a wide picture: 2 rows of 4 tiles
    assert layout.tile_arrangement(8, 0.5) == (4, 2)
    assert layout.tile_arrangement(6, 1.0) == (2, 3)  # equally close: fewer rows


# ----------------------------------------------------------------------------------------------- the default method


def _family_models():
    """(model, inputs of a prompt with two images of different sizes) of the tiny models of the family tests (the
    real checkpoints above put one image in each prompt)."""
    import test_family_idefics3 as idefics3
    import test_family_internvl as internvl
    import test_family_llava_next as anyres
    import test_family_mistral3 as mistral3
    import test_family_qwen_vl as qwen

    return {
        "qwen2-vl": lambda: (qwen.model_of("qwen2"), qwen.inputs_of(*qwen.TWO_IMAGES)),
        "qwen2.5-vl": lambda: (qwen.model_of("qwen2.5"), qwen.inputs_of(*qwen.TWO_IMAGES)),
        "mistral3": lambda: (mistral3.model_of("mistral"), mistral3.batch([mistral3.TWO_IMAGES])),
        "internvl": lambda: (internvl.model_of(), internvl.batch([internvl.TWO_IMAGES])),
        "llava-onevision": lambda: (anyres.model_of("onevision"),
                                    anyres.batch("onevision", [anyres.two_images("onevision")])),
        "smolvlm": lambda: (idefics3.model_of("smolvlm"), idefics3.batch([idefics3.TWO_IMAGES])),
    }


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl", "mistral3", "internvl", "llava-onevision", "smolvlm"])
def test_the_default_method_runs_on_every_family(family, one_thread):
    """cm.CoreMatching() with every default (prune layer 1, a quarter of each image's tokens) on a prompt with two
    images; test_loads_like_a_checkpoint_and_answers runs it on every family's real checkpoint."""
    model, inputs = _family_models()[family]()
    method = cm.CoreMatching()
    with cm.sparsify(model, method) as session, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        record = session.last
    assert record.prune_layer == method.prune_layer
    images = layout.prompt_images(model, inputs)[0]
    assert len(images) == 2
    for image in images:
        kept = layout.kept_in(image.positions, record.kept_positions[0])
        assert len(kept) == math.ceil(method.token_budget * image.positions.numel())


def test_a_centre_cropping_processor_shows_the_middle_of_a_wide_picture(loaded):
    """LLaVA-1.5's CLIP preprocessing resizes the shorter side to 336 px and cuts the middle 336 x 336: of a
    160 x 80 picture its 24 x 24 grid shows the middle half; an object in the left quarter is not in it."""
    from corematching.apps.evaluate import object_recall
    from corematching.vqa import prompts_for

    model, processor = loaded("llava-1.5")
    assert layout.centre_crop_region(processor.image_processor, 160, 80) == (0.0, 0.25, 1.0, 0.75)
    inputs = processor(images=[[pictures()[1]]], text=prompts_for(processor, ["Where?"]), return_tensors="pt")
    images = layout.prompt_images(model, inputs)[0]
    layout.place_for_picture(images, 160, 80, processor.image_processor)
    assert [view.region for view in images[0].views] == [(0.0, 0.25, 1.0, 0.75)]
    left, middle = torch.zeros(80, 160, dtype=torch.bool), torch.zeros(80, 160, dtype=torch.bool)
    left[:, :40] = True
    middle[:, 40:80] = True  # the left half of what the grid shows: 12 of its 24 columns
    assert object_recall(images, images[0].positions, left) is None
    kept_left_columns = images[0].positions.view(24, 24)[:, :6].flatten()
    assert object_recall(images, kept_left_columns, middle) == pytest.approx(6 / 12)
