"""Planning: hardware profiles, the cost model, and the LP policy search.

- `hardware`: `HardwareProfile` (capacities, bandwidths, compute rates; YAML load/save) and `probe()`.
- `cost_model`: `estimate(spec, policy, workload, profile)`: prefill/decode time term by term and the
  peak bytes per tier from the same `build_plan` the runtime allocates with.
- `policy_search`: `search_policy(...)`: a pulp LP over the placement fractions per (gpu batch size,
  number of GPU batches) candidate; its result always passes `build_plan(...).check(budget)`.
- `cli_args` / `commands`: the `flexgen profile` and `flexgen policy` subcommands and the policy flags.

Nothing here imports torch at module level (only `probe` measures with it).
"""
