"""Tests for mailsys, run with trial."""
