"""Reports written from the records: the per-stage funnel tables and charts, the run's
report.md, and the base-vs-aligned evaluation table."""
