"""Every JSON message of the wire protocol, defined once for device, server and simulator.

Messages are frozen ``msgspec.Struct`` types: decoding validates types and
required fields, so a malformed body fails with one error type
(`msgspec.ValidationError`) that the server turns into a 400.
"""

from __future__ import annotations

import itertools
import math
from typing import Annotated, Any, Literal

import msgspec

from fedclient.protocol._compression import CompressionSpec

__all__ = [
    "Admitted",
    "CheckinRequest",
    "CheckinResponse",
    "DeviceParticipation",
    "EnrolRequest",
    "EnrolResponse",
    "EnrolmentCodes",
    "ErrorBody",
    "ErrorDetail",
    "EvaluateSettings",
    "EvaluationReport",
    "IssueCodes",
    "JobFinished",
    "JobPlan",
    "JobSettings",
    "JobStatus",
    "ModelSpec",
    "PrivacySettings",
    "RetryLater",
    "RoundPlan",
    "RoundSummary",
    "SelectionSettings",
    "StrategySettings",
    "TrainSettings",
    "UploadReceipt",
    "UploadSession",
    "UploadStart",
]

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]


#: The most numbers a built-in model may hold (a plan asking for more is refused: the
#: server makes the model in memory from the plan's numbers).
MAX_MODEL_PARAMETERS = 2**27


class ModelSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A model architecture: built in, or your own as a ``fedconvert`` bundle.

    ``softmax`` (no hidden layer), ``mlp`` (``hidden`` lists the layer widths),
    ``cnn`` (square images of ``inputs`` = side² pixels; ``hidden`` lists the two
    convolution channel counts, default 8 and 16), or ``bundle``: the model of the
    device bundle in directory ``bundle`` (a plan file's path is relative to the
    plan). A bundle's plan takes ``inputs`` and ``classes`` from its manifest and
    ``digest`` (the manifest's sha256), which devices check their own bundle against.
    """

    kind: Literal["softmax", "mlp", "cnn", "bundle"] = "mlp"
    inputs: PositiveInt = 64
    hidden: list[PositiveInt] = msgspec.field(default_factory=lambda: [64])
    classes: Annotated[int, msgspec.Meta(ge=2)] = 10
    bundle: str = ""
    digest: str = ""

    def __post_init__(self) -> None:
        # A built-in model is made in memory from these numbers: a plan cannot ask for
        # more than a server (or a device) could ever hold.
        if self.kind != "bundle" and self.parameter_count() > MAX_MODEL_PARAMETERS:
            raise ValueError(
                f"a {self.kind} model of {self.parameter_count():,} parameters is over the "
                f"limit of {MAX_MODEL_PARAMETERS:,}"
            )

    def parameter_count(self) -> int:
        """How many numbers a built-in model holds (0 for a bundle: its manifest says)."""
        if self.kind == "softmax":
            return self.inputs * self.classes + self.classes
        if self.kind == "mlp":
            widths = [self.inputs, *self.hidden, self.classes]
            return sum(a * b + b for a, b in itertools.pairwise(widths))
        if self.kind == "cnn":
            c1, c2 = [*self.hidden, 16, 16][:2] if self.hidden else (8, 16)
            side = math.isqrt(self.inputs)
            return (
                9 * c1
                + c1
                + 9 * c1 * c2
                + c2
                + (side // 4) ** 2 * c2 * self.classes
                + (self.classes)
            )
        return 0


class TrainSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Local training settings a round asks devices to use.

    Every runtime honours ``epochs``, ``batch_size`` and ``learning_rate`` (decayed per
    round by ``lr_decay``); the others are options a runtime honours or refuses
    (`TrainSettings.options`; the numpy models take them all, a training graph of
    plain SGD none): a device never silently trains otherwise than the plan says."""

    epochs: PositiveInt = 5
    batch_size: PositiveInt = 8
    learning_rate: PositiveFloat = 0.1
    #: FedProx: weight of the proximal term mu/2 |w - w_global|^2 in local training.
    proximal_mu: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    #: Per round: round r trains at learning_rate x lr_decay^(r - 1).
    lr_decay: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    #: Per step, over a round's local steps: "constant", or down to 0 by "cosine"
    #: (half a period) or "linear".
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    #: "sgd" (with ``momentum``: heavy ball, as PyTorch's) or "adam" (betas 0.9 and
    #: 0.999, epsilon 1e-8). Optimiser state starts afresh each round.
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.0
    #: L2 penalty: weight_decay x w is added to each step's gradient.
    weight_decay: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    #: Train this many minibatch steps (epochs after epochs, each reshuffled) instead of
    #: ``epochs`` whole epochs; 0: epochs.
    local_steps: Annotated[int, msgspec.Meta(ge=0)] = 0
    #: Clip each step's gradient (every tensor together) to this L2 norm; None: never.
    clip_grad_norm: PositiveFloat | None = None
    #: A client trainer (`fedclient.trainers`), for research in simulation: its import
    #: path ("module:Class"). A device trains with it only if it holds it (`Client`'s
    #: ``trainers``): a plan never makes a device import code. The table's keys that are
    #: not fields here are its settings (``trainer_options``, keyword arguments).
    trainer: str = ""
    trainer_options: dict[str, Any] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.optimizer == "adam" and self.momentum:
            raise ValueError("train.momentum is SGD's: adam keeps moments of its own")

    def round_learning_rate(self, round_number: int) -> float:
        """The learning rate of round ``round_number`` (from 1), after ``lr_decay``."""
        if self.lr_decay == 1.0:
            return self.learning_rate
        return self.learning_rate * self.lr_decay ** max(0, round_number - 1)

    def options(self) -> dict[str, Any]:
        """The settings a runtime must be asked for, as ``train`` keywords: those not at
        their defaults, beyond epochs, batch size and learning rate."""
        defaults = TrainSettings()
        return {
            name: getattr(self, name)
            for name in _TRAIN_OPTIONS
            if getattr(self, name) != getattr(defaults, name)
        }

    def work(self, examples: int) -> int:
        """Examples a device with ``examples`` visits in a round (for time estimates)."""
        return self.local_steps * self.batch_size if self.local_steps else examples * self.epochs


#: `TrainSettings` a runtime honours or refuses (`TrainSettings.options`).
_TRAIN_OPTIONS = (
    "proximal_mu",
    "lr_schedule",
    "optimizer",
    "momentum",
    "weight_decay",
    "local_steps",
    "clip_grad_norm",
)


class StrategySettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How the server aggregates (see ``fedclient.server.strategies`` for the names).

    ``name`` is a built-in strategy's, or the import path of your own class
    (``"my_strategies:Krum"``, `fedclient.plugins`). A plan's ``[strategy]`` keys that are
    not fields here are that class's own settings: they are kept in ``options`` and
    handed to it as keyword arguments (it validates them)."""

    name: str = "fedavg"
    #: Step size on the aggregated update; None: the strategy's own default.
    server_learning_rate: PositiveFloat | None = None
    momentum: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.9
    beta1: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.9
    beta2: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.99
    tau: PositiveFloat = 1e-3
    trim_fraction: Annotated[float, msgspec.Meta(ge=0, lt=0.5)] = 0.1
    norm_bound: PositiveFloat = 1.0
    options: dict[str, Any] = msgspec.field(default_factory=dict)


class SelectionSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Which of the devices checking in a sync round admits
    (`fedclient.server.selection`).

    ``name`` "" admits them first come, first served. Otherwise it names a selection
    (a built-in one's name, or ``"module:Class"``; the table's other keys are its
    settings, kept in ``options``): each round gathers candidates for at most
    ``window_seconds`` after it opens, then admits those the selection picks."""

    name: str = ""
    window_seconds: PositiveFloat = 60.0
    options: dict[str, Any] = msgspec.field(default_factory=dict)


class PrivacySettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Local differential privacy each device applies to its updates.

    ``dp_epsilon`` is the privacy of one release (one round's update) at
    ``dp_delta``; None turns local DP off. Devices clip their update to L2 norm
    ``clip`` and add Gaussian noise calibrated to it; ``budget_epsilon`` caps
    what one device spends on the job over all its releases (default: one
    release per round of the job).
    """

    dp_epsilon: PositiveFloat | None = None
    dp_delta: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 1e-5
    clip: PositiveFloat = 1.0
    budget_epsilon: PositiveFloat | None = None
    neighbouring: Literal["replace", "add_remove"] = "replace"
    #: Secure aggregation: "" (off), "secagg" or "secagg+"; the server learns only the sum.
    secagg: Literal["", "secagg", "secagg+"] = ""
    #: Fixed-point range of each coordinate a device sends: num_examples x delta, and
    #: num_examples itself. The mean is the sum over the sum of num_examples, so the
    #: rounding error of the mean is about secagg_clip * devices / 2^31 / examples.
    secagg_clip: PositiveFloat = 32768.0
    #: A secure-aggregation stage closes this long after its first message, at the latest.
    secagg_stage_seconds: PositiveFloat = 60.0
    #: What a secure aggregation withstands: this share of its devices colluding with the
    #: server, and this share dropping out after they advertised keys (both with failure
    #: probability 2^-40). They fix the SecAgg+ neighbourhood and the threshold (Bell et
    #: al. 2020); each device checks the threshold against its own PrivacyPolicy.
    secagg_colluding: Annotated[float, msgspec.Meta(ge=0, lt=0.5)] = 0.2
    secagg_dropout: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.3
    #: The share of a secure round's cohort that may never advertise keys (failed to
    #: train, went offline) with the rounds going on: the colluders are then a larger
    #: share of the roster, which each device checks; SecAgg+ sizes its threshold for it.
    secagg_roster_dropout: Annotated[float, msgspec.Meta(ge=0, lt=0.5)] = 0.1
    #: Distributed DP (with secure aggregation and dp_epsilon): each device adds a share
    #: of discrete Gaussian noise so that the *sum* is (dp_epsilon, dp_delta)-DP per round
    #: (Kairouz et al. 2021), instead of noising its own update for the server to see.
    distributed_dp: bool = False
    #: A compressed or distributed-DP secure sum weights each update by
    #: min(1, num_examples / weight_cap): its few bits cannot carry a count exactly
    #: (capped weights, McMahan et al. 2018). A DP release weighs 1 (no count is sent).
    weight_cap: PositiveInt = 100


class JobSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How a job's rounds run."""

    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    rounds: PositiveInt = 10
    devices_per_round: PositiveInt = 10
    min_devices: PositiveInt = 1
    over_selection: Annotated[float, msgspec.Meta(ge=1.0)] = 1.0
    deadline_seconds: PositiveFloat = 600.0
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] = 0
    max_upload_bytes: PositiveInt = 64 * 1024 * 1024
    #: How devices compress their updates: "", "q8", "q4", "topk:F" or "topk:F,q8".
    compression: str = ""
    #: "sync": rounds with deadlines. "async" (FedBuff): devices train on whatever version
    #: is current; every devices_per_round updates are folded in, weighted 1/sqrt(1+staleness).
    mode: Literal["sync", "async"] = "sync"
    #: async: updates trained more than this many versions ago are refused.
    max_staleness: Annotated[int, msgspec.Meta(ge=0)] = 10
    #: An update whose L2 norm (every tensor together) is larger is refused (400): one
    #: device's finite 3e38s would otherwise overflow the aggregate. None: no bound.
    max_update_norm: PositiveFloat | None = 1000.0
    #: An update may claim at most this many examples (its FedAvg weight).
    max_examples: PositiveInt = 1_000_000
    #: In the weighted mean, a device counts for at most this many times the round's
    #: median device (the median example count of its first 32 updates, in arrival
    #: order): one device claiming max_examples cannot out-weigh all the others. Secure
    #: rounds are not capped (the server sees only their sum). None: no cap.
    max_weight_ratio: PositiveFloat | None = 4.0


class EvaluateSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Federated evaluation: devices measure the global model on their own held-out data.

    Every ``every`` rounds (0: never), the first ``devices`` devices admitted to the
    round (0: all of them) evaluate the model they received, before they train on it,
    and send the counts (correct, loss sum, examples) with their update; the server
    sums them into the round's ``federated_accuracy``. Evaluation trains nothing and
    spends no privacy budget: the counts are not noised, so a device whose privacy
    policy keeps metadata on the device beside a DP release sends none."""

    every: Annotated[int, msgspec.Meta(ge=0)] = 0
    devices: Annotated[int, msgspec.Meta(ge=0)] = 0


class JobPlan(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A whole job: the one plan file that runs in ``fedsim`` and in ``fedserver``."""

    job: JobSettings
    model: ModelSpec = msgspec.field(default_factory=ModelSpec)
    train: TrainSettings = msgspec.field(default_factory=TrainSettings)
    strategy: StrategySettings = msgspec.field(default_factory=StrategySettings)
    privacy: PrivacySettings = msgspec.field(default_factory=PrivacySettings)
    evaluate: EvaluateSettings = msgspec.field(default_factory=EvaluateSettings)
    selection: SelectionSettings = msgspec.field(default_factory=SelectionSettings)

    def __post_init__(self) -> None:
        if self.job.min_devices > self.job.devices_per_round:
            raise ValueError("job.min_devices must not exceed job.devices_per_round")
        # Refuse a plan devices could not follow, when it is loaded, never with a hang.
        spec = CompressionSpec.parse(self.job.compression)
        p = self.privacy
        if p.secagg and self.job.mode == "async":
            raise ValueError(
                "secure aggregation needs sync rounds (a fixed cohort per sum); "
                "async (FedBuff) buffers have none: use mode = 'sync' or drop secagg"
            )
        if p.secagg and spec.topk is not None:
            raise ValueError(
                "top-k keeps different coordinates on each device, so masked vectors no "
                "longer line up: secure aggregation takes q8 or q4, not topk"
            )
        if p.distributed_dp and not (p.secagg and p.dp_epsilon is not None):
            raise ValueError("distributed_dp needs secagg (or secagg+) and dp_epsilon")
        if self.selection.name and (self.job.mode == "async" or p.secagg):
            raise ValueError(
                "a selection picks each sync round's devices: not in async mode, nor (yet) "
                "with secure aggregation"
            )
        if self.train.trainer and self.job.mode == "async":
            raise ValueError(
                "a client trainer needs sync rounds (it may read what the strategy sends "
                "beside the round's model, which an async device's older version lacks)"
            )

    @property
    def admit_per_round(self) -> int:
        """Devices admitted per round: ``devices_per_round`` times ``over_selection``."""
        return max(
            self.job.devices_per_round,
            int(self.job.devices_per_round * self.job.over_selection + 0.5),
        )


class EnrolRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A device asks for an identity; ``label`` is free text for operators.

    A device may propose its own bearer ``token`` (32-256 URL-safe characters):
    enrolling again with the same token returns the same device, which makes a
    retried enrolment idempotent. Without one the server draws a token.
    """

    label: Annotated[str, msgspec.Meta(max_length=200)] = ""
    token: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{32,256}$")] | None = None
    #: What the server's enrolment policy asks for: the app's enrolment secret, a
    #: single-use enrolment code, or a token its verifier checks (an attestation).
    credential: Annotated[str, msgspec.Meta(max_length=4096)] | None = None
    #: The device's Ed25519 identity public key (`fedclient.identity`), and an identity
    #: authority's certificate of it: secure aggregation relays both to its peers.
    identity_key: Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)] | None = None
    identity_certificate: Annotated[bytes, msgspec.Meta(min_length=64, max_length=64)] | None = None


class EnrolResponse(msgspec.Struct, frozen=True):
    """The device's id and bearer token; the server stores only the token's hash."""

    device_id: str
    token: str


class CheckinRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A device offers to work on a job.

    ``inline_model_max``: the largest model body (bytes) the device takes inside an
    admission, when it does not hold the round's version; 0, or an answer in JSON,
    never carries one (the device downloads it from the model route). Only a
    msgpack answer (``Accept: application/msgpack``) carries the raw bytes.

    ``enrol_label``: set by a device not enrolled yet. The bearer token it proposes
    enrols it first (as ``POST /v1/devices`` with that token would: again, the same
    device), and the answer's ``Device-Id`` header names it. One round trip fewer
    on a device's first contact."""

    runtime: Annotated[str, msgspec.Meta(max_length=32)] = "numpy"
    model_version: Annotated[int, msgspec.Meta(ge=0)] | None = None
    inline_model_max: Annotated[int, msgspec.Meta(ge=0)] = 0
    enrol_label: Annotated[str, msgspec.Meta(max_length=200)] | None = None
    #: With ``enrol_label``: the enrolment credential (see `EnrolRequest`).
    enrol_credential: Annotated[str, msgspec.Meta(max_length=4096)] | None = None
    #: With ``enrol_label``: the device's identity key and its certificate (see `EnrolRequest`).
    identity_key: Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)] | None = None
    identity_certificate: Annotated[bytes, msgspec.Meta(min_length=64, max_length=64)] | None = None


