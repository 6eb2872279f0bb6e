"""Evaluations of long-context models: sliding-window perplexity and passkey retrieval."""

from pi_jax.evals.passkey import effective_window, passkey_prompt
from pi_jax.evals.perplexity import evaluate_perplexity, plan_windows, reference_nll
