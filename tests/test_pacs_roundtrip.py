"""A real PACS in the loop: Debian's Orthanc sends a study to the receiver by C-STORE, and the
TID 1500 SR and the heatmap secondary captures come back into Orthanc by C-STORE; after a
clinician's review, a review SR follows that refers to the first. Skips, with the reason,
where Orthanc (or ../shared) is missing."""

from __future__ import annotations

import io
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from dicom_study import real_chest, synthetic_study, two_image_study
from orthanc import free_port, orthanc_missing_reason, run_orthanc
from service_support import running_service, serve_config

pytestmark = pytest.mark.skipif(
    orthanc_missing_reason() is not None, reason=str(orthanc_missing_reason())
)

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


def _read(data: bytes):
    import pydicom

    return pydicom.dcmread(io.BytesIO(data))


def _referenced_images(sr) -> set[str]:
    return {
        ref.ReferencedSOPInstanceUID
        for evidence in sr.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in evidence.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }


def _until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(what)


def _dsrdump(data: bytes, tmp: Path) -> str | None:
    """dcmtk's reading of an SR (None where dcmtk is not installed)."""
    if shutil.which("dsrdump") is None:
        return None
    path = tmp / "sr.dcm"
    path.write_bytes(data)
    done = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_study_sent_from_orthanc_comes_back_as_a_tid1500_sr_and_heatmaps(cxr_model, tmp_path):
    import highdicom as hd

    chest = real_chest()  # the real chest DICOM; synthetic images where ../shared is absent
    ours = free_port()
    with run_orthanc(
        tmp_path / "pacs",
        aet="ORTHANC",
        modalities={"diagnostics": ("DIAGNOSTICS", "127.0.0.1", ours)},
    ) as pacs:
        cfg = serve_config(
            cxr_model,
            tmp_path / "serve",
            studies={"quiet_period_s": 1.0},
            # the fixture model knows synthetic chests only: this site reads real ones anyway
            qc={"ood": False},
            dicom={
                "enabled": True,
                "port": ours,
                "callers": {"ORTHANC": {"clinic": "clinic-a"}},
                "destinations": {
                    "clinic-a": {
                        "ae_title": "ORTHANC",
                        "host": "127.0.0.1",
                        "port": pacs.dicom_port,
                    }
                },
                "export": {"backoff_s": 0.2, "poll_s": 0.2, "timeout_s": 10},
            },
        )
        with running_service(cfg) as svc:
            model = svc.app.state.holder.model
            label = model.labels[0]
            # this site calls the first finding at a threshold of 0: positive, with a heatmap
            svc.store.save_profile(
                model_sha256=model.sha256,
                site="clinic-a",
                temperatures={label: 1.0},
                thresholds={label: 0.0},
                policy="test: always positive",
                evidence={},
                created_by="test",
            )
            if chest is not None:
                single = chest.read_bytes()
                pa, lateral = two_image_study(chest, seed="pacs-roundtrip")
            else:
                (single,) = synthetic_study(1, 0, seed="pacs-single")
                pa, lateral = synthetic_study(1, 1, seed="pacs-roundtrip")
            sent = [pacs.upload(single), pacs.upload(pa), pacs.upload(lateral)]
            assert pacs.echo("diagnostics")
            pacs.send_to_modality("diagnostics", sent)

            # two studies: one image alone, and PA + lateral; scored after the quiet period
            def final():
                rows = svc.store.list_studies(["clinic-a"])
                done = [r for r in rows if r.status in ("scored", "failed_qc", "failed")]
                return done if len(done) == 2 else None

            studies = _until(final, 60, "both studies scored")
            assert all(s.status == "scored" and s.source == "dicom" for s in studies), [
                (s.status, s.result.get("code")) for s in studies
            ]
            views = {svc.store.study_view(s.id)["instance_count"]: s for s in studies}
            pair = svc.store.study_view(views[2].id)
            assert {i["view"]: i["status"] for i in pair["images"]} == {
                "PA": "scored",
                "LL": "failed_qc",
            }

            # the results arrive back in Orthanc: one SR per study, a capture per positive
            srs = _until(
                lambda: (found := pacs.find_by("Modality", "SR")) and len(found) >= 2 and found,
                90,
                "two SRs in Orthanc",
            )
            captures = _until(
                lambda: (found := pacs.find_by("Modality", "OT")) and len(found) >= 2 and found,
                60,
                "two heatmap captures in Orthanc",
            )
            pa_uid = _read(pa).SOPInstanceUID
            lateral_uid = _read(lateral).SOPInstanceUID
            for orthanc_id in srs:
                data = pacs.instance_file(orthanc_id)
                sr = _read(data)
                assert sr.SOPClassUID == COMPREHENSIVE_SR
                assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
                assert sr.VerificationFlag == "UNVERIFIED" and "unreviewed" in (
                    sr.SeriesDescription.lower()
                )
                report = hd.sr.srread(io.BytesIO(data))
                assert report.SOPInstanceUID == sr.SOPInstanceUID
                refs = _referenced_images(sr)
                if sr.StudyInstanceUID == _read(pa).StudyInstanceUID:
                    assert pa_uid in refs and lateral_uid not in refs  # the lateral was not read
                dump = _dsrdump(data, tmp_path)
                if dump is not None:
                    assert "UNREVIEWED AI RESULT" in dump and "Present" in dump
            for orthanc_id in captures:
                sc = _read(pacs.instance_file(orthanc_id))
                assert sc.BurnedInAnnotation == "YES" and "AI" in sc.SeriesDescription

            # a re-send from the PACS is the same instances: nothing new, nothing scored twice
            before = sum(len(svc.store.study_instances(s.id)) for s in studies)
            pacs.send_to_modality("diagnostics", sent)
            assert sum(len(svc.store.study_instances(s.id)) for s in studies) == before == 3
            assert len(svc.store.list_studies(["clinic-a"])) == 2

            # a clinician reviews every finding of the pair: a review SR follows, after the first
            body = {
                "reviews": [{"finding_id": f["id"], "verdict": "agree"} for f in pair["findings"]]
            }
            r = httpx.post(
                f"{svc.url}/v1/studies/{pair['id']}/reviews",
                json=body,
                headers=svc.headers(svc.reviewer),
            )
            assert r.status_code == 201, r.text
            ai_uids = {_read(pacs.instance_file(i)).SOPInstanceUID for i in srs}

            def review_sr():
                for orthanc_id in pacs.find_by("Modality", "SR"):
                    ds = _read(pacs.instance_file(orthanc_id))
                    if ds.VerificationFlag == "VERIFIED":
                        return ds
                return None

            signed = _until(review_sr, 60, "the review SR in Orthanc")
            predecessors = {
                ref.ReferencedSOPInstanceUID
                for study in signed.PredecessorDocumentsSequence
                for series in study.ReferencedSeriesSequence
                for ref in series.ReferencedSOPSequence
            }
            assert predecessors & ai_uids  # it refers to the AI SR, which is still there
            assert ai_uids <= {_read(pacs.instance_file(i)).SOPInstanceUID for i in srs}
            items = svc.store.outbox_items(study_id=pair["id"])
            assert items and all(i.state == "sent" for i in items)


def test_dcmtk_echo_from_an_unknown_calling_ae_is_rejected(cxr_model, tmp_path):
    if shutil.which("echoscu") is None:
        pytest.skip("dcmtk's echoscu is not installed (Debian package dcmtk)")
    ours = free_port()
    cfg = serve_config(
        cxr_model,
        tmp_path / "serve",
        dicom={"enabled": True, "port": ours, "callers": {"CR_ROOM_1": {"clinic": "clinic-a"}}},
    )
    with running_service(cfg):

        def echo(aet: str) -> int:
            cmd = ["echoscu", "-aet", aet, "-aec", "DIAGNOSTICS", "127.0.0.1", str(ours)]
            return subprocess.run(cmd, capture_output=True, timeout=30).returncode

        assert echo("CR_ROOM_1") == 0
        assert echo("STRANGER") != 0
