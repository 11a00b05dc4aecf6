"""HELM-style evaluation layer: data model, scenarios, adapters, metrics, run store and outputs (Prefect-free)."""
