"""What secure aggregation costs, and how often it aborts, at the default k and threshold.

    python bench/secagg.py                        # n=100 and 1,000; 0/10/30% dropout; 50 seeds
    python bench/secagg.py --devices 100 --dropouts 0.3 --seeds 10 --params 10000

For each number of devices and dropout rate, two measurements:

- **Cost** (one run, ``--params`` parameters, seed 1). Every device is real:
  the devices run the `SecAggClient` in ``--workers`` processes (the sans-io
  core needs no server in the same process), the server runs
  `fedclient.server.secagg.SecAggServer` in this process, and every message
  crosses as MessagePack bytes, which are what the byte counts count. The
  dropped devices vanish after sharing their keys, before sending a masked
  input: the costliest point for the server, which must then rebuild their
  mask keys and remove their pairwise masks from every surviving neighbour.
  The result is checked bit-exact against the plain sum of the contributors'
  quantised inputs. Times are CPU seconds (``time.process_time``) of the
  protocol calls, decoding and encoding included; one device (the "probe")
  runs in this process after the fleet finished each stage, so its figures
  are those of a device with a CPU to itself.
- **Aborts** (``--seeds`` runs of the whole protocol, 8 parameters, seeds 1..N):
  the fraction of aggregations that end without a sum when that share of the
  devices, drawn at random, drops after sharing keys. Every device checks
  everything as in a deployment (signed roster, cohort bounds and threshold
  against 20% colluding, the roster agreed by a quorum of signatures before it
  shares, the contributor list's quorum); a device that aborts drops out.

k and t are `SecAggParams.create`'s defaults (`fedclient.privacy.secagg.choose`:
20% colluding, 30% dropout, 2^-40 both ways); the floor is 2 beyond the 20%.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from fedclient.identity import SigningKey
from fedclient.privacy.secagg import (
    KeyAdvertisement,
    KeyRoster,
    MaskedInput,
    RosterAgreement,
    RosterSignature,
    SecAggClient,
    SecAggError,
    SecAggParams,
    ShareBundle,
    ShareKeys,
    SurvivorList,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskResponse,
    assumed_colluders,
    decode,
    encode,
    quantize,
)
from fedclient.server.secagg import SecAggServer

STAGES = ("advertise", "agree", "share", "mask", "consistency", "unmask")
#: The fleet's devices assume 20% colluding and want 2 devices beyond them in a sum.
COLLUDING, MIN_HONEST = 0.2, 2


def signer(seed: int, device: int) -> SigningKey:
    """The device's identity key: reproducible, so workers and the server agree on it."""
    return SigningKey(hashlib.sha256(f"bench/{seed}/{device}".encode()).digest())


def create_params(devices: int, length: int) -> SecAggParams:
    """SecAgg+ at the defaults, with the floor the fleet's devices accept."""
    floor = MIN_HONEST + assumed_colluders(devices, COLLUDING)
    return SecAggParams.create(range(1, devices + 1), length, plus=True, min_contributors=floor)


def client_for(params: SecAggParams, device: int, seed: int) -> SecAggClient:
    """A device that trusts the identity keys the server relays (no authority pinned:
    certificates would add one signature check per peer and change nothing else)."""
    return SecAggClient(
        params,
        device,
        signer(seed, device),
        trust_server_identities=True,
        min_honest=MIN_HONEST,
        colluding_fraction=COLLUDING,
    )


def device_input(params: SecAggParams, seed: int, device: int) -> np.ndarray:
    """The quantised update of ``device``: reproducible, so workers need not ship it."""
    rng = np.random.default_rng([seed, device])
    update = rng.normal(0.0, 0.05, params.vector_length)
    return quantize(update, params.quantization, rng)


