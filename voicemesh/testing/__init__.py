"""Test support that ships with the package: loopback servers speaking real provider protocols,
so connectors are tested (and benchmarked) on the wire with no internet."""
