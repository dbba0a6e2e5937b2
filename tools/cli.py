"""``fedconvert``: turn a model into a device bundle, verify it, and print a summary.

    fedconvert mlp --inputs 64 --hidden 64 --classes 10 -o bundles/mlp
    fedconvert cnn --side 28 -o bundles/cnn
    fedconvert model.onnx -o bundles/model
    fedconvert mypkg.models:Net --input-shape 1,28,28 -o bundles/net     (needs torch)

A bundle holds ONNX Runtime training artifacts (checkpoint, training, eval and
optimizer models), an inference model and ``manifest.json`` (parameter names,
shapes and dtypes, the input spec, ops, file sizes and sha256 checksums).
Verification runs one inference and one training step through ONNX Runtime and
compares them with the source model (numpy reference, PyTorch, or onnx's
reference evaluator). Exit status: 0 verified, 1 verification failed,
2 the model cannot be converted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fedclient._exceptions import FedError

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
        "source", help="mlp | softmax | cnn | FILE.onnx | module:Class | file.py:Class"
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
        "--freeze",
        action="append",
        default=[],
        metavar="NAME",
        help="do not train this initialiser",
    )
    check = parser.add_argument_group("verification")
    check.add_argument(
        "--tolerance", type=float, default=1e-5, help="absolute tolerance (default 1e-5)"
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
    try:
        from tools._convert import convert, resolve
        from tools._report import render, summary
        from tools._verify import verify_bundle
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
            frozen=args.freeze,
        )
        out = Path(args.out or Path("bundles") / source.name)
        manifest = convert(source, out)
        verification = None
        if not args.no_verify:
            verification = verify_bundle(
                out, source.reference, tolerance=args.tolerance, learning_rate=args.learning_rate
            )
    except FedError as exc:  # InvalidInput (exit 2) for models that cannot be converted
        print(f"fedconvert: {exc}", file=sys.stderr)
        return exc.exit_code
    seconds = time.perf_counter() - started
    if args.json:
        print(json.dumps(summary(out, manifest, verification, seconds), indent=2))
    else:
        print(render(out, manifest, verification, seconds))
    return 0 if verification is None or verification.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
