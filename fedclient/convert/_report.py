"""The summary ``fedconvert`` prints: parameters, files, ops, and the verification table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fedclient.convert._verify import Verification
from fedclient.runtime import BundleManifest
from fedclient.runtime._bundle import BUNDLE_FILES

__all__ = ["render", "summary", "verification_data", "verification_lines"]


#: How the summary names each engine a bundle holds files for.
ENGINE_NAMES = {
    "training": "with ONNX Runtime's training API (onnxruntime-training)",
    "plain": "with its step graph (any onnxruntime build)",
}


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024 or unit == "MB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


def _table(header: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = indent + "  ".join("-" * w for w in widths)

    def fmt(row: list[str]) -> str:
        return indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()

    return [fmt(header), line, *(fmt(r) for r in rows)]


def verification_lines(verification: Verification) -> list[str]:
    """The table of a verification's checks, and a blank line after it."""
    rows = [
        [
            c.name,
            c.detail,
            c.measure,
            f"{c.error:.2e}" if c.error else "0",
            f"{c.tolerance:.0e}" if c.tolerance else "0",
            "ok" if c.passed else "FAILED",
        ]
        for c in verification.checks
    ]
    header = f"verification: {verification.runtime} vs {verification.reference}"
    return [header, *_table(["check", "what", "measure", "error", "tolerance", "result"], rows), ""]


def _shape(dims: list[int | None]) -> str:
    return "x".join("N" if d is None else str(d) for d in dims) or "scalar"


def render(
    out: Path, manifest: BundleManifest, verification: Verification | None, seconds: float
) -> str:
    """The human-readable summary."""
    lines = [f"fedconvert: {manifest.source} -> {out}/", ""]
    params = [[p.name, _shape(p.shape), p.dtype] for p in manifest.parameters]
    params += [[f"{p.name} (frozen)", _shape(p.shape), p.dtype] for p in manifest.frozen]
    params += [[f"{p.name} (statistic)", _shape(p.shape), p.dtype] for p in manifest.statistics]
    lines += _table(["parameter", "shape", "dtype"], params)
    lines.append(
        f"  {manifest.num_parameters:,} trainable parameters in {len(manifest.parameters)} tensors"
        + (
            f"; BatchNorm trains on batch statistics, {len(manifest.statistics)} running "
            "statistics updated on the device travel with them"
            if manifest.statistics
            else ""
        )
    )
    lines.append("")
    lines.append(
        f"  input  {manifest.input.name} {_shape(manifest.input.shape)} {manifest.input.dtype}   "
        f"labels {manifest.labels.name} {_shape(manifest.labels.shape)} {manifest.labels.dtype}"
        f" in [0, {manifest.classes})   "
        f"output {manifest.output.name} {_shape(manifest.output.shape)}"
    )
    lines.append(
        "  ops    "
        + ", ".join(f"{op} x{count}" for op, count in manifest.ops.items())
        + f"   (opset {manifest.opset}, IR {manifest.ir_version})"
    )
    lines.append("  trains " + ", ".join(ENGINE_NAMES[e] for e in manifest.engines))
    lines.append("")
    files = [
        [BUNDLE_FILES.get(role, role), _size(info.bytes), info.sha256[:16]]
        for role, info in manifest.files.items()
    ]
    total = sum(info.bytes for info in manifest.files.values())
    lines += _table(["file", "size", "sha256"], files)
    weights = sum(4 * math.prod(d or 1 for d in t.shape) for t in manifest.parameters)
    weights += sum(4 * math.prod(d or 1 for d in t.shape) for t in manifest.frozen)
    weights += sum(4 * math.prod(d or 1 for d in t.shape) for t in manifest.statistics)
    lines.append(
        f"  {_size(total)} in all, plus manifest.json: {total / max(weights, 1):.2f}x the "
        f"model's {_size(weights)} of weights (each weight stored once)"
    )
    lines.append("")
    if verification is None:
        lines.append("verification skipped (--no-verify)")
    else:
        lines += verification_lines(verification)
        verdict = "verified" if verification.passed else "FAILED verification"
        lines.append(f"bundle {verdict} in {seconds:.2f} s")
    return "\n".join(lines)


def verification_data(verification: Verification | None) -> dict[str, Any] | None:
    """A verification as data (the ``verification`` of a ``--json`` summary)."""
    if verification is None:
        return None
    return {
        "runtime": verification.runtime,
        "reference": verification.reference,
        "passed": verification.passed,
        "checks": [
            {
                "name": c.name,
                "detail": c.detail,
                "measure": c.measure,
                "error": c.error,
                "tolerance": c.tolerance,
                "passed": c.passed,
            }
            for c in verification.checks
        ],
    }


def summary(
    out: Path, manifest: BundleManifest, verification: Verification | None, seconds: float
) -> dict[str, Any]:
    """The same summary as data (``--json``)."""
    import msgspec

    return {
        "bundle": str(out),
        "manifest": msgspec.to_builtins(manifest),
        "verification": verification_data(verification),
        "seconds": round(seconds, 3),
    }
