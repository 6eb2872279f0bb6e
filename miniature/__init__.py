"""The paper in miniature: PI fine-tuning of a small token-level LLaMA on a CPU (demo.py).

runner.py runs each train.py / eval.py command as a logged subprocess; experiment.py is the
plan (which models, fine-tuning arms, checkpoints and evaluations) and runs it, resumably;
report.py turns the results into the paper's tables, plots and explicit checks of its findings.
"""
