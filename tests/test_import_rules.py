"""The clinic side must not pull in training libraries: a clinic machine has no torch."""

import subprocess
import sys

HEAVY = ("torch", "torchvision", "monai", "mlflow")


def _loaded_after(import_line: str) -> set[str]:
    code = f"import sys; {import_line}; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {m for m in out.stdout.strip().split(",") if m}


def test_serve_imports_no_training_libraries():
    assert _loaded_after("import diagnostics.serve") == set()
    assert _loaded_after("import diagnostics.serve.runner") == set()
    assert _loaded_after("import diagnostics.serve.risk") == set()


def test_torch_free_modules_stay_torch_free():
    line = (
        "import diagnostics, diagnostics.contract, diagnostics.imaging, diagnostics.settings, "
        "diagnostics.configio; "
        "from diagnostics.imaging import decode, preprocess"
    )
    assert _loaded_after(line) == set()


def test_cli_import_is_light():
    # Commands import heavy modules inside themselves; `diagnostics --help` must stay fast.
    assert _loaded_after("import diagnostics.cli") == set()
