"""lm-eval integration: in-process evaluation of the live model, local offline tasks, checkpoint runner."""
