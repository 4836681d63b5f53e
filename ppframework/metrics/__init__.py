"""Quality and cost measurements: perplexity, timing."""
