"""Dagster only: the one Definitions, jobs, schedules, sensors and the command-line entry point."""
