"""Fused CPU loops (numba) for VAR's per-layer work at decode steps.

At a decode step of a small model on a CPU, VAR's sink flags and its rule are a few dozen tiny
tensor operations per layer, and their dispatch costs more than the arithmetic. These functions
do the same work in one compiled loop each. They agree with the torch route
(:func:`veridical.decoding.methods.var.var_reweight` and ``heads.scores.rms_abs``) up to float
rounding: sums are accumulated in float64, so a flag or a head's selection can differ only where
its value lies within rounding of the threshold.

- ``veridical.kernels.route(t, impl) == "cpu"`` says whether a tensor takes this route: the
  dispatch is ``"auto"``, numba is installed, the tensor is a float32 CPU tensor. Otherwise
  callers take the torch route (GPUs have the Triton kernel).
- :func:`sink_flags_` writes ``|h / rms(h)| > threshold`` on any of ``dims`` into one layer's
  column of a (R, T, L) bool tensor, for hidden states (R, T, D).
- :func:`var_decode` applies VAR's rule to the weights (n, H, 1, kv) of one query row per row,
  reading the sink flags of layer ``layer`` straight from the cached (R, kv_past, L) and this
  forward's (R, T, L) flags (no concatenation); :func:`decode_keys` takes the numpy views of
  those key tensors once per forward, for every layer's call. Its sink share adds
  ``reference.VAR_EPS`` per image key, as every route does.

numba is imported and the loops compiled on first use (under a second each; numba caches the
machine code on disk, next to this file).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import NamedTuple

import numpy as np
import torch

from .reference import VAR_EPS

# optional: without numba the torch route does the same work; imported on first use only
NUMBA_AVAILABLE = importlib.util.find_spec("numba") is not None
_NO_PAST = np.zeros((1, 0, 1), dtype=np.bool_)


@functools.cache
def _compiled(name: str):
    import numba

    return numba.njit(cache=True, nogil=True)(globals()[name])


def _sink_flags(hidden, dims, threshold, eps, out, layer):
    R, T, D = hidden.shape
    for r in range(R):
        for t in range(T):
            squares = 0.0
            for d in range(D):
                squares += float(hidden[r, t, d]) ** 2
            inv = 1.0 / np.sqrt(squares / D + eps)
            flag = False
            for d in dims:
                if abs(float(hidden[r, t, d])) * inv > threshold:
                    flag = True
            out[r, t, layer] = flag


def _var_decode(probs, image, past, fresh, layer, rows, p, rho, summ, eps, out):
    n, H, kv = probs.shape
    n_past = past.shape[1]
    for i in range(n):
        r = rows[i]
        sink = np.empty(kv, dtype=np.bool_)
        any_image_sink = False
        n_image = 0
        for k in range(kv):
            sink[k] = past[r, k, layer] if k < n_past else fresh[r, k - n_past, layer]
            any_image_sink = any_image_sink or (sink[k] and image[r, k])
            if image[r, k]:
                n_image += 1
        for h in range(H):
            total_image = sink_image = sink_mass = target_mass = 0.0
            for k in range(kv):
                w = float(probs[i, h, k])
                out[i, h, k] = probs[i, h, k]
                if sink[k]:
                    sink_mass += w
                    if image[r, k]:
                        sink_image += w
                        total_image += w
                elif image[r, k]:
                    total_image += w
                    target_mass += w
            changed = (any_image_sink and sink_image / (total_image + eps * n_image) <= rho
                       and total_image >= summ and target_mass > 0 and p != 1.0)
            if changed:  # sinks keep p; the removed mass goes to the non-sink image keys
                grow = 1.0 + (1.0 - p) * sink_mass / target_mass
                for k in range(kv):
                    if sink[k]:
                        out[i, h, k] = probs[i, h, k] * p
                    elif image[r, k]:
                        out[i, h, k] = probs[i, h, k] * grow


def sink_flags_(hidden: torch.Tensor, dims: np.ndarray, threshold: float, eps: float,
                out: torch.Tensor, layer: int) -> None:
    """``out[:, :, layer] = (|h / sqrt(mean(h^2) + eps)|[..., dims] > threshold).any(-1)`` for
    ``hidden`` (R, T, D) float32 and ``out`` (R, T, L) bool, both on the CPU."""
    _compiled("_sink_flags")(hidden.detach().numpy(), dims, float(threshold), float(eps),
                             out.numpy(), layer)


class DecodeKeys(NamedTuple):
    """What :func:`var_decode` reads of a forward's keys, as numpy views of the tensors (built
    once per forward by :func:`decode_keys`; the hooks fill ``fresh`` in place)."""

    image: np.ndarray
    past: np.ndarray
    fresh: np.ndarray
    rows: np.ndarray


def decode_keys(image: torch.Tensor, past: torch.Tensor | None, fresh: torch.Tensor,
                rows: torch.Tensor) -> DecodeKeys:
    """``image`` (R, kv) bool image keys; sink flags ``past`` (R, kv - T, L) (None: no cache)
    and ``fresh`` (R, T, L) bool; ``rows`` (n,) the batch rows of the weights to edit."""
    return DecodeKeys(image.numpy(), _NO_PAST if past is None else past.numpy(), fresh.numpy(),
                      rows.numpy())


def var_decode(probs: torch.Tensor, keys: DecodeKeys, layer: int, p: float, rho: float,
               summ: float) -> torch.Tensor:
    """VAR's rule on ``probs`` (n, H, 1, kv) float32, the weights of rows ``keys.rows`` of the
    batch, with the sink flags of layer ``layer``. Returns new weights (n, H, 1, kv)."""
    n, H, q, kv = probs.shape
    if q != 1:
        raise ValueError(f"var_decode takes one query row, got {q}")
    probs = probs.contiguous()
    out = torch.empty_like(probs)
    _compiled("_var_decode")(probs.view(n, H, kv).numpy(), keys.image, keys.past, keys.fresh,
                             layer, keys.rows, float(p), float(rho), float(summ), VAR_EPS,
                             out.view(n, H, kv).numpy())
    return out
