"""Shared use of one sparsified model: threads generating at once get what each call gets alone; a method's
input-dependent state (TEAL's thresholds) is set explicitly and kept per method and model."""

import copy
import threading
import time

import pytest
import torch
from test_baselines import generate
from tiny_llava import build_pixels, build_prompt, build_tiny_llava, left_pad

import corematching as cm
from corematching.runtime import session as session_module

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5
THREADS = 4
ROUNDS = 3
JOIN_TIMEOUT = 120  # seconds a thread may take (a thread left waiting is a daemon: it does not hold the process)


def prompt_inputs(seed: int, batch: int = 1):
    """A prompt (or a left-padded batch) with its own image(s), text lengths and seed."""
    prompts = [
        build_prompt(2 + (seed + row) % 4, 3 + (seed * 3 + row) % 5, seed=seed * 10 + row) for row in range(batch)
    ]
    input_ids, attention_mask = left_pad(prompts)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": build_pixels(batch, seed=seed)}


def requests():
    """One request per thread: other prompts, images, batch sizes and lengths."""
    return [(prompt_inputs(seed, batch=1 + seed % 2), 3 + seed % 3) for seed in range(THREADS)]


def run_at_once(jobs):
    """Run every job (a callable) in its own thread, released together: per job its result or the exception it
    raised."""
    start = threading.Barrier(len(jobs))
    results = [None] * len(jobs)

    def one(index, job):
        start.wait()
        try:
            results[index] = job()
        except Exception as error:  # noqa: BLE001 - reported by the test
            results[index] = error

    threads = [threading.Thread(target=one, args=(index, job), daemon=True) for index, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=JOIN_TIMEOUT)
    assert not any(thread.is_alive() for thread in threads), "a thread never finished"
    for result in results:
        if isinstance(result, Exception):
            raise AssertionError(f"a thread failed: {result!r}") from result
    return results


def run_threads(model, session, work):
    """Each (inputs, steps) generated in its own thread at once: per thread (tokens, logits, its session.last)."""

    def job(inputs, steps):
        tokens, logits = generate(model, inputs, steps)
        return tokens, logits, session.last

    return run_at_once([lambda inputs=inputs, steps=steps: job(inputs, steps) for inputs, steps in work])


METHODS = {
    "coreMatching-copy": (lambda: cm.CoreMatching(prune_layer=1, token_budget=None, beta=0.5,
                                                  neuron_layers=[0, 1, 2, 3]), "copy"),
    "coreMatching-in-place": (lambda: cm.CoreMatching(prune_layer=1, token_budget=0.3, beta=0.4,
                                                      neuron_layers=[1, 2, 3]), "in_place"),
    "visionzip": (lambda: cm.VisionZip(dominant=6, contextual=2), "copy"),  # reads the vision tower
}


@pytest.mark.parametrize("which", list(METHODS))
def test_threads_generating_at_once_get_what_each_gets_alone(tiny_llava, which):
    make, weights = METHODS[which]
    model = tiny_llava()
    work = requests()
    with cm.sparsify(model, make(), neuron_weights=weights) as session:
        alone = []
        for inputs, steps in work:
            tokens, logits = generate(model, inputs, steps)
            alone.append((tokens, logits, session.last))
        for _ in range(ROUNDS):
            for (tokens, logits, record), expected in zip(run_threads(model, session, work), alone):
                expected_tokens, expected_logits, expected_record = expected
                assert torch.equal(tokens, expected_tokens)
                torch.testing.assert_close(logits, expected_logits, atol=ATOL, rtol=0)
                assert torch.equal(record.keep_mask, expected_record.keep_mask)  # each thread reads its own record


# ---------------------------------------------------------------------------------------------- TEAL's thresholds


def test_teal_refuses_to_decode_before_it_is_calibrated():
    model = build_tiny_llava(seed=21)  # a model no TEAL instance has seen
    with cm.sparsify(model, cm.TEAL(sparsity=0.5)):
        with pytest.raises(cm.UnsupportedModeError, match=r"TEAL decoding before calibration.*session\.calibrate"):
            generate(model, prompt_inputs(1), 2)


