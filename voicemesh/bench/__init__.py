"""Benchmark harness support: rendering a benchmark report to Markdown, JSON and plots."""
