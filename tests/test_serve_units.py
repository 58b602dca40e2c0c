"""Pieces of the server without a model: streamed text and stop sequences, request validation, image paths,
per-request sampling."""

from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")

import corematching as cm  # noqa: E402
from corematching.apps.serve.errors import APIError  # noqa: E402
from corematching.apps.serve.images import local_path  # noqa: E402
from corematching.apps.serve.methods import parse_method  # noqa: E402
from corematching.apps.serve.protocol import Limits, parse_chat_request  # noqa: E402
from corematching.apps.serve.sampling import RequestSampler  # noqa: E402
from corematching.apps.serve.stream_text import StreamText  # noqa: E402


class CharTokenizer:
    """Token i is the character chr(i)."""

    def decode(self, tokens, skip_special_tokens=True):
        return "".join(chr(t) for t in tokens)


def stream(text: str, stop: list[str], max_tokens: int = 100, eos_ids=frozenset({0})):
    follower = StreamText(CharTokenizer(), max_tokens, stop, set(eos_ids))
    pieces = [follower.add(ord(char)) for char in text]
    pieces.append(follower.add(0))  # the end token
    return pieces, follower


def test_streamed_pieces_add_up_to_the_answer_and_never_show_part_of_a_stop_sequence():
    pieces, follower = stream("hello END world", stop=["END"])
    assert "".join(pieces) == follower.text == "hello "
    assert follower.finish_reason == "stop"
    assert all("E" not in piece for piece in pieces)  # "E" waited until "END" was ruled in or out
    pieces, follower = stream("a EN b", stop=["END"])  # a prefix of the stop sequence that does not complete
    assert "".join(pieces) == follower.text == "a EN b" and follower.finish_reason == "stop"


def test_token_limit_and_ignored_end_token():
    pieces, follower = stream("abcdef", stop=[], max_tokens=3)
    assert "".join(pieces) == "abc" and follower.finish_reason == "length"
    follower = StreamText(CharTokenizer(), 5, [], eos_ids=set())
    follower.add(0)
    assert follower.finish_reason is None and follower.tokens == [0]


def limits(**changes) -> Limits:
    values = dict(model_name="m", max_model_len=100, max_images=1, default_max_tokens=8, default_temperature=0.0,
                  allowed_image_dir=None, default_method=cm.CoreMatching())
    return Limits(**{**values, **changes})


def test_request_validation_names_the_parameter():
    good = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    request = parse_chat_request(good, limits())
    assert request.max_tokens == 8 and request.temperature == 0.0 and request.stop == []
    for change, param in [({"temperature": 3}, "temperature"), ({"top_p": 0}, "top_p"),
                          ({"max_tokens": 0}, "max_tokens"), ({"seed": 1.5}, "seed"),
                          ({"stop": ["a"] * 5}, "stop"), ({"stream": "yes"}, "stream"),
                          ({"messages": []}, "messages"), ({"messages": [{"role": "tool", "content": "x"}]},
                                                            "messages[0].role"),
                          ({"presence_penalty": 1.0}, "presence_penalty"), ({"functions": []}, "functions")]:
        with pytest.raises(APIError) as caught:
            parse_chat_request({**good, **change}, limits())
        assert caught.value.status == 400 and caught.value.param == param, change
    assert parse_chat_request({**good, "presence_penalty": 0, "logprobs": False}, limits()).max_tokens == 8


def test_extension_field_builds_the_method_or_names_the_bad_field():
    default = cm.CoreMatching(token_budget=0.5)
    assert parse_method(None, default) is default
    assert parse_method({"token_budget": 8}, default) == cm.CoreMatching(token_budget=8)
    assert parse_method({"method": "uniform", "token_budget": 4}, default) == cm.UniformTokens(token_budget=4)
    assert parse_method({"method": "dense"}, default) == cm.Dense()
    with pytest.raises(APIError) as caught:
        parse_method({"method": "corematching", "match": "everything"}, default)
    assert caught.value.param == "corematching.match"
    with pytest.raises(APIError) as caught:
        parse_method({"method": "dense", "token_budget": 4}, default)
    assert caught.value.param == "corematching.token_budget"


def test_local_paths_stay_inside_the_allowed_directory(tmp_path: Path):
    inside = tmp_path / "images"
    inside.mkdir()
    (inside / "a.png").write_bytes(b"x")
    (tmp_path / "secret.png").write_bytes(b"x")
    assert local_path("a.png", inside, "p") == (inside / "a.png").resolve()
    assert local_path(f"file://{inside / 'a.png'}", inside, "p") == (inside / "a.png").resolve()
    for outside in ("../secret.png", str(tmp_path / "secret.png"), f"file://{tmp_path / 'secret.png'}",
                    "images/../../secret.png"):
        with pytest.raises(APIError) as caught:
            local_path(outside, inside, "p")
        assert caught.value.code == "image_path_not_allowed", outside


def test_sampler_is_reproducible_per_seed_and_respects_top_p():
    logits = torch.tensor([4.0, 3.9, 0.0, -1.0])  # probabilities about 0.52, 0.47, 0.01, 0.003
    first, second = RequestSampler(1.0, 1.0, 3), RequestSampler(1.0, 1.0, 3)
    assert [first.choose(logits) for _ in range(20)] == [second.choose(logits) for _ in range(20)]
    assert {RequestSampler(1.0, 0.5, 7).choose(logits) for _ in range(30)} == {0}  # token 0 alone reaches 0.5
    wide = RequestSampler(1.0, 0.9, 7)
    assert {wide.choose(logits) for _ in range(60)} == {0, 1}
    assert RequestSampler(0.0, 1.0, None).choose(logits) == 0  # temperature 0: greedy


def test_the_page_examples_follow_the_served_model():
    import base64
    import io

    from PIL import Image

    from corematching.apps.serve.examples import example_images
    from corematching.zoo import scenes

    scene_examples = example_images("scenes-smollm2")
    expected = scenes.sample(len(scene_examples), scenes.EVAL_SEED)
    assert len(scene_examples) == 6
    assert [(e["question"], e["answer"]) for e in scene_examples] == [(i.question, i.answer) for i in expected]
    picture = Image.open(io.BytesIO(base64.b64decode(scene_examples[0]["url"].split(",", 1)[1])))
    assert picture.size == (128, 128) and picture.tobytes() == expected[0].image.convert(picture.mode).tobytes()
    easy = example_images("evqa-smollm2")
    assert len(easy) == 6 and all(e["id"].startswith("test-") for e in easy)
