"""Model conversion tools (``fedconvert``): turn a model into the artifacts a device runs.

Nothing ships here yet; the ONNX Runtime training bundle and TFLite conversion
land with the edge-runtime work.
"""
