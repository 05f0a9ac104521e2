"""Test DICOM studies (a PA and a lateral of one study, from a real chest or synthetic pixels)
and two ways to C-STORE them: dcmtk's storescu and pynetdicom."""

from __future__ import annotations

import copy
import hashlib
import io
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from conftest import SHARED_DATA
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from service_support import dicom_bytes, synth_pixels

REAL_CHEST = ("dicom", "pydicom-data_RG1_UNCR.dcm")  # CR, PA, uncompressed explicit VR LE

STORESCU: str | None = shutil.which("storescu")

NO_CONTEXT = -1
"""`pynetdicom_store` status of an instance the peer accepted no presentation context for."""


def real_chest() -> Path | None:
    """A real chest radiograph under ../shared/data, or None when that folder is absent."""
    path = SHARED_DATA.joinpath(*REAL_CHEST)
    return path if path.exists() else None


def _read(source: bytes | Path | Dataset) -> Dataset:
    if isinstance(source, Dataset):
        return source
    if isinstance(source, bytes | bytearray):
        return dcmread(io.BytesIO(source))
    return dcmread(source)


def _part10(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _mirror(ds: Dataset) -> None:
    """Flip the pixels left-right. A compressed source is decoded and stored as explicit VR
    little endian (set_pixel_data changes the transfer syntax with the pixel data)."""
    arr = ds.pixel_array
    columns_axis = -1 if int(ds.SamplesPerPixel) == 1 else -2
    photometric = str(ds.PhotometricInterpretation)
    if photometric.startswith("YBR"):
        photometric = "RGB"  # pixel_array converts YBR to RGB
    ds.set_pixel_data(
        np.ascontiguousarray(np.flip(arr, axis=columns_axis)),
        photometric,
        int(ds.BitsStored),
        generate_instance_uid=False,
    )


def _set_identity(ds: Dataset, seed: str, study_uid: str, view: str, series_number: int) -> None:
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[seed, view, "series"])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[seed, view, "sop"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.ViewPosition = view
    ds.BodyPartExamined = "CHEST"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = 1


def two_image_study(source: bytes | Path, *, seed: str) -> tuple[bytes, bytes]:
    """A PA and a lateral ("LL", pixels mirrored) of one new study, from one real chest file.

    UIDs derive from `seed` (same seed, same UIDs). Modality and SOP class stay the source's.
    The PA keeps the source's pixel data and transfer syntax untouched; the lateral's pixels
    are decoded, mirrored and stored uncompressed (explicit VR little endian)."""
    src = _read(source)
    study_uid = generate_uid(entropy_srcs=[seed, "study"])
    pa = copy.deepcopy(src)
    _set_identity(pa, seed, study_uid, "PA", 1)
    lateral = copy.deepcopy(src)
    _mirror(lateral)
    _set_identity(lateral, seed, study_uid, "LL", 2)
    return _part10(pa), _part10(lateral)


def synthetic_study(n_frontal: int, n_lateral: int, seed: str) -> list[bytes]:
    """One study of synthetic CR images: `n_frontal` PA then `n_lateral` LL (mirrored), each
    view in its own series; UIDs derive from `seed`. Needs no ../shared."""
    int_seed = int.from_bytes(hashlib.sha256(seed.encode()).digest()[:4], "big")
    pixels = synth_pixels(n_frontal + n_lateral, seed=int_seed)
    study_uid = generate_uid(entropy_srcs=[seed, "study"])
    out = []
    for i, px in enumerate(pixels):
        view, number = ("PA", 1) if i < n_frontal else ("LL", 2)
        out.append(
            dicom_bytes(
                px if view == "PA" else np.ascontiguousarray(px[:, ::-1]),
                f"{seed}:{i}",
                StudyInstanceUID=study_uid,
                SeriesInstanceUID=generate_uid(entropy_srcs=[seed, view, "series"]),
                SeriesNumber=number,
                InstanceNumber=(i if view == "PA" else i - n_frontal) + 1,
                ViewPosition=view,
                BodyPartExamined="CHEST",
            )
        )
    return out


# --------------------------------------------------------------------------- senders


def storescu_missing_reason() -> str | None:
    if STORESCU is None:
        return "dcmtk's storescu is not installed (Debian package dcmtk; `make pacs` installs it)"
    return None


# storescu proposes uncompressed syntaxes only, unless told one compressed syntax to add
_STORESCU_PROPOSE = {
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG lossless, first-order prediction
    "1.2.840.10008.1.2.4.50": "-xy",  # JPEG baseline (8 bit)
    "1.2.840.10008.1.2.4.51": "-xx",  # JPEG extended (12 bit)
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "-xw",  # JPEG 2000
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "-xu",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.5": "-xr",  # RLE
    "1.2.840.10008.1.2.1.99": "-xd",  # deflated
}


def storescu(
    files: list[Path],
    host: str,
    port: int,
    *,
    calling_aet: str,
    called_aet: str,
    extra: Iterable[str] = (),
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """dcmtk's storescu on `files` over one association (-R: only the SOP classes they need).
    When the files hold one compressed transfer syntax, it is proposed too (storescu cannot
    propose two in one run; call it once per syntax). Skips the test when dcmtk is absent."""
    reason = storescu_missing_reason()
    if reason is not None:
        import pytest

        pytest.skip(reason)
    assert STORESCU is not None
    syntaxes = {str(dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) for f in files}
    propose = sorted({_STORESCU_PROPOSE[s] for s in syntaxes if s in _STORESCU_PROPOSE})
    if len(propose) > 1:
        raise ValueError(f"storescu proposes one compressed syntax per run, not {propose}")
    cmd = [STORESCU, "-R", *propose, "-aet", calling_aet, "-aec", called_aet, *extra]
    return subprocess.run(
        [*cmd, host, str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class AssociationFailed(RuntimeError):
    """The peer rejected the association, or it was aborted or lost while sending."""

    def __init__(self, message: str, statuses: list[int]):
        super().__init__(message)
        self.statuses = statuses  # those of the instances sent before it failed


def pynetdicom_store(
    items: Iterable[bytes | Path | Dataset],
    host: str,
    port: int,
    *,
    calling_aet: str,
    called_aet: str,
    timeout: float = 30,
) -> list[int]:
    """C-STORE each instance over one pynetdicom association; their status codes (0x0000:
    success; NO_CONTEXT: the peer accepted no presentation context for it). Raises
    AssociationFailed when the association is rejected, aborted or lost."""
    from pynetdicom import AE

    datasets = [_read(item) for item in items]
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    wanted: dict[str, set[str]] = {}
    for ds in datasets:
        wanted.setdefault(str(ds.SOPClassUID), set()).add(str(ds.file_meta.TransferSyntaxUID))
    for sop_class, syntaxes in wanted.items():
        ae.add_requested_context(sop_class, sorted(syntaxes))
    assoc = ae.associate(host, port, ae_title=called_aet)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        raise AssociationFailed(f"association to {called_aet}@{host}:{port} {why}", [])
    statuses: list[int] = []
    try:
        for ds in datasets:
            try:
                status = assoc.send_c_store(ds)
            except ValueError:  # no accepted presentation context for this SOP class / syntax
                statuses.append(NO_CONTEXT)
                continue
            if "Status" not in status:
                raise AssociationFailed("association aborted or lost during C-STORE", statuses)
            statuses.append(int(status.Status))
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses
