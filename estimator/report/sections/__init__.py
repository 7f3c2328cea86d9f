"""One module per report section: each renders typed results into a `Section` (no fitting, no predicting)."""
