"""Models of what these machines cannot show: RoCE go-back-N on a lossy WAN, TCP buffers vs BDP.

`fedrdma sim` prints the Link-Enable table; `fedrdma tune` turns it into a chunk size and
window for one path (see `fedrdma.sim.tune.recommend`).
"""
