"""Test doubles of paid services that parley's tests and benchmarks run against."""
