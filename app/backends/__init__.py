"""Talking to and running vLLM backends: the HTTP client, and local launchers for dev and tests."""
