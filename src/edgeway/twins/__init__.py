"""Device twins: desired and reported state per device, offline-first (docs/twins.md)."""
