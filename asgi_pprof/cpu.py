"""Placeholder until the sampler lands (this session)."""
