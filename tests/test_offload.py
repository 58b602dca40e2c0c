"""Core-neuron decoding on models whose FFN weights accelerate keeps offloaded (disk offload on the CPU): the same
tokens and logits as the same method on the fully loaded model and as the oracle; decode steps compute from slices
read once from the offload store, and never bring the offloaded weights in."""

import json
import os

import pytest
import torch
from accelerate import cpu_offload, dispatch_model
from accelerate.utils import offload as accelerate_offload
from oracle import masked_reference, removed_mask
from test_baselines import generate as greedy_with_logits
from test_modes import inputs_of
from tiny_llava import build_pixels, build_prompt, build_tiny_llava, left_pad
from transformers import DynamicCache, LlavaForConditionalGeneration

import corematching as cm
from corematching.runtime import offload

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5
STEPS = 4
NEURON_LAYERS = [1, 2, 3]
PREFIX = "model.language_model.layers"


def method(beta=0.5):
    return cm.CoreMatching(prune_layer=1, token_budget=8, beta=beta, neuron_layers=NEURON_LAYERS)


def ffns_on_disk(layers=(1, 2, 3), whole_layers=()):
    """A device map: these layers' FFNs (and these whole layers) on disk, everything else on the CPU."""
    device_map = {
        "model.vision_tower": "cpu",
        "model.multi_modal_projector": "cpu",
        "lm_head": "cpu",
        "model.language_model.embed_tokens": "cpu",
        "model.language_model.norm": "cpu",
        "model.language_model.rotary_emb": "cpu",
    }
    for layer in range(4):
        if layer in whole_layers:
            device_map[f"{PREFIX}.{layer}"] = "disk"
            continue
        for part in ("self_attn", "input_layernorm", "post_attention_layernorm"):
            device_map[f"{PREFIX}.{layer}.{part}"] = "cpu"
        device_map[f"{PREFIX}.{layer}.mlp"] = "disk" if layer in layers else "cpu"
    return device_map


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llava")
    build_tiny_llava().save_pretrained(folder)
    return folder


def offloaded(checkpoint, tmp_path, store: str, **kwargs):
    """The tiny LLaVA with FFN weights offloaded: read in place from the safetensors checkpoint (from_pretrained),
    from accelerate's .dat files (dispatch_model), or from a state dict in memory (cpu_offload)."""
    if store == "safetensors":
        model = LlavaForConditionalGeneration.from_pretrained(
            checkpoint, device_map=ffns_on_disk(**kwargs), offload_folder=tmp_path / "offload", dtype=torch.float32
        )
    elif store == "dat":
        model = dispatch_model(build_tiny_llava(), ffns_on_disk(**kwargs), offload_dir=str(tmp_path / "offload"))
    else:
        model = cpu_offload(build_tiny_llava(), execution_device="cpu")
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def single():
    return inputs_of(build_prompt(3, 5, seed=0), build_pixels(1, seed=0))


def padded_pair():
    input_ids, attention_mask = left_pad([build_prompt(2, 3, seed=1), build_prompt(6, 9, seed=2)])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": build_pixels(2, seed=5)}


class StoreReads:
    """Counts the FFN tensors accelerate's hooks bring in from the offload store."""

    def __init__(self, monkeypatch):
        self.keys = []
        reads = self.keys

        def counting(getitem):
            def wrapper(store, key):
                reads.append(f"{getattr(store, 'prefix', '')}{key}")
                return getitem(store, key)

            return wrapper

        for cls in (accelerate_offload.OffloadedWeightsLoader, accelerate_offload.PrefixedDataset):
            monkeypatch.setattr(cls, "__getitem__", counting(cls.__getitem__))

    def ffn(self):
        """The reads of the neuron layers' FFN weights."""
        layers = tuple(f"{PREFIX}.{layer}.mlp." for layer in NEURON_LAYERS)
        return [key for key in self.keys if key.startswith(layers)]


