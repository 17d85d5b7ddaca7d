"""The test bench: simulated meters and sites for the tests, benchmarks and demo.

Not part of the product (the wheel does not ship it): it may import the
product's packages (the simulators share the protocol codecs), and no product
module imports it.
"""
