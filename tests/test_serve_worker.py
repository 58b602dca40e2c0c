"""The server's model worker on a tiny random LLaVA (fast, in process): batching and the prompt cache never change
a request's tokens. Random logits are close together, so any inexactness shows up as a different token."""

import asyncio

import pytest
import torch
from tiny_llava import build_pixels, build_prompt, left_pad
from transformers import BatchFeature

import corematching as cm

pytest.importorskip("fastapi")

from corematching.apps.serve.images import LoadedImage  # noqa: E402
from corematching.apps.serve.jobs import Job  # noqa: E402
from corematching.apps.serve.prompt_cache import PromptCache  # noqa: E402
from corematching.apps.serve.protocol import ChatRequest  # noqa: E402
from corematching.apps.serve.worker import ModelWorker  # noqa: E402

METHOD = cm.CoreMatching(prune_layer=1, token_budget=8, neuron_layers=[2, 3])


class NumberTokenizer:
    eos_token_id = 2
    pad_token_id = 0

    def decode(self, tokens, skip_special_tokens=True):
        return " ".join(str(t) for t in tokens) + " "


class PromptProcessor:
    """Stands in for a processor: prompt "p<seed>:<length>" -> a tiny_llava prompt with one image."""

    tokenizer = NumberTokenizer()

    def __call__(self, images=None, text=(), padding=True, return_tensors="pt"):
        prompts, pixels = [], []
        for name in text:
            if name == "bad":
                raise ValueError("this prompt cannot be encoded")
            seed, length = (int(part) for part in name[1:].split(":"))
            prompts.append(build_prompt(3, length, seed))
            pixels.append(build_pixels(1, seed))
        input_ids, attention_mask = left_pad(prompts)
        return BatchFeature({"input_ids": input_ids, "attention_mask": attention_mask,
                             "pixel_values": torch.cat(pixels)})


def job(prompt: str, loop, method=METHOD, temperature=0.0, seed=None, max_tokens=10) -> Job:
    request = ChatRequest(messages=[], images=[LoadedImage(None, prompt)], max_tokens=max_tokens,
                          temperature=temperature, top_p=0.95, seed=seed, stop=[], stream=False, include_usage=False,
                          method=method, ignore_eos=True)
    return Job(request, prompt, encoding(prompt), loop)


def encoding(prompt: str) -> dict:
    """What the server makes of a request on arrival; "bad": one image's tokens with two images' pixels (the model
    refuses it)."""
    if prompt == "bad":
        inputs = dict(PromptProcessor()(text=["p1:5"]))
        inputs["pixel_values"] = inputs["pixel_values"].repeat(2, 1, 1, 1)
        return inputs
    return dict(PromptProcessor()(text=[prompt]))


def outcome(loop, one: Job):
    async def wait():
        while True:
            kind, payload = await one.events.get()
            if kind == "done":
                return payload
            assert kind == "text"

    return loop.run_until_complete(wait())


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_batched_requests_get_the_tokens_they_get_alone(tiny_llava, loop, one_thread):
    model = tiny_llava()
    worker = ModelWorker(model, PromptProcessor())
    specs = [dict(prompt="p1:5"), dict(prompt="p2:9"), dict(prompt="p3:2", temperature=1.0, seed=11)]
    alone = []
    for spec in specs:
        one = job(loop=loop, **spec)
        worker.run([one])
        alone.append(outcome(loop, one).text)
    together = [job(loop=loop, **spec) for spec in specs]
    worker.run(together)
    results = [outcome(loop, one) for one in together]
    worker.close()
    assert [r.text for r in results] == alone
    assert all(r.usage.batch_size == 3 and r.usage.completion_tokens == 10 for r in results)
    assert all(r.usage.visual_tokens == 36 and r.usage.visual_tokens_kept == 8 for r in results)


@pytest.mark.parametrize("temperature, seed", [(0.0, None), (1.0, 5)])
def test_a_prompt_cache_hit_decodes_exactly_like_a_fresh_prefill(tiny_llava, loop, one_thread, temperature, seed):
    model = tiny_llava()
    fresh_worker = ModelWorker(model, PromptProcessor())
    fresh = job("p4:6", loop, temperature=temperature, seed=seed)
    fresh_worker.run([fresh])
    expected = outcome(loop, fresh)
    fresh_worker.close()

    cache = PromptCache(4)
    worker = ModelWorker(model, PromptProcessor(), cache)
    first, second, third = (job("p4:6", loop, temperature=temperature, seed=seed) for _ in range(3))
    worker.run([first])
    worker.run([second])
    worker.run([third])
    results = [outcome(loop, one) for one in (first, second, third)]
    assert [r.usage.prompt_cache_hit for r in results] == [False, True, True]
    assert [r.text for r in results] == [expected.text] * 3  # the stored prefill is never altered by a hit
    assert results[1].usage.visual_tokens_kept == expected.usage.visual_tokens_kept
    assert results[1].kept_patches == expected.kept_patches
    # another setting replaces the session: the prefills of the old one cannot be continued and are dropped
    other = job("p4:6", loop, method=cm.Dense())
    worker.run([other])
    assert outcome(loop, other).usage.prompt_cache_hit is False
    again = job("p4:6", loop, temperature=temperature, seed=seed)
    worker.run([again])
    again = outcome(loop, again)
    assert again.usage.prompt_cache_hit is False and again.text == expected.text
    worker.close()


def test_a_failing_request_fails_alone(tiny_llava, loop, one_thread):
    worker = ModelWorker(tiny_llava(), PromptProcessor())
    good, bad = job("p1:5", loop, max_tokens=3), job("bad", loop, max_tokens=3)
    worker.run([good, bad])

    async def first_event(one):
        return await one.events.get()

    assert loop.run_until_complete(first_event(bad))[0] == "error"
    assert outcome(loop, good).usage.completion_tokens == 3
    worker.close()


class CountingProcessor(PromptProcessor):
    calls = 0

    def __call__(self, *args, **kwargs):
        CountingProcessor.calls += 1
        return super().__call__(*args, **kwargs)


def test_each_request_is_preprocessed_once_and_batches_pad_like_the_processor(tiny_llava, loop, one_thread):
    """The encoding made when a request arrives is the one the model runs on: a batch is padded from those,
    exactly as the processor pads a batch itself, and the processor is not called again."""
    from corematching.apps.serve.collate import collate

    prompts = ["p1:5", "p2:9", "p3:2"]
    own = [dict(PromptProcessor()(text=[prompt])) for prompt in prompts]
    together = dict(PromptProcessor()(text=prompts))
    collated = collate(own, pad_id=0, padding_side="left")
    assert collated.keys() == together.keys()
    assert all(torch.equal(collated[key], together[key]) for key in together)

    worker = ModelWorker(tiny_llava(), CountingProcessor())
    jobs = [job(prompt, loop, max_tokens=3) for prompt in prompts]
    CountingProcessor.calls = 0
    worker.run(jobs)
    assert [outcome(loop, one).usage.completion_tokens for one in jobs] == [3, 3, 3]
    assert CountingProcessor.calls == 0
    worker.close()
