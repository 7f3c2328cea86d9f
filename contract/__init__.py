"""The contract beneath harness and estimator: the request (what a client declares, apart from the true output
length only the trace knows), the engine limits, the run manifest's header and its column names, the workload
file formats and the arrival generator, and the arrival-policy protocol.

Standard library only. The harness and the estimator still meet only through files and these types: they never
import each other.
"""

from contract.request import Declared, EngineLimits, Request

__all__ = ["Declared", "EngineLimits", "Request"]
