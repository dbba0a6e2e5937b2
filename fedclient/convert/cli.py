"""``fedconvert``: turn a model into a device bundle, verify it, and print a summary.

    fedconvert mlp --inputs 64 --hidden 64 --classes 10 -o bundles/mlp
    fedconvert cnn --side 28 -o bundles/cnn
    fedconvert model.onnx -o bundles/model
    fedconvert mypkg.models:Net --input-shape 1,28,28 -o bundles/net     (needs torch)
    fedconvert chars:Net --input-shape 80 --input-dtype int64      (token ids into an embedding)
    fedconvert cnn:Net --input-shape 1,28,28 --batchnorm batch   (BatchNorm from scratch)
    fedconvert mlp --hidden 32 --tflite -o bundles/mlp    (+ model.tflite; needs TensorFlow)
    fedconvert model.keras --tflite -o bundles/net       (model.tflite only; needs TensorFlow)

A bundle holds ONNX Runtime training artifacts (checkpoint, training, eval and
optimizer models), a step graph in standard ONNX ops with its forward graph (for
devices with plain onnxruntime: aarch64, Python 3.13, mobile builds), an
inference model and ``manifest.json`` (parameter names, shapes and dtypes, the
input spec, ops, file sizes and sha256 checksums). Verification runs one
inference and one training step through ONNX Runtime (each engine the bundle
holds) and compares them with the source model (numpy reference, PyTorch, or
onnx's reference evaluator). Exit status: 0 verified, 1 verification failed,
2 the model cannot be converted.

``--tflite`` also writes ``model.tflite`` (built-in mlp and softmax only) with
``train``, ``infer``, ``get_weights`` and ``set_weights`` signatures and its
manifest ``model.tflite.json``, and verifies it through LiteRT. It needs
TensorFlow at conversion time only, in its own venv (see fedclient/convert/make_tflite_models.py).
A Keras model (``.keras``, ``.h5``; Sequential or functional) becomes ``model.tflite``
alone, verified against TensorFlow's own step (see fedclient/convert/_keras.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedclient._exceptions import FedError, InvalidInput

if TYPE_CHECKING:
    from fedclient.convert._convert import Source

__all__ = ["main"]


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from exc


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedconvert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "source",
        help="mlp | softmax | cnn | FILE.onnx | module:Class | file.py:Class | "
        "FILE.keras | FILE.h5 (Keras: with --tflite)",
    )
    parser.add_argument("-o", "--out", help="bundle directory (default: bundles/NAME)")
    model = parser.add_argument_group("built-in models")
    model.add_argument("--inputs", type=int, help="features per example (mlp/softmax; default 64)")
    model.add_argument(
        "--hidden", type=_ints, help="hidden sizes, e.g. 64 or 64,32 (cnn: its two channel counts)"
    )
    model.add_argument("--classes", type=int, default=10)
    model.add_argument(
        "--side", type=int, help="cnn: image side in pixels (28 for MNIST, 8 for digits)"
    )
    model.add_argument(
        "--seed", type=int, default=0, help="initial weights (same as the numpy backend's)"
    )
    other = parser.add_argument_group("ONNX and PyTorch models")
    other.add_argument(
        "--input-shape", type=_ints, default=[], help="PyTorch: one example's shape, e.g. 1,28,28"
    )
    other.add_argument(
        "--input-dtype",
        choices=("float32", "int64"),
        default="float32",
        help="PyTorch: float32 features, or int64 token ids (a model that starts with an "
        "embedding)",
    )
    other.add_argument(
        "--freeze",
        action="append",
        default=[],
        metavar="NAME",
        help="do not train this initialiser, or those under a module prefix ending in '.' "
        "(--freeze features. : transfer learning, the backbone frozen, only the head trains "
        "and travels)",
    )
    other.add_argument(
        "--batchnorm",
        choices=("frozen", "batch"),
        default="frozen",
        help="PyTorch: how BatchNorm trains on the device: 'frozen' on its running statistics "
        "(fine-tuning a pre-trained model), or 'batch' on batch statistics with the running "
        "ones updated on the device and sent with the weights (training from scratch)",
    )
    lite = parser.add_argument_group("TFLite (needs TensorFlow)")
    lite.add_argument(
        "--tflite",
        action="store_true",
        help="also write model.tflite with training signatures (built-in mlp/softmax); "
        "a Keras model: only model.tflite",
    )
    lite.add_argument(
        "--train-batch",
        type=int,
        help="the TFLite model's fixed training batch (default 16; smaller minibatches are "
        "padded, larger ones accumulated)",
    )
    check = parser.add_argument_group("verification")
    check.add_argument(
        "--tolerance",
        type=float,
        default=1e-5,
        help="of |diff|/(1+|ref|): absolute below 1, relative above (default 1e-5)",
    )
    check.add_argument(
        "--learning-rate", type=float, default=0.1, help="of the verified training step"
    )
    check.add_argument("--no-verify", action="store_true", help="write the bundle only")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedconvert`` command."""
    args = _parser().parse_args(argv)
    if args.source.lower().endswith((".keras", ".h5", ".hdf5")):
        return _convert_keras(args)
    try:
        from fedclient.convert._convert import convert, resolve
        from fedclient.convert._report import render, summary
        from fedclient.convert._verify import verify_bundle
        from fedclient.runtime._bundle import BundleWarning
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        print(
            f"fedconvert needs the convert extra: pip install 'fedclient[convert]' ({exc})",
            file=sys.stderr,
        )
        return 2
    started = time.perf_counter()
    try:
        source = resolve(
            args.source,
            inputs=args.inputs,
            hidden=args.hidden,
            classes=args.classes,
            side=args.side,
            seed=args.seed,
            input_shape=args.input_shape,
            input_dtype=args.input_dtype,
            frozen=args.freeze,
            batchnorm=args.batchnorm,
        )
        out = Path(args.out or Path("bundles") / source.name)
        if args.tflite:
            _check_tflite_source(source)  # fail before the ONNX conversion, not after it
            started = time.perf_counter()  # the bundle's time, without TensorFlow's import
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", BundleWarning)
            manifest = convert(source, out)
        for note in caught:
            print(f"fedconvert: note: {note.message}", file=sys.stderr)
        verification = None
        if not args.no_verify:
            verification = verify_bundle(
                out, source.reference, tolerance=args.tolerance, learning_rate=args.learning_rate
            )
        seconds = time.perf_counter() - started
        lite = None
        if args.tflite and source.model_spec is not None:
            from fedclient.convert._tflite import convert_and_verify

            lite = convert_and_verify(
                source.model_spec, out / "model.tflite", seed=args.seed, **_tflite_options(args)
            )
    except FedError as exc:  # InvalidInput (exit 2) for models that cannot be converted
        print(f"fedconvert: {exc}", file=sys.stderr)
        return exc.exit_code
    results = [verification] + ([lite.verification] if lite is not None else [])
    if args.json:
        data = summary(out, manifest, verification, seconds)
        if lite is not None:
            from fedclient.convert._tflite import tflite_summary

            data["tflite"] = tflite_summary(lite)
        print(json.dumps(data, indent=2))
    else:
        print(render(out, manifest, verification, seconds))
        if lite is not None:
            from fedclient.convert._tflite import render_tflite

            print("\n" + render_tflite(lite))
    return 0 if all(v is None or v.passed for v in results) else 1


