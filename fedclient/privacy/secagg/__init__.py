"""Secure aggregation, device role: SecAgg (Bonawitz et al. 2017) and SecAgg+ (Bell et al. 2020).

The server learns the exact sum, in Z_{2^32}, of the quantised updates of the
devices that sent a masked input, and nothing else about any one of them, as
long as at most ``threshold - 1`` share-holders of any device collude with it
and no more than the tolerated number of devices drop out. It is a sans-io
protocol core: `SecAggClient` here and `fedserver_ref.secagg.SecAggServer`
turn the stage messages of `fedclient.privacy.secagg` into one another over
any transport.

Threat model: an honest-but-curious server. The consistency round of Bonawitz
et al.'s actively secure variant (signatures over the survivor set, which needs
a PKI) is not implemented: a server that lies to different devices about who
dropped can learn a device's input. Devices' inputs are not checked to be in
range (a device can always spoil the sum, never learn another's input).

    params = SecAggParams.create(range(1, n + 1), vector_length, plus=True)
    q = quantize(update, params.quantization, rng)          # float -> Z_{2^32}
    client = SecAggClient(params, device)                   # see SecAggClient
"""

from fedclient.privacy.secagg._client import ClientStage, SecAggClient
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
    UnmaskRequest,
    UnmaskResponse,
    decode,
    encode,
)
from fedclient.privacy.secagg._params import MAX_VECTOR_LENGTH, SecAggParams, default_neighbours
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
    "UnmaskRequest",
    "UnmaskResponse",
    "decode",
    "default_neighbours",
    "dequantize",
    "encode",
    "pack",
    "quantize",
    "unpack",
]
