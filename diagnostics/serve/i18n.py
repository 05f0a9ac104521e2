"""The one message catalogue for the review page and the reports: English and Vietnamese.

`t(lang, key, **values)` looks a message up; `finding(lang, label)` names a finding. A key missing
in Vietnamese falls back to English, and a test checks that none is missing.
"""

from __future__ import annotations

import re

LANGS = ("vi", "en")

FINDING_NAMES: dict[str, dict[str, str]] = {  # names of contract.FINDINGS
    "en": {
        "Pneumonia": "Pneumonia",
        "Effusion": "Pleural effusion",
        "Cardiomegaly": "Cardiomegaly",
        "Nodule": "Nodule",
        "Pneumothorax": "Pneumothorax",
        "Atelectasis": "Atelectasis",
        "Infiltration": "Infiltration",
        "Mass": "Mass",
        "Consolidation": "Consolidation",
        "Edema": "Pulmonary oedema",
        "Emphysema": "Emphysema",
        "Fibrosis": "Fibrosis",
        "Pleural_Thickening": "Pleural thickening",
        "Hernia": "Hernia",
        "No_Finding": "No finding",
        "Lung_Opacity": "Lung opacity",
        "Lung_Lesion": "Lung lesion",
        "Fracture": "Fracture",
        "Support_Devices": "Support devices",
        "Enlarged_Cardiomediastinum": "Enlarged cardiomediastinum",
        "Pleural_Other": "Other pleural abnormality",
        "Aortic_Enlargement": "Aortic enlargement",
        "Calcification": "Calcification",
        "ILD": "Interstitial lung disease",
        "Other_Lesion": "Other lesion",
        "Tuberculosis": "Tuberculosis",
        "COPD": "COPD",
    },
    "vi": {
        "Pneumonia": "Viêm phổi",
        "Effusion": "Tràn dịch màng phổi",
        "Cardiomegaly": "Tim to",
        "Nodule": "Nốt phổi",
        "Pneumothorax": "Tràn khí màng phổi",
        "Atelectasis": "Xẹp phổi",
        "Infiltration": "Thâm nhiễm phổi",
        "Mass": "Khối u phổi",
        "Consolidation": "Đông đặc phổi",
        "Edema": "Phù phổi",
        "Emphysema": "Khí phế thũng",
        "Fibrosis": "Xơ phổi",
        "Pleural_Thickening": "Dày màng phổi",
        "Hernia": "Thoát vị",
        "No_Finding": "Không có bất thường",
        "Lung_Opacity": "Mờ phổi",
        "Lung_Lesion": "Tổn thương phổi",
        "Fracture": "Gãy xương",
        "Support_Devices": "Thiết bị hỗ trợ",
        "Enlarged_Cardiomediastinum": "Trung thất giãn rộng",
        "Pleural_Other": "Bất thường màng phổi khác",
        "Aortic_Enlargement": "Giãn động mạch chủ",
        "Calcification": "Vôi hóa",
        "ILD": "Bệnh phổi kẽ",
        "Other_Lesion": "Tổn thương khác",
        "Tuberculosis": "Lao phổi",
        "COPD": "Bệnh phổi tắc nghẽn mạn tính (COPD)",
    },
}

