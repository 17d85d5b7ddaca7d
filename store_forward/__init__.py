"""edge-gateway: store_forward."""
