"""Prefect flows: profile, plan, evaluate and benchmark, each one `@flow` composed of the thin tasks in `tasks/`.

Parameters are the pydantic models of `flows.params`; `flows.cli` adds `flexgen eval` to the `flexgen`
command through the `flexgen.commands` entry point, so `flexgen_core` never imports Prefect.
"""
