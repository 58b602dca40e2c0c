"""The continuous-batching loop (apps/serve/continuous.py and its modules): token choice on the device (seeded
sampling batch-invariant), incremental text and stop sequences, and the batcher: requests arriving at random steps
get the tokens they get alone, whatever method, budget or client comes and goes around them."""

import random

import pytest
import torch
from tiny_llava import build_pixels, build_prompt, build_tiny_llava

import corematching as cm
from corematching.apps.serve.choose import choose_tokens, new_generator
from corematching.apps.serve.continuous import ContinuousBatcher
from corematching.apps.serve.prompt_cache import PromptCache
from corematching.apps.serve.sequence import MemoryRefused, Sequence, combine_inputs
from corematching.apps.serve.stream_text import StreamText

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ token choice


def test_greedy_rows_take_the_argmax():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    chosen = choose_tokens(logits, torch.zeros(4), torch.ones(4), [None] * 4)
    assert torch.equal(chosen, logits.argmax(-1))


def test_seeded_rows_sample_the_same_tokens_alone_and_batched():
    """Each row draws from its own generator and its own row of logits: batched in any order, with greedy and
    other sampled rows beside it, a seed gives the tokens it gives alone."""
    settings = [(0.7, 1.0, 11), (0.0, 1.0, None), (1.3, 0.8, 12), (1.0, 0.3, 13), (0.9, 0.95, 11)]
    rng = torch.Generator().manual_seed(1)
    steps = [torch.randn(len(settings), 200, generator=rng) * 3 for _ in range(25)]

    def run(rows: list[int]) -> list[list[int]]:
        temperature = torch.tensor([settings[r][0] for r in rows])
        top_p = torch.tensor([settings[r][1] for r in rows])
        generators = [None if settings[r][0] == 0 else new_generator(settings[r][2], "cpu") for r in rows]
        out = []
        for logits in steps:
            out.append(choose_tokens(logits[rows], temperature, top_p, generators).tolist())
        return [[step[i] for step in out] for i in range(len(rows))]

    alone = [run([row])[0] for row in range(len(settings))]
    for order in ([0, 1, 2, 3, 4], [4, 2, 0, 3, 1], [3, 0]):
        for position, row in enumerate(order):
            assert run(order)[position] == alone[row]
    assert alone[0] != alone[4]  # same seed, other temperature and top-p: another draw of the distribution
    assert len(set(alone[2])) > 3  # sampling really samples


