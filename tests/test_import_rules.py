"""The clinic side must not pull in training libraries: a clinic machine has no torch."""

import subprocess
import sys

HEAVY = ("torch", "torchvision", "monai", "mlflow", "sklearn", "diagnostics.train")
SERVE_MODULES = (
    "runner",
    "risk",
    "qc",
    "store",
    "worker",
    "app",
    "upload",
    "config",
    "logs",
    "score_file",
    "registry_client",
)


def _loaded_after(import_line: str) -> set[str]:
    code = f"import sys; {import_line}; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {m for m in out.stdout.strip().split(",") if m}


def test_serve_imports_no_training_libraries():
    assert _loaded_after("import diagnostics.serve") == set()
    for name in SERVE_MODULES:
        assert _loaded_after(f"import diagnostics.serve.{name}") == set(), name


def test_running_the_service_loads_no_training_libraries(cxr_model, tmp_path):
    """Build the app, migrate the store, score a study: still no torch, mlflow or sklearn."""
    line = (
        "from pathlib import Path; "
        "from diagnostics.serve.app import create_app; "
        "from diagnostics.serve.config import ServeConfig; "
        "from diagnostics.serve.runner import OnnxModel; "
        "from diagnostics.serve.store import Store; "
        f"d = Path({str(tmp_path)!r}); "
        "s = Store(f'sqlite:///{d}/s.db', d / 'blobs'); s.migrate(); "
        f"m = OnnxModel({str(cxr_model)!r}); "
        "create_app(ServeConfig(), m, s, d); "
        "import numpy as np; from diagnostics.serve.runner import Scorer; "
        "from PIL import Image; import io; b = io.BytesIO(); "
        "Image.fromarray((np.random.rand(64, 64) * 255).astype('uint8')).save(b, 'PNG'); "
        "Scorer(m).score(b.getvalue())"
    )
    assert _loaded_after(line) == set()


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


def test_ruff_bans_training_imports_in_serve():
    """`make lint` (ruff TID251) refuses training imports in diagnostics/serve, lazy ones too."""
    from pathlib import Path

    import pytest

    ruff = Path(sys.executable).with_name("ruff")
    if not ruff.is_file():
        pytest.skip("ruff is not installed in this venv")
    repo = Path(__file__).resolve().parents[1]
    probe = (
        "import torch.nn\nfrom mlflow import MlflowClient\nimport diagnostics.train.evaluate\n\n\n"
        "def f():\n    from sklearn.linear_model import LogisticRegression\n\n"
        "    return torch, MlflowClient, diagnostics, LogisticRegression\n"
    )
    for where, banned in (("serve", 4), ("train", 0)):
        out = subprocess.run(
            [
                str(ruff),
                "check",
                "--select",
                "TID251",
                "--output-format",
                "concise",
                "--stdin-filename",
                f"diagnostics/{where}/probe.py",
                "-",
            ],
            input=probe,
            capture_output=True,
            text=True,
            cwd=repo,
        )
        assert out.stdout.count("TID251") == banned, (where, out.stdout, out.stderr)