class RoundPlan(msgspec.Struct, frozen=True):
    """What an admitted device must do in this round, and by when.

    ``deadline`` is on the clock of whoever holds the plan: the server sends it
    with its own ``clock_now``, and a device re-bases both on its own clock
    (`RoundPlan.rebased`), so clock skew between them does not matter.
    """

    job: str
    round_id: int
    round_number: int
    model_version: int
    deadline: float
    clock_now: float
    model: ModelSpec
    train: TrainSettings
    compression: str = ""
    privacy: PrivacySettings = msgspec.field(default_factory=PrivacySettings)
    rounds: int = 1  # rounds in the job (the default privacy budget counts them)
    #: The fewest updates a round closes with (distributed DP calibrates each device's
    #: share of the noise for that many).
    min_devices: int = 1
    #: Evaluate the received model on the device's held-out data, before training, and
    #: send the counts with the update (`EvaluateSettings`).
    evaluate: bool = False

    def rebased(self, now: float) -> RoundPlan:
        """The same plan with ``deadline`` moved onto a clock that reads ``now``."""
        return msgspec.structs.replace(
            self, deadline=now + self.deadline - self.clock_now, clock_now=now
        )


class Admitted(msgspec.Struct, frozen=True, tag_field="status", tag="admitted"):
    """Check-in answer: the device is in the round.

    ``model`` is the round's model body (safetensors, as the model route serves it,
    with its ``model_etag``), when the device asked for it inline and it fits: one
    round trip instead of two, as in the configuration step of Bonawitz et al. 2019."""

    plan: RoundPlan
    model: bytes | None = None
    model_etag: str = ""


