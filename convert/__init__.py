"""Checkpoint converters: `python -m convert.to_pi_jax SRC OUT`, `python -m convert.to_hf CKPT OUT`."""
