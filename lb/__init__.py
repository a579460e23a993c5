"""Azure OpenAI load balancer: one URL in front of a pool of Azure OpenAI endpoints."""

__version__ = "0.1.0"