def test_teal_thresholds_are_set_by_calibrate_only_and_kept_per_instance():
    """A request's answer does not depend on which request came first; another instance starts uncalibrated."""
    model = build_tiny_llava(seed=22)
    calibration, first, second = prompt_inputs(5, batch=2), prompt_inputs(6), prompt_inputs(7)
    teal = cm.TEAL(sparsity=0.5)
    with cm.sparsify(model, teal) as session:
        session.calibrate(**calibration)
        calibrated = [teal.thresholds(layer.mlp) for layer in model.model.language_model.layers]
        generate(model, first, 3)
        after_another = generate(model, second, 3)
    assert [teal.thresholds(layer.mlp) for layer in model.model.language_model.layers] == calibrated
    other = cm.TEAL(sparsity=0.5)
    assert other.thresholds(model.model.language_model.layers[0].mlp) is None
    with cm.sparsify(model, other) as session:
        session.calibrate(**calibration)
        alone = generate(model, second, 3)
    assert torch.equal(after_another[0], alone[0])
    torch.testing.assert_close(after_another[1], alone[1], atol=ATOL, rtol=0)
    with cm.sparsify(model, teal):  # the instance keeps its thresholds for this model in a later session
        again = generate(model, second, 3)
    torch.testing.assert_close(again[1], alone[1], atol=ATOL, rtol=0)


def test_calibrate_is_refused_for_a_method_without_input_dependent_state(tiny_llava):
    model = tiny_llava()
    with cm.sparsify(model, cm.CoreMatching(prune_layer=1, token_budget=8)) as session:
        with pytest.raises(ValueError, match="CoreMatching has no input-dependent state to calibrate"):
            session.calibrate(**prompt_inputs(1))


# ---------------------------------------------------------------------------------------------- sessions and threads


def test_a_call_waiting_while_the_session_is_removed_runs_as_the_plain_model(tiny_llava):
    """A thread's call that reached the model before remove() but got its turn after it is a plain call: its
    cache carries no session state, so the plain model continues it. (The language model's entry module called
    directly, whose session forward is the one that waits.)"""
    model = tiny_llava()
    entry, inputs = model.model, prompt_inputs(3)
    follow = {"input_ids": torch.tensor([[7]]),
              "attention_mask": torch.ones(1, inputs["input_ids"].shape[1] + 1, dtype=torch.long)}
    with torch.no_grad():
        dense = entry(**inputs, use_cache=True)
        expected = entry(**follow, cache=dense.cache).last_hidden_state
    session = cm.sparsify(model, cm.CoreMatching(prune_layer=1, token_budget=8, neuron_layers=[1, 2]))
    entered, result = threading.Event(), {}
    handle = entry.register_forward_pre_hook(lambda module, args: entered.set())

    def call():
        with torch.no_grad():
            result["out"] = entry(**inputs, use_cache=True)

    with session._lock:  # the session is busy: the thread's call waits for its turn
        thread = threading.Thread(target=call)
        thread.start()
        assert entered.wait(timeout=30)
        thread.join(timeout=0.2)
        session.remove()
    thread.join(timeout=60)
    handle.remove()
    out = result["out"]
    torch.testing.assert_close(out.last_hidden_state, dense.last_hidden_state, atol=ATOL, rtol=0)
    with torch.no_grad():
        continued = entry(**follow, cache=out.cache).last_hidden_state
    torch.testing.assert_close(continued, expected, atol=ATOL, rtol=0)


