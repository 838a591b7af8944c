"""The fleet gateway: HAProxy in front of every llama-server of the inventory (docs/gateway.md)."""
