"""Held mail: the quarantine, each recipient's choice, the daily digest and its signed links."""
