"""lmms-eval model `corematching`: any supported checkpoint under any corematching method.

    python -m lmms_eval --model corematching \
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=corematching,budget=64 --tasks gqa,pope,mme

model_args:
  pretrained   a transformers id or local path, or "evqa-smollm2" (the bundled model; the default)
  method       a method name or spec of corematching.apps.method_spec (dense, corematching, random, uniform,
               fastv, ..., or package.module:Class); default dense
  budget       the method's token_budget (an int count, a fraction, or "adaptive")
  device, dtype, batch_size, max_new_tokens (used when a task does not set it)
  any other    a field of the method (prune_layer=2, beta=0.4, ...)

It answers `generate_until` requests (what GQA, POPE, MME, VQAv2, TextVQA, ... use): the task's images and
text in the model's own chat format, greedy decoding unless the task asks for sampling, cut at the task's
stop strings. Log-likelihood requests (multiple-choice by scoring) are refused with an error.
Under torchrun/accelerate each process takes its rank from RANK/WORLD_SIZE/LOCAL_RANK and lmms-eval hands it its
share of the documents.
"""

from __future__ import annotations

import os

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image

from .. import method_spec

DEFAULT_MAX_NEW_TOKENS = 32
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def build_method(method: str, budget=None, **fields):
    """The method from lmms-eval's model_args (values arrive parsed: ints, floats, bools or strings)."""
    if budget is not None:
        if isinstance(budget, str):
            budget = method_spec.parse_budget(budget)
        fields["token_budget"] = budget
    fields = {
        name: method_spec.parse_value(value) if isinstance(value, str) else value for name, value in fields.items()
    }
    return method_spec.build(str(method), **fields)


class CoreMatchingLMM(lmms):
    is_simple = True

    def __init__(self, pretrained: str = "evqa-smollm2", method: str = "dense", budget=None, device: str | None = None,
                 dtype: str | None = None, batch_size: int | str = 1, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 **method_fields) -> None:
        super().__init__()
        import corematching as cm

        self._rank = int(os.environ.get("RANK", "0"))
        self._world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        if dtype is not None and str(dtype) not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.method = build_method(method, budget, **method_fields)
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.max_new_tokens = int(max_new_tokens)
        self.model, self.processor = cm.load_model(str(pretrained), device=device,
                                                   dtype=DTYPES[str(dtype)] if dtype else None)
        if self._world_size > 1:
            self._join_process_group(device)

    def _join_process_group(self, device: str) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self.model.device

    # ------------------------------------------------------------------------------------------ requests

    def loglikelihood(self, requests: list[Instance]):
        raise NotImplementedError(
            "the corematching lmms-eval model answers generate_until tasks only (GQA, POPE, MME, ...); "
            "log-likelihood (multiple-choice scoring) tasks are not supported"
        )

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("the corematching lmms-eval model does not support multi-round generation")

    def prompt(self, context: str, images: list[Image.Image]) -> str:
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": context}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        from tqdm import tqdm

        answers = [None] * len(requests)
        batches = self._batches(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="corematching")
        for batch in batches:
            texts = self._generate([requests[k] for k in batch])
            for k, text in zip(batch, texts):
                answers[k] = text
                context, gen_kwargs = requests[k].args[0], requests[k].args[1]
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            bar.update(len(batch))
        bar.close()
        return answers

    def _batches(self, requests: list[Instance]) -> list[list[int]]:
        """Consecutive requests with the same generation settings, batch_size at a time."""
        batches, current, current_key = [], [], None
        for k, request in enumerate(requests):
            key = repr(sorted(request.args[1].items()))
            if current and (key != current_key or len(current) == self.batch_size_per_gpu):
                batches.append(current)
                current = []
            current_key = key
            current.append(k)
        if current:
            batches.append(current)
        return batches

    @torch.no_grad()
    def _generate(self, batch: list[Instance]) -> list[str]:
        import corematching as cm

        gen_kwargs = dict(batch[0].args[1])
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        prompts, images = [], []
        for request in batch:
            context, _, doc_to_visual, doc_id, task, split = request.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
            visuals = [v.convert("RGB") for v in (visuals or []) if isinstance(v, Image.Image)]
            prompts.append(self.prompt(context, visuals))
            images.extend(visuals)
        inputs = self.processor(images=images or None, text=prompts, return_tensors="pt", padding=True)
        inputs = inputs.to(self.model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        sampling = bool(gen_kwargs.get("do_sample")) and float(gen_kwargs.get("temperature") or 0) > 0
        options = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
                   "do_sample": sampling}
        if sampling:
            options.update(temperature=float(gen_kwargs["temperature"]), top_p=float(gen_kwargs.get("top_p") or 1.0))
        with cm.sparsify(self.model, self.method):
            output = self.model.generate(**inputs, **options)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        return [cut_at(text, until).strip() for text in texts]


def cut_at(text: str, stops: list[str]) -> str:
    """`text` up to the first of the stop strings."""
    for stop in stops:
        if stop:
            text = text.split(stop, 1)[0]
    return text
