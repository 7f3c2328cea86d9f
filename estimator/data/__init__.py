"""Reading the results contract: run folders (manifest, samples, prompts, telemetry) → one samples table."""