@pytest.mark.parametrize("store", ["safetensors", "dat", "memory"])
@pytest.mark.parametrize("which", ["single", "padded-pair"])
def test_offloaded_decoding_equals_the_loaded_model_and_the_oracle(checkpoint, tmp_path, monkeypatch, store, which):
    inputs = single() if which == "single" else padded_pair()
    loaded = build_tiny_llava()
    with cm.sparsify(loaded, method()) as session:
        expected_tokens, expected_logits = greedy_with_logits(loaded, inputs, STEPS)
        expected_record = session.last

    model = offloaded(checkpoint, tmp_path, store)
    assert model.model.language_model.layers[2].mlp.up_proj.weight.device.type == "meta"
    reads = StoreReads(monkeypatch)
    prefill_reads = {}

    def after_prefill(module, args, output):
        prefill_reads.setdefault("ffn", len(reads.ffn()))

    handle = model.model.language_model.register_forward_hook(after_prefill)
    with cm.sparsify(model, method()) as session:
        tokens, logits = greedy_with_logits(model, inputs, STEPS)
        record = session.last
    handle.remove()
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, atol=ATOL, rtol=0)
    assert all(torch.equal(record.neurons[layer], expected_record.neurons[layer]) for layer in NEURON_LAYERS)
    # the prefill brought every FFN weight in through the hooks; the decode steps none
    assert prefill_reads["ffn"] > 0 and len(reads.ffn()) == prefill_reads["ffn"]

    # the oracle, on the loaded model: removed tokens blocked after K, activations zeroed outside the core neurons
    length = inputs["input_ids"].shape[1]
    language_model = loaded.model.language_model
    ffn_modules = {layer: language_model.layers[layer].mlp for layer in NEURON_LAYERS}
    removed = removed_mask(record.keep_mask, record.visual_mask, length + STEPS)
    with masked_reference(language_model, ffn_modules, removed, 1, record.core_neurons_per_sample, length):
        oracle_tokens, oracle_logits = greedy_with_logits(loaded, inputs, STEPS)
    assert torch.equal(tokens, oracle_tokens)
    torch.testing.assert_close(logits, oracle_logits, atol=ATOL, rtol=0)


def union_sizes(record):
    return {layer: torch.unique(record.neurons[layer][record.neuron_rows]).numel() for layer in NEURON_LAYERS}


def test_the_record_reports_the_resident_slices_and_the_bytes_read(checkpoint, tmp_path):
    model = offloaded(checkpoint, tmp_path, "safetensors")
    hidden, width = 64, 96
    with cm.sparsify(model, method()) as session:
        cache = DynamicCache(config=model.config.get_text_config())  # alive: its decision's slices stay
        greedy_with_logits(model, {**single(), "cache": cache}, 1)
        record = session.last
        sizes = union_sizes(record)
        # gate and up [U, H], down [H, U], fp32
        assert record.resident_slice_bytes == sum(3 * hidden * size * 4 for size in sizes.values())
        # gate and up: the core rows only; down: the whole matrix (its core columns are strided)
        assert record.slice_bytes_read == sum((2 * size + width) * hidden * 4 for size in sizes.values())
        ((_, per_layer),) = session.engine._sliced.values()
        assert sorted(per_layer) == NEURON_LAYERS
        for layer, ffn in per_layer.items():
            assert ffn.up.shape == (sizes[layer], hidden) and ffn.down.shape == (hidden, sizes[layer])
            assert ffn.up.device.type == "cpu"


def test_a_later_prefill_replaces_the_slices(checkpoint, tmp_path):
    model = offloaded(checkpoint, tmp_path, "safetensors")
    loaded = build_tiny_llava()
    first, second = single(), inputs_of(build_prompt(6, 2, seed=7), build_pixels(1, seed=7))
    with cm.sparsify(model, method()) as session:
        caches = [DynamicCache(config=model.config.get_text_config()) for _ in range(2)]  # both stay alive
        greedy_with_logits(model, {**first, "cache": caches[0]}, 2)
        (first_slices,) = session.engine._sliced.values()
        tokens, logits = greedy_with_logits(model, {**second, "cache": caches[1]}, STEPS)
        record = session.last
        held = list(session.engine._sliced.values())
    assert len(held) == 1 and held[0] is not first_slices  # nothing of the first decision stays resident
    assert sum(ffn.extra_bytes for ffn in held[0][1].values()) == record.resident_slice_bytes
    with cm.sparsify(loaded, method()):
        expected_tokens, expected_logits = greedy_with_logits(loaded, second, STEPS)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, atol=ATOL, rtol=0)


