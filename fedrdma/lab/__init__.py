"""WAN emulation on one machine: namespaces joined by shaped, delayed, lossy paths.

`Lab.up(LabConfig.uniform(rate="1gbit", rtt="20ms", loss=0.01))` builds the lab; run a
process in it with `lab.exec_prefix("silo1") + cmd`. Inside the lab, UCX needs
`UCX_NET_DEVICES=wan0` in a silo (`silo<k>` in the aggregator), and `lo` stays up in
every namespace because NIXL opens an endpoint to itself at start.
"""

from fedrdma.lab.config import LabConfig, PathShape
from fedrdma.lab.errors import LabError
from fedrdma.lab.lab import Lab, LabPath, PathStatus, lab

__all__ = ["Lab", "LabConfig", "LabError", "LabPath", "PathShape", "PathStatus", "lab"]
