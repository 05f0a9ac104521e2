"""`diagnostics demo`: end to end on built-in data, with the embedded defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diagnostics.cli.common import (
    _fail,
    _load_train_config,
    _mlflow_ui_hint,
    _training,
    load_data_config,
)
from diagnostics.cli.train import _risk_summary, _summary_table


@_training
def demo(
    n: Annotated[int, typer.Option("--n", min=10)] = 1200,
    size: Annotated[int, typer.Option("--size", min=32)] = 128,
    difficulty: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.7,
    train: Annotated[bool, typer.Option(help="train after checking the data")] = True,
) -> None:
    """End to end on built-in data: synthetic CXR (generate, check, train, evaluate, export,
    register), then a risk model on scikit-learn's bundled breast-cancer table (train, register,
    score records)."""
    from diagnostics.data.check import render, summarize
    from diagnostics.data.cxr import load_dataset
    from diagnostics.data.synthetic import write_dataset
    from diagnostics.settings import get_settings

    home = get_settings().home
    out = home / "demo" / "synth"
    config = Path("configs/cxr/demo.yaml")
    if not config.is_file():
        raise _fail(f"{config} not found: run the demo from the project root")
    typer.echo(
        f"[1/4] synthetic chest X-rays: {n} images at {size} px, difficulty {difficulty} -> {out}"
    )
    manifest = write_dataset(out, n, size=size, seed=0, difficulty=difficulty)
    # images from outside the demo model's population: its population check trains against them
    outside = write_dataset(
        home / "demo" / "synth_outside", max(n // 4, 40), size=size, seed=1, habitus="broad"
    )
    overrides = [
        f"data.labels_file={manifest}",
        f"preprocess.size={size}",
        f"population.check.outside.labels_file={outside}",
    ]
    cfg = load_data_config(config, [o for o in overrides if o.startswith("data.")])
    typer.echo(f"[2/4] data check ({config})")
    typer.echo(render(summarize(load_dataset(cfg))))
    if not train:
        return
    from diagnostics.train.cxr import train_cxr
    from diagnostics.train.evaluate import evaluate as run_eval

    typer.echo("[3/4] train, calibrate, export to ONNX, log and register in MLflow")
    result = train_cxr(_load_train_config(config, overrides))
    typer.echo(_summary_table(result))
    typer.echo("[4/4] evaluate the exported ONNX file on the test split (ONNX Runtime)")
    report = run_eval(result.onnx_path, cfg, split="test", n_boot=200, progress=False)
    qc = report["qc"]
    typer.echo(
        f"{qc['scored_with_a_call']} of {qc['images']} test images scored with a call"
        + (f"; withheld: {qc['withheld_by_reason']}" if qc["withheld"] else "")
    )
    typer.echo(
        "test AUROC: "
        + ", ".join(f"{f} {r['auroc']:.3f}" for f, r in report["findings"].items())
        + f"; mean {report['mean_auroc'] or float('nan'):.4f}"
    )
    _demo_score(result.onnx_path, manifest, home)
    _demo_risk(home)
    typer.echo(_mlflow_ui_hint())


def _demo_score(model: Path, manifest: Path, home: Path) -> None:
    """Score a few images as a clinic would (QC, findings, heatmaps), and three a clinic
    should not send: a blank image, a child (by DICOM age) and another body habitus."""
    import io

    import numpy as np
    import pandas as pd
    from PIL import Image

    from diagnostics.data.synthetic import SynthSpec, dicom_dataset, generate, to_stored
    from diagnostics.serve.runner import OnnxModel, Scorer

    typer.echo(
        "[score] three demo images, and three a clinic should not send: a blank image, a "
        "10-year-old (DICOM PatientAge 010Y; the demo model is for adults) and a body the model "
        "was not trained on (a broad-habitus PNG, no age: the model's own checks decide)"
    )
    paths = pd.read_csv(manifest)["path"].head(3).tolist()
    blank = io.BytesIO()
    Image.fromarray(np.full((128, 128), 90, np.uint8)).save(blank, "PNG")
    items = [(Path(p).name, (manifest.parent / p).read_bytes()) for p in paths]
    items.append(("blank.png", blank.getvalue()))
    spec = SynthSpec(size=128)
    child = generate(1, spec, seed=99)[0][1].pixels
    ds = dicom_dataset(
        to_stored(child, 12, "MONOCHROME2"),
        bits=12,
        photometric="MONOCHROME2",
        uid_seed="demo-child",
    )
    ds.PatientAge = "010Y"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    items.append(("child.dcm", buf.getvalue()))
    broad = generate(1, spec, seed=98, habitus="broad")[0][1].pixels
    png = io.BytesIO()
    Image.fromarray(np.round(broad * 255).astype(np.uint8)).save(png, "PNG")
    items.append(("broad.png", png.getvalue()))
    heat = home / "demo" / "heatmaps"
    scorer = Scorer(OnnxModel(model), heatmap_dir=heat)
    results = scorer.score_many([d for _, d in items], [Path(n).stem for n, _ in items])
    for (name, _), r in zip(items, results, strict=True):
        if r.status == "scored":
            calls = ", ".join(
                f"{f.label} {f.probability:.2f}{'+' if f.positive else ''}" for f in r.findings
            )
            typer.echo(f"  {name}: scored in {r.timing_ms['total']:.0f} ms: {calls}")
        else:
            typer.echo(f"  {name}: {r.status} [{r.code}] {r.message}")
    typer.echo(f"  ('+' = positive; CAM overlays for positives in {heat})")


def _demo_risk(home: Path) -> None:
    """The risk half of the demo: bundled breast-cancer data, train, register, score records."""
    from diagnostics.serve.risk import RiskModel
    from diagnostics.train.risk import load_risk_config, load_source, train_risk

    config = Path("configs/risk/breast_cancer_demo.yaml")
    typer.echo(f"[risk 1/2] train a calibrated risk model ({config})")
    result = train_risk(load_risk_config(config))
    typer.echo(_risk_summary(result))
    typer.echo("[risk 2/2] score records (one implausible, one with a missing value)")
    table = load_source("sklearn:breast_cancer")
    # two malignant and three benign masses (rows 3 and 4 are then altered)
    picked = list(table.index[table["malignant"] == 1][:2]) + list(
        table.index[table["malignant"] == 0][:3]
    )
    records = table.loc[picked].drop(columns="malignant").reset_index(drop=True)
    records.loc[3, "mean_radius"] = 500.0
    records.loc[4, "mean_texture"] = None
    scored = RiskModel(result.onnx_path).score(records)
    out = home / "demo" / "risk_scores.csv"
    scored.to_csv(out, index=False)
    typer.echo(
        scored[["row", "status", "risk", "category", "imputed", "reasons"]].to_string(index=False)
    )
    typer.echo(f"wrote {out}")
