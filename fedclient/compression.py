"""Update compression: stochastic quantisation and top-k sparsification with error feedback.

A job's plan names a compression spec, e.g. ``"q8"``, ``"q4"``, ``"topk:0.1"`` or
``"topk:0.1,q8"`` (a `CompressionSpec`, which `fedclient.protocol` parses and this
module re-exports). The device encodes its update with `compress`; the server
turns it back into dense float32 tensors with `decompress` before validating and
aggregating it, so strategies never see the wire format.

Wire format (one safetensors body, still no pickle): the update's tensors are
flattened in name order into one vector and sent as

    mask    uint8   top-k only: a bitmap (np.packbits) of the kept entries, deflated
    codes   uint8   quantised values (q4: two per byte), or the raw float32 bytes
    scales  float32 per tensor: (low, step) of its quantisation grid

Quantisation is *stochastic* (rounds up with probability equal to the fraction),
so a quantised value is an unbiased estimate of the true one. Top-k keeps the
entries of largest magnitude; what it drops — and the quantisation error of what
it keeps — goes into the device's **residual**, added to the next update (error
feedback; Seide et al. 2014, Stich et al. 2018), which the device keeps in its
SQLite state.

Secure aggregation: quantisation combines with it (the masked sum is taken over
the decoded fixed-point values). Top-k does not, as is: each device keeps
different coordinates, so the masked vectors no longer line up; it would need a
mask shared by the whole round (e.g. random-k from a round seed).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import numpy as np

from fedclient._exceptions import InvalidRequest
from fedclient.protocol import CompressionSpec, Weights

__all__ = ["CompressionSpec", "compress", "decompress"]


def compress(
    update: Mapping[str, np.ndarray],
    spec: CompressionSpec,
    rng: np.random.Generator,
    residual: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], Weights]:
    """Encode ``update`` (plus the carried ``residual``); return the tensors to send and
    the new residual (what the server will not receive)."""
    names = sorted(update)
    total = {n: update[n].astype(np.float32) + (residual[n] if residual else 0) for n in names}
    flat = np.concatenate([total[n].ravel() for n in names]).astype(np.float32)
    keep = np.ones(flat.size, dtype=bool)
    if spec.topk is not None and spec.topk < 1:
        k = max(1, round(flat.size * spec.topk))
        keep = np.zeros(flat.size, dtype=bool)
        keep[np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :]] = True
    sizes = [total[n].size for n in names]
    bounds = np.cumsum([0, *sizes])
    scales = np.zeros((len(names), 2), dtype=np.float32)
    sent = np.zeros_like(flat)
    codes_parts = []
    for i in range(len(names)):
        segment = flat[bounds[i] : bounds[i + 1]][keep[bounds[i] : bounds[i + 1]]]
        if spec.bits is None:
            values = segment
            codes_parts.append(values.view(np.uint8))
        else:
            codes, low, step = _quantise(segment, spec.bits, rng)
            scales[i] = (low, step)
            values = (low + codes.astype(np.float32) * step).astype(np.float32)
            codes_parts.append(codes)
        sent[bounds[i] : bounds[i + 1]][keep[bounds[i] : bounds[i + 1]]] = values
    codes_all = np.concatenate(codes_parts) if codes_parts else np.zeros(0, np.uint8)
    if spec.bits == 4:
        codes_all = _pack4(codes_all)
    tensors: dict[str, np.ndarray] = {"codes": codes_all.astype(np.uint8), "scales": scales}
    if spec.topk is not None and spec.topk < 1:
        # A 10% bitmap is far from random bytes: deflate takes a quarter off it.
        packed = zlib.compress(np.packbits(keep).tobytes(), 9)
        tensors["mask"] = np.frombuffer(packed, dtype=np.uint8)
    leftover = flat - sent
    new_residual = {
        n: leftover[bounds[i] : bounds[i + 1]].reshape(total[n].shape) for i, n in enumerate(names)
    }
    return tensors, new_residual


def decompress(
    tensors: Mapping[str, np.ndarray], spec: CompressionSpec, reference: Mapping[str, np.ndarray]
) -> Weights:
    """Dense float32 tensors shaped like ``reference`` from a compressed body."""
    names = sorted(reference)
    sizes = [int(np.prod(reference[n].shape)) for n in names]
    total = sum(sizes)
    expected = {"codes", "scales"} | ({"mask"} if spec.topk and spec.topk < 1 else set())
    if set(tensors) != expected:
        raise InvalidRequest(
            f"a {spec} update needs tensors {sorted(expected)}, got {sorted(tensors)}"
        )
    codes, scales = tensors["codes"], tensors["scales"]
    if codes.dtype != np.uint8 or scales.dtype != np.float32 or scales.shape != (len(names), 2):
        raise InvalidRequest("compressed update has codes or scales of the wrong type or shape")
    if "mask" in tensors:
        bitmap = (total + 7) // 8
        try:  # bounded: a hostile body cannot inflate past the bitmap's size
            inflater = zlib.decompressobj()
            raw = inflater.decompress(tensors["mask"].tobytes(), bitmap + 1)
        except zlib.error as exc:
            raise InvalidRequest(f"compressed update has an unreadable mask: {exc}") from exc
        if tensors["mask"].dtype != np.uint8 or len(raw) != bitmap or not inflater.eof:
            raise InvalidRequest("compressed update has a mask of the wrong size")
        keep = np.unpackbits(np.frombuffer(raw, dtype=np.uint8))[:total].astype(bool)
    else:
        keep = np.ones(total, dtype=bool)
    kept = int(keep.sum())
    if spec.bits is None:
        if codes.size != kept * 4:
            raise InvalidRequest(f"expected {kept} float32 values, got {codes.size} bytes")
        values = codes.view(np.float32)
    else:
        if spec.bits == 4:
            if codes.size != (kept + 1) // 2:
                raise InvalidRequest(f"expected {kept} 4-bit codes, got {codes.size} bytes")
            codes = _unpack4(codes, kept)
        elif codes.size != kept:
            raise InvalidRequest(f"expected {kept} 8-bit codes, got {codes.size}")
        lows = np.repeat(scales[:, 0], [int(keep[a:b].sum()) for a, b in _spans(sizes)])
        steps = np.repeat(scales[:, 1], [int(keep[a:b].sum()) for a, b in _spans(sizes)])
        values = (lows + codes.astype(np.float32) * steps).astype(np.float32)
    if not np.isfinite(values).all() or not np.isfinite(scales).all():
        raise InvalidRequest("compressed update contains NaN or Inf")
    flat = np.zeros(total, dtype=np.float32)
    flat[keep] = values
    return {
        n: flat[a:b].reshape(reference[n].shape).astype(reference[n].dtype)
        for n, (a, b) in zip(names, _spans(sizes), strict=True)
    }


def _spans(sizes: list[int]) -> list[tuple[int, int]]:
    ends = np.cumsum(sizes)
    return [(int(e - s), int(e)) for s, e in zip(sizes, ends, strict=True)]


def _quantise(
    values: np.ndarray, bits: int, rng: np.random.Generator
) -> tuple[np.ndarray, float, float]:
    """Stochastic rounding onto a uniform grid of 2**bits levels spanning the values."""
    if values.size == 0:
        return np.zeros(0, np.uint8), 0.0, 0.0
    low, high = float(values.min()), float(values.max())
    levels = (1 << bits) - 1
    step = (high - low) / levels if high > low else 0.0
    if step == 0.0:
        return np.zeros(values.size, np.uint8), low, 0.0
    position = (values - low) / step
    codes = np.floor(position + rng.random(values.size, dtype=np.float32))
    return np.clip(codes, 0, levels).astype(np.uint8), low, np.float32(step).item()


def _pack4(codes: np.ndarray) -> np.ndarray:
    if codes.size % 2:
        codes = np.append(codes, np.uint8(0))
    packed: np.ndarray = (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)
    return packed


def _unpack4(packed: np.ndarray, count: int) -> np.ndarray:
    out = np.empty(packed.size * 2, dtype=np.uint8)
    out[0::2] = packed & 0x0F
    out[1::2] = packed >> 4
    return out[:count]
