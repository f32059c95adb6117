"""Metric writers and sample metrics."""
