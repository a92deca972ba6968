"""Launchers that run the vitscale training loop at scale: Ray Tune sweeps of Ray Train jobs.

`python launch/sweep.py +sweep=NAME` is the entry point; the modules here are its parts, kept apart so
the validation that must run before any Ray start never imports Ray.
"""
