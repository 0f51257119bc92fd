"""mp_eplb: expert-parallel load balancing with the weight transfer in a subprocess.

The public API mirrors vLLM's EPLB functions of the same names so an engine can switch.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
