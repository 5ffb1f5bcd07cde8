"""`fedrdma node`: one long-lived data-plane process per site, for apps that live shorter.

A Flower ClientApp lives for one message and a ServerApp for one run; registered pools,
TLS endpoints and peers' sessions must outlive both. The node holds them; apps on the same
host attach over a Unix socket (`client.NodeClient`), map the node's pools as shared memory,
and ask it to move them (`daemon.Node`). The local protocol is in `messages.py`, its framing
and the kernel's word on who is calling in `unix.py`, the pools in `shm.py`.
"""
