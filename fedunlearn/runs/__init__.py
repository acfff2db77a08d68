"""Assembling and running a job: the runner, experiments, results folders and reports."""
