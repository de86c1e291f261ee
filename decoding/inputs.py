"""Model inputs for one request row, and left-padded collation of rows into a batch.

``encode`` applies the processor's chat template to one user turn (an optional image, then the
text) and returns the processor's tensors for that single row, batch dimension 1. ``collate``
joins rows: sequence tensors (``input_ids``, ``attention_mask``, token-type ids) are padded on the
LEFT so every row's last prompt token sits in the last column; image tensors are concatenated along
their first dimension (rows without an image contribute nothing), with smaller trailing dimensions
zero-padded (LLaVA-NeXT's variable patch count). Encoding rows one at a time and collating gives
exactly the tensors the processor itself makes for a padded batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def chat_text(processor: Any, image: Any, prompt: str, system: str | None = None) -> str:
    """The chat-templated text of one user turn (an image placeholder first when ``image`` is
    given), after an optional system message; ``processor`` may be a bare tokenizer."""
    if hasattr(processor, "image_processor"):
        content = [{"type": "image"}] if image is not None else []
        content.append({"type": "text", "text": prompt})
        messages = [{"role": "user", "content": content}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if getattr(processor, "chat_template", None):  # a text-only model: the tokenizer
        messages = [{"role": "user", "content": prompt}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return prompt if system is None else f"{system} {prompt}"


def encode(processor: Any, image: Any, prompt: str,
           system: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors for one chat-templated user turn (after an optional system message);
    ``processor`` may be a bare tokenizer."""
    text = chat_text(processor, image, prompt, system)
    if hasattr(processor, "image_processor"):
        images = [image] if image is not None else None
        out = processor(text=[text], images=images, return_tensors="pt")
    else:
        out = processor(text, return_tensors="pt")
        if "attention_mask" not in out:
            out["attention_mask"] = torch.ones_like(out["input_ids"])
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def collate(rows: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Join single-row tensors into one left-padded batch (see the module docstring)."""
    width = max(row["input_ids"].shape[-1] for row in rows)
    keys = sorted({k for row in rows for k in row})
    batch: dict[str, torch.Tensor] = {}
    for key in keys:
        present = [row[key] for row in rows if key in row]
        if key in SEQUENCE_KEYS:
            if len(present) != len(rows):
                raise ValueError(f"input {key!r} is missing from some rows")
            fill = pad_id if key == "input_ids" else 0
            batch[key] = torch.cat([F.pad(t, (width - t.shape[-1], 0), value=fill) for t in present])
        else:
            batch[key] = _concat_padded(present)
    return batch


def _concat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for t in tensors:
        pad: list[int] = []
        for d in reversed(range(1, t.dim())):
            pad += [0, shape[d - 1] - t.shape[d]]
        padded.append(F.pad(t, pad) if any(pad) else t)
    return torch.cat(padded)
