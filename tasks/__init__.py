"""Thin Prefect tasks, one module per pipeline stage; each calls one `flexgen_core` function.

Retries only where a stage reads data that can fail transiently (datasets); generation is never retried
blindly. Tasks that take or return live objects (the engine, run stores, prepared runs) use `NO_CACHE` and
keep their results in memory: the run store, not Prefect's result storage, is the evaluation's checkpoint.
"""
