"""edge-gateway: firmware_bridge."""
