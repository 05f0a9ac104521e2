"""Registry governance: two registered demo models, compared, promoted behind gates, rolled
back; MLflow is real (SQLite store in a temp home)."""

from __future__ import annotations

import json
import os

import pytest
from conftest import diagnostics_home, tiny_cxr_config
from typer.testing import CliRunner

from diagnostics.cli import app


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A home with cxr-gov versions 1 (weak: 1 step) and 2 (trained longer)."""
    from diagnostics.data.synthetic import write_dataset
    from diagnostics.train.cxr import train_cxr

    root = tmp_path_factory.mktemp("gov")
    manifest = write_dataset(root / "data", 200, size=64, seed=21, difficulty=0.2)

    def train(steps: int, epochs: int):
        cfg = tiny_cxr_config(
            manifest,
            name=f"gov{steps}",
            size=64,
            width=8,
            blocks=3,
            train={"epochs": epochs, "batch_size": 16, "max_steps_per_epoch": steps, "lr": 0.003},
            tracking={"experiment": "gov", "registered_model": "cxr-gov"},
        )
        return train_cxr(cfg, progress=False)

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    with diagnostics_home(root / "home"):
        weak, strong = train(1, 1), train(20, 4)
        data = {
            "source": "manifest",
            "labels_file": str(manifest),
            "split": {"fractions": {"train": 0.6, "val": 0.4}},
        }
        yield {"root": root, "weak": weak, "strong": strong, "data": data, "manifest": manifest}


def test_delong_matches_a_known_case():
    import numpy as np

    from diagnostics.train.compare import delong

    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    same = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    r = delong(y, same, same)
    assert r["auc1"] == r["auc2"] == 1.0 and r["p_value"] == 1.0
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    good = y + rng.normal(0, 0.6, 400)
    poor = y + rng.normal(0, 3.0, 400)
    r = delong(y, good, poor)
    assert r["auc1"] > r["auc2"] and r["p_value"] < 1e-6


def test_list_compare_promote_rollback(registry, tmp_path):
    import yaml

    runner = CliRunner()
    out = runner.invoke(app, ["models", "list"])
    assert out.exit_code == 0 and "cxr-gov" in out.stdout, out.output
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(yaml.safe_dump({"data": registry["data"]}))
    r = runner.invoke(
        app,
        [
            "models",
            "compare",
            "models:/cxr-gov/2",
            "models:/cxr-gov/1",
            "-c",
            str(cfg),
            "--bootstrap",
            "50",
            "--out",
            str(tmp_path / "cmp"),
        ],
    )
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    f = report["findings"]["Pneumonia"]
    assert {"auroc_diff", "auroc_diff_ci", "delong_p", "disagreements"} <= set(f)
    assert {"calibration_slope", "ece", "sensitivity", "specificity"} <= set(f["candidate"])
    assert report["evidence_run"]
    assert "| Pneumonia |" in (tmp_path / "cmp" / "compare.md").read_text()

    # first champion: version 1, gate without comparison rules
    loose = tmp_path / "loose.yaml"
    loose.write_text(yaml.safe_dump({"data": registry["data"], "bootstrap": 20}))
    r = runner.invoke(
        app,
        [
            "models",
            "promote",
            "models:/cxr-gov/1",
            "--gate",
            str(loose),
            "--out",
            str(tmp_path / "p1"),
        ],
    )
    assert r.exit_code == 0 and "is now @champion" in r.stdout, r.output
    # a gate version 2 cannot pass (sensitivity >= 1.01 is impossible): the alias stays
    strict = tmp_path / "strict.yaml"
    strict.write_text(
        yaml.safe_dump(
            {
                "data": registry["data"],
                "bootstrap": 20,
                "min_specificity": 1.0,
                "min_sensitivity": 1.0,
            }
        )
    )
    from diagnostics.train.governance import _client

    client = _client()

    def champion() -> str:
        return str(client.get_model_version_by_alias("cxr-gov", "champion").version)

    r = runner.invoke(
        app,
        [
            "models",
            "promote",
            "models:/cxr-gov/2",
            "--gate",
            str(strict),
            "--out",
            str(tmp_path / "p2"),
        ],
    )
    assert r.exit_code == 1 and "FAIL" in r.stdout and "stays on 1" in r.stdout, r.output
    assert champion() == "1"
    # a gate it passes moves the alias, with the evidence recorded
    ok = tmp_path / "ok.yaml"
    ok.write_text(
        yaml.safe_dump(
            {"data": registry["data"], "bootstrap": 20, "auroc_margin": 0.5, "max_ece": 1.0}
        )
    )
    r = runner.invoke(
        app,
        [
            "models",
            "promote",
            "models:/cxr-gov/2",
            "--gate",
            str(ok),
            "--out",
            str(tmp_path / "p3"),
        ],
    )
    assert r.exit_code == 0 and "is now @champion (was 1)" in r.stdout, r.output
    assert champion() == "2"
    tags = client.get_model_version("cxr-gov", "2").tags
    assert tags["previous_champion"] == "1" and tags["evidence_run"] != "None"
    # roll back
    r = runner.invoke(app, ["models", "rollback", "cxr-gov"])
    assert r.exit_code == 0 and "2 -> 1" in r.stdout
    assert champion() == "1"
    history = json.loads(client.get_registered_model("cxr-gov").tags["alias_history"])
    assert [h["action"] for h in history] == ["promote", "promote", "rollback"]


def test_a_failing_gate_never_moves_the_alias(registry, tmp_path):
    import yaml

    from diagnostics.train.governance import _client, load_gate, promote

    client = _client()
    holder = str(client.get_model_version_by_alias("cxr-gov", "champion").version)
    other = "2" if holder == "1" else "1"
    gate = tmp_path / "impossible.yaml"
    gate.write_text(
        yaml.safe_dump(
            {
                "data": registry["data"],
                "bootstrap": 0,
                "min_sensitivity": 1.0,
                "min_specificity": 1.0,
            }
        )
    )
    result = promote(
        f"models:/cxr-gov/{other}", "champion", load_gate(gate), out_dir=tmp_path / "x"
    )
    assert not result["promoted"]
    assert [r for r in result["rules"] if not r[1]]  # names the failing rules
    assert str(client.get_model_version_by_alias("cxr-gov", "champion").version) == holder


def test_service_follows_the_champion_without_dropping_a_request(registry, tmp_path):
    """Uploads from 4 threads while @champion moves from version 1 to 2: every upload is
    accepted and scored, and each finding names the version that scored it."""
    import threading
    import time

    from service_support import dicom_bytes, running_service, serve_config, synth_pixels

    from diagnostics.cli import _model_source
    from diagnostics.train.governance import _client

    client = _client()
    client.set_registered_model_alias("cxr-gov", "champion", "1")
    cfg = serve_config(
        "models:/cxr-gov@champion",
        tmp_path / "serve",
        model={"path": "models:/cxr-gov@champion", "refresh_s": 0.2},
        qc={"ood": False, "min_side": 32},  # tiny models, 48 px; what is tested is the switch
    )
    payloads = [dicom_bytes(px) for px in synth_pixels(40, seed=2000, size=48)]
    with running_service(cfg, _model_source(cfg)) as svc:
        assert svc.app.state.holder.model.version == "1"
        results, lock = [], threading.Lock()
        switched = threading.Event()

        def client_thread(chunk: list[bytes]) -> None:
            for j, data in enumerate(chunk):
                if j == len(chunk) // 2:  # half sent before the switch, half after (whatever
                    switched.wait(30)  # the machine's load), while the first half is queued
                r = svc.upload(data)
                with lock:
                    results.append(r)
                time.sleep(0.02)

        threads = [threading.Thread(target=client_thread, args=(payloads[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(results) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert svc.wait(results[0].json()["id"])["findings"][0]["model_version"] == "1"
        client.set_registered_model_alias("cxr-gov", "champion", "2")  # the alias moves
        while svc.app.state.holder.model.version != "2" and time.monotonic() < deadline:
            time.sleep(0.05)
        switched.set()
        for t in threads:
            t.join()
        assert [r.status_code for r in results] == [202] * 40
        docs = [svc.wait(r.json()["id"]) for r in results]
        assert {d["status"] for d in docs} == {"scored"}
        versions = {d["findings"][0]["model_version"] for d in docs}
        deadline = time.monotonic() + 10
        while svc.app.state.holder.model.version != "2" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert svc.app.state.holder.model.version == "2"
        assert versions == {"1", "2"}  # the switch happened under load (seen: 11 by v1, 29 by v2)
        # an admin reload reports the current model; a failed load keeps the old one
        import httpx

        r = httpx.post(f"{svc.url}/v1/admin/model/reload", headers=svc.headers(svc.admin))
        assert r.status_code == 200 and r.json()["model"]["version"] == "2"
        holder = svc.app.state.holder
        holder.source = lambda current: (tmp_path / "missing.onnx", "3")
        assert holder.refresh() is False and holder.model.version == "2"
        assert "missing.onnx" in holder.last_error
        late = svc.upload(dicom_bytes(synth_pixels(1, seed=2100, size=48)[0]))
        assert svc.wait(late.json()["id"])["findings"][0]["model_version"] == "2"


def test_site_recalibration_is_applied_to_that_site_only(registry, tmp_path):
    import yaml
    from service_support import dicom_bytes, running_service, serve_config, synth_pixels

    cfg = serve_config(
        registry["weak"].onnx_path, tmp_path / "serve", qc={"ood": False, "min_side": 32}
    )
    serve_yaml = tmp_path / "serve.yaml"
    serve_yaml.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    site_cfg = tmp_path / "site.yaml"
    site_cfg.write_text(yaml.safe_dump({"data": registry["data"]}))
    runner = CliRunner()
    args = [
        "models",
        "recalibrate",
        str(registry["weak"].onnx_path),
        "-c",
        str(site_cfg),
        "--site",
        "clinic-a",
        "--serve-config",
        str(serve_yaml),
    ]
    r = runner.invoke(app, [*args, "--min-cases", "100000"])
    assert r.exit_code == 2 and "sample too small" in r.output
    r = runner.invoke(app, [*args, "--min-cases", "5", "--policy", "sensitivity>=0.9"])
    assert r.exit_code == 0 and "site profile" in r.stdout, r.output
    with running_service(cfg) as svc:
        profile = svc.store.site_profile(svc.app.state.holder.model.sha256, "clinic-a")
        assert profile is not None and profile.evidence["Pneumonia"]["n"] > 0
        (px,) = synth_pixels(1, seed=2200, size=48)
        a = svc.wait(svc.upload(dicom_bytes(px)).json()["id"])
        b_id = svc.upload(dicom_bytes(px), key=svc.other_clinic).json()["id"]
        b = svc.wait_stored(b_id)
        fa = {f["label"]: f for f in a["findings"]}
        fb = {f["label"]: f for f in b["findings"]}
        assert fa["Pneumonia"]["site_profile"] == profile.id
        assert fa["Pneumonia"]["threshold"] == pytest.approx(profile.thresholds["Pneumonia"])
        assert fb["Pneumonia"]["site_profile"] is None  # clinic-b: the model's own
        assert fb["Pneumonia"]["threshold"] == pytest.approx(
            svc.app.state.holder.model.metadata.thresholds["Pneumonia"].value
        )
        assert a["result"]["site_profile"] == profile.id


def test_reviewer_notebook_runs_against_a_temporary_store(registry, tmp_path):
    """notebooks/compare_runs.ipynb, executed (nbclient) on this module's registry."""
    import nbformat
    import yaml
    from conftest import REPO
    from nbclient import NotebookClient

    path = REPO / "notebooks" / "compare_runs.ipynb"
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # stripped
    data_cfg = tmp_path / "data.yaml"
    data_cfg.write_text(yaml.safe_dump({"data": registry["data"]}))
    from diagnostics.data.config import parse_dataset_config
    from diagnostics.train.governance import compare

    compare(
        "models:/cxr-gov/2",
        "models:/cxr-gov/1",
        parse_dataset_config(registry["data"]),
        n_boot=0,
        out_dir=tmp_path / "cmp",
    )  # a report for the notebook to show
    os.environ.update(NB_MODEL="cxr-gov", NB_VERSIONS="1,2", NB_DATA_CONFIG=str(data_cfg))
    try:
        NotebookClient(
            nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
        ).execute()
    finally:
        for k in ("NB_MODEL", "NB_VERSIONS", "NB_DATA_CONFIG"):
            os.environ.pop(k, None)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = json.dumps([o.get("data", {}) for o in outputs])
    assert "image/png" in text  # the ROC and calibration figure
    assert "Compare:" in text  # the latest compare report
