"""Estimated cost of a request: the compute seconds it used × the hourly price of the machine.

Compute seconds are the model call's wall time divided among the requests of its batch (a
batch of 8 that took 2 s costs each request 0.25 s), so batching shows up as cheaper requests.
The price is ``ServingSettings.price_per_hour`` (``REFINERY_PRICE_PER_HOUR``: USD per hour of
one serving replica; default 0.10, a small 2-vCPU cloud instance). Cache hits cost no model time.
"""

from __future__ import annotations


def request_cost(compute_seconds: float, hourly_price: float) -> float:
    return max(0.0, compute_seconds) * hourly_price / 3600.0
