"""Load a model folder's processor, with the one torchvision workaround in one place.

Contract:
- `load_processor(path)` returns the processor saved in the local folder `path` (tokenizer, image
  processor and chat template together), as `transformers.AutoProcessor.from_pretrained(path)`
  would. Nothing is downloaded: `path` must be a local folder.
- A folder without processor or tokenizer files raises `FileNotFoundError` naming the folder.

The workaround (and the only place it lives): the Qwen-VL processors (`Qwen2VLProcessor`,
`Qwen2_5_VLProcessor`, `Qwen3VLProcessor`) declare a video processor, and video processors need
torchvision, which does not work beside the CPU torch this project pins. Without torchvision:
- `AutoProcessor.from_pretrained` raises an ImportError for the video processor (or an OSError
  when the folder holds no `video_preprocessor_config.json`, as image-only saves do), and
- constructing the processor class directly fails even with `video_processor=None`, because the
  argument check looks the video class up in a placeholder mapping (`AttributeError: type object
  'VIDEO_PROCESSOR_MAPPING' has no attribute '_extra_content'`).
So for those classes we build an image-only subclass (`image_only_processor_class`) whose
`__init__` does not take a video processor, and fill it from the separately loadable parts: the
image processor (`AutoImageProcessor`), the tokenizer (`AutoTokenizer`) and the chat template. The
result is an instance of the real Qwen processor class, saves the files a real one saves, and
handles images and text exactly as the real one does; only video input is missing. Where
torchvision works, `AutoProcessor` succeeds and the workaround is never reached.
"""

from __future__ import annotations

import json
import logging
from functools import cache
from pathlib import Path

import transformers
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
from transformers.processing_utils import ProcessorMixin

logger = logging.getLogger(__name__)

# Processor classes that declare a video processor and so cannot be built without torchvision.
QWEN_PROCESSOR_CLASSES = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor", "Qwen3VLProcessor")

# model_type in config.json -> processor class, for folders whose preprocessor files do not name one.
_QWEN_PROCESSOR_BY_MODEL_TYPE = {
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "qwen3_vl": "Qwen3VLProcessor",
    "qwen3_vl_moe": "Qwen3VLProcessor",
}

_PROCESSOR_FILES = (
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
)


@cache
def image_only_processor_class(name: str) -> type[ProcessorMixin]:
    """Return a subclass of the Qwen processor class `name` that takes no video processor.

    `ProcessorMixin` reads the sub-processor list from the `__init__` signature, so dropping
    `video_processor` from the signature is enough for it to check and save only the image
    processor and tokenizer. The subclass keeps the parent's name so that saved
    `processor_config.json` files name the real class and reload anywhere.
    """
    if name not in QWEN_PROCESSOR_CLASSES:
        raise ValueError(
            f"name={name!r} is not a Qwen-VL processor class; expected one of "
            f"{', '.join(QWEN_PROCESSOR_CLASSES)}. Other processors need no workaround: "
            "build them directly."
        )
    parent = getattr(transformers, name)

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # The parent passes video_processor=None positionally; ProcessorMixin zips positional
        # arguments with the (now two) declared attributes, so the None is dropped.
        parent.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    return type(name, (parent,), {"__init__": __init__, "__module__": __name__})


def load_processor(path: str | Path) -> ProcessorMixin:
    """Load the processor saved in the local folder `path` (see the module docstring)."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"path={str(path)!r} is not a folder; pass the local folder a model and its processor "
            "were saved to (e.g. with save_pretrained or veridical.tiny.save_tiny)."
        )
    if not any((folder / name).is_file() for name in _PROCESSOR_FILES):
        raise FileNotFoundError(
            f"path={str(path)!r} has no processor files (none of {', '.join(_PROCESSOR_FILES)}); "
            "save the processor there with processor.save_pretrained(path)."
        )
    try:
        return AutoProcessor.from_pretrained(folder)
    except (ImportError, AttributeError, OSError) as err:
        # How a Qwen video processor fails: ImportError or AttributeError without torchvision,
        # OSError where the folder has no video_preprocessor_config.json (image-only saves).
        name = _qwen_processor_name(folder)
        if name is None:
            raise
        logger.info(
            "AutoProcessor failed for %s (%s); building an image-only %s", folder, err, name
        )
        return _load_image_only(folder, name)


def _load_image_only(folder: Path, name: str) -> ProcessorMixin:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    image_processor = AutoImageProcessor.from_pretrained(folder)
    chat_template = _read_chat_template(folder) or getattr(tokenizer, "chat_template", None)
    return image_only_processor_class(name)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template
    )


def _qwen_processor_name(folder: Path) -> str | None:
    """The Qwen processor class the folder was saved with, or None for any other processor."""
    for file_name in ("processor_config.json", "preprocessor_config.json"):
        name = _read_json(folder / file_name).get("processor_class")
        if name is not None:
            return name if name in QWEN_PROCESSOR_CLASSES else None
    model_type = _read_json(folder / "config.json").get("model_type")
    return _QWEN_PROCESSOR_BY_MODEL_TYPE.get(model_type)


def _read_chat_template(folder: Path) -> str | None:
    # Newer folders store the template as chat_template.jinja, older ones as chat_template.json.
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    return _read_json(folder / "chat_template.json").get("chat_template")


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    with file.open(encoding="utf-8") as handle:
        data = json.load(handle)
    return data if isinstance(data, dict) else {}
