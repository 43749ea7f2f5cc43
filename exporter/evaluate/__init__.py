"""Leakage and utility measurements shared by every method."""