def test_an_earlier_conversation_continues_exactly_after_its_slices_were_replaced(checkpoint, tmp_path):
    model = offloaded(checkpoint, tmp_path, "safetensors")
    loaded = build_tiny_llava()
    first, second = single(), inputs_of(build_prompt(6, 2, seed=7), build_pixels(1, seed=7))

    def two_conversations(target):
        with cm.sparsify(target, method()):
            out_first = target(**first, use_cache=True)
            target(**second, use_cache=True)  # a second prefill: its slices replace the first's
            next_token = out_first.logits[:, -1:].argmax(-1)
            cont = target(
                input_ids=next_token,
                cache=out_first.past_key_values,
                attention_mask=torch.ones(1, first["input_ids"].shape[1] + 1, dtype=torch.long),
            )
        return cont.logits

    torch.testing.assert_close(two_conversations(model), two_conversations(loaded), atol=ATOL, rtol=0)


def test_whole_offloaded_layers_and_a_text_only_row_decode_exactly(checkpoint, tmp_path):
    model = offloaded(checkpoint, tmp_path, "safetensors", layers=(1,), whole_layers=(2, 3))
    loaded = build_tiny_llava()
    input_ids, attention_mask = left_pad([build_prompt(2, 3, seed=3), torch.arange(3, 15)])
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": build_pixels(1, seed=3)}
    results = []
    for target in (model, loaded):
        with cm.sparsify(target, method()):
            results.append(greedy_with_logits(target, inputs, STEPS))
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], atol=ATOL, rtol=0)


def test_a_device_map_chosen_by_accelerate_under_max_memory_decodes_exactly(checkpoint, tmp_path):
    model = LlavaForConditionalGeneration.from_pretrained(
        checkpoint, device_map="auto", max_memory={"cpu": 150_000}, offload_folder=tmp_path / "offload",
        dtype=torch.float32,
    )  # fmt: skip
    model.generation_config.eos_token_id = None
    assert "disk" in model.hf_device_map.values()
    loaded = build_tiny_llava()
    results = []
    for target in (model, loaded):
        with cm.sparsify(target, method()):
            results.append(greedy_with_logits(target, padded_pair(), STEPS))
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], atol=ATOL, rtol=0)


def test_every_neuron_core_decodes_through_the_hooks(checkpoint, tmp_path):
    model = offloaded(checkpoint, tmp_path, "safetensors")
    loaded = build_tiny_llava()
    results = []
    for target in (model, loaded):
        with cm.sparsify(target, method(beta=1.0)) as session:
            results.append(greedy_with_logits(target, single(), 2))
            assert target is loaded or session.last.resident_slice_bytes == 0
    torch.testing.assert_close(results[0][1], results[1][1], atol=ATOL, rtol=0)


def test_unreadable_or_in_place_offloaded_weights_are_refused(checkpoint, tmp_path):
    model = offloaded(checkpoint, tmp_path, "safetensors")
    with pytest.raises(cm.UnsupportedModeError, match="in_place"):
        cm.sparsify(model, method(), neuron_weights="in_place")
    mlp = model.model.language_model.layers[2].mlp
    hook = mlp.up_proj._hf_hook
    del mlp.up_proj._hf_hook  # a meta weight nothing can bring in
    try:
        with pytest.raises(cm.UnsupportedModelError, match="up projection is an offloaded weight"):
            cm.sparsify(model, method())
    finally:
        mlp.up_proj._hf_hook = hook
    with cm.sparsify(model, cm.CoreMatching(prune_layer=1, token_budget=8, neuron_layers=[])):
        pass  # token pruning alone needs no slices


