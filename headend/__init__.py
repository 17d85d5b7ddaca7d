"""edge-gateway: the reference headend (central side of the uplink): ingest, stores, registry, USB import."""
