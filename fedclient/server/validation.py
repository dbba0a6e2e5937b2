"""What an update may be: the checks an upload passes before anything of it is stored.

Tensor names, shapes and dtype against the round's model, finite values (NaN/Inf
refused), the job's compression, an L2 norm within ``max_update_norm`` (plus local DP's
noise), a claimed example count within ``max_examples``, the model version it was
trained on, local DP's reported spending, and a federated evaluation's counts. Each
refusal is an `InvalidRequest` (400) that names what is wrong; nothing is stored.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from fedclient._exceptions import InvalidRequest
from fedclient.compression import CompressionSpec, decompress
from fedclient.privacy.dp import GaussianMechanism
from fedclient.protocol import (
    JobPlan,
    PrivacySettings,
    Weights,
    check_weights,
    decode_tensors,
    encode_tensors,
    split_extras,
    with_extras,
)

__all__ = ["Evaluation", "check_extras", "check_key", "evaluation_counts", "validate_update"]


def validate_update(
    plan: JobPlan,
    model_version: int,
    reference: Weights,
    body: bytes,
    *,
    accepts_extras: bool = False,
) -> tuple[int, float | None, bytes, float | None, Weights, Evaluation | None]:
    """Check an update of a round on ``model_version`` (``reference``, decoded) of a job
    planned as ``plan``; return its example count, training loss, the dense body to
    store (a compressed update is decoded here, so strategies see floats), with
    local DP the epsilon its device reports having spent on the job, the
    update's tensors (the body, decoded, a client trainer's extras among them for a
    strategy that ``accepts_extras``: `check_extras`), and the device's evaluation of
    the round's model if it sent one. `InvalidRequest` (400) otherwise."""
    tensors, metadata = decode_tensors(body)
    tensors, extras = split_extras(tensors)
    if extras:
        check_extras(plan, extras, reference, accepts_extras)
    encoding = metadata.get("compression", "")
    if encoding != plan.job.compression:
        raise InvalidRequest(
            f"the job wants compression {plan.job.compression!r}, got {encoding!r}"
        )
    if encoding:
        tensors = decompress(tensors, CompressionSpec.parse(encoding), reference)
        body = encode_tensors(tensors, metadata)
    check_weights(tensors, reference)
    dp = plan.privacy.dp_epsilon is not None
    try:
        # A DP release comes without its (unnoised) example count: it weighs 1.
        num_examples = int(metadata.get("num_examples", "1" if dp else ""))
        loss_text = metadata.get("train_loss")
        train_loss = float(loss_text) if loss_text is not None else None
    except ValueError as exc:
        raise InvalidRequest(f"bad update metadata: {exc}") from exc
    limit = plan.job.max_examples
    if not 1 <= num_examples <= limit:
        raise InvalidRequest(f"metadata num_examples must be an integer from 1 to {limit}")
    bound = _norm_bound(plan, sum(t.size for t in tensors.values()))
    if bound is not None:
        norm = math.sqrt(sum(float(np.vdot(t, t)) for t in tensors.values()))
        if not norm <= bound:  # NaN too (check_weights refuses it first)
            raise InvalidRequest(
                f"the update's L2 norm {norm:.4g} is over the job's max_update_norm {bound:g}"
            )
    if train_loss is not None and not math.isfinite(train_loss):
        train_loss = None
    version = metadata.get("model_version")
    if version is not None and version != str(model_version):
        raise InvalidRequest(
            f"update was trained on model version {version}, the round uses {model_version}"
        )
    epsilon: float | None = None
    if dp:
        try:
            epsilon = float(metadata.get("epsilon_spent") or "nan")
        except ValueError:
            epsilon = math.nan
        if not math.isfinite(epsilon) or epsilon < 0:
            raise InvalidRequest("a job with local DP needs the epsilon_spent metadata")
    evaluation = evaluation_counts(metadata, plan.job.max_examples)
    if extras:
        tensors = with_extras(tensors, extras)  # for the strategy (`ClientUpdate.extras`)
    return num_examples, train_loss, body, epsilon, tensors, evaluation


def check_extras(plan: JobPlan, extras: Weights, reference: Weights, accepted: bool) -> None:
    """A client trainer's extra tensors: only for a strategy that reads them
    (``accepted``), never with compression or secure aggregation, finite, and at most
    4x the model's size."""
    if not accepted:
        names = sorted(extras)[:5]
        raise InvalidRequest(
            f"unexpected tensors {names}: the job's strategy takes no extra tensors"
        )
    if plan.job.compression or plan.privacy.secagg:
        raise InvalidRequest("extra tensors travel only uncompressed, outside secure sums")
    size = sum(t.size for t in extras.values())
    if size > 4 * sum(t.size for t in reference.values()):
        raise InvalidRequest(f"{size} extra values: more than 4x the model's")
    for name, value in extras.items():
        if value.dtype.kind != "f" or not np.isfinite(value).all():
            raise InvalidRequest(f"extra tensor {name!r} is not finite floats")


#: A device's evaluation of a round's model: correct, loss sum, examples.
Evaluation = tuple[int, float, int]


def evaluation_counts(metadata: dict[str, str], max_examples: int) -> Evaluation | None:
    """The evaluation counts an update's metadata carries, checked, or None."""
    if "eval_examples" not in metadata:
        return None
    try:
        correct = int(metadata["eval_correct"])
        loss_sum = float(metadata["eval_loss_sum"])
        examples = int(metadata["eval_examples"])
    except (KeyError, ValueError) as exc:
        raise InvalidRequest(f"bad evaluation metadata: {exc}") from exc
    if not (1 <= examples <= max_examples and 0 <= correct <= examples):
        raise InvalidRequest("evaluation counts must satisfy 0 <= correct <= examples")
    if not (math.isfinite(loss_sum) and loss_sum >= 0):
        raise InvalidRequest("an evaluation's loss sum must be finite and non-negative")
    return correct, loss_sum, examples


def _norm_bound(plan: JobPlan, dimension: int) -> float | None:
    """The largest L2 norm an update may have: ``max_update_norm``, plus, with local DP,
    the norm the devices' noise reaches (its standard deviation times sqrt(d), twice)."""
    return _bound(plan.job.max_update_norm, plan.privacy, dimension)


@functools.lru_cache(maxsize=64)
def _bound(bound: float | None, p: PrivacySettings, dimension: int) -> float | None:
    if bound is None or p.dp_epsilon is None or p.distributed_dp:
        return bound
    noise = GaussianMechanism.for_release(p.dp_epsilon, p.dp_delta, p.clip, p.neighbouring)
    return bound + 2.0 * noise.stddev * math.sqrt(dimension)


def check_key(key: str | None) -> str:
    """An upload's Idempotency-Key, checked (1-200 printable characters)."""
    if not key or len(key) > 200 or not key.isprintable():
        raise InvalidRequest("an Idempotency-Key header (1-200 characters) is required")
    return key
