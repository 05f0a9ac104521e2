"""The DICOM network edge: receiver, results (SR, secondary captures), export."""
