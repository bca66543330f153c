"""Thin command-line entry points: train, evaluate, sample, report, benchmark."""
