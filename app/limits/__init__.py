"""Tenant limits: request and token rates, concurrency, request-size caps; enforced across replicas."""
