"""Dagster wiring: Definitions, resources, partitions, sensors, schedules, checks."""
