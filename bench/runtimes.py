"""Device training speed: the numpy backend vs ONNX Runtime, and each ONNX Runtime engine
beside PyTorch eager.

    python bench/runtimes.py [--data-dir ../shared/data] [--repeats 5] [--side 64]

The first table trains one epoch of minibatch SGD on one device-sized shard per
row (the median over ``--repeats`` runs, after one warm-up epoch), numpy against
ONNX Runtime, plus the one-off cost of loading the ONNX bundle (built once and
cached beforehand). MNIST rows need ``--data-dir``. One thread per session, as
on a device.

Where torch is installed, a second table sets each ONNX Runtime engine beside
PyTorch eager on the same model and data: MobileNetV3-small (torchvision's
architecture, 10 classes, ``--side`` x ``--side`` RGB images; with its backbone
frozen too) and the Shakespeare transformer (examples/shakespeare/charformer.py).
Each engine trains in a process of its own (one thread) so that its peak RSS is
its own: PyTorch eager (``torch.optim.SGD``), ONNX Runtime's training API, and the
bundle's step graph in plain ``onnxruntime.InferenceSession``: examples per
second of a training epoch (the engines take turns ``--repeats`` times, two epochs
after a warm-up each time, and the best counts), each
engine's ratio to PyTorch's, peak RSS. A third table times a device process's
start where torch is installed: importing fedclient and loading a bundle, against
``import onnxruntime`` alone (which, in the training build, imports torch).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedclient.protocol import ModelSpec
from fedclient.runtime import (
    CnnShape,
    NumpyCnn,
    NumpyModel,
    OnnxBackend,
    TrainingBackend,
    write_bundle,
)
from fedclient.runtime._graphs import cnn_graph
from fedclient.sim.datasets import Dataset, load_dataset


def _epoch_ms(
    model: TrainingBackend, x: np.ndarray, y: np.ndarray, batch: int, repeats: int
) -> float:
    rng = np.random.default_rng(0)
    model.train(x, y, epochs=1, batch_size=batch, learning_rate=0.05, rng=rng)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.train(x, y, epochs=1, batch_size=batch, learning_rate=0.05, rng=rng)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _row(
    name: str,
    data: Dataset,
    examples: int,
    batch: int,
    numpy_model: Callable[[], TrainingBackend],
    onnx_model: Callable[[], OnnxBackend],
    repeats: int,
) -> str:
    x, y = data.device_data(np.arange(examples))
    start = time.perf_counter()
    onnx = onnx_model()
    load_ms = (time.perf_counter() - start) * 1e3
    numpy_ms = _epoch_ms(numpy_model(), x, y, batch, repeats)
    onnx_ms = _epoch_ms(onnx, x, y, batch, repeats)
    return (
        f"| {name} | {examples} | {batch} | {numpy_ms:.2f} | {onnx_ms:.2f} | "
        f"{numpy_ms / onnx_ms:.1f}x | {load_ms:.0f} |"
    )


HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODELS = {
    "mobilenetv3": f"{ROOT / 'tests/tools/mobilenetv3.py'}:mobilenet_v3_small",
    "charformer": f"{ROOT / 'examples/shakespeare/charformer.py'}:Net",
}
ENGINES = ("torch", "training", "plain")


def _data(model: str, side: int, examples: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    rng = np.random.default_rng(0)
    if model == "charformer":
        return rng.integers(0, 80, (examples, 80)), rng.integers(0, 80, examples), [80]
    shape = [3, side, side]
    return rng.random((examples, *shape), dtype=np.float32), rng.integers(0, 10, examples), shape


def _factory(target: str) -> Any:
    """``path/to/file.py:name``, imported from its file."""
    location, _, name = target.rpartition(":")
    spec = importlib.util.spec_from_file_location(Path(location).stem, location)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def _peak_mb() -> float:
    """This process's peak RSS (VmHWM: ``ru_maxrss`` would carry the parent's across
    fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args: argparse.Namespace) -> None:
    """One engine, one model: print its figures as JSON."""
    x, y, _ = _data(args.model, args.side, args.examples)
    frozen = ["features."] if args.frozen else []
    if args.engine == "torch":
        import torch

        torch.set_num_threads(1)
        module = _factory(MODELS[args.model])()
        for name, p in module.named_parameters():
            p.requires_grad_(not any(name.startswith(f) for f in frozen))
        module.train(False)  # BatchNorm as the bundle trains it: on its statistics
        optimiser = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.01)
        xt = torch.from_numpy(x.astype(np.int64) if x.dtype.kind == "i" else x)
        yt = torch.from_numpy(y.astype(np.int64))

        def epoch() -> None:
            for i in range(0, len(yt), args.batch):
                loss = torch.nn.functional.cross_entropy(
                    module(xt[i : i + args.batch]), yt[i : i + args.batch]
                )
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()

    else:
        from fedclient.runtime import OnnxBackend

        backend = OnnxBackend(args.bundle, engine=args.engine)

        def epoch() -> None:
            backend.train(
                x,
                y,
                epochs=1,
                batch_size=args.batch,
                learning_rate=0.01,
                rng=np.random.default_rng(0),
            )

    epoch()  # warm-up
    best = float("inf")
    for _ in range(args.repeats):
        started = time.perf_counter()
        epoch()
        best = min(best, time.perf_counter() - started)
    print(json.dumps({"examples_per_s": len(y) / best, "peak_mb": _peak_mb()}))


START = """
import sys, time
started = time.perf_counter()
{body}
seconds = time.perf_counter() - started
status = open("/proc/self/status").read().split("VmHWM:")[1].split()[0]
print(seconds, int(status) / 1024, "torch" in sys.modules)
"""


def _start(body: str) -> tuple[float, float, bool]:
    done = subprocess.run(
        [sys.executable, "-c", START.format(body=body)], capture_output=True, text=True, check=True
    )
    seconds, mb, torch = done.stdout.split()
    return float(seconds), float(mb), torch == "True"


def _run(argv: list[str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, *argv], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def engine_tables(args: argparse.Namespace) -> None:
    """The engines beside PyTorch eager, and a device process's start."""
    from fedclient.convert._convert import convert, resolve

    common = ["--side", str(args.side), "--examples", str(args.examples)]
    common += ["--batch", str(args.batch), "--repeats", "2"]
    print(
        f"one thread, batch {args.batch}, {args.examples} examples an epoch; the engines "
        f"take turns {args.repeats} times, best epoch counts; MobileNetV3-small on "
        f"{args.side}x{args.side} images\n"
    )
    print(
        "| model | PyTorch eager ex/s | training API ex/s (ratio) | step graph ex/s (ratio) "
        "| peak RSS MB (torch / training / plain) |"
    )
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        rows = [("mobilenetv3", False), ("mobilenetv3", True), ("charformer", False)]
        for model, frozen in rows:
            _, _, shape = _data(model, args.side, 1)
            bundle = Path(scratch) / f"{model}-{frozen}"
            dtype = "int64" if model == "charformer" else "float32"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # fresh BatchNorm statistics: said elsewhere
                source = resolve(
                    MODELS[model],
                    input_shape=shape,
                    input_dtype=dtype,
                    frozen=["features."] if frozen else [],
                )
                convert(source, bundle)
            found: dict[str, dict[str, Any]] = {}
            # The engines take turns, --repeats times, and each keeps its best: on a shared
            # machine, load that comes and goes then spreads over all of them.
            for _ in range(args.repeats):
                for engine in ENGINES:
                    argv = ["--worker", model, engine, "--bundle", str(bundle), *common]
                    seen = _run(argv + (["--frozen"] if frozen else []))
                    best = found.get(engine)
                    if best is None or seen["examples_per_s"] > best["examples_per_s"]:
                        found[engine] = seen
            base = found["torch"]["examples_per_s"]
            name = f"{model}{' (backbone frozen)' if frozen else ''}"
            cells = [f"{found['torch']['examples_per_s']:.0f}"]
            cells += [
                f"{found[e]['examples_per_s']:.0f} ({found[e]['examples_per_s'] / base:.2f}x)"
                for e in ("training", "plain")
            ]
            peaks = " / ".join(f"{found[e]['peak_mb']:.0f}" for e in ENGINES)
            print(f"| {name} | {' | '.join(cells)} | {peaks} |", flush=True)
        bundle = Path(scratch) / "charformer-False"
        print("\n| start of a device process (torch installed) | seconds | peak RSS MB | torch |")
        print("|---|---|---|---|")
        for label, body in (
            (
                "fedclient: import, load a bundle (training API)",
                f"from fedclient.runtime import OnnxBackend\nOnnxBackend({str(bundle)!r})",
            ),
            (
                "fedclient: import, load a bundle (step graph)",
                f"from fedclient.runtime import OnnxBackend\n"
                f"OnnxBackend({str(bundle)!r}, engine='plain')",
            ),
            ("`import onnxruntime` alone", "import onnxruntime"),
        ):
            seconds, mb, torch = _start(body)
            print(f"| {label} | {seconds:.2f} | {mb:.0f} | {'yes' if torch else 'no'} |")


def main() -> None:
    """Print the tables."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", help="folder holding mnist/ (adds the MNIST rows)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--side", type=int, default=64, help="MobileNetV3 image side")
    parser.add_argument("--examples", type=int, default=256, help="an epoch, engine table")
    parser.add_argument("--batch", type=int, default=32, help="batch, engine table")
    parser.add_argument("--skip-numpy", action="store_true", help="the engine tables only")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "ENGINE"), help=argparse.SUPPRESS)
    parser.add_argument("--bundle", help=argparse.SUPPRESS)
    parser.add_argument("--frozen", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.model, args.engine = args.worker
        worker(args)
        return
    if not args.skip_numpy:
        numpy_table(args)
    if importlib.util.find_spec("torch") is None:
        print("\n(torch is not installed: no engine table)")
        return
    print()
    engine_tables(args)


def numpy_table(args: argparse.Namespace) -> None:
    """numpy against ONNX Runtime, per epoch."""
    print("| model | examples | batch | numpy ms/epoch | onnx ms/epoch | speed-up | onnx load ms |")
    print("|---|---|---|---|---|---|---|")
    digits = load_dataset("digits")
    mlp = ModelSpec("mlp", 64, [64], 10)
    for examples in (14, 100, 1437):
        print(
            _row(
                "digits mlp 64-64-10",
                digits,
                examples,
                8,
                lambda: NumpyModel(mlp),
                lambda: OnnxBackend.for_spec(mlp),
                args.repeats,
            )
        )
    if args.data_dir:
        mnist = load_dataset("mnist", args.data_dir)
        softmax = ModelSpec("softmax", 784, [], 10)
        print(
            _row(
                "mnist softmax",
                mnist,
                600,
                10,
                lambda: NumpyModel(softmax),
                lambda: OnnxBackend.for_spec(softmax),
                args.repeats,
            )
        )
        shape = CnnShape(side=28, classes=10)
        with tempfile.TemporaryDirectory() as scratch:
            bundle = Path(scratch)
            write_bundle(cnn_graph(shape, NumpyCnn(shape).get_weights()), bundle, name="cnn")
            print(
                _row(
                    "mnist cnn 8-16",
                    mnist,
                    600,
                    10,
                    lambda: NumpyCnn(shape),
                    lambda: OnnxBackend(bundle),
                    max(1, args.repeats // 2),
                )
            )


if __name__ == "__main__":
    main()
