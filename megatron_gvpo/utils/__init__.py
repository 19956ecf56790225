"""Small shared utilities: logging and metrics, process-group start-up, atomic file writes."""