def test_two_threads_sparsifying_one_model_leave_one_session(tiny_llava, monkeypatch):
    model = tiny_llava()
    start, outcomes = threading.Barrier(2), []
    check = session_module.check_sliceable

    def slow_check(*args):  # a slow attach: the other thread runs in between
        time.sleep(0.05)
        check(*args)

    monkeypatch.setattr(session_module, "check_sliceable", slow_check)

    def attach():
        start.wait()
        try:
            outcomes.append(cm.sparsify(model, cm.CoreMatching(prune_layer=1, token_budget=8, neuron_layers=[1])))
        except RuntimeError as error:
            outcomes.append(error)

    threads = [threading.Thread(target=attach) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    sessions = [outcome for outcome in outcomes if not isinstance(outcome, Exception)]
    errors = [outcome for outcome in outcomes if isinstance(outcome, Exception)]
    assert len(sessions) == 1 and len(errors) == 1
    assert "already inside a corematching session" in str(errors[0])
    sessions[0].remove()


# ---------------------------------------------------------------------------------------------- Qwen-VL positions


def test_qwen_threads_continuing_their_own_caches_get_what_each_gets_alone():
    """Qwen2.5-VL keeps rope_deltas on the model, and generate() reads them before its first forward: threads that
    continue caches of conversations with other grids each decode at their own positions."""
    import test_qwen_vl_conversations as qwen

    model = qwen.model_of("qwen2.5")
    conversations = [qwen.inputs_of(*qwen.CONVERSATION_A), qwen.inputs_of(*qwen.CONVERSATION_B),
                     qwen.inputs_of(*qwen.SAME_LENGTH)]
    with cm.sparsify(model, qwen.method()) as session:
        caches = [qwen.prefill(model, inputs)[1] for inputs in conversations]

        def work():  # per thread: continue a copy of its conversation's cache, or start one afresh
            jobs = [lambda inputs=inputs, cache=cache: qwen.generate(model, qwen.with_question(inputs),
                                                                     cache=copy.deepcopy(cache))
                    for inputs, cache in zip(conversations, caches)]
            return jobs + [lambda inputs=inputs: qwen.generate(model, inputs) for inputs in conversations[:1]]

        alone = [job() for job in work()]
        for _ in range(ROUNDS):
            for (tokens, logits), (expected_tokens, expected_logits) in zip(run_at_once(work()), alone):
                assert torch.equal(tokens, expected_tokens)
                torch.testing.assert_close(logits, expected_logits, atol=ATOL, rtol=0)
        assert session.last is not None


def test_a_forward_that_raises_releases_the_session_for_other_threads():
    model = build_tiny_llava(seed=23)  # its own model: a session that stays stuck would hold it
    inputs = prompt_inputs(2)
    failures = {"left": 1}

    def fail_once(module, args, output):
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("stop here")

    model.model.language_model.layers[2].mlp.register_forward_hook(fail_once)
    session = cm.sparsify(model, cm.CoreMatching(prune_layer=1, token_budget=8, neuron_layers=[1, 2]))
    with pytest.raises(AssertionError, match="a thread failed: RuntimeError.'stop here'"):
        run_at_once([lambda: generate(model, inputs, 2)])
    released = session._lock.acquire(timeout=10)  # the failed thread has ended: nobody may hold the lock
    assert released, "the session's lock stayed held after a forward raised"
    session._lock.release()
    (other,) = run_at_once([lambda: generate(model, inputs, 2)])  # another thread gets its turn
    alone = generate(model, inputs, 2)
    session.remove()
    assert torch.equal(other[0], alone[0])


# ---------------------------------------------------------------------------------------------- the server's store


def test_a_prompt_cache_entry_counts_the_slices_its_cache_keeps_alive(tiny_llava):
    """After a request, the only thing keeping its conversation's sliced FFNs alive is the prompt-cache entry (a copy
    of its cache): the entry's bytes include them, so --prompt-cache-bytes bounds them too."""
    import asyncio

    from test_serve_worker import PromptProcessor, job, outcome

    from corematching.apps.serve.prompt_cache import PromptCache, tensor_bytes
    from corematching.apps.serve.worker import ModelWorker

    loop = asyncio.new_event_loop()
    store = PromptCache(4)
    worker = ModelWorker(tiny_llava(), PromptProcessor(), store)
    try:
        request = job("p4:6", loop)
        worker.run([request])
        outcome(loop, request)
        (entry,) = store._entries.values()
        session = worker._session
        assert entry.held_bytes == session.held_bytes_of(entry.cache) == session.held_bytes > 0
        assert store.bytes == entry.nbytes == tensor_bytes([entry.cache, entry.first_logits, entry.input_ids]) + \
            entry.held_bytes
    finally:
        worker.close()
        loop.close()


def test_bench_calibrates_teal_before_it_answers_and_times(tmp_path, one_thread):
    """The bench's accuracy run calibrates TEAL on the set's first batch of prompts, its timing on the first timing
    prompt: then TEAL answers and decodes like any method."""
    import json

    from corematching.apps import cli

    output = tmp_path / "bench.jsonl"
    assert cli.main(["bench", "--questions", "2", "--timing-prompts", "1", "--reps", "1", "--new-tokens", "2",
                     "--batch-size", "2", "--output", str(output), "--no-progress", "--methods", "teal"]) == 0
    (record,) = [json.loads(line) for line in output.read_text().splitlines()]
    assert record["spec"] == "teal" and record["answered"] == 2
