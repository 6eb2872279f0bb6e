"""Evaluations of long-context models: sliding-window perplexity, passkey and needle retrieval."""

from pi_jax.evals.passkey import effective_window, passkey_prompt
from pi_jax.evals.perplexity import (evaluate_perplexity, plan_windows, prefix_perplexities,
                                     reference_nll, tokenize_documents)
