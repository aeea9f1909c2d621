"""Online serving: FastAPI + ONNX Runtime, micro-batching, prediction log, web page.

Import :func:`visionops.serve.app.create_app` / :func:`visionops.serve.app.run_server`.
Nothing in this package imports torch.
"""
