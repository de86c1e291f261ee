"""Head profiles of a model over a calibration set, as JSON, built ahead of time and attached
to the model when it is loaded.

Contract:
- :func:`profile_model` ``(engine, images, prompts, **settings) -> dict`` runs, for every
  calibration item (one image, one prompt), three unedited forwards of the prompt with eager
  attention (``veridical.heads.capture``): with the real image, text-only (the image removed from
  the chat turn) and with a content-free image of the same size (``counterfactual="blank"``: an
  all-zero normalised pixel tensor, i.e. the processor's mean image; ``"noise"``: VCD's diffusion
  noise at ``noise_step`` from a generator seeded with ``seed``). From the captures it averages,
  over the items, the per-(layer, head) scores of ``veridical.heads.scores`` and discovers the
  massive-activation (sink) dimensions. Same model, images, prompts and settings -> the same dict.
- The profile (JSON-ready dict, schema ``SCHEMA``)::

      schema, cache_key
      model:       name, model_type, fingerprint, num_layers, num_heads, head_dim, hidden_size
      calibration: source, items, prompts (distinct), images (names), digest (sha256 of the
                   image bytes and prompts)
      settings:    counterfactual, noise_step, seed, tau, tau_effective, ratio,
                   min_layer_fraction, sink_from_layer, attention ("eager")
      scores:      one L x H list of lists per name in HEAD_SCORES:
                   vhd                 mean over items of ||A(v,x) - A(x)||  (VHR's VHD)
                   text_norm           mean of ||A(x)||, the text-only head output norm
                   image_norm          mean of ||A(v,x)||
                   image_attention     mean attention mass of the last prompt position on image
                                       tokens, post-softmax, in [0, 1]
                   visual_sensitivity  mean of ||A(v,x) - A(v0,x)|| / ||A(v,x)||
      sinks:       dims (the sink dimensions, ascending), layers_examined, per_layer (dims massive
                   in each examined layer, how many token hits), details (per sink dim: layers
                   where it fires, max |RMSNorm(h)|, hits on image / text tokens, the tokens and
                   the prompt positions where it fires, most frequent first)
      versions:    veridical, torch, transformers
  The definitions, with their justification, are in ``veridical.heads.scores``.
- Calibration data is always given by the caller (``data``, see :func:`calibration_images`);
  ``"builtin:synthcoco"`` (``DEFAULT_DATA``, the CLI's default) is resolved to its folder by the
  command line (``veridical.world.builtin_world``): this package imports neither
  ``veridical.world`` nor ``veridical.evals``.
- :func:`load_or_profile` ``(engine, data, cache_dir=None, ...)`` returns the cached profile of
  (model fingerprint, calibration digest, settings) from ``cache_dir`` (default
  ``$VERIDICAL_CACHE/heads``, file ``profile-<key>.json``), else computes it with
  :func:`profile_model` (the first ``DEFAULT_LIMIT`` images with ``DEFAULT_PROMPT`` by default),
  writes it atomically and returns it.
- The model's profile, the one ``veridical.load`` attaches as ``engine.head_profile`` and the
  methods read (``fia``, ``var``), is found by :func:`find_profile`: ``MODEL_PROFILE``
  (``heads_profile.json``) in the model's folder if there is one, else the cache's
  ``model-<fingerprint>.json`` (:func:`model_profile_path`), which :func:`save_model_profile`
  writes (``veridical heads profile`` and :func:`ensure_profile` do); else None. Requests never
  build a profile: :func:`ensure_profile` ``(engine, data)`` builds one ahead of time (the
  server's start-up) and attaches it.
- :func:`model_fingerprint` is the sha256 of the config (paths, versions and private fields
  dropped), every parameter's name, shape and dtype, and the bytes of every tensor (models up to
  ``FULL_HASH_LIMIT`` elements) or of the first and last tensors (larger models).
- Methods read profiles with ``head_scores`` (an ``(L, H)`` tensor) and ``sink_dims``
  (``veridical.decoding.headmath``, re-exported by this package).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from veridical.provenance import versions

from .capture import capture, eager_attention, num_query_heads, prepare
from .scores import (
    VAR_TAU,
    effective_tau,
    head_norms,
    image_attention_share,
    massive_mask,
    rms_abs,
    select_sink_dims,
    vhd,
    visual_sensitivity,
)

logger = logging.getLogger(__name__)

SCHEMA = "veridical.heads.profile/1"
DEFAULT_PROMPT = "Please describe this image in detail."
DEFAULT_LIMIT = 32
DEFAULT_DATA = "builtin:synthcoco"  # veridical.world.BUILTIN_DATA
MODEL_PROFILE = "heads_profile.json"  # a model folder's own profile
HEAD_SCORES = ("vhd", "text_norm", "image_norm", "image_attention", "visual_sensitivity")
COUNTERFACTUALS = ("blank", "noise")
FULL_HASH_LIMIT = 200_000_000  # elements; larger models hash their first and last tensors only
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
_MAX_DETAIL_PAIRS = 10_000  # per item: (token, dim) hits that feed the token/position tallies
_TOP = 10


@dataclass(frozen=True)
class ProfileSettings:
    """How a profile is computed; validated on construction."""

    counterfactual: str = "blank"
    noise_step: int = 500
    seed: int = 0
    tau: float = VAR_TAU
    ratio: float = 10.0
    min_layer_fraction: float = 0.5
    sink_from_layer: int = 2

    def __post_init__(self) -> None:
        if self.counterfactual not in COUNTERFACTUALS:
            raise ValueError(
                f"counterfactual={self.counterfactual!r} is not one of {', '.join(COUNTERFACTUALS)}; "
                "use 'blank' (the processor's mean image) or 'noise' (VCD's diffusion noise)"
            )
        for name in ("noise_step", "seed", "sink_from_layer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be an integer >= 0")
        if not 0 <= self.noise_step <= 999:
            raise ValueError(f"noise_step={self.noise_step!r} must be in [0, 999]; VCD uses 500")
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not self.tau > 0:
            raise ValueError(f"tau={self.tau!r} must be a positive number; VAR uses 20")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not self.ratio >= 1:
            raise ValueError(f"ratio={self.ratio!r} must be a number >= 1, e.g. 10")
        if not isinstance(self.min_layer_fraction, (int, float)) or not 0 < self.min_layer_fraction <= 1:
            raise ValueError(
                f"min_layer_fraction={self.min_layer_fraction!r} must be in (0, 1], e.g. 0.5"
            )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["tau"] = float(self.tau)
        out["ratio"] = float(self.ratio)
        out["min_layer_fraction"] = float(self.min_layer_fraction)
        return out


# ------------------------------------------------------------------------------ calibration data


def calibration_images(
    data: str | os.PathLike | Sequence[Any],
    limit: int | None = DEFAULT_LIMIT,
    world_split: str = "test",
) -> tuple[list[Any], str]:
    """``(images, source)``: the first ``limit`` images of ``data`` (None = all).

    ``data``: a SynthCOCO world folder (``images/<world_split>``; the built-in world's folder is
    ``veridical.world.builtin_world(split)``, which the command line uses for
    ``builtin:synthcoco``); a folder of images (searched recursively, sorted by path); one image
    file; or a list of images (PIL images, paths or bytes).
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit={limit!r} must be a positive integer (or None for all images)")
    images: list[Any]
    if isinstance(data, (str, os.PathLike)):
        if str(data).startswith("builtin:"):
            raise ValueError(
                f"data={str(data)!r} is a name, not a folder: pass its folder (the command line "
                f"resolves {DEFAULT_DATA!r}: veridical.world.builtin_world(split)), a folder of "
                "images or a SynthCOCO world folder"
            )
        path = Path(data).expanduser()
        if path.is_file():
            images, source = [path], str(path)
        elif path.is_dir():
            root = path / "images" / world_split if (path / "manifest.json").is_file() else path
            images = sorted(p for p in root.rglob("*")
                            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            source = str(root)
        else:
            raise ValueError(
                f"data={str(data)!r} does not exist; give a folder of images, a SynthCOCO world "
                "folder or an image file"
            )
    elif isinstance(data, Sequence):
        images, source = list(data), "<given images>"
    else:
        raise ValueError(
            "data must be a path or a list of images, got "
            f"{type(data).__name__}"
        )
    if not images:
        raise ValueError(f"data {source!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return (images if limit is None else images[:limit]), source


def _image_name(image: Any, index: int) -> str:
    if isinstance(image, (str, os.PathLike)):
        return Path(image).name
    return f"<image {index}>"


def _image_digest(image: Any) -> bytes:
    if isinstance(image, (str, os.PathLike)) and Path(image).is_file():
        return hashlib.sha256(Path(image).read_bytes()).digest()
    if isinstance(image, (bytes, bytearray)):
        return hashlib.sha256(bytes(image)).digest()
    if hasattr(image, "tobytes") and hasattr(image, "mode"):  # a PIL image
        head = f"{image.mode}:{image.size}".encode()
        return hashlib.sha256(head + image.tobytes()).digest()
    return hashlib.sha256(repr(image).encode()).digest()  # load_image reports it properly later


def calibration_digest(images: Sequence[Any], prompts: Sequence[str]) -> str:
    """sha256 over the images' bytes and the prompts, in order."""
    digest = hashlib.sha256()
    for image, prompt in zip(images, prompts, strict=True):
        digest.update(_image_digest(image))
        digest.update(prompt.encode() + b"\0")
    return digest.hexdigest()


def _prompt_list(prompts: str | Sequence[str], n: int) -> list[str]:
    if isinstance(prompts, str):
        return [prompts] * n
    prompt_list = list(prompts)
    if len(prompt_list) != n or not all(isinstance(p, str) for p in prompt_list):
        raise ValueError(
            f"prompts must be one string or a list of {n} strings (one per image), got "
            f"{len(prompt_list)} items"
        )
    return prompt_list


# ------------------------------------------------------------------------------ fingerprint


def _clean_config(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean_config(v) for k, v in value.items()
                if not str(k).startswith("_")
                and k not in ("transformers_version", "name_or_path", "dtype", "torch_dtype")}
    if isinstance(value, (list, tuple)):
        return [_clean_config(v) for v in value]
    return value


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    if tensor.device.type == "meta":
        return b"meta"
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def model_fingerprint(model: torch.nn.Module, full_hash_limit: int = FULL_HASH_LIMIT) -> str:
    """sha256 hex of the model's config and weights (see the module docstring)."""
    digest = hashlib.sha256(b"veridical.heads.fingerprint/1\0")
    config = _clean_config(model.config.to_dict())
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    tensors = list(model.state_dict().items())
    for name, tensor in tensors:
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\n".encode())
    total = sum(t.numel() for _, t in tensors)
    chosen = tensors if total <= full_hash_limit else [tensors[0], tensors[-1]]
    for _, tensor in chosen:
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


# ------------------------------------------------------------------------------ profiling


def _counterfactual_pixels(pixels: torch.Tensor, settings: ProfileSettings,
                           generator: torch.Generator) -> torch.Tensor:
    if settings.counterfactual == "blank":
        return torch.zeros_like(pixels)
    from veridical.decoding.branches import vcd_noise

    return vcd_noise(pixels, generator, settings.noise_step)


def _model_info(engine: Any) -> dict[str, Any]:
    model = engine.model
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = num_query_heads(model)
    layers = engine.adapter.decoder_layers(model)
    head_dim = engine.adapter.o_proj(layers[0]).in_features // heads
    return {
        "name": engine.name,
        "model_type": model.config.model_type,
        "num_layers": len(layers),
        "num_heads": heads,
        "head_dim": head_dim,
        "hidden_size": int(text.hidden_size),
    }


def _progress(iterable, total: int, enabled: bool | None):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc="heads profile", unit="img",
                disable=None if enabled is None else not enabled)


class _SinkTally:
    """Accumulates massive (token, dim) hits over the calibration items."""

    def __init__(self, num_layers: int, hidden: int, examined: list[int], tau: float, ratio: float):
        self.examined, self.tau, self.ratio = examined, tau, ratio
        self.counts = torch.zeros(num_layers, hidden, dtype=torch.long)  # massive tokens
        self.phi_max = torch.zeros(num_layers, hidden)
        self.tokens: dict[int, Counter] = {}
        self.positions: dict[int, Counter] = {}
        self.image_hits = torch.zeros(hidden, dtype=torch.long)
        self.text_hits = torch.zeros(hidden, dtype=torch.long)

    def reduce(self, layer: int, hidden: torch.Tensor):
        """The capture hook's reduction of one layer input ``(T, D)``."""
        if layer not in self.examined:
            return None
        phi = rms_abs(hidden)  # (T, D)
        mask = massive_mask(phi, self.tau, self.ratio)
        return mask.nonzero().cpu(), phi.amax(0).cpu()  # (n, 2) [token, dim], (D,)

    def add(self, per_layer: list[Any], input_ids: torch.Tensor, image_mask: torch.Tensor) -> None:
        pairs = []
        for layer in self.examined:
            hits, phi_max = per_layer[layer]
            self.phi_max[layer] = torch.maximum(self.phi_max[layer], phi_max)
            if hits.numel():
                self.counts[layer] += torch.bincount(hits[:, 1], minlength=self.counts.shape[1])
                pairs.append(hits)
        if not pairs:
            return
        unique = torch.unique(torch.cat(pairs), dim=0)  # (token, dim) massive in any examined layer
        is_image = image_mask[unique[:, 0]]
        dims = unique[:, 1]
        self.image_hits += torch.bincount(dims[is_image], minlength=self.image_hits.numel())
        self.text_hits += torch.bincount(dims[~is_image], minlength=self.text_hits.numel())
        for token, dim in unique[:_MAX_DETAIL_PAIRS].tolist():
            self.tokens.setdefault(dim, Counter())[int(input_ids[token])] += 1
            self.positions.setdefault(dim, Counter())[token] += 1

    def summary(self, min_layer_fraction: float, tokenizer: Any) -> dict[str, Any]:
        examined = self.counts[self.examined]
        dims = select_sink_dims(examined, min_layer_fraction)
        per_layer = []
        for layer in self.examined:
            firing = torch.nonzero(self.counts[layer]).flatten().tolist()
            per_layer.append({"layer": layer, "dims": firing,
                              "hits": int(self.counts[layer].sum()),
                              "max_phi": float(self.phi_max[layer].max())})
        details = []
        for dim in dims:
            tokens = self.tokens.get(dim, Counter()).most_common(_TOP)
            details.append({
                "dim": dim,
                "layers": [layer for layer in self.examined if self.counts[layer, dim] > 0],
                "max_phi": float(self.phi_max[self.examined, dim].max()),
                "image_token_hits": int(self.image_hits[dim]),
                "text_token_hits": int(self.text_hits[dim]),
                "tokens": [{"id": i, "token": tokenizer.convert_ids_to_tokens(i), "count": c}
                           for i, c in tokens],
                "positions": [{"position": p, "count": c}
                              for p, c in self.positions.get(dim, Counter()).most_common(_TOP)],
            })
        return {"dims": dims, "layers_examined": list(self.examined), "per_layer": per_layer,
                "details": details}


def profile_model(
    engine: Any,
    images: Sequence[Any],
    prompts: str | Sequence[str] = DEFAULT_PROMPT,
    *,
    source: str | None = None,
    progress: bool | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Profile ``engine``'s heads over (image, prompt) pairs; see the module docstring.

    ``settings``: the fields of :class:`ProfileSettings` (counterfactual, noise_step, seed, tau,
    ratio, min_layer_fraction, sink_from_layer). ``progress``: a tqdm bar over the items
    (None = only on a terminal).
    """
    from veridical.decoding.inputs import encode
    from veridical.images import load_image

    config = ProfileSettings(**settings)
    adapter, model = engine.adapter, engine.model
    image_token = adapter.image_token_id(model.config)
    if image_token is None:
        raise ValueError(
            f"engine {engine.name!r} is a text-only model (no image_token_id); head profiles "
            "compare forwards with and without an image, so they need a vision-language model"
        )
    if isinstance(images, (str, os.PathLike)) or not isinstance(images, Sequence) or not images:
        raise ValueError(
            "images must be a non-empty list of images (PIL images or paths); use "
            "calibration_images(data, limit) to read a folder or the built-in set"
        )
    prompt_list = _prompt_list(prompts, len(images))
    info = _model_info(engine)
    num_layers, num_heads, hidden = info["num_layers"], info["num_heads"], info["hidden_size"]
    tau = effective_tau(config.tau, hidden)
    first = min(config.sink_from_layer, num_layers - 1)
    tally = _SinkTally(num_layers, hidden, list(range(first, num_layers)), tau, config.ratio)
    sums = {name: torch.zeros(num_layers, num_heads) for name in HEAD_SCORES}
    generator = torch.Generator().manual_seed(config.seed)

    with eager_attention(model, adapter.multimodal):
        pairs = zip(images, prompt_list)
        for index, (image, prompt) in enumerate(_progress(pairs, len(images), progress)):
            pil = load_image(image)
            real = encode(engine.processor, pil, prompt)
            image_mask = real["input_ids"][0] == image_token
            if not image_mask.any():
                raise ValueError(
                    f"calibration item {index}: the encoded prompt holds no image token "
                    f"(id {image_token}); check the processor's chat template"
                )
            if "pixel_values" not in real:
                raise ValueError(f"calibration item {index}: the processor returned no pixel_values")
            text = encode(engine.processor, None, prompt)
            blank = dict(real)
            blank["pixel_values"] = _counterfactual_pixels(real["pixel_values"], config, generator)

            with_image = capture(engine, prepare(engine, real), attention=True,
                                 hidden_fn=tally.reduce)
            text_only = capture(engine, prepare(engine, text))
            content_free = capture(engine, prepare(engine, blank))

            sums["vhd"] += vhd(with_image.heads, text_only.heads)
            sums["text_norm"] += head_norms(text_only.heads)
            sums["image_norm"] += head_norms(with_image.heads)
            sums["image_attention"] += image_attention_share(with_image.attention, image_mask)
            sums["visual_sensitivity"] += visual_sensitivity(with_image.heads, content_free.heads)
            tally.add(with_image.hidden, real["input_ids"][0], image_mask)

    n = len(images)
    settings_out = config.to_dict() | {"tau_effective": tau, "attention": "eager"}
    profile = {
        "schema": SCHEMA,
        "model": info | {"fingerprint": model_fingerprint(model)},
        "calibration": {
            "source": source or "<given images>",
            "items": n,
            "prompts": sorted(set(prompt_list)),
            "images": [_image_name(image, i) for i, image in enumerate(images)],
            "digest": calibration_digest(images, prompt_list),
        },
        "settings": settings_out,
        "scores": {name: (total / n).tolist() for name, total in sums.items()},
        "sinks": tally.summary(config.min_layer_fraction, engine.tokenizer),
        "versions": versions(("veridical", "torch", "transformers"), python=False),
    }
    profile["cache_key"] = cache_key(profile["model"]["fingerprint"],
                                     profile["calibration"]["digest"], config)
    return profile


# ------------------------------------------------------------------------------ cache and files


def cache_key(fingerprint: str, digest: str, settings: ProfileSettings) -> str:
    """sha256 hex of (schema, model fingerprint, calibration digest, settings)."""
    blob = json.dumps({"schema": SCHEMA, "model": fingerprint, "calibration": digest,
                       "settings": settings.to_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def default_cache_dir() -> Path:
    """``$VERIDICAL_CACHE/heads`` (default ``~/.cache/veridical/heads``)."""
    from veridical.cache import cache_dir

    return cache_dir() / "heads"


def _cache_folder(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def save_profile(profile: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``profile`` as JSON to ``path`` atomically (a temporary file, then a rename)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    buffer = io.StringIO()
    json.dump(profile, buffer, indent=1)
    tmp.write_text(buffer.getvalue() + "\n", encoding="utf-8")
    tmp.replace(target)
    return target


def load_profile(path: str | os.PathLike) -> dict[str, Any]:
    """Read a profile written by :func:`save_profile`; ValueError if it is not one."""
    target = Path(path)
    try:
        profile = json.loads(target.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"profile {str(target)!r} does not exist; run "
                         "`veridical heads profile --model REF --data DIR --out DIR` first"
                         ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"profile {str(target)!r} is not readable JSON ({exc}); "
                         "delete it and profile again") from None
    if not isinstance(profile, dict) or profile.get("schema") != SCHEMA:
        found = profile.get("schema") if isinstance(profile, dict) else type(profile).__name__
        raise ValueError(f"{str(target)!r} is not a head profile of schema {SCHEMA!r} "
                         f"(found {found!r}); profile the model again")
    return profile


def load_or_profile(
    engine: Any,
    data: str | os.PathLike | Sequence[Any],
    cache_dir: str | os.PathLike | None = None,
    *,
    limit: int | None = DEFAULT_LIMIT,
    prompt: str = DEFAULT_PROMPT,
    world_split: str = "test",
    refresh: bool = False,
    progress: bool | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """The cached profile of ``engine`` on ``data``, computed on a miss (or with ``refresh``)."""
    config = ProfileSettings(**settings)
    images, source = calibration_images(data, limit, world_split)
    prompts = [prompt] * len(images)
    key = cache_key(model_fingerprint(engine.model), calibration_digest(images, prompts), config)
    path = _cache_folder(cache_dir) / f"profile-{key[:24]}.json"
    if path.is_file() and not refresh:
        try:
            cached = load_profile(path)
        except ValueError as exc:
            logger.warning("ignoring the cached head profile: %s", exc)
        else:
            if cached.get("cache_key") == key:
                logger.info("head profile of %s from the cache: %s", engine.name, path)
                return cached
    profile = profile_model(engine, images, prompts, source=source, progress=progress,
                            **config.to_dict())
    save_profile(profile, path)
    logger.info("head profile of %s written to the cache: %s", engine.name, path)
    return profile


def model_profile_path(fingerprint: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the cache keeps the profile attached to the model of ``fingerprint``."""
    return _cache_folder(cache_dir) / f"model-{fingerprint[:24]}.json"


def save_model_profile(profile: dict[str, Any], cache_dir: str | os.PathLike | None = None
                       ) -> Path:
    """Make ``profile`` its model's profile in the cache (:func:`model_profile_path` of its
    fingerprint), so that a later ``veridical.load`` of the same model attaches it."""
    return save_profile(profile, model_profile_path(profile["model"]["fingerprint"], cache_dir))


def check_profile(profile: dict[str, Any], engine: Any) -> dict[str, Any]:
    """``profile`` if it fits ``engine``'s model (schema, layers, heads); else ValueError."""
    if not isinstance(profile, dict) or profile.get("schema") != SCHEMA:
        raise ValueError(f"not a head profile of schema {SCHEMA!r}")
    info, model = _model_info(engine), profile.get("model", {})
    have = (model.get("num_layers"), model.get("num_heads"))
    if have != (info["num_layers"], info["num_heads"]):
        raise ValueError(
            f"the profile of {model.get('name')!r} has {have[0]} layers x {have[1]} heads, the "
            f"model {info['num_layers']} x {info['num_heads']}; profile this model with "
            "`veridical heads profile --model REF --data DIR --out DIR`")
    return profile


def find_profile(engine: Any, folder: str | os.PathLike | None = None,
                 cache_dir: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The model's own profile: ``folder/MODEL_PROFILE`` (a model folder's file, shipped with the
    weights), else the cache's profile of the model's fingerprint, else None. A file that is
    unreadable or does not fit the model is skipped with a warning."""
    if folder is not None:
        profile = _read_fitting(Path(folder) / MODEL_PROFILE, engine)
        if profile is not None:
            return profile
    return _read_fitting(model_profile_path(model_fingerprint(engine.model), cache_dir), engine)


def _read_fitting(path: Path, engine: Any) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return check_profile(load_profile(path), engine)
    except ValueError as exc:
        logger.warning("ignoring the head profile %s: %s", path, exc)
        return None


def ensure_profile(
    engine: Any,
    data: str | os.PathLike | Sequence[Any],
    cache_dir: str | os.PathLike | None = None,
    *,
    replace: bool = False,
    **kwargs: Any,
) -> dict[str, Any]:
    """``engine.head_profile``, built first if the engine has none (or with ``replace``).

    Building runs :func:`load_or_profile` on ``data`` (the cached result if there is one; more
    keyword arguments go to it: ``limit``, ``prompt``, ``world_split``, settings), saves it as
    the model's profile in the cache (:func:`save_model_profile`) and sets
    ``engine.head_profile``. For start-up (the server's), never per request: profiling runs
    three forwards per calibration image.
    """
    current = getattr(engine, "head_profile", None)
    if current is not None and not replace:
        return current
    profile = load_or_profile(engine, data, cache_dir, **kwargs)
    save_model_profile(profile, cache_dir)
    engine.head_profile = profile
    return profile
