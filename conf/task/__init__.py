"""Task presets; the name is a key of eval.tasks.TASKS."""
