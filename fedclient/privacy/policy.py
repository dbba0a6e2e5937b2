"""The device's own privacy policy: the plan proposes, the device decides.

A job's plan comes from the server, which is the party local DP and secure
aggregation protect devices from. So the device checks every plan against a
`PrivacyPolicy` the app sets (safe defaults otherwise) *before it trains*, and
refuses one outside it with `fedclient.PrivacyPolicyViolation`:

- ``max_delta``: the plan's delta may not be larger.
- ``max_epsilon_per_release``: one release (one round's update) at the plan's
  delta, accounted under the *device's* neighbouring relation.
- ``max_epsilon_per_job`` and ``max_epsilon_lifetime``: what the device's ledger
  may reach for the job, and over every job it ever took part in (Renyi DP
  composes across jobs: they are all about the same data). The job's budget is
  the smaller of the plan's and the policy's.
- ``neighbouring``: the relation the device accounts under. A plan calibrated
  for ``add_remove`` (sensitivity C) is half as noisy, in ``replace`` units
  (sensitivity 2C), as it claims: the device charges its ledger for what the
  noise really gives under its own relation, so a server cannot under-count by
  switching relations mid-job.
- ``require_dp``: refuse a job without differential privacy. A plan's
  distributed DP counts only inside secure aggregation: a plan asking for it
  without secure aggregation is refused (it would send the update unnoised).
- ``min_secure_cohort``: the fewest devices a secure sum may hold *beyond the
  colluders the device assumes*; below it the sum says too much about each.
  The aggregation's floor (which every device enforces) must be at least this
  plus the colluders, and so must the roster the device is shown.
- ``trusted_authorities``: identity authorities' public keys
  (`fedclient.IdentityAuthority`). With one, the device takes part in a secure
  aggregation only with peers whose identity keys it certified, so the server
  can neither invent devices nor swap a device's keys.
- ``trust_server_identities``: without an authority, the identity keys of a
  secure aggregation's peers come from the server, which could make up every
  one of them: the device refuses secure aggregation unless this says it takes
  the server at its word (an honest-but-curious server; see the README).
- ``max_colluding_fraction`` and ``max_colluding_devices``: the devices of a
  secure aggregation assumed to collude with the server: that fraction of the
  participants the server announces, or that many if more (an absolute bound
  holds however small a cohort the server announces). The threshold must be
  out of their reach in the roster the device is shown; it shares its secrets
  only once more than half of that roster beyond them signed the same roster,
  and unmasks only a contributor list they could not get signed twice; with
  distributed DP it sizes its noise so the floor's devices beyond them carry
  all the sum needs.
- ``share_metadata``: whether ``num_examples`` and ``train_loss`` may travel in
  the clear beside a DP release. They are not noised, so by default they do not
  (the server then weights every update alike).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from fedclient._exceptions import InvalidInput, PrivacyPolicyViolation
from fedclient.privacy.dp import GaussianMechanism, PrivacyBudget
from fedclient.protocol import PrivacySettings, RoundPlan

__all__ = ["PrivacyPolicy", "RoundPrivacy"]


@dataclass(frozen=True)
class RoundPrivacy:
    """What a round's plan means for this device: the mechanism it applies, as
    accounted under its own neighbouring relation, and the budget it charges against."""

    mechanism: GaussianMechanism
    budget: PrivacyBudget
    lifetime: PrivacyBudget | None


@dataclass(frozen=True)
class PrivacyPolicy:
    """The limits a device puts on any job's privacy (see the module docstring).

    The defaults hold for an app that set nothing: delta at most 1e-5, epsilon at
    most 10 per release and per job and 100 over the device's life, accounted for
    replacing the device's whole data set; secure sums of at least 10 devices
    beyond 20% colluding, among peers an identity authority it pins certified; no
    clear metadata beside a DP release. ``None`` lifts a limit.
    """

    max_delta: float = 1e-5
    max_epsilon_per_release: float | None = 10.0
    max_epsilon_per_job: float | None = 10.0
    max_epsilon_lifetime: float | None = 100.0
    neighbouring: Literal["replace", "add_remove"] = "replace"
    require_dp: bool = False
    min_secure_cohort: int = 10
    share_metadata: bool = False
    trusted_authorities: tuple[bytes, ...] = ()
    trust_server_identities: bool = False
    max_colluding_fraction: float = 0.2
    max_colluding_devices: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.max_delta < 1:
            raise InvalidInput(f"max_delta must be in (0, 1), got {self.max_delta}")
        for name in ("max_epsilon_per_release", "max_epsilon_per_job", "max_epsilon_lifetime"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise InvalidInput(f"{name} must be positive or None, got {value}")
        if self.neighbouring not in ("replace", "add_remove"):
            raise InvalidInput(f"unknown neighbouring relation {self.neighbouring!r}")
        if self.min_secure_cohort < 2:
            raise InvalidInput("min_secure_cohort must be at least 2")
        if not 0 <= self.max_colluding_fraction < 1:
            raise InvalidInput("max_colluding_fraction must be in [0, 1)")
        if self.max_colluding_devices < 0:
            raise InvalidInput("max_colluding_devices must be at least 0")
        if any(len(key) != 32 for key in self.trusted_authorities):
            raise InvalidInput("an identity authority's public key is 32 bytes")

    @classmethod
    def accepting(
        cls, settings: PrivacySettings, trusted_authorities: tuple[bytes, ...] = ()
    ) -> PrivacyPolicy:
        """A policy that accepts whatever a plan's privacy ``settings`` ask: for
        simulations, whose researcher is also the devices' owner (and so its server's:
        without ``trusted_authorities`` it trusts the server's identities). Devices
        assume the plan's colluders. Metadata stay on the device beside a DP release,
        as by default."""
        return cls(
            trusted_authorities=trusted_authorities,
            trust_server_identities=not trusted_authorities,
            max_colluding_fraction=settings.secagg_colluding,
            max_delta=max(settings.dp_delta, 1e-5),
            max_epsilon_per_release=None,
            max_epsilon_per_job=None,
            max_epsilon_lifetime=None,
            neighbouring=settings.neighbouring,
            min_secure_cohort=2,
        )

    def check(self, plan: RoundPlan) -> RoundPrivacy | None:
        """The round's privacy as this device accounts it, or None without DP.

        Raises `PrivacyPolicyViolation` if the plan asks for anything outside the
        policy; nothing is trained, charged or sent before this passes."""
        p = plan.privacy
        if p.secagg and not self.trusted_authorities and not self.trust_server_identities:
            raise PrivacyPolicyViolation(
                plan.job,
                "secure aggregation without a pinned identity authority takes every peer's "
                "identity from the server, which could make them all up: pin one "
                "(PrivacyPolicy.trusted_authorities) or accept that "
                "(trust_server_identities=True)",
            )
        if p.distributed_dp and not p.secagg:
            raise PrivacyPolicyViolation(
                plan.job,
                "distributed DP without secure aggregation would send the update unnoised "
                "to the server",
            )
        if p.dp_epsilon is None:
            if self.require_dp:
                raise PrivacyPolicyViolation(
                    plan.job, "the job has no differential privacy; the device requires it"
                )
            return None
        if p.dp_delta > self.max_delta:
            raise PrivacyPolicyViolation(
                plan.job, f"delta {p.dp_delta:g} is over the device's limit {self.max_delta:g}"
            )
        planned = GaussianMechanism.for_release(p.dp_epsilon, p.dp_delta, p.clip, p.neighbouring)
        mechanism = self.account(planned)
        release = mechanism.epsilon(p.dp_delta)
        if self.max_epsilon_per_release is not None and release > self.max_epsilon_per_release * (
            1 + 1e-9
        ):
            raise PrivacyPolicyViolation(
                plan.job,
                f"one release costs epsilon {release:.3g} at delta {p.dp_delta:g} "
                f"({self.neighbouring}), over the device's limit of "
                f"{self.max_epsilon_per_release:g}",
            )
        # The plan's budget, or by default one release per round of the job.
        allowance = p.budget_epsilon or mechanism.epsilon(p.dp_delta, plan.rounds) * (1 + 1e-9)
        if self.max_epsilon_per_job is not None:
            allowance = min(allowance, self.max_epsilon_per_job)
        lifetime = (
            PrivacyBudget(self.max_epsilon_lifetime, p.dp_delta)
            if self.max_epsilon_lifetime is not None
            else None
        )
        return RoundPrivacy(mechanism, PrivacyBudget(allowance, p.dp_delta), lifetime)

    def account(self, mechanism: GaussianMechanism) -> GaussianMechanism:
        """``mechanism`` re-expressed under the device's neighbouring relation: the same
        noise, with the noise multiplier it really has against that relation's
        sensitivity."""
        if mechanism.neighbouring == self.neighbouring:
            return mechanism
        own = GaussianMechanism(mechanism.clip, 1.0, self.neighbouring).sensitivity
        z = mechanism.stddev / own
        if not (z > 0 and math.isfinite(z)):
            raise InvalidInput("the mechanism has no usable noise")
        return GaussianMechanism(mechanism.clip, z, self.neighbouring)
