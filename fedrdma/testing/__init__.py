"""Faults and attacks for the tests, injected from outside the code they test.

Nothing in production imports this package: a fault is a wrapper around a real part (an
agent that corrupts what lands, a silo whose training is poisoned), started as its own
process by the tests (`python -m fedrdma.testing.peer`, `python -m fedrdma.testing.silo`).
"""
