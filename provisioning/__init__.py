"""edge-gateway: provisioning."""
