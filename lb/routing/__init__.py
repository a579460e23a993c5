"""Who gets a call: the balancer's pick (weights, priorities, headroom, prompt-cache affinity), how
long a throttled backend cools, the circuit breaker, and each backend's own deployment names."""
