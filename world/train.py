"""Train the built-in model organism: a tiny LLaVA that sees SynthCOCO objects and still hallucinates.

Contract:
- :func:`build_model` returns ``(model, processor)``: a real ``LlavaForConditionalGeneration``
  (CLIP vision tower, 64x64 images in 8-pixel patches = 64 image tokens; Llama decoder) with a
  word-level tokenizer over the world's words (:func:`world_words`), the LLaVA-1.5 chat template
  and a ``LlavaProcessor`` + ``CLIPImageProcessor`` sized for 64x64. Bos/eos/pad ids agree in
  the tokenizer, both configs and ``generation_config``.
- :func:`train` trains it on a SynthCOCO world folder (``veridical world generate``), seeded and
  logged, and writes under ``out``::

      model.safetensors, config.json, generation_config.json   the model (fp32; config.json asks
                           for eager attention, ~5x faster than SDPA on CPU at this size)
      processor / tokenizer files, chat_template                 AutoProcessor.from_pretrained(out)
      train_log.jsonl      one line per logged step (loss per task, lr, seconds) and per eval
      loss_curve.png       the stage-1 and stage-2 loss curves and the validation checks
      training.json        every setting, data sizes, time per stage, final losses and checks
      checkpoint/          the latest state (model, optimiser, step); a rerun of the same
                           command resumes from it, and it is deleted when training finishes

  The batch of step ``s`` depends only on (seed, stage, s), so a resumed run draws the batches an
  uninterrupted one would.
- Stage 1 pretrains the vision tower alone on the objects (multi-label BCE over the categories
  from a per-patch linear head, max-pooled, reading the features the projector receives), as real
  LVLMs start from a pretrained CLIP. It is short on purpose: a perfect tower makes the captions
  too grounded (seen in the pilot runs: the model then hardly hallucinates).
- Stage 2 trains projector + language model, and the tower at a lower learning rate, on
  train-split images: captions (prompt "Please describe this image in detail.", one of the image's
  reference captions) and yes/no questions: existence ("Is there a {obj} in the image?", POPE's
  form, and MME's "Is there a/an {obj} in this image?") with random negatives (and, with
  ``partner_negative_share`` > 0, that share of absent co-occurrence partners), count, colour
  and position (MME forms of ``veridical.world.text.mme_pair``), with no suffix, the POPE suffix or the
  MME suffix. A question example is a multi-turn conversation of ``turns`` questions about one
  image (the first turn is exactly the single-turn evaluation prompt). The loss is on answer
  tokens only; each example weighs the same, and within it the yes/no token weighs
  ``yes_no_weight`` times an ordinary answer token. The first ``early_steps`` steps may use
  another share of captions (``early_caption_share``), and with ``early_restart`` the learning
  rate warms up and decays twice: over those steps, then over the rest.
- :func:`add_world_subcommands` registers ``veridical world train``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from veridical.provenance import versions

from .render import PALETTE
from .text import MME_SUFFIX, NUMBERS, PLURALS, mme_pair, plural, with_article
from .world import SCENES, World, WorldConfig, build_world

__all__ = [
    "TrainConfig",
    "CAPTION_PROMPT",
    "POPE_SUFFIX",
    "world_words",
    "build_processor",
    "build_model",
    "load_split",
    "train",
    "add_world_subcommands",
]

logger = logging.getLogger(__name__)

CAPTION_PROMPT = "Please describe this image in detail."
POPE_SUFFIX = " Please answer this question with one word."
POPE_TEMPLATE = "Is there a {} in the image?"  # veridical.evals.pope.DEFAULT_TEMPLATE
SUFFIXES = ("", POPE_SUFFIX, MME_SUFFIX)
QA_TASKS = ("existence", "count", "color", "position")

# Words of the prompts, answers, captions and questions besides object, colour, number and scene
# names (those come from the world itself).
_TEMPLATE_WORDS = """
user assistant please describe this image in detail answer question with one word yes or no
is there are a an the in on at of to and only side photo showing left right top bottom center
with
"""


@dataclass(frozen=True)
class TrainConfig:
    """Every training setting; defaults are the first (unshipped) attempt's recipe. The shipped
    model's two commands are in its model card (veridical/builtin/synthcoco-llava/README.md)."""

    seed: int = field(default=0, metadata={"help": "seed of weights and batches"})
    # stage 1: the vision tower alone
    stage1_steps: int = field(default=500, metadata={"help": "vision pretraining steps"})
    stage1_batch: int = field(default=64, metadata={"help": "vision pretraining batch"})
    stage1_lr: float = field(default=1e-3, metadata={"help": "vision pretraining learning rate"})
    # stage 2: projector + language model (+ tower at tower_lr)
    steps: int = field(default=1200, metadata={"help": "stage-2 steps"})
    batch: int = field(default=24, metadata={"help": "stage-2 batch (examples)"})
    lr: float = field(default=1e-3, metadata={"help": "stage-2 peak learning rate"})
    tower_lr: float = field(default=1e-4, metadata={
        "help": "stage-2 learning rate of the vision tower (0 = frozen)"})
    warmup: int = field(default=100, metadata={"help": "warm-up steps (then cosine to 0)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    caption_share: float = field(default=0.3, metadata={"help": "share of caption examples"})
    early_steps: int = field(default=0, metadata={
        "help": "the first N stage-2 steps use early_caption_share instead of caption_share"})
    early_caption_share: float = field(default=0.05, metadata={
        "help": "share of caption examples in the first early_steps stage-2 steps"})
    early_restart: bool = field(default=False, metadata={
        "help": "restart the warm-up and cosine schedule at stage-2 step early_steps (two "
                "cycles: 0..early_steps and early_steps..steps)"})
    turns: int = field(default=3, metadata={"help": "questions per question example"})
    existence_share: float = field(default=0.7, metadata={
        "help": "share of existence questions (the rest: count, colour, position equally)"})
    partner_negative_share: float = field(default=0.0, metadata={
        "help": "share of existence negatives that name an absent co-occurrence partner of a "
                "present object (the rest: random absent categories)"})
    yes_no_weight: float = field(default=3.0, metadata={
        "help": "loss weight of the yes/no token relative to other answer tokens"})
    # model
    vision_layers: int = field(default=4, metadata={"help": "CLIP tower layers"})
    vision_hidden: int = field(default=128, metadata={"help": "CLIP tower width"})
    text_layers: int = field(default=4, metadata={"help": "Llama layers"})
    text_hidden: int = field(default=256, metadata={"help": "Llama width"})
    text_ffn: int = field(default=1024, metadata={"help": "Llama FFN width"})
    # bookkeeping
    log_every: int = field(default=25, metadata={"help": "log every N steps"})
    eval_every: int = field(default=400, metadata={"help": "validation check every N steps"})
    checkpoint_every: int = field(default=200, metadata={"help": "checkpoint every N steps"})
    threads: int = field(default=1, metadata={"help": "torch threads"})
    bf16: bool = field(default=False, metadata={
        "help": "run the training forwards under bfloat16 autocast (weights, optimiser and loss "
                "stay fp32); 1.5-1.8x faster per step on CPUs with AVX512-BF16"})

    def __post_init__(self) -> None:
        for name in ("stage1_batch", "steps", "batch", "turns", "vision_layers", "text_layers",
                     "log_every", "eval_every", "checkpoint_every", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} is invalid; use >= 1")
        for name in ("stage1_steps", "warmup", "tower_lr", "seed", "early_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} is invalid; use >= 0")
        for name in ("caption_share", "early_caption_share", "existence_share",
                     "partner_negative_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} is invalid; use a "
                                 "share in [0, 1]")
        if self.early_restart and not 0 < self.early_steps < self.steps:
            raise ValueError(f"TrainConfig.early_restart needs 0 < early_steps < steps (got "
                             f"early_steps={self.early_steps}, steps={self.steps})")

    def lr_scale(self, step: int) -> float:
        """The stage-2 learning rate at step ``step`` (0-based), as a share of its peak."""
        if self.early_restart:
            if step < self.early_steps:
                return _cosine(step, self.early_steps, self.warmup)
            return _cosine(step - self.early_steps, self.steps - self.early_steps, self.warmup)
        return _cosine(step, self.steps, self.warmup)

    def caption_share_at(self, step: int) -> float:
        """The share of caption examples at stage-2 step ``step`` (0-based)."""
        return self.early_caption_share if step < self.early_steps else self.caption_share


# ------------------------------------------------------------------ tokenizer, processor, model


def world_words(world: World) -> list[str]:
    """The vocabulary: template words, then scene, object (and plural), colour and number words."""
    words: list[str] = _TEMPLATE_WORDS.split()
    for scene in SCENES:
        words += scene.split()
    for c in world.categories:
        words += c.name.split() + plural(c.name).split()
    words += list(PALETTE) + list(NUMBERS.values()) + list(PLURALS.values())
    return list(dict.fromkeys(w.lower() for w in words))


def build_processor(world: World, image_size: int = 64, patch: int = 8):
    """LlavaProcessor + CLIPImageProcessor(Pil) for ``image_size`` images and the world's words."""
    import transformers

    from veridical.tiny import llava_word_tokenizer

    tokenizer = llava_word_tokenizer(world_words(world))
    image_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    image_processor = image_cls(size={"shortest_edge": image_size},
                                crop_size={"height": image_size, "width": image_size})
    return transformers.LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template)


def build_model(world: World, cfg: TrainConfig, image_size: int = 64, patch: int = 8):
    """(model, processor): an untrained LlavaForConditionalGeneration seeded by ``cfg.seed``."""
    import torch
    import transformers

    processor = build_processor(world, image_size, patch)
    tok = processor.tokenizer
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id}
    heads_v = max(1, cfg.vision_hidden // 32)
    heads_t = max(1, cfg.text_hidden // 64)
    config = transformers.LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model", "hidden_size": cfg.vision_hidden,
            "intermediate_size": 4 * cfg.vision_hidden, "num_hidden_layers": cfg.vision_layers,
            "num_attention_heads": heads_v, "image_size": image_size, "patch_size": patch,
            "projection_dim": cfg.vision_hidden},
        text_config={
            "model_type": "llama", "hidden_size": cfg.text_hidden,
            "intermediate_size": cfg.text_ffn, "num_hidden_layers": cfg.text_layers,
            "num_attention_heads": heads_t, "num_key_value_heads": heads_t,
            "max_position_embeddings": 512, "vocab_size": len(tok), **ids},
        image_token_index=tok.image_token_id,
        image_seq_length=(image_size // patch) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,  # the tower is ours: its last layer is the feature layer
        **{k: v for k, v in ids.items() if k != "bos_token_id"},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = transformers.LlavaForConditionalGeneration(config)
    # Eager attention: on CPU, torch's SDPA with a padding mask runs this model about 5x slower
    # (measured, 2 threads, batch 32 x 130 tokens: 7.5 s vs 1.1 s per training step).
    model.set_attn_implementation("eager")
    for name, value in ids.items():
        setattr(model.config.get_text_config(), name, value)
        setattr(model.generation_config, name, value)
    return model, processor


# ------------------------------------------------------------------------------------- data


@dataclass
class Split:
    """One split of a world folder, in memory."""

    pixels: np.ndarray  # (N, H, W, 3) uint8
    ids: list[int]
    files: list[str]
    layouts: list[SimpleNamespace]  # scene, size, objects (category, color, bbox)
    captions: list[list[str]]


def load_split(world_dir: str | Path, split: str) -> Split:
    """Images, objects and captions of ``split`` of a SynthCOCO world folder."""
    from PIL import Image

    root = Path(world_dir)
    inst_path = root / "annotations" / f"instances_{split}.json"
    if not inst_path.is_file():
        raise ValueError(f"world={str(root)!r} has no {split!r} split ({inst_path} is missing); "
                         f"generate it with `veridical world generate --out {root} ...`")
    inst = json.loads(inst_path.read_text())
    caps = json.loads((root / "annotations" / f"captions_{split}.json").read_text())
    names = {c["id"]: c["name"] for c in inst["categories"]}
    objects: dict[int, list[SimpleNamespace]] = {im["id"]: [] for im in inst["images"]}
    for a in inst["annotations"]:
        objects[a["image_id"]].append(SimpleNamespace(
            category=names[a["category_id"]], color=a["color"], bbox=tuple(a["bbox"])))
    texts: dict[int, list[str]] = {im["id"]: [] for im in inst["images"]}
    for a in sorted(caps["annotations"], key=lambda a: a["id"]):
        texts[a["image_id"]].append(a["caption"])
    images = sorted(inst["images"], key=lambda im: im["id"])
    pixels = np.stack([np.asarray(Image.open(root / "images" / split / im["file_name"])
                                  .convert("RGB")) for im in images])
    layouts = [SimpleNamespace(scene=im["scene"], size=im["width"], objects=objects[im["id"]])
               for im in images]
    return Split(pixels, [im["id"] for im in images], [im["file_name"] for im in images],
                 layouts, [texts[im["id"]] for im in images])


def _yes_no_question(layout: SimpleNamespace, world: World, task: str,
                     rng: np.random.Generator,
                     partner_share: float = 0.0) -> tuple[str, str] | None:
    """(question without suffix, "yes"/"no") for one image, or None if it cannot support task.
    An existence negative names an absent partner of a present object with probability
    ``partner_share`` (when the image has one), else a random absent category."""
    present = sorted({o.category for o in layout.objects})
    if task == "existence":
        if rng.random() < 0.5:
            return _existence(present[int(rng.integers(len(present)))], "yes", rng)
        # partner_share 0 draws exactly what the random-negatives-only recipe drew
        if partner_share > 0 and rng.random() < partner_share:
            absent = absent_partners(present, world)
            if absent:
                return _existence(absent[int(rng.integers(len(absent)))], "no", rng)
        absent = [c.name for c in world.categories if c.name not in present]
        return _existence(absent[int(rng.integers(len(absent)))], "no", rng)
    pair = mme_pair(layout, world, task, rng)
    if pair is None:
        return None
    question, answer = pair[int(rng.integers(2))]
    return question.removesuffix(MME_SUFFIX), answer.lower()


def absent_partners(present: list[str], world: World) -> list[str]:
    """The co-occurrence partners of the present categories that are absent, sorted."""
    return sorted({world.partner(c) for c in present} - set(present))


def _existence(obj: str, answer: str, rng: np.random.Generator) -> tuple[str, str]:
    """POPE's form of the existence question (70%) or MME's."""
    if rng.random() < 0.7:
        return POPE_TEMPLATE.format(obj), answer
    return f"Is there {with_article(obj)} in this image?", answer


def _suffix(rng: np.random.Generator) -> str:
    return SUFFIXES[int(rng.choice(3, p=(0.3, 0.4, 0.3)))]


def draw_example(split: Split, world: World, cfg: TrainConfig, rng: np.random.Generator,
                 step: int | None = None) -> tuple[int, list[tuple[str, str]]]:
    """One training example of stage-2 step ``step`` (None: the late share of captions):
    (image index, [(prompt, answer), ...] turns)."""
    i = int(rng.integers(len(split.ids)))
    share = cfg.caption_share if step is None else cfg.caption_share_at(step)
    if rng.random() < share:
        caps = split.captions[i]
        return i, [(CAPTION_PROMPT, caps[int(rng.integers(len(caps)))])]
    turns = []
    while len(turns) < cfg.turns:
        if rng.random() < cfg.existence_share:
            task = "existence"
        else:
            task = QA_TASKS[1 + int(rng.integers(3))]
        qa = _yes_no_question(split.layouts[i], world, task, rng, cfg.partner_negative_share)
        if qa is not None:
            turns.append((qa[0] + _suffix(rng), qa[1]))
    return i, turns


class Encoder:
    """Token ids and loss weights of conversations, exactly as the chat template + processor
    tokenise them (a test checks the first turn against the processor)."""

    def __init__(self, processor, yes_no_weight: float):
        tok = processor.tokenizer
        self.tok = tok
        self.image_id = tok.image_token_id
        self.n_image = processor.num_image_tokens if hasattr(processor, "num_image_tokens") else (
            processor.image_processor.crop_size["height"] // processor.patch_size) ** 2
        self.yes_no = {tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")}
        self.w_yes_no = yes_no_weight
        self.unk = tok.unk_token_id

    @lru_cache(maxsize=200_000)  # noqa: B019 - prompts repeat; one Encoder per run
    def _ids(self, text: str) -> tuple[int, ...]:
        ids = tuple(self.tok(text, add_special_tokens=False)["input_ids"])
        if self.unk in ids:
            raise ValueError(f"text {text!r} has words outside the vocabulary; add them to "
                             "veridical.world.train.world_words")
        return ids

    def encode(self, turns: list[tuple[str, str]]) -> tuple[list[int], list[float]]:
        """Ids of the conversation and a weight per token (0 on prompts), summing to 1."""
        ids = [self.tok.bos_token_id]
        weights = [0.0]
        for k, (prompt, answer) in enumerate(turns):
            user = "USER: <image>\n" if k == 0 else "USER: "
            head = self._ids(user + prompt + " ASSISTANT:")
            if k == 0:  # the processor expands the one <image> into n_image tokens
                at = head.index(self.image_id)
                head = head[:at] + (self.image_id,) * self.n_image + head[at + 1:]
            ids += head
            weights += [0.0] * len(head)
            ans = self._ids(answer) + (self.tok.eos_token_id,)
            ids += ans
            weights += [self.w_yes_no if (t in self.yes_no and len(ans) == 2) else 1.0
                        for t in ans]
        total = sum(weights)
        return ids, [w / total for w in weights]


def make_batch(encoder: Encoder, examples: list[tuple[int, list[tuple[str, str]]]],
               pixels: np.ndarray, mean: np.ndarray, std: np.ndarray) -> dict[str, Any]:
    """Right-padded tensors: input_ids, attention_mask, weights (B, T), pixel_values (B, 3, H, W)."""
    import torch

    seqs = [encoder.encode(turns) for _, turns in examples]
    width = max(len(ids) for ids, _ in seqs)
    pad = encoder.tok.pad_token_id
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    weights = torch.zeros((len(seqs), width))
    for r, (ids, w) in enumerate(seqs):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        mask[r, :len(ids)] = 1
        weights[r, :len(w)] = torch.tensor(w)
    idx = [i for i, _ in examples]
    return {"input_ids": input_ids, "attention_mask": mask, "weights": weights,
            "pixel_values": normalize(pixels[idx], mean, std),
            "captions": torch.tensor([len(t) == 1 and t[0][0] == CAPTION_PROMPT
                                      for _, t in examples])}


def normalize(pixels: np.ndarray, mean: np.ndarray, std: np.ndarray):
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) as CLIPImageProcessor makes them at this size."""
    import torch

    x = pixels.astype(np.float32) * np.float32(1 / 255)
    x = (x - mean.astype(np.float32)) / std.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _autocast(cfg: TrainConfig):
    """bfloat16 autocast on the CPU for ``cfg.bf16``, else a no-op context."""
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16)


def weighted_loss(logits, input_ids, weights):
    """Per example: sum of weight x next-token cross-entropy (weights sum to 1 per row)."""
    import torch.nn.functional as F

    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), input_ids[:, 1:],
                         reduction="none")  # (B, T-1)
    return (ce * weights[:, 1:]).sum(dim=1)  # (B,)


# ------------------------------------------------------------------------------------ checks


def _image_features(model, pixel_values):
    tower = model.model.vision_tower
    out = tower(pixel_values, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]  # (B, P, D)


def validate(model, processor, encoder: Encoder, val: Split, world: World, mean, std,
             n_questions: int = 240, n_captions: int = 60) -> dict[str, float]:
    """Quick checks on the val split: POPE-style yes/no accuracy by negative type (the next
    token, greedy over the whole vocabulary) and greedy captions' object hallucination/recall."""
    import torch

    model.eval()
    rng = np.random.default_rng(12345)
    out: dict[str, float] = {}
    yes_id = processor.tokenizer.convert_tokens_to_ids("yes")
    with torch.no_grad():
        # existence questions: present / random absent / partner-of-present absent
        kinds = {"pos": [], "random": [], "partner": []}
        for _ in range(n_questions):
            i = int(rng.integers(len(val.ids)))
            present = sorted({o.category for o in val.layouts[i].objects})
            partners = absent_partners(present, world)
            kind = ("pos", "random", "partner")[int(rng.integers(3))]
            if kind == "pos":
                obj = present[int(rng.integers(len(present)))]
            elif kind == "partner" and partners:
                obj = partners[int(rng.integers(len(partners)))]
            else:
                kind = "random"
                absent = [c.name for c in world.categories if c.name not in present]
                obj = absent[int(rng.integers(len(absent)))]
            kinds[kind].append((i, POPE_TEMPLATE.format(obj) + POPE_SUFFIX))
        for kind, items in kinds.items():
            if not items:
                continue
            preds = []
            for s in range(0, len(items), 64):
                chunk = items[s:s + 64]
                batch = make_batch(encoder, [(i, [(q, "yes")]) for i, q in chunk], val.pixels,
                                   mean, std)
                # logits at the last prompt token (right before the answer)
                lens = batch["attention_mask"].sum(1) - 2  # minus "yes" and eos
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               pixel_values=batch["pixel_values"]).logits
                nxt = logits[torch.arange(len(chunk)), lens - 1].argmax(-1)
                preds += (nxt == yes_id).tolist()
            rate = float(np.mean(preds))
            out[f"yes_rate_{kind}"] = round(rate, 4)
        pos, rnd, par = (out.get(f"yes_rate_{k}", float("nan")) for k in ("pos", "random", "partner"))
        out["acc_random"] = round((pos + 1 - rnd) / 2, 4)
        out["acc_partner"] = round((pos + 1 - par) / 2, 4)
        # captions
        idx = list(range(min(n_captions, len(val.ids))))
        tok = processor.tokenizer
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_PROMPT}]}],
            add_generation_prompt=True, tokenize=False)
        enc = processor(text=[prompt] * len(idx), images=[val.pixels[i] for i in idx],
                        return_tensors="pt")
        gen = model.generate(**enc, max_new_tokens=64, do_sample=False)
        texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        names = sorted((c.name for c in world.categories), key=len, reverse=True)
        said_total = hall = gt_total = found = 0
        for i, text in zip(idx, texts):
            t = f" {text} "
            said = {n for n in names if f" {n} " in t or f" {plural(n)} " in t}
            gt = {o.category for o in val.layouts[i].objects}
            said_total += len(said)
            hall += len(said - gt)
            gt_total += len(gt)
            found += len(said & gt)
        out["caption_hall_i"] = round(hall / max(1, said_total), 4)
        out["caption_recall"] = round(found / max(1, gt_total), 4)
        out["caption_example"] = texts[0]
    model.train()
    return out


