"""Smoke tests of the Orthanc test harness (tests/orthanc.py) and the study builders."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from dicom_study import (
    pynetdicom_store,
    real_chest,
    storescu,
    synthetic_study,
    two_image_study,
)
from orthanc import Orthanc, free_port, orthanc_missing_reason, run_orthanc

pytestmark = pytest.mark.skipif(
    orthanc_missing_reason() is not None, reason=orthanc_missing_reason() or ""
)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with run_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


def _tags(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)


def _uid(data: bytes) -> str:
    return str(_tags(data).SOPInstanceUID)


def test_starts_and_stores_over_rest(orthanc: Orthanc):
    system = orthanc.get("/system")
    assert system["DicomAet"] == "ORTHANC"
    assert system["DicomPort"] == orthanc.dicom_port
    # Debian's /usr/share/orthanc/plugins/ is not loaded; explorer.js is built in
    assert set(orthanc.get("/plugins")) <= {"explorer.js"}

    data = synthetic_study(1, 0, seed="rest")[0]
    instance = orthanc.upload(data)
    tags = orthanc.instance_tags(instance)
    assert tags["SOPInstanceUID"] == _uid(data)
    assert tags["ViewPosition"] == "PA"
    assert orthanc.find_by("SOPInstanceUID", _uid(data)) == [instance]
    assert orthanc.instance_file(instance) == data


def test_sends_a_study_to_a_storage_scp(tmp_path: Path):
    from pynetdicom import AE, StoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification

    received: list[str] = []
    got_all = threading.Event()

    def on_store(event) -> int:
        received.append(str(event.dataset.SOPInstanceUID))
        if len(received) == 3:
            got_all.set()
        return 0x0000

    scp_port = free_port()
    ae = AE(ae_title="RECEIVER")
    ae.supported_contexts = StoragePresentationContexts  # CR among them
    ae.add_supported_context(Verification)  # for Orthanc's C-ECHO
    scp = ae.start_server(
        ("127.0.0.1", scp_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        modalities = {"receiver": ("RECEIVER", "127.0.0.1", scp_port)}
        with run_orthanc(tmp_path, aet="PACS", modalities=modalities) as pacs:
            study = synthetic_study(2, 1, seed="send")
            for data in study:
                pacs.upload(data)
            assert pacs.echo("receiver")
            [study_id] = pacs.studies()
            answer = pacs.send_to_modality("receiver", [study_id])
            assert answer["InstancesCount"] == 3 and answer["FailedInstancesCount"] == 0
            assert got_all.wait(10)
            assert sorted(received) == sorted(_uid(d) for d in study)
            assert not pacs.echo("nobody")  # not a configured modality
    finally:
        scp.shutdown()


def test_pynetdicom_store_into_orthanc(orthanc: Orthanc):
    before = set(orthanc.instances())
    data = synthetic_study(1, 1, seed="c-store")
    statuses = pynetdicom_store(
        data, "127.0.0.1", orthanc.dicom_port, calling_aet="TESTSCU", called_aet=orthanc.aet
    )
    assert statuses == [0x0000, 0x0000]
    ids = orthanc.wait_for_instances(lambda ids: len(set(ids) - before) == 2, timeout=10)
    uids = {orthanc.instance_tags(i)["SOPInstanceUID"] for i in set(ids) - before}
    assert uids == {_uid(d) for d in data}


def test_storescu_into_orthanc(orthanc: Orthanc, tmp_path: Path):
    files = []
    for i, data in enumerate(synthetic_study(1, 1, seed="storescu")):
        files.append(tmp_path / f"{i}.dcm")
        files[-1].write_bytes(data)
    done = storescu(files, "127.0.0.1", orthanc.dicom_port, calling_aet="DCMTK", called_aet="X")
    assert done.returncode == 0, done.stderr
    for f in files:
        assert orthanc.find_by("SOPInstanceUID", _uid(f.read_bytes()))


def test_real_chest_two_image_study(orthanc: Orthanc):
    source = real_chest()
    if source is None:
        pytest.skip("needs ../shared/data/dicom/pydicom-data_RG1_UNCR.dcm, absent here")
    pa, lateral = two_image_study(source, seed="real")
    assert two_image_study(source, seed="real")[0] == pa  # deterministic from the seed
    statuses = pynetdicom_store(
        [pa, lateral], "127.0.0.1", orthanc.dicom_port, calling_aet="TESTSCU", called_aet="ANY"
    )
    assert statuses == [0x0000, 0x0000]
    found = {
        orthanc.instance_tags(i)["ViewPosition"]: orthanc.instance_tags(i)
        for i in orthanc.find_by("StudyInstanceUID", str(_tags(pa).StudyInstanceUID))
    }
    assert set(found) == {"PA", "LL"}
    assert found["PA"]["SeriesInstanceUID"] != found["LL"]["SeriesInstanceUID"]
    assert found["LL"]["Modality"] == "CR" and found["LL"]["BodyPartExamined"] == "CHEST"
    a, b = (pydicom.dcmread(io.BytesIO(x)) for x in (pa, lateral))
    assert (a.pixel_array[:, ::-1] == b.pixel_array).all()
    assert a.PixelData != b.PixelData
