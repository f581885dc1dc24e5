"""Oracles answer the engine's queries: people in the browser (human.py) or the ground truth (simulated.py).

The protocol itself is defined beside the round loop (`al_engine.loop.Oracle`), because the engine
must not import from the web side; it is re-exported here.
"""
from al_engine.loop import Oracle

from .simulated import SimulatedOracle

__all__ = ["Oracle", "SimulatedOracle"]