def answer(
    client: SecAggClient, stage: str, data: bytes | None, x: np.ndarray | None
) -> tuple[bytes, float]:
    """One device's reply to one stage's message, and the seconds it took."""
    start = time.process_time()
    message: Any
    if stage == "advertise":
        message = client.advertise_keys()
    elif stage == "agree":
        message = client.agree(decode(data or b"", KeyRoster))
    elif stage == "share":
        message = client.share_keys(decode(data or b"", RosterAgreement))
    elif stage == "mask":
        assert x is not None
        message = client.masked_input(decode(data or b"", ShareBundle), x)
    elif stage == "consistency":
        message = client.consistency(decode(data or b"", SurvivorList))
    else:
        message = client.unmask(decode(data or b"", UnmaskRequest))
    body = encode(message)
    return body, time.process_time() - start


def worker(conn: Connection, params_bytes: bytes, devices: list[int], seed: int) -> None:
    """Run ``devices``' clients: answer each stage's messages, with the time each took."""
    params = decode(params_bytes, SecAggParams)
    clients = {d: client_for(params, d, seed) for d in devices}
    while True:
        stage, payload = conn.recv()
        if stage == "stop":
            return
        replies: dict[int, tuple[bytes, float]] = {}
        partial = np.zeros(params.vector_length, dtype=np.uint32)
        for device, data in payload.items():
            x = device_input(params, seed, device) if stage == "mask" else None
            replies[device] = answer(clients[device], stage, data, x)
            if x is not None:
                np.add(partial, x, out=partial)
        conn.send((replies, partial))


@dataclass
class Ledger:
    """Per-stage times and bytes of the server and of every device."""

    server_seconds: dict[str, float] = field(default_factory=dict)
    device_seconds: dict[int, dict[str, float]] = field(default_factory=dict)
    up: dict[int, int] = field(default_factory=dict)
    down: dict[int, int] = field(default_factory=dict)

    def device(self, device: int, stage: str, seconds: float, up: int, down: int) -> None:
        self.device_seconds.setdefault(device, {})[stage] = seconds
        self.up[device] = self.up.get(device, 0) + up
        self.down[device] = self.down.get(device, 0) + down


class Fleet:
    """The device processes, each owning a slice of the clients."""

    def __init__(self, params: SecAggParams, workers: int, seed: int, probe: int) -> None:
        ctx = mp.get_context("fork")
        self.owner: dict[int, int] = {}
        self.pipes: list[Connection] = []
        self.procs = []
        body = encode(params)
        others = [d for d in params.participants if d != probe]
        for w in range(workers):
            mine = others[w::workers]
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker, args=(child, body, mine, seed), daemon=True)
            proc.start()
            self.pipes.append(parent)
            self.procs.append(proc)
            for d in mine:
                self.owner[d] = w

    def round(
        self, stage: str, inbox: dict[int, bytes | None]
    ) -> tuple[dict[int, tuple[bytes, float]], np.ndarray | None]:
        batches: list[dict[int, bytes | None]] = [{} for _ in self.pipes]
        for device, body in inbox.items():
            batches[self.owner[device]][device] = body
        for pipe, batch in zip(self.pipes, batches, strict=True):
            pipe.send((stage, batch))
        replies: dict[int, tuple[bytes, float]] = {}
        total: np.ndarray | None = None
        for pipe in self.pipes:
            part, partial = pipe.recv()
            replies.update(part)
            total = partial if total is None else total + partial
        return replies, total

    def close(self) -> None:
        for pipe in self.pipes:
            pipe.send(("stop", {}))
        for proc in self.procs:
            proc.join()


