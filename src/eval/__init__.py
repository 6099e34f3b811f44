"""`python -m eval`: tasks, scoring, runner, results."""
