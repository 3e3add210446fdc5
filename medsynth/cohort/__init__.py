"""Cohorts: a spec of what to generate -> a plan per sample -> resumable, distributed generation -> audit.

Modules: :mod:`~medsynth.cohort.spec` (the YAML spec), :mod:`~medsynth.cohort.statistics`
(the real dataset's statistics), :mod:`~medsynth.cohort.plan` (per-sample conditions),
:mod:`~medsynth.cohort.run` (generation), :mod:`~medsynth.cohort.audit` (checks and report).
See ``docs/cohort.md``.
"""
