"""Regenerate the TFLite models shipped in ``fedclient/runtime/models/`` (needs TensorFlow).

CI and devices cannot afford TensorFlow (1.6 GB), so the converted built-in models are
committed; this script rebuilds them, and converts others on demand. Run it from the
repository root with a TensorFlow venv of its own::

    python -m venv /tmp/tfvenv
    /tmp/tfvenv/bin/pip install tensorflow-cpu==2.21.0 ai-edge-litert \\
        numpy msgspec httpx cryptography sqlite-utils safetensors
    PYTHONPATH=. /tmp/tfvenv/bin/python fedclient/convert/make_tflite_models.py  # the shipped set
    PYTHONPATH=. /tmp/tfvenv/bin/python fedclient/convert/make_tflite_models.py \\
        --out ~/.cache/fedclient/tflite mlp-784-200-62                          # any mlp/softmax

Every model is verified through LiteRT against the numpy reference after conversion;
the exit status is 1 when one fails. The models start from the numpy reference's
weights for seed 0 (``create_backend(spec, "tflite", seed=s)`` sets seed ``s``'s).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgspec

from fedclient._exceptions import FedError, InvalidInput
from fedclient.protocol import ModelSpec
from fedclient.runtime._tflite import MODELS_DIR, model_filename

__all__ = ["SHIPPED", "main", "parse_model"]

#: The models fedclient ships: digits MLPs (the simulator's default, the tests'), and
#: softmax regression on digits.
SHIPPED = ("mlp-64-64-10", "mlp-64-32-10", "mlp-64-16-10", "softmax-64-10")


def parse_model(text: str) -> ModelSpec:
    """``mlp-64-32-10`` (inputs, hidden..., classes) or ``softmax-64-10`` as a `ModelSpec`."""
    kind, _, sizes = text.removesuffix(".tflite").partition("-")
    problem = f"expected e.g. mlp-64-32-10 or softmax-64-10, got {text!r}"
    try:
        dims = [int(d) for d in sizes.split("-")]
    except ValueError as exc:
        raise InvalidInput(problem) from exc
    if kind not in ("mlp", "softmax") or len(dims) < 2 or (kind == "softmax") != (len(dims) == 2):
        raise InvalidInput(problem)
    try:  # msgspec checks the spec's constraints when converting
        return msgspec.convert(
            {"kind": kind, "inputs": dims[0], "hidden": dims[1:-1], "classes": dims[-1]},
            ModelSpec,
        )
    except msgspec.ValidationError as exc:
        raise InvalidInput(f"{problem}: {exc}") from exc


def main(argv: list[str] | None = None) -> int:
    """Convert and verify each model; print one summary per model."""
    from fedclient.convert._tflite import TRAIN_BATCH, convert_and_verify, render_tflite

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=list(SHIPPED), help="default: the shipped set")
    parser.add_argument("--out", type=Path, default=MODELS_DIR, help=f"default {MODELS_DIR}")
    parser.add_argument("--train-batch", type=int, default=TRAIN_BATCH)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    failed = 0
    try:
        for text in args.models:
            spec = parse_model(text)
            conversion = convert_and_verify(
                spec, args.out / model_filename(spec), seed=args.seed, train_batch=args.train_batch
            )
            print(render_tflite(conversion), end="\n\n")
            failed += conversion.verification is not None and not conversion.verification.passed
    except FedError as exc:
        print(f"make_tflite_models: {exc}", file=sys.stderr)
        return exc.exit_code
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
