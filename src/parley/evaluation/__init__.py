"""Quality evaluation: recognition accuracy under degraded audio (`parley eval stt`) and barge-in
behaviour against realistic callers (`parley eval bargein`).

Benchmarks (`parley.benchmarks`) measure how fast the server is; evaluations measure how often it is
right. Everything here is deterministic for a given seed so that runs can be compared.
"""