def _convert_keras(args: argparse.Namespace) -> int:
    """``fedconvert model.keras --tflite``: a Keras model becomes ``model.tflite`` alone."""
    from fedclient.convert._tflite import render_tflite, tflite_summary

    out = Path(args.out or Path("bundles") / Path(args.source).stem)
    try:
        _check_tflite_source(args.source, tflite=args.tflite, frozen=args.freeze)
        from fedclient.convert._keras import keras_convert_and_verify

        lite = keras_convert_and_verify(args.source, out / "model.tflite", **_tflite_options(args))
    except FedError as exc:  # InvalidInput (exit 2) for models that cannot be converted
        print(f"fedconvert: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        print(json.dumps({"tflite": tflite_summary(lite)}, indent=2))
    else:
        print(render_tflite(lite))
    return 0 if lite.verification is None or lite.verification.passed else 1


def _tflite_options(args: argparse.Namespace) -> dict[str, Any]:
    """The TFLite conversion's settings from the command line (built-in and Keras alike)."""
    from fedclient.convert._tflite import TRAIN_BATCH

    return {
        "train_batch": args.train_batch or TRAIN_BATCH,
        "verify": not args.no_verify,
        "tolerance": args.tolerance,
        "learning_rate": args.learning_rate,
    }


def _check_tflite_source(
    source: Source | str, *, tflite: bool = True, frozen: list[str] | None = None
) -> None:
    """Fail before any conversion when the TFLite one cannot follow: ``source`` is a built-in
    mlp or softmax model, or the path of a Keras model (which converts to TFLite only)."""
    from fedclient.convert._tflite import tensorflow

    if isinstance(source, str):
        if not tflite:
            raise InvalidInput(
                f"{source} is a Keras model, which converts to TFLite only: add --tflite "
                "(ONNX Runtime bundles come from .onnx files and PyTorch modules)"
            )
        if frozen:
            raise InvalidInput(
                "--freeze does not apply to Keras models: set layer.trainable = False before "
                "saving (frozen layers stay constants on the device)"
            )
        if not Path(source).is_file():
            raise InvalidInput(f"no such file: {source}")
    elif source.model_spec is None or source.model_spec.kind not in ("mlp", "softmax"):
        raise InvalidInput(
            "--tflite converts the built-in mlp and softmax models and Keras models "
            f"(.keras, .h5) only, not {source.name!r}"
        )
    tensorflow()  # InvalidInput with how to install it


if __name__ == "__main__":
    raise SystemExit(main())
