"""The command line: one-line errors with a non-zero exit for bad input, never a traceback."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from corematching.apps import cli


def run_cli(args, capsys):
    code = cli.main(args)
    captured = capsys.readouterr()
    return code, captured.err


@pytest.fixture
def good_image(tmp_path):
    path = tmp_path / "shape.png"
    Image.new("RGB", (64, 64), (255, 255, 255)).save(path)
    return path


def test_missing_image(tmp_path, capsys):
    code, err = run_cli(["--image", str(tmp_path / "nope.png"), "--question", "what shape?"], capsys)
    assert code == 2
    assert err.startswith("corematching: error: image not found") and err.count("\n") == 1


@pytest.mark.parametrize("argv", [["--method", "fastv"], ["--question", "what shape?"]])
def test_one_question_needs_an_image_and_a_question(argv, capsys):
    code, err = run_cli(argv, capsys)
    assert code == 2 and "--image and --question go together" in err and "corematching demo" in err


def test_unreadable_image(tmp_path, capsys):
    path = tmp_path / "broken.png"
    path.write_bytes(b"this is not a png")
    code, err = run_cli(["--image", str(path), "--question", "what shape?"], capsys)
    assert code == 2
    assert "cannot read image" in err and "Traceback" not in err


def test_unsupported_image_mode(tmp_path, capsys):
    path = tmp_path / "float.tiff"
    Image.fromarray(np.zeros((8, 8), dtype=np.float32), mode="F").save(path)
    code, err = run_cli(["--image", str(path), "--question", "what shape?"], capsys)
    assert code == 2
    assert "unsupported image mode 'F'" in err


def test_empty_question(good_image, capsys):
    code, err = run_cli(["--image", str(good_image), "--question", "   "], capsys)
    assert code == 2
    assert "question is empty" in err


def test_unknown_model(good_image, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = run_cli(["--image", str(good_image), "--question", "what?", "--model", str(tmp_path / "no-model")],
                        capsys)
    assert code == 2
    assert "cannot load model" in err and err.count("\n") == 1


def test_bad_method_setting(good_image, capsys):
    code, err = run_cli(["--image", str(good_image), "--question", "what?", "--rho", "1.5"], capsys)
    assert code == 2
    assert "rho" in err


def test_option_of_another_method(good_image, capsys):
    code, err = run_cli(["--image", str(good_image), "--question", "what?", "--method", "uniform", "--beta", "0.5"],
                        capsys)
    assert code == 2
    assert "does not take beta" in err


def test_entry_point_exits_non_zero_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "corematching", "--image", str(tmp_path / "x.png"),
                             "--question", "q"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "image not found" in result.stderr


def test_an_unreachable_model_id_fails_fast_with_one_line(good_image, capsys, monkeypatch):
    """No local directory, no cache entry and no network: the probe answers at once (no hub retries)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = run_cli(["--model", "nobody/no-such-vlm", "--image", str(good_image), "--question", "what?"], capsys)
    assert code == 2
    assert "not in the Hugging Face cache" in err and err.count("\n") == 1


def test_a_model_of_an_unsupported_family_fails_with_one_line(good_image, capsys, monkeypatch):
    """A loadable VLM that no adapter supports: one line naming the class, not an AttributeError."""
    from torch import nn

    import corematching as cm

    class SomeOtherVLM(nn.Module):
        device = "cpu"

    monkeypatch.setattr(cm, "load_model", lambda name, device=None: (SomeOtherVLM(), object()))
    code, err = run_cli(["--model", "some/other-vlm", "--image", str(good_image), "--question", "what?"], capsys)
    assert code == 2
    assert "SomeOtherVLM is not supported" in err and err.count("\n") == 1
