"""Harnesses for tests, benchmarks and the demo, apart from the converter and the plugin: tiny random
models of every family (`tiny.py`) and offline vLLM jobs in a fresh process each (`offline.py`)."""
