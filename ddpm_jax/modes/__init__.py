"""The run modes of main.py, one module each (--mode=train|sample|eval|sweep|distill|edit): thin drivers that load what they need
once (the sampling modes: trained_params.py) and call the library (docs/architecture.md)."""
