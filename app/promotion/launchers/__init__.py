"""Where a dedicated deployment runs: a local vLLM process, or a Kubernetes Deployment + Service."""
