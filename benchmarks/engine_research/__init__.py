"""Prototypes and measurements for the generation-engine choice (issue 12); not project code.

See docs/engine-research.md for what was measured with them and what was concluded.
"""
