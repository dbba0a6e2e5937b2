"""The device's side of secure aggregation inside a round (`fedclient.privacy.secagg`):
instead of an upload, one stage a step, each fetched from and posted to the server's
``/v1/rounds/{id}/secagg/{stage}`` routes, with the update as ring elements (and, with
distributed DP, this device's share of the sum's noise)."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import httpx
import msgspec
import numpy as np

from fedclient._effects import Effect, FlowBase, StepOutcome
from fedclient._effects import SecureSession as _SecureSession
from fedclient._effects import decode_answer as _decode
from fedclient._effects import secagg_module as _secagg
from fedclient._state import Identity
from fedclient.privacy.distributed import device_sigma, honest_shares, ring_holds_noise
from fedclient.privacy.noise import discrete_gaussian
from fedclient.protocol import (
    SECAGG_FETCH,
    SECAGG_POST,
    RoundPlan,
    UploadReceipt,
    decode_tensors,
)
from fedclient.transport import raise_for_error

__all__ = ["SecureUpload"]


class SecureUpload(FlowBase):
    """Secure aggregation as steps of the job loop (`fedclient._flow.JobLoop`)."""

    def _secure_upload(
        self, identity: Identity, plan: RoundPlan, body: bytes
    ) -> Generator[Effect, Any, UploadReceipt | StepOutcome]:
        """Secure aggregation instead of an upload: one stage per step. A step fetches
        the server's answer to the last stage and posts this device's next message, then
        waits (the stage closes only once the others posted too: fetching at once would
        nearly always be answered 425); a stage not closed yet is "waiting" too."""
        waiting = StepOutcome(
            "waiting",
            round_id=plan.round_id,
            retry_after=1.0,
            reason="secure aggregation: waiting for the other devices",
        )
        secagg = _secagg()
        session = self._secure.get(plan.round_id)
        if session is None:
            response = yield self._request(
                SECAGG_FETCH, identity, round_id=plan.round_id, stage="params"
            )
            if response.status_code == 425:
                return waiting
            raise_for_error(response)
            offer = msgspec.msgpack.decode(response.content)
            params = secagg.decode(offer["params"], secagg.SecAggParams)
            if plan.privacy.distributed_dp and params.rotation is None:
                # No common grid: the device's share of the noise could not go in.
                raise secagg.ProtocolViolation(
                    "distributed DP without a rotated grid in the aggregation's parameters"
                )
            # The cohort bounds are the device's own (PrivacyPolicy), checked against the
            # parameters here and against the roster it is shown (`SecAggClient`).
            policy = self.policy
            client = secagg.SecAggClient(
                params,
                int(offer["device"]),
                self._signer(),
                trusted_authorities=policy.trusted_authorities,
                trust_server_identities=policy.trust_server_identities,
                min_honest=policy.min_secure_cohort,
                colluding_fraction=policy.max_colluding_fraction,
                colluding_devices=policy.max_colluding_devices,
            )
            if plan.privacy.distributed_dp:
                self._distributed_sigma(plan, client)  # a ring too narrow: refused now
            session = _SecureSession(client)
            yield from self._secure_post(
                identity, plan, "keys", secagg.encode(session.client.advertise_keys())
            )
            self._secure[plan.round_id] = session
            return waiting
        response = yield self._request(
            SECAGG_FETCH, identity, round_id=plan.round_id, stage=session.stage
        )
        if response.status_code == 425:
            return waiting
        raise_for_error(response)
        client = session.client
        if session.stage == "keys":
            roster = secagg.decode(response.content, secagg.KeyRoster)
            signed, session.stage = client.agree(roster), "agree"
            yield from self._secure_post(identity, plan, "agree", secagg.encode(signed))
        elif session.stage == "agree":
            agreement = secagg.decode(response.content, secagg.RosterAgreement)
            message, session.stage = client.share_keys(agreement), "shares"
            yield from self._secure_post(identity, plan, "shares", secagg.encode(message))
        elif session.stage == "shares":
            bundle = secagg.decode(response.content, secagg.ShareBundle)
            vector = self._secure_vector(plan, body, client)
            masked = client.masked_input(bundle, vector)
            answer = yield from self._secure_post(identity, plan, "masked", secagg.encode(masked))
            session.receipt, session.stage = _decode(answer, UploadReceipt), "masked"
        elif session.stage == "masked":
            survivors = secagg.decode(response.content, secagg.SurvivorList)
            message, session.stage = client.consistency(survivors), "consistency"
            yield from self._secure_post(identity, plan, "consistency", secagg.encode(message))
        else:
            request = secagg.decode(response.content, secagg.UnmaskRequest)
            yield from self._secure_post(
                identity, plan, "unmask", secagg.encode(client.unmask(request))
            )
            self._secure.pop(plan.round_id, None)
            assert session.receipt is not None
            return session.receipt
        return waiting

    def _secure_post(
        self, identity: Identity, plan: RoundPlan, stage: str, body: bytes
    ) -> Generator[Effect, Any, httpx.Response]:
        response: httpx.Response = yield self._request(
            SECAGG_POST,
            identity,
            content=body,
            round_id=plan.round_id,
            stage=stage,
            headers={"Content-Type": "application/msgpack"},
        )
        raise_for_error(response)
        return response

    def _secure_vector(self, plan: RoundPlan, body: bytes, client: Any) -> np.ndarray:
        """The update as ring elements, flat in name order, for ``client``'s aggregation.

        Fixed point (``params.rotation`` None): num_examples x delta, then num_examples,
        so the secure sum divided by its last element is FedAvg's mean. On a rotated
        grid (compressed, or distributed DP): weight x delta, then the weight, with this
        device's share of the noise when the plan asks for distributed DP."""
        params = client.params
        tensors, metadata = decode_tensors(body)
        flat = np.concatenate([tensors[n].ravel() for n in sorted(tensors)])
        # The rounding hides nothing (the masks do): its generator need not be secret.
        rng = np.random.default_rng(None if self.seed is None else [self.seed, plan.round_id, 11])
        rotation = params.rotation
        if plan.privacy.distributed_dp and rotation is None:
            raise _secagg().ProtocolViolation("distributed DP needs the aggregation's grid")
        if rotation is None:
            # Without the count (a DP release keeps it on the device) every update weighs 1.
            examples = float(metadata.get("num_examples", "1"))
            weighted = np.append(flat.astype(np.float64) * examples, examples)
            fixed: np.ndarray = _secagg().quantize(weighted, params.quantization, rng)
            return fixed
        noise = None
        if plan.privacy.distributed_dp:
            noise = self._distributed_noise(plan, client)
        # A few bits cannot carry a count exactly: capped weights (McMahan et al. 2018).
        # With DP every update weighs 1: a weight would put the count, unnoised, in the sum.
        count = metadata.get("num_examples")
        weight = 1.0
        if count is not None and plan.privacy.dp_epsilon is None:
            weight = min(1.0, int(count) / plan.privacy.weight_cap)
        ring: np.ndarray = rotation.encode(flat * weight, weight, rng, noise)
        return ring

    def _distributed_sigma(self, plan: RoundPlan, client: Any) -> float:
        """This device's share of the sum's noise (distributed DP, `fedclient.privacy.
        distributed`), in grid steps: enough that the devices of the aggregation's floor
        beyond the colluders it assumes (who may add none) give the sum the noise
        multiplier the device charged its ledger for. The floor is what every honest
        device enforces before it unmasks (`SecAggClient`), never the plan's word alone.
        Raises `ProtocolViolation` if the aggregation's ring cannot hold that noise (the
        sum would wrap: silently wrong)."""
        privacy = self.policy.check(plan)
        if privacy is None:
            raise _secagg().ProtocolViolation("distributed DP without a DP release to charge")
        mechanism, params = privacy.mechanism, client.params
        rotation = params.rotation
        sensitivity = rotation.sensitivity() * (2.0 if mechanism.neighbouring == "replace" else 1.0)
        shares = honest_shares(params.min_contributors, client.colluders)
        sigma = device_sigma(mechanism.noise_multiplier, sensitivity, shares, rotation.padded)
        if not ring_holds_noise(
            rotation.modulus_bits, rotation.levels, len(params.participants), sigma
        ):
            raise _secagg().ProtocolViolation(
                f"the aggregation's ring is too narrow for this device's noise (sigma {sigma:.3g} "
                f"grid steps for {shares} honest shares): the sum would wrap"
            )
        return sigma

    def _distributed_noise(self, plan: RoundPlan, client: Any) -> np.ndarray:
        """This device's share of the sum's noise (`_distributed_sigma`), from its CSPRNG."""
        rotation = client.params.rotation
        sigma = self._distributed_sigma(plan, client)
        noise: np.ndarray = discrete_gaussian(sigma, rotation.padded, self._noise_source(plan))
        return noise
