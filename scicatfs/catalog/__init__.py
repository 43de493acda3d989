"""Talking to SciCat: the only layer that speaks HTTP."""
