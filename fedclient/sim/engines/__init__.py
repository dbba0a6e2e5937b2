"""Engines that run `fedclient.sim.engine`'s rounds elsewhere than in this process.

`fedclient.sim.engines.ray`: the devices sharded onto the actors of a Ray cluster
(``fedsim run --engine ray``; needs the ``ray`` extra).
"""