def test_dat_files_hold_what_the_reader_reads(checkpoint, tmp_path):
    model = offloaded(checkpoint, tmp_path, "dat")
    index = json.loads((tmp_path / "offload" / "index.json").read_text())
    assert f"{PREFIX}.2.mlp.down_proj.weight" in index
    assert os.path.exists(tmp_path / "offload" / f"{PREFIX}.2.mlp.down_proj.weight.dat")
    parts = cm.models.adapter_for(model).ffn(2)
    union = torch.tensor([0, 1, 2, 7, 50, 51, 95])
    slices = offload.read_core_slices(parts, union)
    reference = build_tiny_llava().model.language_model.layers[2].mlp
    assert torch.equal(slices.up, reference.up_proj.weight[union])
    assert torch.equal(slices.gate, reference.gate_proj.weight[union])
    assert torch.equal(slices.down, reference.down_proj.weight[:, union])


def test_slices_are_converted_to_the_dtype_the_model_loads_in(checkpoint, tmp_path):
    model = LlavaForConditionalGeneration.from_pretrained(
        checkpoint, device_map=ffns_on_disk(), offload_folder=tmp_path / "offload", dtype=torch.bfloat16
    )
    reference = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.bfloat16)
    union = torch.tensor([3, 4, 5, 40, 90])
    slices = offload.read_core_slices(cm.models.adapter_for(model).ffn(3), union)
    mlp = reference.model.language_model.layers[3].mlp
    assert slices.up.dtype == torch.bfloat16
    assert torch.equal(slices.up, mlp.up_proj.weight[union]) and torch.equal(
        slices.down, mlp.down_proj.weight[:, union]
    )
    # read in the checkpoint's fp32: the core rows of gate and up, the whole down_proj
    assert slices.bytes_read == (2 * len(union) * 64 + 64 * 96) * 4


# ---------------------------------------------------------------------------------------------- the benchmark's model


def bench_offload():
    """benchmarks/bench_offload.py, imported from its file."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_offload.py"
    spec = importlib.util.spec_from_file_location("bench_offload", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_model_is_generated_atomically_and_resumed(tmp_path, monkeypatch):
    bench = bench_offload()
    config = bench.model_config(scale=1 / 32, layers=4)
    folder = tmp_path / "model"
    shards = bench.shard_plan(config)
    assert len(shards) == 5  # one per decoder layer, one for the rest
    bench.generate_model(folder, config)
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    assert model.config.text_config.hidden_size == 128 and model.config.text_config.num_hidden_layers == 4
    norm = model.model.language_model.layers[1].input_layernorm.weight
    assert torch.equal(norm, torch.ones_like(norm))
    expected = {name: tensor.clone() for name, tensor in model.state_dict().items()}  # off the memory map
    del model

    first, second = sorted(shards)[:2]
    written = (folder / first).stat().st_mtime_ns
    damaged = (folder / second).read_bytes()[:100]
    (folder / second).unlink()
    (folder / second).write_bytes(damaged)  # a damaged shard
    (folder / "rest.safetensors.partial").write_bytes(b"interrupted")  # an interrupted write
    bench.generate_model(folder, config)
    assert (folder / first).stat().st_mtime_ns == written  # complete shards are kept
    assert not list(folder.glob("*.partial"))
    reloaded = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    again = reloaded.state_dict()
    assert all(torch.equal(tensor, again[name]) for name, tensor in expected.items())  # drawn per tensor name
    del reloaded, again

    (folder / second).unlink()
    monkeypatch.setattr(bench.shutil, "disk_usage", lambda path: shutil_usage(free=1 << 20))
    with pytest.raises(SystemExit, match="not enough free disk"):
        bench.generate_model(folder, config)


def shutil_usage(free: int):
    import shutil

    return shutil._ntuple_diskusage(total=free, used=0, free=free)
