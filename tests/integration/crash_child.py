"""A device process for the crash tests: runs one round, and SIGKILLs itself at the
N-th SQLite statement or socket operation (counted with sys.setprofile).

usage: crash_child.py SERVER_URL STATE_PATH TRAIN_LOG KILL_AT INLINE_MODEL_MAX
Prints the outcome status when it survives. Each call of the model's train() is
appended to TRAIN_LOG (fsync'd) before it runs.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import numpy as np

import fedclient
from fedclient.runtime import NumpyModel

WATCHED = {
    "Connection.execute",
    "Connection.commit",
    "socket.sendall",
    "socket.send",
    "socket.recv",
    "socket.recv_into",
}


def main() -> None:
    url, state, log, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    inline_model_max = int(sys.argv[5])
    seen = 0

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal seen
        if event == "c_call" and getattr(arg, "__qualname__", "") in WATCHED:
            seen += 1
            if seen == kill_at:
                with open(log + ".where", "a") as f:
                    f.write(f"{kill_at} {arg.__qualname__}\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)

    class LoggedModel(NumpyModel):
        def train(self, *args: Any, **kwargs: Any) -> Any:
            with open(log, "a") as f:
                f.write("train\n")
                f.flush()
                os.fsync(f.fileno())
            return super().train(*args, **kwargs)

    rng = np.random.default_rng(0)
    x = rng.random((40, 64), dtype=np.float32)
    y = rng.integers(0, 10, 40)
    spec = fedclient.protocol.ModelSpec("mlp", 64, [16], 10)
    client = fedclient.Client(
        url,
        "digits",
        (x, y),
        state=state,
        model=LoggedModel(spec),
        seed=1,
        chunk_threshold=1500,
        chunk_bytes=1500,
        inline_model_max=inline_model_max,
        retry=fedclient.RetryPolicy(max_attempts=1),
    )
    sys.setprofile(profile)
    outcome = client.run_once()
    sys.setprofile(None)
    print(outcome.status, flush=True)


if __name__ == "__main__":
    main()
