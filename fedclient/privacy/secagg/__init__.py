"""Secure aggregation, device role: SecAgg (Bonawitz et al. 2017) and SecAgg+ (Bell et al. 2020).

The server learns the sum, in Z_{2^b}, of the encoded updates of the devices
that sent a masked input, and nothing else about any one of them, against a
*malicious* server colluding with up to the tolerated share of devices: every
key is signed with an enrolled identity key (certified by an identity authority
the device pins, if it pins one), the SecAgg+ graph comes from the signed
roster, and a consistency round (signed contributor lists) stops the server
from showing devices different dropouts. What each check stops, and what none
can (a server that enrols devices of its own without an authority; inputs out
of range), is in `SecAggClient` and in the README's threat model.

It is a sans-io protocol core: `SecAggClient` here and
`fedclient.server.secagg.SecAggServer` turn the stage messages of
`fedclient.privacy.secagg` into one another over any transport.

    params = SecAggParams.create(range(1, n + 1), vector_length, plus=True)
    q = quantize(update, params.quantization, rng)          # float -> Z_{2^32}
    client = SecAggClient(params, device, signer)           # see SecAggClient
"""

from fedclient.privacy.secagg._choice import Tolerance, choose, safe_threshold
from fedclient.privacy.secagg._client import ClientStage, SecAggClient, signature_quorum
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
from fedclient.privacy.secagg._params import MAX_VECTOR_LENGTH, SecAggParams
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
    "decode",
    "choose",
    "dequantize",
    "encode",
    "pack",
    "quantize",
    "safe_threshold",
    "signature_quorum",
    "unpack",
]
