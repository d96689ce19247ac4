"""Hostile-input tests: each named after the attack it prevents."""
