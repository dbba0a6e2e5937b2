"""Engines that run `simulator.engine`'s rounds elsewhere than in this process.

`simulator.engines.ray`: the devices sharded onto the actors of a Ray cluster
(``fedsim run --engine ray``; needs the ``ray`` extra).
"""
