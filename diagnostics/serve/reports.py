"""Reports to the HIS: FHIR R4 DiagnosticReport with one Observation per finding, and the same
report as plain text in Vietnamese or English. Torch-free, plain dicts (tests validate them
with `fhir.resources`).

Status is `preliminary` until every finding has a clinician review, `final` after. A study
scored with a flag (outside the model's intended population) has findings with no
interpretation, and each says why in a note. The model's
identity (name, registry version, sha256) is a contained `Device` that each Observation names.
No patient identity is added: the HIS links the report through the DICOM SOP Instance UID.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from diagnostics.contract import PreprocessSpec
from diagnostics.serve.i18n import finding as finding_name
from diagnostics.serve.i18n import image_status, outside_reason, t

FINDING_SYSTEM = "https://diagnostics.example/fhir/CodeSystem/cxr-finding"
REPORT_SYSTEM = "https://diagnostics.example/fhir/CodeSystem/report"
DECISION_SYSTEM = "https://diagnostics.example/fhir/CodeSystem/review-decision"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"


def shown_model(view: dict[str, Any]) -> dict[str, Any]:
    """The model version and sha256 a study's findings came from (for the audit trail)."""
    first = view["findings"][0] if view["findings"] else {}
    return {"model_version": first.get("model_version"), "model_sha256": first.get("model_sha256")}


def complete_operating_points(view: dict[str, Any], model: Any = None) -> dict[str, Any]:
    """The view, with the operating point of findings stored before it was recorded filled in
    from the very model file that scored them (same sha256; `recovered_from` "model_file"),
    when that file is `model` (an `OnnxModel`, the one serving now). Never from another file:
    a finding scored by an older model keeps only its stored threshold, and says so."""
    if model is None:
        return view
    meta = model.metadata
    for f in view.get("findings", []):
        op = f.get("operating_point")
        if op is None or op["recorded"] or op["recovered_from"] or op["source"] is not None:
            continue
        thr = meta.thresholds.get(f["label"])
        if f["model_sha256"] != model.sha256 or thr is None:
            continue
        if abs(thr.value - f["threshold"]) > 1e-9:  # not the model's own threshold
            continue
        op.update(
            recovered_from="model_file",
            source="model",
            temperature=meta.temperature[meta.labels.index(f["label"])],
            policy=thr.policy,
            sensitivity=thr.sensitivity,
            specificity=thr.specificity,
        )
    return view


def stored_preprocessing(result: dict[str, Any] | None, model: Any) -> tuple[PreprocessSpec, str]:
    """The preprocessing a study was scored with, and how it is known: `recorded` (stored
    with the result), `same_model` (not stored, but the model serving now is the very file
    that scored it) or `current_model` (not stored; the current model's, which may differ)."""
    result = result or {}
    doc = result.get("preprocessing")
    if isinstance(doc, dict):
        try:
            return PreprocessSpec.model_validate(doc), "recorded"
        except ValueError:  # pydantic's ValidationError is a ValueError
            pass
    same = result.get("model_sha256") == model.sha256
    return model.metadata.preprocessing, "same_model" if same else "current_model"


def operating_point_text(f: dict[str, Any], lang: str) -> str | None:
    """How a finding's threshold was chosen and what it gave, in words; None if not known."""
    op = f.get("operating_point") or {}
    if not op.get("policy"):
        return None

    def pct(x: Any) -> str:
        return "—" if x is None else f"{100 * x:.1f}%"

    where = "measured_site" if op.get("source") == "site_profile" else "measured_model"
    return t(
        lang,
        "report_operating_point",
        policy=op["policy"],
        sensitivity=pct(op.get("sensitivity")),
        specificity=pct(op.get("specificity")),
        where=t(lang, where),
    )


def no_call_reason(view: dict[str, Any], lang: str) -> str:
    """Why a flagged study's findings carry no call, in the reader's language."""
    return outside_reason(lang, (view.get("result") or {}).get("population") or {})


def report_status(view: dict[str, Any]) -> str:
    findings = view["findings"]
    reviewed = findings and all(f["review"] is not None for f in findings)
    return "final" if reviewed else "preliminary"


