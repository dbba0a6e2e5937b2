"""The public surface is exactly ``__all__``, and importing it stays light."""

from __future__ import annotations

import subprocess
import sys
import types

import fedclient
import fedclient.protocol
import fedclient.server


def test_all_matches_what_the_package_exports() -> None:
    for module in (fedclient, fedclient.protocol, fedclient.server):
        public = {
            name
            for name, value in vars(module).items()
            if not name.startswith("_") and not isinstance(value, types.ModuleType)
        }
        public -= {"annotations"}
        assert set(module.__all__) - {"__version__"} >= public, module
        for name in module.__all__:
            assert getattr(module, name) is not None, name


def test_every_public_name_has_a_docstring() -> None:
    for name in fedclient.__all__:
        obj = getattr(fedclient, name)
        if callable(obj) or isinstance(obj, type):
            assert obj.__doc__, name


def test_importing_fedclient_loads_no_heavy_library() -> None:
    # README: "import fedclient costs ~10 ms (the rest loads on first use); a device that
    # federates loads numpy, httpx and SQLite then".
    code = (
        "import fedclient, sys\n"
        "def loaded(): return sorted({m.split('.')[0] for m in sys.modules} & {"
        "'starlette','uvicorn','matplotlib','onnxruntime','tflite_runtime','torch','sklearn',"
        "'numpy','httpx','sqlite3','sqlite_utils','msgspec','cryptography','safetensors'})\n"
        "print(loaded())\n"
        "fedclient.Client\n"
        "print(loaded())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    at_import, federating = out.stdout.splitlines()
    assert at_import == "[]"
    assert {"'numpy'", "'httpx'", "'sqlite3'"} <= set(federating.strip("[]").split(", "))
    assert "starlette" not in federating and "torch" not in federating
