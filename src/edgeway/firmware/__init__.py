"""Firmware updates: signed images and campaigns (docs/firmware.md)."""
