"""Development kit: tiny local models and a CPU vLLM to test the gateway against, with no downloads."""