def test_sampling_follows_the_softmax_and_cuts_at_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = new_generator(0, "cpu")
    counts = torch.zeros(4)
    for _ in range(4000):
        counts[choose_tokens(logits, torch.ones(1), torch.ones(1), [generator])] += 1
    assert torch.allclose(counts / 4000, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    counts.zero_()
    for _ in range(2000):  # top_p 0.7: the smallest prefix with mass >= 0.7 is the first two tokens
        counts[choose_tokens(logits, torch.ones(1), torch.full((1,), 0.7), [generator])] += 1
    assert counts[2:].sum() == 0 and counts[1] > 0


# ------------------------------------------------------------------------------------------------ text


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from corematching.zoo.smollm2 import CACHE_NAME, cache_dir

    local = cache_dir() / CACHE_NAME
    if not (local / "tokenizer_config.json").exists() and not (local / "tokenizer.json").exists():
        pytest.skip("the SmolLM2 tokenizer is not converted on this machine")
    return AutoTokenizer.from_pretrained(local)


TEXTS = ["The cat sat on the mat.", "héllo wörld, 世界 🙂 and more: ünïcödé!", "  spaces   and\nnew lines\n\nend"]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_equals_decoding_everything(tokenizer, text):
    tokens = tokenizer.encode(text, add_special_tokens=False)
    rng = random.Random(0)
    tokens = tokens + [rng.randrange(len(tokenizer)) for _ in range(20)]  # and arbitrary tokens after it
    stream = StreamText(tokenizer, max_tokens=len(tokens), stop=[], eos_ids=set())
    pieces = [stream.add(token) for token in tokens]
    expected = tokenizer.decode(tokens, skip_special_tokens=True)
    assert stream.finish_reason == "length"
    assert stream.text == expected
    assert "".join(pieces) == expected


def test_a_stop_sequence_cuts_the_text_and_never_reaches_the_stream(tokenizer):
    text = "first part, then STOP here and more text after"
    tokens = tokenizer.encode(text, add_special_tokens=False)
    stream = StreamText(tokenizer, max_tokens=100, stop=["STOP", "never"], eos_ids=set())
    pieces = []
    for token in tokens:
        pieces.append(stream.add(token))
        if stream.finished:
            break
    assert stream.finish_reason == "stop"
    assert stream.text == text[: text.index("STOP")]
    assert "".join(pieces) == stream.text
    assert all("S" not in piece for piece in pieces)  # "S" of "STOP" was held back, then cut


def test_the_end_token_finishes_without_text(tokenizer):
    stream = StreamText(tokenizer, max_tokens=10, stop=[], eos_ids={2})
    first = stream.add(tokenizer.encode("Yes", add_special_tokens=False)[0])
    assert stream.add(2) == "" and stream.finish_reason == "stop" and first + "" == stream.text


# ------------------------------------------------------------------------------------------------ the batcher


class CharTokenizer:
    """Token t -> one character (enough for the tiny model's 128 tokens)."""

    def decode(self, tokens, skip_special_tokens=True):
        return "".join(chr(0x41 + t % 58) for t in tokens)


def request_inputs(index: int, with_image: bool = True) -> dict:
    ids = build_prompt(1 + index % 4, 2 + (3 * index) % 7, seed=index)
    if not with_image:
        ids = ids[ids != 120]
    inputs = {"input_ids": ids[None], "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    if with_image:
        inputs["pixel_values"] = build_pixels(1, index)
    return inputs


def make_sequence(index: int, method=None, **settings) -> Sequence:
    rng = random.Random(index)
    options = dict(max_tokens=rng.choice([3, 5, 12]), temperature=rng.choice([0.0, 0.0, 0.8]), seed=100 + index,
                   top_p=rng.choice([1.0, 0.9]))
    options.update(settings)
    return Sequence(inputs=request_inputs(index, with_image=index % 5 != 4), method=method,
                    tokenizer=CharTokenizer(), **options)


CORE = cm.CoreMatching(prune_layer=1, token_budget=None, beta=0.5, neuron_layers=[2, 3])
FEWER = cm.CoreMatching(prune_layer=1, token_budget=0.25, beta=0.5, neuron_layers=[2, 3])


def run(batcher: ContinuousBatcher, sequences: list[Sequence], seed: int) -> list[int]:
    """Submit the sequences at seeded random steps; returns the batch size seen at each step."""
    rng = random.Random(seed)
    waiting = list(sequences)
    sizes = []
    while waiting or not batcher.idle:
        for _ in range(min(len(waiting), rng.choice([0, 0, 1, 2, 3]))):
            batcher.submit(waiting.pop(0))
        batcher.step()
        sizes.append(batcher.metrics()["batch_size"])
    return sizes


def alone_tokens(model, make, methods) -> list[list[int]]:
    out = []
    for index, method in enumerate(methods):
        batcher = ContinuousBatcher(model, max_batch=1)
        sequence = make(index, method)
        batcher.submit(sequence)
        batcher.run_until_idle()
        batcher.close()
        out.append(sequence.text.tokens)
    return out


@pytest.mark.parametrize("static", [False, True])
def test_requests_arriving_at_random_steps_get_their_tokens_alone(static):
    """Greedy and seeded requests, with and without an image, under CoreMatching with core neurons (and two
    budgets, which run as separate batches), arriving at random steps: each gets exactly its tokens alone;
    streamed pieces add up to its text; every request finishes once."""
    model = build_tiny_llava()
    methods = [CORE if index % 3 else FEWER for index in range(10)]
    with torch.no_grad():
        expected = alone_tokens(model, make_sequence, methods)
        for seed in range(2):
            done, pieces = [], {}
            sequences = [make_sequence(index, method) for index, method in enumerate(methods)]
            for index, sequence in enumerate(sequences):
                sequence.on_text = lambda piece, index=index, pieces=pieces: pieces.setdefault(index, []).append(piece)
                sequence.on_done = done.append
            batcher = ContinuousBatcher(model, max_batch=4, static=static)
            sizes = run(batcher, sequences, seed)
            batcher.close()
            assert max(sizes) >= 2
            assert sorted(id(s) for s in done) == sorted(id(s) for s in sequences)
            for index, sequence in enumerate(sequences):
                assert sequence.text.tokens == expected[index]
                assert "".join(pieces.get(index, [])) == sequence.text.text
                assert sequence.text.finish_reason == "length"


def test_a_cancelled_request_finishes_once_and_its_batch_mates_are_unaffected():
    model = build_tiny_llava()
    with torch.no_grad():
        expected = alone_tokens(model, lambda i, m: make_sequence(i, m, max_tokens=8), [CORE] * 3)
        done = []
        sequences = [make_sequence(index, CORE, max_tokens=8) for index in range(3)]
        for sequence in sequences:
            sequence.on_done = done.append
        batcher = ContinuousBatcher(model, max_batch=4)
        for sequence in sequences:
            batcher.submit(sequence)
        for _ in range(3):
            batcher.step()
        sent = len(sequences[1].text.tokens)
        batcher.cancel(sequences[1])
        batcher.run_until_idle()
        batcher.close()
    assert [s is sequences[1] for s in done].count(True) == 1
    assert sequences[1].text.finish_reason == "cancelled" and len(sequences[1].text.tokens) == sent
    assert sequences[0].text.tokens == expected[0] and sequences[2].text.tokens == expected[2]


def test_a_request_cancelled_while_it_waits_leaves_the_others_waiting():
    """Cancelled before its prefill, among waiting requests whose prompts differ in length: it finishes once, as
    cancelled, and the others get their tokens alone (requests are told apart by identity, not by their fields)."""
    model = build_tiny_llava()
    with torch.no_grad():
        expected = alone_tokens(model, lambda i, m: make_sequence(i, m, max_tokens=4), [CORE] * 3)
        done = []
        sequences = [make_sequence(index, CORE, max_tokens=4) for index in range(3)]
        assert len({s.inputs["input_ids"].shape[1] for s in sequences}) > 1
        batcher = ContinuousBatcher(model, max_batch=4)
        for sequence in sequences:
            sequence.on_done = done.append
            batcher.submit(sequence)
        batcher.cancel(sequences[2])
        batcher.run_until_idle()
        batcher.close()
    assert [s is sequences[2] for s in done].count(True) == 1 and len(done) == 3
    assert sequences[2].text.finish_reason == "cancelled" and sequences[2].text.tokens == []
    assert sequences[0].text.tokens == expected[0] and sequences[1].text.tokens == expected[1]


def test_a_repeated_prompt_joins_from_the_prompt_cache_with_its_tokens_alone():
    """A prompt prefilled alone is stored; the same prompt later joins a running batch from a copy of it, without
    a prefill, and gets exactly its tokens alone (greedy and seeded sampling); the entry stays usable; a session
    switch (another method) drops the stored prefills."""
    model = build_tiny_llava()
    cache = PromptCache(8)
    indices = [1, 2, 3]  # 1: greedy, 2: sampled with a seed (make_sequence's options are fixed per index)

    def keyed(index, method=CORE):
        sequence = make_sequence(index, method, max_tokens=6)
        sequence.cache_key = ("prompt", index)
        return sequence

    with torch.no_grad():
        expected = alone_tokens(model, lambda i, m: make_sequence(indices[i], m, max_tokens=6), [CORE] * 3)
        batcher = ContinuousBatcher(model, max_batch=4, prompt_cache=cache)
        first = [keyed(1), keyed(2)]
        for sequence in first:  # each prefilled alone, so each is stored
            batcher.submit(sequence)
            batcher.run_until_idle()
        assert batcher.prefills == 2 and len(cache) == 2
        again = [keyed(3), keyed(1), keyed(2), keyed(1)]
        batcher.submit(again[0])
        batcher.step()
        for sequence in again[1:]:  # join the running batch at later steps
            batcher.submit(sequence)
            batcher.step()
        batcher.run_until_idle()
        assert batcher.prefills == 3  # only the new prompt ran a prefill
        assert [s.prompt_cache_hit for s in first + again] == [False, False, False, True, True, True]
        tokens = {1: expected[0], 2: expected[1], 3: expected[2]}
        for index, sequence in zip([1, 2, 3, 1, 2, 1], first + again):
            assert sequence.text.tokens == tokens[index], index
        other = make_sequence(4, FEWER, max_tokens=2)
        batcher.submit(other)
        batcher.run_until_idle()
        assert len(cache) == 0  # the session changed: its stored prefills are gone
        later = keyed(1)
        batcher.submit(later)
        batcher.run_until_idle()
        batcher.close()
    assert not later.prompt_cache_hit and later.text.tokens == expected[0]


def test_admission_by_memory_queues_or_refuses():
    """A budget that fits one request at a time runs them one after another with the same tokens; a request that
    could never fit is refused with the numbers."""
    model = build_tiny_llava()
    with torch.no_grad():
        expected = alone_tokens(model, make_sequence, [CORE] * 3)
        probe = ContinuousBatcher(model)
        need = max(probe.reservation(make_sequence(index, CORE)) for index in range(3))
        batcher = ContinuousBatcher(model, max_batch=8, kv_budget_bytes=need + need // 3)
        sequences = [make_sequence(index, CORE) for index in range(3)]
        sizes = run(batcher, sequences, seed=0)
        batcher.close()
        assert max(sizes) == 1
        assert [s.text.tokens for s in sequences] == expected
        small = ContinuousBatcher(model, kv_budget_bytes=need // 2)
        with pytest.raises(MemoryRefused, match="bytes of KV cache"):
            small.submit(make_sequence(0, CORE))


def test_arrivals_wait_a_few_steps_to_share_one_prefill():
    """With join_wait_steps, requests arriving one step apart while a batch runs are prefilled in one call (and
    get their tokens alone); one that waited its steps joins alone."""
    model = build_tiny_llava()
    with torch.no_grad():
        expected = alone_tokens(model, lambda i, m: make_sequence(i, m, max_tokens=12), [CORE] * 4)
        sequences = [make_sequence(index, CORE, max_tokens=12) for index in range(4)]
        batcher = ContinuousBatcher(model, max_batch=8, join_wait_steps=3)
        batcher.submit(sequences[0])
        batcher.step()  # the first request runs alone
        batcher.submit(sequences[1])
        batcher.step()
        batcher.submit(sequences[2])
        for _ in range(2):
            batcher.step()
        assert batcher.prefills == 1 and batcher.metrics()["queue_length"] == 2  # still gathering
        batcher.step()  # the oldest arrival saw its 3 decode steps pass: both join in one prefill
        assert batcher.prefills == 2 and batcher.metrics()["batch_size"] == 3
        batcher.submit(sequences[3])
        for _ in range(3):
            batcher.step()
        assert batcher.prefills == 2
        batcher.step()
        assert batcher.prefills == 3  # alone, after waiting its steps
        batcher.run_until_idle()
        batcher.close()
        assert [s.text.tokens for s in sequences] == expected
        with pytest.raises(ValueError, match="join_wait_steps"):
            ContinuousBatcher(model, join_wait_steps=-1)


def test_metrics_count_the_running_batch():
    model = build_tiny_llava()
    with torch.no_grad():
        batcher = ContinuousBatcher(model, max_batch=4)
        for index in range(3):
            batcher.submit(make_sequence(index, CORE, max_tokens=6))
        assert batcher.metrics()["queue_length"] == 3
        batcher.step()
        busy = batcher.metrics()
        batcher.run_until_idle()
        idle = batcher.metrics()
        batcher.close()
    assert busy["batch_size"] == 3 and busy["queue_length"] == 0 and busy["kv_bytes"] > 0
    assert busy["sliced_weight_bytes"] > 0  # core-neuron decoding holds sliced FFN weights
    assert idle["batch_size"] == 0 and idle["kv_bytes"] == 0
    assert idle["tokens_generated_total"] == 18 and idle["requests_finished_total"] == 3


def test_combined_inputs_are_left_padded():
    first, second = request_inputs(0), request_inputs(5)
    combined = combine_inputs([first, second], pad_id=0)
    width = max(first["input_ids"].shape[1], second["input_ids"].shape[1])
    assert combined["input_ids"].shape == (2, width)
    assert combined["pixel_values"].shape[0] == 2
    short = 0 if first["input_ids"].shape[1] < width else 1
    assert combined["attention_mask"][short, 0] == 0 and combined["attention_mask"][:, -1].all()


def test_combined_inputs_keep_the_images_of_later_prompts():
    """A prompt without an image first: the images of the others are still passed."""
    text_only, with_image = request_inputs(4, with_image=False), request_inputs(5)
    combined = combine_inputs([text_only, with_image], pad_id=0)
    assert torch.equal(combined["pixel_values"], with_image["pixel_values"])


# ------------------------------------------------------------------------------------------------ the server's


class FakeJob:
    """What the scheduler reads of a server job, and the events it gets."""

    def __init__(self, index: int, method, max_tokens: int):
        import threading
        import time
        from types import SimpleNamespace

        self.request = SimpleNamespace(max_tokens=max_tokens, temperature=0.0, top_p=1.0, seed=None, stop=[],
                                       ignore_eos=True, method=method)
        self.inputs = request_inputs(index)
        self.enqueued_at = time.perf_counter()
        self.cancelled = threading.Event()
        self.events = []

    def emit(self, kind, payload):
        self.events.append((kind, payload))

    def cancel(self):
        self.cancelled.set()


def fake_worker(model):
    from types import SimpleNamespace

    from corematching.apps.serve.worker import ModelWorker
    from corematching.models import adapter_for

    worker = SimpleNamespace(model=model, pad_id=0, eos_ids={2}, tokenizer=CharTokenizer(), grid=(6, 6),
                             adapter=adapter_for(model), batch_inputs=lambda jobs: jobs[0].inputs, prompt_cache=None)
    worker._kept = lambda images, record, row: ModelWorker._kept(None, images, record, row)
    return worker


def wait_for(condition, timeout: float = 120.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_the_server_scheduler_answers_each_job_once_as_alone():
    """Jobs submitted while others decode get their answers alone; a cancelled one is reported once, as
    cancelled; /metrics reads the numbers in the Prometheus format; a job that can never fit gets 429."""
    from corematching.apps.serve.continuous_scheduler import ContinuousScheduler
    from corematching.apps.serve.errors import APIError
    from corematching.apps.serve.metrics import metrics_text

    model = build_tiny_llava()
    with torch.no_grad():
        expected = alone_tokens(model, lambda i, m: make_sequence(i, m, max_tokens=6, temperature=0.0), [CORE] * 4)
    scheduler = ContinuousScheduler(fake_worker(model), max_batch_size=4, max_pending=8)
    try:
        jobs = [FakeJob(index, CORE, 6) for index in range(4)]
        slow = FakeJob(7, CORE, 40)
        scheduler.submit(slow)
        scheduler.submit(jobs[0])
        wait_for(lambda: any(kind == "text" for kind, _ in slow.events))
        for job in jobs[1:]:
            scheduler.submit(job)
        scheduler.cancel(slow)
        wait_for(lambda: scheduler.pending == 0)
        text = metrics_text(scheduler)
    finally:
        scheduler.close(10)
    for job, tokens in zip(jobs, expected):
        done = [payload for kind, payload in job.events if kind == "done"]
        assert len(done) == 1 and done[0].finish_reason == "length"
        assert done[0].text == CharTokenizer().decode(tokens)
        assert "".join(p for kind, p in job.events if kind == "text") == done[0].text
        assert 0 < done[0].usage.visual_tokens_kept < done[0].usage.visual_tokens == 36
    cancelled = [payload for kind, payload in slow.events if kind == "done"]
    assert len(cancelled) == 1 and cancelled[0].finish_reason == "cancelled"
    assert "# TYPE corematching_queue_length gauge" in text and "corematching_tokens_generated_total " in text
    refusing = ContinuousScheduler(fake_worker(model), max_batch_size=4, max_pending=8, kv_budget_bytes=1000)
    try:
        with pytest.raises(APIError, match="bytes of KV cache") as refused:
            refusing.submit(FakeJob(0, CORE, 6))
        assert refused.value.status == 429
    finally:
        refusing.close(1)


def test_a_continuous_server_answers_as_the_library_and_reports_metrics():
    """`corematching serve --batching continuous` end to end (the bundled model): concurrent requests with two
    methods get the library's greedy answers, streamed or not, and from the prompt cache; /metrics is Prometheus
    text."""
    pytest.importorskip("fastapi")
    import base64
    import json
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from corematching.apps.serve.process import ServerProcess
    from corematching.vqa import answer_batch
    from corematching.zoo import data

    paths = data.image_paths("test")
    questions = data.by_image(data.questions("test"))
    ids = sorted(questions)[:4]
    methods = [None, {"method": "corematching", "token_budget": 0.25}] * 2

    def body(image_id, method, stream=False):
        url = "data:image/png;base64," + base64.b64encode(open(paths[image_id], "rb").read()).decode()
        content = [{"type": "image_url", "image_url": {"url": url}},
                   {"type": "text", "text": questions[image_id][0].question}]
        request = {"model": "evqa-smollm2", "max_tokens": 8, "stream": stream,
                   "messages": [{"role": "user", "content": content}]}
        if method:
            request["corematching"] = method
        return json.dumps(request).encode()

    def post(server, data):
        request = urllib.request.Request(server.base_url + "/v1/chat/completions", data=data,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.read().decode()

    model, processor = cm.load_model("evqa-smollm2")
    expected = []
    for image_id, method in zip(ids, methods):
        chosen = cm.CoreMatching(token_budget=0.25) if method else None
        image = Image.open(paths[image_id])
        result = answer_batch(model, processor, [image], [questions[image_id][0].question], chosen, 8)
        expected.append(result.texts[0])
    with ServerProcess(["--batching", "continuous", "--threads", "1", "--max-batch-size",
                        "4", "--kv-cache-bytes", "256M", "--join-wait-steps", "2"]) as server:
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda item: json.loads(post(server, body(*item))), zip(ids, methods)))
        streamed = post(server, body(ids[1], methods[1], stream=True))  # alone: its prefill is stored
        repeated = json.loads(post(server, body(ids[1], methods[1])))  # from the prompt cache
        with urllib.request.urlopen(server.base_url + "/metrics", timeout=30) as response:
            metrics = response.read().decode()
    answers = [reply["choices"][0]["message"]["content"].strip().splitlines()[0] for reply in replies]
    assert answers == expected
    pieces = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    text = "".join(p["choices"][0]["delta"].get("content", "") for p in pieces if p.get("choices"))
    assert text == replies[1]["choices"][0]["message"]["content"]
    assert replies[1]["usage"]["visual_tokens_kept"] < replies[1]["usage"]["visual_tokens"]
    assert repeated["usage"]["prompt_cache_hit"] and not replies[1]["usage"]["prompt_cache_hit"]
    assert repeated["choices"][0]["message"]["content"] == replies[1]["choices"][0]["message"]["content"]
    assert repeated["usage"]["visual_tokens_kept"] == replies[1]["usage"]["visual_tokens_kept"]
    assert "corematching_requests_finished_total 6" in metrics and "# TYPE corematching_kv_bytes gauge" in metrics
