"""Write a model folder that vLLM loads, from a folder transformers saved.

Contract: ``vllm_folder(src)`` returns a folder vLLM 0.32 loads with the same weights, processor
and tokenizer as ``src``; ``src`` itself is never modified. What it fixes, and nothing else:

- LLaVA-family checkpoints saved by current transformers name the vision tower's weights
  ``vision_tower.embeddings...``; vLLM's CLIP/SigLIP tower expects
  ``vision_tower.vision_model.embeddings...``. The keys are renamed (the tensors are the same).
- Qwen2-VL / Qwen2.5-VL / Qwen3-VL processors need a video processor file
  (``video_preprocessor_config.json``) to load in vLLM, even for images only; one is written
  from the image processor's settings.
- A folder that needs neither is returned as it is.

The converted folder is written once under ``dst`` (default: in veridical's cache folder,
``$VERIDICAL_CACHE/vllm/``), and reused while it is newer than ``src``'s files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

_LLAVA_TYPES = {"llava", "llava_next", "llava_onevision"}
_QWEN_TYPES = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"}
_TOWER = "vision_tower."
_VIDEO_FILE = "video_preprocessor_config.json"


def needs_conversion(src: str | Path) -> bool:
    """Whether vLLM needs a converted copy of the folder ``src``."""
    folder = Path(src)
    kind = _model_type(folder)
    if kind in _QWEN_TYPES:
        return not (folder / _VIDEO_FILE).exists()
    if kind in _LLAVA_TYPES:
        return any(_renamed(k) != k for k in _weight_keys(folder))
    return False


def vllm_folder(src: str | Path, dst: str | Path | None = None) -> Path:
    """A folder vLLM loads with ``src``'s model (see the module docstring)."""
    folder = Path(src)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} has no config.json; give a model folder saved by "
                                "transformers' save_pretrained")
    if not needs_conversion(folder):
        return folder
    out = Path(dst) if dst is not None else _default_destination(folder)
    stamp = out / ".converted"
    newest = max(p.stat().st_mtime for p in folder.iterdir() if p.is_file())
    if stamp.exists() and stamp.stat().st_mtime >= newest:
        return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for path in folder.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name != "model.safetensors.index.json":
            shutil.copy2(path, out / path.name)
    for shard in sorted(folder.glob("*.safetensors")):
        tensors = load_file(str(shard))
        save_file({_renamed(k): v.contiguous() for k, v in tensors.items()}, str(out / shard.name),
                  metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {_renamed(k): v for k, v in data["weight_map"].items()}
        (out / index.name).write_text(json.dumps(data, indent=2))
    if _model_type(folder) in _QWEN_TYPES and not (out / _VIDEO_FILE).exists():
        (out / _VIDEO_FILE).write_text(json.dumps(_video_config(folder), indent=2))
    stamp.touch()
    return out


def _renamed(key: str) -> str:
    """``vision_tower.X`` -> ``vision_tower.vision_model.X`` (at any depth), other keys as they are."""
    head, sep, rest = key.partition(_TOWER)
    if not sep or rest.startswith("vision_model."):
        return key
    return f"{head}{_TOWER}vision_model.{rest}"


def _model_type(folder: Path) -> str:
    return json.loads((folder / "config.json").read_text()).get("model_type", "")


def _weight_keys(folder: Path) -> list[str]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return list(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    keys: list[str] = []
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            keys += list(f.keys())
    return keys


def _video_config(folder: Path) -> dict:
    """A Qwen video processor config with the image processor's settings."""
    image: dict = {}
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = folder / name
        if path.exists():
            data = json.loads(path.read_text())
            image = data.get("image_processor", data)
            break
    config = {k: v for k, v in image.items() if k != "image_processor_type"}
    prefix = "Qwen3VL" if _model_type(folder).startswith("qwen3") else "Qwen2VL"
    config["video_processor_type"] = f"{prefix}VideoProcessor"
    return config


def _default_destination(folder: Path) -> Path:
    """``$VERIDICAL_CACHE/vllm/<name>-<hash of the folder's path>``: never beside the source."""
    import hashlib

    from veridical.cache import cache_dir

    digest = hashlib.blake2b(str(folder.resolve()).encode(), digest_size=6).hexdigest()
    return cache_dir() / "vllm" / f"{folder.name}-{digest}"