class RetryLater(msgspec.Struct, frozen=True, tag_field="status", tag="retry"):
    """Check-in answer: no place for the device now; ask again after ``retry_after`` s."""

    retry_after: float
    reason: str = ""


class JobFinished(msgspec.Struct, frozen=True, tag_field="status", tag="finished"):
    """Check-in answer: the job ran all its rounds."""

    model_version: int


CheckinResponse = Admitted | RetryLater | JobFinished


class UploadReceipt(msgspec.Struct, frozen=True):
    """The server's acknowledgement of one update; a retried upload gets the same one."""

    receipt_id: str
    round_id: int
    device_id: str
    num_examples: int
    received_at: float


class EvaluationReport(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A device's evaluation of a round's model (the one it received) on its held-out
    data, sent on its own when its update could not count (the round closed first), so
    the round's federated accuracy hears from every device asked, not only the counted."""

    correct: Annotated[int, msgspec.Meta(ge=0)]
    loss_sum: Annotated[float, msgspec.Meta(ge=0)]
    examples: Annotated[int, msgspec.Meta(ge=1)]


class UploadStart(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Open (or find again) a chunked upload of ``size`` bytes whose SHA-256 is ``sha256``."""

    size: Annotated[int, msgspec.Meta(ge=1)]
    sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]


class UploadSession(msgspec.Struct, frozen=True):
    """A chunked upload: how many bytes the server holds, and the receipt once complete."""

    upload_id: str
    round_id: int
    size: int
    offset: int
    receipt: UploadReceipt | None = None


class RoundSummary(msgspec.Struct, frozen=True):
    """One round as the server saw it."""

    round_id: int
    number: int
    status: Literal["open", "closed", "failed"]
    model_version: int
    opened_at: float
    deadline: float
    admitted: int
    updates: int
    closed_at: float | None = None
    reason: str = ""
    train_loss: float | None = None
    #: Federated evaluation of the round's model (the one it started from): devices that
    #: reported, and the accuracy and mean loss over their examples.
    evaluated: int = 0
    federated_accuracy: float | None = None
    federated_loss: float | None = None


class JobStatus(msgspec.Struct, frozen=True):
    """``GET /v1/jobs/{job}``: the job, its current round and model version."""

    job: str
    #: "paused" (admits no device until resumed) and "stopped" (for good) are the
    #: operator's (the admin API's); "finished": it ran all its rounds.
    status: Literal["running", "paused", "stopped", "finished"]
    model_version: int
    rounds_completed: int
    rounds_failed: int
    current_round: RoundSummary | None
    plan: JobPlan
    previous_round: RoundSummary | None = None
    #: With local DP: devices that reported spending, and the most and mean epsilon spent.
    privacy_spent: dict[str, float] = msgspec.field(default_factory=dict)


class DeviceParticipation(msgspec.Struct, frozen=True):
    """One device's part in a job, for the operator (``GET /v1/admin/jobs/{job}/devices``)."""

    device_id: str
    label: str
    rounds: int  # rounds it was admitted to
    updates: int  # updates it sent
    last_admitted: float | None
    revoked: bool


class IssueCodes(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Ask for ``count`` single-use enrolment codes."""

    count: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 1


class EnrolmentCodes(msgspec.Struct, frozen=True):
    """Single-use enrolment codes: shown once, kept hashed by the server."""

    codes: list[str]


class ErrorDetail(msgspec.Struct, frozen=True):
    """Machine-readable error code and a human message."""

    code: str
    message: str


class ErrorBody(msgspec.Struct, frozen=True):
    """Every 4xx/5xx answer carries this body."""

    error: ErrorDetail
