"""The paper's experiments, one module per table: rows as configurations, results with provenance."""
