"""Observability: Prometheus metrics, the audit log, structured logs."""
