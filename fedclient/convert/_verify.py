"""Verify a device bundle: its files, one inference and one training step through ONNX Runtime,
each compared with the source model run by a `Reference`.

Checks (errors are `difference`s: absolute where values are below 1, relative above):

    files             every file's size and sha256 match the manifest
    initial weights   the checkpoint holds the reference's parameters exactly (names, shapes,
                      values)
    inference         logits of ``inference.onnx`` in a plain InferenceSession vs the reference
    loss              the training graph's loss at the initial weights vs the reference's
    gradients         each parameter's gradient vs the reference's (float64), relative to
                      that tensor's own largest gradient: a 2% error in one tensor of a deep
                      network fails, however small its gradients are beside the others'
    training step     weights after one SGD step vs the reference's step (and BatchNorm's
                      running statistics, where it trains on batch statistics); where the reference
                      cannot train (ONNX files), each parameter's gradient is checked by a
                      central finite difference of the reference loss in float64 (relative error)

The loss and the step are checked once per engine the bundle holds and this machine
runs: ONNX Runtime's training API, and the step graph (rows marked "[step graph]").
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedclient.convert._references import Reference
from fedclient.runtime import OnnxBackend, read_manifest
from fedclient.runtime._ort import has_training_api, ort

__all__ = [
    "Check",
    "Verification",
    "difference",
    "gradient_error",
    "max_difference",
    "verify_bundle",
]

#: Default absolute tolerance for float32 results of two different engines.
TOLERANCE = 1e-5
#: Relative tolerance of a float64 finite-difference gradient check.
GRADIENT_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Check:
    """One verification result."""

    name: str
    detail: str
    error: float
    tolerance: float
    measure: str = "max |diff|/(1+|ref|)"

    @property
    def passed(self) -> bool:
        """Whether the error is within tolerance."""
        return bool(np.isfinite(self.error)) and self.error <= self.tolerance


@dataclass(frozen=True)
class Verification:
    """Every check of one bundle against one reference."""

    reference: str
    runtime: str
    checks: list[Check]

    @property
    def passed(self) -> bool:
        """Whether every check passed."""
        return all(c.passed for c in self.checks)


def difference(found: np.ndarray | float, expected: np.ndarray | float) -> float:
    """``max |found - expected| / (1 + |expected|)``: the absolute difference where values
    are small, the relative one where they are large. A trained model's logits reach 77
    on noise images, where float32 rounding alone is 3e-5; 1e-5 of 77 is no error."""
    found64 = np.asarray(found, dtype=np.float64)
    expected64 = np.asarray(expected, dtype=np.float64)
    return float((np.abs(found64 - expected64) / (1.0 + np.abs(expected64))).max(initial=0.0))


def max_difference(found: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> float:
    """The largest `difference` over named tensors; infinite if names or shapes differ."""
    if set(found) != set(expected) or any(found[k].shape != expected[k].shape for k in found):
        return float("inf")
    return max((difference(found[k], expected[k]) for k in found), default=0.0)


#: A gradient may differ from the float64 reference's by this many times the reference's
#: own float32 rounding (`Reference.rounding`) before the difference counts.
ROUNDING_FACTOR = 10.0


def gradient_error(
    found: Mapping[str, np.ndarray],
    expected: Mapping[str, np.ndarray],
    rounding: Mapping[str, float] | None = None,
) -> tuple[float, str]:
    """The worst tensor's ``max |g - ref| / max |ref|`` and its name: each gradient measured
    against its own scale, however small (float32 keeps ~1e-6 of it: the first block of a
    fresh MobileNetV3 has gradients of 3e-14). A tensor whose reference gradient is zero
    is measured against 1e-12 of the largest gradient of any tensor: float noise there
    is no error, a gradient where none belongs is. Where the reference says how far its
    own float32 gradient lies from its float64 one (``rounding``), `ROUNDING_FACTOR`
    times that is float32 noise and does not count (a conv's bias before BatchNorm on
    batch statistics: 4e-17 in float64, 7e-8 in torch's float32)."""
    if set(found) != set(expected):
        return float("inf"), "names differ"
    largest = max((float(np.abs(v).max(initial=0.0)) for v in expected.values()), default=0.0)
    worst, name = 0.0, ""
    for key, reference in expected.items():
        value = np.asarray(found[key], dtype=np.float64)
        if value.shape != reference.shape:
            return float("inf"), key
        scale = float(np.abs(reference).max(initial=0.0)) or max(1e-12 * largest, 1e-300)
        noise = ROUNDING_FACTOR * (rounding or {}).get(key, 0.0)
        error = max(0.0, float(np.abs(value - reference).max(initial=0.0)) - noise) / scale
        if not np.isfinite(error):
            return float("inf"), key
        if error > worst or not name:
            worst, name = error, key
    return worst, name


def verify_bundle(
    directory: str | os.PathLike[str],
    reference: Reference,
    *,
    tolerance: float = TOLERANCE,
    gradient_tolerance: float = GRADIENT_TOLERANCE,
    learning_rate: float = 0.1,
    examples: int = 8,
    seed: int = 0,
) -> Verification:
    """Run the checks above on the bundle in ``directory``."""
    path = Path(directory)
    manifest = read_manifest(path, verify=True)  # raises InvalidInput on a checksum mismatch
    checks = [Check("files", f"{len(manifest.files)} files, sha256", 0.0, 0.0, "mismatches")]
    rng = np.random.default_rng(seed)
    x: np.ndarray
    if manifest.input.dtype == "int64":  # token ids, over the whole vocabulary
        x = rng.integers(0, manifest.vocabulary or 2, (examples, *manifest.input_shape))
    else:
        x = rng.random((examples, *manifest.input_shape), dtype=np.float32)
    y = rng.permutation(np.arange(examples) % manifest.classes).astype(np.int64)

    engines = [e for e in manifest.engines if e != "training" or has_training_api()]
    backend = OnnxBackend(path, verify=False, engine=engines[0])
    initial = backend.get_weights()
    expected = reference.initial_weights()
    checks.append(
        Check("initial weights", f"{len(initial)} tensors", max_difference(initial, expected), 0.0)
    )

    session = ort().InferenceSession(
        str(path / "inference.onnx"), providers=["CPUExecutionProvider"]
    )
    (logits,) = session.run(None, {manifest.input.name: x})
    error = difference(logits, reference.logits(x))
    checks.append(Check("inference", f"{examples} examples, logits", error, tolerance))

    ref_loss = reference.loss(initial, x, y)
    ref_step = reference.sgd_step(x, y, learning_rate)
    ref_grads = reference.gradients(x, y)
    rounding = reference.rounding(x, y) if ref_grads is not None else {}
    if ref_grads is not None:  # running statistics (BatchNorm) travel but have no gradient
        trained = {p.name for p in manifest.parameters}
        ref_grads = {k: v for k, v in ref_grads.items() if k in trained}
    for engine in engines:
        tag = "" if engine == "training" else " [step graph]"
        if engine != backend.engine:
            backend = OnnxBackend(path, verify=False, engine=engine)
        if ref_grads is not None:
            error, worst = gradient_error(backend.gradients(x, y), ref_grads, rounding)
            checks.append(
                Check(
                    f"gradients{tag}",
                    f"{len(ref_grads)} tensors, worst {worst}",
                    error,
                    gradient_tolerance,
                    "max |g-ref| / max |ref|",
                )
            )
        result = backend.train(
            x,
            y,
            epochs=1,
            batch_size=examples,
            learning_rate=learning_rate,
            rng=np.random.default_rng(0),
        )
        checks.append(
            Check(
                f"loss{tag}",
                "cross-entropy at the initial weights",
                difference(result.loss, ref_loss),
                tolerance,
            )
        )
        stepped = backend.get_weights()
        if ref_step is not None:
            checks.append(
                Check(
                    f"training step{tag}",
                    f"SGD lr {learning_rate:g}, weights",
                    max_difference(stepped, ref_step),
                    tolerance,
                )
            )
        else:
            check = _gradient_check(
                reference, initial, stepped, x, y, learning_rate, gradient_tolerance
            )
            checks.append(dataclasses.replace(check, name=f"training step{tag}"))
    return Verification(reference.label, f"onnxruntime {manifest.onnxruntime}", checks)


def _gradient_check(
    reference: Reference,
    initial: dict[str, np.ndarray],
    stepped: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    learning_rate: float,
    tolerance: float,
) -> Check:
    """ONNX Runtime's gradient (from its SGD step) against finite differences of the reference
    loss along that gradient, one parameter at a time.

    ReLU and max-pool make the loss piecewise smooth: a step that crosses a kink
    spoils a difference quotient, so a failing step size is retried smaller and
    larger and the best agreement counts.
    """
    worst = 0.0
    for name in initial:
        grad = (initial[name].astype(np.float64) - stepped[name]) / learning_rate
        norm = float(np.linalg.norm(grad))
        if norm < 1e-7:
            continue  # no gradient reaches it here (e.g. a dead ReLU unit); nothing to compare
        direction = grad / norm
        best = float("inf")
        for h in (1e-5, 1e-6, 1e-4):
            losses = []
            for sign in (1.0, -1.0):
                shifted = {k: v.astype(np.float64) for k, v in initial.items()}
                shifted[name] = shifted[name] + sign * h * direction
                losses.append(reference.loss(shifted, x, y))
            best = min(best, abs((losses[0] - losses[1]) / (2 * h) - norm) / norm)
            if best <= tolerance:
                break
        worst = max(worst, best)
    return Check(
        "training step",
        f"SGD lr {learning_rate:g}, gradient vs finite differences",
        worst,
        tolerance,
        "relative error",
    )