# ------------------------------------------------------------------------------------ training


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _log(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _plot(log_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    s1 = [r for r in recs if r.get("stage") == 1 and "loss" in r]
    s2 = [r for r in recs if r.get("stage") == 2 and "loss" in r]
    ev = [r for r in recs if r.get("stage") == 2 and "acc_random" in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    if s1:
        axes[0].plot([r["step"] for r in s1], [r["loss"] for r in s1])
    axes[0].set(title="stage 1: vision tower, multi-label BCE", xlabel="step", ylabel="loss")
    for key, label in (("loss", "all"), ("loss_caption", "captions"), ("loss_qa", "questions")):
        pts = [(r["step"], r[key]) for r in s2 if key in r]
        if pts:
            axes[1].plot(*zip(*pts), label=label)
    axes[1].set(title="stage 2: weighted answer loss", xlabel="step", yscale="log")
    for key in ("acc_random", "acc_partner", "caption_hall_i", "caption_recall"):
        pts = [(r["step"], r[key]) for r in ev if key in r]
        if pts:
            axes[2].plot(*zip(*pts), marker="o", label=key)
    axes[2].set(title="val checks", xlabel="step", ylim=(0, 1))
    for ax in axes[1:]:
        if ax.get_legend_handles_labels()[0]:  # nothing logged yet: no empty legend
            ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)


# Settings read by stage 1 (and the model's shape); the others only matter in stage 2.
_STAGE1_FIELDS = ("seed", "stage1_steps", "stage1_batch", "stage1_lr", "warmup", "weight_decay",
                  "vision_layers", "vision_hidden", "text_layers", "text_hidden", "text_ffn",
                  "log_every")
# Bookkeeping that never changes the weights.
_FREE_FIELDS = ("log_every", "eval_every", "checkpoint_every", "threads")
# Changeable in stage 2 with a recorded schedule change (see train()).
_STAGE2_CHANGEABLE = ("steps",)


def _same_settings(saved: dict[str, Any], now: dict[str, Any],
                   fixed: tuple[str, ...] | None) -> bool:
    if fixed is not None:
        keys = fixed
    else:
        keys = tuple(k for k in now if k not in _STAGE2_CHANGEABLE)
    return all(saved.get(k) == now.get(k) for k in keys if k not in _FREE_FIELDS)


def _truncate_log(log_path: Path, stage: int, step: int) -> None:
    # Drop the lines an interrupted run wrote after the checkpoint it resumes from.
    if not log_path.exists():
        return
    keep = []
    for line in log_path.read_text().splitlines():
        r = json.loads(line)
        if (r["stage"], r["step"]) <= (stage, step):
            keep.append(line)
    log_path.write_text("".join(x + "\n" for x in keep))


def _save_checkpoint(ckpt: Path, state: dict[str, Any]) -> None:
    import torch

    ckpt.mkdir(parents=True, exist_ok=True)
    tmp = ckpt / "state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, ckpt / "state.pt")  # atomic: a crash mid-save keeps the previous one


def train(world_dir: str | Path, out: str | Path, cfg: TrainConfig, *,
          train_split: str = "train", val_split: str = "val", progress: bool = True,
          stop_after: int | None = None, init: str | Path | None = None) -> dict:
    """Train (both stages) on the world folder ``world_dir`` and save to ``out``; see the module
    docstring. Returns the training summary (also written to ``out/training.json``).

    ``stop_after``: stop at stage-2 step ``stop_after``: the model as of that step is saved as
    usual (``training.json`` says ``stopped_at_step``) and the checkpoint is kept, so a later call
    resumes from it, possibly with other ``steps`` (recorded).
    ``init``: start from the weights of an earlier run instead of the seeded initialisation: a
    model folder (``model.safetensors``) or a run folder holding ``checkpoint/state.pt``."""
    import torch

    torch.set_num_threads(cfg.threads)
    world_dir, out = Path(world_dir), Path(out)
    manifest = json.loads((world_dir / "manifest.json").read_text())
    wcfg = WorldConfig.from_dict(manifest["config"])
    world = build_world(wcfg)
    out.mkdir(parents=True, exist_ok=True)
    log_path, ckpt = out / "train_log.jsonl", out / "checkpoint"

    t0 = time.time()
    data = load_split(world_dir, train_split)
    has_val = (world_dir / "annotations" / f"instances_{val_split}.json").is_file()
    val = load_split(world_dir, val_split) if has_val else None
    load_s = time.time() - t0
    logger.info("loaded %d train / %d val images in %.1fs", len(data.ids),
                len(val.ids) if val else 0, load_s)

    model, processor = build_model(world, cfg, image_size=wcfg.image_size)
    init_info = None
    if init is not None:
        init = Path(init)
        if (init / "checkpoint" / "state.pt").is_file():  # a run folder: its latest state
            saved_init = torch.load(init / "checkpoint" / "state.pt", weights_only=False)
            weights = saved_init["model"]
            init_info = {"from": str(init), "kind": "checkpoint",
                         "stage": saved_init["state"]["stage"], "step": saved_init["state"]["step"],
                         "config": saved_init["config"]}
        elif (init / "model.safetensors").is_file():
            import transformers

            # from_pretrained maps the saved (hub-layout) names back to the module's
            weights = transformers.LlavaForConditionalGeneration.from_pretrained(init).state_dict()
            init_info = {"from": str(init), "kind": "model folder"}
        else:
            raise ValueError(f"init={str(init)!r} holds neither model.safetensors nor "
                             "checkpoint/state.pt; point at a trained model or a run folder")
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or any("lm_head" not in k for k in missing):
            raise ValueError(f"init={str(init)!r} does not fit this model (missing {missing}, "
                             f"unexpected {unexpected}); use the same model sizes")
        if "lm_head.weight" in missing:  # tied or saved under the language model's name
            raise ValueError(f"init={str(init)!r} has no lm_head weights")
    encoder = Encoder(processor, cfg.yes_no_weight)
    ip = processor.image_processor
    mean, std = np.asarray(ip.image_mean), np.asarray(ip.image_std)
    cat_index = {c.name: k for k, c in enumerate(world.categories)}
    head = torch.nn.Linear(cfg.vision_hidden, len(cat_index))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        head.reset_parameters()

    labels = np.zeros((len(data.ids), len(cat_index)), dtype=np.float32)
    for i, lay in enumerate(data.layouts):
        for o in lay.objects:
            labels[i, cat_index[o.category]] = 1.0

    tower_params = list(model.model.vision_tower.parameters())
    tower_ids = {id(p) for p in tower_params}
    other = [p for p in model.parameters() if id(p) not in tower_ids]
    opt1 = torch.optim.AdamW(tower_params + list(head.parameters()), lr=cfg.stage1_lr,
                             weight_decay=cfg.weight_decay)
    groups = [{"params": other, "lr": cfg.lr, "base": cfg.lr}]
    if cfg.tower_lr > 0:
        groups.append({"params": tower_params, "lr": cfg.tower_lr, "base": cfg.tower_lr})
    opt2 = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)

    state = {"stage": 1, "step": 0, "seconds": {"stage1": 0.0, "stage2": 0.0}, "final": {}}
    if (ckpt / "state.pt").is_file():
        saved = torch.load(ckpt / "state.pt", weights_only=False)
        state = saved["state"]
        # Stage-2 settings may change while stage 2 has not begun: the run is then exactly the
        # one a fresh command with the new settings makes (stage 1 does not read them).
        fixed = _STAGE1_FIELDS if (state["stage"], state["step"]) == (2, 0) else None
        if not _same_settings(saved["config"], dataclasses.asdict(cfg), fixed):
            raise ValueError(f"{ckpt} was written with other settings; use a new --out or the "
                             "same settings (a run in stage 2 may only change --steps)")
        if fixed is None and saved["config"]["steps"] != cfg.steps:
            # Lengthening (or shortening) a run in stage 2 changes the cosine schedule from here
            # on; the change is recorded, so the run is reproduced by the same two commands.
            if cfg.steps <= state["step"]:
                raise ValueError(f"--steps {cfg.steps} is not beyond the checkpoint's step "
                                 f"{state['step']}; give more steps")
            state.setdefault("schedule_changes", []).append(
                {"at_step": state["step"], "steps_before": saved["config"]["steps"],
                 "steps_after": cfg.steps})
            logger.warning("stage 2 resumed at step %d with --steps %d (was %d)", state["step"],
                           cfg.steps, saved["config"]["steps"])
        model.load_state_dict(saved["model"])
        head.load_state_dict(saved["head"])
        opt1.load_state_dict(saved["opt1"])
        if state["step"] > 0 or state["stage"] == 1:
            opt2.load_state_dict(saved["opt2"])
        _truncate_log(log_path, state["stage"], state["step"])
        logger.info("resuming at stage %d step %d", state["stage"], state["step"])
    elif log_path.exists():
        log_path.unlink()

    def checkpoint() -> None:
        _save_checkpoint(ckpt, {"config": dataclasses.asdict(cfg), "model": model.state_dict(),
                                "head": head.state_dict(), "opt1": opt1.state_dict(),
                                "opt2": opt2.state_dict(), "state": state})

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.stage1_steps + cfg.steps, desc="train", unit="step")
        bar.update(state["step"] + (cfg.stage1_steps if state["stage"] == 2 else 0))

    model.train()
    # ---- stage 1: the tower alone
    if state["stage"] == 1:
        t_start = time.time() - state["seconds"]["stage1"]
        run = 0.0
        for step in range(state["step"], cfg.stage1_steps):
            rng = np.random.default_rng([cfg.seed, 1, step])
            idx = rng.integers(len(data.ids), size=cfg.stage1_batch)
            x = normalize(data.pixels[idx], mean, std)
            for g in opt1.param_groups:
                g["lr"] = cfg.stage1_lr * _cosine(step, cfg.stage1_steps, min(cfg.warmup, 50))
            with _autocast(cfg):
                logit = head(_image_features(model, x)).amax(dim=1)  # (B, C): max over patches
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logit.float(), torch.from_numpy(labels[idx]))
            opt1.zero_grad(set_to_none=True)
            loss.backward()
            opt1.step()
            run = loss.item() if step == 0 else 0.9 * run + 0.1 * loss.item()
            state["step"] = step + 1
            state["seconds"]["stage1"] = time.time() - t_start
            if bar:
                bar.update(1)
                bar.set_postfix(stage=1, loss=f"{run:.4f}")
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.stage1_steps:
                _log(log_path, {"stage": 1, "step": step + 1, "loss": round(loss.item(), 5),
                                "loss_ema": round(run, 5), "s": round(state["seconds"]["stage1"], 1)})
            if (step + 1) % cfg.checkpoint_every == 0:
                checkpoint()
        if val is not None and cfg.stage1_steps > 0:
            model.eval()
            with torch.no_grad():
                vlab = np.zeros((len(val.ids), len(cat_index)), dtype=np.float32)
                for i, lay in enumerate(val.layouts):
                    for o in lay.objects:
                        vlab[i, cat_index[o.category]] = 1.0
                logit = torch.cat([head(_image_features(model, normalize(val.pixels[s:s + 128],
                                                                         mean, std))).amax(1)
                                   for s in range(0, len(val.ids), 128)])
                acc = float(((logit > 0).float().numpy() == vlab).mean())
            model.train()
            state["final"]["stage1_val_label_accuracy"] = round(acc, 4)
            _log(log_path, {"stage": 1, "step": cfg.stage1_steps, "val_label_accuracy": round(acc, 4)})
            logger.info("stage 1 val per-label accuracy %.4f", acc)
        state["final"]["stage1_loss_ema"] = round(run, 5) if cfg.stage1_steps else None
        state["stage"], state["step"] = 2, 0
        checkpoint()

    # ---- stage 2: projector + language model (+ tower at tower_lr)
    if cfg.tower_lr == 0:
        for p in tower_params:
            p.requires_grad_(False)
    t_start = time.time() - state["seconds"]["stage2"]
    ema: dict[str, float] = state.get("ema", {})
    stopped = False
    for step in range(state["step"], cfg.steps):
        if stop_after is not None and step >= stop_after:
            stopped = True
            break
        rng = np.random.default_rng([cfg.seed, 2, step])
        examples = [draw_example(data, world, cfg, rng, step) for _ in range(cfg.batch)]
        batch = make_batch(encoder, examples, data.pixels, mean, std)
        scale = cfg.lr_scale(step)
        for g in opt2.param_groups:
            g["lr"] = g["base"] * scale
        with _autocast(cfg):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           pixel_values=batch["pixel_values"]).logits
        per_example = weighted_loss(logits, batch["input_ids"], batch["weights"])
        loss = per_example.mean()
        opt2.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt2.step()
        cap = batch["captions"]
        parts = {"loss": loss.item()}
        if cap.any():
            parts["loss_caption"] = per_example[cap].mean().item()
        if (~cap).any():
            parts["loss_qa"] = per_example[~cap].mean().item()
        for k, v in parts.items():
            ema[k] = v if k not in ema else 0.95 * ema[k] + 0.05 * v
        state["step"] = step + 1
        state["ema"] = ema
        state["seconds"]["stage2"] = time.time() - t_start
        if bar:
            bar.update(1)
            bar.set_postfix(stage=2, loss=f"{ema['loss']:.4f}")
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            _log(log_path, {"stage": 2, "step": step + 1, "lr": round(opt2.param_groups[0]["lr"], 7),
                            **{k: round(v, 5) for k, v in ema.items()},
                            "s": round(state["seconds"]["stage2"], 1)})
        if val is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            t_eval = time.time()
            check = validate(model, processor, encoder, val, world, mean, std)
            t_start += time.time() - t_eval  # checks do not count as training time
            _log(log_path, {"stage": 2, "step": step + 1, **check})
            logger.info("step %d: %s", step + 1, check)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == stop_after:
            checkpoint()
        if step + 1 == stop_after:
            stopped = True
            break
    if bar:
        bar.close()
    if stopped:
        logger.info("stopped at stage-2 step %d; the model as of that step is saved, and a rerun "
                    "without --stop-after resumes", state["step"])

    model.eval()
    state["final"].update({f"stage2_{k}_ema": round(v, 5) for k, v in ema.items()})
    model.save_pretrained(out)
    # Load with eager attention by default (see build_model: SDPA is ~5x slower on CPU for this
    # model); from_pretrained(..., attn_implementation=...) still overrides it.
    config_path = out / "config.json"
    config_json = json.loads(config_path.read_text())
    config_json["attn_implementation"] = "eager"
    config_path.write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    processor.save_pretrained(out)
    summary = {
        "config": dataclasses.asdict(cfg),
        "world": {"folder": str(world_dir), "seed": manifest["seed"],
                  "config": manifest["config"], "train_split": train_split,
                  "train_images": len(data.ids), "val_images": len(val.ids) if val else 0},
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": {k: round(v, 1) for k, v in state["seconds"].items()},
        "data_load_seconds": round(load_s, 1),
        "final": state["final"],
        "schedule_changes": state.get("schedule_changes", []),
        "init": init_info,
        "stopped_at_step": state["step"] if stopped else None,
        "versions": versions(("torch", "transformers", "numpy"), python=False),
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    _plot(log_path, out / "loss_curve.png")
    if ckpt.exists() and not stopped:
        import shutil

        shutil.rmtree(ckpt)
    return summary


# ------------------------------------------------------------------------------------ CLI


def cmd_world_train(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name, None) is not None}
    cfg = TrainConfig(**overrides)
    world = args.world
    if world is None:
        from .generate import BUILTIN_SEED, BUILTIN_SPLITS, generate_world

        world = str(Path(args.out) / "world")
        if not (Path(world) / "manifest.json").is_file():
            sizes = {"train": BUILTIN_SPLITS["train"], "val": BUILTIN_SPLITS["val"]}
            print(f"generating the built-in world's train/val splits into {world}")
            generate_world(world, WorldConfig(), BUILTIN_SEED, sizes, progress=not args.quiet)
    random.seed(cfg.seed)
    summary = train(world, args.out, cfg, progress=not args.quiet, stop_after=args.stop_after,
                    init=args.init)
    if summary["stopped_at_step"] is not None:
        print(f"stopped at stage-2 step {summary['stopped_at_step']}: model saved to {args.out}, "
              f"checkpoint kept in {args.out}/checkpoint (rerun without --stop-after to resume)")
        return 0
    print(f"trained in {sum(summary['seconds'].values()) / 60:.1f} min; final {summary['final']}; "
          f"saved to {args.out}")
    return 0