MESSAGES: dict[str, dict[str, str]] = {
    "en": {
        "app_title": "Chest X-ray review",
        "login": "Sign in",
        "logout": "Sign out",
        "username": "User name",
        "password": "Password",
        "login_failed": "Wrong user name or password.",
        "worklist": "Worklist",
        "agreement": "Agreement",
        "study": "Study",
        "clinic": "Clinic",
        "status": "Status",
        "received": "Received",
        "finding": "Finding",
        "all": "All",
        "filter": "Filter",
        "triage": "Triage",
        "positive_flag": "AI positive",
        "no_studies": "No studies match.",
        "page": "Page {page} of {pages}",
        "previous": "Previous",
        "next": "Next",
        "open": "Open",
        "probability": "AI probability",
        "threshold": "Threshold",
        "result": "AI result",
        "positive": "positive",
        "negative": "negative",
        "threshold_help": (
            "The AI calls a finding positive when its probability is at or above the threshold. "
            "The threshold was chosen on validation images ({policy}); at it, the model found "
            "{sensitivity} of true cases and correctly cleared {specificity} of normal images. "
            "It is a suggestion: your reading decides."
        ),
        "heatmap": "Heatmap",
        "opacity": "Opacity",
        "qc": "Quality checks",
        "qc_passed": "passed",
        "qc_failed": "failed",
        "model": "Model",
        "version": "version",
        "review": "Your review",
        "agree": "Agree",
        "disagree": "Disagree",
        "uncertain": "Uncertain",
        "no_review": "(no review)",
        "corrected_label": "Corrected finding (optional)",
        "note": "Note",
        "not_listed": "Finding not listed",
        "submit": "Submit review",
        "saved": "Review saved.",
        "latest_review": "Latest review",
        "history": "Earlier reviews",
        "impression": "Your impression before seeing the AI",
        "impression_help": (
            "This site asks for your own reading first. The AI result is shown after."
        ),
        "impression_submit": "Record impression and show the AI result",
        "language": "Tiếng Việt",
        "studies_status_scored": "scored",
        "studies_status_failed_qc": "refused by QC",
        "studies_status_failed": "failed",
        "studies_status_queued": "queued",
        "studies_status_running": "running",
        "studies_status_received": "receiving images",
        "report_title": "Chest X-ray AI findings with clinician review",
        "report_status_final": "final (reviewed)",
        "report_status_preliminary": "preliminary (not yet reviewed)",
        "report_line": "{finding}: AI {result} (probability {probability}, threshold {threshold})",
        "report_review": "clinician: {verdict}",
        "report_corrected": "corrected to {label}",
        "report_added": "{finding}: added by the clinician (not listed by the AI)",
        "report_image": "Image {position} ({view}): {status}",
        "agreement_title": "Agreement between clinicians and the AI",
        "agreed": "Agreed",
        "reviewed": "Reviewed",
        "share": "Share agreed",
        "forbidden": "You may not see this page.",
        "csrf_failed": "The form expired. Please try again.",
        "population": "Intended population",
        "population_line": (
            "Made for: {ages}; {modalities}, {views} views. Training images: {description}"
        ),
        "ages_range": "ages {lo} to {hi} years",
        "ages_range_under": "ages {lo} to under {hi} years",
        "ages_any": "any age",
        "years": "{n} years",
        "months": "{n} months",
        "no_call": "no call",
        "model_output": "model output (not a call)",
        "flag_outside": "Outside the model's population",
        "outside_by_age": (
            "The patient's age ({age}) is outside the ages the model was made for ({ages})."
        ),
        "outside_by_check": (
            "No age was given, and the image does not look like a patient the model was made for "
            "({ages})."
        ),
        "no_call_help": (
            "The AI makes no positive or negative call for this study, and it is not triaged: "
            "{reason} Read it without the AI."
        ),
        "report_no_call": "No AI call: {reason}",
        "report_line_no_call": "{finding}: no AI call (model output {probability}, not a call)",
        "threshold_help_site": (
            "The AI calls a finding positive when its probability is at or above the threshold. "
            "This site's own threshold was chosen on the site's labelled images ({policy}); on "
            "them, the model found {sensitivity} of true cases and correctly cleared "
            "{specificity} of normal images. It is a suggestion: your reading decides."
        ),
        "operating_point_from_model_file": (
            "(Read from the model file that scored this study: the operating point was not "
            "stored with the finding then.)"
        ),
        "operating_point_from_profile": (
            "(Read from the site profile that judged this study: the operating point was not "
            "stored with the finding then.)"
        ),
        "operating_point_unknown": (
            "The AI calls a finding positive when its probability is at or above the threshold "
            "({threshold}). This study was scored before the operating point was stored with "
            "each finding, by a model file no longer served here: how the threshold was chosen, "
            "and its sensitivity and specificity, are not known. Your reading decides."
        ),
        "preprocessing_unrecorded": (
            "This study was scored before its preprocessing was stored with it. The image is "
            "shown as the current model prepares it, which may differ from what the scoring "
            "model saw: the heatmaps may not line up exactly."
        ),
        "report_operating_point": (
            "threshold chosen by {policy}: sensitivity {sensitivity}, specificity {specificity} "
            "{where}"
        ),
        "measured_model": "on the model's validation images",
        "measured_site": "on this site's images",
        "monitor_title": "Patients outside the model's population, per site and day",
        "monitor_help": (
            "Refused or flagged as outside the model's intended population, or unlike its "
            "training images (out of distribution). An alert is raised when a day's share reaches"
            " {level} with at least {n} studies: the site may be sending patients the model was "
            "not made for."
        ),
        "day": "Day (UTC)",
        "studies": "Studies",
        "refused_population": "Refused: population",
        "flagged_population": "Flagged: population",
        "refused_ood": "Refused: unlike training",
        "outside_share": "Share outside",
        "positive_share": "Share AI positive",
        "alert": "Alert",
        "images": "Images",
        "image_scored": "scored",
        "image_received": "waiting to be scored",
        "image_late": "arrived after scoring: not scored",
        "image_failed": "could not be read: not scored",
        "image_refused": "refused by quality checks: not scored",
        "image_lateral": "Lateral view: not scored",
        "image_code_view_not_frontal": "Not a frontal view: not scored",
        "image_code_body_part_not_chest": "Not a chest image: not scored",
        "image_code_modality_not_supported": "Modality not supported: not scored",
        "image_code_colour_image": "Colour photograph: not scored",
        "image_code_constant_image": "Blank image: not scored",
        "image_code_image_too_small": "Image too small: not scored",
        "image_code_out_of_distribution": "Unlike the model's training images: not scored",
        "image_code_outside_intended_population": "Outside the model's population: not scored",
        "image_unavailable": "This image cannot be shown.",
        "per_image": "Per image",
        "zoom_in": "Zoom in",
        "zoom_out": "Zoom out",
        "reset_view": "Reset",
        "window_width": "Window width (W)",
        "window_level": "Window level (L)",
        "preset_default": "Default",
        "preset_lung": "Lung",
        "preset_soft": "Soft tissue",
        "model_view": "Model's view",
        "viewer_help": (
            "Wheel: zoom · drag: pan · right-drag or Shift+drag: window (left-right) and level "
            "(up-down) · keys + − 0. Model's view: the image as the AI saw it, with its heatmaps."
        ),
        "risk_nav": "Risk",
        "risk_title": "Risk worklist",
        "risk_help": (
            "Clinical records a risk model scored at the clinic. Records awaiting an outcome come "
            "first, high risk before low. Record the confirmed outcome once it is known: it shows "
            "how well the model works at this site."
        ),
        "risk_of": "risk of {label}",
        "risk_label_dengue": "dengue",
        "risk_time": "Time",
        "risk_model": "Model",
        "risk_probability": "Risk",
        "risk_category": "Category",
        "risk_high": "High risk",
        "risk_low": "Low risk",
        "risk_imputed": "Imputed values",
        "risk_imputed_help": "Missing values the model estimated",
        "risk_none": "none",
        "risk_status_scored": "Scored",
        "risk_status_refused": "Refused",
        "risk_awaiting": "Awaiting outcome",
        "risk_awaiting_only": "Awaiting an outcome only",
        "risk_reasons": "Details",
        "risk_code_outside_intended_population": "Outside the model's intended population",
        "risk_code_population_unknown": (
            "Intended population unknown: a value needed to check it (such as age) is missing"
        ),
        "risk_code_invalid_value": "A value is invalid, implausible or not an allowed code",
        "risk_code_outcome_missing": "No usable outcome",
        "risk_calibration": "Site calibration",
        "risk_profile": "site calibration #{id}",
        "risk_profile_raw": "model before calibration: {p}",
        "risk_profile_threshold_only": "the site's threshold only; risk not recalibrated",
        "risk_sent": "Values sent",
        "risk_sent_help": (
            "The record's values as the clinic sent them; the patient and site identifiers are "
            "not shown"
        ),
        "risk_sent_not_served": "model not served here: values not shown",
        "risk_sent_unreadable": "the record as sent cannot be read",
        "risk_fhir_notes": "Notes on reading the FHIR Bundle",
        "risk_model_file": "model file",
        "risk_agreement_profile": "site profile #{id}",
        "risk_agreement_own": "model's own calibration",
        "risk_outcome": "Confirmed outcome",
        "risk_outcome_confirmed": "Confirmed",
        "risk_outcome_ruled_out": "Ruled out",
        "risk_outcome_unknown": "Unknown",
        "risk_outcome_help": (
            "Confirmed: the diagnosis was confirmed (for example by a laboratory test). Ruled "
            "out: it was excluded. Unknown: no result will come."
        ),
        "risk_outcome_save": "Save outcome",
        "risk_outcome_change": "Change",
        "risk_outcome_saved": "Outcome saved.",
        "risk_refused_no_outcome": (
            "This record was refused and never scored: it takes no outcome."
        ),
        "risk_no_records": "No records match.",
        "risk_truncated": (
            "Only the newest {n} records of each part are shown: use the filters to narrow the "
            "list."
        ),
        "risk_agreement_title": "Agreement and calibration per site",
        "risk_agreement_help": (
            "From the outcomes recorded here (confirmed or ruled out). Agreement: the category "
            "(high or low) matched the outcome. A calibration intercept near 0 and a slope near 1"
            ": the risks shown match what happened at the site. Calibration needs at least {n} "
            "outcomes, with both confirmed and ruled-out cases."
        ),
        "risk_no_agreement": "No outcomes recorded yet.",
        "risk_n": "With outcome",
        "risk_positives": "Confirmed",
        "risk_agreement": "Agreement",
        "risk_sensitivity": "Sensitivity",
        "risk_specificity": "Specificity",
        "risk_auroc": "AUROC",
        "risk_cal_intercept": "Calibration intercept",
        "risk_cal_slope": "Calibration slope",
        "risk_mean_vs_rate": "Mean risk / observed rate",
        "risk_note_one_class": "only one kind of outcome so far: no AUROC or calibration",
        "risk_note_too_few": "fewer than {n} outcomes: no calibration yet",
        "risk_note_separated": "calibration slope undefined (the outcomes are perfectly separated)",
    },
    "vi": {
        "app_title": "Đọc phim X-quang ngực",
        "login": "Đăng nhập",
        "logout": "Đăng xuất",
        "username": "Tên đăng nhập",
        "password": "Mật khẩu",
        "login_failed": "Sai tên đăng nhập hoặc mật khẩu.",
        "worklist": "Danh sách cần đọc",
        "agreement": "Mức đồng thuận",
        "study": "Ca chụp",
        "clinic": "Cơ sở",
        "status": "Trạng thái",
        "received": "Thời điểm nhận",
        "finding": "Dấu hiệu",
        "all": "Tất cả",
        "filter": "Lọc",
        "triage": "Ưu tiên",
        "positive_flag": "AI dương tính",
        "no_studies": "Không có ca nào phù hợp.",
        "page": "Trang {page} / {pages}",
        "previous": "Trang trước",
        "next": "Trang sau",
        "open": "Mở",
        "probability": "Xác suất (AI)",
        "threshold": "Ngưỡng",
        "result": "Kết quả AI",
        "positive": "dương tính",
        "negative": "âm tính",
        "threshold_help": (
            "AI kết luận dương tính khi xác suất bằng hoặc vượt ngưỡng. Ngưỡng được chọn trên "
            "ảnh kiểm định ({policy}); tại ngưỡng này mô hình phát hiện {sensitivity} số ca "
            "bệnh thật và loại trừ đúng {specificity} số ảnh bình thường. Đây chỉ là gợi ý: "
            "kết luận là của bác sĩ."
        ),
        "heatmap": "Bản đồ nhiệt",
        "opacity": "Độ đậm",
        "qc": "Kiểm tra chất lượng",
        "qc_passed": "đạt",
        "qc_failed": "không đạt",
        "model": "Mô hình",
        "version": "phiên bản",
        "review": "Đánh giá của bác sĩ",
        "agree": "Đồng ý",
        "disagree": "Không đồng ý",
        "uncertain": "Chưa chắc chắn",
        "no_review": "(chưa đánh giá)",
        "corrected_label": "Dấu hiệu đúng (nếu có)",
        "note": "Ghi chú",
        "not_listed": "Dấu hiệu không có trong danh sách",
        "submit": "Gửi đánh giá",
        "saved": "Đã lưu đánh giá.",
        "latest_review": "Đánh giá mới nhất",
        "history": "Các đánh giá trước",
        "impression": "Nhận định của bác sĩ trước khi xem kết quả AI",
        "impression_help": "Cơ sở này yêu cầu bác sĩ đọc phim trước. Kết quả AI hiện ra sau đó.",
        "impression_submit": "Lưu nhận định và xem kết quả AI",
        "language": "English",
        "studies_status_scored": "đã chấm",
        "studies_status_failed_qc": "bị từ chối (chất lượng)",
        "studies_status_failed": "lỗi",
        "studies_status_queued": "đang chờ",
        "studies_status_running": "đang xử lý",
        "studies_status_received": "đang nhận ảnh",
        "report_title": "Kết quả AI X-quang ngực và đánh giá của bác sĩ",
        "report_status_final": "chính thức (đã đánh giá)",
        "report_status_preliminary": "sơ bộ (chưa đánh giá)",
        "report_line": "{finding}: AI {result} (xác suất {probability}, ngưỡng {threshold})",
        "report_review": "bác sĩ: {verdict}",
        "report_corrected": "sửa thành {label}",
        "report_added": "{finding}: bác sĩ bổ sung (AI không liệt kê)",
        "report_image": "Ảnh {position} ({view}): {status}",
        "agreement_title": "Mức đồng thuận giữa bác sĩ và AI",
        "agreed": "Đồng ý",
        "reviewed": "Đã đánh giá",
        "share": "Tỷ lệ đồng ý",
        "forbidden": "Bạn không có quyền xem trang này.",
        "csrf_failed": "Biểu mẫu đã hết hạn. Vui lòng thử lại.",
        "population": "Nhóm bệnh nhân dự kiến",
        "population_line": (
            "Dành cho: {ages}; {modalities}, tư thế {views}. Ảnh huấn luyện: {description}"
        ),
        "ages_range": "từ {lo} đến {hi} tuổi",
        "ages_range_under": "từ {lo} đến dưới {hi} tuổi",
        "ages_any": "mọi lứa tuổi",
        "years": "{n} tuổi",
        "months": "{n} tháng",
        "no_call": "không kết luận",
        "model_output": "đầu ra mô hình (không phải kết luận)",
        "flag_outside": "Ngoài nhóm bệnh nhân của mô hình",
        "outside_by_age": (
            "Tuổi của bệnh nhân ({age}) nằm ngoài độ tuổi mà mô hình được xây dựng ({ages})."
        ),
        "outside_by_check": (
            "Không có thông tin tuổi, và hình ảnh không giống bệnh nhân mà mô hình được xây dựng "
            "({ages})."
        ),
        "no_call_help": (
            "AI không đưa ra kết luận dương tính hay âm tính cho ca này và không xếp ưu tiên: "
            "{reason} Hãy đọc phim không dựa vào AI."
        ),
        "report_no_call": "AI không kết luận: {reason}",
        "report_line_no_call": (
            "{finding}: AI không kết luận (đầu ra mô hình {probability}, không phải kết luận)"
        ),
        "threshold_help_site": (
            "AI kết luận dương tính khi xác suất bằng hoặc vượt ngưỡng. Ngưỡng riêng của cơ sở "
            "này được chọn trên ảnh đã có kết luận của cơ sở ({policy}); trên các ảnh đó mô "
            "hình phát hiện {sensitivity} số ca bệnh thật và loại trừ đúng {specificity} số ảnh "
            "bình thường. Đây chỉ là gợi ý: kết luận là của bác sĩ."
        ),
        "operating_point_from_model_file": (
            "(Lấy từ tệp mô hình đã chấm ca này: khi đó điểm vận hành chưa được lưu cùng kết quả.)"
        ),
        "operating_point_from_profile": (
            "(Lấy từ hồ sơ hiệu chỉnh của cơ sở đã áp dụng cho ca này: khi đó điểm vận hành chưa "
            "được lưu cùng kết quả.)"
        ),
        "operating_point_unknown": (
            "AI kết luận dương tính khi xác suất bằng hoặc vượt ngưỡng ({threshold}). Ca này được "
            "chấm trước khi điểm vận hành được lưu cùng mỗi kết quả, bởi một tệp mô hình không "
            "còn được dùng ở đây: không rõ ngưỡng được chọn thế nào, độ nhạy và độ đặc hiệu của "
            "nó. Kết luận là của bác sĩ."
        ),
        "preprocessing_unrecorded": (
            "Ca này được chấm trước khi cách tiền xử lý được lưu cùng ca. Ảnh được hiển thị theo "
            "cách của mô hình hiện tại, có thể khác với ảnh mô hình đã chấm thấy: bản đồ nhiệt "
            "có thể không khớp hoàn toàn."
        ),
        "report_operating_point": (
            "ngưỡng chọn theo {policy}: độ nhạy {sensitivity}, độ đặc hiệu {specificity} {where}"
        ),
        "measured_model": "trên ảnh kiểm định của mô hình",
        "measured_site": "trên ảnh của cơ sở này",
        "monitor_title": "Bệnh nhân ngoài nhóm của mô hình, theo cơ sở và ngày",
        "monitor_help": (
            "Bị từ chối hoặc đánh dấu vì ngoài nhóm bệnh nhân dự kiến của mô hình, hoặc không "
            "giống ảnh huấn luyện. Cảnh báo khi tỷ lệ trong ngày đạt {level} với ít nhất {n} ca: "
            "cơ sở có thể đang gửi bệnh nhân mà mô hình không được xây dựng cho."
        ),
        "day": "Ngày (UTC)",
        "studies": "Số ca",
        "refused_population": "Từ chối: ngoài nhóm",
        "flagged_population": "Đánh dấu: ngoài nhóm",
        "refused_ood": "Từ chối: khác ảnh huấn luyện",
        "outside_share": "Tỷ lệ ngoài nhóm",
        "positive_share": "Tỷ lệ AI dương tính",
        "alert": "Cảnh báo",
        "images": "Các ảnh chụp",
        "image_scored": "AI đã chấm",
        "image_received": "đang chờ AI chấm",
        "image_late": "đến sau khi ca đã chấm: AI không chấm",
        "image_failed": "không đọc được ảnh: AI không chấm",
        "image_refused": "bị từ chối khi kiểm tra chất lượng: AI không chấm",
        "image_lateral": "Phim nghiêng: AI không chấm",
        "image_code_view_not_frontal": "Không phải phim thẳng: AI không chấm",
        "image_code_body_part_not_chest": "Không phải phim ngực: AI không chấm",
        "image_code_modality_not_supported": "Loại máy chụp không được hỗ trợ: AI không chấm",
        "image_code_colour_image": "Ảnh màu, không phải phim X-quang: AI không chấm",
        "image_code_constant_image": "Ảnh trống: AI không chấm",
        "image_code_image_too_small": "Ảnh quá nhỏ: AI không chấm",
        "image_code_out_of_distribution": "Không giống ảnh huấn luyện của mô hình: AI không chấm",
        "image_code_outside_intended_population": (
            "Ngoài nhóm bệnh nhân của mô hình: AI không chấm"
        ),
        "image_unavailable": "Không hiển thị được ảnh này.",
        "per_image": "Theo từng ảnh",
        "zoom_in": "Phóng to",
        "zoom_out": "Thu nhỏ",
        "reset_view": "Đặt lại",
        "window_width": "Độ rộng cửa sổ (W)",
        "window_level": "Mức cửa sổ (L)",
        "preset_default": "Mặc định",
        "preset_lung": "Cửa sổ phổi",
        "preset_soft": "Mô mềm",
        "model_view": "Ảnh như AI thấy",
        "viewer_help": (
            "Cuộn chuột: phóng to/thu nhỏ · kéo: di chuyển ảnh · kéo chuột phải hoặc Shift+kéo: "
            "độ rộng cửa sổ (trái-phải) và mức cửa sổ (lên-xuống) · phím + − 0. Ảnh như AI thấy: "
            "ảnh mà AI đã chấm, cùng bản đồ nhiệt."
        ),
        "risk_nav": "Nguy cơ",
        "risk_title": "Danh sách đánh giá nguy cơ",
        "risk_help": (
            "Hồ sơ lâm sàng được mô hình đánh giá nguy cơ tại cơ sở. Hồ sơ đang chờ kết quả xác "
            "nhận được xếp trước, nguy cơ cao trước nguy cơ thấp. Hãy ghi lại kết quả xác nhận "
            "khi đã có: số liệu này cho biết mô hình hoạt động tốt đến đâu tại cơ sở."
        ),
        "risk_of": "nguy cơ {label}",
        "risk_label_dengue": "sốt xuất huyết",
        "risk_time": "Thời gian",
        "risk_model": "Mô hình",
        "risk_probability": "Nguy cơ",
        "risk_category": "Phân loại",
        "risk_high": "Nguy cơ cao",
        "risk_low": "Nguy cơ thấp",
        "risk_imputed": "Giá trị được ước tính",
        "risk_imputed_help": "Các giá trị bị thiếu đã được mô hình ước tính",
        "risk_none": "không có",
        "risk_status_scored": "Đã đánh giá",
        "risk_status_refused": "Bị từ chối",
        "risk_awaiting": "Chờ kết quả xác nhận",
        "risk_awaiting_only": "Chỉ hồ sơ chờ kết quả xác nhận",
        "risk_reasons": "Chi tiết",
        "risk_code_outside_intended_population": "Ngoài quần thể dự định của mô hình",
        "risk_code_population_unknown": (
            "Không xác định được quần thể dự định: thiếu thông tin cần để kiểm tra (ví dụ tuổi)"
        ),
        "risk_code_invalid_value": (
            "Có giá trị không hợp lệ, không hợp lý hoặc không đúng mã quy định"
        ),
        "risk_code_outcome_missing": "Không có kết quả đầu ra dùng được",
        "risk_calibration": "Hiệu chỉnh theo cơ sở",
        "risk_profile": "hiệu chỉnh theo cơ sở #{id}",
        "risk_profile_raw": "mô hình trước hiệu chỉnh: {p}",
        "risk_profile_threshold_only": (
            "chỉ dùng ngưỡng riêng của cơ sở; nguy cơ không được hiệu chỉnh lại"
        ),
        "risk_sent": "Giá trị đã gửi",
        "risk_sent_help": (
            "Các giá trị của hồ sơ đúng như cơ sở đã gửi; không hiển thị mã định danh bệnh nhân "
            "và cơ sở"
        ),
        "risk_sent_not_served": (
            "mô hình hiện không được triển khai tại đây: không hiển thị giá trị"
        ),
        "risk_sent_unreadable": "không đọc được hồ sơ như đã gửi",
        "risk_fhir_notes": "Ghi chú khi đọc gói FHIR (bằng tiếng Anh)",
        "risk_model_file": "tệp mô hình",
        "risk_agreement_profile": "cấu hình hiệu chỉnh của cơ sở #{id}",
        "risk_agreement_own": "hiệu chỉnh gốc của mô hình",
        "risk_outcome": "Kết quả xác nhận",
        "risk_outcome_confirmed": "Đã xác nhận",
        "risk_outcome_ruled_out": "Đã loại trừ",
        "risk_outcome_unknown": "Chưa rõ",
        "risk_outcome_help": (
            "Đã xác nhận: chẩn đoán đã được khẳng định (ví dụ bằng xét nghiệm). Đã loại trừ: "
            "chẩn đoán đã được loại trừ. Chưa rõ: sẽ không có kết quả."
        ),
        "risk_outcome_save": "Lưu kết quả",
        "risk_outcome_change": "Sửa",
        "risk_outcome_saved": "Đã lưu kết quả.",
        "risk_refused_no_outcome": (
            "Hồ sơ này bị từ chối và chưa được đánh giá nguy cơ: không ghi kết quả cho hồ sơ này."
        ),
        "risk_no_records": "Không có hồ sơ nào phù hợp.",
        "risk_truncated": (
            "Mỗi phần chỉ hiển thị {n} hồ sơ mới nhất: hãy dùng bộ lọc để thu hẹp danh sách."
        ),
        "risk_agreement_title": "Mức đồng thuận và hiệu chuẩn theo cơ sở",
        "risk_agreement_help": (
            "Tính từ các kết quả đã ghi tại đây (đã xác nhận hoặc đã loại trừ). Đồng thuận: phân "
            "loại (cao hoặc thấp) khớp với kết quả. Hệ số chặn hiệu chuẩn gần 0 và độ dốc gần 1: "
            "nguy cơ hiển thị khớp với thực tế tại cơ sở. Cần ít nhất {n} kết quả, có cả ca đã "
            "xác nhận và ca đã loại trừ, mới tính được hiệu chuẩn."
        ),
        "risk_no_agreement": "Chưa có kết quả nào được ghi.",
        "risk_n": "Có kết quả",
        "risk_positives": "Đã xác nhận",
        "risk_agreement": "Đồng thuận",
        "risk_sensitivity": "Độ nhạy",
        "risk_specificity": "Độ đặc hiệu",
        "risk_auroc": "AUROC",
        "risk_cal_intercept": "Hệ số chặn hiệu chuẩn",
        "risk_cal_slope": "Độ dốc hiệu chuẩn",
        "risk_mean_vs_rate": "Nguy cơ trung bình / tỷ lệ thực tế",
        "risk_note_one_class": "mới có một loại kết quả: chưa tính được AUROC và hiệu chuẩn",
        "risk_note_too_few": "ít hơn {n} kết quả: chưa tính hiệu chuẩn",
        "risk_note_separated": (
            "không xác định được độ dốc hiệu chuẩn (hai nhóm kết quả tách biệt hoàn toàn)"
        ),
    },
}


