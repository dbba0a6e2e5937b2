"""Named tensors on the wire: safetensors bodies (a JSON header, then raw data; never pickle)."""

from __future__ import annotations

from collections.abc import Mapping

import msgspec
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

from fedclient._exceptions import InvalidRequest

__all__ = [
    "EXTRA_PREFIX",
    "Weights",
    "check_weights",
    "decode_tensors",
    "encode_tensors",
    "split_extras",
    "with_extras",
]

#: A model's parameters (or an update to them), by parameter name.
Weights = dict[str, np.ndarray]

#: An update's tensors beyond the model's delta (a client trainer's, e.g. SCAFFOLD's
#: control variates) travel in the same body under names with this prefix.
EXTRA_PREFIX = "extra/"


def split_extras(tensors: Mapping[str, np.ndarray]) -> tuple[Weights, Weights]:
    """An update's tensors as (the delta, the extras without their prefix)."""
    delta, extras = {}, {}
    for name, value in tensors.items():
        if name.startswith(EXTRA_PREFIX):
            extras[name[len(EXTRA_PREFIX) :]] = value
        else:
            delta[name] = value
    return delta, extras


def with_extras(delta: Mapping[str, np.ndarray], extras: Mapping[str, np.ndarray]) -> Weights:
    """The tensors of an update body: the delta, and the extras under `EXTRA_PREFIX`."""
    return {**delta, **{EXTRA_PREFIX + name: value for name, value in extras.items()}}


class _Header(msgspec.Struct):
    """Of a safetensors header, what safetensors.numpy.load does not return (the
    tensors' entries are skipped, not built into dicts)."""

    metadata: dict[str, str] | None = msgspec.field(default=None, name="__metadata__")


_METADATA = msgspec.json.Decoder(_Header)


def encode_tensors(
    tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> bytes:
    """Serialise named arrays (and string metadata) to a safetensors body."""
    arrays = {name: np.ascontiguousarray(value) for name, value in tensors.items()}
    return bytes(save(arrays, metadata=dict(metadata) if metadata else None))


def decode_tensors(body: bytes) -> tuple[Weights, dict[str, str]]:
    """Parse a safetensors body (tensors sorted by name); malformed input raises
    `InvalidRequest`."""
    if len(body) < 8:
        raise InvalidRequest("tensor body is truncated")
    try:
        arrays = load(body)
        header_len = int.from_bytes(body[:8], "little")
        header = _METADATA.decode(body[8 : 8 + header_len])
    except (SafetensorError, ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"tensor body is not valid safetensors: {exc}") from exc
    # safetensors hands tensors back in a per-process random order (a Rust HashMap); sort
    # them, so anything that walks a model in order (noise draws, sums) is reproducible.
    return {name: arrays[name] for name in sorted(arrays)}, header.metadata or {}


def check_weights(tensors: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> None:
    """Require exactly the reference's names, shapes and dtypes, and only finite values."""
    missing = sorted(set(reference) - set(tensors))
    extra = sorted(set(tensors) - set(reference))
    if missing or extra:
        raise InvalidRequest(
            f"tensor names do not match the model: missing {missing}, unexpected {extra}"
        )
    for name, ref in reference.items():
        got = tensors[name]
        if got.shape != ref.shape:
            raise InvalidRequest(
                f"tensor {name!r} has shape {list(got.shape)}, expected {list(ref.shape)}"
            )
        if got.dtype != ref.dtype:
            raise InvalidRequest(f"tensor {name!r} has dtype {got.dtype}, expected {ref.dtype}")
        if not np.isfinite(got).all():
            raise InvalidRequest(f"tensor {name!r} contains NaN or Inf")
