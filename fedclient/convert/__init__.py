"""Model conversion tools (``fedconvert``): turn a model into the bundle a device trains from.

    from fedclient.convert import convert, resolve, verify_bundle
    source = resolve("cnn", side=28)                 # or "model.onnx", or "pkg.mod:Net"
    manifest = convert(source, "bundles/cnn")        # ONNX Runtime artifacts + manifest.json
    assert verify_bundle("bundles/cnn", source.reference).passed

Nothing here imports ONNX, ONNX Runtime or torch until a model is converted.
"""

from fedclient.convert._convert import BUILTINS, Source, convert, resolve
from fedclient.convert._verify import Check, Verification, verify_bundle

__all__ = ["BUILTINS", "Check", "Source", "Verification", "convert", "resolve", "verify_bundle"]