def norm_lang(lang: str | None) -> str:
    return lang if lang in LANGS else "vi"


def t(lang: str, key: str, **values: object) -> str:
    text = MESSAGES.get(lang, {}).get(key) or MESSAGES["en"][key]
    return text.format(**values) if values else text


def finding(lang: str, label: str) -> str:
    return (
        FINDING_NAMES.get(lang, {}).get(label)
        or FINDING_NAMES["en"].get(label)
        or label.replace("_", " ")
    )


def age_text(lang: str, years: float) -> str:
    """An age as a clinician writes it: months under 2 years, whole years above."""
    if years < 2:
        return t(lang, "months", n=int(years * 12 + 1e-9))
    return t(lang, "years", n=int(years + 1e-9))


def ages_text(lang: str, age_years: list[float] | tuple[float, float] | None) -> str:
    """[1, 6) -> 'ages 1 to 5 years': whole years as clinicians count them, the same wording
    as `contract.Population.age_text`; [0.5, 2.5) -> 'ages 0.5 to under 2.5 years'."""
    if not age_years:
        return t(lang, "ages_any")
    lo, hi = age_years
    if float(lo).is_integer() and float(hi).is_integer():
        return t(lang, "ages_range", lo=f"{lo:g}", hi=f"{hi - 1:g}")
    return t(lang, "ages_range_under", lo=f"{lo:g}", hi=f"{hi:g}")


