"""The runtime's rooms: each call is classified once into a plan (one FFN mode per watched layer), and what a call
decides stays out of transformers' objects (what the vision tower's hooks compute is kept per tower output, by
identity while it lives, never written onto the output)."""

import gc

import torch

import corematching as cm
from corematching.runtime.method_inputs import TowerResults


class _TowerOutput:
    """Stands for a tower's output object (a transformers ModelOutput, which takes attributes)."""


def test_tower_results_are_kept_per_output_while_it_lives_and_not_on_it():
    results = TowerResults()
    output, other = _TowerOutput(), _TowerOutput()
    attention = torch.rand(2, 4)
    results.add(output, {"vision_attention": attention})
    results.add(output, {"patch_sources": torch.arange(8)})
    assert results.get(output, "vision_attention") is attention
    assert torch.equal(results.get(output, "patch_sources"), torch.arange(8))
    assert results.get(other, "vision_attention") is None  # another object (a copy, say) has nothing kept
    assert vars(output) == {}  # nothing written onto the output object
    del output
    gc.collect()
    assert results._by_output == {}  # dropped with its output


def test_each_call_decides_its_ffn_modes_once(tiny_llava, single_inputs):
    """Each entry call is classified once into a plan with one FFN mode per watched layer: the prefill observes
    (dense, choosing core neurons), each decode step runs the neuron layers sliced to the prefill's core neurons."""
    from corematching.runtime.core_decoding import FFNMode

    model, inputs = tiny_llava(), single_inputs()
    neuron_layers = [1, 2]
    method = cm.CoreMatching(prune_layer=1, token_budget=8, beta=1.0, neuron_layers=neuron_layers)
    with cm.sparsify(model, method) as session:
        engine = session.engine
        plans = []  # (plan, layer, mode) per FFN call
        forward = engine.decoding.forward

        def recording(call, layer, parts, hidden, calibrating):
            plans.append((call.plan, layer, call.plan.ffn_modes[layer]))
            return forward(call, layer, parts, hidden, calibrating)

        engine.decoding.forward = recording
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    calls = list(dict.fromkeys(id(plan) for plan, _, _ in plans))
    assert len(calls) == 3  # the prefill and two decode steps, a plan each
    modes = [{layer: mode for plan, layer, mode in plans if id(plan) == call} for call in calls]
    assert modes[0] == {layer: FFNMode.OBSERVE for layer in neuron_layers}
    assert modes[1] == modes[2] == {layer: FFNMode.SLICED for layer in neuron_layers}
