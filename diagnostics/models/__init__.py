"""Networks and estimators, created by name from a registry. Imports `contract` only: never `data`
or `train`."""
