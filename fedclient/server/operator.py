"""The operator's side of a server: the admin API's handlers (pause, resume or stop a
job, create one, round history, participation, revoke a device, enrolment codes), and
who may read status and metrics. `FederationService` holds one (``service.operator``);
the app's admin routes call it."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from fedclient._exceptions import Conflict, InvalidInput, InvalidRequest, NotFound, Unauthorized
from fedclient.protocol import DeviceParticipation, JobPlan, JobStatus, RoundSummary
from fedclient.server.auth import hash_token, matches
from fedclient.server.store import ServerStore, serialised

if TYPE_CHECKING:
    from fedclient.server.service import FederationService

__all__ = ["Operator"]


class Operator:
    """The admin API's handlers over one service, each alone among the workers of its
    database (`fedclient.server.store.serialised`)."""

    def __init__(
        self,
        service: FederationService,
        *,
        admin_token: str | None = None,
        public_status: bool = True,
        metrics_token: str | None = None,
        public_metrics: bool = True,
    ) -> None:
        self.service = service
        self.store: ServerStore = service.store
        #: The admin token's hash (`admin_token`); None: no admin API.
        self.admin_token_hash = hash_token(admin_token) if admin_token else None
        #: Whether job and round status need no token.
        self.public_status = public_status
        #: The hash of a token that reads /metrics only (the admin token reads it too).
        self.metrics_token_hash = hash_token(metrics_token) if metrics_token else None
        #: Whether /metrics needs no token (``fedserver`` asks for one unless told).
        self.public_metrics = public_metrics

    def authenticate_admin(self, token: str) -> None:
        """`Unauthorized` unless ``token`` is the admin token (compared in constant time)."""
        if self.admin_token_hash is None or not matches(token, self.admin_token_hash):
            raise Unauthorized("admin token required")

    def authenticate_metrics(self, token: str | None) -> None:
        """/metrics: the metrics token or the admin token (or none, if public)."""
        if self.public_metrics:
            return
        for allowed in (self.metrics_token_hash, self.admin_token_hash):
            if token is not None and allowed is not None and matches(token, allowed):
                return
        raise Unauthorized("metrics need the metrics token or the admin token")

    def authenticate_reader(self, token: str | None) -> None:
        """Job and round status: a device's token or the admin's (or none, if public).
        A read: no lock."""
        if self.public_status:
            return
        if token is None:
            raise Unauthorized("job status needs a device's or the admin's token")
        if self.admin_token_hash is not None and matches(token, self.admin_token_hash):
            return
        self.service.authenticate(token)

    @serialised
    def create_job(self, plan: JobPlan) -> JobStatus:
        """Add a job (the admin API): the same plan again is a no-op, another a 409."""
        existing = self.store.job(plan.job.name)
        if existing is not None and existing.plan != plan:
            raise Conflict(f"job {plan.job.name!r} exists with another plan")
        if existing is None:
            try:
                self.service.add_job(plan)
            except InvalidInput as exc:  # a model the plan cannot build: nothing was stored
                raise InvalidRequest(f"invalid plan: {exc}") from exc
        return self.service.job_status(plan.job.name)

    @serialised
    def set_job_status(self, job_name: str, action: str) -> JobStatus:
        """Pause, resume or stop a job. Stopping fails its open round (nothing more is
        aggregated) and is for good; a finished or stopped job cannot be resumed."""
        job = self.service.job(job_name)
        now = self.service.clock()
        target = {"pause": "paused", "resume": "running", "stop": "stopped"}.get(action)
        if target is None:
            raise NotFound(f"no job action {action!r}; use pause, resume or stop")
        if job.status in ("finished", "stopped"):
            raise Conflict(f"job {job_name!r} is {job.status}")
        with self.store.atomic():
            self.store.set_job_status(job.name, target)
            if target == "stopped":
                for round_ in self.store.open_rounds():
                    if round_.job == job.name:
                        stopped = self.service.job(job.name)
                        self.service.rounds.close(
                            stopped, round_, now, "stopped by the operator", []
                        )
        return self.service.job_status(job.name)

    @serialised
    def round_history(self, job_name: str) -> list[RoundSummary]:
        """Every round of a job, newest first."""
        job = self.service.job(job_name)
        return [self.service.summary(r) for r in self.store.latest_rounds(job.name, 1 << 30)]

    @serialised
    def participation(self, job_name: str) -> list[DeviceParticipation]:
        """Every device that took part in a job, and how."""
        job = self.service.job(job_name)
        return [DeviceParticipation(*row) for row in self.store.participation(job.name)]

    @serialised
    def revoke(self, device_id: str) -> None:
        """Revoke a device: its next request is a 401."""
        with self.store.atomic():
            if not self.store.revoke_device(device_id):
                raise NotFound(f"no device {device_id!r}")
        self.service.forget_device(device_id)  # its cached token

    @serialised
    def issue_codes(self, count: int) -> list[str]:
        """``count`` single-use enrolment codes (kept hashed; shown only here)."""
        codes = [secrets.token_urlsafe(18) for _ in range(count)]
        with self.store.atomic():
            self.store.add_enrolment_codes([hash_token(c) for c in codes], self.service.clock())
        return codes
