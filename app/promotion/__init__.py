"""Promotion: merge a hot adapter into its base model, optionally AWQ-quantize it, serve it as a dedicated
vLLM deployment and switch the adapter's traffic to it (and back, on demotion).

The gateway only writes job rows and reads the routing table; the worker (`lora-gateway worker`) runs
the jobs, and the ML steps run in subprocesses (app/promotion/ml/) so torch never loads into either.
"""
