"""The clinic side: scoring, QC, storage and the review service.

Import rule: nothing here imports torch, torchvision, monai, mlflow or `diagnostics.train`.
A clinic machine has ONNX Runtime and numpy, not torch. `tests/test_import_rules.py` guards it.
"""