def add_world_subcommands(world_subparsers: Any) -> argparse.ArgumentParser:
    """Register ``veridical world train`` on the ``world`` subparsers."""
    p = world_subparsers.add_parser(
        "train", help="train the built-in tiny LLaVA on a SynthCOCO world",
        description="Train a LlavaForConditionalGeneration on a SynthCOCO world (stage 1: vision "
                    "tower on the objects; stage 2: captions and yes/no questions). Rerunning the "
                    "same command resumes from OUT/checkpoint.")
    p.add_argument("--out", required=True, help="output folder (model, processor, logs)")
    p.add_argument("--world", default=None, help="SynthCOCO world folder with train (and val) "
                   "splits; default: generate the built-in world's train/val into OUT/world")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--init", default=None,
                   help="start from an earlier run's weights: a model folder or a run folder "
                        "with checkpoint/state.pt (use with --stage1-steps 0 to skip stage 1)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this stage-2 step, keeping the checkpoint (a rerun resumes; "
                        "it may change --steps, which is recorded)")
    group = p.add_argument_group(
        "training settings (defaults: the first, unshipped attempt's recipe; the shipped "
        "model's two commands are in veridical/builtin/synthcoco-llava/README.md)")
    for f in dataclasses.fields(TrainConfig):
        kind = ({"action": argparse.BooleanOptionalAction} if isinstance(f.default, bool)
                else {"type": type(f.default)})
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, **kind,
                           help=f"{f.metadata.get('help', '')} (default: {f.default})")
    p.set_defaults(func=cmd_world_train)
    return p
