"""Canonical tables, real data sources and their adapters."""
