"""pi_jax's benchmarks: run each from the repository root as `python -m benchmarks.NAME --help`.

Shared pieces (the SmolLM2 shape, synthetic tokens, where results go) live in benchmarks.common,
the quiet-machine checks in benchmarks.quiet. Results are written under results/ (the committed
figures: results/benchmarks/ and one folder per study), each with the command that made it.
"""
