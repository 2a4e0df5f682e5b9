"""Evaluations: the shared driver (`evals.run`) and its tasks, `evals.librilight` and `evals.asr`."""