def run(
    mode: str, devices: int, length: int, dropout: float, workers: int, seed: int
) -> dict[str, Any]:
    params = create_params(devices, length)
    groups = params.group_sizes
    label = "SecAgg+" if mode == "plus" else "SecAgg"
    print(
        f"\n== {label}: {devices} devices x {length:,} parameters, "
        f"{int(dropout * devices)} drop before the masked input =="
    )
    print(
        f"   neighbours {params.neighbours or devices - 1}, share groups of {groups[1]}, "
        f"threshold {params.threshold}, modulus 2^32, bound +-{params.quantization.bound}"
    )
    dropped = set(random.Random(seed).sample(params.participants, int(dropout * devices)))
    # One device runs here, alone, after the fleet finished each stage: its times are
    # those of a device with the CPU to itself.
    probe = min(set(params.participants) - dropped)
    probe_client = client_for(decode(encode(params), SecAggParams), probe, seed)
    ledger = Ledger()
    server = SecAggServer(params, {d: (signer(seed, d).public, None) for d in params.participants})
    announce = len(encode(params))
    fleet = Fleet(params, workers, seed, probe)
    wall = time.perf_counter()
    try:
        inbox: dict[int, bytes | None] = {d: None for d in params.participants}
        for d in params.participants:
            ledger.device(d, "params", 0.0, 0, announce)
        kinds: dict[str, tuple[type[Any], Callable[[int, Any], None], Callable[[], Any]]] = {
            "advertise": (KeyAdvertisement, server.receive_keys, server.close_advertise),
            "agree": (RosterSignature, server.receive_agreement, server.close_agreement),
            "share": (ShareKeys, server.receive_shares, server.close_sharing),
            "mask": (MaskedInput, server.receive_masked_input, server.close_masking),
            "consistency": (
                SurvivorSignature,
                server.receive_consistency,
                server.close_consistency,
            ),
            "unmask": (UnmaskResponse, server.receive_unmask, server.finish),
        }
        expected = None
        result = None
        for stage in STAGES:
            t0 = time.perf_counter()
            replies, partial = fleet.round(stage, {d: b for d, b in inbox.items() if d != probe})
            device_wall = time.perf_counter() - t0
            x = device_input(params, seed, probe) if stage == "mask" else None
            replies[probe] = answer(probe_client, stage, inbox[probe], x)
            if stage == "mask":
                assert partial is not None and x is not None
                expected = partial + x
            kind, receive, close = kinds[stage]
            start = time.process_time()
            for device, (body, _) in sorted(replies.items()):
                receive(device, decode(body, kind))
            out = close()
            answers = {} if stage == "unmask" else {d: encode(m) for d, m in out.items()}
            ledger.server_seconds[stage] = time.process_time() - start
            for device, (body, seconds) in replies.items():
                ledger.device(device, stage, seconds, len(body), len(inbox[device] or b""))
            if stage == "unmask":
                result = out
                break
            next_stage = STAGES[STAGES.index(stage) + 1]
            inbox = {
                d: b for d, b in answers.items() if not (next_stage == "mask" and d in dropped)
            }
            for d in set(answers) - set(inbox):
                ledger.down[d] = ledger.down.get(d, 0) + len(answers[d])
            print(
                f"   stage {stage:<9} devices {device_wall:7.1f} s wall ({workers} processes), "
                f"server {ledger.server_seconds[stage]:6.2f} CPU s"
            )
        print(f"   stage {'unmask':<9} server {ledger.server_seconds['unmask']:6.2f} CPU s")
    finally:
        fleet.close()
    assert result is not None and expected is not None
    exact = np.array_equal(result.ring_sum, expected)
    contributors = [d for d in params.participants if d not in dropped and d != probe]
    totals = sorted(sum(ledger.device_seconds[d].values()) for d in contributors)
    per_stage = ledger.device_seconds[probe]
    server_total = sum(ledger.server_seconds.values())
    print(
        f"   result: {len(result.contributors)} contributors, {len(result.dropped)} dropped, "
        f"ring sum bit-exact: {exact}"
    )
    print(
        f"   server : {server_total:7.2f} CPU s "
        f"({', '.join(f'{s} {ledger.server_seconds[s]:.2f}' for s in STAGES)}); "
        f"in {sum(ledger.up.values()) / 1e6:.1f} MB, "
        f"out {sum(ledger.down.values()) / 1e6:.1f} MB; "
        f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
    )
    print(
        f"   device : {sum(per_stage.values()):7.3f} CPU s (device #{probe} alone: "
        f"{', '.join(f'{s} {per_stage[s]:.3f}' for s in STAGES)}); "
        f"up {ledger.up[probe] / 1e3:.1f} kB, down {ledger.down[probe] / 1e3:.1f} kB "
        f"(raw update {4 * length / 1e3:.1f} kB)"
    )
    print(
        f"   fleet  : median {statistics.median(totals):.3f} CPU s, slowest {totals[-1]:.3f} "
        f"per device, {workers} device processes sharing the CPUs"
    )
    print(f"   bench wall time {time.perf_counter() - wall:.1f} s")
    if not exact:
        raise SystemExit("the secure sum differs from the plain sum")
    return {
        "k": params.neighbours or devices - 1,
        "t": params.threshold,
        "server": server_total,
        "device": sum(per_stage.values()),
        "up": ledger.up[probe],
        "down": ledger.down[probe],
    }


