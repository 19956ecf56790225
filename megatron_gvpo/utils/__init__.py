"""Small shared utilities: logging and metrics, process-group start-up."""
