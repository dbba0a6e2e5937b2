"""One copy of a bundle's weights: the ONNX files read theirs from one file as external data.

A bundle holds up to four graphs with weights in them (ONNX Runtime's checkpoint,
``inference.onnx``, ``forward.onnx`` and ``step.onnx``, whose constants include a
frozen backbone): written as they come, a 6.1 MB MobileNetV3-small made a 19.2 MB
bundle, 22.2 MB with its backbone frozen. `share_weights` stores every float
tensor of 1 KB or more once: the ONNX files point at its bytes by offset and
length (ONNX external data) in one file, the weights file:

* the training API's ``checkpoint`` where the bundle has one. ONNX Runtime writes
  each parameter there as its raw little-endian bytes, trainable and frozen alike,
  so each ONNX tensor points at the same bytes inside it (any place holding the
  same bytes is the same tensor);
* else ``weights.bin``, the tensors one after another.

ONNX Runtime and ``onnx.load`` read external data relative to the model's folder,
so the bundle stays a folder that moves as a whole. Every file is in the manifest
with its sha256, the weights file too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["MIN_SHARED_BYTES", "WEIGHTS_FILE", "share_weights"]

#: The file that holds the weights of a bundle without the training API's checkpoint.
WEIGHTS_FILE = "weights.bin"
#: Smaller tensors (scalars, shapes, small biases) stay inside their graphs.
MIN_SHARED_BYTES = 64


def _raw(tensor: object) -> bytes:
    from onnx import numpy_helper

    value = numpy_helper.to_array(tensor)  # type: ignore[arg-type]
    return np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<")).tobytes()


def share_weights(graphs: Sequence[Path], store: Path) -> None:
    """Point every float tensor of at least `MIN_SHARED_BYTES` in ``graphs`` (ONNX files,
    rewritten in place) at its bytes in ``store``; ``store`` is written first (the
    tensors, each distinct one once) if it does not exist."""
    import onnx

    models = {path: onnx.load(str(path)) for path in graphs if path.is_file()}
    shared = [
        (path, tensor)
        for path, model in models.items()
        for tensor in model.graph.initializer
        if tensor.data_type == onnx.TensorProto.FLOAT
        and int(np.prod(tensor.dims, dtype=np.int64)) * 4 >= MIN_SHARED_BYTES
    ]
    if not store.is_file():
        seen: dict[bytes, None] = {}
        for _, tensor in shared:
            seen.setdefault(_raw(tensor), None)
        store.write_bytes(b"".join(seen))
    blob = store.read_bytes()
    found: dict[bytes, int] = {}
    changed = set()
    for path, tensor in shared:
        raw = _raw(tensor)
        offset = found.get(raw)
        if offset is None:
            offset = found[raw] = blob.find(raw)
        if offset < 0:
            continue  # not in the checkpoint (ONNX Runtime stored it otherwise): keep it inline
        tensor.ClearField("raw_data")
        tensor.ClearField("float_data")
        del tensor.external_data[:]
        for key, value in (("location", store.name), ("offset", offset), ("length", len(raw))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        changed.add(path)
    for path in changed:
        # Saved as they are: the external references set above, nothing written beside them.
        path.write_bytes(models[path].SerializeToString())