def trial(args: tuple[int, int, float, int]) -> bool:
    """One whole aggregation in this process; True if it aborted."""
    devices, length, dropout, seed = args
    params = create_params(devices, length)
    server = SecAggServer(params, {d: (signer(seed, d).public, None) for d in params.participants})
    clients = {d: client_for(params, d, seed) for d in params.participants}
    dropped = set(random.Random(seed).sample(params.participants, int(dropout * devices)))
    try:
        for d, c in clients.items():
            server.receive_keys(d, c.advertise_keys())
        rosters = server.close_advertise()
        for d, roster in rosters.items():
            server.receive_agreement(d, clients[d].agree(roster))
        agreements = server.close_agreement()
        for d, agreement in agreements.items():
            server.receive_shares(d, clients[d].share_keys(agreement))
        bundles = server.close_sharing()
        for d, bundle in bundles.items():
            if d not in dropped:
                x = device_input(params, seed, d)
                server.receive_masked_input(d, clients[d].masked_input(bundle, x))
        lists = server.close_masking()
        for d, listed in lists.items():
            server.receive_consistency(d, clients[d].consistency(listed))
        requests = server.close_consistency()
        for d, request in requests.items():
            server.receive_unmask(d, clients[d].unmask(request))
        server.finish()
    except SecAggError:
        return True
    return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="100,1000", help="comma list")
    parser.add_argument("--params", type=int, default=100_000)
    parser.add_argument("--dropouts", default="0,0.1,0.3", help="comma list of fractions")
    parser.add_argument("--seeds", type=int, default=50, help="aggregations per abort figure")
    parser.add_argument("--workers", type=int, default=2, help="device processes")
    args = parser.parse_args(argv)
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, {mp.cpu_count()} CPUs")
    rows = []
    for devices in (int(n) for n in args.devices.split(",")):
        for dropout in (float(f) for f in args.dropouts.split(",")):
            cost = run("plus", devices, args.params, dropout, args.workers, 1)
            started = time.perf_counter()
            with mp.get_context("fork").Pool(args.workers) as pool:
                jobs = [(devices, 8, dropout, seed) for seed in range(1, args.seeds + 1)]
                aborted = sum(pool.map(trial, jobs))
            print(
                f"   aborts : {aborted} of {args.seeds} aggregations "
                f"({time.perf_counter() - started:.0f} s)"
            )
            rows.append((devices, dropout, cost, aborted))
    print(
        "\n| devices | dropout | k | t | server CPU s | device CPU s | device up kB "
        "| device down kB | aborted |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for devices, dropout, cost, aborted in rows:
        print(
            f"| {devices:,} | {dropout:.0%} | {cost['k']} | {cost['t']} | "
            f"{cost['server']:.2f} | {cost['device']:.3f} | {cost['up'] / 1e3:.1f} | "
            f"{cost['down'] / 1e3:.1f} | {aborted}/{args.seeds} |"
        )


if __name__ == "__main__":
    main()
