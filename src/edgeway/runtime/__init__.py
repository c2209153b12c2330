"""The gateway runtime: live reconfiguration (reload) and the ingest switch."""
