"""The seeded chaos run (`python -m bench.chaos`, see __main__.py), in parts:

    run       one seed's run: the daemon, the operation loop, its calm tail, then the checks
    workload  the seeded operations on session folders, and the model of what exists
    faults    the faults, dealt and healed by operation counts
    checks    convergence with the files, and what the daemon's log says
    record    the Outcome of a seed, and the marker lines written into the daemon's log

tests/test_chaos.py runs a short, fixed-length version in the suite.
"""

from bench.chaos.record import Outcome
from bench.chaos.run import Chaos

__all__ = ["Chaos", "Outcome"]
