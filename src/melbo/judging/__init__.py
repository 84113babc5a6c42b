"""Judging what perturbations do: completion measures, clustering, phrases and labels, learned against random,
checkers, the diff's divergence ranking, monitors, findings.

Imports the top level, melbo.io and melbo.engine.
"""
