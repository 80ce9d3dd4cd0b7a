"""Slide-level evaluation: embedding extraction, KNN protocols, metrics, cohort splits."""
