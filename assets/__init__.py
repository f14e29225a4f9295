"""Thin Dagster asset and asset-check wrappers, one module per domain.

A wrapper unpacks config and resources, calls one library function and returns metadata.
"""
