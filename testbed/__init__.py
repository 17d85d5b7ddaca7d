"""edge-gateway's test bench: the demo, meter simulators, link emulator and test broker.

Not part of the product: the wheel does not ship this package, and no product
package (``gateway``, ``provisioning``, ``store_forward``, ``firmware_bridge``,
``headend``) imports it (import-linter checks both). It may import the
product's packages (the simulators share the protocol codecs). ``edgegw demo``
runs :mod:`testbed.demo` from a source checkout (``./dev demo``).
"""
