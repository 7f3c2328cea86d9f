"""The nightly regression job: its spec, the statistics that flag a regression, the state files, the job."""
