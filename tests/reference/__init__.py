"""Reference-equivalence tests: the original authors' computations, restated with attribution, run beside sslvit.

See README.md in this folder for what each test compares, the pinned commits, the shims and the tolerances.
"""