def outside_reason(lang: str, population: dict) -> str:
    """Why a study is outside the model's population, from `ScoreResult.population`."""
    ages = ages_text(lang, population.get("ages"))
    if population.get("evidence") == "age" and population.get("age_years") is not None:
        return t(lang, "outside_by_age", age=age_text(lang, population["age_years"]), ages=ages)
    return t(lang, "outside_by_check", ages=ages)


LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLD", "RLD"})  # DICOM ViewPosition


def image_status(lang: str, status: str, code: str | None, view: str | None) -> str:
    """One image's status in words: scored, waiting, or why the AI did not score it."""
    if status != "failed_qc":
        return t(lang, f"image_{status}") if f"image_{status}" in MESSAGES["en"] else status
    if code == "view_not_frontal" and (view or "").upper() in LATERAL_VIEWS:
        return t(lang, "image_lateral")
    key = f"image_code_{code}"
    return t(lang, key) if key in MESSAGES["en"] else t(lang, "image_refused")


def risk_code(lang: str, code: str | None) -> str:
    """A risk record's refusal code (`tables.REFUSAL_CODES`) in words; an unknown code as is."""
    key = f"risk_code_{code}"
    return t(lang, key) if key in MESSAGES["en"] else (code or "")


def risk_label(lang: str, label: str) -> str:
    """The outcome a risk model predicts ("dengue"), in running text."""
    key = f"risk_label_{label}"
    return t(lang, key) if key in MESSAGES["en"] else label.replace("_", " ")


_TOO_FEW = re.compile(r"fewer than (\d+) outcomes")


def risk_note(lang: str, note: str | None) -> str:
    """Why a figure of `risk_outcomes.site_agreement` is missing, in words: its notes are
    English sentences joined by '; '; one not known here is shown as is."""
    out = []
    for part in (note or "").split("; "):
        if not part:
            continue
        if part.startswith("one outcome class only"):
            out.append(t(lang, "risk_note_one_class"))
        elif m := _TOO_FEW.match(part):
            out.append(t(lang, "risk_note_too_few", n=m.group(1)))
        elif part.startswith("calibration slope undefined"):
            out.append(t(lang, "risk_note_separated"))
        else:
            out.append(part)
    return "; ".join(out)
