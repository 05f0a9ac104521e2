"""The CXR data layer: harmonised labels, dataset adapters, patient-level splits, synthetic data."""
