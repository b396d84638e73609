"""The ``leap`` command line: the pipeline side's front door to flows, deployments and services.

The engine (:mod:`leapcore`) knows nothing of orchestration; this package wires it to the Prefect
flows, the MLflow registry and the deployments. ``leap`` is :func:`leapcli.cli.main`.
"""
