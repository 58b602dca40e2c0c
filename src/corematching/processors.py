"""A checkpoint's processor, built without torchvision when torchvision is missing.

In transformers 5 the processors of Qwen2-VL, Qwen2.5-VL, Qwen3-VL, InternVL, LLaVA-OneVision and SmolVLM take a
*video* processor, and every video processor needs torchvision; `AutoProcessor` then fails on images alone.
Pixtral's processor (Mistral 3) imports a helper from its torchvision image processor. Their slow image processors
(PIL and numpy: `Qwen2VLImageProcessorPil`, `GotOcr2ImageProcessorPil`, ...) need neither, and `AutoImageProcessor`
falls back to them. `load_processor` builds the same processor class from the same files with the image processor
and the tokenizer only: images are processed exactly as with torchvision's backend absent, videos are refused.
With torchvision installed it is `AutoProcessor.from_pretrained`.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
import types
from functools import lru_cache

logger = logging.getLogger(__name__)

VIDEO = "video_processor"


def torchvision_missing() -> str | None:
    """Why torchvision cannot be used here, or None when it can."""
    try:
        import torchvision  # noqa: F401
    except Exception as error:  # ImportError, or a build that does not match this torch (RuntimeError)
        return f"torchvision does not import ({type(error).__name__}: {str(error).splitlines()[0][:80]})"
    return None


def load_processor(name_or_path: str, **hub_options):
    """The processor of checkpoint `name_or_path` (`hub_options`: revision, cache_dir, local_files_only, token)."""
    from transformers import AutoProcessor

    missing = torchvision_missing()
    if missing is None:
        return AutoProcessor.from_pretrained(name_or_path, **hub_options)
    name = processor_class_name(name_or_path, hub_options)
    if name is None:
        return AutoProcessor.from_pretrained(name_or_path, **hub_options)
    processor_class = images_only(real_processor_class(name))
    if processor_class.__dict__.get("drops_videos"):
        logger.warning("%s: %s; building its %s without a video processor (images only)", name_or_path, missing, name)
    return processor_class.from_pretrained(name_or_path, **hub_options)


def processor_class_name(name_or_path: str, hub_options: dict) -> str | None:
    """The processor class `AutoProcessor` would build: the one the checkpoint's processor_config.json names, else
    the one of its model type; None when neither says."""
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    from transformers.utils import cached_file

    saved = cached_file(name_or_path, "processor_config.json", _raise_exceptions_for_missing_entries=False,
                        **hub_options)
    if saved:
        with open(saved) as file:
            named = json.load(file).get("processor_class")
        if named:
            return named
    model_type = AutoConfig.from_pretrained(name_or_path, **hub_options).model_type
    return PROCESSOR_MAPPING_NAMES.get(model_type)


def real_processor_class(name: str):
    """The processor class called `name`, imported from its module even where transformers' lazy loader would hand
    back a placeholder because a backend is missing (PixtralProcessor asks for torchvision for one helper)."""
    from transformers import ProcessorMixin
    from transformers.models.auto.processing_auto import processor_class_from_name

    found = processor_class_from_name(name)
    if isinstance(found, type) and issubclass(found, ProcessorMixin):
        return found
    if name == "PixtralProcessor":
        return pixtral_processor()
    raise ValueError(f"processor {name} cannot be built here: {torchvision_missing()}")


def pixtral_processor():
    """PixtralProcessor. Its module imports `get_resize_output_image_size` from the torchvision image processor's
    module; the PIL image processor's module defines the same function, so that module stands in for the import."""
    fast = "transformers.models.pixtral.image_processing_pixtral"
    if fast not in sys.modules:
        pil = importlib.import_module("transformers.models.pixtral.image_processing_pil_pixtral")
        stand_in = types.ModuleType(fast, "PIL stand-in: get_resize_output_image_size for PixtralProcessor")
        stand_in.get_resize_output_image_size = pil.get_resize_output_image_size
        sys.modules[fast] = stand_in
        logger.warning("PixtralProcessor: %s; its image-size helper comes from the PIL image processor",
                       torchvision_missing())
    return importlib.import_module("transformers.models.pixtral.processing_pixtral").PixtralProcessor


class NoVideoProcessor:
    """Stands in for the video processor of an images-only processor: it has no frame settings (None, as when a
    caller sets none) and refuses videos by name."""

    num_frames = None
    fps = None

    def __call__(self, *args, **kwargs):
        raise ValueError(f"videos need a video processor, and transformers' need torchvision: {torchvision_missing()}")

    def __getattr__(self, name):
        raise AttributeError(f"no video processor (videos need torchvision: {torchvision_missing()}); "
                             f"asked for its {name!r}")


@lru_cache(maxsize=None)
def images_only(processor_class):
    """`processor_class` without its video processor (itself when it has none): it loads, saves and runs as the
    original with the image processor and tokenizer only, under the original's name."""
    attributes = processor_class.get_attributes()
    if VIDEO not in attributes:
        return processor_class
    kept = [name for name in attributes if name != VIDEO]
    video_slot = attributes.index(VIDEO)

    def get_attributes(cls):
        return list(kept)

    def from_args_and_dict(cls, args, processor_dict, **kwargs):
        # from_pretrained loads the kept attributes; the video processor's place in __init__ gets None
        args = list(args[:video_slot]) + [None] + list(args[video_slot:])
        return super(images, cls).from_args_and_dict(args, processor_dict, **kwargs)

    images = type(processor_class.__name__, (processor_class,), {
        "__module__": processor_class.__module__,
        "__doc__": f"{processor_class.__name__} with images only (no video processor: torchvision is missing).",
        "__qualname__": processor_class.__qualname__,
        "drops_videos": True,
        VIDEO: NoVideoProcessor(),  # a class attribute: what reads it finds no video settings; it is never saved
        "get_attributes": classmethod(get_attributes),
        "from_args_and_dict": classmethod(from_args_and_dict),
    })
    return images
