"""Secure aggregation, device role: SecAgg (Bonawitz et al. 2017) and SecAgg+ (Bell et al. 2020).

The server learns the sum, in Z_{2^b}, of the encoded updates of the devices
that sent a masked input, and nothing else about any one of them, against a
*malicious* server colluding with up to the colluders each device assumes:
every key is signed with an identity key an authority the device pins
certified, the devices agree on one roster (signatures of its digest) before
any share leaves, each checks the cohort that roster makes against its own
policy, the SecAgg+ graph comes from the agreed roster, and a consistency round
(signed contributor lists) stops the server from showing devices different
dropouts. What each check stops, and what none can (inputs out of range, a
server that controls more devices than assumed), is in `SecAggClient` and in
the README's threat model.

It is a sans-io protocol core: `SecAggClient` here and
`fedclient.server.secagg.SecAggServer` turn the stage messages of
`fedclient.privacy.secagg` into one another over any transport; both take their
primitives from `fedclient.privacy.secagg.crypto` (keys, shares, masks, signed
statements) and `fedclient.privacy.secagg.shamir` (secret sharing).

    params = SecAggParams.create(range(1, n + 1), vector_length, plus=True)
    q = quantize(update, params.quantization, rng)          # float -> Z_{2^32}
    client = SecAggClient(params, device, signer, trusted_authorities=[authority])
"""

from fedclient.privacy.secagg._choice import Tolerance, choose, safe_threshold, sparse_threshold
from fedclient.privacy.secagg._client import (
    ClientStage,
    SecAggClient,
    assumed_colluders,
    signature_quorum,
)
from fedclient.privacy.secagg._encoding import (
    BLOCK,
    BOUND_SIGMAS,
    RotatedQuantization,
    pack,
    unpack,
)
from fedclient.privacy.secagg._errors import (
    AggregationFailed,
    InvalidShare,
    ProtocolViolation,
    SecAggError,
)
from fedclient.privacy.secagg._messages import (
    EncryptedShare,
    KeyAdvertisement,
    KeyRoster,
    MaskedInput,
    PeerKeys,
    RelayedShare,
    RevealedShare,
    RosterAgreement,
    RosterSignature,
    SecAggMessage,
    ShareBundle,
    ShareKeys,
    SurvivorList,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskResponse,
    Vouch,
    decode,
    encode,
)
from fedclient.privacy.secagg._params import MAX_VECTOR_LENGTH, SecAggParams, roster_context
from fedclient.privacy.secagg._quantize import MODULUS_BITS, Quantization, dequantize, quantize

__all__ = [
    "BLOCK",
    "BOUND_SIGMAS",
    "MAX_VECTOR_LENGTH",
    "MODULUS_BITS",
    "AggregationFailed",
    "ClientStage",
    "EncryptedShare",
    "InvalidShare",
    "KeyAdvertisement",
    "KeyRoster",
    "MaskedInput",
    "PeerKeys",
    "ProtocolViolation",
    "Quantization",
    "RelayedShare",
    "RevealedShare",
    "RosterAgreement",
    "RosterSignature",
    "RotatedQuantization",
    "SecAggClient",
    "SecAggError",
    "SecAggMessage",
    "SecAggParams",
    "ShareBundle",
    "ShareKeys",
    "SurvivorList",
    "SurvivorSignature",
    "Tolerance",
    "UnmaskRequest",
    "UnmaskResponse",
    "Vouch",
    "assumed_colluders",
    "decode",
    "choose",
    "dequantize",
    "encode",
    "pack",
    "quantize",
    "roster_context",
    "safe_threshold",
    "signature_quorum",
    "sparse_threshold",
    "unpack",
]
