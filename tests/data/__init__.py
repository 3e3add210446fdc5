"""Tests of medsynth.data."""