def fhir_report(
    view: dict[str, Any], lang: str = "en", dicom_uids: list[tuple[str, str]] | None = None
) -> dict:
    """A FHIR R4 DiagnosticReport for a scored study view (`Store.study_view`).
    `dicom_uids`: the study's DICOM identifiers as (kind, UID), kind "study" (its Study
    Instance UID) or "instance" (an image's SOP Instance UID) (`Store.dicom_uids`), which the
    HIS knows the study by."""
    status = report_status(view)
    findings = view["findings"]
    first = findings[0] if findings else {}
    device = {
        "resourceType": "Device",
        "id": "model",
        "identifier": [
            {"system": "urn:ietf:rfc:3986", "value": f"sha256:{first.get('model_sha256', '')}"}
        ],
        "deviceName": [
            {"name": view.get("result", {}).get("model_name") or "cxr-model", "type": "model-name"}
        ],
        "version": [{"value": str(first.get("model_version") or "unregistered")}],
    }
    observations = []
    for f in findings:
        review = f["review"]
        components = [
            {
                "code": {"text": "threshold"},
                "valueQuantity": {
                    "value": f["threshold"],
                    "unit": "1",
                    "system": "http://unitsofmeasure.org",
                    "code": "1",
                },
            }
        ]
        op = f.get("operating_point") or {}
        if op.get("policy"):  # the stored operating point the call was made at
            where = "site" if op.get("source") == "site_profile" else "validation"
            components.append({"code": {"text": "threshold policy"}, "valueString": op["policy"]})
            for name in ("sensitivity", "specificity"):
                if op.get(name) is not None:
                    components.append(
                        {
                            "code": {"text": f"{name} at threshold ({where})"},
                            "valueQuantity": {
                                "value": op[name],
                                "unit": "1",
                                "system": "http://unitsofmeasure.org",
                                "code": "1",
                            },
                        }
                    )
        if review is not None:
            components.append(
                {
                    "code": {"text": "clinician decision"},
                    "valueCodeableConcept": {
                        "coding": [{"system": DECISION_SYSTEM, "code": review["verdict"]}]
                    },
                }
            )
            if review["corrected_label"]:
                components.append(
                    {
                        "code": {"text": "corrected finding"},
                        "valueCodeableConcept": {
                            "coding": [
                                {
                                    "system": FINDING_SYSTEM,
                                    "code": review["corrected_label"],
                                    "display": finding_name(lang, review["corrected_label"]),
                                }
                            ]
                        },
                    }
                )
        notes = []
        if f["positive"] is None:  # scored with a flag: say why there is no call
            notes.append({"text": t(lang, "report_no_call", reason=no_call_reason(view, lang))})
        if review is not None and review["note"]:
            notes.append({"text": review["note"]})
        obs: dict[str, Any] = {
            "resourceType": "Observation",
            "id": f"finding-{f['id']}",
            "status": "final" if review is not None else "preliminary",
            "code": {
                "coding": [
                    {
                        "system": FINDING_SYSTEM,
                        "code": f["label"],
                        "display": finding_name(lang, f["label"]),
                    }
                ],
                "text": finding_name(lang, f["label"]),
            },
            "valueQuantity": {
                "value": f["probability"],
                "unit": "1",
                "system": "http://unitsofmeasure.org",
                "code": "1",
            },
            "device": {"reference": "#model"},
            "component": components,
        }
        if f["positive"] is not None:  # no interpretation where no call was made
            code = "POS" if f["positive"] else "NEG"
            obs["interpretation"] = [{"coding": [{"system": INTERPRETATION, "code": code}]}]
        if notes:
            obs["note"] = notes
        observations.append(obs)
    for r in view.get("unlisted", []):  # findings the clinician added
        label = r["corrected_label"]
        obs = {
            "resourceType": "Observation",
            "id": f"added-{r['id']}",
            "status": "final",
            "code": {
                "coding": [
                    {"system": FINDING_SYSTEM, "code": label, "display": finding_name(lang, label)}
                ],
                "text": finding_name(lang, label),
            },
            "interpretation": [{"coding": [{"system": INTERPRETATION, "code": "POS"}]}],
            "component": [
                {
                    "code": {"text": "clinician decision"},
                    "valueCodeableConcept": {
                        "coding": [{"system": DECISION_SYSTEM, "code": "added"}]
                    },
                }
            ],
        }
        if r["note"]:
            obs["note"] = [{"text": r["note"]}]
        observations.append(obs)
    identifiers = [{"system": "urn:diagnostics:study", "value": view["id"]}]
    kinds = {"study": "Study Instance UID", "instance": "SOP Instance UID"}
    identifiers += [
        {"type": {"text": kinds[kind]}, "system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}
        for kind, uid in dicom_uids or []
    ]
    return {
        "resourceType": "DiagnosticReport",
        "id": view["id"],
        "language": lang,
        "identifier": identifiers,
        "status": status,
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                        "code": "RAD",
                        "display": "Radiology",
                    }
                ]
            }
        ],
        "code": {
            "coding": [
                {
                    "system": REPORT_SYSTEM,
                    "code": "cxr-ai-review",
                    "display": t(lang, "report_title"),
                }
            ],
            "text": t(lang, "report_title"),
        },
        "effectiveDateTime": view["created_at"],
        "issued": datetime.now(UTC).isoformat(timespec="seconds"),
        "contained": [device, *observations],
        "result": [{"reference": f"#{o['id']}"} for o in observations],
        "conclusion": text_report(view, lang, header=False),
    }


def text_report(view: dict[str, Any], lang: str = "en", *, header: bool = True) -> str:
    """The report in plain words, one line per finding."""
    lines = []
    if header:
        lines.append(t(lang, "report_title"))
        lines.append(f"{t(lang, 'study')}: {view['id']}  {t(lang, 'clinic')}: {view['clinic']}")
        lines.append(f"{t(lang, 'status')}: {t(lang, 'report_status_' + report_status(view))}")
    if view.get("flag"):
        lines.append(t(lang, "report_no_call", reason=no_call_reason(view, lang)))
    for f in view["findings"]:
        if f["positive"] is None:
            line = t(
                lang,
                "report_line_no_call",
                finding=finding_name(lang, f["label"]),
                probability=f"{f['probability']:.2f}",
            )
        else:
            line = t(
                lang,
                "report_line",
                finding=finding_name(lang, f["label"]),
                result=t(lang, "positive" if f["positive"] else "negative"),
                probability=f"{f['probability']:.2f}",
                threshold=f"{f['threshold']:.2f}",
            )
            how = operating_point_text(f, lang)
            if how:
                line += f"; {how}"
        review = f["review"]
        if review is not None:
            line += "; " + t(lang, "report_review", verdict=t(lang, review["verdict"]).lower())
            if review["corrected_label"]:
                line += ", " + t(
                    lang, "report_corrected", label=finding_name(lang, review["corrected_label"])
                )
        lines.append(line)
    for r in view.get("unlisted", []):
        lines.append(t(lang, "report_added", finding=finding_name(lang, r["corrected_label"])))
    images = view.get("images") or []
    for image in images if len(images) > 1 else []:  # a study of several: what each image was
        status = image_status(lang, image["status"], image["code"], image["view"])
        lines.append(
            t(
                lang,
                "report_image",
                position=image["position"],
                view=image["view"] or "—",
                status=status,
            )
        )
    return "\n".join(lines)
